"""SMTP PIPELINING (RFC 2920) in the XOAUTH2 backend, against the real SMTP server.

Round trips are counted by :class:`mailgov.testing.latency.LatencyProxy` placed
between the backend and the server (with no delay: only the turns matter
here), so "two round trips a message" is measured on the wire, not inferred.
"""

from __future__ import annotations

import smtplib

import pytest
from django.core.mail import EmailMessage

from mailgov.backends.smtp import EmailBackend, pipelined_sendmail
from mailgov.models import SendLog
from mailgov.testing.latency import LatencyProxy

pytestmark = pytest.mark.django_db(transaction=True)


def messages(count: int, recipients: list[str] | None = None, body: str = "Body.\n") -> list:
    return [
        EmailMessage(
            f"Pipelined {i}", body, "alice@example.test", recipients or ["bob@example.test"]
        )
        for i in range(count)
    ]


def round_trips_per_message(proxy: LatencyProxy, mailbox, count: int, **kwargs) -> float:
    """Round trips of sending ``count`` messages over a connection already
    open (its set-up and QUIT are not counted), per message."""
    backend = EmailBackend(mailbox=mailbox)
    assert backend.open() is True
    try:
        proxy.reset_stats()
        assert backend.send_messages(messages(count, **kwargs)) == count
        return proxy.stats.round_trips / count
    finally:
        backend.close()


def test_two_round_trips_a_message_when_the_server_offers_pipelining(connect, proxy, smtp):
    alice = connect("alice")
    rcpts = ["bob@example.test", "carol@example.test", "dave@example.test"]
    assert round_trips_per_message(proxy, alice, 5) == 2
    # However many recipients: every RCPT rides in the first flight.
    assert round_trips_per_message(proxy, alice, 5, recipients=rcpts) == 2
    assert len(smtp.messages) == 5 + 5
    assert smtp.messages[-1].rcpt_tos == rcpts
    # In the server's order: MAIL, each RCPT, DATA.
    transcript = [line.split(":")[0] for line in smtp.transcript]
    start = len(transcript) - 1 - transcript[::-1].index("MAIL FROM")
    assert transcript[start : start + 5] == ["MAIL FROM", "RCPT TO", "RCPT TO", "RCPT TO", "DATA"]


def test_one_command_per_round_trip_without_pipelining(connect, proxy, smtp, settings):
    alice = connect("alice")
    rcpts = ["bob@example.test", "carol@example.test"]
    smtp.faults.no_pipelining = True
    # MAIL, one RCPT per recipient, DATA, the content.
    assert round_trips_per_message(proxy, alice, 4) == 4
    assert round_trips_per_message(proxy, alice, 4, recipients=rcpts) == 5
    # Advertised but turned off by the setting: the same.
    smtp.faults.no_pipelining = False
    settings.MAILGOV_SMTP_PIPELINING = False
    assert round_trips_per_message(proxy, alice, 4) == 4


def test_pipelining_leaves_connection_setup_alone(connect, proxy, smtp):
    """EHLO, STARTTLS, the TLS handshake and AUTH each wait for their answer:
    opening costs the same with the server offering PIPELINING or not."""
    mailbox = connect("alice")

    def opening() -> int:
        proxy.reset_stats()
        backend = EmailBackend(mailbox=mailbox)
        assert backend.open() is True
        trips = proxy.stats.round_trips
        backend.close()
        return trips

    # With no delay, the server's TLS 1.3 session tickets race the client's
    # EHLO after the handshake and sometimes count as a turn of their own. A
    # delay longer than that race (as on any real network) orders them: the
    # tickets and the EHLO reply leave together, as one flight.
    proxy.delay = 0.02
    with_pipelining = opening()
    smtp.faults.no_pipelining = True
    assert opening() == with_pipelining
    assert with_pipelining >= 5  # handshake, EHLO, STARTTLS, TLS, EHLO + AUTH


def test_dot_stuffing_and_line_ends_survive(connect, proxy, smtp):
    connect("alice")
    body = ".starts with a dot\n..two dots\n.\nlast line without newline"
    EmailBackend().send_messages(messages(1, body=body))
    [received] = smtp.messages
    assert received.parse().get_content().replace("\r\n", "\n").rstrip("\n") == body


def test_refused_recipient_the_rest_still_get_it(connect, proxy, smtp):
    connect("alice")
    smtp.faults.rcpt_replies = {"carol@example.test": "550 5.1.1 No such user"}
    backend = EmailBackend()
    sent = backend.send_messages(
        messages(2, recipients=["bob@example.test", "carol@example.test", "dave@example.test"])
    )
    assert sent == 2
    assert [m.rcpt_tos for m in smtp.messages] == [["bob@example.test", "dave@example.test"]] * 2
    assert sorted(SendLog.objects.values_list("recipient_count", flat=True)) == [2, 2]


@pytest.mark.parametrize(
    ("pipelining", "expected"),
    [(True, ["RCPT", "DATA", "RSET", "MAIL"]), (False, ["RCPT", "RSET", "MAIL"])],
)
def test_every_recipient_refused_resets_and_the_connection_goes_on(
    connect, proxy, smtp, pipelining, expected
):
    """A transaction with no recipient is refused whole, RSET follows, and the
    next message on the same connection is sent: every reply of the flight
    was read, in order. (Without pipelining too: a refusal is not a lost
    connection.)"""
    connect("alice")
    smtp.faults.no_pipelining = not pipelining
    smtp.faults.rcpt_replies = {"nobody@example.test": "550 5.1.1 No such user"}
    batch = messages(1, recipients=["nobody@example.test"]) + messages(1)
    backend = EmailBackend(fail_silently=True)
    proxy.reset_stats()
    assert backend.send_messages(batch) == 1
    assert proxy.stats.connections == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["bob@example.test"]]
    lines = [line.split(":")[0].split(" ")[0] for line in smtp.transcript]
    refused_at = lines.index("RCPT")
    assert lines[refused_at : refused_at + len(expected)] == expected
    statuses = list(SendLog.objects.order_by("attempted_at").values_list("status", "error_class"))
    assert (SendLog.Status.FAILED, "SMTPRecipientsRefused") in statuses
    assert (SendLog.Status.SENT, "") in statuses


def test_refused_sender_and_refused_data_reset(connect, proxy, smtp):
    """Straight through pipelined_sendmail on the backend's authenticated
    connection: each refusal raises what smtplib's sendmail raises, after
    RSET, and leaves the connection in step for the next transaction."""
    mailbox = connect("alice")
    backend = EmailBackend(mailbox=mailbox)
    backend.open()
    connection = backend.connection
    data = messages(1)[0].message().as_bytes(linesep="\r\n")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        pipelined_sendmail(connection, "mallory@example.test", ["bob@example.test"], data)
    assert refused.value.smtp_code == 553
    smtp.faults.data_reply = "550 5.4.5 Daily user sending limit exceeded."
    smtp.faults.data_reply_count = 1
    with pytest.raises(smtplib.SMTPDataError) as data_error:
        pipelined_sendmail(connection, "alice@example.test", ["bob@example.test"], data)
    assert data_error.value.smtp_code == 550
    assert pipelined_sendmail(connection, "alice@example.test", ["bob@example.test"], data) == {}
    backend.close()
    assert len(smtp.messages) == 1
    assert [line for line in smtp.transcript if line == "RSET"] == ["RSET", "RSET"]


def test_a_421_at_the_end_of_data_closes_the_connection(connect, proxy, smtp):
    mailbox = connect("alice")
    backend = EmailBackend(mailbox=mailbox)
    backend.open()
    smtp.faults.data_reply = "421 4.7.0 Try again later"
    smtp.faults.data_reply_count = 1
    data = messages(1)[0].message().as_bytes(linesep="\r\n")
    with pytest.raises(smtplib.SMTPDataError) as error:
        pipelined_sendmail(backend.connection, "alice@example.test", ["bob@example.test"], data)
    assert error.value.smtp_code == 421
    assert backend.connection.sock is None  # closed, no RSET sent into a dead channel
    assert "RSET" not in smtp.transcript
    backend.connection = None


@pytest.mark.parametrize("fault", ["close_at_rcpt", "close_after_data"])
def test_server_dropping_the_connection_mid_flight(connect, proxy, smtp, fault):
    """The server goes away inside a pipelined transaction: that message
    fails as a transport error, none counted as sent. Sent directly, nothing
    will send the rest of the batch later: they fail with it, logged (the
    queued path puts them back unattempted instead: test_outbox)."""
    connect("alice")
    setattr(smtp.faults, fault, True)
    backend = EmailBackend()
    with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
        backend.send_messages(messages(3))
    assert smtp.messages == []
    assert backend.connection is None
    logs = list(SendLog.objects.values_list("status", flat=True))
    assert logs == [SendLog.Status.FAILED] * 3
    # The next batch opens a fresh connection and goes out.
    setattr(smtp.faults, fault, False)
    assert EmailBackend().send_messages(messages(2)) == 2


def test_the_client_socket_sends_each_write_at_once(connect, proxy, smtp):
    """TCP_NODELAY: the EHLO that follows the TLS Finished (and any write
    after a write not yet acknowledged) goes out at once, not a round trip
    (or a 40 ms delayed ACK) later."""
    import socket

    mailbox = connect("alice")
    backend = EmailBackend(mailbox=mailbox)
    backend.open()
    try:
        sock = backend.connection.sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        backend.close()


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_message_fails_alone_in_its_batch(connect, proxy, smtp, pipelining):
    """The server refuses one message of a queued batch for good (552 at the
    end of DATA): that message fails, the rest of the batch is sent over the
    same connection; none is failed for another's refusal."""
    from mailgov import delivery
    from mailgov.outcomes import Outcome
    from tests.test_outbox import queue

    connect("alice")
    smtp.faults.no_pipelining = not pipelining
    smtp.faults.data_reply = "552 5.3.4 Message size exceeds fixed limit"
    smtp.faults.data_reply_count = 1
    queue("alice@example.test", count=4)
    proxy.reset_stats()
    assert delivery.deliver() == {Outcome.FAILED: 1, Outcome.SENT: 3}
    assert len(smtp.messages) == 3
    assert proxy.stats.connections == 1


def test_the_message_in_flight_alone_is_charged_after_a_drop(connect, proxy, smtp):
    """One queued batch; the server drops the connection at the end of the
    first message's data. That message loses an attempt; the other three,
    which the server never saw, go back to the queue with no failure, no
    backoff and no send log row."""
    from mailgov import delivery
    from mailgov.models import OutboxMessage
    from mailgov.outcomes import Outcome
    from tests.test_outbox import queue

    connect("alice")
    rows = queue("alice@example.test", count=4)
    smtp.faults.close_after_data = True
    assert delivery.deliver(max_batches=1) == {Outcome.RETRY: 1, Outcome.DEFERRED: 3}
    first, *rest = [OutboxMessage.objects.get(pk=row.pk) for row in rows]
    assert (first.state, first.failures, first.error_code) == ("queued", 1, "connection_lost")
    for row in rest:
        assert (row.state, row.failures, row.error_code) == ("queued", 0, "not_attempted")
        assert row.attempt_rows.get().outcome == Outcome.DEFERRED
    assert list(SendLog.objects.values_list("message_id", "status")) == [
        (first.message_id, SendLog.Status.FAILED)
    ]
    assert len(smtp.dropped_messages) == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_421_mid_batch_charges_that_message_only(connect, proxy, smtp, pipelining):
    """A 421 (not a throttling reply) ends the session at the first
    message's data: that message is retried later; the rest of the batch
    costs nothing and goes out at once over a new connection. (Before, the
    next message met the closed connection, "please run connect() first",
    and the whole batch was charged a failure.)"""
    from mailgov import delivery
    from mailgov.models import OutboxMessage
    from mailgov.outcomes import Outcome
    from tests.test_outbox import queue

    connect("alice")
    smtp.faults.no_pipelining = not pipelining
    rows = queue("alice@example.test", count=4)
    smtp.faults.data_reply = "421 4.3.2 Service shutting down, closing channel"
    smtp.faults.data_reply_count = 1
    proxy.reset_stats()
    assert delivery.deliver() == {Outcome.RETRY: 1, Outcome.DEFERRED: 3, Outcome.SENT: 3}
    first, *rest = [OutboxMessage.objects.get(pk=row.pk) for row in rows]
    assert (first.state, first.failures, first.error_code) == ("queued", 1, "smtp_421")
    assert [(row.state, row.failures) for row in rest] == [("sent", 0)] * 3
    assert len(smtp.messages) == 3
    assert proxy.stats.connections == 2
    statuses = sorted(SendLog.objects.values_list("status", flat=True))
    assert statuses == [SendLog.Status.FAILED] + [SendLog.Status.SENT] * 3


@pytest.mark.parametrize("pipelining", [True, False])
def test_eight_bit_content_is_announced_as_8bitmime(connect, smtp, settings, pipelining):
    """Django sends UTF-8 text as ``Content-Transfer-Encoding: 8bit``; RFC 6152
    asks for ``BODY=8BITMIME`` on MAIL FROM for such content (the server offers it)."""
    connect("alice")
    settings.MAILGOV_SMTP_PIPELINING = pipelining
    sent = EmailBackend().send_messages(
        [*messages(1, body="Grüße aus Zürich\n"), *messages(1, body="plain ascii\n")]
    )
    assert sent == 2
    eight, seven = smtp.messages
    assert b"8bit" in eight.data.lower() and not eight.data.isascii()
    assert "BODY=8BITMIME" in eight.mail_options
    assert eight.parse().get_content().startswith("Grüße aus Zürich")
    assert seven.data.isascii() and not any(o.startswith("BODY=") for o in seven.mail_options)
