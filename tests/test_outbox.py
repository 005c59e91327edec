"""The outbox and the queued backend, in this process, against the real peers.

Workers in other processes, brokers and faults that kill a worker are in
test_workers.py; here ``delivery.deliver()`` runs in the test's own process
so that each outcome can be asserted step by step, with time injected.
"""

from __future__ import annotations

import json
import logging
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core import mail
from django.core.mail import EmailMessage, get_connection
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, connection, transaction
from django.test import TestCase
from django.utils import timezone

from mailgov import delivery, outbox
from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    InvalidMessageError,
    MailboxUnavailableError,
    OutboxStateError,
)
from mailgov.models import Mailbox, OutboxAttempt, OutboxMessage, SendLog
from mailgov.services import mark_needs_reconsent
from tests.conftest import secrets_of

State = OutboxMessage.State
Outcome = OutboxAttempt.Outcome
QUEUED = "mailgov.backends.queued.EmailBackend"


def on_commit():
    return TestCase.captureOnCommitCallbacks(execute=True)


def queue(sender: str, *, count: int = 1, subject: str = "Hello", key=None, to=None, **kw):
    """Put ``count`` messages from ``sender`` into the outbox; return their rows."""
    backend = get_connection(QUEUED)
    messages = []
    for index in range(count):
        message = EmailMessage(
            f"{subject} {index}", "Body text.", sender, to or ["bob@example.test"], **kw
        )
        if key is not None:
            message.idempotency_key = key
        messages.append(message)
    with on_commit():
        assert backend.send_messages(messages) == count
    return [OutboxMessage.objects.get(pk=message.outbox_id) for message in messages]


def broker_files() -> list[bytes]:
    """Every message waiting in the broker the suite runs on (filesystem or Redis)."""
    options = django_settings.CELERY_BROKER_TRANSPORT_OPTIONS
    if "data_folder_in" in options:
        return sorted(path.read_bytes() for path in Path(options["data_folder_in"]).glob("*"))
    import redis

    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    key = options.get("global_keyprefix", "") + "celery"
    return sorted(client.lrange(key, 0, -1))


@pytest.fixture
def alice_box(connect, smtp):
    return connect("alice")


# -- refused before anything is stored ---------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("build", "error"),
    [
        (
            lambda: EmailMessage("a\r\nBcc: x@y.test", "b", "alice@example.test", ["z@x.test"]),
            InvalidMessageError,
        ),
        (
            lambda: EmailMessage("s", "b", "alice@example.test", ["bad\naddr@x.test"]),
            InvalidMessageError,
        ),
        (
            lambda: EmailMessage("s", "b", "nobody@example.test", ["z@x.test"]),
            MailboxUnavailableError,
        ),
        (lambda: EmailMessage("s", "b", "alice@example.test", []), InvalidMessageError),
        (
            lambda: EmailMessage(
                "s", "b", "alice@example.test", [f"r{i}@x.test" for i in range(101)]
            ),
            InvalidMessageError,
        ),
    ],
    ids=[
        "header-injection",
        "bad-address",
        "unknown-sender",
        "no-recipient",
        "too-many-recipients",
    ],
)
def test_refused_messages_store_nothing(alice_box, build, error):
    before = broker_files()
    with pytest.raises(error), on_commit():
        get_connection(QUEUED, fail_silently=True).send_messages([build()])
    assert OutboxMessage.objects.count() == 0
    assert broker_files() == before


@pytest.mark.django_db
def test_an_inactive_mailbox_is_refused_at_enqueue(alice_box):
    mark_needs_reconsent(alice_box, "invalid_grant")
    with pytest.raises(MailboxUnavailableError):
        queue("alice@example.test")
    assert OutboxMessage.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("key", ["", "x" * 201, "a\nb", 42])
def test_bad_idempotency_keys_are_refused(alice_box, key):
    with pytest.raises(InvalidMessageError):
        queue("alice@example.test", key=key)
    assert OutboxMessage.objects.count() == 0


# -- stored in the caller's transaction, published on commit --------------------------


@pytest.mark.django_db
def test_rows_belong_to_the_callers_transaction(alice_box):
    before = broker_files()
    with on_commit():
        try:
            with transaction.atomic():
                EmailMessage(
                    "s", "b", "alice@example.test", ["z@x.test"], connection=get_connection(QUEUED)
                ).send()
                assert OutboxMessage.objects.count() == 1
                raise RuntimeError("the caller's work failed")
        except RuntimeError:
            pass
    assert OutboxMessage.objects.count() == 0
    assert broker_files() == before  # nothing published for a rolled-back row


@pytest.mark.django_db
def test_the_broker_carries_ids_and_the_row_no_clear_text(alice_box):
    before = set(broker_files())
    [row] = queue("alice@example.test", subject="Quarterly numbers", to=["carol@example.test"])
    published = set(broker_files()) - before
    assert len(published) == 1
    raw = b"".join(published)
    assert str(alice_box.pk).encode() in raw
    for clear in (b"Quarterly", b"carol@example.test", b"Body text"):
        assert clear not in raw
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT payload FROM mailgov_outboxmessage WHERE id = %s",
            [row.pk.hex if connection.vendor == "sqlite" else row.pk],
        )
        [stored] = cursor.fetchone()
    assert "Quarterly" not in stored and "carol@" not in stored
    assert row.recipient_count == 1 and row.state == State.QUEUED
    assert row.message_id.startswith("<") and row.message_id.endswith(">")


@pytest.mark.django_db
def test_an_idempotency_key_stores_and_sends_once_per_mailbox(alice_box, connect, smtp):
    bob_box = connect("bob")
    [first] = queue("alice@example.test", key="order-42")
    [again] = queue("alice@example.test", key="order-42")
    [bobs] = queue("bob@example.test", key="order-42")
    assert again.pk == first.pk and bobs.pk != first.pk
    assert OutboxMessage.objects.count() == 2
    delivery.deliver()
    assert sorted(m.auth_user for m in smtp.messages) == ["alice@example.test", "bob@example.test"]
    assert bob_box.address == "bob@example.test"


# -- delivery -------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_queued_message_is_sent_once_with_its_message_id(alice_box, smtp, leak_check):
    rows = queue("alice@example.test", count=3)
    assert smtp.messages == []  # nothing goes out in the caller's request
    counts = delivery.deliver(worker="w1")
    assert counts == {Outcome.SENT: 3}
    assert sorted(m.parse()["Message-ID"] for m in smtp.messages) == sorted(
        r.message_id for r in rows
    )
    for row in rows:
        row.refresh_from_db()
        assert row.state == State.SENT and row.sent_at and row.payload is None
        [attempt] = row.attempt_rows.all()
        assert (attempt.outcome, attempt.worker, attempt.reply_code) == (Outcome.SENT, "w1", 250)
    assert SendLog.objects.filter(status=SendLog.Status.SENT).count() == 3
    assert delivery.deliver() == {}  # nothing left
    assert len(smtp.messages) == 3
    leak_check(secrets_of(alice_box))


@pytest.mark.django_db
def test_a_5xx_reply_fails_the_message_with_its_code(alice_box, smtp):
    [row] = queue("alice@example.test")
    smtp.faults.data_reply = "554 5.6.0 Message rejected"
    delivery.deliver()
    row.refresh_from_db()
    assert (row.state, row.reply_code, row.error_code) == (State.FAILED, 554, "smtp_554")
    assert row.payload is not None  # kept for a retry (retention)
    with pytest.raises(OutboxStateError):
        outbox.cancel_message(row.pk) and outbox.cancel_message(row.pk)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fault", "value", "code"),
    [
        ("data_reply", "451 4.3.0 Local error", "smtp_451"),
        ("data_reply", "454 4.7.0 Temporary failure", "smtp_454"),
        ("close_after_data", True, "connection_lost"),
    ],
)
def test_a_passing_failure_is_retried_later_with_the_same_message_id(
    alice_box, smtp, settings, fault, value, code
):
    settings.MAILGOV_OUTBOX_RETRY_BASE_SECONDS = 60
    [row] = queue("alice@example.test")
    setattr(smtp.faults, fault, value)
    start = timezone.now()
    delivery.deliver()
    end = timezone.now()
    row.refresh_from_db()
    assert (row.state, row.error_code, row.failures) == (State.QUEUED, code, 1)
    # 60 s x a random factor in [0.5, 1], counted from the failure.
    assert start + timedelta(seconds=30) <= row.next_attempt_at <= end + timedelta(seconds=60)
    assert smtp.messages == []
    smtp.faults.reset()
    assert delivery.deliver() == {}  # not due yet
    later = row.next_attempt_at + timedelta(seconds=1)
    delivery.deliver(now_fn=lambda: later)
    row.refresh_from_db()
    assert row.state == State.SENT
    [received] = smtp.messages
    assert received.parse()["Message-ID"] == row.message_id
    outcomes = list(row.attempt_rows.values_list("outcome", flat=True))
    assert outcomes == [Outcome.RETRY, Outcome.SENT]


@pytest.mark.django_db
def test_the_messages_of_one_call_go_out_in_the_order_given(alice_box, smtp, settings):
    """Whatever order the database stores them in: here the rows are written
    back in reverse (as updates, a VACUUM or a restore may leave them), so a
    claim that fell back on storage order would send them backwards."""
    settings.MAILGOV_OUTBOX_BATCH_SIZE = 100
    rows = queue("alice@example.test", count=60)
    stored = OutboxMessage.objects.in_bulk([row.pk for row in rows])
    OutboxMessage.objects.filter(pk__in=stored).delete()
    OutboxMessage.objects.bulk_create([stored[row.pk] for row in reversed(rows)])
    assert delivery.deliver() == {Outcome.SENT: 60}
    sent = [received.parse()["Message-ID"] for received in smtp.messages]
    assert sent == [row.message_id for row in rows]


@pytest.mark.django_db
def test_backoff_grows_and_gives_up_after_the_limit(alice_box, smtp, settings):
    settings.MAILGOV_OUTBOX_MAX_ATTEMPTS = 3
    settings.MAILGOV_OUTBOX_RETRY_BASE_SECONDS = 10
    [row] = queue("alice@example.test")
    smtp.faults.data_reply = "451 4.3.0 Try later"
    now = timezone.now()
    delays = []
    for _ in range(3):
        delivery.deliver(now_fn=lambda now=now: now)
        row.refresh_from_db()
        delays.append((row.next_attempt_at - now).total_seconds())
        now = row.next_attempt_at + timedelta(seconds=1)
    assert row.state == State.FAILED and row.error_code == "gave_up:smtp_451"
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20
    assert row.attempt_rows.count() == 3


@pytest.mark.django_db
def test_a_throttling_reply_pauses_the_mailbox_and_keeps_its_messages(alice_box, smtp, settings):
    settings.MAILGOV_PROVIDERS = {
        "demo": {**settings.MAILGOV_PROVIDERS["demo"], "quota": {"messages": None}}
    }
    rows = queue("alice@example.test", count=3)
    smtp.faults.data_reply = "421 4.7.0 Try again later, closing connection."
    now = timezone.now()
    delivery.deliver(now_fn=lambda: now)
    alice_box.refresh_from_db()
    assert alice_box.sending_paused_until and alice_box.sending_paused_until > now
    for row in rows:
        row.refresh_from_db()
        assert row.state == State.QUEUED and row.failures == 0
        assert row.next_attempt_at == alice_box.sending_paused_until
    # One message met the reply; the others were not attempted.
    assert OutboxAttempt.objects.filter(outcome=Outcome.DEFERRED, reply_code=421).count() == 1
    smtp.faults.reset()
    assert delivery.deliver(now_fn=lambda: now + timedelta(seconds=1)) == {}
    after = alice_box.sending_paused_until + timedelta(seconds=1)
    assert delivery.deliver(now_fn=lambda: after) == {Outcome.SENT: 3}


@pytest.mark.django_db
def test_over_quota_is_deferred_until_the_window_opens(alice_box, smtp, settings):
    settings.MAILGOV_PROVIDERS = {
        "demo": {
            **settings.MAILGOV_PROVIDERS["demo"],
            "quota": {"messages": 2, "window_seconds": 3600},
        }
    }
    rows = queue("alice@example.test", count=3)
    now = timezone.now() + timedelta(seconds=5)
    assert delivery.deliver(now_fn=lambda: now) == {Outcome.SENT: 2}
    [waiting] = [r for r in rows if OutboxMessage.objects.get(pk=r.pk).state == State.QUEUED]
    waiting.refresh_from_db()
    first_sent = SendLog.objects.order_by("attempted_at").first().attempted_at
    assert waiting.next_attempt_at == first_sent + timedelta(seconds=3600)
    assert waiting.error_code == "quota" and waiting.failures == 0
    # Within the window: still nothing; after it: sent. Time injected, not slept.
    assert delivery.deliver(now_fn=lambda: now + timedelta(minutes=30)) == {}
    opens = waiting.next_attempt_at + timedelta(seconds=1)
    assert delivery.deliver(now_fn=lambda: opens) == {Outcome.SENT: 1}
    assert len(smtp.messages) == 3


@pytest.mark.django_db
def test_a_mailbox_that_needs_reconsent_holds_then_sends_after_reconnect(alice_box, smtp, connect):
    rows = queue("alice@example.test", count=2)
    mark_needs_reconsent(alice_box, "invalid_grant")
    delivery.deliver()
    for row in rows:
        row.refresh_from_db()
        assert row.state == State.HELD and row.error_code == "mailbox_needs_reconsent"
        assert row.payload is not None
    assert smtp.messages == []
    outbox.dispatch(publish_fn=lambda ids, **kw: len(ids))
    assert OutboxMessage.objects.filter(state=State.HELD).count() == 2  # still not active
    connect("alice")  # the owner reconnects
    counts = outbox.dispatch(publish_fn=lambda ids, **kw: len(ids))
    assert counts["released"] == 2
    delivery.deliver()
    assert len(smtp.messages) == 2


@pytest.mark.django_db
def test_an_undecryptable_row_fails_by_name_and_the_others_go(alice_box, smtp, caplog):
    first, second, _third = queue("alice@example.test", count=3)
    # The body of another row: bound to that row, it does not open here.
    OutboxMessage.objects.filter(pk=second.pk).update(
        payload=OutboxMessage.objects.get(pk=first.pk).__dict__["payload"]
    )
    caplog.set_level(logging.ERROR, logger="mailgov.outbox")
    counts = delivery.deliver()
    assert counts == {Outcome.SENT: 2, Outcome.FAILED: 1}
    # (refresh_from_db() would decrypt the payload: read the columns only.)
    stored = OutboxMessage.objects.filter(pk=second.pk).values_list("state", "error_code").get()
    assert stored == (State.FAILED, "decryption_failed")
    assert str(second.pk) in caplog.text
    assert len(smtp.messages) == 2


@pytest.mark.django_db
@pytest.mark.parametrize("policy", ["retry", "hold"])
def test_an_expired_lease_is_an_interrupted_attempt(alice_box, smtp, settings, policy):
    settings.MAILGOV_OUTBOX_ON_INTERRUPTED = policy
    [row] = queue("alice@example.test")
    claim = delivery.claim_batch("dead-worker")
    assert [r.pk for r in claim.rows] == [row.pk]
    assert delivery.claim_batch("other-worker") is None  # never claimed twice
    assert outbox.recover_interrupted() == 0  # the lease still runs
    later = timezone.now() + timedelta(seconds=mailgov_settings.OUTBOX_LEASE_SECONDS + 1)
    assert outbox.recover_interrupted(now=later) == 1
    row.refresh_from_db()
    [attempt] = row.attempt_rows.all()
    assert (attempt.outcome, attempt.worker) == (Outcome.INTERRUPTED, "dead-worker")
    if policy == "hold":
        assert row.state == State.HELD and "interrupted" in row.held_reason
        assert delivery.deliver() == {}
        outbox.retry_message(row.pk)
    else:
        assert row.state == State.QUEUED
    delivery.deliver(now_fn=lambda: later)
    row.refresh_from_db()
    assert row.state == State.SENT
    assert [m.parse()["Message-ID"] for m in smtp.messages] == [row.message_id]


@pytest.mark.django_db
def test_a_late_worker_still_records_what_it_sent(alice_box, smtp):
    [row] = queue("alice@example.test")
    claim = delivery.claim_batch("slow-worker")
    later = timezone.now() + timedelta(hours=1)
    outbox.recover_interrupted(now=later)
    delivery.send_claim(claim)  # the slow worker finishes after all
    row.refresh_from_db()
    assert row.state == State.SENT
    assert delivery.deliver() == {}
    assert len(smtp.messages) == 1


@pytest.mark.django_db
def test_a_stale_worker_cannot_overwrite_a_newer_claim(alice_box, smtp):
    [row] = queue("alice@example.test")
    stale = delivery.claim_batch("stale-worker")
    later = timezone.now() + timedelta(hours=1)
    outbox.recover_interrupted(now=later)
    fresh = delivery.claim_batch("fresh-worker", now=later)
    smtp.faults.data_reply = "451 4.3.0 Try later"
    delivery.send_claim(stale)  # its failure must not requeue the fresh claim's row
    row.refresh_from_db()
    # (the interruption counted one failure; the stale 451 counts none)
    assert (row.state, row.claim_id, row.failures) == (State.SENDING, fresh.claim_id, 1)
    smtp.faults.reset()
    delivery.send_claim(fresh)
    row.refresh_from_db()
    assert row.state == State.SENT


@pytest.mark.django_db
def test_a_database_error_in_a_worker_leaves_the_row_claimable(alice_box, smtp, monkeypatch):
    [row] = queue("alice@example.test")
    real = delivery._record

    def broken(*args, **kwargs):
        raise OperationalError("database went away")

    monkeypatch.setattr(delivery, "_record", broken)
    with pytest.raises(OperationalError):
        delivery.deliver()
    monkeypatch.setattr(delivery, "_record", real)
    row.refresh_from_db()
    assert row.state == State.SENDING
    later = timezone.now() + timedelta(hours=1)
    assert outbox.recover_interrupted(now=later) == 1
    delivery.deliver(now_fn=lambda: later)
    row.refresh_from_db()
    assert row.state == State.SENT
    # At least once: the server may hold it twice, always with one Message-ID.
    assert {m.parse()["Message-ID"] for m in smtp.messages} == {row.message_id}


@pytest.mark.django_db
def test_mail_of_a_deleted_mailbox_fails_plainly(alice_box, smtp):
    [row] = queue("alice@example.test")
    Mailbox.objects.filter(pk=alice_box.pk).delete()
    delivery.deliver()
    row.refresh_from_db()
    assert (row.state, row.error_code, row.payload) == (State.FAILED, "mailbox_deleted", None)


# -- operators -------------------------------------------------------------------------


@pytest.mark.django_db
def test_retry_cancel_and_release(alice_box, smtp):
    sent, failed, _other = queue("alice@example.test", count=3)
    delivery.deliver(max_batches=1)  # all three sent
    OutboxMessage.objects.filter(pk=failed.pk).update(state=State.FAILED)
    with pytest.raises(OutboxStateError, match="only a failed or held"):
        outbox.retry_message(sent.pk)
    with pytest.raises(OutboxStateError):
        outbox.retry_message(failed.pk)  # its body went when it was sent
    with pytest.raises(OutboxStateError, match="No outbox message"):
        outbox.retry_message("not-a-uuid")
    [held] = queue("alice@example.test")
    OutboxMessage.objects.filter(pk=held.pk).update(state=State.HELD, held_reason="x")
    assert outbox.release_held(alice_box) == 1
    held.refresh_from_db()
    assert held.state == State.QUEUED
    outbox.cancel_message(held.pk)
    held.refresh_from_db()
    assert (held.state, held.payload) == (State.CANCELLED, None)
    with pytest.raises(OutboxStateError):
        outbox.cancel_message(sent.pk)
    assert delivery.deliver() == {}
    assert len(smtp.messages) == 3


@pytest.mark.django_db
def test_the_outbox_command(alice_box, smtp, capsys):
    [row] = queue("alice@example.test")
    call_command("mailgov_outbox", "status")
    out = capsys.readouterr().out
    assert "queued: 1" in out and "due now: 1" in out
    delivery.deliver()
    with pytest.raises(CommandError, match="only a failed or held"):
        call_command("mailgov_outbox", "retry", str(row.pk))
    with pytest.raises(CommandError, match="cannot be cancelled"):
        call_command("mailgov_outbox", "cancel", str(row.pk))
    with pytest.raises(CommandError, match="No mailbox"):
        call_command("mailgov_outbox", "release", "00000000-0000-0000-0000-000000000000")
    call_command("mailgov_outbox", "release", str(alice_box.pk))
    assert "0 held message(s)" in capsys.readouterr().out


@pytest.mark.django_db
def test_outbox_admin_lists_states_and_never_the_body(admin_client, alice_box, smtp):
    [row] = queue("alice@example.test", subject="Secret plans", to=["carol@example.test"])
    page = admin_client.get("/admin/mailgov/outboxmessage/").content.decode()
    assert "Queued" in page
    detail = admin_client.get(f"/admin/mailgov/outboxmessage/{row.pk}/change/").content.decode()
    for clear in ("Secret plans", "carol@example.test", "Body text"):
        assert clear not in page and clear not in detail
    assert row.message_id.strip("<>") in detail.replace("&lt;", "<").replace("&gt;", ">")


# -- notices ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_notice_goes_through_the_outbox_once_per_event(alice_box, settings):
    settings.MAILGOV_NOTIFICATION_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    mail.outbox.clear()
    with on_commit():
        assert mark_needs_reconsent(alice_box, "invalid_grant")
    with on_commit():
        # The same event raised again (a second process, a retried signal).
        from mailgov.contrib.allauth.receivers import notify_owner

        notify_owner(mailbox=Mailbox.objects.get(pk=alice_box.pk), reason="invalid_grant")
    [row] = OutboxMessage.objects.filter(kind=OutboxMessage.Kind.NOTIFICATION)
    assert row.event == "needs_reconsent" and row.recipient_user_id == alice_box.owner_id
    assert mail.outbox == []  # not in the request
    delivery.deliver(kind=OutboxMessage.Kind.NOTIFICATION)
    [notice] = mail.outbox
    assert notice.to == ["alice@example.test"]
    assert notice.extra_headers["Message-ID"] == row.message_id
    row.refresh_from_db()
    assert row.state == State.SENT and row.payload is None
    assert json.dumps(row.event)  # plain metadata stays


@pytest.mark.django_db
def test_a_pre_send_receiver_can_cancel_an_outbox_message(alice_box, smtp):
    from mailgov.exceptions import SendCancelled
    from mailgov.signals import pre_send

    first, second = queue("alice@example.test", count=2)
    seen = []

    def veto(*, message, message_id, mailbox, **kwargs):
        seen.append((message, mailbox.pk))
        if message_id == first.message_id:
            raise SendCancelled("not this one")

    pre_send.connect(veto)
    try:
        delivery.deliver()
    finally:
        pre_send.disconnect(veto)
    assert seen == [(None, alice_box.pk), (None, alice_box.pk)]
    first.refresh_from_db()
    assert (first.state, first.error_code, first.payload) == (
        State.CANCELLED,
        "cancelled_by_receiver",
        None,
    )
    assert [m.parse()["Message-ID"] for m in smtp.messages] == [second.message_id]


@pytest.mark.django_db
def test_a_busy_mailbox_is_fanned_out_to_another_worker_once(alice_box, smtp, settings):
    settings.MAILGOV_OUTBOX_BATCH_SIZE = 2
    queue("alice@example.test", count=5)
    hints = []
    delivery.deliver(max_batches=1, fan_out=hints.append)
    assert hints == [[str(alice_box.pk)]]  # more is due: one more worker asked
    delivery.deliver(fan_out=hints.append)  # the rest, in two batches
    assert len(hints) == 2 and len(smtp.messages) == 5
    queue("alice@example.test", count=1)
    delivery.deliver(fan_out=hints.append)
    assert len(hints) == 2  # nothing left after the batch: nobody else asked


# -- from the review: leases, quotas in flight, endless interruptions, outages ----------


@pytest.mark.django_db
def test_a_batch_stops_sending_well_inside_its_lease(alice_box, smtp, settings):
    # A lease so short that it is half over after the first message.
    settings.MAILGOV_OUTBOX_LEASE_SECONDS = 0.002
    rows = queue("alice@example.test", count=3)
    counts = delivery.deliver(max_batches=1)
    assert counts == {Outcome.SENT: 1, Outcome.DEFERRED: 2}
    states = sorted(OutboxMessage.objects.values_list("state", "failures", "error_code"))
    assert states == [
        (State.QUEUED, 0, "not_attempted"),
        (State.QUEUED, 0, "not_attempted"),
        (State.SENT, 0, ""),
    ]
    assert len(smtp.messages) == 1 and len(rows) == 3


@pytest.mark.django_db
def test_messages_in_flight_count_against_the_quotas(alice_box, smtp, settings):
    settings.MAILGOV_OUTBOX_BATCH_SIZE = 3
    settings.MAILGOV_PROVIDERS = {
        "demo": {
            **settings.MAILGOV_PROVIDERS["demo"],
            "quota": {"messages": 3, "window_seconds": 3600, "recipients_per_day": 4},
        }
    }
    queue("alice@example.test", count=6)
    first = delivery.claim_batch("w1")
    assert len(first.rows) == 3
    assert delivery.claim_batch("w2") is None  # 3 in flight: the quota is used
    # Sent and marked, but the batch's send log not yet written: still counted.
    delivery.send_claim(first)
    assert delivery.claim_batch("w3") is None
    assert OutboxMessage.objects.filter(state=State.QUEUED, error_code="quota").count() == 3
    assert len(smtp.messages) == 3


@pytest.mark.django_db
def test_recipients_in_flight_count_against_the_daily_limit(alice_box, smtp, settings):
    settings.MAILGOV_OUTBOX_BATCH_SIZE = 3
    settings.MAILGOV_PROVIDERS = {
        "demo": {**settings.MAILGOV_PROVIDERS["demo"], "quota": {"recipients_per_day": 4}}
    }
    queue("alice@example.test", count=6)
    assert len(delivery.claim_batch("w1").rows) == 3
    second = delivery.claim_batch("w2")
    assert second is not None and len(second.rows) == 1  # 4 - 3 in flight


@pytest.mark.django_db
def test_a_message_that_kills_every_worker_ends_failed(alice_box, smtp, settings):
    settings.MAILGOV_OUTBOX_MAX_ATTEMPTS = 3
    [row] = queue("alice@example.test")
    now = timezone.now()
    for _ in range(3):
        assert delivery.claim_batch("doomed", now=now) is not None
        now += timedelta(seconds=mailgov_settings.OUTBOX_LEASE_SECONDS + 1)
        assert outbox.recover_interrupted(now=now) == 1
    row.refresh_from_db()
    assert (row.state, row.error_code, row.failures) == (State.FAILED, "gave_up:interrupted", 3)
    outcomes = set(row.attempt_rows.values_list("outcome", flat=True))
    assert outcomes == {Outcome.INTERRUPTED}


@pytest.mark.django_db
def test_no_connection_at_all_pauses_the_mailbox_and_costs_no_attempt(alice_box, smtp, settings):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings.MAILGOV_PROVIDERS = {
        "demo": {**settings.MAILGOV_PROVIDERS["demo"], "smtp_port": dead_port}
    }
    rows = queue("alice@example.test", count=3)
    now = timezone.now()
    delivery.deliver(now_fn=lambda: now)
    alice_box.refresh_from_db()
    assert alice_box.sending_paused_until > now
    for row in rows:
        row.refresh_from_db()
        assert (row.state, row.failures) == (State.QUEUED, 0)
        assert row.next_attempt_at == alice_box.sending_paused_until


@pytest.mark.django_db
def test_recipients_refused_for_now_are_sent_later_under_the_same_message_id(alice_box, smtp):
    smtp.faults.rcpt_replies = {"later@example.test": "450 4.2.1 Mailbox busy, try later"}
    [row] = queue(
        "alice@example.test", to=["now@example.test", "later@example.test", "never@x.test"]
    )
    smtp.faults.rcpt_replies["never@x.test"] = "550 5.1.1 No such user"
    delivery.deliver()
    row.refresh_from_db()
    assert (row.state, row.error_code) == (State.SENT, "partly_refused")
    [retry] = OutboxMessage.objects.exclude(pk=row.pk)
    assert (retry.state, retry.message_id, retry.recipient_count) == (
        State.QUEUED,
        row.message_id,
        1,
    )
    smtp.faults.reset()
    delivery.deliver(now_fn=lambda: retry.next_attempt_at + timedelta(seconds=1))
    assert [m.rcpt_tos for m in smtp.messages] == [["now@example.test"], ["later@example.test"]]
    assert {m.parse()["Message-ID"] for m in smtp.messages} == {row.message_id}


@pytest.mark.django_db
def test_a_message_no_day_can_hold_fails_instead_of_waiting_forever(alice_box, smtp, settings):
    settings.MAILGOV_PROVIDERS = {
        "demo": {**settings.MAILGOV_PROVIDERS["demo"], "quota": {"recipients_per_day": 2}}
    }
    [big] = queue("alice@example.test", to=["a@x.test", "b@x.test", "c@x.test"])
    [small] = queue("alice@example.test")
    delivery.deliver()
    big.refresh_from_db()
    small.refresh_from_db()
    assert (big.state, big.error_code) == (State.FAILED, "over_daily_recipients")
    assert small.state == State.SENT


@pytest.mark.django_db
def test_a_partly_refused_message_counts_against_the_quota_until_the_send_log(
    alice_box, smtp, settings
):
    """A message the server took for some recipients only is sent: like any
    sent message it keeps its lease until the batch's send log is written,
    so the quota counts it meanwhile and no other worker claims past it."""
    from mailgov.signals import post_send

    settings.MAILGOV_OUTBOX_BATCH_SIZE = 2
    settings.MAILGOV_PROVIDERS = {
        "demo": {
            **settings.MAILGOV_PROVIDERS["demo"],
            "quota": {"messages": 2, "window_seconds": 3600},
        }
    }
    smtp.faults.rcpt_replies = {"never@x.test": "550 5.1.1 No such user"}
    [partly] = queue("alice@example.test", to=["bob@example.test", "never@x.test"])
    queue("alice@example.test", count=2)
    seen = {}

    def at_batch_end(sender, **kwargs):
        # Every message of the batch is sent and marked; its send log is
        # not written yet.
        seen["partly"] = OutboxMessage.objects.get(pk=partly.pk)
        seen["claim"] = delivery.claim_batch("another-worker")

    post_send.connect(at_batch_end, weak=False, dispatch_uid="test-partly-refused")
    try:
        delivery.deliver(max_batches=1)
    finally:
        post_send.disconnect(dispatch_uid="test-partly-refused")
    assert (seen["partly"].state, seen["partly"].error_code) == (State.SENT, "partly_refused")
    assert seen["partly"].lease_expires_at is not None
    assert seen["claim"] is None  # two sent in flight: the quota is used
    partly.refresh_from_db()
    assert partly.lease_expires_at is None  # ended with the send log
    assert SendLog.objects.filter(status=SendLog.Status.SENT).count() == 2
