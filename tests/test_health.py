"""/health/live and /health/ready (django-health-check with mailgov's checks)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.schedules import crontab, schedule
from django.utils import timezone

from mailgov.health import SweepHeartbeat
from mailgov.models import SweepLock
from mailgov.testing.peers import free_port
from tests.workers.harness import broker_state, use_broker

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


@pytest.fixture
def celery_broker():
    """``celery_broker(url, options)`` points the Celery app (what the
    workers and the Broker check use) at another broker for one test."""
    restore = broker_state()
    yield use_broker
    restore()


def test_unreachable_broker_fails_readiness_without_its_url(client, heartbeat, celery_broker):
    port = free_port()
    celery_broker(f"redis://:s3cret-broker-pw@127.0.0.1:{port}/0", {})
    status, text = ready(client)
    assert status == 503
    assert "Broker(): Unavailable: broker not reachable" in text
    assert "s3cret-broker-pw" not in text
    assert str(port) not in text
    assert "Keyring(): OK" in text


def test_broker_check_uses_the_celery_apps_connection(client, heartbeat, celery_broker, settings):
    """The probe connects as Celery publishes (``connection_for_write``):
    the app's broker, not a URL of its own from the Django setting."""
    from project.celery import app

    settings.CELERY_BROKER_URL = "redis://:pw@127.0.0.1:1/0"  # not what Celery uses
    celery_broker(f"redis://127.0.0.1:{free_port()}/0", {})
    app.conf.broker_write_url = "memory://"  # the broker Celery publishes to
    try:
        _, text = ready(client)
    finally:
        app.conf.broker_write_url = None
    assert "Broker(): OK" in text, text


def test_missing_filesystem_broker_folder_fails_readiness(
    client, heartbeat, celery_broker, tmp_path
):
    celery_broker("filesystem://localhost/", {"data_folder_in": str(tmp_path / "gone")})
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


FORMATS = [
    ({"format": "rss"}, {}),
    ({"format": "atom"}, {}),
    ({"format": "openmetrics"}, {}),
    ({"format": "html"}, {}),
    ({}, {"HTTP_ACCEPT": "application/openmetrics-text"}),
    ({}, {"HTTP_ACCEPT": "application/rss+xml"}),
    ({}, {"HTTP_ACCEPT": "application/atom+xml"}),
    ({}, {"HTTP_ACCEPT": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}),
    ({}, {"HTTP_ACCEPT": "image/png"}),
    ({}, {"HTTP_ACCEPT": "not a media type"}),
]


@pytest.mark.parametrize(("query", "headers"), FORMATS)
def test_readiness_fails_in_plain_text_whatever_format_is_asked(client, query, headers):
    """No heartbeat, no worker: 503, as one plain line per check, whatever
    the client asks for (the parent view's feeds and OpenMetrics answer 200)."""
    response = client.get("/health/ready", query, **headers)
    assert response.status_code == 503
    assert response["Content-Type"].startswith("text/plain")
    assert (
        "SweepHeartbeat(sweep='mailgov.dispatch_outbox'): Unavailable" in response.content.decode()
    )


@pytest.mark.parametrize(
    ("query", "headers"),
    [({"format": "json"}, {}), ({}, {"HTTP_ACCEPT": "application/json"})],
)
def test_readiness_answers_json_when_asked(client, query, headers):
    response = client.get("/health/ready", query, **headers)
    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert response.json()["Keyring()"] == "OK"
    assert "never finished" in response.json()[f"SweepHeartbeat(sweep='{SWEEP}')"]


@pytest.mark.parametrize(("query", "headers"), FORMATS)
def test_liveness_answers_plain_text_whatever_format_is_asked(client, query, headers):
    response = client.get("/health/live", query, **headers)
    assert response.status_code == 200
    assert response.content == b"ok\n"
    assert client.get("/health/live", {"format": "json"}).json() == {"live": "OK"}


def period_of(settings, schedule_value, name="any name the site chose"):
    settings.CELERY_BEAT_SCHEDULE = {
        "mailgov.purge": {"task": "mailgov.purge", "schedule": 5.0},
        name: {"task": SWEEP, "schedule": schedule_value},
    }
    return SweepHeartbeat().period()


def test_heartbeat_period_from_every_kind_of_beat_schedule(settings):
    """The beat entry is found by its task, whatever its name, and its period
    read from every kind of schedule; a wrong period makes readiness flap."""
    assert period_of(settings, 30) == 30
    assert period_of(settings, 30.5) == 30.5
    assert period_of(settings, timedelta(minutes=2)) == 120
    assert period_of(settings, schedule(run_every=timedelta(seconds=45))) == 45
    assert period_of(settings, schedule(run_every=45)) == 45
    # A crontab: its largest gap between two runs.
    assert period_of(settings, crontab()) == 60  # every minute
    assert period_of(settings, crontab(minute="*/15")) == 15 * 60
    assert period_of(settings, crontab(minute="0,10")) == 50 * 60
    assert period_of(settings, crontab(minute=0, hour="9-17")) == (24 - 17 + 9) * 3600
    # Weekdays only: Friday 17:00 to Monday 09:00.
    weekdays = crontab(minute=0, hour="9-17", day_of_week="mon-fri")
    assert period_of(settings, weekdays) == (2 * 24 + 24 - 17 + 9) * 3600
    # Once a month, on the 1st: the longest month.
    assert period_of(settings, crontab(minute=0, hour=0, day_of_month=1)) == 31 * 86400
    # Two entries for the task: the shorter period is the one beat keeps.
    settings.CELERY_BEAT_SCHEDULE = {
        "a": {"task": SWEEP, "schedule": 600.0},
        "b": {"task": SWEEP, "schedule": timedelta(seconds=20)},
    }
    assert SweepHeartbeat().period() == 20
    # No entry for the task: mailgov's default period.
    settings.CELERY_BEAT_SCHEDULE = {SWEEP: {"task": "something.else", "schedule": 1.0}}
    assert SweepHeartbeat().period() == 10


def test_a_timedelta_schedule_does_not_make_readiness_flap(
    client, heartbeat, worker_answers, settings
):
    settings.CELERY_BEAT_SCHEDULE = {
        "dispatch": {"task": SWEEP, "schedule": timedelta(minutes=1)},
    }
    heartbeat(ago=120)  # two minutes: within six periods of one minute
    status, text = ready(client)
    assert status == 200, text


def test_live_answers_whatever_else_is_down(client, settings):
    settings.MAILGOV_ENCRYPTION_KEYS = ["garbage"]
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = client.get("/health/live")
    assert response.status_code == 200
    assert response.content == b"ok\n"
    assert "no-store" in response["Cache-Control"]
