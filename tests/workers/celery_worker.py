"""A real Celery worker process for the worker tests, on the test database.

Started by :class:`tests.workers.harness.Worker`. Environment:

- ``MAILGOV_TEST_DB_NAME``, ``MAILGOV_TEST_KEYS``, ``MAILGOV_TEST_PROVIDERS``
  (JSON): the test run's database, keys and providers;
- ``MAILGOV_TEST_SETTINGS`` (JSON): more settings (short leases, ...);
- ``CELERY_BROKER_URL`` with ``MAILGOV_BROKER_DIR`` (filesystem transport) or
  ``CELERY_BROKER_KEYPREFIX`` (Redis), read by the project's settings;
- ``MAILGOV_TEST_WORKER_NAME``: the worker's node name;
- ``MAILGOV_TEST_KILL_AFTER_ACCEPT=1``: the process kills itself with SIGKILL
  the first time the SMTP server has accepted a message and before the
  outbox row is marked sent (the window a crash can fall into).
"""

from __future__ import annotations

import os
import signal

from tests.workers.setup import setup_django

setup_django()

from mailgov import delivery  # noqa: E402
from project.celery import app  # noqa: E402


def kill_after_accept() -> None:
    record = delivery._record

    def record_or_die(batch, row, verdict):
        if verdict.outcome == "sent":
            # The server has the message; the row does not know yet.
            os.kill(os.getpid(), signal.SIGKILL)
        return record(batch, row, verdict)

    delivery._record = record_or_die


def main() -> None:
    if os.environ.get("MAILGOV_TEST_KILL_AFTER_ACCEPT") == "1":
        kill_after_accept()
    name = os.environ.get("MAILGOV_TEST_WORKER_NAME", "worker")
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--loglevel=INFO",
            f"--hostname={name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
