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

Both answer plain text, or JSON when asked for (``?format=json``, or an
``Accept`` that prefers ``application/json``), and nothing else: whatever
format or ``Accept`` a client names, a failing check is a 503. (The parent
view's RSS, Atom and OpenMetrics renderings answer 200 when checks fail, by
design for feed readers and Prometheus; a probe pointed at one of them by
mistake would never see the site unready.)

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

import asyncio
import dataclasses
import datetime
import itertools
import tempfile
from pathlib import Path
from typing import Any

import celery
from celery.app import app_or_default
from celery.schedules import crontab
from celery.schedules import schedule as every
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers, patch_vary_headers
from django.views import View
from health_check.base import HealthCheck
from health_check.checks import Cache, Database
from health_check.contrib.celery import Ping
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView

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
    """The Celery app's broker accepts a connection.

    The connection is the one Celery itself would open to publish
    (``app.connection_for_write()``): the same URL (``broker_write_url``,
    else ``broker_url``), TLS options (``broker_use_ssl``), transport options,
    credentials and failover, so the probe fails exactly when publishing
    would. kombu's filesystem transport has no server: its folders must
    exist and be writable (a full or read-only disk stops all background
    work).
    """

    app: celery.Celery = dataclasses.field(default_factory=app_or_default, repr=False)
    timeout: datetime.timedelta = dataclasses.field(
        default=datetime.timedelta(seconds=2), repr=False
    )

    def run(self) -> None:
        connection = self.app.connection_for_write(connect_timeout=self.timeout.total_seconds())
        try:
            if connection.transport.driver_type == "filesystem":
                self._check_folders(connection.transport_options)
                return
            # One attempt, no retry loop: the probe has its own deadline.
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
        except ServiceUnavailable:
            raise
        except Exception as exc:
            # The type only: kombu's messages may quote the URL, with its password.
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


#: The period assumed of a schedule whose gaps cannot be known (seconds).
UNKNOWN_PERIOD = 86400.0


def schedule_period(schedule: Any) -> float:
    """The longest gap, in seconds, between two runs of a beat entry's
    ``schedule`` (see :meth:`SweepHeartbeat.period`)."""
    if isinstance(schedule, bool):
        return UNKNOWN_PERIOD
    if isinstance(schedule, int | float):
        return float(schedule)
    if isinstance(schedule, datetime.timedelta):
        return schedule.total_seconds()
    if isinstance(schedule, every):  # also celery's own wrapping of a number
        return schedule.run_every.total_seconds()
    if isinstance(schedule, crontab):
        return crontab_max_gap(schedule)
    return UNKNOWN_PERIOD


def crontab_max_gap(schedule: crontab) -> float:
    """The largest gap, in seconds, between two consecutive runs of a Celery
    ``crontab`` (whose day-of-week, day-of-month and month must all match,
    unlike cron's either-day rule), over a four-year cycle of calendar days.
    Clock changes (DST) are ignored: the readiness slack covers an hour."""
    times = sorted(60 * hour + minute for hour in schedule.hour for minute in schedule.minute)
    if not times:
        return UNKNOWN_PERIOD
    first = datetime.date(2024, 1, 1)  # a four-year cycle has every kind of year
    days = [
        n
        for n in range(4 * 366 + 7)
        if (day := first + datetime.timedelta(days=n)).month in schedule.month_of_year
        and day.day in schedule.day_of_month
        and day.isoweekday() % 7 in schedule.day_of_week  # celery: 0 is Sunday
    ]
    if not days:
        return UNKNOWN_PERIOD
    within_a_day = max((b - a for a, b in itertools.pairwise(times)), default=0)
    # From a day's last run to the next run day's first (a crontab that runs
    # on one day in the whole cycle repeats after the cycle, ~4 years).
    between_days = max(
        (1440 * (b - a) - times[-1] + times[0] for a, b in itertools.pairwise(days)),
        default=1440 * 4 * 365,
    )
    return 60.0 * max(within_a_day, between_days, 1440 - times[-1] + times[0])


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
        """The longest time, in seconds, between two runs of the sweep.

        From the beat entries that run the task (found by their ``task``, so
        an entry under any name counts; the shortest period wins when
        several do): a number of seconds, a ``timedelta``, a Celery
        ``schedule(run_every=...)``, or a ``crontab`` (its largest gap between
        two runs, e.g. a weekend for a weekdays-only crontab). Without an
        entry, mailgov's default period; for another kind of schedule
        (``solar``, a custom class), one day, rather than a guess that
        would fail readiness between runs.
        """
        beat = getattr(settings, "CELERY_BEAT_SCHEDULE", None) or {}
        periods = [
            schedule_period(entry.get("schedule"))
            for entry in beat.values()
            if isinstance(entry, dict) and entry.get("task") == self.sweep
        ]
        if periods:
            return min(periods)
        return float(PERIODS.get(self.sweep, UNKNOWN_PERIOD))

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


#: What the probes answer, by preference when ``Accept`` names neither.
PROBE_TYPES = ("text/plain", "application/json")


def wants_json(request: HttpRequest) -> bool:
    """``?format=json``, or an ``Accept`` that prefers JSON to plain text;
    any other ``format`` (``rss``, ``openmetrics`` ...) gets plain text."""
    if "format" in request.GET:
        return request.GET["format"] == "json"
    return request.get_preferred_type(PROBE_TYPES) == "application/json"


class ReadinessView(HealthCheckView):
    """django-health-check's checks, answered as a probe reads them: 503 (not
    the parent's 500) when any check fails, plain text unless JSON is asked
    for, and never another format (see the module docstring).

    503 is what load balancers and Kubernetes read as "not ready, retry
    later"; a 500 reads as a bug in the probe.
    """

    checks = READINESS_CHECKS

    async def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with self.get_executor() as executor:
            self.results = await asyncio.gather(
                *(check.get_result(executor) for check in self.get_checks())
            )
        status = 503 if any(result.error for result in self.results) else 200
        if wants_json(request):
            return self.render_to_response_json(status)
        return self.render_to_response_text(status)


class LivenessView(View):
    """200 while the process answers; asks no dependency. Plain text, or
    JSON when asked for, as :class:`ReadinessView`."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if wants_json(request):
            response: HttpResponse = JsonResponse({"live": "OK"})
        else:
            response = HttpResponse("ok\n", content_type="text/plain; charset=utf-8")
        patch_vary_headers(response, ["Accept"])
        add_never_cache_headers(response)
        return response
