"""The provider's limit on simultaneous SMTP connections per mailbox
(``Quota.concurrency``: Microsoft's three), with more holders than the limit.

Connections are counted where the provider counts them: at the real SMTP
server (:attr:`mailgov.testing.smtpserver.SubmissionServer.peak_connections`,
the most open at once). Microsoft answers the connection one too many with
``432 4.3.2`` and the mailbox is paused, so the limit must hold at every
moment, for connections busy or idle alike.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection as db_connection
from django.utils import timezone

from mailgov import delivery
from mailgov.claims import claim_batch, worker_name
from mailgov.delivery import POOL, close_kept, send_claim, smtp_backend
from mailgov.models import KeptConnection, OutboxMessage
from mailgov.outcomes import Outcome
from tests.conftest import wait_until
from tests.test_outbox import queue

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 2


@pytest.fixture
def alice(connect, smtp, settings):
    """alice's mailbox, her provider allowing LIMIT connections; batches of
    one message, connections kept idle for 30 s."""
    mailbox = connect("alice")
    settings.MAILGOV_PROVIDERS["demo"]["quota"] = {"concurrency": LIMIT}
    settings.MAILGOV_OUTBOX_BATCH_SIZE = 1
    settings.MAILGOV_SMTP_IDLE_SECONDS = 30
    smtp.clear()
    return mailbox


def test_every_live_thread_holds_under_its_own_name():
    """Holders are counted by name, so two live threads must never share
    one: the name ends in the operating system's thread id."""
    names: dict[int, str] = {}
    ready = threading.Barrier(33)

    def record() -> None:
        names[threading.get_native_id()] = worker_name()
        ready.wait(10)  # all alive at once: none can reuse another's id

    threads = [threading.Thread(target=record) for _ in range(32)]
    for thread in threads:
        thread.start()
    ready.wait(10)
    for thread in threads:
        thread.join()
    names[threading.get_native_id()] = worker_name()
    assert len(set(names.values())) == 33
    assert all(name.endswith(f":{tid}") for tid, name in names.items())


def test_a_long_host_name_keeps_the_thread_in_the_name(monkeypatch):
    """Holder columns keep 200 characters: a 253-character host name (DNS's
    longest) must not push the process and thread ids out of them."""
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 253)
    name = worker_name()
    assert len(name) <= 200
    assert name.endswith(f":{threading.get_native_id()}")


def test_a_connection_left_open_between_batches_counts(alice, smtp):
    """Worker A's batch ends (its rows' leases with it) and its connection
    stays open for the next one. B may take the second place; C, a holder
    more than the limit, may not: A's open connection still counts."""
    queue("alice@example.test", count=4)
    a_backend = smtp_backend(alice, keep_connection=True)
    b_backend = smtp_backend(alice, keep_connection=True)
    try:
        assert send_claim(claim_batch("A"), backend=a_backend) == {Outcome.SENT: 1}
        assert a_backend.connection is not None  # open, between batches
        second = claim_batch("B")
        assert second is not None
        assert send_claim(second, backend=b_backend) == {Outcome.SENT: 1}
        assert claim_batch("C") is None
        # A's own connection carries A's next batch: A may claim.
        assert send_claim(claim_batch("A"), backend=a_backend) == {Outcome.SENT: 1}
        assert smtp.peak_connections == LIMIT
        assert set(KeptConnection.objects.values_list("holder", flat=True)) == {"A", "B"}
    finally:
        close_kept(a_backend, "A")
        close_kept(b_backend, "B")
    # Closed, a connection counts no more: C's turn.
    assert not KeptConnection.objects.exists()
    assert claim_batch("C") is not None


def test_more_worker_threads_than_the_limit_never_exceed_it(alice, smtp):
    """LIMIT + 1 workers, each in its own thread with its own connections,
    deliver alice's mail side by side, again and again, keeping their
    connections between runs: the server never sees more than LIMIT open
    at once, and every message goes once."""
    rows = queue("alice@example.test", count=12)
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                delivery.deliver(worker=name, mailbox_id=alice.pk)
                if not OutboxMessage.objects.exclude(state=OutboxMessage.State.SENT).exists():
                    return
                time.sleep(0.01)
        except BaseException as exc:  # reported by the test, in its own thread
            errors.append(exc)
        finally:
            # Its kept connection stays open (closed with the test's end):
            # the other threads must keep counting it.
            db_connection.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(LIMIT + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    assert OutboxMessage.objects.filter(state=OutboxMessage.State.SENT).count() == len(rows)
    assert len(smtp.messages) == len(rows)
    assert 1 <= smtp.peak_connections <= LIMIT


def test_a_claim_refused_at_the_limit_keeps_no_idle_connection(alice, smtp):
    """Other holders fill the limit while A sends (here: two workers that
    opened connections meanwhile). A's next claim finds no room; the
    connection A would have kept idle for its next run is closed instead."""
    queue("alice@example.test", count=3)

    def others_open_theirs(_mailbox_ids: list[str]) -> None:
        # Called after A's first claim (more is due), before it sends.
        for holder in ("host:2:1", "host:3:1"):
            KeptConnection.objects.create(
                mailbox=alice, holder=holder, expires_at=timezone.now() + timedelta(seconds=30)
            )

    counts = delivery.deliver(worker="A", mailbox_id=alice.pk, fan_out=others_open_theirs)
    assert counts == {Outcome.SENT: 1}
    assert len(POOL) == 0
    assert wait_until(lambda: smtp.open_connections == 0)
    assert not KeptConnection.objects.filter(holder="A").exists()


def test_an_idle_connection_over_the_limit_is_closed_at_the_next_claim(alice, smtp, settings):
    """A keeps its connection idle between runs. The limit is lowered and
    another holder has the one place left: A's next run claims nothing and
    closes the connection it idles, rather than keep it on top."""
    queue("alice@example.test")
    assert delivery.deliver(worker="A", mailbox_id=alice.pk) == {Outcome.SENT: 1}
    assert len(POOL) == 1 and smtp.open_connections == 1
    settings.MAILGOV_PROVIDERS["demo"]["quota"] = {"concurrency": 1}
    KeptConnection.objects.create(
        mailbox=alice, holder="host:2:1", expires_at=timezone.now() + timedelta(seconds=30)
    )
    queue("alice@example.test")
    assert delivery.deliver(worker="A", mailbox_id=alice.pk) == {}
    assert len(POOL) == 0
    assert wait_until(lambda: smtp.open_connections == 0)
    assert not KeptConnection.objects.filter(holder="A").exists()
    # The place is free again: the message waiting goes. Then nothing due at
    # all is no reason to close: the connection is kept.
    KeptConnection.objects.filter(holder="host:2:1").delete()
    assert delivery.deliver(worker="A", mailbox_id=alice.pk) == {Outcome.SENT: 1}
    assert delivery.deliver(worker="A", mailbox_id=alice.pk) == {}
    assert len(POOL) == 1 and smtp.open_connections == 1


def test_a_worker_that_died_holds_its_place_only_until_its_row_expires(alice, smtp):
    """A holder's row outlives it by its expiry, no longer: the place of a
    worker killed with its connection open comes back."""
    past = timezone.now() - timedelta(seconds=1)
    for holder in ("dead:1:1", "dead:2:1"):
        KeptConnection.objects.create(mailbox=alice, holder=holder, expires_at=past)
    queue("alice@example.test")
    assert delivery.deliver(worker="A", mailbox_id=alice.pk) == {Outcome.SENT: 1}
    # Rows past their time are deleted when a holder records its own.
    assert set(KeptConnection.objects.values_list("holder", flat=True)) == {"A"}
