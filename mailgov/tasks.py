"""Celery tasks: thin, named ``mailgov.<verb>``, each calling a service.

The logic lives in :mod:`mailgov.outbox`, :mod:`mailgov.delivery`,
:mod:`mailgov.lifecycle` and :mod:`mailgov.services`; a task only picks the
arguments and, for the periodic sweeps, takes the sweep's database lock
(:mod:`mailgov.sweeps`) so that two beats do the work once.

No task carries a message body, an address or a token: arguments are ids.
No task retries itself with a countdown (a countdown longer than Redis's
visibility timeout is redelivered in a loop): retries are times in database
rows that a periodic sweep picks up.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_process_shutdown, worker_shutdown
from django.conf import settings

from mailgov import delivery, lifecycle, outbox, revocation, services
from mailgov.schedule import PERIODS
from mailgov.sweeps import exclusive

#: Publishing waits little for a broker that is down: every task mailgov
#: publishes is also found by a sweep from the database rows.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5}

# A worker told to stop (SIGTERM: warm shutdown) says QUIT on the SMTP
# connections it kept open: prefork children on worker_process_shutdown,
# the solo and threads pools (tasks run in the main process) on
# worker_shutdown.
for _signal in (worker_process_shutdown, worker_shutdown):
    _signal.connect(delivery.POOL.close_all, weak=False, dispatch_uid="mailgov.close_kept_smtp")


def publish_task(task: Any, *, args: tuple = (), kwargs: dict | None = None) -> Exception | None:
    """Send ``task`` to the broker; return the error (not raised) when the
    broker cannot be reached. kombu's and the transports' errors vary, so
    any exception counts: the caller logs it and leaves the work to a sweep."""
    try:
        task.apply_async(
            args=args, kwargs=kwargs or {}, retry=True, retry_policy=PUBLISH_RETRY_POLICY
        )
    except Exception as exc:
        return exc
    return None


def _sweep(name: str, work: Any, **kwargs: Any) -> dict[str, Any] | None:
    # The schedule in settings, if it sets this sweep's period, else the default.
    entry = getattr(settings, "CELERY_BEAT_SCHEDULE", {}).get(name) or {}
    schedule = entry.get("schedule")
    period = float(schedule) if isinstance(schedule, int | float) else PERIODS[name]
    # The lock outlives any sane run (it expires only if its holder died).
    with exclusive(name, ttl=max(3600, period * 2), min_interval=period / 2) as run:
        if not run:
            return None
        run.result = work(**kwargs) or {}
        return run.result


# acks_late: a prefork worker whose processes are all busy sending reserves
# no more delivery tasks (acked on receipt, the running ones would free its
# prefetch window, and it would hold the next one, perhaps the fan-out meant
# for an idle worker, until a process is free). Redelivery is harmless: the
# outbox rows decide what is sent.
@shared_task(name="mailgov.deliver_outbox", ignore_result=True, acks_late=True)
def deliver_outbox(mailbox_id: str | None = None, kind: str = "mail") -> dict[str, int]:
    """Send the due outbox messages of one mailbox (or the due notices)."""
    return delivery.deliver(mailbox_id=mailbox_id, kind=kind, fan_out=outbox.publish)


@shared_task(name="mailgov.dispatch_outbox", ignore_result=True)
def dispatch_outbox() -> dict[str, int] | None:
    """Recover interrupted sends and publish work for every mailbox with due mail."""
    result = _sweep("mailgov.dispatch_outbox", outbox.dispatch)
    if result is not None:
        from mailgov import governance

        result["jobs_requeued"] = governance.resume_stale_jobs()
    return result


@shared_task(name="mailgov.refresh_tokens", ignore_result=True)
def refresh_tokens() -> dict[str, int] | None:
    """Refresh the access tokens of mailboxes in use that expire soon."""
    return _sweep("mailgov.refresh_tokens", lifecycle.refresh_expiring)


@shared_task(name="mailgov.retry_revocations", ignore_result=True)
def retry_revocations() -> dict[str, int] | None:
    """Retry the provider-side revocations whose time has come."""
    result = _sweep("mailgov.retry_revocations", services.retry_revocations, due_only=True)
    if result is not None:
        from mailgov import privacy

        # An erasure is done once its grants are revoked at their providers.
        result["erasures_done"] = privacy.check_erasures()
    return result


@shared_task(name="mailgov.revoke_at_provider", ignore_result=True)
def revoke_at_provider(mailbox_id: str) -> str:
    """Revoke one revoked mailbox's grant at its provider (idempotent)."""
    return services.revoke_at_provider(mailbox_id)


@shared_task(name="mailgov.revoke_many", ignore_result=True)
def revoke_many(mailbox_ids: list[str]) -> dict[str, int]:
    """Revoke many revoked mailboxes' grants at their providers (a contained
    incident's), one after the other."""
    counts: dict[str, int] = {}
    for mailbox_id in mailbox_ids:
        outcome = services.revoke_at_provider(mailbox_id)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


@shared_task(name="mailgov.revoke_deleted", ignore_result=True)
def revoke_deleted(pending_id: str) -> str:
    """Revoke a deleted mailbox's grant at its provider (idempotent)."""
    return revocation.revoke_deleted(pending_id)


@shared_task(name="mailgov.run_governance_job", ignore_result=True)
def run_governance_job(job_id: str) -> dict[str, int] | None:
    """Run a governance action over a large selection (see mailgov.governance)."""
    from mailgov import governance

    return governance.run_job(job_id)


@shared_task(name="mailgov.revoke_dormant", ignore_result=True)
def revoke_dormant() -> dict[str, int] | None:
    """Warn the owners of grants about to go dormant, revoke the dormant ones."""
    return _sweep("mailgov.revoke_dormant", lifecycle.revoke_dormant)


@shared_task(name="mailgov.purge", ignore_result=True)
def purge() -> dict[str, int] | None:
    """Delete what is past its retention (send logs, attempts, bodies, receipts)."""
    return _sweep("mailgov.purge", lifecycle.purge)
