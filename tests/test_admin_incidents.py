"""Incidents in the admin: declaring, each playbook step through its
confirmation page as a security officer (effects checked in the database and
on the timeline), refusals for auditors (403, audited, logged), the guided
key rotation for superusers only, the owners' notice, and the exports."""

from __future__ import annotations

import csv
import io
import json
import logging

import pytest
from auditlog.models import LogEntry
from django.db.models import TextField
from django.db.models.functions import Cast
from django.test import Client

from mailgov import incidents
from mailgov.crypto import generate_key_entry
from mailgov.governance import run_job
from mailgov.models import (
    AdminJob,
    Incident,
    IncidentEvent,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
)
from mailgov.rotation import key_usage
from tests.conftest import AUDITORS, OFFICERS, staff_user

pytestmark = pytest.mark.django_db

BASE = "/admin/mailgov/incident/"
ADD = f"{BASE}add/"
State = OutboxMessage.State
NEW_KEY = generate_key_entry("new")


def staff(django_user_model, username: str, group: str | None = None, perms=(), **extra):
    return staff_user(username, group, perms, **extra)


@pytest.fixture
def officer(django_user_model):
    return staff(django_user_model, "officer", OFFICERS)


@pytest.fixture
def auditor(django_user_model):
    return staff(django_user_model, "auditor", AUDITORS)


@pytest.fixture
def superuser(django_user_model):
    return staff(django_user_model, "root", is_superuser=True)


@pytest.fixture
def as_user(client):
    def login(user):
        client.force_login(user)
        return client

    return login


@pytest.fixture
def estate(django_user_model):
    """Owners alice (two mailboxes), bob, carol (a revoked one) and dave
    (no email address); queued mail; tokens."""
    alice = django_user_model.objects.create_user(
        "alice", "alice@example.test", "alice-secret-pw", first_name="Alice"
    )
    bob = django_user_model.objects.create_user("bob", "bob@example.test", "pw")
    carol = django_user_model.objects.create_user("carol", "carol@example.test", "pw")
    dave = django_user_model.objects.create_user("dave", "", "pw")
    boxes = {
        "a1": Mailbox.objects.create(owner=alice, provider="demo", address="a1@x.test"),
        "a2": Mailbox.objects.create(owner=alice, provider="google", address="a2@x.test"),
        "b1": Mailbox.objects.create(owner=bob, provider="demo", address="b1@x.test"),
        "c1": Mailbox.objects.create(
            owner=carol, provider="demo", address="c1@x.test", status="revoked"
        ),
        "d1": Mailbox.objects.create(owner=dave, provider="demo", address="d1@x.test"),
    }
    for name in ("a1", "a2", "b1", "d1"):
        MailboxCredentials.objects.create(
            mailbox=boxes[name], access_token=f"at-{name}", refresh_token=f"rt-{name}"
        )
    for name in ("a1", "a1", "b1", "a2"):
        OutboxMessage.objects.create(
            mailbox=boxes[name], state=State.QUEUED, message_id=f"<{name}@x>"
        )
    return {"alice": alice, "bob": bob, "carol": carol, "dave": dave, **boxes}


def steps_of(incident) -> list[str]:
    return list(incident.timeline.order_by("at", "id").values_list("step", flat=True))


def page_of(response) -> str:
    return response.content.decode()


def declare(**kwargs) -> Incident:
    return incidents.declare(title=kwargs.pop("title", "Token leak"), **kwargs)


# -- declare ------------------------------------------------------------------------------


def post_declare(client, **fields):
    data = {"title": "Token leak", "severity": "high", "scope": "all", **fields}
    return client.post(ADD, data)


def test_declare_every_mailbox(estate, officer, as_user):
    client = as_user(officer)
    page = page_of(client.get(ADD))
    assert '<label for="id_title"' in page and "<legend" in page  # labelled, radios grouped
    response = post_declare(client, severity="critical")
    incident = Incident.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"{BASE}{incident.pk}/change/"
    assert (incident.severity, incident.scope, incident.declared_by) == ("critical", "all", officer)
    [event] = incident.timeline.all()
    assert (event.step, event.actor, event.counts) == ("declare", officer, {"mailboxes": 5})
    page = page_of(client.get(response["Location"]))
    assert "declared: 5 mailboxes in its scope" in page


@pytest.mark.parametrize(
    ("fields", "scope", "value", "ids"),
    [
        ({"scope": "provider", "provider": "demo"}, "provider", "demo", []),
        ({"scope": "capability", "capability": "send_mail"}, "capability", "send_mail", []),
        (
            {"scope": "users", "targets": "alice\nBOB@example.test, {carol}"},
            "users",
            "",
            ["alice", "bob", "carol"],
        ),
        (
            {"scope": "mailboxes", "targets": "{a1} ; B1@x.test"},
            "mailboxes",
            "",
            ["a1", "b1"],
        ),
    ],
)
def test_declare_each_scope_kind(estate, officer, as_user, fields, scope, value, ids):
    fields = {
        key: text.replace("{carol}", str(estate["carol"].pk)).replace("{a1}", str(estate["a1"].pk))
        for key, text in fields.items()
    }
    response = post_declare(as_user(officer), **fields)
    assert response.status_code == 302, page_of(response)
    incident = Incident.objects.get()
    assert (incident.scope, incident.scope_value) == (scope, value)
    assert sorted(incident.scope_ids) == sorted(str(estate[name].pk) for name in ids)


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"title": "   "}, "This field is required."),
        ({"scope": "provider"}, "Choose the provider this incident is about."),
        ({"scope": "provider", "provider": "nowhere"}, "Select a valid choice."),
        ({"scope": "capability"}, "Choose the capability this incident is about."),
        ({"scope": "users", "targets": " , "}, "Name at least one user."),
        ({"scope": "users", "targets": "alice nobody 999999"}, "No user is nobody."),
        ({"scope": "users", "targets": "99999999999999999999999"}, "No user is 9999"),
        ({"scope": "mailboxes", "targets": "a1@x.test zz@x.test"}, "No mailbox is zz@x.test."),
        ({"scope": "mailboxes", "targets": "not-a-uuid"}, "No mailbox is not-a-uuid."),
        ({"scope": "everything"}, "Select a valid choice."),
    ],
)
def test_declare_refuses_bad_input_with_clear_errors(estate, officer, as_user, fields, error):
    response = post_declare(as_user(officer), **fields)
    assert response.status_code == 200
    assert error in page_of(response)
    assert 'class="errornote"' in page_of(response)
    assert not Incident.objects.exists()


def test_declare_refuses_an_address_of_several_users(estate, officer, as_user, django_user_model):
    django_user_model.objects.create_user("alice2", "Alice@Example.test", "pw")
    response = post_declare(as_user(officer), scope="users", targets="alice@example.test")
    assert "alice@example.test names 2 users: give their ids or usernames instead." in page_of(
        response
    )
    assert not Incident.objects.exists()


# -- the playbook, as an officer -------------------------------------------------------------


def confirm(client, incident, step, **data):
    """GET the confirmation page, then POST it; return both pages."""
    url = f"{BASE}{incident.pk}/step/{step}/"
    page = client.get(url)
    assert page.status_code == 200
    done = client.post(url, data, follow=True)
    assert done.redirect_chain[-1][0] == f"{BASE}{incident.pk}/change/"
    return page_of(page), page_of(done)


def test_freeze_and_lift_through_their_confirmation_pages(estate, officer, as_user):
    client = as_user(officer)
    incident = declare(scope="provider", scope_value="demo")
    page = page_of(client.get(f"{BASE}{incident.pk}/change/"))
    assert f'href="{BASE}{incident.pk}/step/freeze/"' in page
    confirmation, done = confirm(client, incident, "freeze")
    assert "4 mailboxes (4 owners) stop sending; 3 queued messages will be held." in confirmation
    assert 'name="csrfmiddlewaretoken"' in confirmation
    incident.refresh_from_db()
    assert incident.frozen
    demo = OutboxMessage.objects.filter(mailbox__provider="demo")
    assert set(demo.values_list("state", flat=True)) == {State.HELD}
    assert OutboxMessage.objects.get(mailbox=estate["a2"]).state == State.QUEUED
    assert "Sending frozen: held: 3, mailboxes: 4." in done
    event = incident.timeline.get(step="freeze")
    assert (event.actor, event.counts) == (officer, {"mailboxes": 4, "held": 3})
    assert "Frozen" in done and f"{BASE}{incident.pk}/step/unfreeze/" in done

    confirmation, done = confirm(client, incident, "unfreeze")
    assert "3 messages held by a freeze in this scope can be queued again." in confirmation
    incident.refresh_from_db()
    assert not incident.frozen
    assert set(demo.values_list("state", flat=True)) == {State.QUEUED}
    assert "Freeze lifted: released: 3." in done
    assert steps_of(incident) == ["declare", "freeze", "unfreeze"]


def test_contain_through_its_confirmation_page(estate, officer, as_user):
    client = as_user(officer)
    incident = declare(scope="users", scope_ids=[estate["alice"].pk, estate["carol"].pk])
    confirmation, done = confirm(client, incident, "contain")
    assert "2 mailboxes (2 owners in the scope) will be revoked, 2 access tokens wiped" in (
        confirmation
    )
    for name in ("a1", "a2"):
        estate[name].refresh_from_db()
        assert estate[name].status == Mailbox.Status.REVOKED
        credentials = MailboxCredentials.objects.get(pk=estate[name].pk)
        assert credentials.access_token is None
        # Kept, encrypted, only until the provider confirms the revocation.
        assert credentials.refresh_token == f"rt-{name}"
    assert Mailbox.objects.get(pk=estate["b1"].pk).status == Mailbox.Status.ACTIVE
    assert MailboxCredentials.objects.get(pk=estate["b1"].pk).access_token == "at-b1"
    assert set(
        OutboxMessage.objects.filter(mailbox__owner=estate["alice"]).values_list("state", flat=True)
    ) == {State.HELD}
    assert "Contained: held: 3, mailboxes: 3, revoked: 2, tokens wiped: 2." in done
    # At once (every token unusable), then the rows revoked (here, inline).
    assert steps_of(incident) == ["declare", "contain", "revoke"]
    first, rows = incident.timeline.get(step="contain"), incident.timeline.get(step="revoke")
    assert (first.actor, first.counts) == (officer, {"mailboxes": 3})
    assert (rows.actor, rows.counts) == (officer, {"revoked": 2, "tokens_wiped": 2, "held": 3})


def test_resolve_needs_a_summary_and_lifts_the_freeze(estate, officer, as_user):
    client = as_user(officer)
    incident = declare(scope="provider", scope_value="demo")
    incidents.freeze(incident, actor=officer)
    url = f"{BASE}{incident.pk}/step/resolve/"
    page = page_of(client.get(url))
    assert "The freeze will be lifted." in page and '<textarea name="summary"' in page
    response = client.post(url, {"summary": "  "})
    assert response.status_code == 200 and "This field is required." in page_of(response)
    incident.refresh_from_db()
    assert incident.state == Incident.State.OPEN
    _page, done = confirm(client, incident, "resolve", summary="Key rotated, all clear.")
    incident.refresh_from_db()
    assert (incident.state, incident.summary, incident.frozen) == (
        "resolved",
        "Key rotated, all clear.",
        False,
    )
    assert "Resolved: released: 3." in done
    assert incident.timeline.get(step="resolve").note == "Key rotated, all clear."
    assert set(OutboxMessage.objects.values_list("state", flat=True)) == {State.QUEUED}


def test_a_resolved_incident_refuses_its_steps_but_exports(estate, officer, superuser, as_user):
    incident = declare()
    incidents.resolve(incident, summary="done")
    before = steps_of(incident)
    client = as_user(officer)
    for path in ["step/freeze/", "step/unfreeze/", "step/contain/", "step/resolve/", "notify/"]:
        for method in (client.get, client.post):
            response = method(f"{BASE}{incident.pk}/{path}", {"summary": "x"}, follow=True)
            assert response.redirect_chain[-1][0] == f"{BASE}{incident.pk}/change/", path
            assert f"Incident #{incident.pk} is resolved: its playbook steps are closed" in (
                page_of(response)
            )
    root = as_user(superuser)
    response = root.post(f"{BASE}{incident.pk}/rotate/", follow=True)
    assert "is resolved" in page_of(response)
    assert not AdminJob.objects.exists()
    assert not Incident.objects.get(pk=incident.pk).frozen
    assert not Mailbox.objects.filter(status="revoked").exclude(pk=estate["c1"].pk).exists()
    assert not OutboxMessage.objects.filter(kind="notification").exists()
    assert steps_of(incident) == before
    for export in ["owners.csv", "timeline.json", "timeline.csv"]:
        assert as_user(officer).get(f"{BASE}{incident.pk}/{export}").status_code == 200
    page = page_of(as_user(officer).get(f"{BASE}{incident.pk}/change/"))
    assert "/step/freeze/" not in page and "is resolved: its playbook steps are closed" in page


# -- notify -----------------------------------------------------------------------------------


def test_notify_with_an_edited_template_queues_one_notice_per_owner(estate, officer, as_user):
    client = as_user(officer)
    incident = declare(scope="provider", scope_value="demo")
    url = f"{BASE}{incident.pk}/notify/"
    page = page_of(client.get(url))
    # Pre-filled with the incident's template, previewed for the first owner.
    assert "Security notice about your connected mailbox" in page
    assert "As alice (alice@example.test) would get it:" in page
    assert "Hello Alice," in page and "a1@x.test" in page
    subject = "Incident {{ incident.title }} for {{ owner.username }}"
    body = "Dear {{ owner.name }}: {{ mailboxes|join:', ' }}. <b>{{ owner.password }}</b>!"
    preview = page_of(client.post(url, {"subject": subject, "body": body, "_preview": "1"}))
    assert "Incident Token leak for alice" in preview
    # Escaped in the page (a rendered template is "safe" to Django: not
    # here); the password hash is no variable of the template.
    assert "Dear Alice: a1@x.test. &lt;b&gt;&lt;/b&gt;!" in preview
    assert not OutboxMessage.objects.filter(kind="notification").exists()
    done = client.post(url, {"subject": subject, "body": body, "_send": "1"}, follow=True)
    assert "Owners notified: owners: 4, queued: 3, skipped: 1." in page_of(done)  # dave: no email
    notices = OutboxMessage.objects.filter(kind=OutboxMessage.Kind.NOTIFICATION)
    assert sorted(n.recipient_user.username for n in notices) == ["alice", "bob", "carol"]
    alice = json.loads(notices.get(recipient_user=estate["alice"]).payload)
    assert alice["subject"] == "Incident Token leak for alice"
    assert alice["body"] == "Dear Alice: a1@x.test. <b></b>!"
    assert estate["alice"].password not in json.dumps(alice)
    incident.refresh_from_db()
    assert (incident.notice_subject, incident.notice_body) == (subject, body)
    event = incident.timeline.get(step="notify")
    assert (event.actor, event.counts) == (officer, {"owners": 4, "queued": 3, "skipped": 1})


def test_notify_refuses_an_invalid_template(estate, officer, as_user):
    client = as_user(officer)
    incident = declare()
    url = f"{BASE}{incident.pk}/notify/"
    for body in ["{% if %}broken", "{% load i18n %}{{ x }}", "{{ owner.name|nosuchfilter }}"]:
        response = client.post(url, {"subject": "Notice", "body": body, "_send": "1"})
        assert response.status_code == 200
        assert "The notice text is not a valid template" in page_of(response), body
    # Compiles, but fails when rendered (join's argument is no string).
    body = "{{ mailboxes|join:owner }}"
    response = client.post(url, {"subject": "Notice", "body": body, "_send": "1"})
    assert "The notice cannot be rendered: AttributeError" in page_of(response)
    assert not OutboxMessage.objects.filter(kind="notification").exists()
    incident.refresh_from_db()
    assert incident.notice_subject == "Security notice about your connected mailbox"
    assert "notify" not in steps_of(incident)


# -- exports --------------------------------------------------------------------------------


def test_owners_export_is_on_the_timeline_and_audited(estate, auditor, as_user):
    incident = declare(scope="provider", scope_value="demo")
    response = as_user(auditor).get(f"{BASE}{incident.pk}/owners.csv")
    assert response.status_code == 200
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["user_id", "username", "email", "mailboxes", "statuses"]
    assert [row[1] for row in rows[1:]] == ["alice", "bob", "carol", "dave"]
    assert rows[1][3] == "a1@x.test"
    event = incident.timeline.get(step="export")
    assert (event.actor, event.counts) == (auditor, {"owners": 4})
    assert LogEntry.objects.filter(
        actor=auditor, object_repr=f"export: affected owners of incident #{incident.pk}"
    ).exists()


def test_timeline_exports_as_json_and_csv(estate, officer, auditor, as_user):
    incident = declare(actor=officer)
    incidents.freeze(incident, actor=officer)
    incidents.resolve(incident, summary="All clear, see ticket SEC-12.", actor=officer)
    client = as_user(auditor)
    response = client.get(f"{BASE}{incident.pk}/timeline.json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert "attachment" in response["Content-Disposition"]
    data = json.loads(response.content)
    assert data["incident"]["id"] == incident.pk
    assert data["incident"]["summary"] == "All clear, see ticket SEC-12."
    assert [row["step"] for row in data["timeline"]] == ["declare", "freeze", "resolve"]
    assert {row["actor"] for row in data["timeline"]} == {"officer"}
    response = client.get(f"{BASE}{incident.pk}/timeline.csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["at", "step", "actor", "counts", "note", "cid"]
    assert [row[1] for row in rows[1:]] == ["declare", "freeze", "resolve"]
    assert json.loads(rows[2][3]) == {"mailboxes": 5, "held": 4}


def test_exports_need_the_export_permission(estate, client, django_user_model, caplog):
    viewer = staff(django_user_model, "viewer", perms=["mailgov.view_incident"])
    incident = declare()
    client.force_login(viewer)
    assert client.get(f"{BASE}{incident.pk}/change/").status_code == 200
    for export in ["owners.csv", "timeline.json", "timeline.csv"]:
        with caplog.at_level(logging.WARNING, logger="mailgov.security"):
            assert client.get(f"{BASE}{incident.pk}/{export}").status_code == 403
    assert LogEntry.objects.filter(actor=viewer, action=LogEntry.Action.ACCESS).count() == 3
    assert "export" not in steps_of(incident)


# -- refusals ---------------------------------------------------------------------------------

STEP_PATHS = [
    "step/freeze/",
    "step/unfreeze/",
    "step/contain/",
    "step/resolve/",
    "notify/",
    "rotate/",
    "rotate/retire/",
]


@pytest.mark.parametrize("path", STEP_PATHS)
@pytest.mark.parametrize("method", ["get", "post"])
def test_auditor_gets_403_for_each_step_logged_and_audited(
    estate, auditor, as_user, caplog, path, method
):
    incident = declare(scope="provider", scope_value="demo")
    incidents.freeze(incident)
    before = steps_of(incident)
    client = as_user(auditor)
    data = {"summary": "x", "subject": "s", "body": "b", "_send": "1"}
    with caplog.at_level(logging.WARNING, logger="mailgov.security"):
        response = getattr(client, method)(f"{BASE}{incident.pk}/{path}", data)
    assert response.status_code == 403
    [entry] = LogEntry.objects.filter(actor=auditor, action=LogEntry.Action.ACCESS)
    assert entry.object_repr.startswith("denied: ")
    assert entry.object_pk == str(incident.pk)
    assert any(
        r.name == "mailgov.security" and r.getMessage().startswith("denied:")
        for r in caplog.records
    )
    # Nothing changed.
    incident.refresh_from_db()
    assert incident.frozen and incident.state == "open" and incident.contained_at is None
    assert steps_of(incident) == before
    assert not AdminJob.objects.exists()
    assert not OutboxMessage.objects.filter(kind="notification").exists()


def test_auditor_looks_but_has_no_step_buttons(estate, auditor, as_user):
    incident = declare()
    client = as_user(auditor)
    assert client.get(BASE).status_code == 200
    page = page_of(client.get(f"{BASE}{incident.pk}/change/"))
    assert "/step/" not in page and "/notify/" not in page and "/rotate/" not in page
    assert f"{BASE}{incident.pk}/owners.csv" in page
    assert f"{BASE}{incident.pk}/timeline.json" in page
    assert "/admin/mailgov/incident/add/" not in page_of(client.get(BASE))
    for method in (client.get, client.post):
        assert method(ADD, {"title": "x", "severity": "high", "scope": "all"}).status_code == 403
    assert Incident.objects.count() == 1
    assert (
        LogEntry.objects.filter(actor=auditor, object_repr="denied: declare an incident").count()
        == 2
    )
    # No edit, no delete: an incident changes through its steps only.
    assert client.post(f"{BASE}{incident.pk}/delete/").status_code == 403
    assert Incident.objects.filter(pk=incident.pk).exists()


def test_changelist_filters_and_csv(estate, officer, as_user):
    frozen = declare(title="Frozen one")
    incidents.freeze(frozen)
    resolved = declare(title="Done one")
    incidents.resolve(resolved, summary="ok")
    client = as_user(officer)
    page = page_of(client.get(BASE))
    assert "Declare an incident" in page and "Frozen one" in page and "Done one" in page
    assert client.get(f"{BASE}?frozen=yes").context["cl"].result_count == 1
    assert client.get(f"{BASE}?state__exact=resolved").context["cl"].result_count == 1
    response = client.get(f"{BASE}export.csv?frozen=no")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [row[1] for row in rows[1:]] == ["Done one"]


# -- key rotation, guided ---------------------------------------------------------------------


def test_rotation_is_for_superusers_only(estate, officer, as_user):
    incident = declare()
    client = as_user(officer)
    for method in (client.get, client.post):
        assert method(f"{BASE}{incident.pk}/rotate/").status_code == 403
    assert not AdminJob.objects.exists()
    assert (
        LogEntry.objects.filter(
            actor=officer, object_repr__startswith="denied: rotate the encryption key"
        ).count()
        == 2
    )
    page = page_of(client.get(f"{BASE}{incident.pk}/change/"))
    assert "/rotate/" not in page and "/step/contain/" in page


def test_guided_rotation_add_rotate_retire(estate, superuser, as_user, settings):
    # Everything so far is under the test key ("test1"): the old key.
    old = list(settings.MAILGOV_ENCRYPTION_KEYS)
    incident = declare()
    client = as_user(superuser)
    secrets = [entry.split(":", 1)[1] for entry in (*old, NEW_KEY)]

    # Step 1, before a new key: nothing to rotate, how to add one.
    page = page_of(client.get(f"{BASE}{incident.pk}/rotate/"))
    assert "mailgov_generate_key" in page and "Nothing to rotate" in page
    assert "Rotate now" not in page

    settings.MAILGOV_ENCRYPTION_KEYS = [NEW_KEY, *old]
    page = page_of(client.get(f"{BASE}{incident.pk}/rotate/"))
    assert '<th scope="row">new</th><td>Primary: encrypts new values</td>' in page
    assert '<th scope="row">test1</th><td>Decrypt only</td><td class="mg-num">8</td>' in page
    assert "4 rows hold a value under another key" in page and "Rotate now" in page
    # Step 2: rotate now: a job, and its progress (refreshed while it runs).
    response = client.post(f"{BASE}{incident.pk}/rotate/")
    job = AdminJob.objects.get(action="rotate_keys")
    assert (job.target_ids, job.requested_by, job.total) == ([str(incident.pk)], superuser, 4)
    progress_url = f"{BASE}{incident.pk}/rotate/{job.pk}/"
    assert response["Location"] == progress_url
    page = page_of(client.get(progress_url))
    assert '<meta http-equiv="refresh" content="2">' in page
    assert '<progress id="mg-progress" class="mg-progress" max="4" value="0">' in page
    assert "Waiting for a worker" in page
    run_job(job.pk)  # what the worker does
    job.refresh_from_db()
    assert job.state == AdminJob.State.DONE and job.done == job.total == 4
    page = page_of(client.get(progress_url))
    assert 'http-equiv="refresh"' not in page and "Step 3: retire the old key" in page
    assert key_usage() == {"new": 8}
    # Step 3: safe to remove the old key.
    page = page_of(client.get(f"{BASE}{incident.pk}/rotate/retire/"))
    assert "Safe" in page and "<li>test1</li>" in page
    client.post(f"{BASE}{incident.pk}/rotate/retire/")
    for text in [page, page_of(client.get(f"{BASE}{incident.pk}/change/"))]:
        assert all(secret not in text for secret in secrets)
    assert steps_of(incident) == ["declare", "note", "rotate", "note"]
    rotate = incident.timeline.get(step="rotate")
    assert rotate.actor == superuser and rotate.counts["rotated_values"] == 8
    note = incident.timeline.filter(step="note").last().note
    assert note == "Keyring checked: new (primary): 8 values, test1: 0 values."
    # Everything decrypts with the new key alone.
    settings.MAILGOV_ENCRYPTION_KEYS = [NEW_KEY]
    assert MailboxCredentials.objects.get(pk=estate["a1"].pk).refresh_token == "rt-a1"


def test_retire_page_says_when_the_old_key_is_still_needed(estate, superuser, as_user, settings):
    old = list(settings.MAILGOV_ENCRYPTION_KEYS)
    incident = declare()
    settings.MAILGOV_ENCRYPTION_KEYS = [NEW_KEY, *old]
    page = page_of(as_user(superuser).get(f"{BASE}{incident.pk}/rotate/retire/"))
    assert "Not safe yet" in page and "8 values are still under key test1." in page
    # Values under a key the keyring lacks are flagged.
    settings.MAILGOV_ENCRYPTION_KEYS = [NEW_KEY]
    page = page_of(as_user(superuser).get(f"{BASE}{incident.pk}/rotate/retire/"))
    assert "Not in the keyring: these values cannot be decrypted" in page


def test_no_token_on_any_incident_page(estate, officer, superuser, as_user):
    incident = declare(scope="provider", scope_value="demo")
    incidents.freeze(incident, actor=officer)
    tokens = [
        value
        for credentials in MailboxCredentials.objects.all()
        for value in (credentials.access_token, credentials.refresh_token)
        if value
    ]
    ciphertexts = list(
        MailboxCredentials.objects.exclude(refresh_token=None)
        .annotate(raw=Cast("refresh_token", TextField()))
        .values_list("raw", flat=True)
    )
    assert all(value.startswith("mg1$") for value in ciphertexts)
    client = as_user(superuser)
    pages = [
        client.get(f"{BASE}{incident.pk}/{path}")
        for path in ["change/", "step/contain/", "notify/", "rotate/", "rotate/retire/"]
    ]
    pages += [client.get(BASE), client.get(f"{BASE}{incident.pk}/owners.csv")]
    for response in pages:
        assert response.status_code == 200
        text = (
            b"".join(response.streaming_content) if response.streaming else response.content
        ).decode()
        assert all(token not in text for token in tokens)
        assert all(sealed not in text for sealed in ciphertexts)
    assert IncidentEvent.objects.filter(incident=incident).exists()


def test_steps_need_the_csrf_token(estate, officer):
    client = Client(enforce_csrf_checks=True)
    client.force_login(officer)
    incident = declare()
    assert client.get(f"{BASE}{incident.pk}/step/freeze/").status_code == 200
    assert client.post(f"{BASE}{incident.pk}/step/freeze/").status_code == 403
    incident.refresh_from_db()
    assert not incident.frozen and steps_of(incident) == ["declare"]


def test_a_large_scope_is_left_to_a_worker(estate, officer, as_user, settings):
    settings.MAILGOV_ADMIN_INLINE_ROWS = 1
    client = as_user(officer)
    incident = declare(scope="provider", scope_value="demo")
    _page, done = confirm(client, incident, "contain")
    job = AdminJob.objects.get(action="contain")
    # The rows still to revoke (one of the four was revoked before).
    assert job.state == AdminJob.State.PENDING and job.total == 3
    assert "Contained: mailboxes: 4." in done
    assert "Contained: 3 rows are handled by a worker." in done
    assert f'<a href="/admin/mailgov/adminjob/{job.pk}/change/">Follow the job.</a>' in done
    # Every token unusable at once; the rows revoked by the worker.
    assert Mailbox.objects.get(pk=estate["a1"].pk).status == "active"
    run_job(job.pk)
    assert Mailbox.objects.get(pk=estate["a1"].pk).status == "revoked"
    done = client.post(
        f"{BASE}{incident.pk}/notify/",
        {"subject": "Notice", "body": "Hello {{ owner.name }}", "_send": "1"},
        follow=True,
    )
    job = AdminJob.objects.get(action="notify")
    assert "Owners notified: 4 rows are handled by a worker." in page_of(done)
    assert not OutboxMessage.objects.filter(kind="notification").exists()
    run_job(job.pk)
    assert OutboxMessage.objects.filter(kind="notification").count() == 3
    assert steps_of(incident)[-1] == "notify"


def test_notices_are_plain_text_not_html_escaped(estate, officer, as_user):
    estate["bob"].first_name, estate["bob"].last_name = "Bob", "O'Brien & Co"
    estate["bob"].save()
    incident = declare(title="Leak <at> the IdP", scope="users", scope_ids=[estate["bob"].pk])
    client = as_user(officer)
    data = {"subject": "{{ incident.title }}", "body": "Dear {{ owner.name }},", "_send": "1"}
    client.post(f"{BASE}{incident.pk}/notify/", data)
    notice = json.loads(OutboxMessage.objects.get(kind="notification").payload)
    assert (notice["subject"], notice["body"]) == ("Leak <at> the IdP", "Dear Bob O'Brien & Co,")


def test_notify_job_counts_owners_not_mailboxes(estate, officer, as_user):
    incident = declare()  # alice has two mailboxes in it
    data = {"subject": "Notice", "body": "Hello", "_send": "1"}
    as_user(officer).post(f"{BASE}{incident.pk}/notify/", data)
    job = AdminJob.objects.get(action="notify")
    assert (job.total, job.done, job.counts["owners"]) == (4, 4, 4)
