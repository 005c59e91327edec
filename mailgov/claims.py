"""Claiming due outbox messages: the only way a row becomes ``sending``.

A claim (:func:`claim_batch`) takes up to ``MAILGOV_OUTBOX_BATCH_SIZE`` due
messages of one mailbox in one short transaction and commits before any
network I/O:

- the mailbox row is locked (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite's
  ``IMMEDIATE`` transactions serialize every claim), so the quota and the
  provider's connection limit are judged by one claimer at a time;
- the rows are picked with ``SELECT ... FOR UPDATE SKIP LOCKED`` where the
  database has it, and taken with a conditional ``UPDATE ... WHERE state =
  'queued'`` everywhere (read back by the claim's id when another claimer
  took some of them meanwhile): a row is never in two claims;
- each claimed row becomes ``sending`` with a lease and gets an attempt row.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import connection, transaction
from django.db.models import Count, F, Sum
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderChangedError,
)
from mailgov.freeze import block_of
from mailgov.models import KeptConnection, Mailbox, OutboxAttempt, OutboxMessage
from mailgov.outcomes import MAILBOX_HOLD_CODES
from mailgov.providers import get_mailbox_provider
from mailgov.throttling import allowance, quota_for

State = OutboxMessage.State

__all__ = ["Claim", "claim_batch", "may_hold_connection", "other_holders", "worker_name"]


def worker_name() -> str:
    """``host:pid:thread``: who holds a claim or a kept connection, shown on
    its attempts. Distinct for every live thread of the host: ``thread`` is
    the operating system's thread id. (Python's ``threading.get_ident()``
    is a memory address; cut short, two live threads could share a name,
    and then one's kept connection would go uncounted.) The host name is
    cut to 150 characters, so that the whole fits the 200 of the columns
    that store it with the ids intact."""
    return f"{socket.gethostname()[:150]}:{os.getpid()}:{threading.get_native_id()}"


@dataclass
class Claim:
    """Messages of one mailbox (or notices) claimed by one worker."""

    claim_id: uuid.UUID
    worker: str
    kind: str
    mailbox: Mailbox | None
    rows: list[OutboxMessage]


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
            room = _gate(mailbox, now, worker)
            if room is None:
                skip.add(head)
                continue
            claim = _take(
                due.filter(mailbox=mailbox).order_by("next_attempt_at", "created_at"),
                min(batch_size, room.messages),
                worker,
                kind,
                mailbox,
                now,
                room=room,
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


class Room(NamedTuple):
    """What a claim of one mailbox may take now."""

    messages: int
    recipients: int | None  # None: no daily recipient limit
    recipients_per_day: int | None


def _gate(mailbox: Mailbox, now: datetime, worker: str = "") -> Room | None:
    """What may be claimed of ``mailbox``'s messages now (with its row
    locked) by ``worker``; ``None`` when nothing may, after holding or
    deferring its due messages as the reason asks."""
    if mailbox.status != Mailbox.Status.ACTIVE:
        code = MAILBOX_HOLD_CODES.get(mailbox.status, "mailbox_unavailable")
        _hold_mailbox(mailbox, code, f"{code}: {mailbox.revocation_reason}", now)
        return None
    blocked = block_of(mailbox)
    if blocked is not None:
        # An incident's kill switch: held, not sent and not lost. Lifting a
        # freeze queues them again (mailgov.incidents.unfreeze); contained
        # mail goes once its owner reconnects, as for any revoked mailbox.
        incident, how = blocked
        # "frozen" and "contained" are never released by the dispatch sweep:
        # lifting the freeze, or the containment's end, decides.
        _hold_mailbox(mailbox, how, f"{how}: incident #{incident.pk}", now)
        return None
    if mailbox.sending_paused_until and mailbox.sending_paused_until > now:
        _defer(mailbox.pk, mailbox.sending_paused_until, "paused", now)
        return None
    try:
        provider = get_mailbox_provider(mailbox)
    except ProviderChangedError:
        _hold_mailbox(mailbox, "provider_changed", "provider_changed: provider reconfigured", now)
        return None
    except MailgovConfigurationError:
        _hold_mailbox(mailbox, "provider_not_configured", "provider_not_configured", now)
        return None
    try:
        quota = quota_for(provider)
    except MailgovConfigurationError:
        # A bad quota override (mailgov.E015): an operator's matter, held
        # rather than retried in a loop by every worker.
        _hold_mailbox(mailbox, "configuration", "configuration: invalid quota", now)
        return None
    # The provider counts open connections, busy or idle: every other
    # holder's, claiming or keeping one. This worker's own, if open, will
    # carry this claim.
    if other_holders(mailbox, worker, now) >= quota.concurrency:
        return None  # the provider's connection limit: the next claim will do
    # Claims still running: their messages, sent or not, are not in the send
    # log yet (it is written when a batch ends), so they count against the
    # quotas here.
    in_flight = _in_flight(mailbox, now).aggregate(
        messages=Count("pk"), recipients=Sum("recipient_count")
    )
    allow = allowance(mailbox, quota, now)
    allowed = 1 << 30
    if allow.messages is not None:
        allowed = allow.messages - in_flight["messages"]
    recipients = allow.recipients
    if recipients is not None:
        recipients -= in_flight["recipients"] or 0
    if allowed <= 0 or (recipients is not None and recipients <= 0):
        if allow.opens_at is not None:
            _defer(mailbox.pk, allow.opens_at, "quota", now)
        return None
    return Room(allowed, recipients, quota.recipients_per_day)


def _in_flight(mailbox: Mailbox, now: datetime):
    """``mailbox``'s rows claimed and still leased: sending, or sent in a
    batch whose send log is not written yet."""
    return OutboxMessage.objects.filter(
        mailbox=mailbox, state__in=[State.SENDING, State.SENT], lease_expires_at__gt=now
    )


def other_holders(mailbox: Mailbox, worker: str, now: datetime | None = None) -> int:
    """How many holders other than ``worker`` have a connection of ``mailbox``
    open (or may open one) now: the provider's count of its connections.

    A holder (``host:pid:thread``, :func:`worker_name`) is counted once,
    whether it runs a claim (rows leased to it), keeps its connection
    between batches or idles it (a live :class:`KeptConnection` row), or
    all of these at once: one thread sends a mailbox's mail over one
    connection. ``worker`` itself is left out: its own connection, if any,
    is the one its next claim will use. Rows of a worker that died stop
    counting when their lease or ``expires_at`` passes.
    """
    now = now or timezone.now()
    holder = worker[:200]
    # order_by(): no default ordering inside a compound statement.
    claiming = (
        _in_flight(mailbox, now).exclude(claimed_by=holder).order_by().values_list("claimed_by")
    )
    keeping = (
        KeptConnection.objects.filter(mailbox=mailbox, expires_at__gt=now)
        .exclude(holder=holder)
        .order_by()
        .values_list("holder")
    )
    # UNION (not UNION ALL): a holder both claiming and keeping counts once.
    return claiming.union(keeping).count()


def may_hold_connection(mailbox: Mailbox, worker: str, now: datetime | None = None) -> bool:
    """Whether ``worker``'s open connection of ``mailbox`` fits the provider's
    connection limit (``Quota.concurrency``) beside the other holders'.

    ``False`` when the others fill the limit (the limit was lowered, or
    rows expired and others claimed meanwhile) or the mailbox's provider or
    quota cannot be read: the connection must then be closed rather than kept
    idle on top of the limit (Microsoft answers the surplus one with ``432
    4.3.2`` and the mailbox is paused).
    """
    try:
        quota = quota_for(get_mailbox_provider(mailbox))
    except (MailgovConfigurationError, MailboxUnavailableError):
        return False
    return other_holders(mailbox, worker, now) < quota.concurrency


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
    room: Room | None = None,
) -> Claim | None:
    if connection.features.has_select_for_update_skip_locked:
        queryset = queryset.select_for_update(skip_locked=True, of=("self",))
    # Whole rows at once (their payloads stay sealed until sent): no second read.
    picked = list(queryset[:limit])
    if room is not None and room.recipients is not None:
        kept, never, total = [], [], 0
        for row in picked:
            if (
                room.recipients_per_day is not None
                and row.recipient_count > room.recipients_per_day
            ):
                never.append(row.pk)  # no window will ever fit it
                continue
            if total + row.recipient_count > room.recipients:
                break
            kept.append(row)
            total += row.recipient_count
        if never:
            OutboxMessage.objects.filter(pk__in=never, state=State.QUEUED).update(
                state=State.FAILED, error_code="over_daily_recipients", finished_at=now
            )
        if picked and not kept and len(never) < len(picked):
            # The next message has more recipients than the day still allows:
            # look again later, when earlier sends have left the window.
            until = now + timedelta(seconds=RECIPIENT_QUOTA_RECHECK_SECONDS)
            _defer(mailbox.pk, until, "quota_recipients", now)
        picked = kept
    if not picked:
        return None
    claim_id = uuid.uuid4()
    lease = now + timedelta(seconds=mailgov_settings.OUTBOX_LEASE_SECONDS)
    taken = OutboxMessage.objects.filter(pk__in=[row.pk for row in picked], state=State.QUEUED)
    count = taken.update(
        state=State.SENDING,
        claim_id=claim_id,
        claimed_by=worker[:200],
        lease_expires_at=lease,
        attempts=F("attempts") + 1,
    )
    if not count:
        return None
    if count == len(picked):
        rows = picked
        for row in rows:
            row.state, row.claim_id, row.lease_expires_at = State.SENDING, claim_id, lease
            row.claimed_by, row.attempts = worker[:200], row.attempts + 1
    else:
        # Another claimer took some of them meanwhile: ours are those with our id.
        rows = list(
            OutboxMessage.objects.filter(claim_id=claim_id, state=State.SENDING).order_by(
                "next_attempt_at", "created_at"
            )
        )
    _insert_attempts(rows, claim_id, worker[:200], now)
    return Claim(claim_id, worker, kind, mailbox, rows)


def _insert_attempts(rows: list[OutboxMessage], claim_id: uuid.UUID, worker: str, now) -> None:
    """One ``started`` attempt row per claimed message, in one ``executemany``
    (a claim's hot path: ``bulk_create()`` spends ten times longer building
    model instances than the database spends inserting them)."""
    meta = OutboxAttempt._meta
    q = connection.ops.quote_name
    names = ("message", "claim_id", "worker", "started_at", "outcome", "error_code")
    fields = [meta.get_field(name) for name in names]
    prep = {field.name: field for field in fields}
    message_id = prep["message"].target_field
    common = [
        prep["claim_id"].get_db_prep_value(claim_id, connection),
        worker,
        prep["started_at"].get_db_prep_value(now, connection),
        OutboxAttempt.Outcome.STARTED,
        "",
    ]
    sql = "INSERT INTO {} ({}) VALUES ({})".format(  # noqa: S608 (names from the model only)
        q(meta.db_table),
        ", ".join(q(field.column) for field in fields),
        ", ".join(["%s"] * len(fields)),
    )
    with connection.cursor() as cursor:
        cursor.executemany(
            sql, [[message_id.get_db_prep_value(row.pk, connection), *common] for row in rows]
        )
