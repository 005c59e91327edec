"""Governance actions over a selection of mailboxes or outbox messages, as jobs.

Every action the portal offers on a selection (revoke, suspend, resume,
require re-consent, release or cancel held mail; retry, cancel, release
outbox messages) and the guided key rotation run through :func:`start`:
an :class:`~mailgov.models.AdminJob` row records who asked, the selection,
progress and the outcome by result. A selection of up to
``MAILGOV_ADMIN_INLINE_ROWS`` rows runs in the request; a larger one in a
Celery worker (``mailgov.run_governance_job``), under the correlation id
and the actor of the request that started it, so that its audit entries
name the administrator, not the worker.

Each row goes through the services (:mod:`mailgov.services`,
:mod:`mailgov.outbox`), so a job does what a single click does; changes
made by ``QuerySet.update()`` write their audit entries here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Model
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from mailgov.audit import acting_as, current_cid, log_rows, log_summary
from mailgov.conf import mailgov_settings
from mailgov.exceptions import GovernanceActionError, OutboxStateError
from mailgov.incidents import (
    contain,
    contained_unrevoked,
    finish_containment,
    notify,
    record,
    scope_queryset,
)
from mailgov.models import AdminJob, Incident, Mailbox, OutboxMessage
from mailgov.outbox import cancel_message, release_auto_held, release_held, retry_message
from mailgov.rotation import rotate_keys, rotation_pending_count
from mailgov.services import require_reconsent, resume_mailbox, revoke_mailbox, suspend_mailbox

logger = logging.getLogger("mailgov")
security_logger = logging.getLogger("mailgov.security")

State = OutboxMessage.State

__all__ = [
    "ACTIONS",
    "Action",
    "resume_stale_jobs",
    "run_job",
    "start",
    "start_containment",
    "start_notify",
    "start_rotation",
]


@dataclass(frozen=True)
class Action:
    """A governance action: its name, label, the model of its rows, the
    permission it needs, and what it does to one row (returns a result key
    counted in the job's outcome)."""

    name: str
    label: Promise
    model: type[Model]
    permission: str
    run: Callable[[Any, Any], str]


def _reason(actor: Any, what: str) -> str:
    who = actor.get_username() if getattr(actor, "is_authenticated", False) else "system"
    return f"admin: {what} by {who}"


# -- mailbox actions ----------------------------------------------------------------------


def _revoke(mailbox: Mailbox, actor: Any) -> str:
    if mailbox.status == Mailbox.Status.REVOKED:
        return "already_revoked"
    # The provider call is queued (retried), not made in the request.
    revoke_mailbox(mailbox, _reason(actor, "revoked"), defer=True)
    return "revoked"


def _suspend(mailbox: Mailbox, actor: Any) -> str:
    return "suspended" if suspend_mailbox(mailbox, _reason(actor, "suspended")) else "unchanged"


def _resume(mailbox: Mailbox, actor: Any) -> str:

    if not resume_mailbox(mailbox, _reason(actor, "resumed")):
        return "unchanged"
    release_auto_held()
    return "resumed"


def _reconsent(mailbox: Mailbox, actor: Any) -> str:
    changed = require_reconsent(mailbox, _reason(actor, "re-consent required"))
    return "reconsent_required" if changed else "unchanged"


def _held(mailbox: Mailbox):
    return OutboxMessage.objects.filter(mailbox=mailbox, state=State.HELD)


def _release_held(mailbox: Mailbox, actor: Any) -> str:
    rows = list(_held(mailbox).filter(payload__isnull=False).values_list("pk", "message_id"))
    if not rows:
        return "nothing_held"
    release_held(mailbox, actor=_reason(actor, "released"))
    log_rows(OutboxMessage, rows, changes={"state": [State.HELD, State.QUEUED]}, actor=actor)
    return "released"


def _cancel_held(mailbox: Mailbox, actor: Any) -> str:
    rows = list(_held(mailbox).values_list("pk", "message_id"))
    if not rows:
        return "nothing_held"
    OutboxMessage.objects.filter(pk__in=[pk for pk, _ in rows], state=State.HELD).update(
        state=State.CANCELLED, payload=None, finished_at=timezone.now()
    )
    log_rows(OutboxMessage, rows, changes={"state": [State.HELD, State.CANCELLED]}, actor=actor)
    return "cancelled"


# -- outbox actions -----------------------------------------------------------------------


def _outbox_change(row: OutboxMessage, actor: Any, allowed: tuple[str, ...], do: Any) -> str:
    if row.state not in allowed:
        return f"refused_{row.state}"
    before = row.state
    try:
        after = do(row.pk, actor=_reason(actor, "outbox")).state
    except OutboxStateError:
        return "refused_changed"
    log_rows(OutboxMessage, [(row.pk, str(row))], changes={"state": [before, after]}, actor=actor)
    return after


def _retry(row: OutboxMessage, actor: Any) -> str:
    # Failed only: a sent message would be sent twice; held mail is released.
    result = _outbox_change(row, actor, (State.FAILED,), retry_message)
    return "retried" if result == State.QUEUED else result


def _cancel(row: OutboxMessage, actor: Any) -> str:
    return _outbox_change(row, actor, (State.QUEUED, State.HELD, State.FAILED), cancel_message)


def _release(row: OutboxMessage, actor: Any) -> str:
    result = _outbox_change(row, actor, (State.HELD,), retry_message)
    return "released" if result == State.QUEUED else result


ACTIONS: dict[str, Action] = {
    action.name: action
    for action in [
        Action("revoke", _("Revoke the grants"), Mailbox, "mailgov.govern_mailbox", _revoke),
        Action("suspend", _("Suspend sending"), Mailbox, "mailgov.govern_mailbox", _suspend),
        Action("resume", _("Resume sending"), Mailbox, "mailgov.govern_mailbox", _resume),
        Action(
            "require_reconsent",
            _("Require re-consent"),
            Mailbox,
            "mailgov.govern_mailbox",
            _reconsent,
        ),
        Action(
            "release_held",
            _("Release held messages"),
            Mailbox,
            "mailgov.manage_outbox",
            _release_held,
        ),
        Action(
            "cancel_held", _("Cancel held messages"), Mailbox, "mailgov.manage_outbox", _cancel_held
        ),
        Action("retry", _("Retry (failed only)"), OutboxMessage, "mailgov.manage_outbox", _retry),
        Action("cancel", _("Cancel"), OutboxMessage, "mailgov.manage_outbox", _cancel),
        Action("release", _("Release held"), OutboxMessage, "mailgov.manage_outbox", _release),
    ]
}

#: Actions that are not row actions: they run through their own starters.
SPECIAL = {"rotate_keys", "notify", "contain"}


def allowed(user: Any, action_name: str) -> bool:
    """Whether ``user`` may run ``action_name`` (key rotation: superusers)."""
    if action_name == "rotate_keys":
        return bool(getattr(user, "is_superuser", False))
    if action_name in ("notify", "contain"):
        return bool(user and user.has_perm("mailgov.manage_incident"))
    action = ACTIONS.get(action_name)
    return bool(action and user and user.has_perm(action.permission))


# -- jobs ---------------------------------------------------------------------------------


def start(action_name: str, ids: list[Any], *, user: Any, cid: str = "") -> AdminJob:
    """Run ``action_name`` over ``ids`` as ``user``: at once for a small
    selection, else queued for a worker. The caller checked the permission
    (:func:`allowed`); it is checked again when the job runs. Returns the job."""
    if action_name not in ACTIONS and action_name not in SPECIAL:
        raise GovernanceActionError(f"Unknown governance action {action_name!r}.")
    ids = [str(pk) for pk in ids]
    return _launch(action_name, ids, len(ids), user, cid, inline=action_name in ACTIONS)


def _launch(
    action: str, target_ids: list[str], total: int, user: Any, cid: str, *, inline: bool = True
) -> AdminJob:
    """Record the job as ``user`` under the request's correlation id; run it
    here when ``inline`` and it is small enough, else queue it for a worker
    on commit."""
    job = AdminJob.objects.create(
        action=action,
        target_ids=target_ids,
        total=total,
        requested_by=user if getattr(user, "is_authenticated", False) else None,
        cid=(cid or current_cid())[:255],
    )
    if inline and total <= int(mailgov_settings.ADMIN_INLINE_ROWS):
        run_job(job.pk)
        job.refresh_from_db()
    else:
        transaction.on_commit(lambda: _publish(job.pk))
    return job


def start_rotation(*, user: Any, incident: Incident | None = None, cid: str = "") -> AdminJob:
    """Queue the re-encryption of every stored value under the primary key
    (superusers only; recorded on ``incident``'s timeline when it ends)."""
    target = [str(incident.pk)] if incident is not None else []
    # Always in a worker: a rotation outlasts any request.
    return _launch("rotate_keys", target, rotation_pending_count(), user, cid, inline=False)


def start_notify(incident: Incident, *, user: Any, cid: str = "") -> AdminJob:
    """Notify the incident's affected owners: at once for a small scope,
    else in a worker."""
    owners = scope_queryset(incident).values("owner_id").distinct().count()
    return _launch("notify", [str(incident.pk)], owners, user, cid)


def start_containment(incident: Incident, *, user: Any, cid: str = "") -> tuple[dict, AdminJob]:
    """Contain the incident at once (one write: every token in the scope
    unusable), then revoke the rows: here for a small scope, else in a
    worker. Returns the containment's counts and the job."""
    if incident.contained_at is None:
        counts = contain(incident, actor=user, finish=False)
    else:
        # Contained already (maybe since resolved): finish what a failed or
        # lost job left, without switching anything on again.
        counts = {"already": 1}
    rows = contained_unrevoked(incident).count()
    return counts, _launch("contain", [str(incident.pk)], rows, user, cid)


def _publish(job_id: Any) -> None:
    from mailgov import tasks

    error = tasks.publish_task(tasks.run_governance_job, args=(str(job_id),))
    if error is not None:
        logger.warning(
            "governance job %s not queued (%s); the dispatch sweep will queue it",
            job_id,
            type(error).__name__,
        )


#: A running job not heard of for this long lost its worker and may be taken again.
JOB_LEASE = timedelta(minutes=30)


def _claim(job_id: Any, now) -> AdminJob | None:
    stale = now - JOB_LEASE
    taken = AdminJob.objects.filter(pk=job_id, state=AdminJob.State.PENDING).update(
        state=AdminJob.State.RUNNING, started_at=now, heartbeat_at=now
    ) or AdminJob.objects.filter(
        pk=job_id, state=AdminJob.State.RUNNING, heartbeat_at__lt=stale
    ).update(heartbeat_at=now)
    return AdminJob.objects.select_related("requested_by").get(pk=job_id) if taken else None


def run_job(job_id: Any) -> dict[str, int] | None:
    """Run a pending job (idempotent per row: a job taken again after its
    worker died does each row's action again, which changes nothing twice).
    Returns the outcome counts; ``None`` if the job was not pending."""
    now = timezone.now()
    job = _claim(job_id, now)
    if job is None:
        return None
    user = job.requested_by
    if user is not None:
        user = get_user_model().objects.filter(pk=user.pk, is_active=True).first()
    counts: dict[str, int] = {}
    try:
        with acting_as(user, job.cid):
            if not allowed(user, job.action):
                security_logger.warning(
                    "governance job %s refused: user %s may not %s",
                    job.pk,
                    getattr(user, "pk", None),
                    job.action,
                )
                _finish(job, counts, state=AdminJob.State.FAILED, error="permission withdrawn")
                return counts
            if job.action == "rotate_keys":
                counts = _run_rotation(job, user)
            elif job.action == "notify":
                counts = _run_notify(job, user)
            elif job.action == "contain":
                counts = _run_containment(job, user)
            else:
                counts = _run_rows(job, ACTIONS[job.action], user)
            _finish(job, counts)
            log_summary(job, what=job.action, ids=job.target_ids, actor=user, counts=counts)
    except Exception as exc:
        logger.exception("governance job %s failed", job.pk)
        _finish(job, counts, state=AdminJob.State.FAILED, error=type(exc).__name__)
        raise
    return counts


def _progress(job: AdminJob, done: int, counts: dict[str, int]) -> None:
    AdminJob.objects.filter(pk=job.pk).update(
        done=done, counts=dict(counts), heartbeat_at=timezone.now()
    )


def _finish(job: AdminJob, counts: dict[str, int], *, state=None, error: str = "") -> None:
    state = state or AdminJob.State.DONE
    fields: dict[str, Any] = {"state": state, "counts": counts, "finished_at": timezone.now()}
    if state == AdminJob.State.DONE:
        fields["done"] = job.total
    if error:
        fields["error"] = error[:255]
    AdminJob.objects.filter(pk=job.pk).update(**fields)


#: Rows read per query, and between two progress updates.
CHUNK = 100


def _run_rows(job: AdminJob, action: Action, user: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    done = 0
    ids = list(job.target_ids)
    for start_at in range(0, len(ids), CHUNK):
        chunk = ids[start_at : start_at + CHUNK]
        rows = {str(row.pk): row for row in action.model.objects.filter(pk__in=chunk)}
        for pk in chunk:
            row = rows.get(pk)
            result = "missing" if row is None else action.run(row, user)
            counts[result] = counts.get(result, 0) + 1
            done += 1
        _progress(job, done, counts)
    return counts


class _JobProgress:
    """``progress(n)`` for a service: counts rows done into the job's row,
    written at most every ``every`` rows (a write per row would cost more
    than a notice)."""

    def __init__(self, job: AdminJob, every: int = 1) -> None:
        self.job_id, self.every, self.done, self.written = job.pk, every, 0, 0

    def __call__(self, rows: int) -> None:
        self.done += rows
        if self.done - self.written >= self.every:
            AdminJob.objects.filter(pk=self.job_id).update(
                done=self.done, heartbeat_at=timezone.now()
            )
            self.written = self.done


def _run_rotation(job: AdminJob, user: Any) -> dict[str, int]:

    result = rotate_keys(progress=_JobProgress(job))
    counts = {
        "rotated_values": result.rotated,
        "rows": result.rows,
        "failed_rows": len(result.failed_rows),
        "busy_rows": len(result.busy_rows),
    }
    if job.target_ids:
        incident = Incident.objects.filter(pk=job.target_ids[0]).first()
        if incident is not None:
            record(incident, "rotate", actor=user, counts=counts)
    return counts


def _run_notify(job: AdminJob, user: Any) -> dict[str, int]:
    incident = Incident.objects.get(pk=job.target_ids[0])
    return notify(incident, actor=user, progress=_JobProgress(job, every=CHUNK))


def _run_containment(job: AdminJob, user: Any) -> dict[str, int]:
    incident = Incident.objects.get(pk=job.target_ids[0])
    return finish_containment(incident, actor=user, progress=_JobProgress(job))


def resume_stale_jobs(*, now=None) -> int:
    """Queue again jobs whose broker message was lost (pending for a minute)
    or whose worker died (running past the lease). Called by the dispatch sweep."""
    now = now or timezone.now()
    stale = list(
        AdminJob.objects.filter(
            state=AdminJob.State.PENDING, created_at__lt=now - timedelta(minutes=1)
        ).values_list("pk", flat=True)[:100]
    ) + list(
        AdminJob.objects.filter(
            state=AdminJob.State.RUNNING, heartbeat_at__lt=now - JOB_LEASE
        ).values_list("pk", flat=True)[:100]
    )
    for job_id in stale:
        _publish(job_id)
    return len(stale)
