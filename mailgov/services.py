"""The operations that views, admin actions, tasks and commands all call.

Every change to a mailbox's tokens goes through here or :mod:`mailgov.tokens`;
nothing else writes credentials.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    MailboxUnavailableError,
    ProviderError,
)
from mailgov.models import Mailbox, MailboxCredentials, current_identity
from mailgov.providers import (
    TokenResponse,
    describe_identity,
    get_provider,
)
from mailgov.revocation import (
    RevocationResult,
    keep_for_revocation,
    queue_revocations,
    retry_revocations,
    revoke_at_provider,
    revoke_mailbox,
    schedule_revocation_locked,
)
from mailgov.rotation import (
    RotationResult,
    key_usage,
    rotate_keys,
    rotation_pending,
    rotation_pending_count,
)
from mailgov.signals import mailbox_needs_reconsent

logger = logging.getLogger("mailgov")
security_logger = logging.getLogger("mailgov.security")


@sensitive_variables()
def old_grant_must_end(mailbox: Mailbox) -> bool:
    """Whether ``mailbox``'s stored grant is to be revoked at the provider:
    revoked here, sent back to re-consent with a revocation scheduled, or
    covered by an incident's containment."""
    from mailgov.freeze import block_of

    if mailbox.status == Mailbox.Status.REVOKED:
        return True
    if mailbox.revocation_retry_at is not None or mailbox.revocation_given_up_at is not None:
        return True
    return block_of(mailbox, sending=False) is not None


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
        if credentials.refresh_token is not None and old_grant_must_end(mailbox):
            # The old grant was being revoked (revoked, sent back to
            # re-consent, or contained by an incident): the new consent does
            # not save it. Its token goes on to be revoked; none of it is kept.
            keep_for_revocation(mailbox, why="reconnected")
            credentials.wipe()
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
        # A new grant starts with a clean slate: no failing days, no pending
        # dormancy warning, no pause left from the old one.
        mailbox.refresh_failing_days = 0
        mailbox.refresh_failed_on = None
        mailbox.refresh_failures = 0
        mailbox.refresh_retry_at = None
        mailbox.refresh_failing_notified = False
        mailbox.dormant_warned_at = None
        mailbox.kept_at = None
        mailbox.revocation_attempts = 0
        mailbox.revocation_retry_at = None
        mailbox.revocation_given_up_at = None
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


def resume_mailbox(mailbox: Mailbox, reason: str = "") -> bool:
    """Let a suspended mailbox send again (its held mail is released by the
    dispatch sweep). Returns whether the status changed."""
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        changed = locked.status == Mailbox.Status.SUSPENDED
        if changed:
            locked.status = Mailbox.Status.ACTIVE
            locked.revocation_reason = ""
            locked.save(update_fields=["status", "revocation_reason"])
    if changed:
        security_logger.info("mailbox %s resumed (%s)", mailbox.pk, reason.split(":")[0])
    mailbox.status = locked.status
    mailbox.revocation_reason = locked.revocation_reason
    return changed


def require_reconsent(mailbox: Mailbox, reason: str) -> bool:
    """Send an active or suspended mailbox back to its owner for a new
    consent: ``needs_reconsent`` at once, its access token wiped, and its
    grant revoked at the provider (queued, retried like any revocation), so
    that no old grant outlives the new one. Returns whether the status changed.
    """
    now = timezone.now()
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        changed = locked.status in (Mailbox.Status.ACTIVE, Mailbox.Status.SUSPENDED)
        if changed:
            credentials = (
                MailboxCredentials.objects.select_for_update(no_key=True)
                .filter(pk=mailbox.pk)
                .first()
            )
            locked.status = Mailbox.Status.NEEDS_RECONSENT
            locked.revocation_reason = reason[:255]
            locked.save(update_fields=["status", "revocation_reason"])
            if schedule_revocation_locked(locked, credentials, now):
                transaction.on_commit(lambda: queue_revocations([locked.pk]))
            notify_needs_reconsent(locked, reason.split(":")[0])
    mailbox.status = locked.status
    mailbox.revocation_reason = locked.revocation_reason
    return changed


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


__all__ = [
    "RevocationResult",
    "RotationResult",
    "apply_token_response",
    "bind_mailboxes",
    "connect_mailbox",
    "connect_mailbox_from_code",
    "key_usage",
    "mark_needs_reconsent",
    "provider_bindings",
    "require_reconsent",
    "resume_mailbox",
    "retry_revocations",
    "revoke_at_provider",
    "revoke_mailbox",
    "rotate_keys",
    "rotation_pending",
    "rotation_pending_count",
    "suspend_mailbox",
]
