"""``make bench``, parts 4 to 6: the outbox and the grants' lifecycle.

Called by :mod:`tests.benchmarks.run` inside its ``peers()``: the demo
authorization server and SMTP server in processes of their own, alice's
mailbox connected. See its docstring for what each part measures.

4. Enqueueing (:func:`bench_enqueue`): the queued backend's
   ``send_messages()`` in one transaction against a ``bulk_create`` of the
   same rows, the payload given as stored ciphertext.
5. Queued delivery (:func:`bench_queued`): two real Celery workers on Redis
   (the harness of ``tests/test_workers.py``), sharing this process's SQLite
   file, against mailgov's SMTP backend sending directly.
6. The proactive refresh sweep (:func:`bench_refresh`),
   :func:`mailgov.lifecycle.refresh_expiring`. Mailboxes hold token pairs the
   demo authorization server really issued, so every refresh is a real one at
   its token endpoint (rotating the refresh token). Connecting thousands of
   mailboxes through the authorization-code flow would take longer than the
   sweep: the server mints the pairs in bulk (its ``authserver_mint_tokens``
   command), and each mailbox is connected with them through
   :func:`mailgov.services.connect_mailbox`, its own owner and address each.
   Then every access token is made to expire now. Figures: mailboxes
   refreshed per second by one sweep at the default
   ``MAILGOV_REFRESH_CONCURRENCY``; and the sweep's queries per mailbox,
   counted in one thread (``concurrency=1``: each thread has a connection of
   its own) at two sizes, which must be the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# -- 4 and 5. the outbox -----------------------------------------------------------
QUEUED = "mailgov.backends.queued.EmailBackend"


def outbox_messages(count: int, senders: list[str]) -> list[Any]:
    from django.core.mail import EmailMessage

    return [
        EmailMessage(
            f"Benchmark {i}", "A short body.\n" * 5, senders[i % len(senders)], ["r@example.test"]
        )
        for i in range(count)
    ]


def bench_outbox(authserver: Any, messages: int, rounds: int) -> None:
    """Parts 4 and 5, inside ``run.peers()`` (alice's mailbox connected)."""
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from tests.conftest import SCOPES, connect_through_flow
    from tests.workers.harness import redis_reachable

    owner, _ = get_user_model().objects.get_or_create(username="bob")
    connect_through_flow(authserver, owner, "bob", SCOPES)
    work = Path(tempfile.mkdtemp(prefix="mailgov-bench-outbox-"))
    bench_enqueue(messages, rounds, work / "broker")
    if redis_reachable():
        bench_queued(messages, rounds, settings.MAILGOV_PROVIDERS["demo"], work)
    else:
        print("queued: not run, Redis is not reachable at 127.0.0.1:6379")


def bench_enqueue(messages: int, rounds: int, folder: Path) -> None:
    from django.core.mail import get_connection
    from django.db import transaction
    from django.utils import timezone

    from mailgov.fields import Sealed
    from mailgov.models import Mailbox, OutboxMessage
    from project.settings import filesystem_broker
    from tests.workers.harness import use_broker

    # Nothing consumes this broker: the hint published on commit stays there.
    use_broker("filesystem://localhost/", filesystem_broker(folder))
    mailbox = Mailbox.objects.get(address="alice@example.test")

    def queued() -> float:
        OutboxMessage.objects.all().delete()
        batch = outbox_messages(messages, ["alice@example.test"])
        backend = get_connection(QUEUED)
        start = time.perf_counter()
        with transaction.atomic():
            stored = backend.send_messages(batch)
        elapsed = time.perf_counter() - start
        if stored != messages:
            raise SystemExit(f"only {stored} of {messages} messages were enqueued")
        return elapsed

    def bulk(shapes: list[tuple[str, int]]) -> float:
        OutboxMessage.objects.all().delete()
        start = time.perf_counter()
        now = timezone.now()
        with transaction.atomic():
            OutboxMessage.objects.bulk_create(
                OutboxMessage(
                    kind=OutboxMessage.Kind.MAIL,
                    mailbox=mailbox,
                    message_id=message_id,
                    recipient_count=1,
                    next_attempt_at=now,
                    created_at=now,
                    # Written as it is: no encryption.
                    payload=Sealed("x" * size),
                )
                for message_id, size in shapes
            )
        return time.perf_counter() - start

    queued()  # warm-up, and the rows the baseline copies
    shapes = [
        (message_id, len(payload.ciphertext))
        for message_id, payload in OutboxMessage.objects.values_list("message_id", "payload")
    ]
    if not any((folder / "queue").iterdir()):
        raise SystemExit("enqueue published nothing to the broker")
    bulk(shapes)
    runs = [(queued(), bulk(shapes)) for _ in range(rounds)]
    OutboxMessage.objects.all().delete()
    best_queued = min(q for q, _ in runs)
    best_bulk = min(b for _, b in runs)
    print(
        f"enqueue: {messages} messages from one mailbox in one transaction, best of {rounds} "
        "rounds; broker: kombu's filesystem transport in a temporary folder"
    )
    print(
        "  queued backend (checks, MIME serialization, encryption, insert, publish): "
        f"{best_queued * 1000:6.0f} ms"
    )
    print(
        "  bulk_create of the same rows, payload given as ciphertext:               "
        f"{best_bulk * 1000:6.0f} ms"
    )
    print(f"enqueue: {messages / best_queued:,.0f} messages/s")
    print(f"enqueue ratio queued/bulk_create: {best_queued / best_bulk:.2f}")


def wait_until_sent(count: int, start: float, workers: list[Any]) -> None:
    """Poll until ``count`` outbox rows are sent; give up, with the workers'
    logs, when a row ends otherwise or 300 s after ``start``."""
    from mailgov.models import OutboxMessage

    State = OutboxMessage.State
    rows = OutboxMessage.objects.filter(kind=OutboxMessage.Kind.MAIL)
    while rows.filter(state=State.SENT).count() < count:
        if (
            time.perf_counter() - start > 300
            or rows.exclude(state__in=[State.QUEUED, State.SENDING, State.SENT]).exists()
        ):
            states = Counter(rows.values_list("state", flat=True))
            logs = "\n".join(worker.log()[-2000:] for worker in workers)
            raise SystemExit(f"queued delivery stalled: {dict(states)}\n{logs}")
        time.sleep(0.01)


def sent_per_worker() -> Counter:
    """Messages sent by each worker, from the attempt rows. A batch's are
    finished after its send log, just after its messages show as sent (and
    the clock stopped): wait for the last ones first, a few seconds at most."""
    from mailgov.models import OutboxAttempt

    deadline = time.perf_counter() + 10
    while OutboxAttempt.objects.filter(outcome="started").exists():
        if time.perf_counter() > deadline:
            break
        time.sleep(0.01)
    return Counter(OutboxAttempt.objects.filter(outcome="sent").values_list("worker", flat=True))


def stock_backend(port: int, password: str, tls: Any) -> Any:
    """Django's stock SMTP backend, logging in as ``bench@example.test`` with
    ``password`` over STARTTLS, trusting the demo CA."""
    import ssl

    from django.core.mail.backends.smtp import EmailBackend

    backend = EmailBackend(
        host="127.0.0.1",
        port=port,
        username="bench@example.test",
        password=password,
        use_tls=True,
        timeout=30,
    )
    backend.ssl_context = ssl.create_default_context(cafile=str(tls.ca_cert))
    return backend


@contextlib.contextmanager
def redis_workers(
    name: str, count: int, providers: dict[str, Any], work: Path
) -> Iterator[list[Any]]:
    """``count`` real Celery workers (solo pool) on Redis at 127.0.0.1:6379,
    started, sharing this process's database and ``providers``; this process
    publishes to the same broker. Afterwards: the workers stopped, the outbox
    emptied, and the broker's keys deleted (a key prefix of its own: no
    other run's messages, none left behind)."""
    import uuid

    import redis

    from mailgov.models import OutboxMessage
    from tests.workers.harness import REDIS, Worker, use_broker, worker_env

    prefix = f"mailgov-bench-{uuid.uuid4().hex[:12]}:"
    broker = {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "CELERY_BROKER_KEYPREFIX": prefix}
    use_broker(
        broker["CELERY_BROKER_URL"], {"visibility_timeout": 3600, "global_keyprefix": prefix}
    )
    env = worker_env(providers, broker)
    workers = [Worker(f"{name}{n}", env, work) for n in range(count)]
    started = list(workers)
    try:
        for worker in started:
            worker.start()
        yield workers
    finally:
        for worker in started:
            worker.stop()
        OutboxMessage.objects.all().delete()
        client = redis.Redis(*REDIS)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


def bench_queued(messages: int, rounds: int, provider: dict[str, Any], work: Path) -> None:

    from django.core.mail import get_connection

    from mailgov.conf import mailgov_settings
    from mailgov.models import OutboxMessage

    both = ["alice@example.test", "bob@example.test"]
    OutboxMessage.objects.all().delete()

    def direct() -> float:
        batch = outbox_messages(messages, both)
        backend = get_connection("mailgov.backends.smtp.EmailBackend")
        start = time.perf_counter()
        sent = backend.send_messages(batch)
        elapsed = time.perf_counter() - start
        if sent != messages:
            raise SystemExit(f"only {sent} of {messages} messages were sent")
        return elapsed

    def queued(senders: list[str]) -> tuple[float, float, str]:
        """Seconds until all are sent, seconds to enqueue, messages sent per worker."""
        OutboxMessage.objects.all().delete()
        batch = outbox_messages(messages, senders)
        backend = get_connection(QUEUED)
        start = time.perf_counter()
        backend.send_messages(batch)
        enqueued = time.perf_counter() - start
        wait_until_sent(messages, start, workers)
        elapsed = time.perf_counter() - start
        shares = sent_per_worker()
        counts = sorted(shares.values(), reverse=True) + [0] * (len(workers) - len(shares))
        return elapsed, enqueued, "/".join(map(str, counts))

    with redis_workers("bench", 2, {"demo": provider}, work) as workers:
        direct(), queued(both)  # warm-up: connections, discovery, tokens
        runs = [(direct(), queued(both), queued(both[:1])) for _ in range(rounds)]
    best_direct = min(run[0] for run in runs)
    two = min((run[1] for run in runs), key=lambda q: q[0])
    one = min((run[2] for run in runs), key=lambda q: q[0])
    print(
        f"queued: {messages} messages, best of {rounds} rounds; 2 Celery workers (solo pool) "
        f"on Redis, batches of {mailgov_settings.OUTBOX_BATCH_SIZE}; timed from "
        "send_messages() until every outbox row is sent; one hint per mailbox"
    )
    print(
        f"  direct, mailgov SMTP backend (one send_messages()), alice and bob: "
        f"{messages / best_direct:6.0f} messages/s"
    )
    for label, (elapsed, enqueued, shares) in (
        ("queued, alice and bob (1,000 each):", two),
        ("queued, alice only:", one),
    ):
        print(
            f"  {label:67} {messages / elapsed:6.0f} messages/s (enqueue "
            f"{enqueued * 1000:.0f} ms; sent per worker {shares})"
        )
    print(f"queued ratio (2 workers, redis)/direct: {best_direct / two[0]:.2f}")


# -- 6. the refresh sweep --------------------------------------------------------
#: Mailboxes in the timed sweep (``--sweep-mailboxes``). 10,000 were asked
#: for, but the demo server refreshes about 60 tokens a second (17 of every
#: 20 ms go to its token endpoint), so 10,000 take 3.5 minutes with the set-up
#: (at the same rate per mailbox as 5,000): 5,000 keep the part under two.
SWEEP_MAILBOXES = 5_000
#: The two sizes whose queries are counted.
COUNTED = (50, 200)


def mint_tokens(authserver: Any, count: int, per_user: str | None = None) -> dict[str, Any]:
    """``count`` access/refresh token pairs issued by ``authserver`` to alice,
    or with ``per_user`` to ``count`` users ``<per_user>-<n>`` (addresses
    ``<per_user>-<n>@bench.test``), one pair each."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "mailgov.testing.authserver.settings",
        "MAILGOV_AUTHSERVER_DIR": str(authserver.data_dir),
        "MAILGOV_AUTHSERVER_URL": authserver.url,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "authserver_mint_tokens",
            "--count",
            str(count),
            "--client-id",
            authserver.client_id,
            "--settings=mailgov.testing.authserver.settings",
            *(["--users-prefix", per_user] if per_user else []),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"minting tokens failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def connect_many(prefix: str, grants: dict[str, Any], start: int, count: int) -> None:
    """Connect ``count`` mailboxes ``<prefix>-<n>@bench.test``, each with its own
    owner, from the minted pairs ``start`` to ``start + count``."""
    from django.contrib.auth import get_user_model

    from mailgov.providers import TokenResponse
    from mailgov.services import connect_mailbox

    User = get_user_model()
    owners = User.objects.bulk_create(User(username=f"{prefix}-{n}") for n in range(count))
    scopes = grants["scope"].split()
    for n, (owner, (access, refresh)) in enumerate(
        zip(owners, grants["tokens"][start : start + count], strict=True)
    ):
        connect_mailbox(
            owner=owner,
            provider_id="demo",
            response=TokenResponse(access, refresh, grants["expires_in"], scopes),
            address=f"{prefix}-{n}@bench.test",
            requested_scopes=scopes,
        )


def expire(prefix: str) -> int:
    """Make the access tokens of ``prefix``'s mailboxes expire now: all due."""
    from django.utils import timezone

    from mailgov.models import MailboxCredentials

    return MailboxCredentials.objects.filter(mailbox__address__startswith=f"{prefix}-").update(
        expires_at=timezone.now()
    )


def sweep(expected: int, **kwargs: Any) -> dict[str, int]:
    from mailgov.lifecycle import refresh_expiring

    counts = refresh_expiring(**kwargs)
    if counts["refreshed"] != expected:
        raise SystemExit(f"the refresh sweep refreshed {counts}, not {expected} mailboxes")
    return counts


def bench_refresh(authserver: Any, mailboxes: int) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from mailgov.conf import mailgov_settings

    begin = time.perf_counter()
    grants = mint_tokens(authserver, mailboxes + sum(COUNTED))
    minted = time.perf_counter() - begin
    start = 0
    for size in (*COUNTED, mailboxes):
        connect_many(f"sweep{size}", grants, start, size)
        start += size
    connected = time.perf_counter() - begin - minted

    # Queries, in this thread (with threads, each has its own connection).
    queries = {}
    for size in COUNTED:
        expire(f"sweep{size}")
        with CaptureQueriesContext(connection) as captured:
            sweep(size, concurrency=1)
        queries[size] = len(captured.captured_queries)

    expire(f"sweep{mailboxes}")
    start = time.perf_counter()
    counts = sweep(mailboxes)
    elapsed = time.perf_counter() - start

    small, large = COUNTED
    per_mailbox = (queries[large] - queries[small]) / (large - small)
    fixed = queries[small] - small * per_mailbox
    print(
        f"refresh sweep: {mailboxes} mailboxes whose tokens expire now, refreshed at the demo "
        f"authorization server, concurrency {mailgov_settings.REFRESH_CONCURRENCY}; "
        f"{counts['refreshed']} refreshed in {elapsed:.1f} s"
    )
    print(
        f"  set up: {mailboxes + small + large} token pairs minted by the server in "
        f"{minted:.1f} s, mailboxes connected in {connected:.1f} s"
    )
    print(f"refresh sweep: {counts['refreshed'] / elapsed:,.0f} mailboxes/s")
    print(
        f"refresh sweep queries per mailbox: {queries[small] / small:.2f} at {small} "
        f"mailboxes, {queries[large] / large:.2f} at {large} ({per_mailbox:.2f} per mailbox "
        f"+ {fixed:.0f} per sweep)"
    )
