"""The operations that views, admin actions, tasks and commands all call.

Every change to a mailbox's tokens goes through here or :mod:`mailgov.tokens`;
nothing else writes credentials.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import connection, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Count, Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.crypto import get_keyring, key_id_of
from mailgov.exceptions import (
    DecryptionError,
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderChangedError,
    ProviderError,
    ProviderUnavailableError,
)
from mailgov.fields import EncryptedTextField, Sealed
from mailgov.models import Mailbox, MailboxCredentials, current_identity
from mailgov.providers import (
    TokenResponse,
    describe_identity,
    get_mailbox_provider,
    get_provider,
)
from mailgov.signals import mailbox_needs_reconsent

logger = logging.getLogger("mailgov")
security_logger = logging.getLogger("mailgov.security")


@sensitive_variables()
def apply_token_response(
    credentials: MailboxCredentials, response: TokenResponse, *, now=None
) -> None:
    """Put a token response into ``credentials`` (the caller saves, in its transaction).

    A response without a refresh token keeps the stored one; a missing or
    nonsense ``expires_in`` is treated as short-lived.
    """
    now = now or timezone.now()
    lifetime = response.expires_in or mailgov_settings.TOKEN_DEFAULT_LIFETIME_SECONDS
    credentials.access_token = response.access_token
    if response.refresh_token:
        credentials.refresh_token = response.refresh_token
    credentials.expires_at = now + timedelta(seconds=lifetime)


@sensitive_variables()
def connect_mailbox(
    *,
    owner: Any,
    provider_id: str,
    response: TokenResponse,
    address: str,
    requested_scopes: list[str],
) -> Mailbox:
    """Create or update ``owner``'s mailbox from a token response.

    Granted scopes are read from the response (a user may untick scopes);
    when the response does not say, RFC 6749 §5.1 means "as requested". The
    mailbox is active only if the grant includes the provider's send scopes
    and a refresh token is held; otherwise it is ``needs_reconsent`` with the
    reason. A ``suspended`` mailbox stays suspended: that was an
    administrator's decision, which the owner's consent does not undo.

    Raises :class:`ProviderError` for an invalid address, and
    :class:`MailboxUnavailableError` if another user's active mailbox already
    sends as ``address``.
    """
    provider = get_provider(provider_id)
    address = address.strip()
    try:
        validate_email(address)
    except ValidationError:
        raise ProviderError(f"{provider.name}: the account's email address is not valid.") from None
    granted = response.scopes if response.scopes is not None else list(requested_scopes)
    now = timezone.now()
    with transaction.atomic():
        taken = (
            Mailbox.objects.filter(address__iexact=address, status=Mailbox.Status.ACTIVE)
            .exclude(owner=owner, provider=provider_id)
            .exists()
        )
        if taken:
            raise MailboxUnavailableError(
                "This address is already connected as an active mailbox by another account."
            )
        mailbox = (
            Mailbox.objects.select_for_update()
            .filter(owner=owner, provider=provider_id, address__iexact=address)
            .first()
        )
        if mailbox is None:
            mailbox = Mailbox(owner=owner, provider=provider_id, address=address)
        credentials = None
        if mailbox.pk is not None and not mailbox._state.adding:
            credentials = (
                MailboxCredentials.objects.select_for_update().filter(mailbox=mailbox).first()
            )
        credentials = credentials or MailboxCredentials(mailbox=mailbox)
        if mailbox.provider_binding and mailbox.provider_binding != provider.identity:
            # Reconnected through another provider than the one that issued
            # the stored tokens: none of them may reach the new one (a
            # response without a refresh token would otherwise keep the old).
            if credentials.refresh_token and mailbox.status == Mailbox.Status.REVOKED:
                security_logger.warning(
                    "mailbox %s: reconnected through another provider while a revocation "
                    "at %s was pending; that grant must be revoked there by hand",
                    mailbox.pk,
                    describe_identity(mailbox.provider_binding),
                )
            credentials.wipe()
        apply_token_response(credentials, response, now=now)
        mailbox.scopes = sorted(set(granted))
        if not mailbox.has_scopes(provider.send_scopes):
            status, reason = Mailbox.Status.NEEDS_RECONSENT, "scope_missing: send not granted"
        elif not credentials.refresh_token:
            status = Mailbox.Status.NEEDS_RECONSENT
            reason = "no_refresh_token: offline access not granted"
        else:
            status, reason = Mailbox.Status.ACTIVE, ""
        if mailbox.status != Mailbox.Status.SUSPENDED:
            mailbox.status = status
            mailbox.revocation_reason = reason
            mailbox.revoked_at = None
        mailbox.connected_at = now
        # Bound to the provider that issued these tokens (a reconnect rebinds).
        mailbox.provider_binding = provider.identity
        mailbox.save()
        credentials.mailbox = mailbox
        credentials.save()
    logger.info("mailbox %s connected (provider %s, %s)", mailbox.pk, provider_id, mailbox.status)
    return mailbox


@sensitive_variables()
def connect_mailbox_from_code(
    *,
    owner: Any,
    provider_id: str,
    code: str,
    code_verifier: str,
    redirect_uri: str,
    requested_scopes: list[str],
    address: str | None = None,
) -> Mailbox:
    """Redeem an authorization code and connect the mailbox it grants.

    The address is the verified ``email`` from the provider's userinfo
    endpoint unless given.
    """
    provider = get_provider(provider_id)
    response = provider.exchange_code(code, redirect_uri=redirect_uri, code_verifier=code_verifier)
    if address is None:
        claims = provider.userinfo(response.access_token)
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is False:
            raise ProviderError(f"{provider.name}: no verified email address in userinfo.")
        address = email
    return connect_mailbox(
        owner=owner,
        provider_id=provider_id,
        response=response,
        address=address,
        requested_scopes=requested_scopes,
    )


def warn_inside_transaction(what: str) -> None:
    if connection.in_atomic_block:
        # The change commits with the caller's transaction: if that rolls
        # back, so does this (a refresh token rotated by the provider is then
        # lost). Send mail after commit (transaction.on_commit) to avoid it.
        logger.warning("mailgov %s inside the caller's transaction", what)


def mark_needs_reconsent_locked(
    mailbox: Mailbox, credentials: MailboxCredentials | None, reason: str
) -> bool:
    """Inside the caller's transaction, with the rows locked: wipe the tokens
    and set ``needs_reconsent``. Returns whether the status changed (so the
    owner is told once, not at every failed attempt); the caller then sends
    :data:`mailbox_needs_reconsent` on commit (:func:`notify_needs_reconsent`).
    """
    changed = mailbox.status == Mailbox.Status.ACTIVE
    if credentials is not None:
        credentials.wipe()
        credentials.save()
    if changed:
        mailbox.status = Mailbox.Status.NEEDS_RECONSENT
        mailbox.revocation_reason = reason[:255]
        # A plain save(): django-auditlog records the status change.
        mailbox.save(update_fields=["status", "revocation_reason"])
    return changed


def notify_needs_reconsent(mailbox: Mailbox, reason: str) -> None:
    """Send :data:`mailbox_needs_reconsent` once the change has committed."""
    transaction.on_commit(
        lambda: mailbox_needs_reconsent.send(sender=Mailbox, mailbox=mailbox, reason=reason)
    )


def mark_needs_reconsent(mailbox: Mailbox, reason: str) -> bool:
    """Wipe ``mailbox``'s tokens and set ``needs_reconsent``; signal once, on commit."""
    warn_inside_transaction("marks a mailbox needs_reconsent")
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        credentials = (
            MailboxCredentials.objects.select_for_update(no_key=True).filter(pk=mailbox.pk).first()
        )
        changed = mark_needs_reconsent_locked(locked, credentials, reason)
        if changed:
            notify_needs_reconsent(locked, reason)
    mailbox.status = locked.status
    mailbox.revocation_reason = locked.revocation_reason
    return changed


def suspend_mailbox(mailbox: Mailbox, reason: str) -> bool:
    """Stop ``mailbox`` from sending, keeping its grant (an administrator's
    matter, such as SMTP AUTH disabled for the tenant). Returns whether the
    status changed."""
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        changed = locked.status == Mailbox.Status.ACTIVE
        if changed:
            locked.status = Mailbox.Status.SUSPENDED
            locked.revocation_reason = reason[:255]
            locked.save(update_fields=["status", "revocation_reason"])
    if changed:
        security_logger.warning("mailbox %s suspended (%s)", mailbox.pk, reason.split(":")[0])
    mailbox.status = locked.status
    mailbox.revocation_reason = locked.revocation_reason
    return changed


@dataclass
class RevocationResult:
    """What :func:`revoke_mailbox` did at the provider.

    ``at_provider`` is ``True`` when the provider confirmed, ``False`` when it
    has no revocation endpoint (Microsoft: an administrator removes the
    consent), ``None`` when it could not be reached: the refresh token is
    then kept, encrypted, for a later retry, and the mailbox never sends.
    """

    at_provider: bool | None


@sensitive_variables()
def revoke_mailbox(mailbox: Mailbox, reason: str) -> RevocationResult:
    """Revoke ``mailbox``'s grant at the provider (RFC 7009) and here.

    The mailbox becomes ``revoked`` at once and its access token is wiped; the
    refresh token is revoked at the provider and wiped, unless the provider
    was unreachable (then it is kept for the retry, see
    :class:`RevocationResult`).
    """
    provider = get_provider(mailbox.provider)
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        credentials = (
            MailboxCredentials.objects.select_for_update(no_key=True).filter(pk=mailbox.pk).first()
        )
        # A provider id now configured as another provider must not receive
        # this grant's refresh token, not even to revoke it: it is kept for
        # the retry, which sends it once the configuration is restored.
        changed_provider = locked.provider_binding != provider.identity
        locked.status = Mailbox.Status.REVOKED
        locked.revoked_at = timezone.now()
        locked.revocation_reason = reason[:255]
        locked.save(update_fields=["status", "revoked_at", "revocation_reason"])
        refresh_token = credentials.refresh_token if credentials is not None else None
        if credentials is not None:
            credentials.access_token = None
            credentials.expires_at = None
            credentials.save()
    result = RevocationResult(at_provider=False)
    if refresh_token and changed_provider:
        result.at_provider = None
        security_logger.warning(
            "mailbox %s: provider %r is configured as another provider than the one it was "
            "connected through; its refresh token was not sent there (revocation pending)",
            mailbox.pk,
            mailbox.provider,
        )
    elif refresh_token:
        try:
            result.at_provider = provider.revoke(refresh_token)
        except ProviderUnavailableError:
            result.at_provider = None
        except ProviderError as exc:
            # Refused (e.g. unsupported token type): nothing to retry.
            logger.warning("mailbox %s: revocation refused: %s", mailbox.pk, exc)
    if result.at_provider is not None:
        MailboxCredentials.objects.filter(pk=mailbox.pk).update(refresh_token=None)
    security_logger.info(
        "mailbox %s revoked (%s); at provider: %s",
        mailbox.pk,
        reason.split(":")[0],
        {True: "confirmed", False: "no endpoint", None: "pending"}[result.at_provider],
    )
    mailbox.status = locked.status
    return result


def retry_revocations() -> dict[str, int]:
    """Retry the provider-side revocation of revoked mailboxes that still hold
    a refresh token (the provider was unreachable at the time).

    Returns counts: ``revoked`` (confirmed, token wiped), ``pending`` (still
    unreachable, token kept), ``refused`` (the provider refused; token wiped,
    as there is nothing more to do).
    """
    counts = {"revoked": 0, "pending": 0, "refused": 0}
    pending = MailboxCredentials.objects.filter(
        mailbox__status=Mailbox.Status.REVOKED, refresh_token__isnull=False
    ).select_related("mailbox")
    for credentials in pending.iterator(chunk_size=100):
        try:
            provider = get_mailbox_provider(credentials.mailbox)
        except (ProviderChangedError, MailgovConfigurationError):
            # Never sent to another provider than the one that issued it.
            counts["pending"] += 1
            continue
        try:
            provider.revoke(credentials.refresh_token)
            outcome = "revoked"
        except ProviderUnavailableError:
            counts["pending"] += 1
            continue
        except ProviderError:
            outcome = "refused"
        MailboxCredentials.objects.filter(pk=credentials.pk).update(refresh_token=None)
        counts[outcome] += 1
    return counts


def bind_mailboxes(provider_id: str, *, actor: str = "") -> int:
    """Bind every mailbox of ``provider_id`` whose binding differs (or is
    missing) to the provider's identity as configured now; return how many.

    For an operator who changed a provider's configuration on purpose and
    knows the new endpoints belong to the provider that issued the tokens.
    Written to the security log, with the old and new identities.
    """
    identity = get_provider(provider_id).identity
    stale = Mailbox.objects.filter(provider=provider_id).exclude(provider_binding=identity)
    previous = sorted(set(stale.values_list("provider_binding", flat=True)))
    count = stale.update(provider_binding=identity)
    if count:
        security_logger.warning(
            "%d mailbox(es) of provider %r rebound from %s to %s%s",
            count,
            provider_id,
            "; ".join(describe_identity(item) for item in previous),
            describe_identity(identity),
            f" by {actor}" if actor else "",
        )
    return count


def provider_bindings() -> list[dict[str, Any]]:
    """Per provider id and binding: how many mailboxes, and whether the
    binding matches the configuration now (``configured`` is ``""`` for a
    provider that is not configured). One aggregate query."""
    rows = (
        Mailbox.objects.values("provider", "provider_binding")
        .annotate(count=Count("pk"))
        .order_by("provider", "provider_binding")
    )
    identities: dict[str, str] = {}
    result = []
    for row in rows:
        provider_id = row["provider"]
        if provider_id not in identities:
            identities[provider_id] = current_identity(provider_id)
        configured = identities[provider_id]
        result.append(
            {
                "provider": provider_id,
                "binding": row["provider_binding"],
                "configured": configured,
                "count": row["count"],
                "matches": bool(configured) and row["provider_binding"] == configured,
            }
        )
    return result


# -- key rotation ---------------------------------------------------------------
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


#: Null-safe equality per database vendor, for the compare-and-set of rotation.
_SAME_AS = {"postgresql": "IS NOT DISTINCT FROM", "sqlite": "IS", "mysql": "<=>"}


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
