"""The operations that views, admin actions, tasks and commands all call.

Every change to a mailbox's tokens goes through here or :mod:`mailgov.tokens`;
nothing else writes credentials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import connection, transaction
from django.db.models import Count, Q
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderChangedError,
    ProviderError,
    ProviderUnavailableError,
)
from mailgov.models import Mailbox, MailboxCredentials, current_identity
from mailgov.providers import (
    TokenResponse,
    describe_identity,
    get_mailbox_provider,
    get_provider,
)
from mailgov.rotation import RotationResult, key_usage, rotate_keys, rotation_pending
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


@dataclass
class RevocationResult:
    """What :func:`revoke_mailbox` did at the provider.

    ``at_provider`` is ``True`` when the provider confirmed, ``False`` when it
    has no revocation endpoint (Microsoft: an administrator removes the
    consent), ``None`` when it is pending: the provider could not be reached
    (or ``defer`` was asked); the refresh token is then kept, encrypted, for
    the retried task, and the mailbox never sends.
    """

    at_provider: bool | None


#: Backoff of provider-side revocation retries (seconds): from BASE, doubling, up to CAP.
REVOCATION_RETRY_BASE = 60
REVOCATION_RETRY_CAP = 6 * 3600


@sensitive_variables()
def revoke_mailbox(mailbox: Mailbox, reason: str, *, defer: bool = False) -> RevocationResult:
    """Revoke ``mailbox``'s grant here at once, and at the provider (RFC 7009).

    Here, at once: the mailbox becomes ``revoked`` and its access token is
    wiped. At the provider: the refresh token is revoked and wiped by
    :func:`revoke_at_provider`, tried once now (unless ``defer``: then only
    the ``mailgov.revoke_at_provider`` task is queued, on commit) and, while
    the provider cannot be reached, retried by the ``mailgov.retry_revocations``
    sweep with backoff and jitter up to ``MAILGOV_REVOCATION_MAX_ATTEMPTS``
    attempts, then reported and kept for a manual retry.
    """
    get_provider(mailbox.provider)  # a provider id that is not configured raises here
    now = timezone.now()
    with transaction.atomic():
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        credentials = (
            MailboxCredentials.objects.select_for_update(no_key=True).filter(pk=mailbox.pk).first()
        )
        locked.status = Mailbox.Status.REVOKED
        locked.revoked_at = now
        locked.revocation_reason = reason[:255]
        locked.save(update_fields=["status", "revoked_at", "revocation_reason"])
        pending = credentials is not None and credentials.refresh_token is not None
        Mailbox.objects.filter(pk=locked.pk).update(
            revocation_attempts=0,
            revocation_retry_at=now if pending else None,
            revocation_given_up_at=None,
        )
        if credentials is not None:
            credentials.access_token = None
            credentials.expires_at = None
            credentials.save()
        if pending and defer:
            transaction.on_commit(lambda: _queue_revocation(locked.pk))
    mailbox.status = locked.status
    if not pending:
        outcome = "no_token"
    elif defer:
        outcome = "pending"
    else:
        outcome = revoke_at_provider(mailbox.pk)
    result = RevocationResult(
        at_provider={"revoked": True, "no_endpoint": False, "refused": False}.get(outcome)
    )
    if outcome == "no_token":
        result.at_provider = False
    security_logger.info(
        "mailbox %s revoked (%s); at provider: %s",
        mailbox.pk,
        reason.split(":")[0],
        {True: "confirmed", False: "no endpoint", None: "pending"}[result.at_provider],
    )
    return result


def _queue_revocation(mailbox_id: Any) -> None:
    from mailgov import tasks

    try:
        tasks.revoke_at_provider.apply_async(
            args=[str(mailbox_id)],
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
        )
    except Exception as exc:  # the sweep retries from the row
        logger.warning("revocation task not queued (%s); the sweep will retry", type(exc).__name__)


@sensitive_variables()
def revoke_at_provider(mailbox_id: Any, *, now=None) -> str:
    """Revoke a revoked mailbox's refresh token at its provider. Idempotent.

    Returns ``"revoked"`` (confirmed; also for a token the provider already
    considered invalid), ``"no_endpoint"`` (nothing to call: Microsoft),
    ``"refused"`` (the provider refused; nothing more to try), each with the
    token wiped; ``"pending"`` (unreachable, or its provider id now names
    another provider: kept, retried later), ``"gave_up"`` (the last allowed
    attempt failed: reported and kept for ``mailgov_retry_revocations``);
    ``"nothing"`` when there is no pending revocation (done already).
    """
    now = now or timezone.now()
    credentials = (
        MailboxCredentials.objects.filter(
            pk=mailbox_id, mailbox__status=Mailbox.Status.REVOKED, refresh_token__isnull=False
        )
        .select_related("mailbox")
        .first()
    )
    if credentials is None:
        return "nothing"
    mailbox = credentials.mailbox
    try:
        # Never sent to another provider than the one that issued it.
        provider = get_mailbox_provider(mailbox)
    except (ProviderChangedError, MailgovConfigurationError):
        security_logger.warning(
            "mailbox %s: provider %r is configured as another provider than the one it was "
            "connected through; its refresh token was not sent there (revocation pending)",
            mailbox.pk,
            mailbox.provider,
        )
        return _revocation_failed(mailbox, now)
    try:
        confirmed = provider.revoke(credentials.refresh_token)
        outcome = "revoked" if confirmed else "no_endpoint"
    except ProviderUnavailableError:
        return _revocation_failed(mailbox, now)
    except ProviderError as exc:
        # Refused (unsupported token type, invalid token): nothing to retry.
        logger.warning("mailbox %s: revocation refused: %s", mailbox.pk, exc)
        outcome = "refused"
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(refresh_token=None)
    Mailbox.objects.filter(pk=mailbox.pk).update(
        revocation_retry_at=None, revocation_given_up_at=None
    )
    return outcome


def _revocation_failed(mailbox: Mailbox, now) -> str:
    from mailgov.delivery import backoff

    attempts = mailbox.revocation_attempts + 1
    fields: dict[str, Any] = {"revocation_attempts": attempts}
    if attempts >= int(mailgov_settings.REVOCATION_MAX_ATTEMPTS):
        fields.update(revocation_retry_at=None, revocation_given_up_at=now)
        Mailbox.objects.filter(pk=mailbox.pk).update(**fields)
        security_logger.error(
            "mailbox %s: revocation at provider %r failed %d times; the refresh token is "
            "kept for a manual retry (manage.py mailgov_retry_revocations)",
            mailbox.pk,
            mailbox.provider,
            attempts,
        )
        return "gave_up"
    fields["revocation_retry_at"] = backoff(
        attempts, now, base=REVOCATION_RETRY_BASE, cap=REVOCATION_RETRY_CAP
    )
    Mailbox.objects.filter(pk=mailbox.pk).update(**fields)
    return "pending"


def retry_revocations(*, due_only: bool = False, now=None, progress=None) -> dict[str, int]:
    """Retry the provider-side revocation of revoked mailboxes that still hold
    a refresh token.

    ``due_only`` (the periodic sweep) takes those whose retry time has come
    and skips those given up; the manual command (default) takes them all,
    given up or not. Returns counts by outcome of :func:`revoke_at_provider`:
    ``revoked``, ``no_endpoint``, ``refused``, ``pending``, ``gave_up``.
    """
    now = now or timezone.now()
    counts = {"revoked": 0, "no_endpoint": 0, "refused": 0, "pending": 0, "gave_up": 0}
    pending = MailboxCredentials.objects.filter(
        mailbox__status=Mailbox.Status.REVOKED, refresh_token__isnull=False
    )
    if due_only:
        pending = pending.filter(
            Q(mailbox__revocation_retry_at__isnull=True) | Q(mailbox__revocation_retry_at__lte=now),
            mailbox__revocation_given_up_at__isnull=True,
        )
    else:
        # A manual retry starts a fresh series of attempts.
        Mailbox.objects.filter(pk__in=pending.values("pk")).update(
            revocation_attempts=0, revocation_given_up_at=None
        )
    ids = list(pending.values_list("pk", flat=True))
    for mailbox_id in ids:
        outcome = revoke_at_provider(mailbox_id, now=now)
        if outcome in counts:
            counts[outcome] += 1
        if progress is not None:
            progress(1)
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


__all__ = [
    "RotationResult",
    "apply_token_response",
    "bind_mailboxes",
    "connect_mailbox",
    "connect_mailbox_from_code",
    "key_usage",
    "mark_needs_reconsent",
    "provider_bindings",
    "retry_revocations",
    "revoke_at_provider",
    "revoke_mailbox",
    "rotate_keys",
    "rotation_pending",
    "suspend_mailbox",
]
