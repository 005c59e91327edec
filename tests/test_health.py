"""/health/live and /health/ready (django-health-check with mailgov's checks)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from mailgov.models import SweepLock
from mailgov.testing.peers import free_port

# The checks run in threads of their own: they must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)

SWEEP = "mailgov.dispatch_outbox"


@pytest.fixture
def heartbeat():
    """Beat and a worker ran the dispatch sweep just now."""

    def beat(ago: float = 0) -> None:
        SweepLock.objects.update_or_create(
            name=SWEEP, defaults={"last_finished_at": timezone.now() - timedelta(seconds=ago)}
        )

    beat()
    return beat


def ready(client):
    response = client.get("/health/ready")
    return response.status_code, response.content.decode()


@pytest.fixture
def worker_answers(monkeypatch):
    """A worker answers the ping (the real round trip through a broker, with
    real workers, is tested in test_workers.py)."""
    from project.celery import app

    monkeypatch.setattr(app.control, "ping", lambda timeout, limit: [{"w0@host": {"ok": "pong"}}])


def test_ready_when_everything_works(client, heartbeat, worker_answers):
    status, text = ready(client)
    assert status == 200, text
    assert text.splitlines() == [
        "Database(alias='default'): OK",
        "Cache(alias='default'): OK",
        "Broker(): OK",
        "WorkerPing(): OK",
        f"SweepHeartbeat(sweep='{SWEEP}'): OK",
        "Keyring(): OK",
    ]
    assert client.get("/health/ready?format=json").json()["Keyring()"] == "OK"


def test_no_worker_fails_readiness(client, heartbeat):
    status, text = ready(client)
    assert status == 503
    assert "WorkerPing(): Unavailable: no Celery worker answered a ping within 1 s" in text
    assert "Broker(): OK" in text


def test_unreachable_broker_fails_readiness_without_its_url(client, heartbeat, settings):
    port = free_port()
    settings.CELERY_BROKER_URL = f"redis://:s3cret-broker-pw@127.0.0.1:{port}/0"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {}
    status, text = ready(client)
    assert status == 503
    assert "Broker(): Unavailable: broker not reachable" in text
    assert "s3cret-broker-pw" not in text
    assert str(port) not in text
    assert "Keyring(): OK" in text


def test_missing_filesystem_broker_folder_fails_readiness(client, heartbeat, settings, tmp_path):
    settings.CELERY_BROKER_URL = "filesystem://localhost/"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"data_folder_in": str(tmp_path / "gone")}
    status, text = ready(client)
    assert status == 503
    assert "Broker(): Unavailable: filesystem broker: data_folder_in does not exist" in text


def test_broken_keyring_fails_readiness_without_key_material(client, heartbeat, settings):
    settings.MAILGOV_ENCRYPTION_KEYS = ["garbage-not-a-key"]
    status, text = ready(client)
    assert status == 503
    assert "Keyring(): Unavailable: encryption keyring not loadable" in text
    assert "garbage-not-a-key" not in text


def test_unreadable_key_file_fails_readiness(client, heartbeat, settings, tmp_path):
    settings.MAILGOV_ENCRYPTION_KEYS = None
    settings.MAILGOV_ENCRYPTION_KEYS_FILE = str(tmp_path / "no-such-keys.txt")
    status, text = ready(client)
    assert status == 503
    assert "encryption keyring not loadable (unreadable)" in text
    assert "no-such-keys" not in text


def test_stale_sweep_heartbeat_fails_readiness(client, heartbeat, worker_answers):
    """A stale heartbeat fails readiness: queued mail would wait forever.
    Six periods of slack (one minute for the 10-second dispatch sweep)."""
    heartbeat(ago=50)
    assert ready(client)[0] == 200
    heartbeat(ago=61)
    status, text = ready(client)
    assert status == 503
    assert "is Celery beat running, and a worker?" in text


def test_missing_sweep_heartbeat_fails_readiness(client):
    status, text = ready(client)
    assert status == 503
    assert f"sweep {SWEEP} never finished" in text


def test_live_answers_whatever_else_is_down(client, settings):
    settings.MAILGOV_ENCRYPTION_KEYS = ["garbage"]
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.content == b"ok\n"
    assert "no-store" in response["Cache-Control"]
