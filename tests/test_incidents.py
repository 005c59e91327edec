"""Incident playbooks, the freeze kill switch, deletion that revokes first, and
governance jobs: in this process, against the real demo authorization server
and the aiosmtpd SMTP server. (Other processes and real workers: test_workers.py.)"""

from __future__ import annotations

import json
import logging

import pytest
from auditlog.models import LogEntry
from django.core.mail import EmailMessage, get_connection
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailgov import freeze as kill_switch
from mailgov import governance, incidents, outbox
from mailgov.audit import acting_as
from mailgov.delivery import deliver
from mailgov.exceptions import (
    IncidentStateError,
    MailboxContainedError,
    MailboxUnavailableError,
    SendingFrozenError,
    TokenRefreshError,
)
from mailgov.models import (
    AdminJob,
    Incident,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
)
from mailgov.revocation import retry_revocations, revoke_deleted
from mailgov.signals import pre_send
from mailgov.tokens import get_access_token
from tests.conftest import assert_refresh_token_revoked, refresh_token_state

pytestmark = pytest.mark.django_db

State = OutboxMessage.State
SMTP = "mailgov.backends.smtp.EmailBackend"
QUEUED = "mailgov.backends.queued.EmailBackend"


@pytest.fixture
def boxes(connect):
    return {name: connect(name) for name in ("alice", "bob")}


@pytest.fixture
def officer(django_user_model):
    return django_user_model.objects.create_user("officer", "officer@example.test", "x")


def send(sender: str, subject: str = "Hello") -> int:
    return get_connection(SMTP).send_messages(
        [EmailMessage(subject, "Body.", sender, ["carol@example.test"])]
    )


def enqueue(sender: str, count: int = 1) -> list:
    messages = [
        EmailMessage(f"Queued {i}", "Body.", sender, ["carol@example.test"]) for i in range(count)
    ]
    get_connection(QUEUED).send_messages(messages)
    return [message.outbox_id for message in messages]


def refresh_token_of(mailbox) -> str:
    return MailboxCredentials.objects.get(pk=mailbox.pk).refresh_token


# -- declare and scope ------------------------------------------------------------------


def test_declare_checks_its_scope(boxes, officer):
    with pytest.raises(IncidentStateError, match="title"):
        incidents.declare(title="  ", actor=officer)
    with pytest.raises(IncidentStateError, match="provider"):
        incidents.declare(title="x", scope="provider", actor=officer)
    with pytest.raises(IncidentStateError, match="capability"):
        incidents.declare(title="x", scope="capability", scope_value="read_mail")
    with pytest.raises(IncidentStateError, match="at least one"):
        incidents.declare(title="x", scope="users", scope_ids=[])
    with pytest.raises(IncidentStateError, match="severity"):
        incidents.declare(title="x", severity="apocalyptic")
    assert Incident.objects.count() == 0
    incident = incidents.declare(title="Leaked backup", severity="critical", actor=officer)
    [event] = incident.timeline.all()
    assert (event.step, event.actor, event.actor_label) == ("declare", officer, "officer")
    assert event.counts == {"mailboxes": 2}
    assert "{{ mailboxes" in incident.notice_body  # the default template, editable


@pytest.mark.parametrize(
    ("scope", "value", "ids", "expected"),
    [
        ("all", "", None, {"alice", "bob"}),
        ("provider", "demo", None, {"alice", "bob"}),
        ("provider", "google", None, set()),
        ("capability", "send_mail", None, {"alice", "bob"}),
        ("users", "", "alice", {"alice"}),
        ("mailboxes", "", "bob", {"bob"}),
    ],
)
def test_each_scope_kind_selects_the_same_in_sql_and_in_python(boxes, scope, value, ids, expected):
    scope_ids = []
    if ids:
        box = boxes[ids]
        scope_ids = [box.owner_id] if scope == "users" else [box.pk]
    incident = incidents.declare(title="t", scope=scope, scope_value=value, scope_ids=scope_ids)
    in_sql = {m.owner.username for m in incidents.scope_queryset(incident)}
    in_python = {name for name, box in boxes.items() if incident.covers(box)}
    assert in_sql == in_python == expected


def test_capability_scope_leaves_out_a_mailbox_without_the_send_scope(boxes):
    bob = boxes["bob"]
    Mailbox.objects.filter(pk=bob.pk).update(scopes=["openid", "email"])
    bob.refresh_from_db()
    incident = incidents.declare(title="t", scope="capability", scope_value="send_mail")
    assert list(incidents.scope_queryset(incident)) == [boxes["alice"]]
    assert not incident.covers(bob)


# -- freeze -----------------------------------------------------------------------------


def test_freeze_refuses_direct_sends_holds_queued_mail_and_lifting_it_delivers(
    boxes, smtp, officer
):
    queued_before = enqueue("alice@example.test", 2)
    incident = incidents.declare(
        title="t", scope="users", scope_ids=[boxes["alice"].owner_id], actor=officer
    )
    counts = incidents.freeze(incident, actor=officer)
    assert counts == {"mailboxes": 1, "held": 2}
    assert incidents.freeze(incident, actor=officer) == {"already": 1}
    # The SMTP backend refuses before any network I/O; bob is out of scope.
    with pytest.raises(SendingFrozenError, match=f"incident #{incident.pk}"):
        send("alice@example.test")
    assert send("bob@example.test") == 1
    # Mail queued after the freeze is held by the claim, not sent.
    queued_after = enqueue("alice@example.test", 1)
    deliver(mailbox_id=str(boxes["alice"].pk))
    rows = OutboxMessage.objects.filter(pk__in=queued_before + queued_after)
    assert {(r.state, r.error_code) for r in rows} == {(State.HELD, "frozen")}
    assert [m.parse()["From"] for m in smtp.messages] == ["bob@example.test"]
    # Lifting it: every held message is queued again and goes, once each.
    assert incidents.unfreeze(incident, actor=officer) == {"released": 3}
    deliver(mailbox_id=str(boxes["alice"].pk))
    assert set(rows.values_list("state", flat=True)) == {State.SENT}
    assert len(smtp.messages) == 4
    assert send("alice@example.test") == 1
    steps = list(incident.timeline.values_list("step", flat=True))
    assert steps == ["declare", "freeze", "unfreeze"]


def test_a_freeze_committed_during_a_batch_stops_it_before_the_next_message(boxes, smtp):
    incident = incidents.declare(title="t", scope="provider", scope_value="demo")
    calls = []

    def freeze_after_first(sender, message_id, **kwargs):
        calls.append(message_id)
        if len(calls) == 1:
            incidents.freeze(incident)  # as another process would, committed

    pre_send.connect(freeze_after_first, dispatch_uid="test.freeze_after_first")
    try:
        ids = enqueue("alice@example.test", 3)
        deliver(mailbox_id=str(boxes["alice"].pk))
    finally:
        pre_send.disconnect(dispatch_uid="test.freeze_after_first")
    assert len(smtp.messages) == 1  # the first had started; the others never went
    states = sorted(OutboxMessage.objects.filter(pk__in=ids).values_list("state", flat=True))
    assert states == [State.HELD, State.HELD, State.SENT]


def test_a_second_freeze_keeps_mail_held_when_the_first_is_lifted(boxes, smtp):
    everything = incidents.declare(title="a")
    demo_only = incidents.declare(title="b", scope="provider", scope_value="demo")
    incidents.freeze(everything)
    incidents.freeze(demo_only)
    [row] = enqueue("alice@example.test")
    deliver(mailbox_id=str(boxes["alice"].pk))
    assert incidents.unfreeze(everything) == {"released": 0}
    assert OutboxMessage.objects.get(pk=row).state == State.HELD
    assert incidents.resolve(demo_only, summary="fixed") == {"released": 1}
    deliver(mailbox_id=str(boxes["alice"].pk))
    assert OutboxMessage.objects.get(pk=row).state == State.SENT


def test_the_send_gate_costs_one_query_while_nothing_is_frozen(boxes):
    with CaptureQueriesContext(connection) as queries:
        kill_switch.send_gate(boxes["alice"])
    assert len(queries) == 1
    Mailbox.objects.filter(pk=boxes["alice"].pk).update(status="suspended")
    with pytest.raises(MailboxUnavailableError, match="suspended"):
        kill_switch.send_gate(boxes["alice"])


# -- contain ----------------------------------------------------------------------------


def test_contain_makes_every_token_in_scope_unusable_at_once_then_revokes_them(
    boxes, authserver, smtp, officer, monkeypatch, django_capture_on_commit_callbacks
):
    alice, bob = boxes["alice"], boxes["bob"]
    tokens = {name: refresh_token_of(box) for name, box in boxes.items()}
    [held] = enqueue("alice@example.test")
    incident = incidents.declare(title="t", scope="users", scope_ids=[alice.owner_id])
    # At once: one write, whatever the scope's size.
    with CaptureQueriesContext(connection) as queries:
        assert incidents.contain(incident, actor=officer, finish=False) == {"mailboxes": 1}
    writes = [q for q in queries.captured_queries if q["sql"].startswith(("UPDATE", "INSERT"))]
    assert len(writes) == 3  # the switch, its audit entry, its timeline entry
    # From here on no process hands out, refreshes or sends with alice's tokens,
    # though her row is not revoked yet.
    assert Mailbox.objects.get(pk=alice.pk).status == Mailbox.Status.ACTIVE
    with pytest.raises(MailboxContainedError, match=f"incident #{incident.pk}"):
        get_access_token(alice)
    with pytest.raises(MailboxContainedError):
        get_access_token(alice, force_refresh=True)
    with pytest.raises(MailboxContainedError):
        send("alice@example.test")
    deliver(mailbox_id=str(alice.pk))
    row = OutboxMessage.objects.get(pk=held)
    assert (row.state, row.error_code) == (State.HELD, "contained")
    outbox.release_auto_held()  # not released while the containment is on
    assert OutboxMessage.objects.get(pk=held).state == State.HELD
    assert smtp.messages == []
    assert send("bob@example.test") == 1  # out of scope
    # Then the rows, set-based; revocations published on commit.
    published = []
    monkeypatch.setattr("mailgov.revocation.queue_revocations", published.extend)
    with (
        django_capture_on_commit_callbacks(execute=True),
        CaptureQueriesContext(connection) as queries,
    ):
        counts = incidents.finish_containment(incident, actor=officer)
    # The message the claim held meanwhile now waits as any revoked mailbox's.
    assert counts == {"revoked": 1, "tokens_wiped": 1, "held": 1}
    assert OutboxMessage.objects.get(pk=held).error_code == "mailbox_revoked"
    updates = [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(updates) <= 5  # a few statements per chunk, not one per mailbox
    alice.refresh_from_db()
    assert alice.status == Mailbox.Status.REVOKED
    assert alice.revocation_reason == f"incident #{incident.pk}: contained"
    assert MailboxCredentials.objects.get(pk=alice.pk).access_token is None
    assert Incident.objects.get(pk=incident.pk).containment_done_at is not None
    bob.refresh_from_db()
    assert bob.status == Mailbox.Status.ACTIVE
    # The provider revocation: queued on commit, done by the task (run here).
    assert published == [alice.pk]
    assert refresh_token_state(authserver, tokens["alice"]) == "live"
    assert retry_revocations(due_only=True)["revoked"] == 1
    assert_refresh_token_revoked(authserver, tokens["alice"])
    assert refresh_token_state(authserver, tokens["bob"]) == "live"
    # One summarised audit entry names the contained mailboxes, with the actor.
    entry = LogEntry.objects.get(object_repr__endswith="contained")
    assert entry.actor == officer
    assert entry.additional_data["ids"] == [str(alice.pk)]
    steps = list(incident.timeline.values_list("step", flat=True))
    assert steps == ["declare", "contain", "revoke"]
    assert incidents.contain(incident) == {"already": 1, "revoked": 0, "tokens_wiped": 0, "held": 0}


def test_contain_covers_only_grants_older_than_itself(boxes, connect):
    incident = incidents.declare(title="t", scope="provider", scope_value="demo")
    incidents.contain(incident, finish=False)
    assert incidents.contain(incident, finish=False) == {"already": 1}
    fresh = connect("alice")  # reconnected after the containment: a new grant
    assert get_access_token(fresh)
    with pytest.raises(MailboxContainedError):
        get_access_token(boxes["bob"])
    assert incidents.finish_containment(incident)["revoked"] == 1
    assert Mailbox.objects.get(pk=fresh.pk).status == Mailbox.Status.ACTIVE


def test_a_containment_cut_short_stays_on_until_a_run_completes(boxes, monkeypatch):
    incident = incidents.declare(title="t")
    incidents.contain(incident, finish=False)
    monkeypatch.setattr("mailgov.revocation.queue_revocations", lambda ids: 0)

    def die(rows):
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError):
        incidents.finish_containment(incident, progress=die)
    assert Mailbox.objects.filter(status="revoked").count() == 0  # rolled back
    with pytest.raises(MailboxContainedError):  # and still covered
        get_access_token(boxes["alice"])
    assert incidents.finish_containment(incident)["revoked"] == 2
    assert Incident.objects.get(pk=incident.pk).containment_done_at is not None


def test_contained_mail_goes_out_after_the_owner_reconnects(boxes, connect, smtp):
    [held] = enqueue("alice@example.test")
    incident = incidents.declare(title="t", scope="mailboxes", scope_ids=[boxes["alice"].pk])
    incidents.contain(incident)
    connect("alice")  # a new consent
    outbox.dispatch(publish_fn=lambda ids, **kw: len(ids))
    deliver(mailbox_id=str(boxes["alice"].pk))
    assert OutboxMessage.objects.get(pk=held).state == State.SENT


# -- notify, resolve --------------------------------------------------------------------


def test_notify_tells_each_owner_once_with_the_edited_template(boxes, officer):
    boxes["bob"].owner.__class__.objects.filter(pk=boxes["bob"].owner_id).update(
        first_name="Bob", email="bob@example.test"
    )
    incident = incidents.declare(title="Token leak")
    with pytest.raises(IncidentStateError, match="not a valid template"):
        incidents.notify(incident, body="{% if %}")
    body = "Hi {{ owner.name }} [{{ owner.password }}{{ owner.pk }}]: {{ mailboxes|join:',' }}"
    subject = "About {{ incident.title }}"
    counts = incidents.notify(incident, actor=officer, subject=subject, body=body)
    assert counts == {"owners": 2, "queued": 2, "skipped": 0}
    assert incidents.notify(incident)["queued"] == 0  # at most once per owner
    rows = OutboxMessage.objects.filter(kind=OutboxMessage.Kind.NOTIFICATION)
    payloads = sorted(json.loads(row.payload)["body"] for row in rows)
    # Plain values only: no password hash, no primary key.
    assert payloads == ["Hi Bob []: bob@example.test", "Hi alice []: alice@example.test"]
    assert {json.loads(r.payload)["subject"] for r in rows} == {"About Token leak"}


def test_resolve_needs_a_summary_and_closes_every_step(boxes, officer):
    incident = incidents.declare(title="t")
    incidents.freeze(incident)
    with pytest.raises(IncidentStateError, match="summary"):
        incidents.resolve(incident, summary=" ")
    assert incidents.resolve(incident, summary="False alarm.", actor=officer) == {"released": 0}
    assert not incident.frozen and incident.state == "resolved"
    for step in (incidents.freeze, incidents.contain, incidents.notify):
        with pytest.raises(IncidentStateError, match="resolved"):
            step(incident)
    data = json.loads(incidents.timeline_json(incident))
    assert [row["step"] for row in data["timeline"]] == ["declare", "freeze", "resolve"]
    assert data["incident"]["summary"] == "False alarm."
    csv_text = incidents.timeline_csv(incident)
    assert csv_text.splitlines()[0] == "at,step,actor,counts,note,cid"
    assert "False alarm." in csv_text


def test_owner_export_escapes_spreadsheet_formulas(boxes):
    boxes["alice"].owner.__class__.objects.filter(pk=boxes["alice"].owner_id).update(
        email="=HYPERLINK(1)@example.test"
    )
    incident = incidents.declare(title="t")
    text = "".join(incidents.owners_csv(incident))
    assert "'=HYPERLINK(1)@example.test" in text
    assert ",=HYPERLINK" not in text


# -- deletion revokes first -------------------------------------------------------------


def test_deleting_a_mailbox_revokes_its_grant_at_the_provider_first(boxes, authserver):
    alice = boxes["alice"]
    token, pk = refresh_token_of(alice), alice.pk
    alice.delete()
    [pending] = PendingRevocation.objects.all()
    assert pending.mailbox_id == pk and pending.refresh_token == token
    assert refresh_token_state(authserver, token) == "live"
    with authserver.faults(revoke=503):
        assert revoke_deleted(pending.pk) == "pending"
    assert PendingRevocation.objects.get().attempts == 1  # kept for the retry
    assert revoke_deleted(pending.pk) == "revoked"
    assert_refresh_token_revoked(authserver, token)
    assert not PendingRevocation.objects.exists()


def test_deleting_a_user_revokes_each_of_their_grants(boxes, authserver, connect):
    alice = boxes["alice"]
    token = refresh_token_of(alice)
    alice.owner.delete()  # the ORM cascade
    assert not Mailbox.objects.filter(pk=alice.pk).exists()
    retry_revocations(due_only=True)
    assert_refresh_token_revoked(authserver, token)
    assert refresh_token_state(authserver, refresh_token_of(boxes["bob"])) == "live"


def test_deleting_a_mailbox_whose_grant_was_revoked_keeps_nothing(boxes):
    from mailgov.services import revoke_mailbox

    revoke_mailbox(boxes["alice"], "user: disconnected")
    boxes["alice"].delete()
    assert not PendingRevocation.objects.exists()


# -- governance jobs --------------------------------------------------------------------


def test_a_job_runs_each_row_through_the_services_and_records_the_outcome(boxes, officer, settings):
    from django.contrib.auth.models import Group

    officer.groups.add(Group.objects.get(name="Mail security officers"))
    officer = type(officer).objects.get(pk=officer.pk)
    settings.MAILGOV_ADMIN_INLINE_ROWS = 1
    ids = [box.pk for box in boxes.values()] + ["00000000-0000-0000-0000-000000000000"]
    with acting_as(officer, "cid-of-the-request"):
        job = governance.start("suspend", ids, user=officer, cid="cid-of-the-request")
    assert job.state == AdminJob.State.PENDING  # more rows than run inline
    assert governance.run_job(job.pk) == {"suspended": 2, "missing": 1}
    assert governance.run_job(job.pk) is None  # done: not run twice
    job.refresh_from_db()
    assert (job.state, job.done, job.percent) == ("done", 3, 100)
    # Each row's change is audited as the officer, under the request's id.
    entries = LogEntry.objects.filter(
        object_pk__in=[str(b.pk) for b in boxes.values()], timestamp__gte=job.created_at
    )
    assert len(entries) == 2
    assert {(e.actor_id, e.cid) for e in entries} == {(officer.pk, "cid-of-the-request")}
    assert Mailbox.objects.filter(status="suspended").count() == 2


def test_a_job_whose_requester_lost_the_permission_does_nothing(boxes, officer, caplog):
    job = AdminJob.objects.create(
        action="revoke", target_ids=[str(boxes["alice"].pk)], total=1, requested_by=officer
    )
    caplog.set_level(logging.WARNING, logger="mailgov.security")
    assert governance.run_job(job.pk) == {}
    job.refresh_from_db()
    assert (job.state, job.error) == ("failed", "permission withdrawn")
    assert Mailbox.objects.get(pk=boxes["alice"].pk).status == "active"
    assert "may not revoke" in caplog.text


def test_require_reconsent_revokes_the_old_grant_at_the_provider(boxes, authserver, officer):
    from django.contrib.auth.models import Group

    officer.groups.add(Group.objects.get(name="Mail security officers"))
    officer = type(officer).objects.get(pk=officer.pk)
    alice = boxes["alice"]
    token = refresh_token_of(alice)
    job = governance.start("require_reconsent", [alice.pk], user=officer)
    assert job.counts == {"reconsent_required": 1}
    alice.refresh_from_db()
    assert alice.status == Mailbox.Status.NEEDS_RECONSENT
    assert retry_revocations(due_only=True)["revoked"] == 1
    assert_refresh_token_revoked(authserver, token)


def test_refresh_history_records_each_outcome(boxes, authserver):
    alice = boxes["alice"]
    get_access_token(alice, force_refresh=True)
    with authserver.faults(token=503), pytest.raises(TokenRefreshError):
        get_access_token(alice, force_refresh=True)
    outcomes = list(
        RefreshEvent.objects.filter(mailbox=alice).order_by("at").values_list("outcome", flat=True)
    )
    assert outcomes == ["ok", "unavailable"]
    assert timezone.now() >= RefreshEvent.objects.first().at


def test_lifting_a_freeze_leaves_a_contained_mailbox_s_mail_held(boxes, smtp):
    incident = incidents.declare(title="t", scope="users", scope_ids=[boxes["alice"].owner_id])
    [row] = enqueue("alice@example.test")
    incidents.freeze(incident)
    incidents.contain(incident)
    assert incidents.unfreeze(incident) == {"released": 0}
    held = OutboxMessage.objects.get(pk=row)
    assert (held.state, held.error_code) == (State.HELD, "mailbox_revoked")
    assert smtp.messages == []


def test_a_reconnect_during_a_containment_does_not_save_the_leaked_token(
    boxes, connect, authserver
):
    alice = boxes["alice"]
    leaked = refresh_token_of(alice)
    incident = incidents.declare(title="t", scope="mailboxes", scope_ids=[alice.pk])
    incidents.contain(incident, finish=False)  # the rows are left to a worker
    fresh = connect("alice")  # the owner reconnects before the worker ran
    assert fresh.pk == alice.pk and refresh_token_of(fresh) != leaked
    [pending] = PendingRevocation.objects.all()  # the leaked token, kept to be revoked
    assert pending.refresh_token == leaked
    assert incidents.finish_containment(incident)["revoked"] == 0  # the new grant is not
    retry_revocations(due_only=True)
    assert_refresh_token_revoked(authserver, leaked)
    assert refresh_token_state(authserver, refresh_token_of(fresh)) == "live"
    assert get_access_token(fresh)


def test_a_reconnect_while_a_revocation_is_pending_revokes_the_old_grant(
    boxes, connect, authserver
):
    from mailgov.services import revoke_mailbox

    alice = boxes["alice"]
    old = refresh_token_of(alice)
    with authserver.faults(revoke=503):
        revoke_mailbox(alice, "incident: contained")  # pending at the provider
    fresh = connect("alice")
    assert refresh_token_of(fresh) != old
    retry_revocations(due_only=True)
    assert_refresh_token_revoked(authserver, old)
    assert refresh_token_state(authserver, refresh_token_of(fresh)) == "live"


def test_mail_held_by_a_long_freeze_keeps_its_body(boxes, smtp):
    from datetime import timedelta

    incident = incidents.declare(title="t")
    [row] = enqueue("alice@example.test")
    incidents.freeze(incident)
    later = timezone.now() + timedelta(days=30)
    assert outbox.expire_bodies(now=later) == 0
    assert OutboxMessage.objects.get(pk=row).payload is not None
    incidents.unfreeze(incident)
    deliver(mailbox_id=str(boxes["alice"].pk))
    assert OutboxMessage.objects.get(pk=row).state == State.SENT


def test_freeze_and_its_release_are_audited_with_the_message_ids(boxes, officer):
    incident = incidents.declare(title="t")
    ids = enqueue("alice@example.test", 2)
    incidents.freeze(incident, actor=officer)
    incidents.unfreeze(incident, actor=officer)
    entries = {
        e.additional_data["what"]: e
        for e in LogEntry.objects.filter(object_repr__startswith=str(incident))
        if e.additional_data
    }
    held = entries["outbox messages held by the freeze"]
    released = entries["outbox messages released"]
    assert sorted(held.additional_data["ids"]) == sorted(map(str, ids))
    assert sorted(released.additional_data["ids"]) == sorted(map(str, ids))
    assert held.actor == released.actor == officer


def test_deleting_through_a_proxy_of_mailbox_keeps_the_grant_for_revocation(boxes):
    from mailgov.models import Governance

    Governance.objects.filter(pk=boxes["alice"].pk).delete()
    assert PendingRevocation.objects.count() == 1
