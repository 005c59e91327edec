"""django-health-check checks for mailgov, and the liveness and readiness views.

Optional: this module needs django-health-check (4.x); nothing else in
mailgov imports it. A site wires it in its urls (the demo's project/urls.py):

    path("health/live", LivenessView.as_view()),
    path("health/ready", ReadinessView.as_view()),

* ``/health/live``: the process answers; no dependency is asked, so a
  database or broker outage never makes an orchestrator restart every web
  process (which would not cure the outage).
* ``/health/ready``: :data:`READINESS_CHECKS`: the database, the cache, the
  Celery broker reachable, a worker answering a ping, the sweeps running
  (beat's heartbeat), the encryption keyring loadable. Any failure answers
  503 with one plain line per check, e.g.
  ``Broker: Unavailable: broker not reachable (ConnectionRefusedError)``.

Reasons never carry a URL, a password or key material: the broker URL may
hold credentials, and a key file's content is a secret.

Two checks for the background work, because they fail differently:

* :class:`WorkerPing` (django-health-check's ``Ping``, limited to the first
  reply): some worker is consuming the broker now. It fails at once when
  the last worker stops, but says nothing of beat.
* :class:`SweepHeartbeat`: the sweep ``mailgov.dispatch_outbox`` runs every
  few seconds, scheduled by beat and executed by a worker, and records
  ``SweepLock.last_finished_at``. Recent means beat is alive and a worker
  runs what it schedules and reaches the database. With the ping passing, a
  stale heartbeat points at beat (or at workers too busy to sweep).
"""

from __future__ import annotations

import dataclasses
import datetime
import tempfile
from pathlib import Path
from typing import Any

import celery
from celery.app import app_or_default
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views import View
from health_check.base import HealthCheck
from health_check.checks import Cache, Database
from health_check.contrib.celery import Ping
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView
from kombu import Connection

from mailgov.crypto import configured_key_entries, parse_key_entries
from mailgov.exceptions import KeyringError
from mailgov.models import SweepLock
from mailgov.schedule import PERIODS

__all__ = [
    "READINESS_CHECKS",
    "Broker",
    "Keyring",
    "LivenessView",
    "ReadinessView",
    "SweepHeartbeat",
    "WorkerPing",
]


@dataclasses.dataclass
class Broker(HealthCheck):
    """The Celery broker (``CELERY_BROKER_URL``) accepts a connection.

    kombu's filesystem transport has no server: its folders must exist and
    be writable (a full or read-only disk stops all background work).
    """

    timeout: datetime.timedelta = dataclasses.field(
        default=datetime.timedelta(seconds=2), repr=False
    )

    def run(self) -> None:
        url = settings.CELERY_BROKER_URL
        options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
        if url.startswith("filesystem://"):
            self._check_folders(options)
            return
        connection = Connection(
            url, connect_timeout=self.timeout.total_seconds(), transport_options=options
        )
        try:
            # One attempt, no retry loop: the probe has its own deadline.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        except Exception as exc:
            raise ServiceUnavailable(f"broker not reachable ({type(exc).__name__})") from exc
        finally:
            connection.release()

    @staticmethod
    def _check_folders(options: dict[str, Any]) -> None:
        keys = ("data_folder_in", "data_folder_out", "processed_folder", "control_folder")
        for key in keys:
            folder = options.get(key)
            if not folder:
                continue
            if not Path(folder).is_dir():
                raise ServiceUnavailable(f"filesystem broker: {key} does not exist")
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".health-"):
                    pass
            except OSError as exc:
                raise ServiceUnavailable(
                    f"filesystem broker: {key} is not writable ({type(exc).__name__})"
                ) from exc


@dataclasses.dataclass
class WorkerPing(Ping):
    """At least one Celery worker answers a ping within ``timeout``.

    ``limit=1``: the broadcast returns at the first reply, so a probe costs
    one round trip however many workers run, and waits the whole timeout
    only when none answers. Unlike the parent class it does not then ask
    the answering worker for its queues: one worker need not consume every
    queue when several share the work.
    """

    app: celery.Celery = dataclasses.field(default_factory=app_or_default, repr=False)
    timeout: datetime.timedelta = dataclasses.field(
        default=datetime.timedelta(seconds=1), repr=False
    )
    limit: int | None = dataclasses.field(default=1, repr=False)

    def run(self) -> None:
        seconds = self.timeout.total_seconds()
        try:
            replies = self.app.control.ping(timeout=seconds, limit=self.limit)
        except Exception as exc:
            # kombu's errors may quote the broker URL: name the type only.
            raise ServiceUnavailable(f"could not ping workers ({type(exc).__name__})") from exc
        if not any(self.CORRECT_PING_RESPONSE in reply.values() for reply in replies or []):
            raise ServiceUnavailable(f"no Celery worker answered a ping within {seconds:g} s")


@dataclasses.dataclass
class SweepHeartbeat(HealthCheck):
    """A periodic sweep finished recently: beat schedules and a worker runs.

    Fails when the sweep's last finish is older than ``periods`` times its
    period (its ``CELERY_BEAT_SCHEDULE`` entry, else mailgov's default), or
    when it never finished (a site whose beat never ran is not ready to send
    queued mail). Slack for a busy worker: 6 periods is one minute for
    ``mailgov.dispatch_outbox``.
    """

    sweep: str = "mailgov.dispatch_outbox"
    periods: float = dataclasses.field(default=6, repr=False)

    def period(self) -> float:
        entry = getattr(settings, "CELERY_BEAT_SCHEDULE", {}).get(self.sweep) or {}
        schedule = entry.get("schedule")
        return float(schedule) if isinstance(schedule, int | float) else PERIODS[self.sweep]

    def run(self) -> None:
        period = self.period()
        finished = (
            SweepLock.objects.filter(name=self.sweep)
            .values_list("last_finished_at", flat=True)
            .first()
        )
        if finished is None:
            raise ServiceUnavailable(
                f"sweep {self.sweep} never finished: is Celery beat running, and a worker?"
            )
        age = (timezone.now() - finished).total_seconds()
        if age > self.periods * period:
            raise ServiceUnavailable(
                f"sweep {self.sweep} last finished {age:.0f} s ago (expected every "
                f"{period:g} s): is Celery beat running, and a worker?"
            )


@dataclasses.dataclass
class Keyring(HealthCheck):
    """The encryption keys load and parse.

    Parsed afresh at each probe, not the process's cached keyring: a key
    file deleted or made unreadable since the process started must show
    here, before a new process fails at its first token.
    """

    def run(self) -> None:
        try:
            parse_key_entries(configured_key_entries())
        except KeyringError as exc:
            # The code only ("missing", "malformed" ...): never the key material.
            code = getattr(exc, "code", "") or type(exc).__name__
            raise ServiceUnavailable(f"encryption keyring not loadable ({code})") from exc
        except OSError as exc:
            raise ServiceUnavailable(
                f"encryption key file not readable ({type(exc).__name__})"
            ) from exc


#: What ``/health/ready`` checks, in order.
READINESS_CHECKS = (Database, Cache, Broker, WorkerPing, SweepHeartbeat, Keyring)


class ReadinessView(HealthCheckView):
    """django-health-check's view: 503 (not its 500) when a check fails, and
    plain text unless the client asks for JSON (``?format=json``).

    503 is what load balancers and Kubernetes read as "not ready, retry
    later"; a 500 reads as a bug in the probe.
    """

    checks = READINESS_CHECKS

    async def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = await super().get(request, *args, **kwargs)
        if response.status_code == 500:
            response.status_code = 503
        return response

    def render_to_response(self, context: dict[str, Any], **kwargs: Any) -> HttpResponse:
        # HTML and */*: a probe reads one line per check, not a page.
        return self.render_to_response_text(kwargs.get("status", 200))


class LivenessView(View):
    """200 while the process answers; asks no dependency."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = HttpResponse("ok\n", content_type="text/plain")
        response["Cache-Control"] = "no-store"
        return response
