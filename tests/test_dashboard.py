"""The governance dashboard: its figures on a known estate, its links (each
lists exactly what its number counts), its CSV, its permissions, and a
query count that does not grow with the estate."""

from __future__ import annotations

import csv
import io
import logging
import re
from datetime import timedelta
from html import unescape

import pytest
from auditlog.models import LogEntry
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailgov import incidents
from mailgov.dashboard import SEND_DAYS, build
from mailgov.models import (
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from tests.conftest import AUDITORS, OFFICERS, staff_user

pytestmark = pytest.mark.django_db

URL = "/admin/mailgov/governance/"
EXPORT_URL = "/admin/mailgov/governance/export.csv"
GMAIL = "https://mail.google.com/"
State = OutboxMessage.State


def staff(django_user_model, username: str, group: str | None = None, perms=(), **extra):
    return staff_user(username, group, perms, **extra)


@pytest.fixture
def auditor(django_user_model):
    return staff(django_user_model, "auditor", AUDITORS)


@pytest.fixture
def auditor_client(client, auditor):
    client.force_login(auditor)
    return client


def mailbox(owner, provider: str, address: str, status: str = "active", **fields) -> Mailbox:
    return Mailbox.objects.create(
        owner=owner, provider=provider, address=address, status=status, **fields
    )


@pytest.fixture
def estate(settings, django_user_model):
    """A known estate: ten mailboxes of two providers (Google configured,
    ``demo`` not any more), tokens, refreshes, sends, outbox rows, pending
    revocations and a frozen incident."""
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid"}}
    now = timezone.now()
    alice = django_user_model.objects.create_user("alice", "alice@example.test", "pw")
    bob = django_user_model.objects.create_user("bob", "bob@example.test", "pw")
    old = now - timedelta(days=100)
    boxes = {
        "g1": mailbox(alice, "google", "g1@x.test", scopes=[GMAIL, "openid"]),
        "g2": mailbox(
            alice,
            "google",
            "g2@x.test",
            scopes=["openid", "email"],
            refresh_failures=1,
            refresh_failing_days=1,
        ),
        "g3": mailbox(
            bob, "google", "g3@x.test", "revoked", scopes=[GMAIL], revocation_retry_at=now
        ),
        "d1": mailbox(bob, "demo", "d1@x.test", refresh_failures=2, refresh_failing_days=3),
        "d2": mailbox(bob, "demo", "d2@x.test", "needs_reconsent"),
        "d3": mailbox(bob, "demo", "d3@x.test", "suspended", refresh_failing_days=5),
        # Dormant: not warned yet; warned and past due; warned, due in 6 days.
        "d4": mailbox(alice, "demo", "d4@x.test", connected_at=old),
        "d5": mailbox(
            alice,
            "demo",
            "d5@x.test",
            connected_at=old,
            dormant_warned_at=now - timedelta(days=10),
        ),
        "d6": mailbox(
            bob,
            "demo",
            "d6@x.test",
            connected_at=now - timedelta(days=90),
            dormant_warned_at=now - timedelta(days=1),
        ),
        "d7": mailbox(
            bob, "demo", "d7@x.test", "revoked", revocation_given_up_at=now - timedelta(days=1)
        ),
    }
    credentials = {
        "g1": {"access_token": "a-g1", "expires_at": now + timedelta(minutes=30)},
        "d1": {"access_token": "a-d1", "expires_at": now - timedelta(hours=2)},
        "d4": {"access_token": "a-d4", "expires_at": now + timedelta(days=2)},
        "d2": {"expires_at": now + timedelta(hours=1)},  # not active: not counted
        "g3": {"refresh_token": "r-g3"},
        "d7": {"refresh_token": "r-d7"},
    }
    for name, fields in credentials.items():
        MailboxCredentials.objects.create(mailbox=boxes[name], **fields)
    PendingRevocation.objects.create(mailbox_id=boxes["d1"].pk, provider="demo", refresh_token="p1")
    PendingRevocation.objects.create(
        mailbox_id=boxes["d2"].pk, provider="demo", refresh_token="p2", given_up_at=now
    )
    for outcome, days in [("unavailable", 1), ("unavailable", 2), ("refused", 3), ("ok", 0)]:
        RefreshEvent.objects.create(
            mailbox=boxes["d1"], outcome=outcome, at=now - timedelta(days=days)
        )
    RefreshEvent.objects.create(
        mailbox=boxes["d1"], outcome="unavailable", at=now - timedelta(days=10)
    )
    sends = [("sent", 0)] * 3 + [("failed", 0)] + [("sent", 2)] * 2 + [("sent", 40)] * 5
    SendLog.objects.bulk_create(
        SendLog(
            mailbox=boxes["g1"],
            status=status,
            attempted_at=now - timedelta(days=days),
            message_id=f"<{i}@x>",
        )
        for i, (status, days) in enumerate(sends)
    )
    rows = [
        (State.HELD, "frozen"),
        (State.HELD, "frozen"),
        (State.HELD, "mailbox_revoked"),
        (State.FAILED, "smtp_550"),
        *[(State.QUEUED, "")] * 3,
        *[(State.SENT, "")] * 4,
    ]
    # Held by the freeze: of a mailbox the freeze covers (resolving the other
    # incident releases what no freeze covers any more).
    OutboxMessage.objects.bulk_create(
        OutboxMessage(
            mailbox=boxes["d1" if code == "frozen" else "g1"],
            state=state,
            error_code=code,
            message_id=f"<o{i}@x>",
        )
        for i, (state, code) in enumerate(rows)
    )
    frozen = incidents.declare(title="Demo IdP breach", scope="provider", scope_value="demo")
    incidents.freeze(frozen)
    done = incidents.declare(title="Old drill")
    incidents.resolve(done, summary="Drill over.")
    return {"now": now, "boxes": boxes, "frozen": frozen}


# -- figures ------------------------------------------------------------------------------


def test_figures_of_a_known_estate(estate):
    dashboard = build()
    assert dashboard.by_status == {
        "active": 6,
        "needs_reconsent": 1,
        "suspended": 1,
        "revoked": 2,
    }
    assert dashboard.by_provider == {
        "demo": {"active": 4, "needs_reconsent": 1, "suspended": 1, "revoked": 1},
        "google": {"active": 2, "revoked": 1},
    }
    # Google: only the mailboxes granted its send scope; demo (no longer
    # configured): all of them, as an incident on the capability covers them.
    assert dashboard.by_capability["send_mail"]["mailboxes"] == 2 + 7
    assert dashboard.by_capability["send_mail"]["active"] == 1 + 4
    assert dashboard.dormant == {"to_warn": 1, "warned": 2, "due": 1}
    upcoming = [item.address for item in dashboard.upcoming_revocations]
    assert upcoming == ["d5@x.test", "d6@x.test"]
    d6 = dashboard.upcoming_revocations[1]
    assert abs(d6.due - (estate["now"] + timedelta(days=6))) < timedelta(seconds=5)
    assert dashboard.tokens == {"expiring": 1, "expired": 1}
    assert dashboard.refresh == {"failing": 1, "retrying": 2}
    assert dashboard.refresh_events == {"ok": 1, "unavailable": 2, "refused": 1, "revoked": 0}
    assert dashboard.revocations == {
        "pending": 1,
        "given_up": 1,
        "deleted_pending": 1,
        "deleted_given_up": 1,
    }
    assert len(dashboard.sends) == SEND_DAYS
    days = [day.day for day in dashboard.sends]
    assert days == sorted(days) and days[-1] == timezone.localdate()
    assert (dashboard.sends[-1].sent, dashboard.sends[-1].failed) == (3, 1)
    assert (dashboard.sends[-3].sent, dashboard.sends[-3].failed) == (2, 0)
    assert sum(day.total for day in dashboard.sends) == 6  # 40 days ago: not counted
    assert dashboard.sends[-1].failure_rate == 0.25
    assert dashboard.failure_rate == pytest.approx(1 / 6)
    assert dashboard.outbox["held"] == 3 and dashboard.outbox["failed"] == 1
    assert dashboard.outbox["queued"] == 3 and dashboard.outbox["sent"] == 4
    assert dashboard.held_reasons == {"frozen": 2, "mailbox_revoked": 1}
    assert dashboard.failed_reasons == {"smtp_550": 1}
    assert [incident.pk for incident in dashboard.freezes] == [estate["frozen"].pk]
    assert [incident.pk for incident in dashboard.open_incidents] == [estate["frozen"].pk]


def test_page_shows_the_figures_charts_and_tables(estate, auditor_client):
    response = auditor_client.get(URL)
    assert response.status_code == 200
    page = response.content.decode()
    main = page[page.index('id="content-main"') : page.index('id="footer"')]
    # The freeze banner names the incident.
    assert f"Sending is frozen by incident #{estate['frozen'].pk}" in main
    # Numbers link to the filtered lists.
    assert '<a href="/admin/mailgov/mailbox/?status=revoked">2</a>' in main
    assert '<a href="/admin/mailgov/outboxmessage/?state__exact=held">3</a>' in main
    today = timezone.localdate().isoformat()
    assert (
        f'<a href="/admin/mailgov/sendlog/?attempted_at__date={today}&amp;status__exact=failed">'
        "1</a>"
    ) in main
    # Charts: SVG with a role and a summary, no script, no inline style.
    assert main.count('role="img"') == 3
    assert 'aria-label="Mailboxes by status: Active: 6, Needs re-consent: 1, ' in main
    assert "Sends over the last 30 days: 5 sent, 1 failed" in main
    assert "<script" not in main and "style=" not in main
    # Every chart's table, with its caption; the daily one in a <details>.
    for caption in ["Mailboxes by status", "Mailboxes by provider", "Sends per day"]:
        assert re.search(rf"<caption>{caption}", main), caption
    assert main.count("<table") == main.count("<caption>")
    assert re.search(r"<details[^>]*>\s*<summary>Table of sends per day", main)
    assert 'href="/static/mailgov/admin.css"' in page
    # A dormant grant's row links to the mailbox.
    d5 = estate["boxes"]["d5"]
    assert f'<a href="/admin/mailgov/mailbox/{d5.pk}/change/">d5@x.test</a>' in main


def test_every_link_lists_what_its_number_counts(estate, auditor_client):
    page = auditor_client.get(URL).content.decode()
    main = page[page.index('id="content-main"') : page.index('id="footer"')]
    links = set(re.findall(r'<a href="(/admin/mailgov/[a-z]+/\?[^"]*)">(\d+)</a>', main))
    targets = {re.match(r"/admin/mailgov/([a-z]+)/", url)[1] for url, _n in links}
    assert targets >= {"mailbox", "outboxmessage", "sendlog", "refreshevent", "pendingrevocation"}
    assert len(links) > 50
    for url, number in sorted(links):
        response = auditor_client.get(unescape(url))
        assert response.status_code == 200, url
        assert response.context["cl"].result_count == int(number), url


def test_index_lists_the_dashboard_in_the_mail_governance_section(estate, auditor_client):
    page = auditor_client.get("/admin/").content.decode()
    assert "Mail governance" in page
    assert f'<a href="{URL}"' in page and "Dashboard" in page
    # The proxy model's rows are mailboxes: no page of its own shows one.
    pk = estate["boxes"]["g1"].pk
    assert auditor_client.get(f"{URL}{pk}/change/").status_code == 404


# -- export -------------------------------------------------------------------------------


def test_csv_export_of_the_tables_is_audited(estate, auditor, auditor_client):
    response = auditor_client.get(EXPORT_URL)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "no-store" in response["Cache-Control"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["table", "key", "row", "column", "value"]
    assert ["Mailboxes by status", "revoked", "Revoked", "Mailboxes", "2"] in rows
    google = [row for row in rows if row[:2] == ["Mailboxes by provider", "google"]]
    assert google[-1][3:] == ["Total", "3"]
    today = timezone.localdate().isoformat()
    assert ["Sends per day, last 30 days", today, today, "Failure rate (%)", "25.0"] in rows
    assert ["Outbox by state", "held", "Held", "Messages", "3"] in rows
    entry = LogEntry.objects.get(actor=auditor, object_repr="export: dashboard")
    assert entry.additional_data["rows"] == len(rows) - 1


def test_export_needs_the_export_permission(estate, client, django_user_model, caplog):
    viewer = staff(django_user_model, "viewer", perms=["mailgov.view_dashboard"])
    client.force_login(viewer)
    assert client.get(URL).status_code == 200
    with caplog.at_level(logging.WARNING, logger="mailgov.security"):
        assert client.get(EXPORT_URL).status_code == 403
    assert LogEntry.objects.filter(
        actor=viewer, object_repr="denied: export the dashboard"
    ).exists()
    assert "export the dashboard" in caplog.text
    # Numbers, but no links to lists this user may not see.
    page = client.get(URL).content.decode()
    assert '<a href="/admin/mailgov/mailbox/?' not in page
    assert '<a href="/admin/mailgov/outboxmessage/?' not in page
    assert "Export as CSV" not in page


# -- permissions ----------------------------------------------------------------------------


def test_without_view_dashboard_403_logged_and_audited(estate, client, django_user_model, caplog):
    # Staff, even with every other view permission of the portal.
    clerk = staff(django_user_model, "clerk", perms=["mailgov.view_mailbox"])
    client.force_login(clerk)
    with caplog.at_level(logging.WARNING, logger="mailgov.security"):
        response = client.get(URL)
    assert response.status_code == 403
    [entry] = LogEntry.objects.filter(actor=clerk, action=LogEntry.Action.ACCESS)
    assert entry.object_repr == "denied: view the dashboard"
    assert entry.additional_data["path"] == URL
    [record] = [r for r in caplog.records if r.name == "mailgov.security"]
    assert "view the dashboard" in record.getMessage()
    assert client.get(EXPORT_URL).status_code == 403
    # Not even listed on the index.
    assert f'href="{URL}"' not in client.get("/admin/").content.decode()


def test_officer_sees_it_with_the_declare_button(estate, client, django_user_model):
    officer = staff(django_user_model, "officer", OFFICERS)
    client.force_login(officer)
    page = client.get(URL).content.decode()
    assert 'href="/admin/mailgov/incident/add/"' in page


def test_auditor_sees_no_declare_button(estate, auditor_client):
    page = auditor_client.get(URL).content.decode()
    assert "/admin/mailgov/incident/add/" not in page
    assert f'href="/admin/mailgov/incident/{estate["frozen"].pk}/change/"' in page


def test_an_empty_estate(auditor_client):
    response = auditor_client.get(URL)
    assert response.status_code == 200
    assert "No open incident." in response.content.decode()
    dashboard = response.context["dashboard"]
    assert dashboard.mailboxes == 0 and dashboard.failure_rate is None


# -- query count --------------------------------------------------------------------------


def populate(owners, start: int, count: int) -> None:
    """``count`` more mailboxes over two providers and every status, each
    with credentials, two send logs and an outbox row, in bulk."""
    now = timezone.now()
    statuses = [s for s in Mailbox.Status.values]
    boxes = Mailbox.objects.bulk_create(
        Mailbox(
            owner=owners[i % len(owners)],
            provider=("google", "demo")[i % 2],
            address=f"m{i}@x.test",
            status=statuses[i % len(statuses)],
            scopes=[GMAIL] if i % 3 else [],
            connected_at=now - timedelta(days=i % 120),
            dormant_warned_at=now - timedelta(days=i % 9) if i % 5 == 0 else None,
            refresh_failing_days=i % 4,
            refresh_failures=i % 3,
        )
        for i in range(start, start + count)
    )
    MailboxCredentials.objects.bulk_create(
        MailboxCredentials(mailbox=box, expires_at=now + timedelta(hours=(i % 50) - 10))
        for i, box in enumerate(boxes)
    )
    SendLog.objects.bulk_create(
        SendLog(
            mailbox=box,
            status=("sent", "failed")[i % 7 == 0],
            attempted_at=now - timedelta(days=i % 35, hours=i % 24),
        )
        for i, box in enumerate(boxes * 2)
    )
    OutboxMessage.objects.bulk_create(
        OutboxMessage(
            mailbox=box,
            state=State.values[i % len(State.values)],
            error_code=("", "frozen", "smtp_550")[i % 3],
            message_id=f"<q{start + i}@x>",
        )
        for i, box in enumerate(boxes)
    )
    RefreshEvent.objects.bulk_create(
        RefreshEvent(mailbox=box, outcome=RefreshEvent.Outcome.values[i % 4])
        for i, box in enumerate(boxes)
    )


def dashboard_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(URL)
    assert response.status_code == 200
    return len(queries)


def test_query_count_is_constant_from_10_to_1000_mailboxes(
    settings, django_user_model, auditor_client
):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid"}}
    owners = [
        django_user_model.objects.create_user(f"owner{i}", f"owner{i}@x.test") for i in range(50)
    ]
    incidents.freeze(incidents.declare(title="t", scope="provider", scope_value="google"))
    populate(owners, 0, 10)
    dashboard_queries(auditor_client)  # warm the content type cache
    small = dashboard_queries(auditor_client)
    populate(owners, 10, 990)
    assert Mailbox.objects.count() == 1000
    large = dashboard_queries(auditor_client)
    assert small == large, (small, large)
    print("QUERIES", large)
    assert large <= 30  # the session, the user, permissions, then the figures
