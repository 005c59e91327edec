"""Workers' side of the outbox: send claimed messages, record each outcome.

A worker claims a batch (:func:`mailgov.claims.claim_batch`), then
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
import select
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from mailgov.backends.smtp import TRANSPORT_ERRORS
from mailgov.claims import Claim, _defer, _due, claim_batch, may_hold_connection, worker_name
from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    DecryptionError,
    MailboxUnavailableError,
    MailgovConfigurationError,
)
from mailgov.models import KeptConnection, Mailbox, OutboxAttempt, OutboxMessage
from mailgov.outcomes import Verdict, backoff, classify
from mailgov.providers import get_mailbox_provider
from mailgov.validation import PreparedMessage

logger = logging.getLogger("mailgov.outbox")

State = OutboxMessage.State
Outcome = OutboxAttempt.Outcome

__all__ = ["Claim", "claim_batch", "close_kept", "deliver", "send_claim", "worker_name"]


@dataclass
class _Batch:
    claim: Claim
    now_fn: Any
    done: set[uuid.UUID] = field(default_factory=set)
    # Sent in this batch, attempt rows not yet finished: pk -> when.
    sent: dict[uuid.UUID, datetime] = field(default_factory=dict)

    @property
    def claim_db_id(self) -> Any:
        """The claim's id as the database takes it (computed once a batch)."""
        value = self.__dict__.get("_claim_db_id")
        if value is None:
            field_ = OutboxMessage._meta.get_field("claim_id")
            value = self.__dict__["_claim_db_id"] = field_.get_db_prep_value(
                self.claim.claim_id, connection
            )
        return value

    counts: dict[str, int] = field(default_factory=dict)
    provider_type: str = ""


class _StopBatch(Exception):
    """Raised from the result callback to stop sending the rest of a batch."""


# -- outcomes -------------------------------------------------------------------


def _mark_sent_sql(conn: Any) -> str:
    """``UPDATE`` marking one claimed row sent: the hot path, one statement a
    message (the ORM's update() costs three times as much to build as to run).
    Names quoted by the connection; values passed as parameters."""
    sql = _MARK_SENT_SQL.get(conn.vendor)
    if sql is None:
        meta = OutboxMessage._meta
        q = conn.ops.quote_name
        columns = {name: q(meta.get_field(name).column) for name in _MARK_SENT_FIELDS}
        sets = ", ".join(
            f"{columns[name]} = %s" for name in _MARK_SENT_FIELDS if name not in ("id", "claim_id")
        )
        # Only quoted names from the model's own metadata go into the text.
        # The lease stays until the batch's send log is written
        # (_finish_sent): until then the quota counts the message here.
        sql = (
            f"UPDATE {q(meta.db_table)} SET {sets}, "  # noqa: S608
            f"{q(meta.get_field('payload').column)} = NULL WHERE {columns['id']} = %s "
            f"AND {columns['claim_id']} = %s AND {columns['state']} NOT IN (%s, %s)"
        )
        _MARK_SENT_SQL[conn.vendor] = sql
    return sql


_MARK_SENT_FIELDS = (
    "state",
    "sent_at",
    "finished_at",
    "error_code",
    "reply_code",
    "id",
    "claim_id",
)
_MARK_SENT_SQL: dict[str, str] = {}


def _mark_sent(batch: _Batch, row: OutboxMessage, verdict: Verdict) -> None:
    """Mark ``row`` sent with one statement, at once (a worker killed after
    this cannot send it again). Its attempt row is finished with the batch's
    (:func:`_finish_sent_attempts`)."""
    now = batch.now_fn()
    meta = OutboxMessage._meta
    when = meta.get_field("sent_at").get_db_prep_value(now, connection)
    params = [
        State.SENT,
        when,
        when,
        verdict.error_code[:64],
        verdict.reply_code,
        meta.pk.get_db_prep_value(row.pk, connection),
        batch.claim_db_id,
        State.SENT,
        State.CANCELLED,
    ]
    with connection.cursor() as cursor:
        cursor.execute(_mark_sent_sql(connection), params)
    batch.done.add(row.pk)
    batch.sent[row.pk] = now
    batch.counts[Outcome.SENT] = batch.counts.get(Outcome.SENT, 0) + 1


def _finish_sent_attempts(batch: _Batch) -> None:
    """Once the batch's send log is written: finish the attempt rows of the
    messages it sent and end their leases (the quota now counts them in the
    send log). If the worker dies before this, recovery finishes the
    attempts, and the leases run out."""
    if not batch.sent:
        return
    sent = list(batch.sent)
    OutboxAttempt.objects.filter(
        claim_id=batch.claim.claim_id, message_id__in=sent, outcome=Outcome.STARTED
    ).update(outcome=Outcome.SENT, finished_at=max(batch.sent.values()), reply_code=250)
    OutboxMessage.objects.filter(
        pk__in=sent, claim_id=batch.claim.claim_id, state=State.SENT
    ).update(lease_expires_at=None)
    batch.sent.clear()


def _record(batch: _Batch, row: OutboxMessage, verdict: Verdict) -> None:
    """Write ``verdict`` to ``row`` and its attempt, in one transaction.

    Only while the row is still this claim's: a row that recovery took back
    (lease expired) but this worker did send is still marked sent.
    """
    if verdict.outcome == Outcome.SENT and verdict.error_code == "":
        _mark_sent(batch, row, verdict)
        return
    now = batch.now_fn()
    claim = batch.claim
    fields: dict[str, Any] = {
        "error_code": verdict.error_code[:64],
        "reply_code": verdict.reply_code,
    }
    outcome = verdict.outcome
    if outcome != Outcome.SENT:
        # No longer in flight. A message sent (to some recipients only:
        # partly_refused) keeps its lease, as _mark_sent's do, until the
        # batch's send log is written (_finish_sent_attempts): until then
        # the quota counts it by its lease.
        fields["lease_expires_at"] = None
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
        # Its body was deleted while this worker held it (an erasure of the
        # owner's data): it can never be sent, so it is not kept waiting (a
        # held row without a body is never released).
        if outcome in (Outcome.RETRY, Outcome.DEFERRED, Outcome.HELD) and (
            OutboxMessage.objects.filter(
                pk=row.pk, state__in=[State.QUEUED, State.HELD], payload__isnull=True
            ).update(state=State.FAILED, error_code="body_deleted", finished_at=now)
        ):
            outcome = Outcome.FAILED
            fields["error_code"] = "body_deleted"
        OutboxAttempt.objects.filter(message_id=row.pk, claim_id=claim.claim_id).update(
            outcome=outcome,
            finished_at=now,
            reply_code=verdict.reply_code,
            error_code=fields["error_code"],
        )
    batch.done.add(row.pk)
    if outcome == Outcome.SENT:
        batch.sent[row.pk] = now
    batch.counts[outcome] = batch.counts.get(outcome, 0) + 1


# -- sending ----------------------------------------------------------------------


def _open_payload(row: OutboxMessage) -> dict[str, Any]:
    payload = json.loads(row.payload)
    if not isinstance(payload, dict):
        raise DecryptionError(f"Outbox message {row.pk}: the payload is not an envelope.")
    return payload


def send_claim(claim: Claim, *, now_fn: Any = timezone.now, backend: Any = None) -> dict[str, int]:
    """Send the claimed messages and record every outcome; return counts by outcome.

    ``backend`` (a :class:`mailgov.backends.smtp.EmailBackend` for the claim's
    mailbox with ``keep_connection``) lets consecutive batches of one mailbox
    share one authenticated connection; by default each batch opens its own.

    A backend with ``keep_connection`` has its connection recorded as held by
    ``claim.worker`` (a :class:`KeptConnection` row) from before the batch's
    first byte until it is closed, busy or idle, so that it counts against
    the provider's connection limit once the batch's leases have ended. After
    the batch the connection stays open only if the batch sent every message
    and the connection has time left (:meth:`ConnectionPool.keep_until`);
    else it is closed and its row deleted. The caller closes a connection it
    keeps with :func:`close_kept` (or gives it to :data:`POOL`).

    Messages the batch did not attempt (a lost connection, a pause, the
    lease's deadline) go back to the queue with no failure counted.
    """
    batch = _Batch(claim, now_fn)
    if claim.kind == OutboxMessage.Kind.NOTIFICATION:
        from mailgov.notifications import send_notices

        send_notices(claim, lambda row, verdict: _record(batch, row, verdict))
        return batch.counts
    mailbox = claim.mailbox
    items: list[PreparedMessage] = []
    for row in claim.rows:
        try:
            # Reading the field decrypts it: inside the try.
            payload = None if row.payload is None else _open_payload(row)
        except (DecryptionError, ValueError, TypeError) as exc:
            # The key was removed, or the row was tampered with: this row
            # fails, named; the others go on.
            logger.error("outbox message %s cannot be opened: %s", row.pk, type(exc).__name__)
            _record(batch, row, Verdict(Outcome.FAILED, "decryption_failed"))
            continue
        if payload is None:
            # Deleted while a worker held the row (an erasure of its owner's
            # data does that to a message being sent): nothing left to send.
            logger.warning("outbox message %s has no body any more: failed", row.pk)
            _record(batch, row, Verdict(Outcome.FAILED, "body_deleted"))
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
    kept = backend is not None and backend.keep_connection
    if backend is None:
        backend = smtp_backend(mailbox)
    if kept:
        # Before any I/O, for at least the claim's lease: once the batch's
        # leases end (_finish_sent_attempts), this row alone counts the
        # connection that stays open. Unwritten, the claim still counts the
        # connection while the batch runs, and _settle() closes it after the
        # batch unless its row can be written then.
        try:
            _record_kept(mailbox.pk, claim.worker, float(mailgov_settings.OUTBOX_LEASE_SECONDS))
        except DatabaseError:
            logger.warning("connection of mailbox %s not recorded before its batch", mailbox.pk)
    # Stop well inside the lease: a row whose lease ran out may be claimed
    # and sent by another worker, so this one must not send it any more.
    deadline = time.monotonic() + float(mailgov_settings.OUTBOX_LEASE_SECONDS) / 2

    def on_result(item: PreparedMessage, error: BaseException | None, refused: dict) -> None:
        row = item.ref
        if row.pk in batch.done:
            return
        if error is None:
            code = "partly_refused" if refused else ""
            _record(batch, row, Verdict(Outcome.SENT, code, 250))
            if refused:
                _requeue_refused(batch, item, refused)
        else:
            verdict = classify(error, batch.provider_type, now_fn())
            if backend.failed_at_open and verdict.outcome == Outcome.RETRY:
                # No connection at all (server or token endpoint down): the
                # mailbox waits, and its messages lose no attempt, so that an
                # outage of hours fails nothing.
                verdict = Verdict(
                    Outcome.DEFERRED,
                    verdict.error_code,
                    verdict.reply_code,
                    pause_until=backoff(1, now_fn()),
                )
            _record(batch, row, verdict)
            if verdict.outcome == Outcome.DEFERRED:
                pause.append(verdict)
                raise _StopBatch
        if time.monotonic() > deadline:
            raise _StopBatch

    try:
        backend.send_prepared(mailbox, items, on_result)
        _finish_sent_attempts(batch)
    except _StopBatch:
        _finish_sent_attempts(batch)
        if pause:
            # Throttled (the server may have closed it) or not connected:
            # the next batch, after the pause, opens a fresh connection.
            backend.close()
    except DatabaseError:
        # The outcome could not be written: the rows stay claimed until their
        # lease expires, then they are retried (at least once).
        logger.exception("outbox batch %s: outcome not recorded", claim.claim_id)
        raise
    except Exception as exc:
        _finish_sent_attempts(batch)
        # Raised after on_result saw every message it concerns. A transport
        # error (a lost connection, a refusal) concerns no message after the
        # one in flight: those were not attempted (below). Anything else (a
        # pre_send receiver's bug) is charged to what is left, so that it
        # cannot hold the rows back forever.
        if not isinstance(exc, TRANSPORT_ERRORS):
            for item in items:
                if item.ref.pk not in batch.done:
                    _record(batch, item.ref, classify(exc, batch.provider_type, now_fn()))
    for item in items:
        if item.ref.pk not in batch.done:
            # Not attempted (the batch stopped, or the connection was lost
            # before it): back to the queue, no failure counted, no send log.
            until = pause[0].pause_until if pause else now_fn()
            _record(batch, item.ref, Verdict(Outcome.DEFERRED, "not_attempted", None, until))
    # After every row of the batch is back in the queue: whoever sees the
    # mailbox paused sees none of its messages still being sent.
    if pause and pause[0].pause_until is not None:
        _pause(batch, pause[0])
    if kept:
        _settle(backend, claim.worker, clean=set(batch.counts) <= {Outcome.SENT})
    return batch.counts


def _requeue_refused(batch: _Batch, item: PreparedMessage, refused: dict[str, Any]) -> None:
    """The server took a message for some recipients and refused others for
    now (4xx): a new queued row, with the same Message-ID, for those only.
    Recipients refused for good (5xx) are not retried; the row counts them."""
    later = [rcpt for rcpt, (code, _text) in refused.items() if 400 <= code < 500]
    if not later:
        return
    from mailgov.outbox import _insert, envelope

    row = item.ref
    now = batch.now_fn()
    retry = OutboxMessage(
        mailbox=batch.claim.mailbox,
        message_id=row.message_id,
        recipient_count=len(later),
        failures=row.failures + 1,
        next_attempt_at=backoff(row.failures + 1, now),
        created_at=now,
        error_code="recipients_deferred",
    )
    retry.payload = envelope(
        PreparedMessage(None, item.address, item.from_addr, later, item.data, row.message_id)
    )
    _insert([retry])
    logger.info("outbox message %s: %d recipient(s) deferred to %s", row.pk, len(later), retry.pk)


def _pause(batch: _Batch, verdict: Verdict) -> None:
    """A throttling reply: the mailbox sends nothing until ``pause_until``
    (a shorter pause never cuts a longer one short)."""
    mailbox = batch.claim.mailbox
    Mailbox.objects.filter(pk=mailbox.pk).filter(
        Q(sending_paused_until__isnull=True) | Q(sending_paused_until__lt=verdict.pause_until)
    ).update(
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
    fan_out: Callable[[list[str]], Any] | None = None,
) -> dict[str, int]:
    """Claim and send due batches (of ``mailbox_id``) until none is left (or
    ``max_batches``); return counts by outcome. What a worker task runs.

    ``fan_out(mailbox_ids)`` (the task passes :func:`mailgov.outbox.publish`)
    is called once, after the first claim, when the mailbox has more due
    messages: another worker then sends its next batch beside this one, over
    a connection of its own, up to the provider's connection limit
    (``Quota.concurrency``), which each claim enforces.

    Each mailbox's batches go over one authenticated connection, taken from
    and given back to this thread's :data:`POOL`, so that the next run (the
    next task) for the mailbox reuses it while it is fresh. Open, it counts
    against the provider's connection limit under ``worker``'s name for its
    whole life, busy or idle (:func:`send_claim`, :class:`ConnectionPool`).
    """
    worker = worker or worker_name()
    totals: dict[str, int] = {}
    batches = 0
    backends: dict[Any, Any] = {}
    finished = False
    try:
        while max_batches is None or batches < max_batches:
            claim = claim_batch(worker, mailbox_id=mailbox_id, kind=kind, now=now_fn())
            if claim is None:
                if mailbox_id is not None:
                    # No room, perhaps because other holders fill the
                    # provider's connection limit: a connection this thread
                    # idles for the mailbox must not stay open on top.
                    POOL.release_surplus(mailbox_id)
                break
            batches += 1
            _fan_out(claim, batches, kind, fan_out, now_fn)
            backend = _backend_for(backends, claim)
            # Any error (a refusal, a lost connection, a pause) closes the
            # connection (send_claim): the next batch gets a fresh one,
            # never a doubtful one.
            counts = send_claim(claim, now_fn=now_fn, backend=backend)
            for outcome, count in counts.items():
                totals[outcome] = totals.get(outcome, 0) + count
        finished = True
    finally:
        # The loop ended on a claim that found nothing to take (or at
        # max_batches): each connection is kept for the next run if it may
        # be (give_back: among other things, only while it fits the
        # provider's connection limit beside the other holders').
        for backend in backends.values():
            if finished:
                POOL.give_back(backend, worker)
            else:  # an exception: nothing doubtful is kept
                close_kept(backend, worker)
    return totals


def smtp_backend(mailbox: Mailbox, *, keep_connection: bool = False) -> Any:
    """The SMTP backend a worker sends ``mailbox``'s batches with."""
    from mailgov.backends.smtp import EmailBackend

    backend = EmailBackend(mailbox=mailbox, fail_silently=True)
    backend.keep_connection = keep_connection
    return backend


def _backend_for(backends: dict[Any, Any], claim: Claim) -> Any:
    """One backend per mailbox within a deliver() run, taken from the pool
    (with its connection, if one was kept); a connection past its time
    (:meth:`ConnectionPool.keep_until`) is closed and the next batch reopens
    it, with a token checked afresh."""
    if claim.mailbox is None:
        return None
    backend = backends.get(claim.mailbox.pk)
    if backend is None:
        backend = backends[claim.mailbox.pk] = POOL.take(claim.mailbox, claim.worker)
    elif backend.connection is not None and POOL.keep_until(backend) is None:
        close_kept(backend, claim.worker)
    return backend


def _settle(backend: Any, worker: str, *, clean: bool) -> None:
    """After a batch over a kept connection: keep it open, recorded until
    its time is up, if the batch was ``clean`` (every message sent) and it
    has time left; else close it and delete its row."""
    until = POOL.keep_until(backend) if clean else None
    if until is None:
        close_kept(backend, worker)
        return
    _keep_recorded(backend, worker, until)


def close_kept(backend: Any, worker: str) -> None:
    """Close ``backend``'s connection and delete ``worker``'s
    :class:`KeptConnection` row of its mailbox: the connection no longer
    counts against the provider's limit."""
    backend.close()
    mailbox_pk = getattr(backend.mailbox, "pk", backend.mailbox)
    if mailbox_pk is not None:
        _unrecord(mailbox_pk, worker)


def _keep_recorded(backend: Any, worker: str, until: float) -> bool:
    """Record ``backend``'s open connection as ``worker``'s until ``until``
    (``time.monotonic()``); if the row cannot be written, close the
    connection rather than leave it uncounted. Whether it is still open."""
    mailbox_pk = getattr(backend.mailbox, "pk", backend.mailbox)
    try:
        _record_kept(mailbox_pk, worker, until - time.monotonic())
    except DatabaseError:
        logger.warning("kept connection of mailbox %s not recorded: closed", mailbox_pk)
        close_kept(backend, worker)
        return False
    return True


@dataclass
class _Kept:
    backend: Any
    until: float  # time.monotonic()
    worker: str  # its KeptConnection row's holder


class ConnectionPool:
    """Authenticated SMTP connections a worker keeps open between its runs.

    A worker that has sent a mailbox's batch keeps the connection for
    ``MAILGOV_SMTP_IDLE_SECONDS`` (0: never), so that the next task for the
    mailbox in the same thread skips TCP, EHLO, STARTTLS, the TLS handshake,
    EHLO and AUTH (six round trips or more). The contract:

    * Per thread: a connection is only ever given back to, and taken by, the
      thread that opened it (entries are keyed by the thread's identity,
      whatever ``worker`` name the caller gives). smtplib connections are not
      thread-safe.
    * Closed, never reused: after its idle time; past
      :data:`CONNECTION_MAX_AGE_SECONDS` since it was opened; within the
      refresh margin of the expiry of the token it authenticated with; after
      any batch that did not send every message; when the server spoke while
      it idled (a 421 idle timeout, a close); at worker shutdown
      (:meth:`close_all`, on Celery's ``worker_process_shutdown`` and
      ``worker_shutdown``, i.e. SIGTERM).
    * A timer thread closes connections whose time is up, so an idle worker
      holds no session open. It touches only connections no thread has taken.
    * An open connection is recorded in :class:`mailgov.models.KeptConnection`
      for its whole life, busy or idle (written before its first batch,
      refreshed after each, deleted when it is closed, left to expire when
      the timer closes it or the worker dies), and counts against the
      provider's connection limit as the provider counts it: one per holder
      (:func:`mailgov.claims.other_holders`). A connection that no longer
      fits the limit when it would go idle is closed instead
      (:meth:`give_back`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[int, Any], _Kept] = {}
        self._timer: threading.Timer | None = None
        self._timer_at = 0.0

    # -- for deliver() -----------------------------------------------------
    def take(self, mailbox: Mailbox, worker: str) -> Any:
        """A backend for ``mailbox`` (for ``worker``, who holds a claim of
        it): the one this thread kept, if still good, else a new one (which
        opens its connection on first use)."""
        with self._lock:
            kept = self._idle.pop((threading.get_ident(), mailbox.pk), None)
        if kept is None:
            return smtp_backend(mailbox, keep_connection=True)
        backend = kept.backend
        if kept.until > time.monotonic() and _quiet(backend):
            if kept.worker != worker:
                # Kept under another name: ``worker``'s claim counts it now,
                # and its row is written before the batch (send_claim).
                _unrecord(mailbox.pk, kept.worker)
            return backend
        close_kept(backend, kept.worker)
        return smtp_backend(mailbox, keep_connection=True)

    def give_back(self, backend: Any, worker: str) -> None:
        """Keep ``backend``'s connection for this thread's next run, or close it.

        Closed when its time is up, and when other holders already fill the
        provider's connection limit (:func:`mailgov.claims.may_hold_connection`):
        idle on top of the limit, it would be the connection too many.
        """
        until = self.keep_until(backend)
        mailbox = backend._connected_mailbox
        if until is None or mailbox is None or not _fits(mailbox, worker):
            close_kept(backend, worker)
            return
        if not _keep_recorded(backend, worker, until):
            return
        key = (threading.get_ident(), mailbox.pk)
        with self._lock:
            previous = self._idle.pop(key, None)
            self._idle[key] = _Kept(backend, until, worker)
            self._schedule(until)
        if previous is not None and previous.backend is not backend:
            previous.backend.close()

    def release_surplus(self, mailbox_id: Any) -> bool:
        """Close this thread's idle connection of ``mailbox_id``, if it keeps
        one, when it no longer fits the provider's connection limit beside
        the other holders' (:func:`mailgov.claims.may_hold_connection`);
        whether one was closed. For a claim of the mailbox that found no
        room: the connection it would have used must not idle on top of the
        limit."""
        key = (threading.get_ident(), Mailbox._meta.pk.to_python(mailbox_id))
        with self._lock:
            kept = self._idle.get(key)
        if kept is None or _fits(kept.backend.mailbox, kept.worker):
            return False
        with self._lock:
            if self._idle.get(key) is not kept:  # the timer closed it meanwhile
                return False
            del self._idle[key]
        close_kept(kept.backend, kept.worker)
        return True

    @staticmethod
    def keep_until(backend: Any) -> float | None:
        """Until when (``time.monotonic()``) ``backend``'s connection may idle;
        ``None`` if it must close now."""
        idle = float(mailgov_settings.SMTP_IDLE_SECONDS)
        if idle <= 0 or backend.connection is None or backend.connected_at is None:
            return None
        now = time.monotonic()
        until = min(now + idle, backend.connected_at + CONNECTION_MAX_AGE_SECONDS)
        if backend.token_expires_at is not None:
            left = (backend.token_expires_at - timezone.now()).total_seconds()
            until = min(until, now + left - float(mailgov_settings.TOKEN_REFRESH_MARGIN_SECONDS))
        return until if until > now else None

    # -- housekeeping ------------------------------------------------------
    def reap(self) -> int:
        """Close the connections whose time is up; return how many."""
        now = time.monotonic()
        with self._lock:
            done = [key for key, kept in self._idle.items() if kept.until <= now]
            expired = [self._idle.pop(key) for key in done]
            self._timer = None
            if self._idle:
                self._schedule(min(kept.until for kept in self._idle.values()))
        for kept in expired:
            kept.backend.close()
        return len(expired)

    def close_all(self, **_signal_kwargs: Any) -> int:
        """Close every kept connection (worker shutdown, SIGTERM); return how many."""
        with self._lock:
            kept = dict(self._idle)
            self._idle.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for (_thread, mailbox_pk), item in kept.items():
            item.backend.close()
            _unrecord(mailbox_pk, item.worker)
        return len(kept)

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)

    def _schedule(self, until: float) -> None:
        """Have the timer run at ``until`` at the latest (lock held)."""
        if self._timer is not None and self._timer_at <= until:
            return
        if self._timer is not None:
            self._timer.cancel()
        timer = threading.Timer(max(0.0, until - time.monotonic()) + 0.01, self.reap)
        timer.daemon = True
        timer.name = "mailgov-smtp-reaper"
        self._timer, self._timer_at = timer, until
        timer.start()


def _quiet(backend: Any) -> bool:
    """Whether a kept connection heard nothing from the server while it idled.

    A server that timed the session out sent a 421 or closed it: its socket
    is readable (or TLS holds unread bytes). One ``select()`` with no wait
    finds out, where a NOOP would cost a round trip. What it cannot see (a
    close landing just after it looked, a link dropped without a word) the
    backend handles: the first message meets the dead connection before the
    server answered ``MAIL FROM``, and goes over a new connection instead.
    """
    sock = getattr(backend.connection, "sock", None)
    if sock is None:
        return False
    try:
        if hasattr(sock, "pending") and sock.pending():
            return False
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _fits(mailbox: Mailbox, worker: str) -> bool:
    """:func:`mailgov.claims.may_hold_connection`; ``False`` if the database
    cannot tell (a connection that might be one too many is closed)."""
    try:
        return may_hold_connection(mailbox, worker)
    except DatabaseError:
        return False


def _record_kept(mailbox_pk: Any, worker: str, seconds: float) -> None:
    """Record (or extend) ``worker``'s open connection of the mailbox: its
    :class:`KeptConnection` row counts it until ``seconds`` from now, plus
    :data:`KEPT_ROW_GRACE_SECONDS`. One ``UPDATE`` a batch once the row
    exists; rows of the mailbox past their time are deleted when one is
    created."""
    now = timezone.now()
    holder = worker[:200]
    expires = now + timedelta(seconds=seconds + KEPT_ROW_GRACE_SECONDS)
    if KeptConnection.objects.filter(mailbox_id=mailbox_pk, holder=holder).update(
        expires_at=expires
    ):
        return
    KeptConnection.objects.filter(mailbox_id=mailbox_pk, expires_at__lte=now).delete()
    KeptConnection.objects.update_or_create(
        mailbox_id=mailbox_pk, holder=holder, defaults={"expires_at": expires}
    )


def _unrecord(mailbox_pk: Any, worker: str) -> None:
    try:
        KeptConnection.objects.filter(mailbox_id=mailbox_pk, holder=worker[:200]).delete()
    except Exception:  # at shutdown too, where the database may be gone
        # The row expires with the connection's time anyway.
        logger.warning("kept connection of mailbox %s not unrecorded", mailbox_pk)


#: How long a :class:`KeptConnection` row outlives the time its connection
#: may stay open: the timer closes a connection a moment after its time
#: (and without touching the database), so the row must count it until then.
KEPT_ROW_GRACE_SECONDS = 1.0


#: The longest a worker uses one SMTP connection, however busy (well inside
#: servers' session limits; the token's own expiry may end it sooner).
CONNECTION_MAX_AGE_SECONDS = 60

#: This process's kept connections (one pool per process, entries per thread).
POOL = ConnectionPool()


def _fan_out(claim: Claim, batches: int, kind: str, fan_out: Any, now_fn: Any) -> None:
    """After the first claim, ask for one more worker if more is due."""
    if (
        fan_out is not None
        and batches == 1
        and claim.mailbox is not None
        and _due(kind, now_fn()).filter(mailbox_id=claim.mailbox.pk).exists()
    ):
        fan_out([str(claim.mailbox.pk)])
