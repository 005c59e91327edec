"""Key rotation: mailgov_rotate_keys, resumable, safe while mail is sent."""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest
from django.core.mail import EmailMessage, send_mail
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import override_settings

from mailgov import rotation
from mailgov.crypto import generate_key_entry, reset_keyring
from mailgov.fields import Sealed
from mailgov.models import (
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    SendLog,
)
from mailgov.outbox import enqueue
from mailgov.rotation import rotation_pending_by_model, rotation_pending_count
from mailgov.services import key_usage, rotate_keys
from mailgov.validation import prepare_message

ROOT = Path(__file__).resolve().parent.parent
OLD = generate_key_entry("old")
NEW = generate_key_entry("new")


def make_credentials(owner, n: int) -> list[MailboxCredentials]:
    rows = []
    for i in range(n):
        mailbox = Mailbox.objects.create(owner=owner, provider="demo", address=f"u{i}@x.test")
        rows.append(
            MailboxCredentials.objects.create(
                mailbox=mailbox, access_token=f"access-{i}", refresh_token=f"refresh-{i}"
            )
        )
    return rows


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("owner", "o@x.test", "pw")


@pytest.mark.django_db
def test_rotation_re_encrypts_everything_under_the_new_key(owner):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        rows = make_credentials(owner, 5)
        MailboxCredentials.objects.filter(pk=rows[0].pk).update(access_token=None)
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        out = io.StringIO()
        call_command("mailgov_rotate_keys", "--dry-run", stdout=out)
        report = out.getvalue()
        assert "old: 9 values (decrypt-only)" in report
        assert "new: 0 values (primary)" in report
        assert "rows to rotate: 5" in report
        out = io.StringIO()
        call_command("mailgov_rotate_keys", "--batch-size", "2", stdout=out, stderr=io.StringIO())
        assert "Re-encrypted 9 values in 5 rows under key 'new'" in out.getvalue()
        assert key_usage() == {"new": 9}
    # The old key can go: everything still decrypts with the new one alone.
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW]):
        for i, row in enumerate(rows):
            fresh = MailboxCredentials.objects.get(pk=row.pk)
            assert fresh.refresh_token == f"refresh-{i}"
            assert fresh.access_token == (None if i == 0 else f"access-{i}")


@pytest.mark.django_db(transaction=True)
def test_rotation_is_resumable_after_an_interruption(owner):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        make_credentials(owner, 6)
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        batches = []

        def interrupt(n):
            batches.append(n)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            rotate_keys(batch_size=2, progress=interrupt)
        # The first batch was committed before the interruption.
        assert key_usage() == {"new": 4, "old": 8}
        result = rotate_keys(batch_size=2)
        assert (result.rotated, result.rows) == (8, 4)
        assert key_usage() == {"new": 12}


@pytest.mark.django_db
def test_unreadable_row_is_skipped_and_reported(owner):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        a, b = make_credentials(owner, 2)
        moved = MailboxCredentials.objects.get(pk=a.pk).__dict__["access_token"]
        MailboxCredentials.objects.filter(pk=b.pk).update(access_token=Sealed(moved.ciphertext))
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        with pytest.raises(CommandError, match=str(b.pk)) as info:
            call_command("mailgov_rotate_keys", stdout=io.StringIO(), stderr=io.StringIO())
        assert "moved" not in str(info.value)
        assert MailboxCredentials.objects.get(pk=a.pk).access_token == "access-0"


@pytest.mark.django_db(transaction=True)
def test_rotation_while_sending_and_refreshing_loses_nothing(connect, smtp, settings, authserver):
    """Every send refreshes (the token is expired first), so the rotation and
    the refresh write the same rows at once. A lost update would put back a
    revoked token, and the demo server's reuse detection would end the grant."""
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    settings.MAILGOV_ENCRYPTION_KEYS = [OLD]
    reset_keyring()
    mailboxes = [connect("alice"), connect("bob")]
    # Many rows to rotate, so the rotation overlaps the sending.
    make_credentials(mailboxes[0].owner, 150)
    stop = threading.Event()
    errors: list[BaseException] = []
    sent = []

    def sender():
        try:
            n = 0
            while not stop.is_set() or n < 4:
                mailbox = mailboxes[n % 2]
                MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
                sent.append(send_mail(f"m{n}", "x", mailbox.address, ["z@x.test"]))
                n += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=sender)
    settings.MAILGOV_ENCRYPTION_KEYS = [NEW, OLD]
    thread.start()
    try:
        result = rotate_keys(batch_size=10)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    assert not errors, errors
    assert result.failed_rows == []
    assert key_usage() == {"new": 2 * 152}
    assert sum(sent) == len(sent) >= 4
    assert SendLog.objects.filter(status="failed").count() == 0
    assert len(smtp.messages) == len(sent)
    assert all(
        m.status == Mailbox.Status.ACTIVE
        for m in Mailbox.objects.filter(pk__in=[mailboxes[0].pk, mailboxes[1].pk])
    )
    # The old key is retired; sending goes on.
    settings.MAILGOV_ENCRYPTION_KEYS = [NEW]
    assert send_mail("after", "x", "alice@example.test", ["z@x.test"]) == 1


def bulk_credentials(owner, n: int) -> None:
    """``n`` mailboxes with both tokens, under the keyring in force (fast: bulk inserts)."""
    for start in range(0, n, 5000):
        boxes = Mailbox.objects.bulk_create(
            Mailbox(owner=owner, provider="demo", address=f"b{i}@x.test", status="suspended")
            for i in range(start, min(n, start + 5000))
        )
        MailboxCredentials.objects.bulk_create(
            MailboxCredentials(mailbox=box, access_token=f"a-{box.pk}", refresh_token=f"r-{box.pk}")
            for box in boxes
        )


@pytest.mark.django_db(transaction=True)
def test_sends_complete_while_a_rotation_of_many_batches_runs(connect, smtp, settings):
    """Not only "no send fails": sends finish *during* the rotation, each
    waiting at most for about one batch's write, not for the whole run.

    The rotation runs in a process of its own, as ``mailgov_rotate_keys``
    does beside the web and worker processes. Every send refreshes first (its
    token is expired), so it writes the credentials row, the mailbox and the
    send log, as a sender does.
    """
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    settings.MAILGOV_ENCRYPTION_KEYS = [OLD]
    reset_keyring()
    mailbox = connect("alice")
    rows = 20_000
    bulk_credentials(mailbox.owner, rows)
    settings.MAILGOV_ENCRYPTION_KEYS = [NEW, OLD]

    def send_one(n: int) -> tuple[float, float]:
        begin = time.time()
        MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
        assert send_mail(f"m{n}", "x", "alice@example.test", ["z@x.test"]) == 1
        return begin, time.time()

    # How long one send takes with no rotation running, in this run.
    alone = [end - begin for begin, end in (send_one(n) for n in range(8))]
    env = {
        **os.environ,
        "MAILGOV_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "MAILGOV_TEST_KEYS": json.dumps([NEW, OLD]),
        "MAILGOV_TEST_BATCH_SIZE": "100",
    }
    rotation = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.rotate"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sends: list[tuple[float, float]] = []
    try:
        while rotation.poll() is None and len(sends) < 300:
            sends.append(send_one(len(sends)))
        out, err = rotation.communicate(timeout=300)
    finally:
        if rotation.poll() is None:
            rotation.kill()
    assert rotation.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    batch_ends = report["batch_ends"]
    assert len(batch_ends) >= 150  # a rotation of many batches
    assert report["failed"] == [] and report["busy"] == []
    assert key_usage() == {"new": 2 * (rows + 1)}
    # Sends that started after the first batch and ended before the last one.
    # With the write lock taken back to back, a waiting sender barely ever
    # gets in: it would wait for most of the rotation.
    during = [(b, e) for b, e in sends if batch_ends[0] < b and e < batch_ends[-1]]
    rotation_time = batch_ends[-1] - batch_ends[0]
    longest = max((e - b for b, e in during), default=rotation_time)
    # At least 40% of the sends one sender makes without a rotation in the
    # same time (measured in this test): with the lock taken back to back,
    # it was 5 to 20%.
    expected = rotation_time / statistics.median(alone)
    assert len(during) >= max(5, 0.4 * expected), (len(during), expected, rotation_time)
    assert longest < rotation_time / 4, (longest, rotation_time)
    assert len(smtp.messages) == len(sends) + len(alone)
    assert SendLog.objects.filter(status="sent").count() == len(sends) + len(alone)
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE


@pytest.mark.django_db(transaction=True)
def test_a_row_written_by_a_sender_mid_batch_is_not_overwritten(owner, monkeypatch):
    """Between the batch's read and its write, a sender refreshes one row (a
    new access token under the primary key, the refresh token kept) and
    revokes another (tokens wiped). Neither is overwritten by the rotation's
    stale values; the first is rotated on a later pass, the second left wiped."""
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        reset_keyring()
        refreshed, revoked, untouched = make_credentials(owner, 3)
    original = rotation._write_batch
    raced = []

    def sender_writes_first(rows, *args):
        if not raced:
            raced.append(True)
            row = MailboxCredentials.objects.get(pk=refreshed.pk)
            row.access_token = "refreshed-meanwhile"
            row.save()
            MailboxCredentials.objects.filter(pk=revoked.pk).update(
                access_token=None, refresh_token=None
            )
        return original(rows, *args)

    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        reset_keyring()
        monkeypatch.setattr(rotation, "_write_batch", sender_writes_first)
        result = rotate_keys(batch_size=10)
        assert raced
        assert result.busy_rows == [] and result.failed_rows == []
        # untouched: 2 values; refreshed: its old-key refresh token, next pass.
        assert (result.rows, result.rotated) == (2, 3)
        assert key_usage() == {"new": 4}
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW]):
        reset_keyring()
        row = MailboxCredentials.objects.get(pk=refreshed.pk)
        assert (row.access_token, row.refresh_token) == ("refreshed-meanwhile", "refresh-0")
        row = MailboxCredentials.objects.get(pk=revoked.pk)
        assert (row.access_token, row.refresh_token) == (None, None)
        assert MailboxCredentials.objects.get(pk=untouched.pk).access_token == "access-2"


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SKIP LOCKED: PostgreSQL (CI runs it)"
)
def test_a_row_locked_by_a_refresh_in_flight_is_skipped_not_waited_for(owner):
    """A refresh holds its row lock across the provider's HTTP call: the
    rotation must not wait for it (holding its batch's other rows) but take
    the row up again at the end, and report it if it is still locked."""
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        reset_keyring()
        rows = make_credentials(owner, 5)
    locked, release = threading.Event(), threading.Event()

    def refresh_in_flight():
        with transaction.atomic():
            MailboxCredentials.objects.select_for_update(no_key=True).get(pk=rows[2].pk)
            locked.set()
            release.wait(30)
        connection.close()

    holder = threading.Thread(target=refresh_in_flight)
    holder.start()
    try:
        assert locked.wait(10)
        with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
            reset_keyring()
            started = time.monotonic()
            result = rotate_keys(batch_size=10)
            assert time.monotonic() - started < 10  # did not wait for the lock
            assert result.busy_rows == [str(rows[2].pk)]
            assert (result.rows, result.rotated) == (4, 8)
    finally:
        release.set()
        holder.join(30)
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        reset_keyring()
        assert (rotate_keys().rows, key_usage()) == (1, {"new": 10})


@pytest.mark.django_db
def test_the_command_fails_while_values_remain_under_an_old_key(monkeypatch):
    """A script that retires the old key after the command must not do so
    while senders kept rows under it through every pass."""
    from mailgov.management.commands import mailgov_rotate_keys
    from mailgov.services import RotationResult

    monkeypatch.setattr(
        mailgov_rotate_keys,
        "rotate_keys",
        lambda **kwargs: RotationResult(rotated=2, rows=1, busy_rows=["row-7"]),
    )
    with pytest.raises(CommandError, match="run the command again: row-7"):
        call_command("mailgov_rotate_keys", stdout=io.StringIO(), stderr=io.StringIO())


# -- every encrypted table: outbox payloads, pending revocations ---------------------

CREDENTIALS = "mailgov.mailboxcredentials"
OUTBOX = "mailgov.outboxmessage"
REVOCATIONS = "mailgov.pendingrevocation"


def make_outbox(owner, n: int, *, body: str = "Body text.") -> list[OutboxMessage]:
    """``n`` queued messages (payloads sealed under the keyring in force),
    through the outbox's own enqueue, as the queued backend stores them."""
    mailbox = Mailbox.objects.create(owner=owner, provider="demo", address="sender@x.test")
    prepared = [
        prepare_message(EmailMessage(f"m{i}", body, "sender@x.test", [f"to{i}@x.test"]))
        for i in range(n)
    ]
    return enqueue(prepared, [mailbox] * n, [None] * n)


def payload_of(row: OutboxMessage) -> dict:
    return json.loads(OutboxMessage.objects.get(pk=row.pk).payload)


@pytest.mark.django_db
def test_outbox_payloads_and_pending_revocations_are_rotated_too(owner):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        credentials = make_credentials(owner, 2)
        messages = make_outbox(owner, 3)
        # Sent: the payload is gone, nothing to rotate.
        OutboxMessage.objects.filter(pk=messages[2].pk).update(state="sent", payload=None)
        revocation = PendingRevocation.objects.create(
            mailbox_id=uuid4(), provider="x", refresh_token="secret"
        )
        envelopes = [payload_of(row) for row in messages[:2]]
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        assert rotation_pending_by_model() == {CREDENTIALS: 2, OUTBOX: 2, REVOCATIONS: 1}
        assert rotation_pending_count() == 5
        assert key_usage(by_model=True) == {
            CREDENTIALS: {"old": 4},
            OUTBOX: {"old": 2},
            REVOCATIONS: {"old": 1},
        }
        assert key_usage() == {"old": 7}
        out = io.StringIO()
        call_command("mailgov_rotate_keys", "--dry-run", stdout=out)
        report = out.getvalue()
        assert "old: 7 values (decrypt-only)" in report
        assert f"{CREDENTIALS}: 4 values to rotate in 2 rows" in report
        assert f"{OUTBOX}: 2 values to rotate in 2 rows" in report
        assert f"{REVOCATIONS}: 1 values to rotate in 1 rows" in report
        assert "rows to rotate: 5" in report
        done: list[int] = []
        result = rotate_keys(batch_size=2, progress=done.append)
        assert (result.rotated, result.rows) == (7, 5)
        assert result.failed_rows == [] and result.busy_rows == []
        assert sum(done) == 5 and max(done) <= 2
        assert rotation_pending_count() == 0
        assert key_usage(by_model=True) == {
            CREDENTIALS: {"new": 4},
            OUTBOX: {"new": 2},
            REVOCATIONS: {"new": 1},
        }
    # The old key can go: every table still decrypts with the new one alone.
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW]):
        assert [payload_of(row) for row in messages[:2]] == envelopes
        assert envelopes[0]["to"] == ["to0@x.test"]
        assert OutboxMessage.objects.get(pk=messages[2].pk).payload is None
        assert PendingRevocation.objects.get(pk=revocation.pk).refresh_token == "secret"
        for i, row in enumerate(credentials):
            assert MailboxCredentials.objects.get(pk=row.pk).refresh_token == f"refresh-{i}"


@pytest.mark.django_db
def test_the_command_rotates_every_table(owner):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        make_outbox(owner, 3)
        PendingRevocation.objects.create(mailbox_id=uuid4(), provider="x", refresh_token="secret")
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        out = io.StringIO()
        call_command("mailgov_rotate_keys", stdout=out, stderr=io.StringIO())
        assert "Re-encrypted 4 values in 4 rows under key 'new'" in out.getvalue()
        assert key_usage() == {"new": 4}


@pytest.mark.django_db
def test_a_payload_written_by_a_sender_mid_batch_is_not_overwritten(owner, monkeypatch):
    """Between the batch's read and its write, a worker sends one message
    (its payload set to NULL, as delivery's mark-sent does) and a retry
    gives another a new payload under the primary key. The rotation puts
    back neither the sent message's body nor the retried one's old body."""
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        sent, retried, untouched = make_outbox(owner, 3)
    original = rotation._write_batch
    raced = []

    def sender_writes_first(rows, table, *args):
        if table.model is OutboxMessage and not raced:
            raced.append(True)
            OutboxMessage.objects.filter(pk=sent.pk).update(state="sent", payload=None)
            row = OutboxMessage.objects.get(pk=retried.pk)
            row.payload = json.dumps({"retry": True})
            row.save(update_fields=["payload"])
        return original(rows, table, *args)

    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        reset_keyring()
        monkeypatch.setattr(rotation, "_write_batch", sender_writes_first)
        result = rotate_keys(batch_size=10)
        assert raced
        assert result.busy_rows == [] and result.failed_rows == []
        assert (result.rows, result.rotated) == (1, 1)
        assert key_usage() == {"new": 2}
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW]):
        reset_keyring()
        assert OutboxMessage.objects.get(pk=sent.pk).payload is None
        assert payload_of(retried) == {"retry": True}
        assert payload_of(untouched)["to"] == ["to2@x.test"]


@pytest.mark.django_db
def test_an_unreadable_payload_is_reported_by_model_and_pk(owner):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        a, b = make_outbox(owner, 2)
        moved = OutboxMessage.objects.get(pk=a.pk).__dict__["payload"]
        OutboxMessage.objects.filter(pk=b.pk).update(payload=Sealed(moved.ciphertext))
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        result = rotate_keys()
        assert result.failed_rows == [f"{OUTBOX}:{b.pk}"]
        assert (result.rows, result.rotated) == (1, 1)
        with pytest.raises(CommandError, match=f"{OUTBOX}:{b.pk}"):
            call_command("mailgov_rotate_keys", stdout=io.StringIO(), stderr=io.StringIO())


@pytest.mark.django_db
def test_large_payloads_are_rotated_in_batches_bounded_in_size(owner, monkeypatch):
    """A batch of outbox payloads (attachments) is cut by size, not only by
    rows; values too long for the batch's first query are read apart."""
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        messages = make_outbox(owner, 5, body="x" * 3000)
        envelopes = [payload_of(row) for row in messages]
    size = len(OutboxMessage.objects.get(pk=messages[0].pk).__dict__["payload"].ciphertext)
    monkeypatch.setattr(rotation, "BATCH_MAX_CHARS", 2 * size + 10)
    monkeypatch.setattr(rotation, "_INLINE_MAX_CHARS", 100)
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        done: list[int] = []
        result = rotate_keys(batch_size=10, progress=done.append)
        assert done == [2, 2, 1]
        assert (result.rows, result.rotated) == (5, 5)
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW]):
        assert [payload_of(row) for row in messages] == envelopes
