"""``make bench``: mailgov's speed, as ratios against a baseline run in the same process.

1. Sending: 2,000 messages through Django's stock SMTP backend (password
   login) and through mailgov's backend (XOAUTH2, token from the demo
   authorization server), on one demo SMTP server running in its own process.
   Target: ``send ratio mailgov/stock`` at least 0.95.
2. The vault: encrypt+decrypt microseconds per value against raw ``AESGCM``.
   Target: at most 2x raw.
3. Key rotation: values re-encrypted per second over 100,000 rows, on SQLite
   and on PostgreSQL (when reachable at 127.0.0.1:5432). Target: 20,000/s.
   Then the same rotation again, in a process of its own, while this process
   sends (each send refreshes its token first): the longest send latency
   during the rotation next to one batch's duration and to the longest send
   latency with no rotation running.
4. Enqueueing: 2,000 messages through ``mailgov.backends.queued.EmailBackend``
   in one transaction (checks, MIME serialization, encryption, insert, and
   the hint published on commit, to kombu's filesystem transport in a
   temporary folder) against a ``bulk_create`` of the same rows with the
   payload given as stored ciphertext (none of that work). Target: ``enqueue ratio
   queued/bulk_create`` at most 3.
5. Queued delivery: 2,000 messages from two mailboxes (alice's and bob's),
   enqueued with one ``send_messages()`` and sent by two Celery worker
   processes on Redis at 127.0.0.1:6379, timed until every outbox row is
   sent, against mailgov's SMTP backend sending them directly, on the same
   peers. Target: ``queued ratio (2 workers, redis)/direct`` at least 0.8.
   Also shown: the same from alice alone (one hint: one worker sends it all).
   Not run without Redis.
6. The refresh sweep: mailboxes/s over 5,000 mailboxes (``--sweep-mailboxes``)
   whose tokens expire now, refreshed at the demo authorization server; and
   its queries per mailbox at 50 and 200 mailboxes. Target: the same number
   of queries per mailbox at both sizes.

7. Governance at scale: containment of 100,000 mailboxes (target: under
   1 s) and the admin's mailbox list at 100,000 mailboxes, on SQLite and on
   PostgreSQL (:mod:`tests.benchmarks.governance`).
8. The send path at real network distances, through a latency proxy at
   10 ms one way: the stock backend against mailgov's (PIPELINING) over one
   connection (target: ``latency ratio`` at least 1.8); one mailbox queued
   over the provider's three connections (target: 2.5 times stock); 100
   mailboxes x 5 messages with 2 workers against the network's bound
   (:mod:`tests.benchmarks.latency`).

Parts 4 to 6 are in :mod:`tests.benchmarks.lifecycle`.

Not a test: nothing here asserts; it prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.benchmarks.governance import bench_governance
from tests.benchmarks.latency import bench_latency
from tests.benchmarks.lifecycle import SWEEP_MAILBOXES, bench_outbox, bench_refresh, stock_backend

ROOT = Path(__file__).resolve().parents[2]


def setup_django(var_dir: Path, database_url: str | None = None) -> None:
    os.environ["MAILGOV_VAR_DIR"] = str(var_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", "--no-input", verbosity=0)


@contextlib.contextmanager
def peers(password_accounts: dict[str, str] | None = None) -> Iterator[tuple[Any, int, Any]]:
    """The demo authorization server and SMTP server in processes of their own,
    with the ``demo`` provider pointed at them and alice's mailbox connected.
    Yields ``(authserver, smtp port, TLS files)``."""
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from mailgov.testing.ca import ensure_tls_files
    from mailgov.testing.peers import free_port, start_authserver, start_smtpserver_process
    from tests.conftest import REDIRECT_URI, SCOPES, connect_through_flow, provider_config

    work = Path(tempfile.mkdtemp(prefix="mailgov-bench-"))
    tls = ensure_tls_files(work / "tls")
    with start_authserver(work / "authserver", redirect_uris=[REDIRECT_URI]) as authserver:
        port = free_port()
        smtp = start_smtpserver_process(
            authserver,
            port=port,
            tls_dir=tls.ca_cert.parent,
            password_accounts=password_accounts or {},
            # A provider checks its own tokens without a network round trip;
            # caching the demo server's introspection answer keeps that cost
            # out of figures meant to measure the client.
            introspection_cache_seconds=300,
            log_path=work / "smtp.log",
            cwd=ROOT,
        )
        try:
            settings.MAILGOV_PROVIDERS = {"demo": provider_config(authserver, port, tls)}
            owner, _ = get_user_model().objects.get_or_create(username="alice")
            connect_through_flow(authserver, owner, "alice", SCOPES)
            yield authserver, port, tls
        finally:
            smtp.stop()


# -- 1. sending -------------------------------------------------------------------
def bench_send(messages: int, batch: int, rounds: int) -> None:
    import secrets

    from django.core.mail import EmailMessage

    from mailgov.backends.smtp import EmailBackend as MailgovBackend

    password = secrets.token_urlsafe(16)
    with peers({"bench@example.test": password}) as (_authserver, port, tls):

        def stock():
            return stock_backend(port, password, tls)

        def run(make_backend, sender: str) -> float:
            batches = [
                [
                    EmailMessage(
                        f"Benchmark {i + j}",
                        "A short body.\n" * 5,
                        sender,
                        ["recipient@example.test"],
                    )
                    for j in range(batch)
                ]
                for i in range(0, messages, batch)
            ]
            start = time.perf_counter()
            sent = 0
            for group in batches:
                sent += make_backend().send_messages(group)
            elapsed = time.perf_counter() - start
            if sent != messages:
                raise SystemExit(f"only {sent} of {messages} messages were sent")
            return messages / elapsed

        run(stock, "bench@example.test")  # warm-up
        run(MailgovBackend, "alice@example.test")
        stock_rates, ours = [], []
        for _ in range(rounds):
            stock_rates.append(run(stock, "bench@example.test"))
            ours.append(run(MailgovBackend, "alice@example.test"))
        best_stock, best_ours = max(stock_rates), max(ours)
        print(f"send: {messages} messages in batches of {batch}, best of {rounds} rounds")
        print(f"  stock SMTP backend (password): {best_stock:8.0f} messages/s")
        print(f"  mailgov backend (XOAUTH2):     {best_ours:8.0f} messages/s")
        print(f"send ratio mailgov/stock: {best_ours / best_stock:.2f}")


# -- 2. the vault ------------------------------------------------------------------
def bench_vault(values: int) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from mailgov import crypto

    token = "ya29.a0AfB_byC" + "x" * 180  # about the size of a Google access token
    key = AESGCM(AESGCM.generate_key(bit_length=256))
    aad = b"mg1|mailgov.mailboxcredentials|access_token|7d1c0f52-6c8e-4a47-9d0e-2f3a1b5c9e11|k1"
    data = token.encode()

    def raw() -> float:
        start = time.perf_counter()
        for _ in range(values):
            nonce = os.urandom(12)
            key.decrypt(nonce, key.encrypt(nonce, data, aad), aad).decode()
        return (time.perf_counter() - start) / values * 1e6

    label, field_name = "mailgov.mailboxcredentials", "access_token"
    pk = "7d1c0f52-6c8e-4a47-9d0e-2f3a1b5c9e11"

    def ours() -> float:
        # The binding is built per value, as the encrypted field does.
        start = time.perf_counter()
        for _ in range(values):
            crypto.decrypt(
                crypto.encrypt(token, crypto.binding(label, field_name, pk)),
                crypto.binding(label, field_name, pk),
            )
        return (time.perf_counter() - start) / values * 1e6

    raw(), ours()  # warm-up
    # Interleaved, so that a change in machine load hits both alike.
    runs = [(raw(), ours()) for _ in range(5)]
    best_raw = min(r for r, _ in runs)
    best_ours = min(o for _, o in runs)
    print(f"vault: encrypt+decrypt of a {len(token)}-character token, {values} values")
    print(f"  raw AESGCM:    {best_raw:6.2f} us/value")
    print(f"  mailgov vault: {best_ours:6.2f} us/value")
    print(f"vault ratio mailgov/raw: {best_ours / best_raw:.2f}")


# -- 3. rotation -------------------------------------------------------------------
def bench_rotation(rows: int) -> None:
    import json
    import statistics

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.mail import send_mail
    from django.db import connection
    from django.test import override_settings

    from mailgov.conf import mailgov_settings
    from mailgov.crypto import generate_key_entry, reset_keyring
    from mailgov.models import Mailbox, MailboxCredentials
    from mailgov.services import key_usage, rotate_keys

    old, new, newer = (generate_key_entry(name) for name in ("old", "new", "newer"))
    owner, _ = get_user_model().objects.get_or_create(username="rotation-owner")
    MailboxCredentials.objects.all().delete()
    Mailbox.objects.all().delete()
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[old]):
        reset_keyring()
        for start in range(0, rows, 5000):
            boxes = Mailbox.objects.bulk_create(
                Mailbox(owner=owner, provider="demo", address=f"u{n}@x.test", status="suspended")
                for n in range(start, min(rows, start + 5000))
            )
            MailboxCredentials.objects.bulk_create(
                MailboxCredentials(
                    mailbox=box, access_token=f"access-{box.pk}", refresh_token=f"refresh-{box.pk}"
                )
                for box in boxes
            )
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[new, old]):
        reset_keyring()
        start = time.perf_counter()
        result = rotate_keys()
        elapsed = time.perf_counter() - start
        usage = key_usage()
    if usage != {"new": 2 * rows}:
        raise SystemExit(f"rotation left {usage}")
    vendor = connection.vendor
    print(
        f"rotation ({vendor}): {result.rotated} values in {rows} rows, "
        f"{elapsed:.1f} s: {result.rotated / elapsed:,.0f} values/s (target 20,000)"
    )

    # The same rotation again (to a newer key), run by a process of its own
    # as mailgov_rotate_keys is, while this process sends mail through a
    # mailbox whose token is expired before every send: each send writes the
    # credentials row (refresh), the mailbox and the send log.
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[new, old]):
        reset_keyring()
        with peers():
            settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
            mailbox = Mailbox.objects.get(address="alice@example.test")

            def send_one() -> float:
                begin = time.perf_counter()
                MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
                if send_mail("Rotation", "x", "alice@example.test", ["z@x.test"]) != 1:
                    raise SystemExit("a send during rotation failed")
                return time.perf_counter() - begin

            with override_settings(MAILGOV_ENCRYPTION_KEYS=[newer, new, old]):
                reset_keyring()
                alone = [send_one() for _ in range(20)]
                worker = subprocess.Popen(
                    [sys.executable, "-m", "tests.workers.rotate"],
                    cwd=ROOT,
                    env={
                        **os.environ,
                        "MAILGOV_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
                        "MAILGOV_TEST_KEYS": json.dumps([newer, new, old]),
                        "MAILGOV_TEST_BATCH_SIZE": str(mailgov_settings.ROTATION_BATCH_SIZE),
                    },
                    stdout=subprocess.PIPE,
                    text=True,
                )
                during = []
                while worker.poll() is None:
                    during.append(send_one())
                out, _ = worker.communicate()
                if worker.returncode != 0:
                    raise SystemExit("the rotation worker failed")
                reset_keyring()
                usage = key_usage()
    if usage != {"newer": 2 * (rows + 1)}:
        raise SystemExit(f"rotation while sending left {usage}")
    report = json.loads(out.strip().splitlines()[-1])
    ends = report["batch_ends"]
    batches = [b - a for a, b in zip([report["started"], *ends], ends, strict=False)]
    print(
        f"  while sending ({vendor}): rotation {ends[-1] - report['started']:.1f} s in "
        f"{len(ends)} batches of {mailgov_settings.ROTATION_BATCH_SIZE} rows, one batch "
        f"{statistics.median(batches) * 1000:.0f} ms (longest {max(batches) * 1000:.0f} ms); "
        f"{len(during)} sends"
    )
    print(
        f"  send latency: alone median {statistics.median(alone) * 1000:.0f} ms, "
        f"longest {max(alone) * 1000:.0f} ms; during rotation median "
        f"{statistics.median(during) * 1000:.0f} ms, longest {max(during) * 1000:.0f} ms"
    )
    print(
        f"rotation send latency ratio during/alone ({vendor}, longest): "
        f"{max(during) / max(alone):.2f}"
    )


def postgres_url() -> str | None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), 2).close()
    except OSError:
        return None
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as db:
        db.execute("DROP DATABASE IF EXISTS mailgov_bench")
        db.execute("CREATE DATABASE mailgov_bench")
    return "postgres://postgres@127.0.0.1:5432/mailgov_bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        choices=[
            "all",
            "send",
            "vault",
            "rotation",
            "outbox",
            "refresh",
            "governance",
            "latency",
        ],
        default="all",
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sweep-mailboxes", type=int, default=SWEEP_MAILBOXES)
    parser.add_argument("--database-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.part in ("rotation", "governance") and args.database_url is not None:
        # A child run: one database.
        setup_django(Path(tempfile.mkdtemp(prefix="mailgov-bench-")), args.database_url or None)
        (bench_rotation if args.part == "rotation" else bench_governance)(args.rows)
        return 0

    if args.part in ("all", "send", "vault", "outbox", "refresh", "latency"):
        setup_django(Path(tempfile.mkdtemp(prefix="mailgov-bench-")))
    if args.part in ("all", "send"):
        bench_send(args.messages, args.batch, args.rounds)
    if args.part in ("all", "vault"):
        bench_vault(20_000)
    if args.part in ("all", "outbox"):
        with peers() as (authserver, _port, _tls):
            bench_outbox(authserver, args.messages, args.rounds)
    if args.part in ("all", "refresh"):
        with peers() as (authserver, _port, _tls):
            bench_refresh(authserver, args.sweep_mailboxes)
    if args.part in ("all", "latency"):
        password = secrets.token_urlsafe(16)
        with peers({"bench@example.test": password}) as (authserver, port, tls):
            bench_latency(authserver, port, tls, password, args.rounds)
    for part in ("rotation", "governance"):
        if args.part not in ("all", part):
            continue
        # Each database in its own process, with its own settings.
        url = postgres_url()
        runs = [("", "SQLite")] + ([(url, "PostgreSQL")] if url else [])
        for database_url, _name in runs:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.benchmarks.run",
                    "--part",
                    part,
                    "--rows",
                    str(args.rows),
                    "--database-url",
                    database_url,
                ],
                cwd=ROOT,
                check=True,
            )
        if not url:
            print(f"{part} (postgresql): not run, PostgreSQL is not reachable at 127.0.0.1:5432")
    return 0


if __name__ == "__main__":
    sys.exit(main())
