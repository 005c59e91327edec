"""``make bench``, part 8: the send path at real network distances.

Loopback hides what costs users time: smtp.gmail.com and smtp.office365.com
are tens of milliseconds away. Here every SMTP byte goes through
:class:`mailgov.testing.latency.LatencyProxy` with a 10 ms one-way delay (a
20 ms round trip), which also counts the round trips each client pays. The
demo SMTP server runs in its own process behind it; the demo authorization
server stays on loopback (tokens are valid throughout: no refresh is timed).

a. One mailbox, 300 messages over one connection: Django's stock SMTP
   backend (password login, one command per round trip) against mailgov's
   (XOAUTH2, PIPELINING: MAIL, every RCPT and DATA in one flight), best of
   ``--rounds`` rounds (3), the backend that goes first alternating from one
   round to the next. Target: ``latency ratio mailgov/stock`` at least 1.8.
b. One mailbox, 300 messages through the queued backend, sent by three
   Celery workers (solo pool) on Redis, so that the mailbox gets the
   provider's three connections (``Quota.concurrency``). Timed from
   ``send_messages()`` until every outbox row is sent. Target: at least 2.5
   times the stock backend's messages/s of (a).
c. 100 mailboxes x 5 messages, queued, 2 workers: the time against two
   bounds, each printed as a fraction of it (1.00 would be the network
   alone). The first, ``round trips x 20 ms / 2``, takes the round trips
   counted at the proxy during the run, so a round trip the run wasted
   raises it too. The second is the protocol's minimum: one session per
   mailbox (``SESSION_ROUND_TRIPS``: TCP, EHLO, STARTTLS, the TLS 1.3
   handshake, EHLO, AUTH) and 2 round trips a message (PIPELINING),
   ``(6 x 100 + 2 x 500) x 20 ms / 2``.

(b) and (c) need Redis at 127.0.0.1:6379, as part 5 does.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.lifecycle import (
    QUEUED,
    connect_many,
    mint_tokens,
    redis_workers,
    sent_per_worker,
    stock_backend,
    wait_until_sent,
)

#: One-way delay of the link, seconds.
DELAY = 0.010
#: Messages in (b); in (a), messages a round, each backend sending them
#: once a round.
MESSAGES = 300
MAILBOXES, PER_MAILBOX = 100, 5
#: The round trips a session cannot do without, as the proxy counts them:
#: TCP's handshake (the proxy's ``connect_round_trips``), EHLO, STARTTLS,
#: the TLS 1.3 handshake (the client's Finished leaves with the next EHLO),
#: EHLO, AUTH. The greeting is no round trip of its own, and QUIT's reply
#: need not be waited for.
SESSION_ROUND_TRIPS = 6
#: A message's, with PIPELINING: MAIL, RCPT and DATA in one flight; the
#: content and its end of data.
MESSAGE_ROUND_TRIPS = 2


def message(sender: str, index: int) -> Any:
    from django.core.mail import EmailMessage

    return EmailMessage(
        f"Latency benchmark {index}", "A short body.\n" * 5, sender, ["recipient@example.test"]
    )


def bench_latency(
    authserver: Any, smtp_port: int, tls: Any, password: str, rounds: int = 3
) -> None:
    """Parts 8a to 8c, inside ``run.peers()`` (alice's mailbox connected; the
    SMTP server also takes ``bench@example.test`` with ``password``); 8a is
    the best of ``rounds`` rounds."""
    from django.conf import settings

    from mailgov.testing.latency import LatencyProxy
    from tests.workers.harness import redis_reachable

    provider = dict(settings.MAILGOV_PROVIDERS["demo"])
    with LatencyProxy("127.0.0.1", smtp_port, delay=DELAY) as proxy:
        settings.MAILGOV_PROVIDERS = {"demo": {**provider, "smtp_port": proxy.port}}
        print(
            f"latency: every SMTP byte through mailgov.testing.latency.LatencyProxy, "
            f"{DELAY * 1000:.0f} ms one way ({2 * DELAY * 1000:.0f} ms round trip); "
            "round trips counted at the proxy"
        )
        stock_rate = bench_one_connection(proxy, tls, password, rounds)
        if redis_reachable():
            bench_queued_latency(authserver, proxy, stock_rate)
        else:
            print("latency, queued: not run, Redis is not reachable at 127.0.0.1:6379")
    settings.MAILGOV_PROVIDERS = {"demo": provider}


def bench_one_connection(proxy: Any, tls: Any, password: str, rounds: int) -> float:
    """8a; returns the stock backend's messages/s (of its best round)."""
    from mailgov.backends.smtp import EmailBackend as MailgovBackend

    def stock() -> Any:
        return stock_backend(proxy.port, password, tls)

    def run(make_backend: Any, sender: str, count: int) -> tuple[float, int]:
        batch = [message(sender, i) for i in range(count)]
        proxy.reset_stats()
        start = time.perf_counter()
        sent = make_backend().send_messages(batch)
        elapsed = time.perf_counter() - start
        if sent != count:
            raise SystemExit(f"only {sent} of {count} messages were sent")
        return elapsed, proxy.stats.round_trips

    backends = {
        "stock": (stock, "bench@example.test"),
        "mailgov": (MailgovBackend, "alice@example.test"),
    }
    # Warm-up (discovery, the token, TLS contexts), and each session's cost
    # with one message, to tell set-up from per-message round trips.
    one_trips = {}
    for label, (make, sender) in backends.items():
        run(make, sender, 3)
        one_trips[label] = run(make, sender, 1)[1]
    # Rounds as the other parts take them, the order alternating so that
    # neither backend always runs first (on a warmer or a quieter machine).
    runs: dict[str, list[tuple[float, int]]] = {label: [] for label in backends}
    for number in range(rounds):
        for label in list(backends)[:: 1 if number % 2 == 0 else -1]:
            make, sender = backends[label]
            runs[label].append(run(make, sender, MESSAGES))
    results = {}
    for label in backends:
        elapsed, trips = min(runs[label])
        per_message = (trips - one_trips[label]) / (MESSAGES - 1)
        setup = one_trips[label] - per_message
        results[label] = (MESSAGES / elapsed, trips, per_message, setup)
    print(
        f"  a. one mailbox, {MESSAGES} messages, one connection, best of {rounds} "
        "rounds (which backend goes first alternates):"
    )
    for label, name in (
        ("stock", "stock SMTP backend (password)"),
        ("mailgov", "mailgov backend (XOAUTH2, PIPELINING)"),
    ):
        rate, trips, per_message, setup = results[label]
        print(
            f"     {name:38} {rate:6.1f} messages/s, {per_message:.2f} round trips a "
            f"message, {setup:.0f} for the session ({trips} in all)"
        )
    stock_rate = results["stock"][0]
    print(f"latency ratio mailgov/stock: {results['mailgov'][0] / stock_rate:.2f}")
    return stock_rate


def claims_in_flight() -> tuple[str, float]:
    """Messages sent per worker, and the seconds of all batches summed (from
    each claim's first attempt to its last outcome): divided by the elapsed
    time, how many connections were sending on average."""
    from django.db.models import Max, Min

    from mailgov.models import OutboxAttempt

    shares = sent_per_worker()
    sent = OutboxAttempt.objects.filter(outcome="sent")
    spans = sent.values("claim_id").annotate(start=Min("started_at"), end=Max("finished_at"))
    busy = sum((span["end"] - span["start"]).total_seconds() for span in spans)
    return "/".join(map(str, sorted(shares.values(), reverse=True))), busy


def bench_queued_latency(authserver: Any, proxy: Any, stock_rate: float) -> None:
    """8b and 8c, with real Celery workers on Redis sharing this process's
    SQLite file; the workers' SMTP traffic goes through ``proxy``."""
    from django.conf import settings
    from django.core.mail import get_connection

    from mailgov.conf import mailgov_settings
    from mailgov.models import OutboxMessage

    work = Path(tempfile.mkdtemp(prefix="mailgov-bench-latency-"))
    grants = mint_tokens(authserver, MAILBOXES, per_user="lat")
    connect_many("lat", grants, 0, MAILBOXES)

    def queued(batch: list[Any]) -> tuple[float, Any]:
        OutboxMessage.objects.all().delete()
        proxy.reset_stats()
        start = time.perf_counter()
        get_connection(QUEUED).send_messages(batch)
        wait_until_sent(len(batch), start, workers)
        return time.perf_counter() - start, proxy.stats

    with redis_workers("latency", 3, settings.MAILGOV_PROVIDERS, work) as workers:
        queued([message("alice@example.test", i) for i in range(6)])  # warm-up
        # b. one mailbox, the provider's concurrency.
        elapsed, stats = queued([message("alice@example.test", i) for i in range(MESSAGES)])
        rate = MESSAGES / elapsed
        shares, busy = claims_in_flight()
        print(
            f"  b. one mailbox, {MESSAGES} messages, queued, 3 workers (solo pool, Redis), "
            f"batches of {mailgov_settings.OUTBOX_BATCH_SIZE}: {rate:6.1f} messages/s, "
            f"{stats.round_trips / MESSAGES:.2f} round trips a message in all, "
            f"{stats.connections} new connections; sent per worker {shares}, "
            f"{busy / elapsed:.1f} batches in flight on average"
        )
        print(f"queued latency ratio (3 connections)/stock: {rate / stock_rate:.2f}")
        # c. 100 mailboxes x 5 messages, 2 workers.
        workers.pop().stop()
        batch = [
            message(f"lat-{n}@bench.test", i) for i in range(PER_MAILBOX) for n in range(MAILBOXES)
        ]
        queued(batch[:MAILBOXES])  # warm-up: every mailbox's token and discovery
        time.sleep(mailgov_settings.SMTP_IDLE_SECONDS + 0.5)  # kept connections closed
        elapsed, stats = queued(batch)
        bound = stats.round_trips * 2 * DELAY / len(workers)
        # The protocol's minimum does not grow with the round trips the run
        # wasted (more sessions than mailboxes, or a turn not pipelined).
        needed = SESSION_ROUND_TRIPS * MAILBOXES + MESSAGE_ROUND_TRIPS * len(batch)
        minimum = needed * 2 * DELAY / len(workers)
        print(
            f"  c. {MAILBOXES} mailboxes x {PER_MAILBOX} messages, queued, "
            f"{len(workers)} workers: {elapsed:.2f} s, {stats.connections} connections, "
            f"{stats.round_trips} round trips ({stats.round_trips / MAILBOXES:.1f} a mailbox); "
            f"bound {stats.round_trips} x {2 * DELAY * 1000:.0f} ms / {len(workers)} = "
            f"{bound:.2f} s; protocol minimum ({SESSION_ROUND_TRIPS} x {MAILBOXES} sessions + "
            f"{MESSAGE_ROUND_TRIPS} x {len(batch)} messages = {needed} round trips) x "
            f"{2 * DELAY * 1000:.0f} ms / {len(workers)} = {minimum:.2f} s"
        )
        print(f"latency time/bound (100x5, 2 workers): {elapsed / bound:.2f}")
        print(f"latency time/protocol minimum (100x5, 2 workers): {elapsed / minimum:.2f}")
