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
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.outcomes import backoff
from mailgov.providers import get_mailbox_provider

logger = logging.getLogger("mailgov")
security_logger = logging.getLogger("mailgov.security")

__all__ = ["RevocationResult", "retry_revocations", "revoke_at_provider", "revoke_mailbox"]


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

    error = tasks.publish_task(tasks.revoke_at_provider, args=(str(mailbox_id),))
    if error is not None:  # the sweep retries from the row
        logger.warning(
            "revocation task not queued (%s); the sweep will retry", type(error).__name__
        )


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
