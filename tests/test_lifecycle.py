"""Lifecycle sweeps against the real demo authorization server: proactive
refresh (and its failure days), dormant grants, retention, their commands,
and the authorization server's fault switch they are tested with."""

from __future__ import annotations

import io
import threading
from datetime import datetime, timedelta
from importlib import import_module

import pytest
import requests
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.formats import date_format

from mailgov import lifecycle
from mailgov.exceptions import ProviderUnavailableError, TokenRefreshUnavailableError
from mailgov.models import (
    ConsentReceipt,
    Mailbox,
    MailboxCredentials,
    OutboxAttempt,
    OutboxMessage,
    RefreshEvent,
    SendLog,
)
from mailgov.providers import get_provider
from mailgov.services import retry_revocations
from mailgov.sweeps import acquire, release
from mailgov.tokens import get_access_token
from tests.conftest import (
    SCOPES,
    assert_refresh_token_revoked,
    connect_through_flow,
    secrets_of,
)

# Several threads (the refresh sweep's pool) use the database.
pytestmark = pytest.mark.django_db(transaction=True)

State = OutboxMessage.State


@pytest.fixture
def faulty(authserver):
    """The authorization server with its fault switch off before and after."""
    authserver.clear_faults()
    yield authserver
    authserver.clear_faults()


@pytest.fixture
def grant(authserver, connect, site_user):
    """``grant(name)``: a mailbox of site user ``name`` holding a real grant of
    the demo server's alice (it has two users; each flow is its own grant)."""

    def make(name: str) -> Mailbox:
        mailbox = connect_through_flow(authserver, site_user(name), "alice", SCOPES)
        # One active mailbox per address: give each its own.
        Mailbox.objects.filter(pk=mailbox.pk).update(address=f"alice+{name}@example.test")
        return Mailbox.objects.get(pk=mailbox.pk)

    return make


def expire(mailbox: Mailbox, seconds: int = 60) -> None:
    """The access token expires ``seconds`` from now (inside REFRESH_AHEAD_SECONDS)."""
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(
        expires_at=timezone.now() + timedelta(seconds=seconds)
    )


def notices(mailbox: Mailbox, event: str) -> int:
    return OutboxMessage.objects.filter(
        kind=OutboxMessage.Kind.NOTIFICATION, mailbox=mailbox, event=event
    ).count()


def fresh(mailbox: Mailbox) -> Mailbox:
    return Mailbox.objects.get(pk=mailbox.pk)


def day(offset: int, hour: int = 0) -> datetime:
    """Midnight UTC ``offset`` days from today, plus ``hour`` hours (always ahead of now)."""
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=offset, hours=hour)


# -- the authorization server's fault switch -------------------------------------


def token_post(authserver) -> requests.Response:
    return requests.post(
        authserver.metadata()["token_endpoint"],
        data={
            "grant_type": "refresh_token",
            "refresh_token": "not-a-token",
            "client_id": authserver.client_id,
            "client_secret": authserver.client_secret,
        },
        timeout=10,
    )


def test_fault_switch_breaks_the_token_endpoint_until_cleared(faulty):
    assert token_post(faulty).json()["error"] == "invalid_grant"
    faulty.set_faults(token=503)
    broken = token_post(faulty)
    assert (broken.status_code, broken.json()) == (503, {"error": "temporarily_unavailable"})
    # Only the endpoint asked for: discovery still answers.
    assert faulty.metadata()["issuer"] == faulty.url
    faulty.clear_faults()
    assert token_post(faulty).json()["error"] == "invalid_grant"


def test_fault_switch_breaks_revocation_and_the_provider_sees_an_outage(faulty, demo_provider):
    provider = get_provider("demo")
    with faulty.faults(revoke=503):
        assert token_post(faulty).json()["error"] == "invalid_grant"  # token endpoint works
        with pytest.raises(ProviderUnavailableError) as caught:
            provider.revoke("not-a-token")
        assert caught.value.status == 503
    assert not faulty.faults_path.exists()
    assert provider.revoke("not-a-token") is True  # RFC 7009: unknown token is fine


def test_fault_switch_refuses_what_is_not_an_error_status(faulty):
    with pytest.raises(ValueError, match="400-599"):
        faulty.set_faults(token=200)
    faulty.set_faults(token=503, revoke=429)
    faulty.set_faults(revoke=503)  # replaces: the token endpoint works again
    assert token_post(faulty).json()["error"] == "invalid_grant"
    faulty.faults_path.write_text("{not json")  # a broken file is no fault
    assert token_post(faulty).json()["error"] == "invalid_grant"


def test_a_503_from_the_token_endpoint_is_a_passing_failure(faulty, connect):
    mailbox = connect("alice")
    expire(mailbox, -1)
    with faulty.faults(token=503), pytest.raises(TokenRefreshUnavailableError):
        get_access_token(mailbox)
    assert fresh(mailbox).status == Mailbox.Status.ACTIVE


# -- proactive refresh -----------------------------------------------------------


def test_sweep_refreshes_only_expiring_mailboxes_in_use(grant):
    due, later, dormant, suspended = (grant(n) for n in ("due", "later", "dormant", "suspended"))
    for mailbox in (due, dormant, suspended):
        expire(mailbox)
    Mailbox.objects.filter(pk=dormant.pk).update(
        connected_at=timezone.now() - timedelta(days=61), last_used_at=None
    )
    Mailbox.objects.filter(pk=suspended.pk).update(status=Mailbox.Status.SUSPENDED)
    before = {m.pk: secrets_of(m) for m in (due, later, dormant, suspended)}

    counts = lifecycle.refresh_expiring()

    assert counts == {"refreshed": 1, "failed": 0, "revoked": 0, "skipped": 0, "errors": 0}
    access, refresh = secrets_of(due)
    # A new access token, and the rotated refresh token stored with it.
    assert access != before[due.pk][0] and refresh != before[due.pk][1]
    assert get_access_token(due) == access  # valid for the hour: no other refresh
    assert fresh(due).last_refreshed_at is not None
    for other in (later, dormant, suspended):
        assert secrets_of(other) == before[other.pk]


def test_a_mailbox_kept_by_its_owner_counts_as_in_use(grant):
    mailbox = grant("kept")
    expire(mailbox)
    Mailbox.objects.filter(pk=mailbox.pk).update(
        connected_at=timezone.now() - timedelta(days=90), kept_at=timezone.now()
    )
    assert lifecycle.refresh_expiring()["refreshed"] == 1


def test_a_503_keeps_tokens_and_status_and_schedules_a_retry(faulty, connect):
    mailbox = connect("alice")
    expire(mailbox)
    before = secrets_of(mailbox)
    now = timezone.now()
    with faulty.faults(token=503):
        counts = lifecycle.refresh_expiring(now=now)
        assert counts["failed"] == 1
        row = fresh(mailbox)
        assert secrets_of(mailbox) == before
        assert row.status == Mailbox.Status.ACTIVE
        assert (row.refresh_failures, row.refresh_failing_days) == (1, 1)
        # Backoff from 60 s with jitter (half to all of the step).
        assert now + timedelta(seconds=30) <= row.refresh_retry_at <= now + timedelta(seconds=60)
        # Until then the sweep leaves it alone: no request at all.
        assert lifecycle.refresh_expiring(now=now)["skipped"] == 1
    after = lifecycle.refresh_expiring(now=row.refresh_retry_at)
    assert after["refreshed"] == 1
    row = fresh(mailbox)
    assert (row.refresh_failures, row.refresh_failing_days, row.refresh_retry_at) == (0, 0, None)
    assert secrets_of(mailbox)[0] != before[0]


def test_five_hundred_failures_in_one_day_are_one_failing_day(connect, settings):
    mailbox = connect("alice")
    start = day(1)
    with CaptureQueriesContext(connection) as queries:
        for minute in range(500):
            lifecycle.record_refresh_failure(mailbox, now=start + timedelta(minutes=minute * 2))
    assert len(queries) == 500  # one UPDATE each, nothing to tell
    row = fresh(mailbox)
    assert (row.refresh_failures, row.refresh_failing_days) == (500, 1)
    assert not row.refresh_failing
    assert notices(mailbox, "refresh_failing") == 0
    # The backoff is capped at an hour.
    assert row.refresh_retry_at <= start + timedelta(minutes=998, hours=1)


def test_failures_on_three_days_tell_the_owner_once_and_recovery_once(faulty, connect):
    mailbox = connect("alice")
    with faulty.faults(token=503):
        # Several sweeps a day, each after the previous one's retry time.
        for offset, hour in [(1, 0), (1, 2), (1, 4), (2, 0), (2, 12)]:
            expire(mailbox)
            assert lifecycle.refresh_expiring(now=day(offset, hour))["failed"] == 1
        row = fresh(mailbox)
        assert (row.refresh_failing_days, row.refresh_failing) == (2, False)
        assert notices(mailbox, "refresh_failing") == 0
        for hour in (0, 2):
            expire(mailbox)
            assert lifecycle.refresh_expiring(now=day(3, hour))["failed"] == 1
        row = fresh(mailbox)
        assert (row.refresh_failing_days, row.refresh_failing) == (3, True)
        assert row.refresh_failing_notified
        expire(mailbox)
        lifecycle.refresh_expiring(now=day(4))
        assert fresh(mailbox).refresh_failing_days == 4
        assert notices(mailbox, "refresh_failing") == 1
        assert secrets_of(mailbox)  # tokens kept throughout
    assert notices(mailbox, "refresh_recovered") == 0
    expire(mailbox)
    assert lifecycle.refresh_expiring(now=day(4, 3))["refreshed"] == 1
    row = fresh(mailbox)
    assert (row.refresh_failing_days, row.refresh_failing, row.refresh_failing_notified) == (
        0,
        False,
        False,
    )
    expire(mailbox)
    assert lifecycle.refresh_expiring(now=day(4, 4))["refreshed"] == 1
    assert notices(mailbox, "refresh_recovered") == 1
    assert notices(mailbox, "refresh_failing") == 1
    notice = OutboxMessage.objects.get(mailbox=mailbox, event="refresh_failing")
    assert notice.recipient_user == mailbox.owner
    assert "alice@example.test" in notice.payload and "3 different days" in notice.payload


def test_a_new_failing_episode_is_told_again(connect, settings):
    settings.MAILGOV_REFRESH_FAILING_DAYS = 2
    mailbox = connect("alice")
    for offset in (1, 2):
        lifecycle.record_refresh_failure(mailbox, now=day(offset))
    assert lifecycle.record_refresh_success(mailbox, now=day(2, 1)) is True
    for offset in (3, 4):
        lifecycle.record_refresh_failure(mailbox, now=day(offset))
    assert notices(mailbox, "refresh_failing") == 2
    assert lifecycle.record_refresh_success(fresh(mailbox), now=day(5)) is True
    assert notices(mailbox, "refresh_recovered") == 2
    # Without failures, a success does nothing, not even a query.
    with CaptureQueriesContext(connection) as queries:
        assert lifecycle.record_refresh_success(fresh(mailbox), now=day(5)) is False
    assert len(queries) == 1  # fresh() itself


def test_racing_sweeps_tell_the_owner_once(connect, settings):
    settings.MAILGOV_REFRESH_FAILING_DAYS = 1
    mailbox = connect("alice")
    first, second = fresh(mailbox), fresh(mailbox)  # two processes' copies
    assert lifecycle.record_refresh_failure(first, now=day(1)) is True
    assert lifecycle.record_refresh_failure(second, now=day(1, 1)) is False
    assert notices(mailbox, "refresh_failing") == 1
    first, second = fresh(mailbox), fresh(mailbox)  # both know the owner was told
    assert lifecycle.record_refresh_success(first, now=day(1, 2)) is True
    assert lifecycle.record_refresh_success(second, now=day(1, 3)) is False
    assert notices(mailbox, "refresh_recovered") == 1


def test_a_notice_that_cannot_be_queued_is_tried_again(connect, settings, monkeypatch, caplog):
    settings.MAILGOV_REFRESH_FAILING_DAYS = 1
    mailbox = connect("alice")

    def broken(*args, **kwargs):
        raise RuntimeError("template gone")

    monkeypatch.setattr(lifecycle, "notify_owner", broken)
    assert lifecycle.record_refresh_failure(mailbox, now=day(1)) is False
    assert not fresh(mailbox).refresh_failing_notified  # rolled back with the notice
    assert "refresh_failing notice not queued: RuntimeError" in caplog.text
    monkeypatch.undo()
    assert lifecycle.record_refresh_failure(mailbox, now=day(1, 1)) is True
    assert notices(mailbox, "refresh_failing") == 1


def test_each_pool_thread_closes_its_connection(grant, monkeypatch):
    boxes = [grant(f"c{i}") for i in range(2)]
    for mailbox in boxes:
        expire(mailbox)
    closed = []

    class Recorder:
        def close(self) -> None:
            closed.append(threading.current_thread().name)
            connection.close()

    monkeypatch.setattr(lifecycle, "connection", Recorder())
    assert lifecycle.refresh_expiring(concurrency=2)["refreshed"] == 2
    assert len(closed) == 2 and all(n.startswith("mailgov-refresh") for n in closed)
    assert threading.current_thread().name not in closed


def test_a_mailbox_changed_while_the_sweep_runs_is_skipped(grant):
    first, suspended, refreshed = grant("first"), grant("suspended"), grant("refreshed")
    for seconds, mailbox in enumerate((first, suspended, refreshed), start=1):
        expire(mailbox, seconds * 10)  # the sweep takes them in this order

    def meanwhile(n: int) -> None:
        # After the first: one is suspended, another refreshed by a sender.
        Mailbox.objects.filter(pk=suspended.pk).update(status=Mailbox.Status.SUSPENDED)
        MailboxCredentials.objects.filter(pk=refreshed.pk).update(
            expires_at=timezone.now() + timedelta(hours=1)
        )

    counts = lifecycle.refresh_expiring(concurrency=1, progress=meanwhile)
    assert (counts["refreshed"], counts["skipped"]) == (1, 2)


def test_a_failing_progress_callback_stops_the_threaded_sweep(grant):
    boxes = [grant(f"p{i}") for i in range(2)]
    for mailbox in boxes:
        expire(mailbox)

    def broken(n: int) -> None:
        raise RuntimeError("progress bar gone")

    with pytest.raises(RuntimeError, match="progress bar gone"):
        lifecycle.refresh_expiring(concurrency=2, progress=broken)


def test_invalid_grant_makes_the_mailbox_need_reconsent(connect, authserver):
    mailbox = connect("alice")
    refresh = secrets_of(mailbox)[1]
    assert get_provider("demo").revoke(refresh) is True
    assert_refresh_token_revoked(authserver, refresh)
    lifecycle.record_refresh_failure(mailbox, now=day(1))
    expire(mailbox)
    counts = lifecycle.refresh_expiring(now=day(1, 2))
    assert counts["revoked"] == 1
    row = fresh(mailbox)
    assert row.status == Mailbox.Status.NEEDS_RECONSENT
    assert row.revocation_reason.startswith("invalid_grant")
    assert secrets_of(mailbox) == []
    assert (row.refresh_failures, row.refresh_failing_days) == (0, 0)
    assert notices(mailbox, "needs_reconsent") == 1
    assert notices(mailbox, "refresh_failing") == 0


def test_a_provider_no_longer_configured_is_an_error_for_the_operator(connect, settings):
    mailbox = connect("alice")
    expire(mailbox)
    settings.MAILGOV_PROVIDERS = {}
    assert lifecycle.refresh_expiring()["errors"] == 1
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="operator must fix"):
        call_command("mailgov_refresh_tokens", stdout=out, stderr=err)
    assert "errors: 1" in out.getvalue()
    row = fresh(mailbox)
    assert row.status == Mailbox.Status.ACTIVE and row.refresh_failures == 0


def test_a_token_that_cannot_be_decrypted_is_an_error_not_a_failure(grant, caplog):
    broken, other = grant("broken"), grant("other")
    # The refresh token of another row: bound to that row, it does not open here.
    MailboxCredentials.objects.filter(pk=broken.pk).update(
        refresh_token=MailboxCredentials.objects.get(pk=other.pk).__dict__["refresh_token"]
    )
    expire(broken)
    assert lifecycle.refresh_expiring()["errors"] == 1
    assert "DecryptionError" in caplog.text
    assert fresh(broken).refresh_failures == 0


def test_a_recovery_is_noticed_when_a_sender_refreshed_first(connect, settings):
    settings.MAILGOV_REFRESH_FAILING_DAYS = 1
    mailbox = connect("alice")
    now = timezone.now()
    assert lifecycle.record_refresh_failure(mailbox, now=now - timedelta(hours=2)) is True
    # The token is valid for its hour (a send refreshed it): nothing to refresh,
    # but refreshing evidently works again.
    counts = lifecycle.refresh_expiring(now=now)
    assert (counts["refreshed"], counts["skipped"]) == (0, 1)
    assert notices(mailbox, "refresh_recovered") == 1
    assert fresh(mailbox).refresh_failures == 0


def test_queries_per_mailbox_do_not_grow_with_the_batch(grant):
    boxes = [grant(f"q{i}") for i in range(6)]

    def sweep() -> int:
        with CaptureQueriesContext(connection) as queries:
            lifecycle.refresh_expiring(concurrency=1)
        return len(queries)

    base = sweep()  # nothing expiring: the batch query alone
    for mailbox in boxes[:2]:
        expire(mailbox)
    two = sweep()
    for mailbox in boxes:
        expire(mailbox)
    six = sweep()
    assert (two - base) % 2 == 0 and (six - base) % 6 == 0
    assert (two - base) // 2 == (six - base) // 6 > 0


def test_the_thread_pool_refreshes_every_mailbox_once(grant, authserver):
    boxes = [grant(f"t{i}") for i in range(4)]
    for mailbox in boxes:
        expire(mailbox)
    before = {m.pk: secrets_of(m)[0] for m in boxes}
    ticks = []
    counts = lifecycle.refresh_expiring(concurrency=3, progress=ticks.append)
    assert counts["refreshed"] == 4 and ticks == [1, 1, 1, 1]
    assert all(secrets_of(m)[0] != before[m.pk] for m in boxes)


# -- dormant grants --------------------------------------------------------------


@pytest.fixture
def idle(site_user, demo_provider):
    """``idle(name, days)``: an active mailbox last active ``days`` ago (no tokens)."""

    def make(name: str, days: float) -> Mailbox:
        return Mailbox.objects.create(
            owner=site_user(name),
            provider="demo",
            address=f"{name}@example.test",
            connected_at=timezone.now() - timedelta(days=days),
            scopes=SCOPES,
        )

    return make


def test_owner_is_warned_once_before_dormancy(idle):
    young, close = idle("young", 52.5), idle("close", 53.5)
    now = timezone.now()
    assert lifecycle.revoke_dormant(now=now) == {
        "revoked": 0,
        "warned": 1,
        "skipped": 0,
        "failed": 0,
    }
    assert fresh(close).dormant_warned_at == now and fresh(young).dormant_warned_at is None
    assert lifecycle.revoke_dormant(now=now + timedelta(days=1))["warned"] == 1  # young's turn
    assert lifecycle.revoke_dormant(now=now + timedelta(days=2))["warned"] == 0
    assert notices(close, "dormant_warning") == 1 and notices(young, "dormant_warning") == 1
    body = OutboxMessage.objects.get(mailbox=close, event="dormant_warning").payload
    assert "/mailboxes/" in body and "close@example.test" in body
    assert date_format(now + timedelta(days=7), "DATE_FORMAT") in body


def test_use_after_a_warning_starts_the_clock_again(idle):
    mailbox = idle("busy", 54)
    now = timezone.now()
    lifecycle.revoke_dormant(now=now)
    Mailbox.objects.filter(pk=mailbox.pk).update(last_used_at=now + timedelta(seconds=1))
    later = now + timedelta(days=54)
    assert lifecycle.revoke_dormant(now=later) == {
        "revoked": 0,
        "warned": 1,
        "skipped": 0,
        "failed": 0,
    }
    assert notices(mailbox, "dormant_warning") == 2
    assert fresh(mailbox).dormant_warned_at == later


def test_racing_sweeps_warn_once(idle):
    first, second = idle("first", 55), idle("second", 54)
    now = timezone.now()

    def meanwhile(n: int) -> None:
        # Another sweep (a second beat) runs after this one read its batch.
        lifecycle.revoke_dormant(now=now)

    counts = lifecycle.revoke_dormant(now=now, progress=meanwhile)
    assert (counts["warned"], counts["skipped"]) == (1, 1)
    assert notices(first, "dormant_warning") == notices(second, "dormant_warning") == 1


def test_a_mailbox_used_while_the_sweep_runs_is_not_revoked(idle):
    first, second = idle("first", 71), idle("second", 70)
    Mailbox.objects.filter(pk__in=[first.pk, second.pk]).update(
        dormant_warned_at=timezone.now() - timedelta(days=8)
    )

    def meanwhile(n: int) -> None:
        Mailbox.objects.filter(pk=second.pk).update(last_used_at=timezone.now())

    counts = lifecycle.revoke_dormant(progress=meanwhile)
    assert (counts["revoked"], counts["skipped"]) == (1, 1)
    assert fresh(second).status == Mailbox.Status.ACTIVE


def test_a_warned_mailbox_is_revoked_after_dormant_days(idle):
    mailbox = idle("old", 50)
    # Warned as the warning window opened (the hourly sweep's normal case).
    warned = mailbox.connected_at + timedelta(days=53, seconds=1)
    assert lifecycle.revoke_dormant(now=warned)["warned"] == 1
    due = mailbox.connected_at + timedelta(days=60, seconds=1)
    assert lifecycle.revoke_dormant(now=due - timedelta(seconds=1))["revoked"] == 0
    assert lifecycle.revoke_dormant(now=due)["revoked"] == 1
    row = fresh(mailbox)
    assert row.status == Mailbox.Status.REVOKED
    assert row.revocation_reason == "dormant: unused for 60 days"
    assert lifecycle.revoke_dormant(now=due + timedelta(days=1))["revoked"] == 0


def test_a_grant_past_due_and_never_warned_gets_the_full_warning_period(idle):
    mailbox = idle("forgotten", 100)
    now = timezone.now()
    assert lifecycle.revoke_dormant(now=now)["warned"] == 1
    assert fresh(mailbox).status == Mailbox.Status.ACTIVE
    assert lifecycle.revoke_dormant(now=now + timedelta(days=7, seconds=-1))["revoked"] == 0
    assert lifecycle.revoke_dormant(now=now + timedelta(days=7))["revoked"] == 1


def test_every_status_but_revoked_goes_dormant(idle):
    boxes = {s: idle(s, 80) for s in ("needs_reconsent", "suspended", "revoked")}
    for status, mailbox in boxes.items():
        Mailbox.objects.filter(pk=mailbox.pk).update(
            status=status, dormant_warned_at=timezone.now() - timedelta(days=8)
        )
    counts = lifecycle.revoke_dormant()
    assert counts["revoked"] == 2 and counts["warned"] == 0


def test_a_dormant_grant_is_revoked_at_the_provider_too(connect, authserver):
    mailbox = connect("alice")
    refresh = secrets_of(mailbox)[1]
    Mailbox.objects.filter(pk=mailbox.pk).update(
        connected_at=timezone.now() - timedelta(days=61),
        dormant_warned_at=timezone.now() - timedelta(days=8),
    )
    assert lifecycle.revoke_dormant()["revoked"] == 1
    # Deferred to the revocation task; its sweep does the same.
    assert retry_revocations(due_only=True)["revoked"] == 1
    assert_refresh_token_revoked(authserver, refresh)


def test_dry_run_lists_and_changes_nothing(idle):
    warn, revoke = idle("warn", 55), idle("revoke", 70)
    Mailbox.objects.filter(pk=revoke.pk).update(
        dormant_warned_at=timezone.now() - timedelta(days=8)
    )
    snapshot = list(Mailbox.objects.order_by("pk").values())
    planned = lifecycle.revoke_dormant(dry_run=True)
    assert planned == {"revoked": [str(revoke.pk)], "warned": [str(warn.pk)]}
    assert list(Mailbox.objects.order_by("pk").values()) == snapshot
    assert not OutboxMessage.objects.exists()
    out = io.StringIO()
    call_command("mailgov_revoke_dormant", "--dry-run", stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    assert "would be revoked: 1" in text and "would be warned: 1" in text
    assert f"{revoke.pk}  revoke@example.test  last activity " in text
    assert list(Mailbox.objects.order_by("pk").values()) == snapshot


def test_keep_resets_the_dormancy_clock(idle, client, site_user):
    mailbox = idle("keeper", 54)
    lifecycle.revoke_dormant()
    client.force_login(mailbox.owner)
    page = client.get("/mailboxes/").content.decode()
    assert "Unused since" in page and f"/mailboxes/{mailbox.pk}/keep/" in page
    response = client.post(f"/mailboxes/{mailbox.pk}/keep/")
    assert response.status_code == 302 and response["Location"] == "/mailboxes/"
    assert response["Referrer-Policy"] == "no-referrer" and "no-store" in response["Cache-Control"]
    row = fresh(mailbox)
    assert row.kept_at is not None and row.dormant_warned_at is None
    assert f"/mailboxes/{mailbox.pk}/keep/" not in client.get("/mailboxes/").content.decode()
    later = timezone.now() + timedelta(days=10)
    assert lifecycle.revoke_dormant(now=later) == {
        "revoked": 0,
        "warned": 0,
        "skipped": 0,
        "failed": 0,
    }
    # Only the owner, only by POST.
    assert client.get(f"/mailboxes/{mailbox.pk}/keep/").status_code == 405
    stranger = Client()
    stranger.force_login(site_user("stranger"))
    assert stranger.post(f"/mailboxes/{mailbox.pk}/keep/").status_code == 404


def test_keep_is_rate_limited(idle, client, settings):
    settings.MAILGOV_DISCONNECT_RATE = "2/m"
    mailbox = idle("eager", 54)
    client.force_login(mailbox.owner)
    statuses = [client.post(f"/mailboxes/{mailbox.pk}/keep/").status_code for _ in range(3)]
    assert statuses == [302, 302, 429]


# -- retention -------------------------------------------------------------------


def outbox_row(mailbox, state, finished_at, **fields) -> OutboxMessage:
    row = OutboxMessage(mailbox=mailbox, message_id="<m@x>", state=state, finished_at=finished_at)
    for name, value in fields.items():
        setattr(row, name, value)
    row.save()
    return row


def test_purge_deletes_exactly_what_is_past_retention(idle):
    now = timezone.now()
    logs_cutoff = now - timedelta(days=90)
    receipts_cutoff = now - timedelta(days=1095)
    live, ended_long_ago, ended_lately = idle("live", 1), idle("gone", 1), idle("lately", 1)
    Mailbox.objects.filter(pk=ended_long_ago.pk).update(
        status="revoked", revoked_at=receipts_cutoff - timedelta(days=1)
    )
    Mailbox.objects.filter(pk=ended_lately.pk).update(status="revoked", revoked_at=now)
    old, edge = logs_cutoff - timedelta(seconds=1), logs_cutoff
    old_log = SendLog.objects.create(mailbox=live, status="sent", attempted_at=old)
    SendLog.objects.create(mailbox=live, status="sent", attempted_at=edge)
    done = {s: outbox_row(live, s, old) for s in (State.SENT, State.FAILED, State.CANCELLED)}
    kept_rows = [
        outbox_row(live, State.SENT, edge),
        outbox_row(live, State.QUEUED, None, created_at=old),
        outbox_row(live, State.HELD, old, payload="{}"),
    ]
    OutboxAttempt.objects.create(message=done[State.SENT], started_at=old)
    OutboxAttempt.objects.create(message=kept_rows[0], started_at=old)
    young_attempt = OutboxAttempt.objects.create(message=kept_rows[0], started_at=edge)
    body = outbox_row(live, State.FAILED, now - timedelta(days=8), payload="{}")

    def receipt(mailbox, created_at):
        return ConsentReceipt.objects.create(
            user=live.owner,
            mailbox=mailbox,
            provider="demo",
            capability="send_mail",
            action="grant",
            explanation_version=1,
            created_at=created_at,
        )

    very_old = receipts_cutoff - timedelta(seconds=1)
    gone = [receipt(None, very_old), receipt(ended_long_ago, very_old)]
    kept = [
        receipt(None, receipts_cutoff),
        receipt(live, very_old),
        receipt(ended_lately, very_old),
    ]

    from mailgov.models import AdminJob, RefreshEvent

    RefreshEvent.objects.create(mailbox=live, outcome="ok", at=old)
    young_refresh = RefreshEvent.objects.create(mailbox=live, outcome="ok", at=edge)
    AdminJob.objects.create(action="revoke", state="done", created_at=old)
    running = AdminJob.objects.create(action="revoke", state="running", created_at=old)

    counts = lifecycle.purge(now=now)

    assert counts == {
        "sendlogs": 1,
        "attempts": 2,
        "outbox": 3,
        "bodies": 2,
        "receipts": 2,
        "refreshes": 1,
        "jobs": 1,
    }
    assert list(RefreshEvent.objects.all()) == [young_refresh]
    assert list(AdminJob.objects.all()) == [running]  # never a job still at work
    assert not SendLog.objects.filter(pk=old_log.pk).exists() and SendLog.objects.count() == 1
    assert set(OutboxMessage.objects.values_list("pk", flat=True)) == {
        r.pk for r in [*kept_rows, body]
    }
    assert list(OutboxAttempt.objects.all()) == [young_attempt]
    assert fresh_row(body).payload is None
    # The held body was old: it is now failed, kept for the full period from now.
    assert OutboxMessage.objects.get(pk=kept_rows[2].pk).state == State.FAILED
    assert set(ConsentReceipt.objects.values_list("pk", flat=True)) == {r.pk for r in kept}
    assert not ConsentReceipt.objects.filter(pk__in=[r.pk for r in gone]).exists()
    assert lifecycle.purge(now=now) == dict.fromkeys(counts, 0)


def fresh_row(row: OutboxMessage) -> OutboxMessage:
    return OutboxMessage.objects.get(pk=row.pk)


def test_purge_deletes_in_chunks(idle, monkeypatch):
    monkeypatch.setattr(lifecycle, "PURGE_CHUNK", 2)
    mailbox = idle("chunky", 1)
    old = timezone.now() - timedelta(days=100)
    for _ in range(5):
        SendLog.objects.create(mailbox=mailbox, status="sent", attempted_at=old)
    with CaptureQueriesContext(connection) as queries:
        assert lifecycle.purge()["sendlogs"] == 5
    deletes = [q for q in queries if q["sql"].startswith('DELETE FROM "mailgov_sendlog"')]
    assert len(deletes) == 3
    assert not SendLog.objects.exists()


def test_purged_tables_are_deleted_in_bulk_without_loading_their_rows():
    """mailgov's deletion receivers listen to the models they concern (the
    mailbox and the user, and their proxies) only: one listening to every
    model would make Django load and signal each row of a purge instead of
    deleting in one statement."""
    from django.db.models.deletion import Collector

    for model in (SendLog, RefreshEvent, OutboxAttempt):
        assert Collector(using="default").can_fast_delete(model.objects.all()), model


def test_purge_dry_run_counts_and_deletes_nothing(idle):
    mailbox = idle("dry", 1)
    SendLog.objects.create(
        mailbox=mailbox, status="sent", attempted_at=timezone.now() - timedelta(days=91)
    )
    assert lifecycle.purge(dry_run=True) == {
        "sendlogs": 1,
        "attempts": 0,
        "outbox": 0,
        "receipts": 0,
        "refreshes": 0,
        "jobs": 0,
    }
    assert SendLog.objects.count() == 1


# -- commands ----------------------------------------------------------------------


def test_commands_run_and_print_counts(connect, idle):
    mailbox = connect("alice")
    expire(mailbox)
    idle("sleepy", 54)
    SendLog.objects.create(status="sent", attempted_at=timezone.now() - timedelta(days=91))
    outputs = {}
    for command in ("mailgov_refresh_tokens", "mailgov_revoke_dormant", "mailgov_purge"):
        out = io.StringIO()
        call_command(command, stdout=out, stderr=io.StringIO())
        outputs[command] = out.getvalue()
    assert outputs["mailgov_refresh_tokens"].startswith("refreshed: 1, failed (retried later): 0")
    assert outputs["mailgov_revoke_dormant"].startswith("revoked: 0, warned: 1,")
    assert outputs["mailgov_purge"].startswith("deleted: send logs: 1, outbox attempts: 0")
    out = io.StringIO()
    call_command("mailgov_purge", "--dry-run", stdout=out)
    assert out.getvalue().startswith("would delete: send logs: 0")


@pytest.mark.parametrize(
    ("command", "lock"),
    [
        ("mailgov_refresh_tokens", "mailgov.refresh_tokens"),
        ("mailgov_revoke_dormant", "mailgov.revoke_dormant"),
        ("mailgov_purge", "mailgov.purge"),
    ],
)
def test_a_command_refuses_while_another_run_holds_the_lock(command, lock, monkeypatch):
    calls = []
    module = import_module(f"mailgov.management.commands.{command}")
    for name in ("refresh_expiring", "revoke_dormant", "purge"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda **kw: calls.append(kw) or {})
    holder = acquire(lock, ttl=600)
    assert holder
    try:
        with pytest.raises(CommandError, match=f"Another run holds the {lock} lock"):
            call_command(command, stdout=io.StringIO(), stderr=io.StringIO())
    finally:
        release(lock, holder)
    assert calls == []
