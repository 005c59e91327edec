"""The governance portal's inventory, outbox, jobs and audit pages, through
Django's test client as the two groups of the data migration (mail auditors,
mail security officers) and a superuser.

Mailboxes here are rows written in bulk (their tokens encrypted by the
field, as on save): no authorization server is needed to list, filter or
govern them. The provider-side revocation is queued by the actions and is
not run here (tests/test_admin_and_dumps.py and test_revocation.py run it
against the demo authorization server).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from datetime import timedelta
from typing import Any

import pytest
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailgov.governance import run_job
from mailgov.models import (
    AdminJob,
    AuditEntry,
    ConsentReceipt,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from tests.conftest import staff_user

pytestmark = pytest.mark.django_db

Status = Mailbox.Status
State = OutboxMessage.State
MAILBOXES = "/admin/mailgov/mailbox/"
OUTBOX = "/admin/mailgov/outboxmessage/"
AUDIT = "/admin/mailgov/auditentry/"
CID = "portal-test-cid-1"
#: The stored form of every encrypted value starts with it (mailgov.crypto).
ENVELOPE = "mg1$"
BODY = "Secret plans for the board meeting"


# -- users -------------------------------------------------------------------------------


def member(username: str, group: str | None):
    return staff_user(username, group)


@pytest.fixture
def officer():
    return member("olivia", "Mail security officers")


@pytest.fixture
def auditor():
    return member("arthur", "Mail auditors")


@pytest.fixture
def superuser():
    return get_user_model().objects.create_superuser("root", "root@staff.test", "pw")


def as_user(client, user):
    client.force_login(user)
    return client


# -- rows in bulk ------------------------------------------------------------------------------


def tokens_of(address: str) -> tuple[str, str]:
    """The (known) token values of a mailbox made here."""
    return f"AT-{address}-never-shown", f"RT-{address}-never-shown"


def make_mailboxes(
    count: int,
    *,
    prefix: str = "m",
    tokens: bool = True,
    owner: Any = None,
    expires_in: timedelta = timedelta(hours=1),
    **fields: Any,
) -> list[Mailbox]:
    """``count`` mailboxes (each with its own owner unless ``owner``), with
    credentials holding known tokens, all written in bulk."""
    User = get_user_model()
    owners = (
        [owner] * count
        if owner is not None
        else User.objects.bulk_create(
            User(username=f"{prefix}-owner-{n}", email=f"{prefix}-owner-{n}@owners.test")
            for n in range(count)
        )
    )
    fields.setdefault("provider", "demo")
    fields.setdefault("scopes", ["openid", "email", "mail.send"])
    boxes = Mailbox.objects.bulk_create(
        Mailbox(owner=box_owner, address=f"{prefix}-{n}@example.test", **fields)
        for n, box_owner in enumerate(owners)
    )
    if tokens:
        expires = timezone.now() + expires_in
        MailboxCredentials.objects.bulk_create(
            MailboxCredentials(
                mailbox=box,
                access_token=tokens_of(box.address)[0],
                refresh_token=tokens_of(box.address)[1],
                expires_at=expires,
            )
            for box in boxes
        )
    return boxes


def outbox_row(mailbox: Mailbox, state: str, **fields: Any) -> OutboxMessage:
    row = OutboxMessage(
        mailbox=mailbox,
        message_id=f"<{state}.{mailbox.pk}@example.test>",
        state=state,
        recipient_count=1,
        **fields,
    )
    row.payload = f'{{"subject": "{BODY}", "to": ["carol@example.test"]}}'
    row.save()
    return row


def confirm(client, url: str, action: str, ids: list[Any], **extra: Any):
    """Post ``action`` over ``ids``: the confirmation page, then "yes"."""
    data = {"action": action, "_selected_action": [str(pk) for pk in ids], **extra}
    page = client.post(url, data, headers={"X-Correlation-ID": CID})
    assert page.status_code == 200, page.status_code
    assert 'name="confirm" value="yes"' in page.content.decode()
    return client.post(
        url, {**data, "confirm": "yes"}, headers={"X-Correlation-ID": CID}, follow=True
    )


def statuses(boxes: list[Mailbox]) -> set[str]:
    return set(
        Mailbox.objects.filter(pk__in=[b.pk for b in boxes]).values_list("status", flat=True)
    )


def entries_for(obj: Any):
    content_type = ContentType.objects.get_for_model(type(obj), for_concrete_model=False)
    return LogEntry.objects.filter(content_type=content_type, object_pk=str(obj.pk))


# -- mailbox actions ------------------------------------------------------------------------


MAILBOX_ACTIONS = [
    # action, status before, status after, outcome counts of two mailboxes
    ("revoke", Status.ACTIVE, Status.REVOKED, {"revoked": 2}),
    ("suspend", Status.ACTIVE, Status.SUSPENDED, {"suspended": 2}),
    ("resume", Status.SUSPENDED, Status.ACTIVE, {"resumed": 2}),
    ("require_reconsent", Status.ACTIVE, Status.NEEDS_RECONSENT, {"reconsent_required": 2}),
]


@pytest.mark.parametrize(("action", "before", "after", "counts"), MAILBOX_ACTIONS)
def test_an_officer_changes_mailboxes_status(client, officer, action, before, after, counts):
    boxes = make_mailboxes(2, status=before)
    bystander = make_mailboxes(1, prefix="other", status=before)
    response = confirm(as_user(client, officer), MAILBOXES, action, [b.pk for b in boxes])
    page = response.content.decode()
    assert statuses(boxes) == {after}
    assert statuses(bystander) == {before}
    job = AdminJob.objects.get()
    assert (job.action, job.state, job.counts) == (action, AdminJob.State.DONE, counts)
    assert job.requested_by == officer and job.cid == CID and job.done == 2
    # The outcome is in the message, with the job's page.
    assert "2 " in page and f"/admin/mailgov/adminjob/{job.pk}/change/" in page
    # Audited: each mailbox's change (a model signal) and the job's summary,
    # with the actor and the request's correlation id.
    for box in boxes:
        assert entries_for(box).filter(actor=officer, cid=CID).exists()
    summary = entries_for(job).get()
    assert summary.actor == officer and summary.cid == CID
    assert sorted(summary.additional_data["ids"]) == sorted(str(b.pk) for b in boxes)
    if action in ("revoke", "require_reconsent"):
        # The access tokens are gone at once; the refresh tokens are kept
        # (encrypted) only for the queued revocation at the provider.
        for credentials in MailboxCredentials.objects.filter(mailbox__in=boxes):
            assert credentials.access_token is None
            assert credentials.refresh_token is not None


@pytest.mark.parametrize(
    ("action", "after", "result"),
    [("release_held", State.QUEUED, "released"), ("cancel_held", State.CANCELLED, "cancelled")],
)
def test_an_officer_releases_or_cancels_held_mail(client, officer, action, after, result):
    [box, empty] = make_mailboxes(2)
    held = [outbox_row(box, State.HELD), outbox_row(box, State.HELD)]
    failed = outbox_row(box, State.FAILED)
    response = confirm(as_user(client, officer), MAILBOXES, action, [box.pk, empty.pk])
    assert response.status_code == 200
    assert {row.state for row in OutboxMessage.objects.filter(pk__in=[r.pk for r in held])} == {
        after
    }
    failed.refresh_from_db()
    assert failed.state == State.FAILED
    job = AdminJob.objects.get()
    assert job.counts == {result: 1, "nothing_held": 1}
    for row in held:
        entry = entries_for(row).get(actor=officer)
        assert entry.cid == CID and entry.changes == {"state": [State.HELD, after]}


OUTBOX_ACTIONS = [
    ("retry", State.FAILED, State.QUEUED, "retried"),
    ("cancel", State.QUEUED, State.CANCELLED, "cancelled"),
    ("release", State.HELD, State.QUEUED, "released"),
]


@pytest.mark.parametrize(("action", "before", "after", "result"), OUTBOX_ACTIONS)
def test_an_officer_acts_on_outbox_messages(client, officer, action, before, after, result):
    [box] = make_mailboxes(1)
    row = outbox_row(box, before)
    other = outbox_row(box, before)
    confirm(as_user(client, officer), OUTBOX, action, [row.pk])
    row.refresh_from_db()
    other.refresh_from_db()
    assert (row.state, other.state) == (after, before)
    job = AdminJob.objects.get()
    assert job.counts == {result: 1} and job.requested_by == officer and job.cid == CID
    entry = entries_for(row).get(actor=officer, cid=CID)
    assert entry.changes == {"state": [before, after]}


def test_retrying_a_sent_message_is_refused(client, officer):
    [box] = make_mailboxes(1)
    sent = outbox_row(box, State.SENT, sent_at=timezone.now())
    failed = outbox_row(box, State.FAILED)
    response = confirm(as_user(client, officer), OUTBOX, "retry", [sent.pk, failed.pk])
    page = response.content.decode()
    sent.refresh_from_db()
    failed.refresh_from_db()
    assert sent.state == State.SENT  # never sent twice
    assert failed.state == State.QUEUED
    assert AdminJob.objects.get().counts == {"refused_sent": 1, "retried": 1}
    assert "1 refused (sent)" in page and "Refused, nothing done for them" in page


# -- refused: auditors, and what no group may do -------------------------------------------------


DENIED = [(MAILBOXES, name) for name, *_ in MAILBOX_ACTIONS] + [
    (MAILBOXES, "release_held"),
    (MAILBOXES, "cancel_held"),
    *((OUTBOX, name) for name, *_ in OUTBOX_ACTIONS),
]


@pytest.mark.parametrize(("url", "action"), DENIED)
def test_an_auditor_may_run_no_action(client, auditor, caplog, url, action):
    [box] = make_mailboxes(1, status=Status.SUSPENDED if action == "resume" else Status.ACTIVE)
    held = outbox_row(box, State.HELD)
    failed = outbox_row(box, State.FAILED)
    target = {MAILBOXES: box, OUTBOX: failed if action == "retry" else held}[url]
    before = statuses([box]), held.state, failed.state
    as_user(client, auditor)
    # The action is not offered to an auditor at all...
    assert f'value="{action}"' not in client.get(url).content.decode()
    # ...and a forged post of it, confirmed or not, is refused.
    for extra in ({}, {"confirm": "yes"}):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mailgov.security"):
            response = client.post(
                url,
                {"action": action, "_selected_action": [str(target.pk)], **extra},
                headers={"X-Correlation-ID": CID},
            )
        assert response.status_code == 403
        assert [r for r in caplog.records if r.name == "mailgov.security" and "denied" in r.msg]
    held.refresh_from_db()
    failed.refresh_from_db()
    assert (statuses([box]), held.state, failed.state) == before
    assert not AdminJob.objects.exists()
    denied = LogEntry.objects.filter(action=LogEntry.Action.ACCESS, actor=auditor)
    assert denied.count() == 2
    assert {entry.cid for entry in denied} == {CID}
    assert all(action in entry.changes["denied"][1] for entry in denied)


def test_an_auditor_may_not_revoke_from_the_mailbox_page(client, auditor, caplog):
    [box] = make_mailboxes(1)
    as_user(client, auditor)
    page = client.get(f"{MAILBOXES}{box.pk}/change/").content.decode()
    assert f"{box.pk}/revoke/" not in page
    with caplog.at_level(logging.INFO, logger="mailgov.security"):
        assert client.get(f"{MAILBOXES}{box.pk}/revoke/").status_code == 403
        assert client.post(f"{MAILBOXES}{box.pk}/revoke/").status_code == 403
    assert statuses([box]) == {Status.ACTIVE}
    assert LogEntry.objects.filter(action=LogEntry.Action.ACCESS, actor=auditor).count() == 2
    assert sum(r.name == "mailgov.security" for r in caplog.records) == 2


def test_an_officer_may_not_delete_through_the_portal(client, officer, caplog):
    [box] = make_mailboxes(1)
    as_user(client, officer)
    with caplog.at_level(logging.INFO, logger="mailgov.security"):
        response = client.post(
            MAILBOXES,
            {"action": "delete_selected", "_selected_action": [str(box.pk)], "post": "yes"},
        )
        assert response.status_code == 403
        entry = LogEntry.objects.create(
            content_type=ContentType.objects.get_for_model(Mailbox),
            object_pk="x",
            object_repr="x",
            action=LogEntry.Action.UPDATE,
        )
        assert client.post(f"{AUDIT}{entry.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Mailbox.objects.filter(pk=box.pk).exists()
    assert LogEntry.objects.filter(pk=entry.pk).exists()
    assert LogEntry.objects.filter(action=LogEntry.Action.ACCESS, actor=officer).count() == 2
    assert sum("denied" in r.msg for r in caplog.records if r.name == "mailgov.security") == 2


def test_a_staff_user_without_the_portals_permissions_sees_nothing(client):
    nobody = member("nobody", None)
    as_user(client, nobody)
    for url in (MAILBOXES, OUTBOX, AUDIT, "/admin/mailgov/adminjob/", f"{MAILBOXES}export.csv"):
        assert client.get(url).status_code == 403, url


# -- the revoke button, and no delete --------------------------------------------------------------


def test_the_mailbox_page_has_revoke_instead_of_delete(client, officer, superuser):
    [box] = make_mailboxes(1)
    # Not even for a superuser, who holds the delete permission (it stays,
    # for the deletion of users: see below).
    for user in (superuser, officer):
        as_user(client, user)
        page = client.get(f"{MAILBOXES}{box.pk}/change/").content.decode()
        assert f"{box.pk}/revoke/" in page
        assert f"{box.pk}/delete/" not in page
        assert 'value="delete_selected"' not in client.get(MAILBOXES).content.decode()
    # The delete page leads to the revoke confirmation, and deletes nothing.
    for method in (client.get, client.post):
        response = method(f"{MAILBOXES}{box.pk}/delete/")
        assert response.status_code == 302
        assert response["Location"].endswith(f"{box.pk}/revoke/")
    assert Mailbox.objects.filter(pk=box.pk).exists()
    confirmation = client.get(f"{MAILBOXES}{box.pk}/revoke/")
    assert confirmation.status_code == 200 and box.address in confirmation.content.decode()
    assert statuses([box]) == {Status.ACTIVE}  # GET changes nothing
    response = client.post(f"{MAILBOXES}{box.pk}/revoke/", headers={"X-Correlation-ID": CID})
    assert response.status_code == 302
    assert statuses([box]) == {Status.REVOKED}
    job = AdminJob.objects.get()
    assert (job.action, job.counts, job.cid) == ("revoke", {"revoked": 1}, CID)
    assert entries_for(box).filter(actor=officer, cid=CID).exists()
    # Revoked: no Revoke button any more.
    assert f"{box.pk}/revoke/" not in client.get(f"{MAILBOXES}{box.pk}/change/").content.decode()


def test_revoking_needs_the_csrf_token(officer):
    [box] = make_mailboxes(1)
    client = Client(enforce_csrf_checks=True)
    client.force_login(officer)
    url = f"{MAILBOXES}{box.pk}/revoke/"
    assert client.post(url).status_code == 403
    data = {"action": "revoke", "_selected_action": [str(box.pk)], "confirm": "yes"}
    assert client.post(MAILBOXES, data).status_code == 403
    assert statuses([box]) == {Status.ACTIVE}
    # With the token of the confirmation page, it goes through.
    page = client.get(url)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())[1]
    assert client.post(url, {"csrfmiddlewaretoken": token}).status_code == 302
    assert statuses([box]) == {Status.REVOKED}


def test_a_superuser_deletes_a_user_and_the_grant_is_kept_for_revocation(client, superuser):
    owner = get_user_model().objects.create_user("leaver", "leaver@example.test")
    [with_token] = make_mailboxes(1, prefix="tok", owner=owner)
    [without] = make_mailboxes(1, prefix="none", owner=owner, tokens=False)
    ConsentReceipt.objects.create(
        user=owner,
        mailbox=with_token,
        provider="demo",
        capability="send_mail",
        action="grant",
        explanation_version=1,
    )
    RefreshEvent.objects.create(mailbox=with_token, outcome=RefreshEvent.Outcome.OK)
    as_user(client, superuser)
    url = f"/admin/auth/user/{owner.pk}/delete/"
    confirmation = client.get(url)
    assert confirmation.status_code == 200
    # Nothing the deletion cascades to needs a permission the superuser lacks
    # (the portal's read-only admins keep Django's delete permission).
    assert not confirmation.context["perms_lacking"]
    response = client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert not get_user_model().objects.filter(pk=owner.pk).exists()
    assert not Mailbox.objects.filter(pk__in=[with_token.pk, without.pk]).exists()
    # The grant that held a refresh token is kept for its revocation at the
    # provider; the one without had nothing to revoke.
    pending = PendingRevocation.objects.get()
    assert pending.mailbox_id == with_token.pk and pending.provider == "demo"
    assert pending.refresh_token == tokens_of(with_token.address)[1]


# -- jobs over large selections ---------------------------------------------------------------


def test_a_large_selection_runs_as_a_job_with_progress(client, officer, settings):
    settings.MAILGOV_ADMIN_INLINE_ROWS = 3
    boxes = make_mailboxes(5)
    [revoked] = make_mailboxes(1, prefix="gone", status=Status.REVOKED)
    as_user(client, officer)
    # Every active mailbox of the filtered list, across pages.
    response = confirm(
        client,
        f"{MAILBOXES}?status=active",
        "suspend",
        [boxes[0].pk],
        select_across="1",
    )
    job = AdminJob.objects.get()
    assert job.state == AdminJob.State.PENDING and job.total == 5
    assert sorted(job.target_ids) == sorted(str(b.pk) for b in boxes)
    page = response.content.decode()
    assert "queued for a worker" in page and f"/admin/mailgov/adminjob/{job.pk}/change/" in page
    assert statuses(boxes) == {Status.ACTIVE}  # not yet
    job_page = client.get(f"/admin/mailgov/adminjob/{job.pk}/change/").content.decode()
    assert '<meta http-equiv="refresh" content="2">' in job_page
    assert not re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", job_page)  # no inline script
    # What the Celery worker runs (a real worker runs it in test_workers).
    assert run_job(job.pk) == {"suspended": 5}
    assert statuses(boxes) == {Status.SUSPENDED}
    assert statuses([revoked]) == {Status.REVOKED}
    job.refresh_from_db()
    assert (job.state, job.done, job.percent) == (AdminJob.State.DONE, 5, 100)
    job_page = client.get(f"/admin/mailgov/adminjob/{job.pk}/change/").content.decode()
    assert 'http-equiv="refresh"' not in job_page
    assert "100%" in job_page and "suspended" in job_page
    listing = client.get("/admin/mailgov/adminjob/").content.decode()
    assert "Suspend sending" in listing and "100%" in listing and officer.username in listing
    # The worker ran as the officer, under the request's correlation id.
    for box in boxes:
        assert entries_for(box).filter(actor=officer, cid=CID).exists()


# -- export ---------------------------------------------------------------------------------


def read_csv(response) -> list[dict[str, str]]:
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text))), text


def ciphertexts() -> list[str]:
    values = []
    for pair in MailboxCredentials.objects.values_list("access_token", "refresh_token"):
        values += [sealed.ciphertext for sealed in pair if sealed is not None]
    for sealed in OutboxMessage.objects.values_list("payload", flat=True):
        if sealed is not None:
            values.append(sealed.ciphertext)
    return values


def assert_no_secret(text: str, boxes: list[Mailbox]) -> None:
    for box in boxes:
        for token in tokens_of(box.address):
            assert token not in text
    for value in ciphertexts():
        assert value not in text
    assert ENVELOPE not in text
    assert BODY not in text and "carol@example.test" not in text


def test_the_export_honours_the_filters_and_holds_no_secret(client, auditor):
    active = make_mailboxes(2)
    revoked = make_mailboxes(3, prefix="rev", status=Status.REVOKED)
    Mailbox.objects.filter(pk=revoked[0].pk).update(revocation_reason='=HYPERLINK("x")')
    as_user(client, auditor)
    for query in ("?status=revoked", "?status__exact=revoked"):
        rows, text = read_csv(client.get(f"{MAILBOXES}export.csv{query}"))
        assert sorted(row["address"] for row in rows) == sorted(b.address for b in revoked)
        assert_no_secret(text, active + revoked)
        # A formula is text to a spreadsheet.
        assert "'=HYPERLINK" in text
    rows, _ = read_csv(client.get(f"{MAILBOXES}export.csv?q=rev-1"))
    assert [row["address"] for row in rows] == [revoked[1].address]
    # The "export selected" action too.
    response = client.post(
        MAILBOXES, {"action": "export_csv", "_selected_action": [str(active[0].pk)]}
    )
    rows, text = read_csv(response)
    assert [row["address"] for row in rows] == [active[0].address]
    assert_no_secret(text, active)
    # Exports are audited.
    assert LogEntry.objects.filter(action=LogEntry.Action.ACCESS, actor=auditor).count() == 4


@pytest.mark.parametrize(
    "url",
    [
        OUTBOX,
        AUDIT,
        "/admin/mailgov/sendlog/",
        "/admin/mailgov/consentreceipt/",
        "/admin/mailgov/refreshevent/",
        "/admin/mailgov/pendingrevocation/",
    ],
)
def test_every_list_exports_for_an_auditor_and_holds_no_secret(client, auditor, url):
    [box, gone] = make_mailboxes(2)
    outbox_row(box, State.HELD)
    SendLog.objects.create(mailbox=box, status=SendLog.Status.SENT, message_id="<1@x>")
    RefreshEvent.objects.create(mailbox=box, outcome=RefreshEvent.Outcome.OK)
    ConsentReceipt.objects.create(
        user=box.owner,
        mailbox=box,
        provider="demo",
        capability="send_mail",
        action="grant",
        explanation_version=1,
        scopes_granted=["mail.send"],
    )
    gone.delete()  # its refresh token kept in a PendingRevocation
    assert PendingRevocation.objects.exists()
    as_user(client, auditor)
    rows, text = read_csv(client.get(f"{url}export.csv"))
    assert rows
    assert_no_secret(text, [box, gone])


def test_export_needs_the_export_permission(client, caplog):
    [box] = make_mailboxes(1)
    viewer = member("viewer", None)
    viewer.user_permissions.add(Permission.objects.get(codename="view_mailbox"))
    as_user(client, viewer)
    assert client.get(MAILBOXES).status_code == 200
    with caplog.at_level(logging.INFO, logger="mailgov.security"):
        assert client.get(f"{MAILBOXES}export.csv").status_code == 403
        response = client.post(
            MAILBOXES, {"action": "export_csv", "_selected_action": [str(box.pk)]}
        )
        assert response.status_code == 403
    denied = LogEntry.objects.filter(action=LogEntry.Action.ACCESS, actor=viewer)
    assert denied.count() == 2
    assert all("denied" in entry.changes for entry in denied)
    assert sum(r.name == "mailgov.security" for r in caplog.records) == 2


@pytest.mark.parametrize("url", [MAILBOXES, AUDIT, "/admin/mailgov/consentreceipt/"])
def test_export_needs_seeing_the_list_too(client, url):
    make_mailboxes(1)
    exporter = member("exporter", None)
    exporter.user_permissions.add(Permission.objects.get(codename="export_data"))
    as_user(client, exporter)
    assert client.get(url).status_code == 403
    assert client.get(f"{url}export.csv").status_code == 403


# -- no secret on any page ------------------------------------------------------------------


def test_no_page_shows_a_token_a_ciphertext_or_a_body(client, superuser):
    boxes = make_mailboxes(3)
    rows = [outbox_row(boxes[0], state) for state in (State.HELD, State.FAILED, State.QUEUED)]
    gone = make_mailboxes(1, prefix="gone")[0]
    gone_pk = gone.pk
    gone.delete()
    pending = PendingRevocation.objects.get()
    job_entry = LogEntry.objects.filter(content_type__model="mailbox").first()
    as_user(client, superuser)
    pages = [
        MAILBOXES,
        f"{MAILBOXES}{boxes[0].pk}/change/",
        f"{MAILBOXES}{boxes[0].pk}/revoke/",
        OUTBOX,
        *(f"{OUTBOX}{row.pk}/change/" for row in rows),
        "/admin/mailgov/pendingrevocation/",
        f"/admin/mailgov/pendingrevocation/{pending.pk}/change/",
        AUDIT,
        f"{AUDIT}{job_entry.pk}/change/",
        "/admin/mailgov/adminjob/",
    ]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        assert_no_secret(response.content.decode(), [*boxes, gone])
    # The pending revocation's page shows what it is about, not its token.
    page = client.get(f"/admin/mailgov/pendingrevocation/{pending.pk}/change/").content.decode()
    assert str(gone_pk) in page and "refresh_token" not in page


# -- the inventory's list and filters --------------------------------------------------------------


def addresses(response) -> set[str]:
    assert response.status_code == 200
    changelist = response.context["cl"]
    return {box.address for box in changelist.result_list}


def test_inventory_filters_and_search(client, auditor, settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "c", "client_secret": "s"}}
    now = timezone.now()
    [fresh] = make_mailboxes(1, prefix="fresh", last_used_at=now)
    [failing] = make_mailboxes(1, prefix="failing", refresh_failing_days=3)
    [almost] = make_mailboxes(1, prefix="almost", refresh_failing_days=2)
    [old] = make_mailboxes(1, prefix="old", connected_at=now - timedelta(days=54))
    [kept] = make_mailboxes(
        1, prefix="kept", connected_at=now - timedelta(days=90), kept_at=now - timedelta(days=1)
    )
    [long_gone] = make_mailboxes(
        1, prefix="longgone", status=Status.REVOKED, connected_at=now - timedelta(days=90)
    )
    [gmail] = make_mailboxes(
        1, prefix="gmail", provider="google", scopes=["https://mail.google.com/"]
    )
    [gmail_id_only] = make_mailboxes(1, prefix="gid", provider="google", scopes=["openid"])
    [later] = make_mailboxes(1, prefix="later", expires_in=timedelta(days=2))
    [expired] = make_mailboxes(1, prefix="expired", expires_in=-timedelta(minutes=5))
    outbox_row(fresh, State.HELD)
    outbox_row(failing, State.FAILED)
    as_user(client, auditor)

    def listed(query: str) -> set[str]:
        return addresses(client.get(f"{MAILBOXES}?{query}"))

    assert listed("status=refresh_failing") == {failing.address}  # not almost
    assert listed("status=held") == {fresh.address}
    assert listed("status=revoked") == {long_gone.address}
    assert listed("provider__exact=google") == {gmail.address, gmail_id_only.address}
    # Google's send scope granted (the demo provider is not configured here:
    # an incident's capability scope covers its mailboxes whole).
    with_capability = listed("capability=send_mail")
    assert gmail.address in with_capability and gmail_id_only.address not in with_capability
    assert listed("dormant=soon") == {old.address}  # kept: active again
    assert almost.address in listed("status=active") and kept.address in listed("q=kept")
    expiring = listed("token=24h")
    assert later.address not in expiring and expired.address not in expiring
    assert fresh.address in expiring
    assert listed("token=expired") == {expired.address}
    # "Past 7 days", as the date filter's own link asks for it.
    week = client.get(MAILBOXES).context["cl"]
    [spec] = [f for f in week.filter_specs if getattr(f, "field_path", "") == "last_used_at"]
    [past_week] = [c for c in spec.choices(week) if c["display"] == "Past 7 days"]
    assert listed(past_week["query_string"].lstrip("?")) == {fresh.address}
    assert listed(f"q={failing.owner.email}") == {failing.address}
    assert listed("q=gmail-0@example") == {gmail.address}
    # The held count and flags are columns, and every column sorts.
    page = client.get(f"{MAILBOXES}?o=-6").content.decode()
    assert "icon-yes" in client.get(f"{MAILBOXES}?status=refresh_failing").content.decode()
    assert client.get(f"{MAILBOXES}?o=-6").context["cl"].result_list[0] == fresh
    for column in range(1, 10):
        assert client.get(f"{MAILBOXES}?o={column}").status_code == 200
        assert client.get(f"{MAILBOXES}?o=-{column}").status_code == 200
    assert "held" in page.lower()


def test_the_mailbox_page_shows_its_histories(client, auditor):
    [box] = make_mailboxes(1)
    [other] = make_mailboxes(1, prefix="other")
    now = timezone.now()
    SendLog.objects.bulk_create(
        [
            SendLog(mailbox=box, status="sent", attempted_at=now - timedelta(days=1)),
            SendLog(mailbox=box, status="sent", attempted_at=now - timedelta(days=1)),
            SendLog(mailbox=box, status="failed", attempted_at=now - timedelta(days=2)),
            SendLog(mailbox=box, status="sent", attempted_at=now - timedelta(days=40)),
            SendLog(mailbox=other, status="failed", attempted_at=now),
        ]
    )
    row = outbox_row(box, State.FAILED, error_code="smtp_550")
    RefreshEvent.objects.create(
        mailbox=box, outcome=RefreshEvent.Outcome.UNAVAILABLE, error_code="http_503"
    )
    ConsentReceipt.objects.create(
        user=box.owner,
        mailbox=box,
        provider="demo",
        capability="send_mail",
        action="grant",
        explanation_version=7,
        scopes_granted=["mail.send"],
    )
    Mailbox.objects.filter(pk=box.pk).update(
        status=Status.REVOKED, revocation_attempts=2, revocation_retry_at=now
    )
    as_user(client, auditor)
    response = client.get(f"{MAILBOXES}{box.pk}/change/")
    page = response.content.decode()
    context = response.context
    assert context["send_totals"] == {"sent": 2, "failed": 1}
    assert [(r["sent"], r["failed"]) for r in context["send_stats"]] == [(0, 1), (2, 0)]
    assert [r["pk"] for r in context["outbox_rows"]] == [row.pk]
    assert "smtp_550" in page and "http_503" in page and "mail.send" in page
    assert context["revocation"]["state"] == "pending"
    assert "Pending: 2 attempts" in page
    # Read-only: no form field, no save button.
    assert 'name="status"' not in page and 'name="_save"' not in page


def test_the_audit_view_filters_searches_and_shows_changes(client, auditor, officer):
    boxes = make_mailboxes(2)
    confirm(as_user(client, officer), MAILBOXES, "suspend", [boxes[0].pk])
    other_cid = "another-request"
    client.post(f"{MAILBOXES}{boxes[1].pk}/revoke/", headers={"X-Correlation-ID": other_cid})
    as_user(client, auditor)
    everything = client.get(AUDIT)
    assert everything.status_code == 200
    total = everything.context["cl"].result_count
    assert total >= 4

    def listed(query: str) -> list[AuditEntry]:
        response = client.get(f"{AUDIT}?{query}")
        assert response.status_code == 200
        return list(response.context["cl"].result_list)

    by_officer = listed(f"actor={officer.pk}")
    assert by_officer and all(entry.actor == officer for entry in by_officer)
    assert {entry.cid for entry in listed(f"q={CID}")} == {CID}
    assert {entry.cid for entry in listed(f"q={other_cid}")} == {other_cid}
    updates = listed(f"action__exact={LogEntry.Action.UPDATE}")
    assert updates and all(entry.action == LogEntry.Action.UPDATE for entry in updates)
    mailbox_type = ContentType.objects.get_for_model(Mailbox)
    about_mailboxes = listed(f"content_type__id__exact={mailbox_type.pk}")
    assert about_mailboxes and all(e.content_type == mailbox_type for e in about_mailboxes)
    assert {e.object_pk for e in listed(f"q={boxes[1].pk}")} == {str(boxes[1].pk)}
    today = timezone.localdate()
    assert len(listed(f"timestamp__year={today.year}&timestamp__month={today.month}")) >= 1
    # The detail page shows the change, and the summary's ids.
    suspended = entries_for(boxes[0]).get(actor=officer)
    page = client.get(f"{AUDIT}{suspended.pk}/change/").content.decode()
    assert "status" in page and "active" in page and "suspended" in page and CID in page
    job = AdminJob.objects.get(action="suspend")
    summary = entries_for(job).get()
    page = client.get(f"{AUDIT}{summary.pk}/change/").content.decode()
    assert str(boxes[0].pk) in page
    # Exported, filtered.
    rows, _ = read_csv(client.get(f"{AUDIT}export.csv?q={other_cid}"))
    assert rows and {row["correlation id"] for row in rows} == {other_cid}
    # Read-only.
    assert 'value="delete_selected"' not in client.get(AUDIT).content.decode()
    assert client.get(f"{AUDIT}add/").status_code == 403
    assert client.post(f"{AUDIT}{summary.pk}/change/", {"cid": "x"}).status_code == 403
    summary.refresh_from_db()
    assert summary.cid == CID


# -- constant query counts ------------------------------------------------------------------


#: Encrypted columns: no page selects them (the credentials' expiry is read
#: through an annotation, the outbox's payload and a pending revocation's
#: token are deferred).
ENCRYPTED_COLUMNS = ('"access_token"', '"refresh_token"', '"payload"')


def queries(client, url: str) -> int:
    """The queries of a page; none of them reads an encrypted column."""
    with CaptureQueriesContext(connection) as context:
        response = client.get(url)
    assert response.status_code == 200, url
    for query in context.captured_queries:
        # The one use allowed: whether a refresh token is still held.
        sql = query["sql"].replace('"refresh_token" IS NOT NULL', "")
        assert not any(column in sql for column in ENCRYPTED_COLUMNS), (url, sql)
    return len(context.captured_queries)


def test_the_lists_take_the_same_queries_for_10_and_1000_rows(client, superuser, settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "c", "client_secret": "s"}}
    urls = [
        MAILBOXES,
        f"{MAILBOXES}?status=held&capability=send_mail&dormant=soon&token=24h",
        f"{MAILBOXES}?q=example&o=-6",
        f"{MAILBOXES}?_facets=True",
        OUTBOX,
        f"{OUTBOX}?state__exact=held&mailbox__provider=demo&_facets=True",
        f"{OUTBOX}?mailbox=small-3@example.test",
        "/admin/mailgov/sendlog/",
        AUDIT,
        f"{AUDIT}?_facets=True",
    ]

    def grow(count: int, prefix: str) -> None:
        boxes = make_mailboxes(count, prefix=prefix)
        OutboxMessage.objects.bulk_create(
            OutboxMessage(mailbox=box, message_id=f"<{box.pk}@x>", state=State.HELD)
            for box in boxes
        )
        SendLog.objects.bulk_create(SendLog(mailbox=box, status="sent") for box in boxes)
        LogEntry.objects.bulk_create(
            LogEntry(
                content_type=ContentType.objects.get_for_model(Mailbox),
                object_pk=str(box.pk),
                object_repr=str(box),
                action=LogEntry.Action.UPDATE,
                actor=box.owner,
            )
            for box in boxes
        )

    as_user(client, superuser)
    grow(10, "small")
    for url in urls:
        queries(client, url)  # warm the content type cache
    small = [queries(client, url) for url in urls]
    grow(990, "large")
    large = [queries(client, url) for url in urls]
    assert large == small
    assert len(client.get(MAILBOXES).context["cl"].result_list) == 100


def test_the_mailbox_page_takes_the_same_queries_for_10_and_1000_rows(client, superuser):
    [box] = make_mailboxes(1)
    owner_receipts_user = box.owner
    mailbox_type = ContentType.objects.get_for_model(Mailbox)

    def grow(count: int) -> None:
        now = timezone.now()
        SendLog.objects.bulk_create(
            SendLog(mailbox=box, status="sent", attempted_at=now - timedelta(hours=n))
            for n in range(count)
        )
        OutboxMessage.objects.bulk_create(
            OutboxMessage(mailbox=box, message_id=f"<{n}.{now.timestamp()}@x>", state=State.FAILED)
            for n in range(count)
        )
        RefreshEvent.objects.bulk_create(
            RefreshEvent(mailbox=box, outcome=RefreshEvent.Outcome.OK) for _ in range(count)
        )
        ConsentReceipt.objects.bulk_create(
            ConsentReceipt(
                user=owner_receipts_user,
                mailbox=box,
                provider="demo",
                capability="send_mail",
                action="grant",
                explanation_version=1,
            )
            for _ in range(count)
        )
        LogEntry.objects.bulk_create(
            LogEntry(
                content_type=mailbox_type,
                object_pk=str(box.pk),
                object_repr=str(box),
                action=LogEntry.Action.UPDATE,
                actor=superuser,
            )
            for _ in range(count)
        )

    as_user(client, superuser)
    url = f"{MAILBOXES}{box.pk}/change/"
    grow(10)
    queries(client, url)
    small = queries(client, url)
    grow(990)
    assert queries(client, url) == small
    outbox_url = f"{OUTBOX}{OutboxMessage.objects.filter(mailbox=box).first().pk}/change/"
    queries(client, outbox_url)
    assert queries(client, outbox_url) <= small
    # A deleted mailbox's pending revocation: listed and shown without its token.
    box.delete()
    pending = PendingRevocation.objects.get()
    queries(client, "/admin/mailgov/pendingrevocation/")
    queries(client, f"/admin/mailgov/pendingrevocation/{pending.pk}/change/")
