"""Grant lifecycle sweeps: proactive refresh, dormant grants, retention.

Each runs as a thin Celery task under its sweep lock (:mod:`mailgov.tasks`,
:mod:`mailgov.sweeps`) and as a ``mailgov_<verb>`` command.
:func:`refresh_expiring` renews tokens before they expire, counting failures
in calendar *days*, not attempts (as Nango does: a provider outage of a few
hours costs nobody a grant or a worried email); :func:`revoke_dormant` warns,
then revokes, grants nobody uses (an unused grant is only risk); :func:`purge`
deletes what is past its retention.

"Activity" is the latest of ``last_used_at``, ``connected_at`` and
``kept_at`` (the owner's "keep" button): :func:`activity`. Each sweep reads
its batch in one query, then does a constant number of queries per mailbox,
with conditional ``UPDATE``\\s: a sweep racing a send, a "keep" or another
sweep neither loses a write nor acts twice.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from auditlog.context import disable_auditlog
from django.db import connection, transaction
from django.db.models import Case, F, Q, QuerySet, When
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    DecryptionError,
    GrantRevokedError,
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderChangedError,
    ProviderError,
)
from mailgov.models import (
    AdminJob,
    ConsentReceipt,
    Mailbox,
    OutboxAttempt,
    OutboxMessage,
    RefreshEvent,
    SendLog,
)
from mailgov.notifications import notify_owner
from mailgov.outbox import expire_bodies
from mailgov.outcomes import backoff
from mailgov.services import revoke_mailbox
from mailgov.tokens import get_access_token

logger = logging.getLogger("mailgov.lifecycle")

__all__ = [
    "activity",
    "last_activity",
    "purge",
    "record_refresh_failure",
    "record_refresh_success",
    "refresh_expiring",
    "revocation_due",
    "revoke_dormant",
]

#: Backoff of a failed proactive refresh (seconds): from BASE, doubling, up to CAP.
REFRESH_RETRY_BASE = 60
REFRESH_RETRY_CAP = 3600
#: Rows per DELETE in :func:`purge`: short statements, so no long table lock.
PURGE_CHUNK = 5000

Progress = Callable[[int], Any] | None
_FINAL = [OutboxMessage.State.SENT, OutboxMessage.State.FAILED, OutboxMessage.State.CANCELLED]


def activity() -> Greatest:
    """A query expression: the mailbox's last activity (used, connected or kept).

    ``Coalesce`` because SQLite's and MySQL's ``GREATEST`` is NULL if any
    argument is; ``connected_at`` is never null.
    """
    return Greatest(
        "connected_at",
        Coalesce("last_used_at", "connected_at"),
        Coalesce("kept_at", "connected_at"),
    )


def last_activity(mailbox: Mailbox) -> datetime:
    """:func:`activity` of a loaded mailbox."""
    return max(t for t in (mailbox.connected_at, mailbox.last_used_at, mailbox.kept_at) if t)


def revocation_due(last: datetime, warned_at: datetime | None) -> datetime:
    """When a mailbox last active at ``last`` and warned at ``warned_at`` is revoked.

    ``MAILGOV_DORMANT_DAYS`` after its activity, but never sooner than
    ``MAILGOV_DORMANT_WARNING_DAYS`` after its warning: a grant that is
    already past due when first seen (the sweep was off, or the settings
    were shortened) is warned first and revoked after a full warning period,
    never without notice. Pass ``warned_at=now`` for a warning about to go out.
    """
    due = last + timedelta(days=mailgov_settings.DORMANT_DAYS)
    if warned_at is not None and warned_at >= last:
        due = max(due, warned_at + timedelta(days=mailgov_settings.DORMANT_WARNING_DAYS))
    return due


def _tell(mailbox_id: Any, flip: QuerySet, *, value: bool, event: str, key: str, **context) -> bool:
    """Flip the owner-told flag with the conditional ``flip`` and queue the
    notice in the same transaction: told once, even by racing sweeps. A
    failure to queue rolls the flag back (a later run tries again), is logged,
    and never breaks the sweep. Returns whether a notice was queued."""
    try:
        with transaction.atomic():
            if not flip.update(refresh_failing_notified=value):
                return False
            mailbox = Mailbox.objects.select_related("owner").get(pk=mailbox_id)
            notify_owner(mailbox, event=event, template=event, key=key, context=context)
            return True
    except Exception as exc:
        logger.error("mailbox %s: %s notice not queued: %s", mailbox_id, event, type(exc).__name__)
        return False


# -- proactive refresh ----------------------------------------------------------


def record_refresh_failure(mailbox: Mailbox, *, now: datetime | None = None) -> bool:
    """Record that refreshing ``mailbox`` failed (not ``invalid_grant``) at ``now``.

    One conditional ``UPDATE``: one more failure in a row, the next try after
    :func:`mailgov.outcomes.backoff` (60 s doubling to an hour, with jitter),
    and one more failing *day* only if the last failure was on another
    calendar day (``TIME_ZONE``). On the ``MAILGOV_REFRESH_FAILING_DAYS``-th
    failing day the owner is told, once per episode. ``mailbox`` is the
    caller's fresh copy; its counters are updated in place. Returns whether
    the owner was told now.
    """
    now = now or timezone.now()
    today = timezone.localdate(now)
    failures = mailbox.refresh_failures + 1
    retry_at = backoff(failures, now, base=REFRESH_RETRY_BASE, cap=REFRESH_RETRY_CAP)
    Mailbox.objects.filter(pk=mailbox.pk).update(
        refresh_failures=F("refresh_failures") + 1,
        # A NULL refresh_failed_on matches no When: the first failing day counts.
        refresh_failing_days=Case(
            When(refresh_failed_on=today, then=F("refresh_failing_days")),
            default=F("refresh_failing_days") + 1,
        ),
        refresh_failed_on=today,
        refresh_retry_at=retry_at,
    )
    if mailbox.refresh_failed_on != today:
        mailbox.refresh_failing_days += 1
    mailbox.refresh_failures, mailbox.refresh_failed_on = failures, today
    mailbox.refresh_retry_at = retry_at
    if mailbox.refresh_failing_notified or not mailbox.refresh_failing:
        return False  # nothing to tell: saves the UPDATE below on most failures
    told = _tell(
        mailbox.pk,
        Mailbox.objects.filter(
            pk=mailbox.pk,
            refresh_failing_notified=False,
            refresh_failing_days__gte=mailgov_settings.REFRESH_FAILING_DAYS,
        ),
        value=True,
        event="refresh_failing",
        # The moment this episode crossed the threshold: a later episode
        # (after a recovery) is told again.
        key=f"refresh_failing:{mailbox.pk}:{now.isoformat()}",
        days=mailbox.refresh_failing_days,
    )
    mailbox.refresh_failing_notified = mailbox.refresh_failing_notified or told
    return told


#: A mailbox's refresh failure state, and its value once forgotten.
_NO_FAILURES = {
    "refresh_failures": 0,
    "refresh_failing_days": 0,
    "refresh_failed_on": None,
    "refresh_retry_at": None,
}


def _has_failures(mailbox: Mailbox) -> bool:
    fields = (*_NO_FAILURES, "refresh_failing_notified")
    return any(getattr(mailbox, name) for name in fields)


def _forget_failures(mailbox: Mailbox, **also: Any) -> None:
    Mailbox.objects.filter(pk=mailbox.pk).update(**_NO_FAILURES, **also)
    for name, value in {**_NO_FAILURES, **also}.items():
        setattr(mailbox, name, value)


def record_refresh_success(mailbox: Mailbox, *, now: datetime | None = None) -> bool:
    """Refreshing ``mailbox`` works (again): reset its failure counters, and
    if its owner was told it was failing, tell them once it recovered.
    Does nothing (no query) for a mailbox without failures. Returns whether
    the owner was told now."""
    if not _has_failures(mailbox):
        return False
    now = now or timezone.now()
    _forget_failures(mailbox)
    if not mailbox.refresh_failing_notified:
        return False
    told = _tell(
        mailbox.pk,
        Mailbox.objects.filter(pk=mailbox.pk, refresh_failing_notified=True),
        value=False,
        event="refresh_recovered",
        key=f"refresh_recovered:{mailbox.pk}:{now.isoformat()}",
    )
    mailbox.refresh_failing_notified = not told
    return told


def _refresh_one(mailbox_id: Any, now: datetime, margin: int) -> str:
    """Refresh one mailbox; returns the count it goes into."""
    mailbox = Mailbox.objects.filter(pk=mailbox_id, status=Mailbox.Status.ACTIVE).first()
    if mailbox is None:
        return "skipped"  # revoked or fallen since the batch was selected
    before = mailbox.last_refreshed_at
    try:
        # The token service's single flight: a send refreshing the same
        # mailbox meanwhile makes this a no-op, not a second refresh.
        get_access_token(mailbox, margin_seconds=margin)
    except GrantRevokedError:
        # Already needs_reconsent, tokens wiped, owner told (by the token
        # service). The failing episode ends with the grant.
        if _has_failures(mailbox):
            _forget_failures(mailbox, refresh_failing_notified=False)
        return "revoked"
    except ProviderError as exc:
        # 5xx, 429, timeouts (of the token endpoint or of discovery), other
        # refusals than invalid_grant: tokens kept; count the day, retry later.
        logger.warning("mailbox %s: proactive refresh failed: %s", mailbox.pk, exc)
        record_refresh_failure(mailbox, now=now)
        return "failed"
    except (ProviderChangedError, MailgovConfigurationError, DecryptionError) as exc:
        # An operator's matter (provider reconfigured or removed, keys): no
        # retry and nothing the owner does changes it. Messages hold no secret.
        logger.error("mailbox %s: not refreshed: %s: %s", mailbox.pk, type(exc).__name__, exc)
        return "errors"
    except MailboxUnavailableError:
        return "skipped"  # not active any more, or no refresh token
    # Also when another process refreshed it meanwhile: refreshing works.
    record_refresh_success(mailbox, now=now)
    return "refreshed" if mailbox.last_refreshed_at != before else "skipped"


def refresh_expiring(
    *, now: datetime | None = None, progress: Progress = None, concurrency: int | None = None
) -> dict[str, int]:
    """Refresh the access tokens of mailboxes in use that expire soon.

    Takes active mailboxes holding a refresh token, with activity within
    ``MAILGOV_DORMANT_DAYS``, whose access token expires before ``now +
    MAILGOV_REFRESH_AHEAD_SECONDS`` (or has no expiry), and those with
    recorded failures (a recovery is noticed even if a send refreshed the
    token first); not before their ``refresh_retry_at``. ``concurrency``
    (default ``MAILGOV_REFRESH_CONCURRENCY``) threads at once; ``1`` works in
    the calling thread. ``progress(1)`` is called per mailbox taken.

    Returns counts: ``refreshed``; ``failed`` (recorded, retried with
    backoff); ``revoked`` (``invalid_grant``: now ``needs_reconsent``);
    ``skipped`` (waiting for its retry time, refreshed by another process,
    no longer active); ``errors`` (provider reconfigured or removed, a token
    that cannot be decrypted, anything unexpected: an operator must look).
    """
    now = now or timezone.now()
    margin = int(mailgov_settings.REFRESH_AHEAD_SECONDS)
    expiring = Q(credentials__expires_at__lt=now + timedelta(seconds=margin)) | Q(
        credentials__expires_at__isnull=True
    )
    rows = list(
        Mailbox.objects.annotate(activity=activity())
        .filter(
            expiring | Q(refresh_failures__gt=0),
            status=Mailbox.Status.ACTIVE,
            activity__gte=now - timedelta(days=mailgov_settings.DORMANT_DAYS),
            credentials__refresh_token__isnull=False,
        )
        .order_by("credentials__expires_at")
        .values_list("pk", "refresh_retry_at")
    )
    due = [pk for pk, retry_at in rows if retry_at is None or retry_at <= now]
    skipped = len(rows) - len(due)
    counts = {"refreshed": 0, "failed": 0, "revoked": 0, "skipped": skipped, "errors": 0}
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for pk in due:
        pending.put(pk)
    lock = threading.Lock()

    def work() -> None:
        while True:
            try:
                pk = pending.get_nowait()
            except queue.Empty:
                return
            try:
                outcome = _refresh_one(pk, now, margin)
            except Exception as exc:  # one mailbox never stops the sweep
                logger.error("mailbox %s: refresh sweep: %s", pk, type(exc).__name__)
                outcome = "errors"
            with lock:
                counts[outcome] += 1
                if progress is not None:
                    progress(1)

    def pooled() -> None:
        try:
            work()
        finally:
            # This thread opened its own connection: close it, or every run
            # leaves one per thread behind until the server drops them.
            connection.close()

    workers = min(int(concurrency or mailgov_settings.REFRESH_CONCURRENCY), len(due))
    if workers <= 1:
        work()
        return counts
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mailgov-refresh") as pool:
        futures = [pool.submit(pooled) for _ in range(workers)]
    for future in futures:
        future.result()  # re-raise what escaped a thread (a broken progress bar)
    return counts


# -- dormant grants -------------------------------------------------------------


def _unchanged(row: dict[str, Any]) -> QuerySet:
    """The mailbox of ``row``, only if nobody used, reconnected or kept it
    since the batch was read (and it is not revoked)."""
    return Mailbox.objects.filter(
        pk=row["pk"],
        last_used_at=row["last_used_at"],
        connected_at=row["connected_at"],
        kept_at=row["kept_at"],
    ).exclude(status=Mailbox.Status.REVOKED)


def revoke_dormant(
    *, dry_run: bool = False, now: datetime | None = None, progress: Progress = None
) -> dict[str, Any]:
    """Warn the owners of grants about to go dormant; revoke the dormant ones.

    Any mailbox but a revoked one, without activity for ``MAILGOV_DORMANT_DAYS
    - MAILGOV_DORMANT_WARNING_DAYS`` days and not warned since, is warned
    once (``dormant_warning`` notice: the date, a link to keep it; sets
    ``dormant_warned_at``). A warned one is revoked once
    :func:`revocation_due` has come (``revoke_mailbox(..., defer=True)``: the
    provider-side revocation is queued). One used, reconnected or kept while
    the sweep runs is left alone (``skipped``).

    Returns with ``dry_run`` (nothing changes) the ids (strings) it would act
    on, ``{"revoked": [...], "warned": [...]}``; otherwise counts ``revoked``,
    ``warned``, ``skipped``, ``failed`` (raised, e.g. the provider is no
    longer configured; logged). ``progress(1)`` per mailbox acted on.
    """
    now = now or timezone.now()
    warn_after = mailgov_settings.DORMANT_DAYS - mailgov_settings.DORMANT_WARNING_DAYS
    rows = (
        Mailbox.objects.exclude(status=Mailbox.Status.REVOKED)
        .annotate(activity=activity())
        .filter(activity__lt=now - timedelta(days=warn_after))
        .order_by("activity")
        .values("pk", "activity", "dormant_warned_at", "last_used_at", "connected_at", "kept_at")
    )
    to_warn, to_revoke = [], []
    for row in rows:
        warned_at = row["dormant_warned_at"]
        if warned_at is None or warned_at < row["activity"]:
            to_warn.append(row)
        elif revocation_due(row["activity"], warned_at) <= now:
            to_revoke.append(row)
    if dry_run:
        return {
            "revoked": [str(row["pk"]) for row in to_revoke],
            "warned": [str(row["pk"]) for row in to_warn],
        }
    counts = dict.fromkeys(("revoked", "warned", "skipped", "failed"), 0)
    for act, batch in ((_warn, to_warn), (_revoke, to_revoke)):
        for row in batch:
            counts[act(row, now)] += 1
            if progress is not None:
                progress(1)
    return counts


def _warn(row: dict[str, Any], now: datetime) -> str:
    last = row["activity"]
    try:
        with transaction.atomic():
            # The conditional UPDATE is the once-guard; the notice is queued
            # in the same transaction, so a failure leaves it to the next run.
            claimed = (
                _unchanged(row)
                .filter(Q(dormant_warned_at__isnull=True) | Q(dormant_warned_at__lt=last))
                .update(dormant_warned_at=now)
            )
            if not claimed:
                return "skipped"
            mailbox = Mailbox.objects.select_related("owner").get(pk=row["pk"])
            notify_owner(
                mailbox,
                event="dormant_warning",
                template="dormant_warning",
                key=f"dormant_warning:{mailbox.pk}:{last.isoformat()}",
                context={
                    "last_activity": last,
                    "revoke_on": revocation_due(last, now),
                    "days": mailgov_settings.DORMANT_DAYS,
                },
            )
    except Exception as exc:
        logger.error("mailbox %s: dormancy warning failed: %s", row["pk"], type(exc).__name__)
        return "failed"
    return "warned"


def _revoke(row: dict[str, Any], now: datetime) -> str:
    mailbox = _unchanged(row).filter(dormant_warned_at=row["dormant_warned_at"]).first()
    if mailbox is None:
        return "skipped"  # used, kept or revoked since the batch was read
    days = (now - row["activity"]).days
    try:
        revoke_mailbox(mailbox, f"dormant: unused for {days} days", defer=True)
    except Exception as exc:
        logger.error("mailbox %s: dormant grant not revoked: %s", mailbox.pk, exc)
        return "failed"
    return "revoked"


# -- retention -----------------------------------------------------------------


def _delete_in_chunks(
    queryset: QuerySet, *, dry_run: bool = False, progress: Progress = None
) -> dict[str, int]:
    """Delete ``queryset`` ``PURGE_CHUNK`` rows per statement; counts by model label."""
    if dry_run:
        return {queryset.model._meta.label: queryset.count()}
    counts: dict[str, int] = {}
    model = queryset.model
    while True:
        ids = list(queryset.order_by().values_list("pk", flat=True)[:PURGE_CHUNK])
        if not ids:
            return counts
        # Retention, not a change to audit row by row (one entry per purged
        # outbox row or receipt would flood the trail): the counts are logged.
        with disable_auditlog():
            _, by_model = model.objects.filter(pk__in=ids).delete()
        for label, n in by_model.items():
            counts[label] = counts.get(label, 0) + n
        if progress is not None:
            progress(len(ids))


def purge(
    *, now: datetime | None = None, dry_run: bool = False, progress: Progress = None
) -> dict[str, int]:
    """Delete what is past its retention, ``PURGE_CHUNK`` rows per DELETE.

    Counts: ``sendlogs`` (attempted more than ``MAILGOV_SENDLOG_RETENTION_DAYS``
    ago), ``attempts`` (outbox attempts started before that, and those of the
    deleted outbox rows), ``outbox`` (rows sent, failed or cancelled before
    that: ``finished_at``, else ``created_at``), ``bodies``
    (:func:`mailgov.outbox.expire_bodies`), ``receipts`` (consent receipts
    older than ``MAILGOV_RECEIPT_RETENTION_DAYS`` whose grant ended that long
    ago too: mailbox revoked, or its row deleted (``grant_ended_at``), before
    then. Proof of consent is
    kept while the grant lives and for the full period after it ends, not
    from the receipt's date: it is needed most for a grant's last years),
    ``refreshes`` (refresh history) and ``jobs`` (finished governance jobs)
    older than the send-log retention.

    The audit trail (django-auditlog) is not purged here: use
    ``manage.py auditlogflush --before-date YYYY-MM-DD``. ``dry_run`` counts
    instead (without ``bodies``: that count belongs to :mod:`mailgov.outbox`).
    ``progress(n)`` is called with the rows of each DELETE.
    """
    now = now or timezone.now()
    logs_before = now - timedelta(days=mailgov_settings.SENDLOG_RETENTION_DAYS)
    receipts_before = now - timedelta(days=mailgov_settings.RECEIPT_RETENTION_DAYS)
    ended = (
        # The mailbox row went (deleted, or with its owner's account) that long ago.
        Q(mailbox__isnull=True, grant_ended_at__lt=receipts_before)
        # ... before the end was recorded (0010): the receipt's date is all there is.
        | Q(mailbox__isnull=True, grant_ended_at__isnull=True)
        | Q(
            Q(mailbox__revoked_at__lt=receipts_before) | Q(mailbox__revoked_at__isnull=True),
            mailbox__status=Mailbox.Status.REVOKED,
        )
    )
    finished = Q(finished_at__lt=logs_before) | Q(
        finished_at__isnull=True, created_at__lt=logs_before
    )
    targets = {  # lazy: each is evaluated when its turn comes
        "sendlogs": SendLog.objects.filter(attempted_at__lt=logs_before),
        "attempts": OutboxAttempt.objects.filter(started_at__lt=logs_before),
        "outbox": OutboxMessage.objects.filter(finished, state__in=_FINAL),
        "receipts": ConsentReceipt.objects.filter(ended, created_at__lt=receipts_before),
        "refreshes": RefreshEvent.objects.filter(at__lt=logs_before),
        "jobs": AdminJob.objects.filter(created_at__lt=logs_before).exclude(
            state__in=[AdminJob.State.PENDING, AdminJob.State.RUNNING]
        ),
    }
    counts = dict.fromkeys(targets, 0)
    for name, queryset in targets.items():
        if name == "outbox" and not dry_run:
            # First: a held message whose body expires turns failed now, and
            # is kept (with its attempts) for the full period from now.
            counts["bodies"] = expire_bodies(now=now)
        for label, n in _delete_in_chunks(queryset, dry_run=dry_run, progress=progress).items():
            counts["attempts" if label == OutboxAttempt._meta.label else name] += n
    if not dry_run:
        logger.info("purge: %s", counts)
    return counts
