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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from django.db import DatabaseError
from django.db.models import Count, Min
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

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

__all__ = ["MailgovCollector", "count_refresh", "count_sends", "export", "register"]

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

        pending = (
            MailboxCredentials.objects.filter(PENDING, refresh_token__isnull=False).count()
            + PendingRevocation.objects.filter(refresh_token__isnull=False).count()
        )
        yield GaugeMetricFamily(
            "mailgov_revocations_pending",
            "Grants still to be revoked at their provider (revoked or deleted mailboxes "
            "whose refresh token is kept until the provider confirms).",
            value=pending,
        )


_registered = False


def register() -> None:
    """Register :class:`MailgovCollector` on prometheus-client's global
    registry, once per process; nothing in multiprocess mode (see the
    module docstring) or without prometheus-client."""
    global _registered
    if prometheus_client is None or multiprocess_mode() or _registered:
        return
    prometheus_client.REGISTRY.register(MailgovCollector())
    _registered = True


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
