"""Workers' side of the outbox: claim due messages, send them, record each outcome.

A claim (:func:`claim_batch`) takes up to ``MAILGOV_OUTBOX_BATCH_SIZE`` due
messages of one mailbox in one short transaction and commits before any
network I/O:

- the mailbox row is locked (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite's
  ``IMMEDIATE`` transactions serialize every claim), so the quota and the
  provider's connection limit are judged by one claimer at a time;
- the rows are picked with ``SELECT ... FOR UPDATE SKIP LOCKED`` where the
  database has it, and taken with a conditional ``UPDATE ... WHERE state =
  'queued'`` everywhere, then read back by the claim's id: a row is never in
  two claims;
- each claimed row becomes ``sending`` with a lease and gets an attempt row.

:func:`send_claim` sends the batch with the SMTP backend's own code
(:meth:`mailgov.backends.smtp.EmailBackend.send_prepared`, one connection)
and records each message's outcome as soon as it is known, so that a worker
killed mid-batch leaves at most one message whose fate is unknown. A row still
``sending`` when its lease expires is an interrupted attempt
(:func:`mailgov.outbox.recover_interrupted`).

Outcomes (retry, fail, pause, hold) are decided by :func:`mailgov.outcomes.classify`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    DecryptionError,
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderChangedError,
)
from mailgov.models import Mailbox, OutboxAttempt, OutboxMessage
from mailgov.outcomes import MAILBOX_HOLD_CODES, Verdict, backoff, classify
from mailgov.providers import get_mailbox_provider
from mailgov.throttling import allowance, quota_for
from mailgov.validation import PreparedMessage

logger = logging.getLogger("mailgov.outbox")

State = OutboxMessage.State
Outcome = OutboxAttempt.Outcome

__all__ = ["Claim", "claim_batch", "deliver", "send_claim", "worker_name"]


def worker_name() -> str:
    """``host:pid:thread``: who holds a claim, shown on its attempts."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


@dataclass
class Claim:
    """Messages of one mailbox (or notices) claimed by one worker."""

    claim_id: uuid.UUID
    worker: str
    kind: str
    mailbox: Mailbox | None
    rows: list[OutboxMessage]


@dataclass
class _Batch:
    claim: Claim
    now_fn: Any
    done: set[uuid.UUID] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    provider_type: str = ""


class _StopBatch(Exception):
    """Raised from the result callback to stop sending the rest of a batch."""


# -- claiming -------------------------------------------------------------------


def _due(kind: str, now: datetime):
    return OutboxMessage.objects.filter(kind=kind, state=State.QUEUED, next_attempt_at__lte=now)


def _defer(mailbox_id: Any, until: datetime, code: str, now: datetime) -> int:
    """Move ``mailbox_id``'s due messages to ``until`` (over quota, paused)."""
    return (
        _due(OutboxMessage.Kind.MAIL, now)
        .filter(mailbox_id=mailbox_id)
        .update(next_attempt_at=until, error_code=code)
    )


def _hold_mailbox(mailbox: Mailbox, code: str, reason: str, now: datetime) -> int:
    """Hold every queued message of ``mailbox`` (due or not)."""
    return OutboxMessage.objects.filter(
        kind=OutboxMessage.Kind.MAIL, mailbox=mailbox, state=State.QUEUED
    ).update(state=State.HELD, error_code=code, held_reason=reason[:255], finished_at=now)


def claim_batch(
    worker: str,
    *,
    mailbox_id: Any = None,
    kind: str = OutboxMessage.Kind.MAIL,
    now: datetime | None = None,
) -> Claim | None:
    """Claim the next due batch (of ``mailbox_id``, if given); ``None`` when
    nothing is due that may be sent now. See the module docstring."""
    now = now or timezone.now()
    batch_size = max(1, int(mailgov_settings.OUTBOX_BATCH_SIZE))
    skip = set()
    for _ in range(100):  # mailboxes looked at per call: bounded
        with transaction.atomic():
            due = _due(kind, now)
            if mailbox_id is not None:
                due = due.filter(mailbox_id=mailbox_id)
            if kind == OutboxMessage.Kind.NOTIFICATION:
                return _take(due.order_by("next_attempt_at"), batch_size, worker, kind, None, now)
            if skip:
                due = due.exclude(mailbox_id__in=skip)
            head = due.order_by("next_attempt_at").values_list("mailbox_id", flat=True).first()
            if head is None:
                if due.filter(mailbox__isnull=True).exists():
                    _fail_orphans(now)
                    continue
                return None
            mailbox = Mailbox.objects.select_for_update(no_key=True).filter(pk=head).first()
            if mailbox is None:  # deleted since
                skip.add(head)
                continue
            allowed = _gate(mailbox, now)
            if allowed <= 0:
                skip.add(head)
                continue
            claim = _take(
                due.filter(mailbox=mailbox).order_by("next_attempt_at", "created_at"),
                min(batch_size, allowed),
                worker,
                kind,
                mailbox,
                now,
                recipients_left=getattr(mailbox, "_recipients_left", None),
            )
            if claim is not None:
                return claim
            skip.add(head)
    return None


def _fail_orphans(now: datetime) -> int:
    """Mail whose mailbox was deleted cannot be sent by anyone: failed."""
    return OutboxMessage.objects.filter(
        kind=OutboxMessage.Kind.MAIL, mailbox__isnull=True, state__in=[State.QUEUED, State.HELD]
    ).update(state=State.FAILED, error_code="mailbox_deleted", finished_at=now, payload=None)


def _gate(mailbox: Mailbox, now: datetime) -> int:
    """How many of ``mailbox``'s messages may be claimed now (with its row
    locked). Holds or defers its due messages when none may."""
    if mailbox.status != Mailbox.Status.ACTIVE:
        code = MAILBOX_HOLD_CODES.get(mailbox.status, "mailbox_unavailable")
        _hold_mailbox(mailbox, code, f"{code}: {mailbox.revocation_reason}", now)
        return 0
    if mailbox.sending_paused_until and mailbox.sending_paused_until > now:
        _defer(mailbox.pk, mailbox.sending_paused_until, "paused", now)
        return 0
    try:
        provider = get_mailbox_provider(mailbox)
    except ProviderChangedError:
        _hold_mailbox(mailbox, "provider_changed", "provider_changed: provider reconfigured", now)
        return 0
    except MailgovConfigurationError:
        _hold_mailbox(mailbox, "provider_not_configured", "provider_not_configured", now)
        return 0
    quota = quota_for(provider)
    in_flight = OutboxMessage.objects.filter(
        mailbox=mailbox, state=State.SENDING, lease_expires_at__gt=now
    )
    claims = in_flight.values("claim_id").distinct().count()
    if claims >= quota.concurrency:
        return 0  # the provider's connection limit: the next claim will do
    allow = allowance(mailbox, quota, now)
    allowed = 1 << 30
    if allow.messages is not None:
        allowed = allow.messages - in_flight.count()
    if allowed <= 0 or allow.recipients == 0:
        if allow.opens_at is not None:
            _defer(mailbox.pk, allow.opens_at, "quota", now)
        return 0
    mailbox._recipients_left = allow.recipients
    return allowed


#: How long a message that does not fit the recipients left today waits.
RECIPIENT_QUOTA_RECHECK_SECONDS = 900


def _take(
    queryset,
    limit: int,
    worker: str,
    kind: str,
    mailbox: Mailbox | None,
    now: datetime,
    *,
    recipients_left: int | None = None,
) -> Claim | None:
    if connection.features.has_select_for_update_skip_locked:
        queryset = queryset.select_for_update(skip_locked=True, of=("self",))
    picked = list(queryset.values_list("pk", "recipient_count")[:limit])
    if recipients_left is not None:
        kept, total = [], 0
        for pk, count in picked:
            if total + count > recipients_left:
                break
            kept.append((pk, count))
            total += count
        if picked and not kept:
            # The next message has more recipients than the day still allows:
            # look again later, when earlier sends have left the window.
            until = now + timedelta(seconds=RECIPIENT_QUOTA_RECHECK_SECONDS)
            _defer(mailbox.pk, until, "quota_recipients", now)
        picked = kept
    if not picked:
        return None
    claim_id = uuid.uuid4()
    lease = now + timedelta(seconds=mailgov_settings.OUTBOX_LEASE_SECONDS)
    taken = OutboxMessage.objects.filter(pk__in=[pk for pk, _ in picked], state=State.QUEUED)
    if not taken.update(
        state=State.SENDING,
        claim_id=claim_id,
        claimed_by=worker[:200],
        lease_expires_at=lease,
        attempts=F("attempts") + 1,
    ):
        return None
    rows = list(
        OutboxMessage.objects.filter(claim_id=claim_id, state=State.SENDING).order_by(
            "next_attempt_at", "created_at"
        )
    )
    OutboxAttempt.objects.bulk_create(
        OutboxAttempt(message=row, claim_id=claim_id, worker=worker[:200], started_at=now)
        for row in rows
    )
    return Claim(claim_id, worker, kind, mailbox, rows)


# -- outcomes -------------------------------------------------------------------


def _record(batch: _Batch, row: OutboxMessage, verdict: Verdict) -> None:
    """Write ``verdict`` to ``row`` and its attempt, in one transaction.

    Only while the row is still this claim's: a row that recovery took back
    (lease expired) but this worker did send is still marked sent.
    """
    now = batch.now_fn()
    claim = batch.claim
    fields: dict[str, Any] = {
        "lease_expires_at": None,
        "error_code": verdict.error_code[:64],
        "reply_code": verdict.reply_code,
    }
    outcome = verdict.outcome
    if outcome == Outcome.SENT:
        fields.update(state=State.SENT, sent_at=now, finished_at=now, payload=None)
    elif outcome == Outcome.RETRY:
        failures = row.failures + 1
        if failures >= int(mailgov_settings.OUTBOX_MAX_ATTEMPTS):
            outcome = Outcome.FAILED
            fields.update(state=State.FAILED, finished_at=now, failures=failures)
            fields["error_code"] = f"gave_up:{verdict.error_code}"[:64]
        else:
            fields.update(
                state=State.QUEUED, failures=failures, next_attempt_at=backoff(failures, now)
            )
    elif outcome == Outcome.DEFERRED:
        fields.update(state=State.QUEUED, next_attempt_at=verdict.pause_until or now)
    elif outcome == Outcome.FAILED:
        fields.update(state=State.FAILED, finished_at=now)
    elif outcome == Outcome.HELD:
        fields.update(state=State.HELD, finished_at=now, held_reason=verdict.held_reason[:255])
    elif outcome == Outcome.CANCELLED:
        fields.update(state=State.CANCELLED, finished_at=now, payload=None)
    with transaction.atomic():
        OutboxMessage.objects.filter(pk=row.pk, claim_id=claim.claim_id).exclude(
            state__in=[State.SENT, State.CANCELLED]
        ).update(**fields)
        OutboxAttempt.objects.filter(message_id=row.pk, claim_id=claim.claim_id).update(
            outcome=outcome,
            finished_at=now,
            reply_code=verdict.reply_code,
            error_code=fields["error_code"],
        )
    batch.done.add(row.pk)
    batch.counts[outcome] = batch.counts.get(outcome, 0) + 1


# -- sending ----------------------------------------------------------------------


def _open_payload(row: OutboxMessage) -> dict[str, Any]:
    payload = json.loads(row.payload)
    if not isinstance(payload, dict):
        raise DecryptionError(f"Outbox message {row.pk}: the payload is not an envelope.")
    return payload


def send_claim(claim: Claim, *, now_fn: Any = timezone.now) -> dict[str, int]:
    """Send the claimed messages and record every outcome; return counts by outcome."""
    batch = _Batch(claim, now_fn)
    if claim.kind == OutboxMessage.Kind.NOTIFICATION:
        from mailgov.notifications import send_notices

        send_notices(claim, lambda row, verdict: _record(batch, row, verdict))
        return batch.counts
    mailbox = claim.mailbox
    items: list[PreparedMessage] = []
    for row in claim.rows:
        try:
            payload = _open_payload(row)
        except (DecryptionError, ValueError, TypeError) as exc:
            # The key was removed, or the row was tampered with: this row
            # fails, named; the others go on.
            logger.error("outbox message %s cannot be opened: %s", row.pk, type(exc).__name__)
            _record(batch, row, Verdict(Outcome.FAILED, "decryption_failed"))
            continue
        items.append(
            PreparedMessage(
                message=None,
                address=mailbox.address.lower(),
                from_addr=payload["from"],
                recipients=list(payload["to"]),
                data=payload["data"].encode("latin-1"),
                message_id=row.message_id,
                ref=row,
            )
        )
    if not items:
        return batch.counts
    try:
        batch.provider_type = get_mailbox_provider(mailbox).type
    except (MailgovConfigurationError, MailboxUnavailableError) as exc:
        for item in items:
            _record(batch, item.ref, classify(exc, "", now_fn()))
        return batch.counts
    pause: list[Verdict] = []

    def on_result(item: PreparedMessage, error: BaseException | None, refused: dict) -> None:
        row = item.ref
        if row.pk in batch.done:
            return
        if error is None:
            code = "partly_refused" if refused else ""
            _record(batch, row, Verdict(Outcome.SENT, code, 250))
            return
        verdict = classify(error, batch.provider_type, now_fn())
        _record(batch, row, verdict)
        if verdict.outcome == Outcome.DEFERRED:
            pause.append(verdict)
            raise _StopBatch

    from mailgov.backends.smtp import EmailBackend

    backend = EmailBackend(mailbox=mailbox, fail_silently=True)
    try:
        backend.send_prepared(mailbox, items, on_result)
    except _StopBatch:
        pass
    except DatabaseError:
        # The outcome could not be written: the rows stay claimed until their
        # lease expires, then they are retried (at least once).
        logger.exception("outbox batch %s: outcome not recorded", claim.claim_id)
        raise
    except Exception as exc:
        # Raised after on_result saw every message it concerns; anything
        # left unrecorded is classified by the same error.
        for item in items:
            if item.ref.pk not in batch.done:
                _record(batch, item.ref, classify(exc, batch.provider_type, now_fn()))
    if pause:
        _pause(batch, pause[0])
    for item in items:
        if item.ref.pk not in batch.done:
            # Not attempted (the batch stopped): back to the queue, no failure counted.
            until = pause[0].pause_until if pause else now_fn()
            _record(batch, item.ref, Verdict(Outcome.DEFERRED, "not_attempted", None, until))
    return batch.counts


def _pause(batch: _Batch, verdict: Verdict) -> None:
    """A throttling reply: the mailbox sends nothing until ``pause_until``."""
    mailbox = batch.claim.mailbox
    Mailbox.objects.filter(pk=mailbox.pk).update(
        sending_paused_until=verdict.pause_until,
        sending_paused_reason=f"{verdict.error_code}: reply {verdict.reply_code}"[:255],
    )
    _defer(mailbox.pk, verdict.pause_until, "paused", batch.now_fn())
    logger.warning(
        "mailbox %s: sending paused until %s (%s)",
        mailbox.pk,
        verdict.pause_until.isoformat(),
        verdict.error_code,
    )


def deliver(
    *,
    worker: str | None = None,
    mailbox_id: Any = None,
    kind: str = OutboxMessage.Kind.MAIL,
    max_batches: int | None = None,
    now_fn: Any = timezone.now,
) -> dict[str, int]:
    """Claim and send due batches (of ``mailbox_id``) until none is left (or
    ``max_batches``); return counts by outcome. What a worker task runs."""
    worker = worker or worker_name()
    totals: dict[str, int] = {}
    batches = 0
    while max_batches is None or batches < max_batches:
        claim = claim_batch(worker, mailbox_id=mailbox_id, kind=kind, now=now_fn())
        if claim is None:
            break
        batches += 1
        for outcome, count in send_claim(claim, now_fn=now_fn).items():
            totals[outcome] = totals.get(outcome, 0) + count
    return totals
