"""Metrics of Celery workers that ``/metrics`` cannot see: each worker's own
endpoint (``MAILGOV_WORKER_METRICS_PORT``), with real workers (the
harness and fixtures of test_workers.py), and gunicorn's ``child_exit`` hook."""

from __future__ import annotations

import logging
import runpy
import types
import urllib.request

import prometheus_client
import pytest
from celery.concurrency.prefork import TaskPool as PreforkPool
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mailgov import metrics
from mailgov.models import OutboxMessage
from mailgov.testing.peers import free_port
from tests.test_workers import broker, enqueue, states, two_boxes, workers  # noqa: F401
from tests.workers.harness import ROOT, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SENT = OutboxMessage.State.SENT


def sent_count(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mailgov_send_attempts_total"
        and sample.labels == {"provider": "demo", "result": "sent"}
    )


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_a_workers_counters_appear_at_its_metrics_endpoint(workers, two_boxes, smtp):  # noqa: F811
    """A solo worker (tasks run in its main process) serves its own counters;
    the database gauges stay on /metrics, where they are counted once."""
    port = free_port()
    workers(1, WORKER_METRICS_PORT=port, WORKER_METRICS_ADDRESS="127.0.0.1")
    enqueue("alice@example.test", 2)
    wait_for(lambda: states()[SENT] == 2, 60, "2 messages sent")
    text = wait_for(lambda: (t := fetch(port)) and sent_count(t) == 2 and t, 10, "the counter")
    assert "mailgov_mailboxes" not in text
    assert "mailgov_revocations_pending" not in text
    assert "alice@example.test" not in text


def test_multiprocess_mode_worker_counters_reach_both_endpoints(
    workers,  # noqa: F811
    two_boxes,  # noqa: F811
    smtp,
    client,
    monkeypatch,
    tmp_path,
):
    """Under PROMETHEUS_MULTIPROC_DIR the worker's endpoint sums the files of
    its folder, and /metrics on the same host reads them too."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    port = free_port()
    workers(1, WORKER_METRICS_PORT=port, WORKER_METRICS_ADDRESS="127.0.0.1")
    enqueue("bob@example.test", 1)
    wait_for(lambda: states()[SENT] == 1, 60, "1 message sent")
    wait_for(lambda: sent_count(fetch(port)) == 1, 10, "the worker's counter")
    assert any(folder.glob("counter_*.db"))
    response = client.get("/metrics")
    assert sent_count(response.content.decode()) == 1


def test_a_prefork_worker_without_multiprocess_dir_serves_nothing(
    settings, monkeypatch, caplog, tmp_path
):
    """The prefork children count where the main process cannot read: rather
    than an endpoint of zeros, the worker says what is missing."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    port = free_port()
    settings.MAILGOV_WORKER_METRICS_PORT = port
    pool = PreforkPool.__new__(PreforkPool)  # the type is all that is read
    with caplog.at_level(logging.ERROR, logger="mailgov.metrics"):
        metrics.serve_worker_metrics(sender=types.SimpleNamespace(pool=pool))
    assert "set PROMETHEUS_MULTIPROC_DIR" in caplog.text
    with pytest.raises(OSError):
        fetch(port)
    # With the folder, the same pool is served from the files.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert isinstance(metrics.worker_registry(pool), CollectorRegistry)


def test_no_port_serves_nothing_and_an_empty_address_serves_every_one(
    settings, monkeypatch, tmp_path
):
    started = []
    real = prometheus_client.start_http_server

    def start(port, addr, registry):
        server, thread = real(port, addr=addr, registry=registry)
        started.append(server)
        return server, thread

    monkeypatch.setattr(metrics.prometheus_client, "start_http_server", start)
    # Multiprocess mode: a registry of the folder's files, nothing global touched.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    solo = types.SimpleNamespace(pool=object())
    settings.MAILGOV_WORKER_METRICS_PORT = None
    metrics.serve_worker_metrics(sender=solo)
    assert started == []
    # An empty address means every address (as the check E027 lets it).
    port = free_port()
    settings.MAILGOV_WORKER_METRICS_PORT = port
    settings.MAILGOV_WORKER_METRICS_ADDRESS = ""
    metrics.serve_worker_metrics(sender=solo)
    try:
        assert len(started) == 1
        fetch(port)  # answers on 127.0.0.1
    finally:
        for server in started:
            server.shutdown()
            server.server_close()


def test_gunicorn_child_exit_marks_the_process_dead(monkeypatch, tmp_path):
    """project/gunicorn.conf.py removes an exited worker's live-gauge files,
    as prometheus-client's multiprocess mode requires."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead = tmp_path / "gauge_livesum_4242.db"
    alive = tmp_path / "gauge_livesum_4343.db"
    counter = tmp_path / "counter_4242.db"
    for path in (dead, alive, counter):
        path.write_bytes(b"")
    config = runpy.run_path(str(ROOT / "project" / "gunicorn.conf.py"))
    config["child_exit"](None, types.SimpleNamespace(pid=4242))
    assert not dead.exists()
    assert alive.exists()
    assert counter.exists()  # counters outlive their process: they are sums
    assert config["wsgi_app"] == "project.wsgi:application"
