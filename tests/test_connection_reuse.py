"""Workers keep a mailbox's authenticated SMTP connection between runs
(:class:`mailgov.delivery.ConnectionPool`), against the real SMTP server.

Connections are counted by a :class:`mailgov.testing.latency.LatencyProxy`
in front of the server (no delay); a kept connection that the pool closes
says QUIT, which the server's transcript shows.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from mailgov import delivery
from mailgov.claims import worker_name
from mailgov.conf import mailgov_settings
from mailgov.delivery import POOL
from mailgov.models import KeptConnection, MailboxCredentials, OutboxMessage, SendLog
from mailgov.outcomes import Outcome
from mailgov.testing.latency import LatencyProxy
from tests.conftest import wait_until
from tests.test_outbox import queue

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def alice(connect, proxy, settings):
    """alice's mailbox; connections idle up to 60 s, so that no test's pause
    outlasts them (tests of the idle time set their own)."""
    settings.MAILGOV_SMTP_IDLE_SECONDS = 60
    return connect("alice")


def quits(smtp) -> int:
    return smtp.transcript.count("QUIT")


def test_the_next_run_reuses_the_kept_connection(alice, proxy, smtp):
    queue("alice@example.test", count=2)
    assert delivery.deliver() == {Outcome.SENT: 2}
    assert len(POOL) == 1
    [kept] = KeptConnection.objects.all()
    assert kept.mailbox_id == alice.pk and kept.holder == worker_name()
    queue("alice@example.test", count=3)
    assert delivery.deliver() == {Outcome.SENT: 3}
    assert proxy.stats.connections == 1
    assert len(smtp.auth_attempts) == 1
    assert len(smtp.messages) == 5
    assert quits(smtp) == 0


def test_idle_connections_are_closed_when_their_time_is_up(alice, proxy, smtp, settings):
    settings.MAILGOV_SMTP_IDLE_SECONDS = 1.5
    queue("alice@example.test")
    delivery.deliver()
    assert len(POOL) == 1 or quits(smtp) == 1  # kept (unless 1.5 s passed already)
    assert wait_until(lambda: quits(smtp) == 1, 15)
    # The timer said QUIT, with no run to trigger it.
    assert len(POOL) == 0
    queue("alice@example.test")
    delivery.deliver()
    assert proxy.stats.connections == 2


def test_zero_idle_seconds_keeps_nothing(alice, proxy, smtp, settings):
    settings.MAILGOV_SMTP_IDLE_SECONDS = 0
    queue("alice@example.test")
    delivery.deliver()
    assert len(POOL) == 0 and quits(smtp) == 1
    assert not KeptConnection.objects.exists()


def test_a_token_about_to_expire_ends_the_connection(alice, proxy, smtp, settings):
    """Not kept past the expiry of the token it authenticated with (less the
    refresh margin): the next run authenticates with a fresh token."""
    left = 5  # seconds of the token's life past the refresh margin
    MailboxCredentials.objects.filter(pk=alice.pk).update(
        expires_at=timezone.now()
        + timedelta(seconds=mailgov_settings.TOKEN_REFRESH_MARGIN_SECONDS + left)
    )
    started = time.monotonic()
    queue("alice@example.test")
    delivery.deliver()
    assert len(POOL) == 1 or time.monotonic() - started >= left
    # Closed by the timer at the token's time, long before the idle 60 s.
    assert wait_until(lambda: len(POOL) == 0, 15)
    queue("alice@example.test")
    delivery.deliver()
    assert proxy.stats.connections == 2
    assert len(smtp.auth_attempts) == 2


def test_an_error_closes_the_connection(alice, proxy, smtp):
    smtp.faults.rcpt_replies = {"nobody@example.test": "550 5.1.1 No such user"}
    queue("alice@example.test", to=["nobody@example.test"])
    queue("alice@example.test")
    counts = delivery.deliver()
    assert counts[Outcome.FAILED] == 1 and counts[Outcome.SENT] == 1
    assert len(POOL) == 0 and quits(smtp) == 1
    assert not KeptConnection.objects.exists()


def test_a_connection_is_never_used_by_another_thread(alice, proxy, smtp):
    queue("alice@example.test")
    delivery.deliver()
    queue("alice@example.test")
    other = threading.Thread(target=delivery.deliver)
    other.start()
    other.join(30)
    assert not other.is_alive()
    assert proxy.stats.connections == 2
    # Each thread kept its own; both count against the connection limit.
    assert len(POOL) == 2
    assert KeptConnection.objects.count() == 2


def test_a_connection_the_server_closed_while_idle_is_not_reused(alice, proxy, smtp):
    """The server timed the session out (here: the link went down and came
    back): one select() sees it, and the next run opens a new connection,
    without failing or retrying a message."""
    queue("alice@example.test")
    delivery.deliver()
    port = proxy.port
    proxy.stop()
    with LatencyProxy("127.0.0.1", smtp.port, delay=0, port=port) as again:
        time.sleep(0.1)
        [row] = queue("alice@example.test")
        assert delivery.deliver() == {Outcome.SENT: 1}
        assert again.stats.connections == 1
    row.refresh_from_db()
    assert row.state == OutboxMessage.State.SENT and row.failures == 0


def test_kept_connections_count_against_the_providers_limit(alice, proxy, smtp, settings):
    """Microsoft counts open connections, idle or not: with the limit at 2
    and two other workers keeping one each, a third worker may not claim; the
    holders may."""
    settings.MAILGOV_PROVIDERS["demo"]["quota"] = {"concurrency": 2}
    now = timezone.now()
    for holder in ("host:1:1", "host:2:1"):
        KeptConnection.objects.create(
            mailbox=alice, holder=holder, expires_at=now + timedelta(seconds=30)
        )
    queue("alice@example.test")
    assert delivery.deliver(worker="host:3:1") == {}
    assert delivery.deliver(worker="host:1:1") == {Outcome.SENT: 1}
    # Rows past their time count for nothing.
    KeptConnection.objects.update(expires_at=now - timedelta(seconds=1))
    queue("alice@example.test")
    assert delivery.deliver(worker="host:3:1") == {Outcome.SENT: 1}


def test_close_all_says_quit_and_forgets_the_rows(alice, proxy, smtp):
    queue("alice@example.test")
    delivery.deliver()
    assert POOL.close_all() == 1
    assert quits(smtp) == 1
    assert not KeptConnection.objects.exists()


def test_claims_stop_at_the_providers_connection_limit(alice, proxy, smtp, settings):
    """Each claim is one connection: with the limit at 2, a third worker gets
    nothing while two batches are in flight, and its turn once one ends."""
    from mailgov.claims import claim_batch
    from mailgov.delivery import send_claim

    settings.MAILGOV_PROVIDERS["demo"]["quota"] = {"concurrency": 2}
    settings.MAILGOV_OUTBOX_BATCH_SIZE = 2
    queue("alice@example.test", count=6)
    first, second = claim_batch("w1"), claim_batch("w2")
    assert first is not None and second is not None
    assert claim_batch("w3") is None
    assert send_claim(first) == {Outcome.SENT: 2}
    third = claim_batch("w3")
    assert third is not None and len(third.rows) == 2


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_kept_connection_dead_before_mail_from_is_reopened_once(
    alice, proxy, smtp, monkeypatch, pipelining
):
    """The server drops the kept connection without a word just after the
    pool's select() found it quiet (a race no check can close; a link that
    went down silently looks the same). The first message meets the dead
    connection before any reply to MAIL FROM, so nothing of it was accepted:
    it goes over a new connection, transparently, and costs no attempt."""
    smtp.faults.no_pipelining = not pipelining
    queue("alice@example.test")
    assert delivery.deliver() == {Outcome.SENT: 1}
    assert smtp.drop_connections() == 1
    # The close lands after the pool looked.
    monkeypatch.setattr(delivery, "_quiet", lambda backend: True)
    rows = queue("alice@example.test", count=2)
    assert delivery.deliver() == {Outcome.SENT: 2}
    for row in rows:
        row.refresh_from_db()
        assert (row.state, row.failures) == (OutboxMessage.State.SENT, 0)
    assert proxy.stats.connections == 2
    assert len(smtp.messages) == 3
    assert not SendLog.objects.filter(status=SendLog.Status.FAILED).exists()
    # The new connection is kept in its turn.
    assert len(POOL) == 1 and KeptConnection.objects.count() == 1


def test_a_kept_connection_lost_after_mail_from_is_not_retried(alice, proxy, smtp):
    """Reopening is only for a connection found dead before the server
    answered MAIL FROM. Lost at the end of the data, the message may have
    been taken: it is charged an attempt and retried later, never resent
    at once."""
    queue("alice@example.test")
    delivery.deliver()
    smtp.faults.close_after_data = True
    [row] = queue("alice@example.test")
    assert delivery.deliver() == {Outcome.RETRY: 1}
    row.refresh_from_db()
    assert (row.failures, row.error_code) == (1, "connection_lost")
    assert proxy.stats.connections == 1
    assert len(smtp.dropped_messages) == 1


def test_the_token_expiry_is_the_one_of_the_token_used(alice, proxy, smtp, monkeypatch):
    """Another process refreshes the token between this one's read and the
    AUTH: the newer token's later expiry must not keep the connection
    authenticated with the older one open past the older one's end."""
    from mailgov.backends import smtp as smtp_module

    real = smtp_module.get_access_token

    def refreshed_meanwhile(mailbox, **kwargs):
        token = real(mailbox, **kwargs)
        credentials = MailboxCredentials.objects.get(pk=mailbox.pk)
        credentials.access_token = "newer-token-from-another-process"
        credentials.expires_at = timezone.now() + timedelta(hours=2)
        credentials.save()
        return token

    before = MailboxCredentials.objects.get(pk=alice.pk).expires_at
    monkeypatch.setattr(smtp_module, "get_access_token", refreshed_meanwhile)
    backend = delivery.smtp_backend(alice, keep_connection=True)
    assert backend.open() is True
    try:
        assert backend.token_expires_at is not None
        assert backend.token_expires_at <= max(before, timezone.now())
        assert POOL.keep_until(backend) is None  # not kept after its batch
    finally:
        backend.close()


def test_the_token_expiry_is_taken_when_the_token_is_current(alice, proxy, smtp):
    backend = delivery.smtp_backend(alice, keep_connection=True)
    assert backend.open() is True
    try:
        stored = MailboxCredentials.objects.get(pk=alice.pk).expires_at
        assert backend.token_expires_at == stored
    finally:
        backend.close()
