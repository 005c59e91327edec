"""The operations that views, admin actions, tasks and commands all call.

Every change to a mailbox's tokens goes through here or :mod:`mailgov.tokens`;
nothing else writes credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import connections, transaction
from django.db.models import Q, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.crypto import get_keyring, key_id_of
from mailgov.exceptions import DecryptionError, MailboxUnavailableError, ProviderError
from mailgov.fields import EncryptedTextField, Sealed
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.providers import TokenResponse, get_provider
from mailgov.signals import mailbox_needs_reconsent

logger = logging.getLogger("mailgov")


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
    mailbox is active only if the grant includes the provider's send scopes.
    Raises :class:`MailboxUnavailableError` if another user's active mailbox
    already sends as ``address``.
    """
    provider = get_provider(provider_id)
    address = address.strip()
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
        mailbox.scopes = sorted(set(granted))
        mailbox.status = (
            Mailbox.Status.ACTIVE
            if mailbox.has_scopes(provider.send_scopes)
            else Mailbox.Status.NEEDS_RECONSENT
        )
        mailbox.connected_at = now
        mailbox.revoked_at = None
        mailbox.revocation_reason = (
            "" if mailbox.status == Mailbox.Status.ACTIVE else "scope_missing: send not granted"
        )
        mailbox.save()
        credentials, _ = MailboxCredentials.objects.select_for_update().get_or_create(
            mailbox=mailbox
        )
        apply_token_response(credentials, response, now=now)
        credentials.save()
    logger.info("mailbox %s connected (provider %s)", mailbox.pk, provider_id)
    return mailbox


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


def mark_needs_reconsent_locked(
    mailbox: Mailbox, credentials: MailboxCredentials | None, reason: str
) -> bool:
    """Inside the caller's transaction, with the rows locked: wipe the tokens
    and set ``needs_reconsent``. Returns whether the status changed (so the
    owner is told once, not at every failed attempt). The caller sends
    :data:`mailbox_needs_reconsent` after commit when this returns ``True``.
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


def mark_needs_reconsent(mailbox: Mailbox, reason: str) -> bool:
    """Wipe ``mailbox``'s tokens and set ``needs_reconsent``; signal once."""
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update().get(pk=mailbox.pk)
        credentials = MailboxCredentials.objects.select_for_update().filter(pk=mailbox.pk).first()
        changed = mark_needs_reconsent_locked(locked, credentials, reason)
    mailbox.status = locked.status
    mailbox.revocation_reason = locked.revocation_reason
    if changed:
        mailbox_needs_reconsent.send(sender=Mailbox, mailbox=locked, reason=reason)
    return changed


# -- key rotation ---------------------------------------------------------------
@dataclass
class RotationResult:
    """What a rotation run did: values re-encrypted, rows it could not read."""

    rotated: int = 0
    rows: int = 0
    failed_rows: list[str] = field(default_factory=list)


def _encrypted_fields() -> list[EncryptedTextField]:
    return [
        MailboxCredentials._meta.get_field(name) for name in MailboxCredentials.ENCRYPTED_FIELDS
    ]


def rotation_pending():
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


def _write_sealed(rows: list[list[Any]], fields: list[EncryptedTextField]) -> None:
    """Write re-encrypted ``[pk, sealed, ...]`` rows with one prepared UPDATE.

    Not ``bulk_update()``: it reads values through the descriptor, i.e. as
    plaintext, which the field rightly refuses to write; and building a
    ``CASE`` expression per row in the ORM costs more than the encryption.
    The rows are locked by the caller, so writing back a value that did not
    change is safe.
    """
    meta = MailboxCredentials._meta
    connection = connections[MailboxCredentials.objects.db]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(field_.column)} = %s" for field_ in fields)
    # Only quoted names from the model's own metadata; every value is a parameter.
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"  # noqa: S608
    params = [
        [
            *(field_.get_prep_value(value) for field_, value in zip(fields, row[1:], strict=True)),
            meta.pk.get_db_prep_value(row[0], connection),
        ]
        for row in rows
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)


def rotate_keys(
    *, batch_size: int | None = None, progress: Callable[[int], None] | None = None
) -> RotationResult:
    """Re-encrypt every value not under the primary key, one batch per transaction.

    Safe while mail is being sent: each batch locks its rows (the token
    refresh takes the same lock), and every key stays able to decrypt until
    it is removed from the keyring. Resumable: an interrupted run leaves
    whole batches done, and a new run picks up what is still pending. A row
    that cannot be decrypted is skipped and reported, not rewritten.
    """
    batch_size = batch_size or mailgov_settings.ROTATION_BATCH_SIZE
    fields = _encrypted_fields()
    names = [field_.attname for field_ in fields]
    result = RotationResult()
    last_pk = None
    while True:
        prefix = get_keyring().primary_prefix
        with transaction.atomic():
            query = rotation_pending().order_by("pk")
            if last_pk is not None:
                query = query.filter(pk__gt=last_pk)
            # Plain rows, not model instances: instantiating models costs more
            # than the cryptography here.
            batch = [
                list(row)
                for row in query.select_for_update()[:batch_size].values_list("pk", *names)
            ]
            if not batch:
                break
            changed = []
            rotated = 0
            for row in batch:
                pk = row[0]
                try:
                    for index, field_ in enumerate(fields, start=1):
                        sealed = row[index]
                        if isinstance(sealed, Sealed) and not sealed.ciphertext.startswith(prefix):
                            plaintext = field_.decrypt_for_pk(pk, sealed.ciphertext)
                            row[index] = field_.seal_for_pk(pk, plaintext)
                            rotated += 1
                except DecryptionError as exc:
                    logger.error("key rotation skipped a row: %s", exc)
                    result.failed_rows.append(str(pk))
                    continue
                changed.append(row)
            if changed:
                _write_sealed(changed, fields)
            last_pk = batch[-1][0]
        result.rotated += rotated
        result.rows += len(changed)
        if progress:
            progress(len(batch))
    return result
