"""Key rotation: re-encrypt every stored token under the primary key, online.

Called through :mod:`mailgov.services` (``rotate_keys``, ``key_usage``,
``rotation_pending``), which admin actions, tasks and commands use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast

from mailgov.conf import mailgov_settings
from mailgov.crypto import get_keyring, key_id_of
from mailgov.exceptions import DecryptionError
from mailgov.fields import EncryptedTextField, Sealed
from mailgov.models import MailboxCredentials

logger = logging.getLogger("mailgov")


@dataclass
class RotationResult:
    """What a rotation run did: values re-encrypted, rows written, rows it could
    not decrypt (``failed_rows``) and rows senders kept rewriting through every
    pass (``busy_rows``, still pending: run again)."""

    rotated: int = 0
    rows: int = 0
    failed_rows: list[str] = field(default_factory=list)
    #: Rows senders kept rewriting during the run (still pending: run again).
    busy_rows: list[str] = field(default_factory=list)


def _encrypted_fields() -> list[EncryptedTextField]:
    return [
        MailboxCredentials._meta.get_field(name) for name in MailboxCredentials.ENCRYPTED_FIELDS
    ]


def rotation_pending() -> QuerySet[MailboxCredentials]:
    """Credentials rows holding a value not under the primary key."""
    prefix = get_keyring().primary_prefix
    pending = Q()
    # Compare the stored text as plain text: a lookup on the encrypted field
    # itself would treat the prefix as a plaintext to encrypt (and refuse).
    heads = {
        f"_{name}_raw": Cast(name, TextField()) for name in MailboxCredentials.ENCRYPTED_FIELDS
    }
    for alias in heads:
        pending |= Q(**{f"{alias}__isnull": False}) & ~Q(**{f"{alias}__startswith": prefix})
    return MailboxCredentials.objects.alias(**heads).filter(pending)


def key_usage() -> dict[str, int]:
    """How many stored values each key id holds (no decryption)."""
    counts: dict[str, int] = {}
    rows = MailboxCredentials.objects.values_list(*MailboxCredentials.ENCRYPTED_FIELDS)
    for row in rows.iterator(chunk_size=2000):
        for value in row:
            if isinstance(value, Sealed):
                key_id = key_id_of(value.ciphertext) or "(unreadable header)"
                counts[key_id] = counts.get(key_id, 0) + 1
    return counts


#: Null-safe equality per database vendor, for the compare-and-set of rotation
#: (PostgreSQL has a path of its own, _write_batch_postgresql).
_SAME_AS = {"sqlite": "IS", "mysql": "<=>"}


def _write_sealed_if_unchanged(
    rows: list[tuple[Any, list[Any], list[Any]]],
    fields: list[EncryptedTextField],
    connection: BaseDatabaseWrapper,
) -> int:
    """Write re-encrypted values, each row only if it still holds what was read.

    ``rows`` are ``(pk, values read, values to write)``. One prepared UPDATE
    per row, ``... WHERE pk = %s AND <column> IS <value read> ...``, sent
    with ``executemany``: a row that a token refresh, a revocation or a
    reconnect wrote meanwhile is left alone (its new values are the
    writer's, under the primary key). Returns the number of rows written.

    Not ``bulk_update()``: it reads values through the descriptor, i.e. as
    plaintext, which the field rightly refuses to write; and building a
    ``CASE`` expression per row in the ORM costs more than the encryption.
    """
    meta = MailboxCredentials._meta
    quote = connection.ops.quote_name
    same = _SAME_AS.get(connection.vendor)
    assignments = ", ".join(f"{quote(field_.column)} = %s" for field_ in fields)
    if same is not None:
        guards = " AND ".join(f"{quote(field_.column)} {same} %s" for field_ in fields)
    else:  # any other database: the portable, longer form
        guards = " AND ".join(
            f"({quote(f.column)} = %s OR ({quote(f.column)} IS NULL AND %s IS NULL))"
            for f in fields
        )
    # Only quoted names from the model's own metadata; every value is a parameter.
    sql = (
        f"UPDATE {quote(meta.db_table)} SET {assignments} "  # noqa: S608
        f"WHERE {quote(meta.pk.column)} = %s AND {guards}"
    )
    params = []
    for pk, before, after in rows:
        row = [field_.get_prep_value(value) for field_, value in zip(fields, after, strict=True)]
        row.append(meta.pk.get_db_prep_value(pk, connection))
        for field_, value in zip(fields, before, strict=True):
            prepared = field_.get_prep_value(value)
            row.extend([prepared] if same is not None else [prepared, prepared])
        params.append(row)
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)
        return cursor.rowcount


def _write_batch_postgresql(
    rows: list[tuple[Any, list[Any], list[Any]]],
    fields: list[EncryptedTextField],
    connection: BaseDatabaseWrapper,
) -> set[Any]:
    """PostgreSQL: lock, compare and write a batch in one statement; return
    the pks written.

    The rows are locked ``FOR NO KEY UPDATE SKIP LOCKED``: a row whose
    refresh is in flight stays locked across the provider's HTTP call, and
    waiting for it would hold this batch's other rows (and their senders)
    that long. A locked row, or one whose values changed since they were
    read, is not written and not returned. One round trip per batch.
    """
    meta = MailboxCredentials._meta
    quote = connection.ops.quote_name
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    columns = [quote(field_.column) for field_ in fields]
    new = [f"new_{index}" for index in range(len(fields))]
    old = [f"old_{index}" for index in range(len(fields))]
    # The pk typed as its column is: an untyped parameter would compare as
    # text, and the join would scan the whole table.
    pk_type = meta.pk.db_type(connection)
    row_sql = "(" + ", ".join([f"CAST(%s AS {pk_type})"] + ["%s"] * (2 * len(fields))) + ")"
    values = ", ".join([row_sql] * len(rows))
    assignments = ", ".join(f"{c} = v.{n}" for c, n in zip(columns, new, strict=True))
    guards = " AND ".join(
        f"t.{c} IS NOT DISTINCT FROM v.{n}" for c, n in zip(columns, old, strict=True)
    )
    # Only quoted names from the model's own metadata; every value is a parameter.
    sql = (
        f"WITH given (id, {', '.join(new + old)}) AS (VALUES {values}), "  # noqa: S608
        f"v AS (SELECT given.* FROM given JOIN {table} t ON t.{pk} = given.id "
        "FOR NO KEY UPDATE OF t SKIP LOCKED) "
        f"UPDATE {table} AS t SET {assignments} FROM v "
        f"WHERE t.{pk} = v.id AND {guards} RETURNING t.{pk}"
    )
    params: list[Any] = []
    for row_pk, before, after in rows:
        params.append(meta.pk.get_db_prep_value(row_pk, connection))
        params.extend(f.get_prep_value(value) for f, value in zip(fields, after, strict=True))
        params.extend(f.get_prep_value(value) for f, value in zip(fields, before, strict=True))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {meta.pk.to_python(value) for (value,) in cursor.fetchall()}


def _write_batch(
    updates: list[tuple[Any, list[Any], list[Any]]],
    fields: list[EncryptedTextField],
    db: str,
    names: list[str],
) -> tuple[list[Any], list[Any]]:
    """Write a rotated batch in the caller's transaction, each row only if it
    still holds what was read. Returns ``(pks written, pks to take up again)``."""
    connection = connections[db]
    if connection.vendor == "postgresql":
        written = _write_batch_postgresql(updates, fields, connection)
        # Locked by a sender, or changed by one: the retry pass takes up
        # those still pending.
        return (
            [pk for pk, _, _ in updates if pk in written],
            [pk for pk, _, _ in updates if pk not in written],
        )
    mine = [pk for pk, _, _ in updates]
    if _write_sealed_if_unchanged(updates, fields, connection) == len(updates):
        return mine, []
    # Some rows were written by a sender between read and write (rare). Ours
    # are those holding exactly what we wrote: every ciphertext has a fresh
    # random nonce, so no one else's can match. The others are taken up
    # again if still pending.
    now = {
        row[0]: list(row[1:])
        for row in MailboxCredentials.objects.using(db)
        .filter(pk__in=mine)
        .values_list("pk", *names)
    }
    mine = [pk for pk, _, after in updates if now.get(pk) == after]
    pending = set(
        rotation_pending().using(db).filter(pk__in=list(now)).values_list("pk", flat=True)
    )
    return mine, [pk for pk, _, _ in updates if pk not in mine and pk in pending]


def rotate_keys(
    *, batch_size: int | None = None, progress: Callable[[int], None] | None = None
) -> RotationResult:
    """Re-encrypt every value not under the primary key, one batch at a time.

    Online: mail keeps flowing while it runs, on SQLite as on PostgreSQL.
    Each batch is read and re-encrypted outside any transaction (no lock is
    held while the CPU works), then written in one short transaction with a
    compare-and-set per row (:func:`_write_sealed_if_unchanged`): a row that
    a sender wrote meanwhile is not overwritten, and is taken up again at
    the end of the run. So a sender waits at most for one batch's write
    (SQLite's write lock, PostgreSQL's row locks of that batch's rows), never
    for the whole rotation: on SQLite, where a writer waiting for the lock
    only polls, the gaps between two writes are what lets it in.

    Every key stays able to decrypt until it is removed from the keyring.
    Resumable: an interrupted run leaves whole batches done, and a new run
    picks up what is still pending. A row that cannot be decrypted is skipped
    and reported, not rewritten; a row still being rewritten by senders after
    a few passes is reported in ``busy_rows`` (run again).
    """
    batch_size = batch_size or mailgov_settings.ROTATION_BATCH_SIZE
    fields = _encrypted_fields()
    result = RotationResult()
    changed_meanwhile: list[Any] = []
    last_pk = None
    while True:
        query = rotation_pending().order_by("pk")
        if last_pk is not None:
            query = query.filter(pk__gt=last_pk)
        batch_pks, lost = _rotate_batch(query, fields, batch_size, result)
        if not batch_pks:
            break
        changed_meanwhile.extend(lost)
        last_pk = batch_pks[-1]
        if progress:
            progress(len(batch_pks))
    # Rows a sender wrote between read and write, or held locked: again, a
    # few times at most, with a short pause (a refresh in flight holds its
    # row for one HTTP call to the provider).
    for attempt in range(5):
        if not changed_meanwhile:
            break
        time.sleep(0.1 * 2**attempt)
        pending = changed_meanwhile
        changed_meanwhile = []
        for start in range(0, len(pending), batch_size):
            query = rotation_pending().filter(pk__in=pending[start : start + batch_size])
            _pks, lost = _rotate_batch(query.order_by("pk"), fields, batch_size, result)
            changed_meanwhile.extend(lost)
    result.busy_rows = [str(pk) for pk in changed_meanwhile]
    return result


def _rotate_batch(
    query: Any, fields: list[EncryptedTextField], batch_size: int, result: RotationResult
) -> tuple[list[Any], list[Any]]:
    """Rotate the first ``batch_size`` rows of ``query``; count into ``result``.

    Returns ``(the batch's pks, pks to take up again)``: rows a sender
    changed between read and write that still hold an old key's value, and
    on PostgreSQL rows locked by a sender at write time.
    """
    prefix = get_keyring().primary_prefix
    names = [field_.attname for field_ in fields]
    db = router.db_for_write(MailboxCredentials)
    # Plain rows, not model instances: instantiating models costs more than
    # the cryptography here. Read in autocommit (no lock is taken), from the
    # database the rows are written to.
    batch = [list(row) for row in query.using(db)[:batch_size].values_list("pk", *names)]
    if not batch:
        return [], []
    updates: list[tuple[Any, list[Any], list[Any]]] = []
    counts: dict[Any, int] = {}
    for row in batch:
        pk, before = row[0], row[1:]
        after = list(before)
        try:
            for index, field_ in enumerate(fields):
                sealed = before[index]
                if isinstance(sealed, Sealed) and not sealed.ciphertext.startswith(prefix):
                    plaintext = field_.decrypt_for_pk(pk, sealed.ciphertext)
                    after[index] = field_.seal_for_pk(pk, plaintext)
                    counts[pk] = counts.get(pk, 0) + 1
        except DecryptionError as exc:
            logger.error("key rotation skipped a row: %s", exc)
            result.failed_rows.append(str(pk))
            continue
        updates.append((pk, before, after))
    mine: list[Any] = []
    lost: list[Any] = []
    if updates:
        with transaction.atomic(using=db):
            mine, lost = _write_batch(updates, fields, db, names)
    result.rows += len(mine)
    result.rotated += sum(counts.get(pk, 0) for pk in mine)
    return [row[0] for row in batch], lost
