"""Start and stop real Celery workers (and sweeps) in their own processes for tests.

Each worker is ``python -m tests.workers.celery_worker`` in a session of its
own, on the test database and the broker the test chose; its log is kept in
a file so that a failing test can show it (a leak grep reads it too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
REDIS = ("127.0.0.1", 6379)


def redis_reachable() -> bool:
    """Whether a Redis answers at 127.0.0.1:6379."""
    try:
        socket.create_connection(REDIS, 1).close()
    except OSError:
        return False
    return True


def worker_env(providers: dict[str, Any], broker: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment a worker or sweep process needs to share this test's world."""
    return {
        **os.environ,
        **broker,
        "MAILGOV_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "MAILGOV_TEST_KEYS": json.dumps(settings.MAILGOV_ENCRYPTION_KEYS),
        "MAILGOV_TEST_PROVIDERS": json.dumps(providers),
        **extra,
    }


class Worker:
    """A worker process; ``start()`` returns once it consumes."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = {**env, "MAILGOV_TEST_WORKER_NAME": name}
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Worker:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.workers.celery_worker"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_exit(self, timeout: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it is truthy; fail plainly after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def use_broker(url: str, options: dict[str, Any]) -> None:
    """Point this process's Celery app at another broker.

    Celery's ``conf.broker_url`` prefers the ``CELERY_BROKER_URL`` environment
    variable to any setting, so the variable is set too (see
    :func:`broker_state` to put things back).
    """
    from project.celery import app

    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = url
    app.conf.broker_transport_options = options
    # Producers and connections are pooled per app: start afresh.
    app._pool = None
    app.amqp._producer_pool = None


def broker_state() -> Callable[[], None]:
    """The broker this process uses now, as a function that restores it."""
    from project.celery import app

    env = os.environ.get("CELERY_BROKER_URL")
    url, options = app.conf.broker_url, dict(app.conf.broker_transport_options or {})

    def restore() -> None:
        use_broker(url, options)
        if env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = env

    return restore
