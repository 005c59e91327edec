"""Revoking a grant: here at once, at the provider by a retried, idempotent task.

:func:`revoke_mailbox` is the entry point (re-exported by
:mod:`mailgov.services`, which admin actions, views, tasks and commands call);
:func:`revoke_at_provider` is the one idempotent provider call, run inline, by
the ``mailgov.revoke_at_provider`` task, and by :func:`retry_revocations`
(the ``mailgov.retry_revocations`` sweep and the manual command). The retry
schedule lives in the mailbox row (``revocation_attempts``,
``revocation_retry_at``, ``revocation_given_up_at``), never in a broker
countdown. No token is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    MailgovConfigurationError,
    ProviderChangedError,
    ProviderError,
    ProviderUnavailableError,
)
from mailgov.models import Mailbox, MailboxCredentials, PendingRevocation
from mailgov.outcomes import backoff
from mailgov.providers import get_mailbox_provider, get_provider
from mailgov.signals import grant_revocation_ended

logger = logging.getLogger("mailgov")
security_logger = logging.getLogger("mailgov.security")

__all__ = [
    "RevocationResult",
    "keep_for_revocation",
    "queue_deleted",
    "queue_revocations",
    "restart_given_up",
    "retry_revocations",
    "revoke_at_provider",
    "revoke_deleted",
    "revoke_mailbox",
]


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


#: Credentials whose grant is to be revoked at the provider: of a revoked
#: mailbox, or of one an administrator sent back to re-consent
#: (:func:`mailgov.services.require_reconsent`, which sets a retry time).
PENDING = Q(mailbox__status=Mailbox.Status.REVOKED) | Q(
    Q(mailbox__revocation_retry_at__isnull=False)
    | Q(mailbox__revocation_given_up_at__isnull=False),
    mailbox__status=Mailbox.Status.NEEDS_RECONSENT,
)

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
        pending = schedule_revocation_locked(locked, credentials, now)
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


def schedule_revocation_locked(
    mailbox: Mailbox, credentials: MailboxCredentials | None, now
) -> bool:
    """Inside the caller's transaction, with the rows locked and the status
    set: wipe the access token and schedule the provider-side revocation of
    the refresh token (a new series of attempts). Returns whether there is
    one to revoke."""
    pending = credentials is not None and credentials.refresh_token is not None
    Mailbox.objects.filter(pk=mailbox.pk).update(
        revocation_attempts=0,
        revocation_retry_at=now if pending else None,
        revocation_given_up_at=None,
    )
    if credentials is not None:
        credentials.access_token = None
        credentials.expires_at = None
        credentials.save()
    return pending


def _queue_revocation(mailbox_id: Any) -> None:
    from mailgov import tasks

    error = tasks.publish_task(tasks.revoke_at_provider, args=(str(mailbox_id),))
    if error is not None:  # the sweep retries from the row
        logger.warning(
            "revocation task not queued (%s); the sweep will retry", type(error).__name__
        )


#: Mailboxes per ``mailgov.revoke_many`` task.
REVOKE_CHUNK = 200


def queue_revocations(mailbox_ids: list[Any]) -> int:
    """Queue the provider-side revocation of many revoked mailboxes (one task
    per :data:`REVOKE_CHUNK`); call on commit. Whatever cannot be queued is
    left to the retry sweep, which finds the same rows. Returns tasks queued."""
    from mailgov import tasks

    queued = 0
    for start in range(0, len(mailbox_ids), REVOKE_CHUNK):
        chunk = [str(pk) for pk in mailbox_ids[start : start + REVOKE_CHUNK]]
        error = tasks.publish_task(tasks.revoke_many, args=(chunk,))
        if error is not None:
            logger.warning(
                "revocation tasks not queued (%s); the sweep will retry", type(error).__name__
            )
            break
        queued += 1
    return queued


# -- deleted mailboxes ----------------------------------------------------------------


@sensitive_variables()
def keep_for_revocation(mailbox: Mailbox, *, why: str = "deleted") -> PendingRevocation | None:
    """Before ``mailbox``'s row is deleted, or its old grant replaced by a
    new one (``why``): keep its refresh token (re-sealed to a
    :class:`PendingRevocation` row) until that grant is revoked at the
    provider, and queue that revocation on commit. ``None`` when there is
    nothing to revoke (no refresh token held)."""
    credentials = MailboxCredentials.objects.filter(
        pk=mailbox.pk, refresh_token__isnull=False
    ).first()
    if credentials is None:
        return None
    try:
        token = credentials.refresh_token
    except Exception as exc:  # DecryptionError: nothing can be revoked with it
        security_logger.error(
            "mailbox %s %s; its refresh token could not be read (%s), so its grant at "
            "provider %r must be revoked there by hand",
            mailbox.pk,
            why,
            type(exc).__name__,
            mailbox.provider,
        )
        return None
    pending = PendingRevocation(
        mailbox_id=mailbox.pk,
        provider=mailbox.provider,
        provider_binding=mailbox.provider_binding,
        retry_at=timezone.now(),
    )
    pending.refresh_token = token
    pending.save()
    transaction.on_commit(lambda: queue_deleted(pending.pk))
    security_logger.info(
        "mailbox %s %s; revocation of its old grant at provider %r queued",
        mailbox.pk,
        why,
        mailbox.provider,
    )
    return pending


def queue_deleted(pending_id: Any) -> None:
    """Queue the revocation of a deleted mailbox's grant (its
    :class:`PendingRevocation`); call on commit. Not queued, the sweep
    retries it from the row."""
    from mailgov import tasks

    error = tasks.publish_task(tasks.revoke_deleted, args=(str(pending_id),))
    if error is not None:
        logger.warning(
            "revocation task not queued (%s); the sweep will retry", type(error).__name__
        )


@sensitive_variables()
def revoke_deleted(pending_id: Any, *, now=None) -> str:
    """Revoke a deleted mailbox's grant at its provider; the row goes once
    done. Outcomes as :func:`revoke_at_provider`."""
    now = now or timezone.now()
    pending = PendingRevocation.objects.filter(pk=pending_id).first()
    if pending is None or pending.refresh_token is None:
        return "nothing"
    try:
        provider = get_provider(pending.provider)
        if pending.provider_binding and provider.identity != pending.provider_binding:
            raise ProviderChangedError("provider reconfigured", provider_id=pending.provider)
    except (ProviderChangedError, MailgovConfigurationError):
        security_logger.warning(
            "deleted mailbox %s: provider %r is not configured as the provider it was "
            "connected through; its refresh token was not sent there (revocation pending)",
            pending.mailbox_id,
            pending.provider,
        )
        return _deleted_failed(pending, now)
    try:
        outcome = "revoked" if provider.revoke(pending.refresh_token) else "no_endpoint"
    except ProviderUnavailableError:
        return _deleted_failed(pending, now)
    except ProviderError as exc:
        logger.warning("deleted mailbox %s: revocation refused: %s", pending.mailbox_id, exc)
        outcome = "refused"
    PendingRevocation.objects.filter(pk=pending.pk).delete()
    grant_revocation_ended.send(
        sender=PendingRevocation,
        mailbox_id=pending.mailbox_id,
        provider=pending.provider,
        outcome=outcome,
    )
    return outcome


def _deleted_failed(pending: PendingRevocation, now) -> str:
    attempts = pending.attempts + 1
    if attempts >= int(mailgov_settings.REVOCATION_MAX_ATTEMPTS):
        PendingRevocation.objects.filter(pk=pending.pk).update(
            attempts=attempts, retry_at=None, given_up_at=now
        )
        security_logger.error(
            "deleted mailbox %s: revocation at provider %r failed %d times; the refresh token "
            "is kept for a manual retry (manage.py mailgov_retry_revocations)",
            pending.mailbox_id,
            pending.provider,
            attempts,
        )
        return "gave_up"
    PendingRevocation.objects.filter(pk=pending.pk).update(
        attempts=attempts,
        retry_at=backoff(attempts, now, base=REVOCATION_RETRY_BASE, cap=REVOCATION_RETRY_CAP),
    )
    return "pending"


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
        MailboxCredentials.objects.filter(PENDING, pk=mailbox_id, refresh_token__isnull=False)
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
    # Only if still pending: an owner who reconnected during the call has a
    # new token in this row (the old one moved to a PendingRevocation).
    wiped = MailboxCredentials.objects.filter(PENDING, pk=mailbox.pk).update(refresh_token=None)
    Mailbox.objects.filter(pk=mailbox.pk).update(
        revocation_retry_at=None, revocation_given_up_at=None
    )
    if wiped:
        grant_revocation_ended.send(
            sender=Mailbox, mailbox_id=mailbox.pk, provider=mailbox.provider, outcome=outcome
        )
    return outcome


def _revocation_failed(mailbox: Mailbox, now) -> str:
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


def restart_given_up(mailbox_ids: list[Any], *, now=None) -> int:
    """Start a fresh series of attempts, queued on commit, for the grants of
    ``mailbox_ids`` whose revocation was given up (the provider unreachable
    too long): the mailboxes' own, and those of their deleted predecessors
    (:class:`PendingRevocation`). For whoever needs them revoked after all
    (an erasure is done only once they are). Returns how many restarted."""
    now = now or timezone.now()
    given_up = Mailbox.objects.filter(
        pk__in=mailbox_ids, credentials__refresh_token__isnull=False
    ).exclude(revocation_given_up_at=None)
    retry_ids = list(given_up.values_list("pk", flat=True))
    given_up.update(revocation_attempts=0, revocation_given_up_at=None, revocation_retry_at=now)
    deleted = PendingRevocation.objects.filter(mailbox_id__in=mailbox_ids).exclude(given_up_at=None)
    pending_ids = list(deleted.values_list("pk", flat=True))
    deleted.update(attempts=0, given_up_at=None, retry_at=now)
    if retry_ids:
        transaction.on_commit(lambda: queue_revocations(retry_ids))
    for pending_id in pending_ids:
        transaction.on_commit(partial(queue_deleted, pending_id))
    return len(retry_ids) + len(pending_ids)


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
    pending = MailboxCredentials.objects.filter(PENDING, refresh_token__isnull=False)
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
    # Grants of deleted mailboxes, kept in PendingRevocation rows.
    deleted = PendingRevocation.objects.all()
    if due_only:
        deleted = deleted.filter(
            Q(retry_at__isnull=True) | Q(retry_at__lte=now), given_up_at__isnull=True
        )
    else:
        PendingRevocation.objects.update(attempts=0, given_up_at=None)
    for pending_id in list(deleted.values_list("pk", flat=True)):
        outcome = revoke_deleted(pending_id, now=now)
        if outcome in counts:
            counts[outcome] += 1
        if progress is not None:
            progress(1)
    return counts
