"""The durable outbox: the database row is the source of truth, never the broker.

States of an :class:`~mailgov.models.OutboxMessage`::

    queued ──claim──> sending ──> sent
      ^                  │  ├──> failed     (5xx reply, gave up, undecryptable)
      │   retry/defer    │  └──> held       (mailbox needs re-consent, suspended,
      └──────────────────┘                   revoked; interrupted with "hold")
    held/failed ──release/retry──> queued;   queued/held/failed ──cancel──> cancelled

- :func:`enqueue` writes one row per message **in the caller's transaction**
  and publishes "work for mailbox X" to the broker once it commits. The
  broker message carries ids only: no body, no address.
- A broker message that was lost (the broker was down, the process died
  right after the commit) costs a delay, not the mail: :func:`dispatch`, run
  by beat, publishes again for every mailbox with due messages, and takes
  back rows whose worker died (:func:`recover_interrupted`).
- Delivery (claims, sending, outcomes) is in :mod:`mailgov.delivery`.

Guarantee: at least once. A worker killed after the server accepted a
message and before it recorded that is retried with the same Message-ID
(mail clients and providers collapse the copies), and the interrupted
attempt is recorded; ``MAILGOV_OUTBOX_ON_INTERRUPTED = "hold"`` holds such
a message for an operator instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, DateTimeField, F, Q, UUIDField
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.exceptions import OutboxStateError
from mailgov.models import Mailbox, OutboxAttempt, OutboxMessage
from mailgov.outcomes import AUTO_RELEASE_CODES
from mailgov.validation import PreparedMessage

logger = logging.getLogger("mailgov.outbox")

State = OutboxMessage.State
Kind = OutboxMessage.Kind

__all__ = [
    "cancel_message",
    "dispatch",
    "enqueue",
    "outbox_status",
    "publish",
    "recover_interrupted",
    "release_held",
    "retry_message",
]

MAX_IDEMPOTENCY_KEY_LENGTH = 200


# -- enqueue ----------------------------------------------------------------------


def envelope(item: PreparedMessage) -> str:
    """The encrypted payload of a mail row: the envelope and the serialized
    message (bytes kept exactly as latin-1 text, which maps each byte to
    one character and back)."""
    return json.dumps(
        {"from": item.from_addr, "to": list(item.recipients), "data": item.data.decode("latin-1")}
    )


def scoped_key(scope: Any, key: str | None) -> str | None:
    return None if key is None else f"{scope}:{key}"


def _converters(conn: Any) -> list[tuple[str, Callable[[Any], Any]]]:
    """(attname, to-database) for every column of an outbox row: the few
    types that need converting (UUIDs, datetimes, the sealed payload), the
    rest as they are."""
    result = []
    for field in OutboxMessage._meta.concrete_fields:
        target = getattr(field, "target_field", field)
        if field.attname == "payload":
            convert = _sealed_text
        elif isinstance(target, UUIDField):
            convert = partial(_uuid_to_db, target, conn)
        elif isinstance(field, DateTimeField):
            convert = conn.ops.adapt_datetimefield_value
        else:
            convert = _as_is
        result.append((field.attname, convert))
    return result


def _as_is(value: Any) -> Any:
    return value


def _sealed_text(value: Any) -> Any:
    return None if value is None else value.ciphertext


def _uuid_to_db(field: UUIDField, conn: Any, value: Any) -> Any:
    return None if value is None else field.get_db_prep_value(value, conn)


def _bulk_insert(rows: list[OutboxMessage]) -> None:
    """``INSERT`` the new rows with one ``executemany``.

    Enqueueing is on the caller's request path; ``bulk_create()`` spends
    more time on per-field bookkeeping than the database spends inserting.
    The payload is sealed for its row by the field itself (the one write
    path of encrypted values), so nothing reaches the database in clear.
    """
    meta = OutboxMessage._meta
    payload = meta.get_field("payload")
    for row in rows:
        value = row.__dict__.get("payload")
        if isinstance(value, str):
            row.__dict__["payload"] = payload.seal_for(row, value)
    converters = _converters(connection)
    q = connection.ops.quote_name
    columns = ", ".join(q(meta.get_field(name).column) for name, _ in converters)
    sql = "INSERT INTO {} ({}) VALUES ({})".format(  # noqa: S608 (names from the model only)
        q(meta.db_table), columns, ", ".join(["%s"] * len(converters))
    )
    params = [[convert(row.__dict__[name]) for name, convert in converters] for row in rows]
    with connection.cursor() as cursor:
        cursor.executemany(sql, params)
    for row in rows:
        row._state.adding = False
        row._state.db = connection.alias


def _insert(rows: list[OutboxMessage]) -> list[OutboxMessage]:
    """Insert ``rows``; a row whose idempotency key another transaction has
    just used is replaced by that transaction's row."""
    try:
        with transaction.atomic():
            _bulk_insert(rows)
            return rows
    except IntegrityError:
        pass
    result = []
    for row in rows:
        try:
            with transaction.atomic():
                row.save(force_insert=True)
            result.append(row)
        except IntegrityError:
            existing = OutboxMessage.objects.filter(idempotency_key=row.idempotency_key).first()
            if existing is None:
                raise
            result.append(existing)
    return result


def enqueue(
    prepared: Sequence[PreparedMessage],
    mailboxes: Sequence[Mailbox],
    keys: Sequence[str | None],
    *,
    now: datetime | None = None,
) -> list[OutboxMessage]:
    """Store checked messages as ``queued`` rows, one per message, in the
    caller's transaction; publish to the broker once that commits.

    ``keys`` are idempotency keys (or ``None``): a key already used for the
    same mailbox returns the row it made and stores nothing. Returns the
    rows in the order of ``prepared``.
    """
    now = now or timezone.now()
    wanted = {
        scoped_key(mailbox.pk, key): None
        for mailbox, key in zip(mailboxes, keys, strict=True)
        if key is not None
    }
    if wanted:
        for row in OutboxMessage.objects.filter(idempotency_key__in=list(wanted)):
            wanted[row.idempotency_key] = row
    result: list[OutboxMessage | None] = []
    new: list[OutboxMessage] = []
    for item, mailbox, key in zip(prepared, mailboxes, keys, strict=True):
        stored_key = scoped_key(mailbox.pk, key)
        if stored_key is not None and wanted.get(stored_key) is not None:
            result.append(wanted[stored_key])
            continue
        row = OutboxMessage(
            kind=Kind.MAIL,
            mailbox=mailbox,
            message_id=item.message_id,
            idempotency_key=stored_key,
            recipient_count=len(item.recipients),
            next_attempt_at=now,
            # A microsecond apart: claims take a mailbox's due rows by
            # (next_attempt_at, created_at), so the messages of one call
            # go out in the order given, on any database.
            created_at=now + timedelta(microseconds=len(new)),
        )
        row.payload = envelope(item)
        if stored_key is not None:
            wanted[stored_key] = row  # a key repeated within the batch
        new.append(row)
        result.append(row)
    if new:
        inserted = {id(row): saved for row, saved in zip(new, _insert(new), strict=True)}
        result = [inserted.get(id(row), row) for row in result]
        mailbox_ids = sorted({str(row.mailbox_id) for row in new})
        transaction.on_commit(lambda: publish(mailbox_ids))
    return result


def publish(mailbox_ids: Sequence[str | None], *, kind: str = Kind.MAIL) -> int:
    """Tell the workers there is work for these mailboxes; return how many
    hints reached the broker. A broker that cannot be reached is logged, not
    raised: the rows are committed, and :func:`dispatch` finds them."""
    from mailgov import tasks

    published = 0
    for mailbox_id in mailbox_ids:
        error = tasks.publish_task(
            tasks.deliver_outbox, kwargs={"mailbox_id": mailbox_id, "kind": kind}
        )
        if error is None:
            published += 1
        else:
            logger.warning(
                "broker unreachable (%s): %d outbox hint(s) not published; the dispatch "
                "sweep will send the messages",
                type(error).__name__,
                len(mailbox_ids) - published,
            )
            break
    return published


# -- sweeps ---------------------------------------------------------------------------


def recover_interrupted(*, now: datetime | None = None, limit: int = 10_000) -> int:
    """Take back rows still ``sending`` after their lease expired (their
    worker died or lost the database): queued again with the same
    Message-ID, or held if ``MAILGOV_OUTBOX_ON_INTERRUPTED == "hold"``; their
    open attempts are recorded as interrupted. Returns how many."""
    now = now or timezone.now()
    # Attempts of messages marked sent whose worker died before it finished
    # its batch's attempt rows (the message row is what counts).
    OutboxAttempt.objects.filter(
        outcome=OutboxAttempt.Outcome.STARTED,
        message__state=State.SENT,
        message__claim_id=F("claim_id"),
        started_at__lt=now - timedelta(seconds=mailgov_settings.OUTBOX_LEASE_SECONDS),
    ).update(outcome=OutboxAttempt.Outcome.SENT, finished_at=now, reply_code=250)
    expired = list(
        OutboxMessage.objects.filter(state=State.SENDING, lease_expires_at__lt=now).values_list(
            "pk", flat=True
        )[:limit]
    )
    if not expired:
        return 0
    hold = mailgov_settings.OUTBOX_ON_INTERRUPTED == "hold"
    # An interruption is a failed attempt: a message that kills its worker
    # every time (a body too big for its memory) ends failed, not in a loop.
    fields: dict[str, Any] = {
        "lease_expires_at": None,
        "error_code": "interrupted",
        "failures": F("failures") + 1,
    }
    if hold:
        fields.update(
            state=State.HELD,
            finished_at=now,
            held_reason="interrupted: the worker stopped mid-send; it may have been sent",
        )
    else:
        fields.update(state=State.QUEUED, next_attempt_at=now)
    expiring = OutboxMessage.objects.filter(
        pk__in=expired, state=State.SENDING, lease_expires_at__lt=now
    )
    last_chance = int(mailgov_settings.OUTBOX_MAX_ATTEMPTS) - 1
    with transaction.atomic():
        count = expiring.filter(failures__gte=last_chance).update(
            **{
                **fields,
                "state": State.FAILED,
                "finished_at": now,
                "error_code": "gave_up:interrupted",
            }
        )
        count += expiring.update(**fields)
        OutboxAttempt.objects.filter(
            message_id__in=expired,
            outcome=OutboxAttempt.Outcome.STARTED,
            message__claim_id=F("claim_id"),
            message__lease_expires_at__isnull=True,
            message__error_code__in=["interrupted", "gave_up:interrupted"],
        ).update(
            outcome=OutboxAttempt.Outcome.INTERRUPTED, finished_at=now, error_code="worker_lost"
        )
    if count:
        logger.warning("%d interrupted outbox message(s) %s", count, "held" if hold else "requeued")
    return count


def release_auto_held(*, now: datetime | None = None) -> int:
    """Queue again the messages held because their mailbox could not send,
    once it can (reconnected, resumed)."""
    now = now or timezone.now()
    return OutboxMessage.objects.filter(
        kind=Kind.MAIL,
        state=State.HELD,
        error_code__in=AUTO_RELEASE_CODES,
        payload__isnull=False,
        mailbox__status=Mailbox.Status.ACTIVE,
    ).update(state=State.QUEUED, next_attempt_at=now, finished_at=None, held_reason="")


def dispatch(
    *,
    now: datetime | None = None,
    publish_fn: Callable[..., int] = publish,
    limit: int = 1000,
) -> dict[str, int]:
    """The periodic sweep: take back interrupted rows, release held mail of
    mailboxes that work again, and publish a hint for every mailbox with due
    messages (a second hint for a mailbox a worker is on costs one empty
    claim). Returns counts."""
    now = now or timezone.now()
    from mailgov.incidents import release_frozen

    recovered = recover_interrupted(now=now)
    # Mail held by a freeze that has been lifted meanwhile (a claim that
    # read the freeze just before it was lifted) goes again too.
    released = release_auto_held(now=now) + release_frozen(now=now)
    due = OutboxMessage.objects.filter(state=State.QUEUED, next_attempt_at__lte=now)
    mailbox_ids = [
        str(pk) if pk is not None else None
        for pk in due.filter(kind=Kind.MAIL)
        .order_by()
        .values_list("mailbox_id", flat=True)
        .distinct()[:limit]
    ]
    published = publish_fn(mailbox_ids) if mailbox_ids else 0
    if due.filter(kind=Kind.NOTIFICATION).exists():
        published += publish_fn([None], kind=Kind.NOTIFICATION)
    return {"recovered": recovered, "released": released, "published": published}


# -- operators ------------------------------------------------------------------------


def _get(pk: Any) -> OutboxMessage:
    try:
        return OutboxMessage.objects.get(pk=pk)
    except (OutboxMessage.DoesNotExist, ValidationError, ValueError, TypeError):
        raise OutboxStateError(f"No outbox message {pk}.") from None


def retry_message(pk: Any, *, actor: str = "") -> OutboxMessage:
    """Queue a failed or held message again, now. Refused for a message that
    was sent (it would be sent twice), is being sent, or whose body is gone."""
    row = _get(pk)
    if row.state not in (State.FAILED, State.HELD):
        raise OutboxStateError(
            f"Outbox message {row.pk} is {row.state}; only a failed or held message is retried."
        )
    if row.payload is None:
        raise OutboxStateError(
            f"Outbox message {row.pk}: its body was deleted (retention); it cannot be retried."
        )
    updated = OutboxMessage.objects.filter(pk=row.pk, state=row.state).update(
        state=State.QUEUED,
        next_attempt_at=timezone.now(),
        failures=0,
        finished_at=None,
        held_reason="",
    )
    if not updated:
        raise OutboxStateError(f"Outbox message {row.pk} changed meanwhile; nothing was done.")
    logger.info("outbox message %s queued again%s", row.pk, f" by {actor}" if actor else "")
    transaction.on_commit(
        lambda: publish([str(row.mailbox_id) if row.mailbox_id else None], kind=row.kind)
    )
    row.refresh_from_db()
    return row


def cancel_message(pk: Any, *, actor: str = "") -> OutboxMessage:
    """Cancel a queued, held or failed message: it is never sent, its body
    is deleted. Refused while it is being sent, or once sent."""
    row = _get(pk)
    cancellable = (State.QUEUED, State.HELD, State.FAILED)
    if row.state not in cancellable:
        raise OutboxStateError(f"Outbox message {row.pk} is {row.state}; it cannot be cancelled.")
    updated = OutboxMessage.objects.filter(pk=row.pk, state__in=cancellable).update(
        state=State.CANCELLED, payload=None, finished_at=timezone.now()
    )
    if not updated:
        raise OutboxStateError(f"Outbox message {row.pk} changed meanwhile; nothing was done.")
    logger.info("outbox message %s cancelled%s", row.pk, f" by {actor}" if actor else "")
    row.refresh_from_db()
    return row


def release_held(mailbox: Mailbox | Any, *, actor: str = "") -> int:
    """Queue again every held message of ``mailbox`` that still has its body."""
    pk = mailbox.pk if isinstance(mailbox, Mailbox) else mailbox
    count = OutboxMessage.objects.filter(
        mailbox_id=pk, state=State.HELD, payload__isnull=False
    ).update(state=State.QUEUED, next_attempt_at=timezone.now(), finished_at=None, held_reason="")
    if count:
        logger.info(
            "%d held message(s) of mailbox %s released%s",
            count,
            pk,
            f" by {actor}" if actor else "",
        )
        transaction.on_commit(lambda: publish([str(pk)]))
    return count


def outbox_status(*, now: datetime | None = None) -> dict[str, Any]:
    """Counts by state, due now, and the age of the oldest queued message."""
    now = now or timezone.now()
    counts = {state: 0 for state in State.values}
    for row in OutboxMessage.objects.order_by().values("state").annotate(n=Count("pk")):
        counts[row["state"]] = row["n"]
    oldest = (
        OutboxMessage.objects.filter(state=State.QUEUED)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return {
        "states": counts,
        "due": OutboxMessage.objects.filter(state=State.QUEUED, next_attempt_at__lte=now).count(),
        "oldest_queued_seconds": (now - oldest).total_seconds() if oldest else 0.0,
    }


#: Holds of an incident's kill switches (mailgov.freeze): never expired while on.
INCIDENT_HOLD_CODES = ("frozen", "contained")


def expire_bodies(*, now: datetime | None = None) -> int:
    """Delete the bodies of failed and held messages older than
    ``MAILGOV_OUTBOX_FAILED_RETENTION_DAYS``; a held message without a body
    cannot be sent any more and becomes failed (``body_expired``). Mail held
    by an incident's freeze is kept however long the freeze lasts: lifting
    it sends it, and the retention period starts when it ends."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=mailgov_settings.OUTBOX_FAILED_RETENTION_DAYS)
    old = OutboxMessage.objects.filter(
        Q(finished_at__lt=cutoff) | Q(finished_at__isnull=True, created_at__lt=cutoff),
        state__in=[State.FAILED, State.HELD],
        payload__isnull=False,
    ).exclude(state=State.HELD, error_code__in=INCIDENT_HOLD_CODES)
    held = old.filter(state=State.HELD).update(
        state=State.FAILED, error_code="body_expired", payload=None, finished_at=now
    )
    return held + old.update(payload=None)
