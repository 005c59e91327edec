"""Real Celery workers, in their own processes, on real brokers: nothing lost.

Each test runs on kombu's filesystem transport (the embedded default) and on
Redis at 127.0.0.1:6379 (production's). Redis is required in CI; elsewhere
its runs are skipped, and say so, when no Redis answers. Every test asserts
what the SMTP server finally holds and what the outbox recorded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from django.core.mail import EmailMessage, get_connection
from django.db import connection
from django.utils import timezone

from mailgov import outbox
from mailgov.models import MailboxCredentials, OutboxAttempt, OutboxMessage
from mailgov.testing.latency import LatencyProxy
from project.celery import app
from project.settings import filesystem_broker
from tests.conftest import SCOPES, connect_through_flow, refresh_token_state
from tests.workers.harness import (
    ROOT,
    Worker,
    broker_state,
    redis_reachable,
    use_broker,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

State = OutboxMessage.State
QUEUED = "mailgov.backends.queued.EmailBackend"


@pytest.fixture(params=["filesystem", "redis"])
def broker(request, tmp_path):
    """Point this process's Celery app and the workers at a fresh broker."""
    if request.param == "redis":
        if not redis_reachable():
            if os.environ.get("CI"):
                pytest.fail("Redis must run at 127.0.0.1:6379 in CI")
            pytest.skip("no Redis at 127.0.0.1:6379")
        env = {
            "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
            # A key prefix per test: no other run's messages, none left behind.
            "CELERY_BROKER_KEYPREFIX": f"mailgov-test-{uuid.uuid4().hex[:12]}:",
        }
        options = {"visibility_timeout": 3600, "global_keyprefix": env["CELERY_BROKER_KEYPREFIX"]}
    else:
        folder = tmp_path / "broker"
        env = {"CELERY_BROKER_URL": "filesystem://localhost/", "MAILGOV_BROKER_DIR": str(folder)}
        options = filesystem_broker(folder)
    restore = broker_state()
    use_broker(env["CELERY_BROKER_URL"], options)
    yield env
    restore()


@pytest.fixture
def workers(broker, demo_provider, tmp_path, request):
    """``start(n, **settings)`` starts n workers; all are stopped at the end,
    and their logs shown if the test failed."""
    started: list[Worker] = []

    def start(count: int = 1, *, kill_after_accept: bool = False, **settings) -> list[Worker]:
        env = worker_env(
            {"demo": demo_provider},
            broker,
            MAILGOV_TEST_SETTINGS=json.dumps({f"MAILGOV_{k}": v for k, v in settings.items()}),
            MAILGOV_TEST_KILL_AFTER_ACCEPT="1" if kill_after_accept else "",
        )
        batch = [Worker(f"w{len(started) + i}", env, tmp_path) for i in range(count)]
        started.extend(batch)
        for worker in batch:
            worker.start()
        return batch

    yield start
    for worker in started:
        worker.stop()
    if request.node.rep_call_failed if hasattr(request.node, "rep_call_failed") else False:
        for worker in started:
            print(worker.log()[-4000:])


@pytest.fixture
def two_boxes(authserver, demo_provider, site_user):
    return [
        connect_through_flow(authserver, site_user(name), name, SCOPES) for name in ("alice", "bob")
    ]


def enqueue(sender: str, count: int, *, subject: str = "Worker test") -> list[OutboxMessage]:
    backend = get_connection(QUEUED)
    messages = [
        EmailMessage(f"{subject} {i}", "Body.", sender, ["carol@example.test"])
        for i in range(count)
    ]
    backend.send_messages(messages)  # autocommit: published at once
    return [message.outbox_id for message in messages]


def states() -> Counter:
    return Counter(
        OutboxMessage.objects.filter(kind=OutboxMessage.Kind.MAIL).values_list("state", flat=True)
    )


def message_ids(smtp) -> Counter:
    return Counter(m.parse()["Message-ID"] for m in smtp.messages)


# -- tests -----------------------------------------------------------------------------


def test_two_workers_send_500_messages_exactly_once(workers, two_boxes, smtp):
    # Small batches: many claims, both workers on each mailbox (fan-out).
    workers(2, OUTBOX_BATCH_SIZE=10)
    ids = enqueue("alice@example.test", 250) + enqueue("bob@example.test", 250)
    wait_for(lambda: states()[State.SENT] == 500, 180, "500 messages sent")
    received = message_ids(smtp)
    expected = set(OutboxMessage.objects.values_list("message_id", flat=True))
    assert set(received) == expected and len(expected) == 500
    assert max(received.values()) == 1  # none twice
    assert len(ids) == 500
    # Both workers took part, and every attempt is recorded once.
    workers_seen = set(OutboxAttempt.objects.values_list("worker", flat=True))
    assert len(workers_seen) == 2
    assert OutboxAttempt.objects.filter(outcome="sent").count() == 500


def test_a_worker_killed_after_data_loses_nothing(workers, two_boxes, smtp):
    [doomed] = workers(1, kill_after_accept=True, OUTBOX_LEASE_SECONDS=2)
    [row_id] = enqueue("alice@example.test", 1)
    # SIGKILL after the server accepted the message, before the row was marked.
    assert doomed.wait_exit(60) is not None, doomed.log()
    assert len(smtp.messages) == 1
    row = OutboxMessage.objects.get(pk=row_id)
    assert row.state == State.SENDING
    workers(1, OUTBOX_LEASE_SECONDS=2)
    time.sleep(2.5)  # the lease runs out
    outbox.dispatch()  # what beat runs every few seconds
    wait_for(lambda: OutboxMessage.objects.get(pk=row_id).state == State.SENT, 60, "resent")
    # At least once, and any duplicate carries the same Message-ID.
    assert message_ids(smtp) == Counter({row.message_id: 2})
    outcomes = list(
        OutboxAttempt.objects.filter(message_id=row_id)
        .order_by("started_at")
        .values_list("outcome", "worker")
    )
    assert [o for o, _ in outcomes] == ["interrupted", "sent"]
    assert outcomes[0][1] != outcomes[1][1]


def test_dropped_connection_and_4xx_are_retried_until_delivered(workers, two_boxes, smtp):
    workers(1, OUTBOX_RETRY_BASE_SECONDS=1, OUTBOX_RETRY_MAX_SECONDS=1)
    smtp.faults.close_after_data = True
    [first] = enqueue("alice@example.test", 1)
    wait_for(lambda: OutboxMessage.objects.get(pk=first).failures == 1, 60, "a failed attempt")
    smtp.faults.close_after_data = False
    smtp.faults.data_reply = "454 4.7.0 Temporary authentication failure"
    smtp.faults.data_reply_count = 1
    time.sleep(1.2)
    outbox.dispatch()
    wait_for(lambda: OutboxMessage.objects.get(pk=first).failures == 2, 60, "a 454")
    time.sleep(1.2)
    outbox.dispatch()
    wait_for(lambda: OutboxMessage.objects.get(pk=first).state == State.SENT, 60, "delivery")
    row = OutboxMessage.objects.get(pk=first)
    assert message_ids(smtp) == Counter({row.message_id: 1})
    assert len(smtp.dropped_messages) == 1
    outcomes = list(row.attempt_rows.order_by("started_at").values_list("outcome", "error_code"))
    assert outcomes == [("retry", "connection_lost"), ("retry", "smtp_454"), ("sent", "")]


def test_a_throttling_reply_pauses_then_delivers(workers, two_boxes, smtp, settings):
    workers(1)
    smtp.faults.data_reply = "421 4.7.0 Try again later, closing connection."
    smtp.faults.data_reply_count = 1
    ids = enqueue("alice@example.test", 3)
    wait_for(
        lambda: two_boxes[0].__class__.objects.get(pk=two_boxes[0].pk).sending_paused_until,
        60,
        "the pause",
    )
    assert all(OutboxMessage.objects.get(pk=pk).state == State.QUEUED for pk in ids)
    assert smtp.messages == []
    # The pause ends (moved to now rather than waited for); the sweep resumes.
    type(two_boxes[0]).objects.filter(pk=two_boxes[0].pk).update(
        sending_paused_until=timezone.now()
    )
    OutboxMessage.objects.update(next_attempt_at=timezone.now())
    outbox.dispatch()
    wait_for(lambda: states()[State.SENT] == 3, 60, "delivery after the pause")
    assert len(smtp.messages) == 3


def test_the_broker_down_at_enqueue_loses_nothing(workers, two_boxes, smtp, broker, caplog):
    good = (os.environ["CELERY_BROKER_URL"], dict(app.conf.broker_transport_options))
    # Nothing listens on this port: publishing fails after the commit.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    use_broker(f"redis://127.0.0.1:{dead_port}/0", {})
    ids = enqueue("alice@example.test", 5)
    assert "broker unreachable" in caplog.text
    assert OutboxMessage.objects.filter(pk__in=ids, state=State.QUEUED).count() == 5
    use_broker(*good)
    workers(1)
    time.sleep(1)
    assert smtp.messages == []  # no hint reached any broker
    outbox.dispatch()  # beat's sweep publishes again
    wait_for(lambda: states()[State.SENT] == 5, 60, "delivery after the broker came back")
    assert len(message_ids(smtp)) == 5


def test_503_from_the_token_endpoint_then_recovery(workers, two_boxes, smtp, authserver):
    alice = two_boxes[0]
    MailboxCredentials.objects.filter(pk=alice.pk).update(expires_at=timezone.now())
    authserver.set_faults(token=503)
    try:
        workers(1, OUTBOX_RETRY_BASE_SECONDS=1, OUTBOX_RETRY_MAX_SECONDS=1)
        [row_id] = enqueue("alice@example.test", 1)
        # The row's deferral is written first, the mailbox's pause after it.
        wait_for(
            lambda: (
                OutboxMessage.objects.get(pk=row_id).error_code == "provider_unavailable"
                and type(alice).objects.get(pk=alice.pk).sending_paused_until
            ),
            60,
            "a deferral and the mailbox's pause",
        )
        row = OutboxMessage.objects.get(pk=row_id)
        # No connection could be made: the mailbox waits, the message loses no attempt.
        assert (row.state, row.failures) == (State.QUEUED, 0)
        mailbox = type(alice).objects.get(pk=alice.pk)
        assert mailbox.status == "active" and mailbox.sending_paused_until  # tokens kept
    finally:
        authserver.clear_faults()
    time.sleep(1.2)
    outbox.dispatch()
    wait_for(lambda: OutboxMessage.objects.get(pk=row_id).state == State.SENT, 60, "delivery")
    assert len(smtp.messages) == 1


def test_two_beats_starting_one_sweep_do_it_once(broker, demo_provider, two_boxes):
    env = worker_env({"demo": demo_provider}, broker)
    start_at = time.time() + 3
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.workers.sweep"],
            cwd=ROOT,
            env={
                **env,
                "MAILGOV_TEST_TASK": "dispatch_outbox",
                "MAILGOV_TEST_START_AT": str(start_at),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    # One run did the work, the other found the sweep taken.
    assert sorted(result is None for result in results) == [False, True]
    assert connection.vendor in ("sqlite", "postgresql")


def test_held_messages_are_sent_once_the_owner_reconnects(
    workers, two_boxes, smtp, authserver, site_user
):
    from mailgov.services import mark_needs_reconsent

    ids = enqueue("alice@example.test", 2)
    mark_needs_reconsent(two_boxes[0], "invalid_grant")  # before any worker runs
    workers(1)
    wait_for(lambda: states()[State.HELD] == 2, 60, "held messages")
    assert smtp.messages == []
    assert set(OutboxMessage.objects.filter(pk__in=ids).values_list("error_code", flat=True)) == {
        "mailbox_needs_reconsent"
    }
    assert len(ids) == 2
    connect_through_flow(authserver, site_user("alice"), "alice", SCOPES)
    outbox.dispatch()
    wait_for(lambda: states()[State.SENT] == 2, 60, "delivery after reconnect")
    assert len(message_ids(smtp)) == 2


def test_a_revocation_runs_as_a_task_and_is_retried_after_503(workers, two_boxes, authserver):
    from mailgov.services import retry_revocations, revoke_mailbox

    alice = two_boxes[0]
    token = MailboxCredentials.objects.get(pk=alice.pk).refresh_token
    workers(1)
    with authserver.faults(revoke=503):
        revoke_mailbox(alice, "dormant: unused", defer=True)  # published on commit
        wait_for(
            lambda: type(alice).objects.get(pk=alice.pk).revocation_attempts == 1,
            60,
            "the worker's attempt",
        )
    assert refresh_token_state(authserver, token) == "live"
    retry_at = type(alice).objects.get(pk=alice.pk).revocation_retry_at
    # The retry sweep, when its time has come (injected, not slept).
    assert retry_revocations(due_only=True, now=retry_at)["revoked"] == 1
    assert refresh_token_state(authserver, token) == "revoked"


def send_from_another_process(broker, demo_provider, sender: str) -> dict:
    env = worker_env({"demo": demo_provider}, broker, MAILGOV_TEST_FROM=sender)
    done = subprocess.run(
        [sys.executable, "-m", "tests.workers.send"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def test_a_freeze_stops_other_processes_and_workers_and_lifting_it_loses_nothing(
    workers, two_boxes, smtp, broker, demo_provider
):
    from mailgov import incidents

    workers(1)
    incident = incidents.declare(title="Drill", scope="provider", scope_value="demo")
    incidents.freeze(incident)  # committed: every process sees it from now on
    assert send_from_another_process(broker, demo_provider, "alice@example.test") == {
        "error": "SendingFrozenError"
    }
    ids = enqueue("alice@example.test", 3)
    wait_for(lambda: states()[State.HELD] == 3, 60, "held by the worker")
    assert smtp.messages == []
    assert set(OutboxMessage.objects.values_list("error_code", flat=True)) == {"frozen"}
    incidents.unfreeze(incident)  # queued again and published on commit
    wait_for(lambda: states()[State.SENT] == 3, 60, "delivery after the freeze")
    assert send_from_another_process(broker, demo_provider, "alice@example.test") == {"sent": 1}
    assert len(message_ids(smtp)) == 4 and len(ids) == 3


def test_contain_and_a_governance_job_run_by_a_worker_as_the_admin(
    workers, two_boxes, authserver, settings, django_user_model
):
    from auditlog.models import LogEntry
    from django.contrib.auth.models import Permission

    from mailgov import governance, incidents
    from mailgov.models import AdminJob, Mailbox

    settings.MAILGOV_ADMIN_INLINE_ROWS = 0  # every selection goes to a worker
    officer = django_user_model.objects.create_user("officer", "o@example.test", "x")
    # (The groups of the data migration do not survive a transactional test's flush.)
    officer.user_permissions.add(Permission.objects.get(codename="govern_mailbox"))
    alice, bob = two_boxes
    tokens = {box.pk: MailboxCredentials.objects.get(pk=box.pk).refresh_token for box in two_boxes}
    workers(1)
    # A job: suspend bob, run by the worker under the officer's name and request id.
    job = governance.start("suspend", [bob.pk], user=officer, cid="req-42")
    wait_for(lambda: AdminJob.objects.get(pk=job.pk).state == AdminJob.State.DONE, 60, "the job")
    assert AdminJob.objects.get(pk=job.pk).counts == {"suspended": 1}
    entry = LogEntry.objects.filter(object_pk=str(bob.pk)).latest("timestamp")
    assert (entry.actor_id, entry.cid) == (officer.pk, "req-42")
    # Contain alice: revoked here at once, at the provider by the worker's task.
    incident = incidents.declare(title="Leak", scope="mailboxes", scope_ids=[alice.pk])
    incidents.contain(incident, actor=officer)
    assert Mailbox.objects.get(pk=alice.pk).status == Mailbox.Status.REVOKED
    wait_for(
        lambda: refresh_token_state(authserver, tokens[alice.pk]) == "revoked",
        60,
        "the revocation at the provider",
    )
    assert refresh_token_state(authserver, tokens[bob.pk]) == "live"


def test_readiness_pings_the_workers(workers, client, settings):
    """/health/ready's WorkerPing answers OK while a worker consumes the
    broker, and fails, naming no URL, as soon as the last one stops."""
    settings.CELERY_BROKER_URL = app.conf.broker_url
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = app.conf.broker_transport_options

    def worker_line() -> str:
        text = client.get("/health/ready").content.decode()
        return next(line for line in text.splitlines() if line.startswith("WorkerPing"))

    assert worker_line() == "WorkerPing(): Unavailable: no Celery worker answered a ping within 1 s"
    (worker,) = workers(1)
    # Up and consuming a moment after it logs "ready" (a Redis worker
    # subscribes to control messages on its first loop).
    wait_for(lambda: worker_line() == "WorkerPing(): OK", 30, "a ping answered")
    worker.stop()
    assert worker_line().startswith("WorkerPing(): Unavailable: no Celery worker answered")


def test_sigterm_closes_the_connections_a_worker_kept(workers, two_boxes, smtp):
    """A worker keeps alice's connection after sending (idle 60 s here);
    told to stop, it says QUIT on it and forgets its record."""
    from mailgov.models import KeptConnection

    (worker,) = workers(1, SMTP_IDLE_SECONDS=60)
    enqueue("alice@example.test", 2)
    wait_for(lambda: states()[State.SENT] == 2, 60, "2 messages sent")
    wait_for(lambda: KeptConnection.objects.exists(), 10, "the connection kept")
    assert smtp.transcript.count("QUIT") == 0
    worker.stop()
    assert smtp.transcript.count("QUIT") == 1
    assert not KeptConnection.objects.exists()
    assert "kept connection" not in worker.log()  # no warning: it was recorded and forgotten


def test_one_mailbox_gets_the_providers_three_connections(workers, two_boxes, smtp, demo_provider):
    """One mailbox's mail fans out to three workers, each with its own
    connection (the provider's limit): a worker busy sending reserves no
    other delivery task, so each fan-out reaches an idle worker. Through a
    10 ms link, as to a real server: on loopback two workers could drain
    the queue before the third's hand-off arrived."""
    with LatencyProxy("127.0.0.1", demo_provider["smtp_port"], delay=0.01) as proxy:
        demo_provider["smtp_port"] = proxy.port
        workers(3, OUTBOX_BATCH_SIZE=10, SMTP_IDLE_SECONDS=0)
        enqueue("alice@example.test", 150)
        wait_for(lambda: states()[State.SENT] == 150, 120, "150 messages sent")
    senders = set(OutboxAttempt.objects.filter(outcome="sent").values_list("worker", flat=True))
    assert len(senders) == 3
    assert len(smtp.messages) == 150
