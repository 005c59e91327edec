"""Key rotation: re-encrypt every stored value under the primary key, online.

Every table holding :class:`~mailgov.fields.EncryptedTextField` columns is
rotated (:func:`encrypted_models`): mailbox credentials, outbox payloads,
pending revocations, and whatever model is added next, in this app or in the
project. Called through :mod:`mailgov.services` (``rotate_keys``,
``key_usage``, ``rotation_pending``), which admin actions, tasks and commands
use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from django.apps import apps
from django.db import connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Case, Model, Q, QuerySet, TextField, Value, When
from django.db.models.functions import Cast, Length, Substr

from mailgov.conf import mailgov_settings
from mailgov.crypto import get_keyring, key_id_of
from mailgov.exceptions import DecryptionError
from mailgov.fields import EncryptedTextField, Sealed
from mailgov.models import MailboxCredentials

logger = logging.getLogger("mailgov")

#: Ciphertext characters one batch reads at most (plus one row): a batch of
#: outbox payloads is not ``ROTATION_BATCH_SIZE`` tokens of a few hundred
#: bytes but messages with attachments, and the compare-and-set sends each
#: value back once more.
BATCH_MAX_CHARS = 32 * 1024 * 1024
#: Values up to this size come with the batch's first query; longer ones are
#: read in a second query, for the rows the batch's budget takes.
_INLINE_MAX_CHARS = 64 * 1024
#: Enough of a stored value for its header (``mg1$<key id of 1-32>$``).
_HEADER_CHARS = 40


@dataclass
class RotationResult:
    """What a rotation run did, over every encrypted table: values
    re-encrypted, rows written, rows it could not decrypt (``failed_rows``)
    and rows senders kept rewriting through every pass (``busy_rows``, still
    pending: run again).

    Rows are named by :func:`row_name`: a credentials row by its pk (the
    mailbox's UUID), any other as ``"<app_label.model>:<pk>"``.
    """

    rotated: int = 0
    rows: int = 0
    failed_rows: list[str] = field(default_factory=list)
    #: Rows senders kept rewriting during the run (still pending: run again).
    busy_rows: list[str] = field(default_factory=list)


def encrypted_models() -> list[type[Model]]:
    """Every installed model with encrypted columns of its own, in registry
    order (so :class:`~mailgov.models.MailboxCredentials` comes first of
    mailgov's).

    Found by field type rather than from a list kept by hand, so that a new
    model is not forgotten: a value left under a retired key is a value lost.
    Proxy models share their concrete model's table, and an inherited column
    is rotated through the model whose table holds it.
    """
    return [model for model in apps.get_models() if _encrypted_fields(model)]


def _encrypted_fields(model: type[Model]) -> list[EncryptedTextField]:
    if model._meta.proxy:
        return []
    return [f for f in model._meta.local_concrete_fields if isinstance(f, EncryptedTextField)]


def row_name(model: type[Model], pk: Any) -> str:
    """How a result or a report names row ``pk`` of ``model``."""
    if model is MailboxCredentials:
        return str(pk)
    return f"{model._meta.label_lower}:{pk}"


@dataclass(frozen=True)
class _Table:
    """One model's encrypted columns, and the database its rows are written to."""

    model: type[Model]
    fields: tuple[EncryptedTextField, ...]
    db: str

    @classmethod
    def of(cls, model: type[Model]) -> _Table:
        return cls(model, tuple(_encrypted_fields(model)), router.db_for_write(model))

    @property
    def names(self) -> list[str]:
        return [field_.attname for field_ in self.fields]

    def rows(self) -> QuerySet:
        # The base manager: a default manager that hides rows (archived,
        # soft-deleted) must not hide them from the rotation.
        return self.model._base_manager.using(self.db)


def rotation_pending(model: type[Model] = MailboxCredentials) -> QuerySet:
    """Rows of ``model`` holding a value not under the primary key (by default
    the credentials rows, as before: :func:`rotation_pending_count` counts
    every encrypted table)."""
    fields = _encrypted_fields(model)
    if not fields:
        raise ValueError(f"{model._meta.label} has no encrypted column.")
    prefix = get_keyring().primary_prefix
    pending = Q()
    # Compare the stored text as plain text: a lookup on the encrypted field
    # itself would treat the prefix as a plaintext to encrypt (and refuse).
    heads = {f"_{f.attname}_raw": Cast(f.attname, TextField()) for f in fields}
    for alias in heads:
        pending |= Q(**{f"{alias}__isnull": False}) & ~Q(**{f"{alias}__startswith": prefix})
    return model._base_manager.alias(**heads).filter(pending)


def rotation_pending_by_model() -> dict[str, int]:
    """Rows holding a value not under the primary key, per model label
    (``"mailgov.outboxmessage"``), every encrypted model listed."""
    return {
        model._meta.label_lower: rotation_pending(model).using(router.db_for_write(model)).count()
        for model in encrypted_models()
    }


def rotation_pending_count() -> int:
    """Rows holding a value not under the primary key, in every encrypted table."""
    return sum(rotation_pending_by_model().values())


@overload
def key_usage(*, by_model: Literal[False] = False) -> dict[str, int]: ...
@overload
def key_usage(*, by_model: Literal[True]) -> dict[str, dict[str, int]]: ...
def key_usage(*, by_model: bool = False) -> dict[str, int] | dict[str, dict[str, int]]:
    """How many stored values each key id holds, over every encrypted table
    (no decryption); ``by_model=True``: ``{model label: {key id: values}}``,
    every encrypted model listed."""
    per_model: dict[str, dict[str, int]] = {}
    for model in encrypted_models():
        counts = per_model[model._meta.label_lower] = {}
        # Only each value's header: a payload may be megabytes long.
        heads = {
            f"_{f.attname}_head": Substr(Cast(f.attname, TextField()), 1, _HEADER_CHARS)
            for f in _encrypted_fields(model)
        }
        rows = _Table.of(model).rows().annotate(**heads).values_list(*heads)
        for row in rows.iterator(chunk_size=2000):
            for head in row:
                if head:  # NULL, or "" which the field reads as None
                    key_id = key_id_of(head) or "(unreadable header)"
                    counts[key_id] = counts.get(key_id, 0) + 1
    if by_model:
        return per_model
    total: dict[str, int] = {}
    for counts in per_model.values():
        for key_id, n in counts.items():
            total[key_id] = total.get(key_id, 0) + n
    return total


#: Null-safe equality per database vendor, for the compare-and-set of rotation
#: (PostgreSQL has a path of its own, _write_batch_postgresql).
_SAME_AS = {"sqlite": "IS", "mysql": "<=>"}


def _write_sealed_if_unchanged(
    rows: list[tuple[Any, list[Any], list[Any]]],
    table: _Table,
    connection: BaseDatabaseWrapper,
) -> int:
    """Write re-encrypted values, each row only if it still holds what was read.

    ``rows`` are ``(pk, values read, values to write)`` of ``table``'s
    encrypted columns. One prepared UPDATE per row, ``... WHERE pk = %s AND
    <column> IS <value read> ...``, sent with ``executemany``: a row that a
    token refresh, a revocation, a reconnect or a sender (an outbox payload
    set to NULL once sent, a retry's new payload) wrote meanwhile is left
    alone (its new values are the writer's, under the primary key). Returns
    the number of rows written.

    Not ``bulk_update()``: it reads values through the descriptor, i.e. as
    plaintext, which the field rightly refuses to write; and building a
    ``CASE`` expression per row in the ORM costs more than the encryption.
    """
    meta, fields = table.model._meta, table.fields
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
    table: _Table,
    connection: BaseDatabaseWrapper,
) -> set[Any]:
    """PostgreSQL: lock, compare and write a batch of ``table`` in one
    statement; return the pks written.

    The rows are locked ``FOR NO KEY UPDATE SKIP LOCKED``: a row whose
    refresh is in flight stays locked across the provider's HTTP call, and
    waiting for it would hold this batch's other rows (and their senders)
    that long. A locked row, or one whose values changed since they were
    read, is not written and not returned. One round trip per batch.
    """
    meta, fields = table.model._meta, table.fields
    quote = connection.ops.quote_name
    db_table, pk = quote(meta.db_table), quote(meta.pk.column)
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
        f"v AS (SELECT given.* FROM given JOIN {db_table} t ON t.{pk} = given.id "
        "FOR NO KEY UPDATE OF t SKIP LOCKED) "
        f"UPDATE {db_table} AS t SET {assignments} FROM v "
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
    updates: list[tuple[Any, list[Any], list[Any]]], table: _Table
) -> tuple[list[Any], list[Any]]:
    """Write a rotated batch of ``table`` in the caller's transaction, each
    row only if it still holds what was read. Returns ``(pks written, pks to
    take up again)``."""
    connection = connections[table.db]
    if connection.vendor == "postgresql":
        written = _write_batch_postgresql(updates, table, connection)
        # Locked by a sender, or changed by one: the retry pass takes up
        # those still pending.
        return (
            [pk for pk, _, _ in updates if pk in written],
            [pk for pk, _, _ in updates if pk not in written],
        )
    mine = [pk for pk, _, _ in updates]
    if _write_sealed_if_unchanged(updates, table, connection) == len(updates):
        return mine, []
    # Some rows were written by a sender between read and write (rare). Ours
    # are those holding exactly what we wrote: every ciphertext has a fresh
    # random nonce, so no one else's can match. The others are taken up
    # again if still pending.
    now = {
        row[0]: list(row[1:])
        for row in table.rows().filter(pk__in=mine).values_list("pk", *table.names)
    }
    mine = [pk for pk, _, after in updates if now.get(pk) == after]
    pending = set(
        rotation_pending(table.model)
        .using(table.db)
        .filter(pk__in=list(now))
        .values_list("pk", flat=True)
    )
    return mine, [pk for pk, _, _ in updates if pk not in mine and pk in pending]


def rotate_keys(
    *, batch_size: int | None = None, progress: Callable[[int], None] | None = None
) -> RotationResult:
    """Re-encrypt every value not under the primary key, one batch at a
    time, one encrypted table after the other (:func:`encrypted_models`).

    Online: mail keeps flowing while it runs, on SQLite as on PostgreSQL.
    Each batch is read and re-encrypted outside any transaction (no lock is
    held while the CPU works), then written in one short transaction with a
    compare-and-set per row (:func:`_write_sealed_if_unchanged`): a row that
    a sender wrote meanwhile is not overwritten, and is taken up again at
    the end of the run. So a sender waits at most for one batch's write
    (SQLite's write lock, PostgreSQL's row locks of that batch's rows), never
    for the whole rotation: on SQLite, where a writer waiting for the lock
    only polls, the gaps between two writes are what lets it in.

    A batch is ``batch_size`` rows (``MAILGOV_ROTATION_BATCH_SIZE``), fewer
    when their values exceed :data:`BATCH_MAX_CHARS` (outbox payloads).
    ``progress(n)`` is called after each batch with the rows it went through
    (so they add up to about :func:`rotation_pending_count` at the start).

    Every key stays able to decrypt until it is removed from the keyring.
    Resumable: an interrupted run leaves whole batches done, and a new run
    picks up what is still pending. A row that cannot be decrypted is skipped
    and reported, not rewritten; a row still being rewritten by senders after
    a few passes is reported in ``busy_rows`` (run again).
    """
    batch_size = batch_size or mailgov_settings.ROTATION_BATCH_SIZE
    result = RotationResult()
    changed_meanwhile: dict[_Table, list[Any]] = {}
    for table in map(_Table.of, encrypted_models()):
        lost_here = changed_meanwhile[table] = []
        last_pk = None
        while True:
            query = rotation_pending(table.model).order_by("pk")
            if last_pk is not None:
                query = query.filter(pk__gt=last_pk)
            batch_pks, lost = _rotate_batch(table, query, batch_size, result)
            if not batch_pks:
                break
            lost_here.extend(lost)
            last_pk = batch_pks[-1]
            if progress:
                progress(len(batch_pks))
    # Rows a sender wrote between read and write, or held locked: again, a
    # few times at most, with a short pause (a refresh in flight holds its
    # row for one HTTP call to the provider).
    for attempt in range(5):
        if not any(changed_meanwhile.values()):
            break
        time.sleep(0.1 * 2**attempt)
        for table, pending in list(changed_meanwhile.items()):
            lost_again = changed_meanwhile[table] = []
            for start in range(0, len(pending), batch_size):
                query = rotation_pending(table.model).filter(
                    pk__in=pending[start : start + batch_size]
                )
                _pks, lost = _rotate_batch(table, query.order_by("pk"), batch_size, result)
                lost_again.extend(lost)
    result.busy_rows = [
        row_name(table.model, pk) for table, pks in changed_meanwhile.items() for pk in pks
    ]
    return result


def _read_batch(table: _Table, query: QuerySet, batch_size: int) -> tuple[list[Any], list[list]]:
    """The first rows of ``query``, up to ``batch_size`` rows and about
    :data:`BATCH_MAX_CHARS` of ciphertext. Returns ``(the batch's pks,
    [pk, values read...] of the rows still there)``.

    Plain rows, not model instances: instantiating models costs more than
    the cryptography here. Values longer than ``_INLINE_MAX_CHARS`` are left
    out of the first query (its size stays bounded without knowing the
    rows' in advance) and read for the rows the budget takes.
    """
    columns: dict[str, Any] = {}
    for index, name in enumerate(table.names):
        raw = Cast(name, TextField())
        columns[f"_rot_len_{index}"] = Length(raw)
        columns[f"_rot_val_{index}"] = Case(
            When(Q(**{f"_rot_len_{index}__lte": _INLINE_MAX_CHARS}), then=raw),
            default=Value(None, output_field=TextField()),
        )
    heads = query.using(table.db).annotate(**columns)[:batch_size]
    pks: list[Any] = []
    rows: list[list[Any]] = []
    long: set[Any] = set()
    chars = 0
    for pk, *cells in heads.values_list("pk", *columns):
        lengths, values = cells[0::2], cells[1::2]
        size = sum(length or 0 for length in lengths)
        if pks and chars + size > BATCH_MAX_CHARS:
            break  # the next batch starts here
        chars += size
        pks.append(pk)
        if any(length and value is None for length, value in zip(lengths, values, strict=True)):
            long.add(pk)
        # As the field reads them (values_list of the field): "" is NULL.
        rows.append([pk, *(Sealed(value) if value else None for value in values)])
    if long:
        full = {
            row[0]: list(row[1:])
            for row in table.rows().filter(pk__in=long).values_list("pk", *table.names)
        }
        # A row deleted between the two reads is left out (nothing to rotate).
        rows = [
            [row[0], *full[row[0]]] if row[0] in full else row
            for row in rows
            if row[0] in full or row[0] not in long
        ]
    return pks, rows


def _rotate_batch(
    table: _Table, query: QuerySet, batch_size: int, result: RotationResult
) -> tuple[list[Any], list[Any]]:
    """Rotate the first rows of ``query`` (a batch, see :func:`_read_batch`);
    count into ``result``.

    Returns ``(the batch's pks, pks to take up again)``: rows a sender
    changed between read and write that still hold an old key's value, and
    on PostgreSQL rows locked by a sender at write time.
    """
    prefix = get_keyring().primary_prefix
    # Read in autocommit (no lock is taken), from the database the rows are
    # written to.
    batch_pks, batch = _read_batch(table, query, batch_size)
    if not batch_pks:
        return [], []
    updates: list[tuple[Any, list[Any], list[Any]]] = []
    counts: dict[Any, int] = {}
    for row in batch:
        pk, before = row[0], row[1:]
        after = list(before)
        try:
            for index, field_ in enumerate(table.fields):
                sealed = before[index]
                if isinstance(sealed, Sealed) and not sealed.ciphertext.startswith(prefix):
                    plaintext = field_.decrypt_for_pk(pk, sealed.ciphertext)
                    after[index] = field_.seal_for_pk(pk, plaintext)
                    counts[pk] = counts.get(pk, 0) + 1
        except DecryptionError as exc:
            logger.error("key rotation skipped a row: %s", exc)
            result.failed_rows.append(row_name(table.model, pk))
            continue
        if pk in counts:
            updates.append((pk, before, after))
    mine: list[Any] = []
    lost: list[Any] = []
    if updates:
        with transaction.atomic(using=table.db):
            mine, lost = _write_batch(updates, table)
    result.rows += len(mine)
    result.rotated += sum(counts.get(pk, 0) for pk in mine)
    return batch_pks, lost
