"""Prometheus metrics, all named ``mailgov_``; optional (prometheus-client).

Two kinds:

* counters, incremented where the event is recorded, in the process where
  it happens (a web process or a Celery worker):
  ``mailgov_token_refreshes_total{provider,outcome}`` beside each
  ``RefreshEvent`` (:mod:`mailgov.tokens`), and
  ``mailgov_send_attempts_total{provider,result}`` beside each ``SendLog``
  row (``EmailBackend._record``, which both the direct and the outbox path
  go through: one count per attempt at one message);
* gauges read from the database when scraped (:class:`MailgovCollector`):
  the outbox by state and the age of its oldest queued message, mailboxes
  by status, whether any freeze is on, and revocations pending.

No label carries a user, an address or a Message-ID: ``provider`` is a key
of ``MAILGOV_PROVIDERS`` and the others are fixed choices, so the number of
series stays small whatever the number of users.

prometheus-client is imported optionally: without it the ``count_*``
functions do nothing and mailgov works as before (metrics are an
operator's choice, not a dependency of sending mail).

Several processes (gunicorn workers, Celery workers): set
``PROMETHEUS_MULTIPROC_DIR`` for every process, to one empty folder, before
they start. The counters are then written to files there and summed at
scrape time by prometheus-client's ``MultiProcessCollector``. The database
gauges must be computed once per scrape, not once per process: in that mode
:func:`export` builds the scrape's registry from the files plus one
:class:`MailgovCollector`, and :meth:`MailgovConfig.ready` registers nothing
globally.

Celery workers on other hosts: their files are not on the web's disk, so
``/metrics`` never sees their counters. ``MAILGOV_WORKER_METRICS_PORT``
(off by default) makes each worker serve its own counters over HTTP on that
port (:func:`serve_worker_metrics`), for Prometheus to scrape per worker.
The database gauges stay on ``/metrics`` only: served by every worker too,
a sum over the targets would count them once per worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from celery import signals as celery_signals
from celery.concurrency.prefork import TaskPool as PreforkPool
from django.db import DatabaseError
from django.db.models import Count, Min, Q
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.freeze import FROZEN
from mailgov.models import (
    Incident,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
)
from mailgov.revocation import PENDING

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, multiprocess
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError:  # metrics are optional
    prometheus_client = None
    Collector = object

logger = logging.getLogger("mailgov.metrics")

__all__ = [
    "MailgovCollector",
    "count_refresh",
    "count_sends",
    "export",
    "register",
    "serve_worker_metrics",
]

if prometheus_client is not None:
    TOKEN_REFRESHES = Counter(
        "mailgov_token_refreshes",
        "Token refreshes by provider and outcome (ok, unavailable, refused, revoked).",
        ["provider", "outcome"],
    )
    SEND_ATTEMPTS = Counter(
        "mailgov_send_attempts",
        "Attempts to send one message, by provider and result (sent, failed).",
        ["provider", "result"],
    )


def count_refresh(provider: str, outcome: str) -> None:
    """One token refresh of a mailbox of ``provider`` ended in ``outcome``."""
    if prometheus_client is not None:
        TOKEN_REFRESHES.labels(provider=provider, outcome=outcome).inc()


def count_sends(logs: Iterable[Any]) -> None:
    """Count the ``SendLog`` rows of a batch (before they are written: the
    mail has gone even if the insert fails)."""
    if prometheus_client is None:
        return
    for log in logs:
        # SendLog(mailbox=...) caches the instance: no query.
        provider = log.mailbox.provider if log.mailbox_id else ""
        SEND_ATTEMPTS.labels(provider=provider, result=log.status).inc()


def multiprocess_mode() -> bool:
    """prometheus-client's multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR``)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class MailgovCollector(Collector):
    """The database gauges, computed at each scrape (a handful of
    aggregate queries over indexed columns; no row is loaded)."""

    NAMES = (
        "mailgov_metrics_database_up",
        "mailgov_outbox_messages",
        "mailgov_outbox_oldest_queued_age_seconds",
        "mailgov_mailboxes",
        "mailgov_sending_frozen",
        "mailgov_revocations_pending",
    )

    def describe(self) -> list[Any]:
        # Without describe(), registering would call collect(): a query
        # during AppConfig.ready(), before the database may even exist.
        return [GaugeMetricFamily(name, name) for name in self.NAMES]

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "mailgov_metrics_database_up",
            "1 if mailgov's database gauges could be read at this scrape.",
        )
        try:
            families = list(self._database_families())
        except DatabaseError as exc:
            logger.warning("mailgov metrics: database gauges not read: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _database_families(self) -> Iterator[Any]:
        now = timezone.now()
        by_state = dict(
            OutboxMessage.objects.values_list("state").annotate(n=Count("pk")).order_by()
        )
        outbox = GaugeMetricFamily(
            "mailgov_outbox_messages", "Outbox messages by state.", labels=["state"]
        )
        for state in OutboxMessage.State.values:
            outbox.add_metric([state], by_state.get(state, 0))
        yield outbox

        oldest = OutboxMessage.objects.filter(state=OutboxMessage.State.QUEUED).aggregate(
            oldest=Min("created_at")
        )["oldest"]
        yield GaugeMetricFamily(
            "mailgov_outbox_oldest_queued_age_seconds",
            "Age of the oldest queued outbox message (0 when none is queued).",
            value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        )

        by_status = dict(Mailbox.objects.values_list("status").annotate(n=Count("pk")).order_by())
        mailboxes = GaugeMetricFamily(
            "mailgov_mailboxes", "Mailboxes by status.", labels=["status"]
        )
        for status in Mailbox.Status.values:
            mailboxes.add_metric([status], by_status.get(status, 0))
        yield mailboxes

        yield GaugeMetricFamily(
            "mailgov_sending_frozen",
            "1 if an incident's freeze is on (some or all sending stopped).",
            value=1 if Incident.objects.filter(FROZEN).exists() else 0,
        )

        # Given up: the sweep stopped retrying after MAILGOV_REVOCATION_MAX_ATTEMPTS;
        # the grant stays live at the provider until an operator acts
        # (mailgov_retry_revocations). Retrying: the sweep still tries.
        # One query a table: all of them, and those given up.
        kept = MailboxCredentials.objects.filter(PENDING, refresh_token__isnull=False).aggregate(
            total=Count("pk"),
            given_up=Count("pk", filter=Q(mailbox__revocation_given_up_at__isnull=False)),
        )
        deleted = PendingRevocation.objects.filter(refresh_token__isnull=False).aggregate(
            total=Count("pk"), given_up=Count("pk", filter=Q(given_up_at__isnull=False))
        )
        given_up = kept["given_up"] + deleted["given_up"]
        retrying = kept["total"] + deleted["total"] - given_up
        pending = GaugeMetricFamily(
            "mailgov_revocations_pending",
            "Grants still to be revoked at their provider (revoked or deleted mailboxes "
            "whose refresh token is kept until the provider confirms), by state: "
            "retrying (the sweep still tries) or given_up (an operator must act).",
            labels=["state"],
        )
        pending.add_metric(["retrying"], retrying)
        pending.add_metric(["given_up"], given_up)
        yield pending


_collector: MailgovCollector | None = None


def register() -> None:
    """Register :class:`MailgovCollector` on prometheus-client's global
    registry, once per process; nothing in multiprocess mode (see the
    module docstring) or without prometheus-client. Also connects
    :func:`serve_worker_metrics` to Celery's ``worker_ready`` (a signal no
    other process receives) and :func:`mark_worker_process_dead` to
    ``worker_process_shutdown``."""
    global _collector
    if prometheus_client is None:
        return
    celery_signals.worker_ready.connect(
        serve_worker_metrics, dispatch_uid="mailgov.serve_worker_metrics"
    )
    celery_signals.worker_process_shutdown.connect(
        mark_worker_process_dead, dispatch_uid="mailgov.mark_worker_process_dead"
    )
    if multiprocess_mode() or _collector is not None:
        return
    _collector = MailgovCollector()
    prometheus_client.REGISTRY.register(_collector)


def worker_registry(pool: Any) -> Any:
    """What a worker's metrics endpoint serves, or ``None`` when it cannot
    serve its counters truthfully.

    With ``PROMETHEUS_MULTIPROC_DIR``: every process's files in that folder
    (the prefork children's, where tasks run, included). Without it: this
    process's own registry, which holds the counters only when the tasks run
    in this process (the solo, threads, gevent and eventlet pools); a
    prefork pool's children count into registries of their own, which this
    process cannot read.
    """
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    if isinstance(pool, PreforkPool):
        return None
    global _collector
    if _collector is not None:
        # The database gauges are /metrics' alone (see the module docstring).
        prometheus_client.REGISTRY.unregister(_collector)
        _collector = None
    return prometheus_client.REGISTRY


def serve_worker_metrics(sender: Any = None, **kwargs: Any) -> None:
    """Celery's ``worker_ready``: serve this worker's counters on
    ``MAILGOV_WORKER_METRICS_PORT`` (when set) at
    ``MAILGOV_WORKER_METRICS_ADDRESS``.

    ``worker_ready`` is sent once, in the worker's main process, whatever the
    pool: the one process that lives as long as the worker and can hold the
    port (prefork children come and go, and would each want it). The prefork
    pool needs ``PROMETHEUS_MULTIPROC_DIR`` for the children's counters to
    reach it (:func:`worker_registry`).
    """
    port = mailgov_settings.WORKER_METRICS_PORT
    if not port or prometheus_client is None:
        return
    pool = getattr(sender, "pool", None)
    registry = worker_registry(pool)
    if registry is None:
        logger.error(
            "mailgov metrics: not serving worker metrics on port %s: the prefork pool's "
            "children count in processes of their own; set PROMETHEUS_MULTIPROC_DIR to an "
            "empty folder of this worker's (see the README, 'Metrics and health').",
            port,
        )
        return
    # Empty: every address (getaddrinfo refuses "" as a host to bind).
    address = mailgov_settings.WORKER_METRICS_ADDRESS or "0.0.0.0"  # noqa: S104
    try:
        prometheus_client.start_http_server(int(port), addr=address, registry=registry)
    except OSError as exc:
        # Another worker on this host holds the port: the worker still works.
        logger.error(
            "mailgov metrics: could not serve worker metrics on %s:%s: %s", address, port, exc
        )
        return
    logger.info("mailgov metrics: serving worker metrics on %s:%s", address, port)


def mark_worker_process_dead(sender: Any = None, pid: int | None = None, **kwargs: Any) -> None:
    """Celery's ``worker_process_shutdown`` (a prefork child ending): drop its
    live gauges' files in multiprocess mode, as gunicorn's ``child_exit``
    hook does for web processes (``project/gunicorn.conf.py``)."""
    if pid is not None and multiprocess_mode():
        multiprocess.mark_process_dead(pid)


def export(request: HttpRequest) -> HttpResponse:
    """The ``/metrics`` view: django-prometheus's ``ExportToDjangoView``,
    plus the database gauges once per scrape in multiprocess mode.

    Serve it to the monitoring network only (see the README, "Deploying").
    """
    if prometheus_client is None:
        return HttpResponse("prometheus-client is not installed\n", status=404)
    if multiprocess_mode():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(MailgovCollector())
    else:
        registry = prometheus_client.REGISTRY
    return HttpResponse(
        prometheus_client.generate_latest(registry),
        content_type=prometheus_client.CONTENT_TYPE_LATEST,
    )
