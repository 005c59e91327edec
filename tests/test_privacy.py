"""Data-subject requests (mailgov.privacy): export and erasure, against the
demo authorization server for the grants.

Mailboxes are connected through the real authorization-code flow
(``connect``); the erasure's revocations are queued (the filesystem broker
has no worker here) and run by :func:`retry_revocations`, as the sweep would.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from auditlog.context import set_actor
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core.mail import EmailMessage, get_connection
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import TestCase
from django.utils import timezone

from mailgov import delivery, governance
from mailgov.exceptions import UserLookupError
from mailgov.lifecycle import purge
from mailgov.models import (
    ConsentReceipt,
    ErasureRecord,
    Mailbox,
    MailboxCredentials,
    OutboxAttempt,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from mailgov.privacy import (
    SELF_SERVICE,
    check_erasures,
    erase_user,
    export_user,
    find_user,
    pseudonym,
)
from mailgov.revocation import retry_revocations, revoke_mailbox
from mailgov.signals import pre_send
from tests.conftest import assert_refresh_token_revoked, secrets_of, staff_user

#: The stored form of every encrypted value starts with it (mailgov.crypto).
ENVELOPE = "mg1$"
BODY = "Minutes of the private board meeting"
IP = "203.0.113.0"
AGENT = "Mozilla/5.0 (PrivacyTest; rv:1) Gecko/20100101"


def with_history(mailbox: Mailbox) -> None:
    """A receipt, a sent and a queued message (with a body), a notice to the
    owner, a send log and a refresh: what a mailbox gathers in use."""
    owner = mailbox.owner
    ConsentReceipt.objects.create(
        user=owner,
        mailbox=mailbox,
        provider=mailbox.provider,
        address=mailbox.address,
        capability="send_mail",
        action=ConsentReceipt.Action.GRANT,
        scopes_requested=mailbox.scopes,
        scopes_granted=mailbox.scopes,
        explanation_version=1,
        ip_address=IP,
        user_agent=AGENT,
    )
    for state, key in (("sent", "a"), ("queued", "b")):
        row = OutboxMessage(
            mailbox=mailbox,
            message_id=f"<{key}.privacy@mailgov.test>",
            idempotency_key=f"{mailbox.pk}:{key}",
            recipient_count=1,
            state=state,
        )
        row.payload = json.dumps({"from": mailbox.address, "body": BODY})
        row.save()
    notice = OutboxMessage(
        kind=OutboxMessage.Kind.NOTIFICATION,
        mailbox=mailbox,
        recipient_user=owner,
        event="refresh_failing",
        message_id="<n.privacy@mailgov.test>",
        idempotency_key=f"notify:{mailbox.pk}",
        recipient_count=1,
    )
    notice.payload = json.dumps({"to": [owner.email], "body": BODY})
    notice.save()
    SendLog.objects.create(
        mailbox=mailbox, message_id="<a.privacy@mailgov.test>", recipient_count=1, status="sent"
    )
    RefreshEvent.objects.create(mailbox=mailbox, outcome=RefreshEvent.Outcome.OK)


def traces(user) -> list[str]:
    """What must not survive an erasure of ``user`` (and its mailbox's address)."""
    return [
        user.get_username(),
        user.email,
        *Mailbox.objects.filter(owner=user).values_list("address", flat=True),
        IP,
        AGENT,
    ]


def dump() -> str:
    out = io.StringIO()
    call_command("dumpdata", "mailgov", "auditlog", stdout=out)
    return out.getvalue()


def assert_no_trace(text: str, values: list[str]) -> None:
    lowered = text.lower()
    for value in values:
        assert value.lower() not in lowered, f"{value!r} survived the erasure"


# -- export ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_export_holds_everything_and_no_secret(connect, tmp_path):
    mailbox = connect("alice")
    with_history(mailbox)
    tokens = secrets_of(mailbox)
    document = export_user(mailbox.owner)
    text = json.dumps(document)
    assert document["user"]["username"] == "alice"
    [box] = document["mailboxes"]
    assert box["address"] == mailbox.address and box["status"] == "active"
    assert box["scopes"] == mailbox.scopes
    assert document["consent_receipts"][0]["user_agent"] == AGENT
    assert {row["state"] for row in document["outbox"]} == {"sent", "queued"}
    assert [row["event"] for row in document["notifications"]] == ["refresh_failing"]
    assert document["send_log"][0]["message_id"] == "<a.privacy@mailgov.test>"
    assert document["refresh_history"][0]["outcome"] == "ok"
    # auditlog recorded the mailbox's creation and the receipt.
    assert {entry["about"] for entry in document["audit_entries"]} >= {
        "mailgov.mailbox",
        "mailgov.consentreceipt",
    }
    # Never a token, a ciphertext or a body.
    assert tokens and all(token not in text for token in tokens)
    assert ENVELOPE not in text and BODY not in text
    # The command writes the same document.
    target = tmp_path / "alice.json"
    call_command("mailgov_export_user", "alice@example.test", "--output", str(target))
    from_command = json.loads(target.read_text())
    assert from_command["mailboxes"] == document["mailboxes"]
    assert ENVELOPE not in target.read_text()


@pytest.mark.django_db
def test_the_download_is_the_signed_in_users_own(client, connect):
    mine = connect("alice")
    theirs = connect("bob")
    assert client.get("/mailboxes/my-data.json").status_code == 302  # sign in first
    client.force_login(mine.owner)
    page = client.get("/mailboxes/")
    assert b"Download my data" in page.content
    response = client.get("/mailboxes/my-data.json")
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment;")
    assert "no-store" in response["Cache-Control"]
    document = json.loads(response.content)
    assert document["user"]["username"] == "alice"
    assert [box["id"] for box in document["mailboxes"]] == [str(mine.pk)]
    assert theirs.address not in response.content.decode()
    assert all(token not in response.content.decode() for token in secrets_of(mine))


# -- the admin actions ---------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_actions_refuse_an_auditor(client, connect):
    mailbox = connect("alice")
    auditor = staff_user("arthur", "Mail auditors")
    client.force_login(auditor)
    listing = client.get("/admin/mailgov/mailbox/").content.decode()
    # An auditor may export (export_data), not erase.
    assert 'value="export_owners_data"' in listing
    assert 'value="erase_owners_data"' not in listing
    for extra in ({}, {"confirm": "yes"}):
        response = client.post(
            "/admin/mailgov/mailbox/",
            {"action": "erase_owners_data", "_selected_action": [str(mailbox.pk)], **extra},
        )
        assert response.status_code == 403
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE and not ErasureRecord.objects.exists()
    assert LogEntry.objects.filter(action=LogEntry.Action.ACCESS, actor=auditor).count() == 2
    exported = client.post(
        "/admin/mailgov/mailbox/",
        {"action": "export_owners_data", "_selected_action": [str(mailbox.pk)]},
    )
    assert exported.status_code == 200
    [owner] = json.loads(exported.content)["owners"]
    assert owner["mailboxes"][0]["address"] == mailbox.address
    assert ENVELOPE not in exported.content.decode()


@pytest.mark.django_db
def test_a_superuser_erases_the_owners_after_confirming(client, connect):
    mailbox = connect("alice")
    root = get_user_model().objects.create_superuser("root", "root@staff.test", "pw")
    client.force_login(root)
    data = {"action": "erase_owners_data", "_selected_action": [str(mailbox.pk)]}
    confirmation = client.post("/admin/mailgov/mailbox/", data)
    assert confirmation.status_code == 200
    assert b'name="confirm" value="yes"' in confirmation.content
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE  # nothing done yet
    response = client.post("/admin/mailgov/mailbox/", {**data, "confirm": "yes"})
    assert response.status_code == 302
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED
    assert mailbox.address == pseudonym("alice@example.test")
    record = ErasureRecord.objects.get()
    assert record.actor == root and record.counts["grants_revoked"] == 1


@pytest.mark.django_db
def test_deleting_a_user_in_the_admin_erases_first(client, connect):
    mailbox = connect("alice")
    with_history(mailbox)
    root = get_user_model().objects.create_superuser("root", "root@staff.test", "pw")
    client.force_login(root)
    response = client.post(f"/admin/auth/user/{mailbox.owner.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    record = ErasureRecord.objects.get()
    assert record.actor == root and record.actor_label == "root"
    assert record.account_deleted and record.counts["grants_revoked"] == 1
    # The grant waits for its revocation at the provider.
    assert PendingRevocation.objects.filter(mailbox_id=mailbox.pk).exists()
    assert_no_trace(dump(), ["alice@example.test", AGENT])


# -- erasure against the demo authorization server -----------------------------------------


def sqlite_file_text() -> str | None:
    """The raw SQLite database file, after VACUUM: deleted and overwritten
    rows can survive in free pages (and, in WAL mode, in the -wal file) until
    the file is rewritten, so the check is of what VACUUM leaves. ``None`` on
    another database."""
    if connection.vendor != "sqlite":
        return None
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.execute("VACUUM")
    path = Path(connection.settings_dict["NAME"])
    data = path.read_bytes()
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        data += wal.read_bytes()
    return data.decode("latin-1")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["command", "orm_delete"])
def test_erasure_revokes_at_the_provider_and_leaves_no_trace(authserver, connect, how):
    mailbox = connect("alice")
    with_history(mailbox)
    other = connect("bob")
    user = mailbox.owner
    values = traces(user)
    [access, refresh] = secrets_of(mailbox)
    if how == "command":
        out = io.StringIO()
        call_command("mailgov_erase_user", "alice", "--delete-account", "--yes", stdout=out)
        assert "grants revoked: 1" in out.getvalue()
    else:
        # Deleting the user through the ORM (or the admin) runs the same erasure.
        get_user_model().objects.get(pk=user.pk).delete()
    record = ErasureRecord.objects.get()
    assert record.account_deleted and record.user is None
    assert record.pseudonym == pseudonym("user:alice", address=False)
    # The grant is still to revoke at the provider: the erasure waits for it.
    assert record.status == ErasureRecord.Status.PENDING
    assert PendingRevocation.objects.filter(mailbox_id=mailbox.pk).exists()
    # The revocation sweep (here: its work, run once) revokes it at the server.
    retry_revocations(due_only=True)
    assert_refresh_token_revoked(authserver, refresh)
    out = io.StringIO()
    call_command("mailgov_erase_user", "--check", stdout=out)
    assert "erasures done now: 1, still pending: 0" in out.getvalue()
    record.refresh_from_db()
    assert record.status == ErasureRecord.Status.DONE and record.finished_at
    assert record.counts["notifications_deleted"] == 1
    assert record.counts["outbox_cancelled"] == 1
    # Counts add up: the send log and the outbox rows are still there.
    assert SendLog.objects.filter(message_id="<a.privacy@mailgov.test>").count() == 1
    assert OutboxMessage.objects.filter(payload__isnull=False).exclude(mailbox=other).count() == 0
    # No trace of the user, their address or their receipts' browser in any
    # mailgov or auditlog table, nor a token; the other owner is untouched.
    text = dump()
    assert other.address in text
    assert_no_trace(text, [*values, access, refresh])
    assert not get_user_model().objects.filter(username="alice").exists()
    # The proof of consent outlives the account, pseudonymised.
    [receipt] = ConsentReceipt.objects.filter(address=pseudonym(mailbox.address))
    assert receipt.user is None and receipt.ip_address == "" and receipt.user_agent == ""
    raw = sqlite_file_text()
    if raw is not None:
        assert_no_trace(raw, [user.email, mailbox.address, AGENT, access, refresh])


@pytest.mark.django_db
def test_erasure_keeps_the_account_and_pseudonymised_receipts(connect):
    mailbox = connect("alice")
    with_history(mailbox)
    user = mailbox.owner
    values = traces(user)
    record = erase_user(user)
    assert record.status == ErasureRecord.Status.PENDING and not record.account_deleted
    receipt = ConsentReceipt.objects.get(user=user)
    assert receipt.address == pseudonym(mailbox.address)
    assert receipt.ip_address == "" and receipt.user_agent == ""
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED and mailbox.address == receipt.address
    credentials = MailboxCredentials.objects.get(pk=mailbox.pk)
    assert credentials.access_token is None and credentials.refresh_token is not None
    # The account (username, email) is the host's: only mailgov's tables are clean.
    assert_no_trace(dump(), [value for value in values if value])


# -- the general cases of the erasure ------------------------------------------------------


class UserProxy(get_user_model()):
    """A host's proxy of the user model: deleting through it is deleting a user."""

    class Meta:
        proxy = True
        app_label = "auth"


@pytest.mark.django_db(transaction=True)
def test_users_deleting_their_own_account_erase_themselves(connect):
    mailbox = connect("alice")
    with_history(mailbox)
    user = mailbox.owner
    values = traces(user)
    # As a "delete my account" view does under auditlog's middleware: the
    # user is the actor of the erasure's own writes, after Django gathered
    # what refers to the account.
    with set_actor(user, remote_addr="198.51.100.7"):
        get_user_model().objects.get(pk=user.pk).delete()
    assert not get_user_model().objects.filter(pk=user.pk).exists()
    record = ErasureRecord.objects.get()
    assert record.account_deleted and record.actor is None
    assert record.actor_label == SELF_SERVICE
    assert not LogEntry.objects.filter(actor_id=user.pk).exists()
    assert_no_trace(dump(), [*values, "198.51.100.7"])


@pytest.mark.django_db
def test_deleting_through_a_proxy_of_the_user_model_erases_too(connect):
    mailbox = connect("alice")
    with_history(mailbox)
    values = traces(mailbox.owner)
    UserProxy.objects.filter(pk=mailbox.owner.pk).delete()
    record = ErasureRecord.objects.get()
    assert record.account_deleted and record.counts["grants_revoked"] == 1
    assert_no_trace(dump(), values)


@pytest.mark.django_db
def test_only_whole_values_are_replaced(connect, site_user):
    # A short username, and an address inside a longer one of someone else.
    owner = site_user("on")
    owner.email = "bob@example.test"
    owner.save()
    alice = connect("alice")
    # Another owner's row that quotes look-alikes (searched for, since it
    # holds the address, but not a match) stays as it is.
    kept = "jimbob@example.test bob@example.test.org x.bob@example.test stand by online"
    Mailbox.objects.filter(pk=alice.pk).update(revocation_reason=kept)
    user_type = ContentType.objects.get_for_model(get_user_model())
    LogEntry.objects.create(
        content_type=user_type,
        object_pk=str(owner.pk),
        object_repr="on",
        action=LogEntry.Action.UPDATE,
        changes={
            "email": ["", "bob@example.test"],
            "description": ["online", "on"],
            "note": ["", "mail bob@example.test."],
            # A field whose name is the username.
            "on": [False, True],
        },
    )
    erase_user(owner)
    alice.refresh_from_db()
    assert alice.revocation_reason == kept
    entry = LogEntry.objects.get(content_type=user_type, object_pk=str(owner.pk))
    name = pseudonym("user:on", address=False)
    assert entry.object_repr == name
    # Values only, whole ones; a field's name is never rewritten.
    assert entry.changes == {
        "email": ["", pseudonym("bob@example.test")],
        "description": ["online", name],
        "note": ["", f"mail {pseudonym('bob@example.test')}."],
        "on": [False, True],
    }


@pytest.mark.django_db
def test_an_erased_staff_members_name_leaves_what_they_did(connect):
    alice = connect("alice")
    root = get_user_model().objects.create_superuser("root", "root@staff.test", "pw")
    governance.start("revoke", [alice.pk], user=root)
    alice.refresh_from_db()
    assert alice.revocation_reason.endswith("by root")
    first = erase_user(alice.owner, actor=root)
    assert first.actor_label == "root"
    erase_user(root)
    alice.refresh_from_db()
    assert alice.revocation_reason.endswith("by " + pseudonym("user:root", address=False))
    first.refresh_from_db()
    assert first.actor_label == pseudonym("user:root", address=False)
    assert_no_trace(dump(), ["root@staff.test"])
    assert "by root" not in dump()


@pytest.mark.django_db
def test_erasing_twice_keeps_one_pseudonym_per_value(connect):
    mailbox = connect("alice")
    with_history(mailbox)
    user = mailbox.owner
    erase_user(user)
    mailbox.refresh_from_db()
    assert mailbox.address == pseudonym("alice@example.test")
    # Erasing again (or erasing, then deleting the account) changes nothing
    # already erased: the send log and timelines still join on one pseudonym.
    erase_user(user, delete_account=True)
    receipt = ConsentReceipt.objects.get()
    assert receipt.address == pseudonym("alice@example.test")
    assert ErasureRecord.objects.count() == 2
    assert pseudonym(pseudonym("alice@example.test")) not in dump()


@pytest.mark.django_db(transaction=True)
def test_a_revocation_the_provider_refuses_is_recorded_not_lost(authserver, connect):
    mailbox = connect("alice")
    with authserver.faults(revoke=400):
        record = erase_user(mailbox.owner)
        assert record.status == ErasureRecord.Status.PENDING
        assert retry_revocations(due_only=True)["refused"] == 1
    call_command("mailgov_erase_user", "--check", stdout=io.StringIO())
    record.refresh_from_db()
    assert record.status == ErasureRecord.Status.DONE
    assert record.counts["revocations_refused"] == 1
    assert "revocations_revoked" not in record.counts


@pytest.mark.django_db(transaction=True)
def test_a_revocation_given_up_before_is_restarted_by_the_erasure(authserver, connect, settings):
    settings.MAILGOV_REVOCATION_MAX_ATTEMPTS = 1
    mailbox = connect("alice")
    [_access, refresh] = secrets_of(mailbox)
    with authserver.faults(revoke=503):
        revoke_mailbox(mailbox, "user: disconnected")
        retry_revocations(due_only=True, now=timezone.now() + timedelta(hours=1))
    mailbox.refresh_from_db()
    assert mailbox.revocation_given_up_at is not None
    # The periodic sweep would never take it again; the erasure does.
    record = erase_user(mailbox.owner)
    assert record.counts["revocations_restarted"] == 1
    assert record.status == ErasureRecord.Status.PENDING
    assert retry_revocations(due_only=True)["revoked"] == 1
    assert_refresh_token_revoked(authserver, refresh)
    check_erasures()
    record.refresh_from_db()
    assert record.status == ErasureRecord.Status.DONE
    assert record.counts["revocations_revoked"] == 1


@pytest.mark.django_db
def test_receipts_are_kept_for_the_full_period_after_the_account_goes(connect, settings):
    settings.MAILGOV_RECEIPT_RETENTION_DAYS = 1000
    mailbox = connect("alice")
    with_history(mailbox)
    ConsentReceipt.objects.update(created_at=timezone.now() - timedelta(days=1100))
    get_user_model().objects.get(pk=mailbox.owner.pk).delete()
    [receipt] = ConsentReceipt.objects.all()
    assert receipt.mailbox is None and receipt.grant_ended_at is not None
    # The grant ended today: its proof is kept for the full period from now.
    assert purge(now=timezone.now() + timedelta(days=999))["receipts"] == 0
    assert ConsentReceipt.objects.exists()
    assert purge(now=timezone.now() + timedelta(days=1001))["receipts"] == 1


@pytest.mark.django_db
def test_a_user_is_named_without_ambiguity(site_user):
    bob = site_user("bob")
    # A username that is another user's id, and an email two users share.
    clash = site_user(str(bob.pk))
    User = get_user_model()
    User.objects.filter(pk__in=[bob.pk, clash.pk]).update(email="Shared@Example.test")
    for identifier in (str(bob.pk), "shared@example.test"):
        with pytest.raises(CommandError, match=r"names more than one user: id .*prefix"):
            call_command("mailgov_export_user", identifier, stdout=io.StringIO())
    assert find_user(f"id:{bob.pk}") == bob
    assert find_user(f"username:{bob.pk}") == clash
    assert find_user("username:bob") == find_user("bob") == bob
    with pytest.raises(UserLookupError, match="more than one"):
        find_user("email:SHARED@example.test")
    with pytest.raises(UserLookupError, match="no user with the username 'nobody'"):
        find_user("username:nobody")
    with pytest.raises(UserLookupError, match="not a user id"):
        find_user("id:abc")
    with pytest.raises(CommandError, match="no user with the id or username or email 'ghost'"):
        call_command("mailgov_erase_user", "ghost", "--yes", stdout=io.StringIO())


@pytest.mark.django_db
def test_the_export_holds_the_audit_entries_of_the_users_messages(connect):
    mailbox = connect("alice")
    with_history(mailbox)
    row = OutboxMessage.objects.get(message_id="<b.privacy@mailgov.test>")
    row.state = OutboxMessage.State.CANCELLED
    row.save()
    export = export_user(mailbox.owner)
    about = [
        entry for entry in export["audit_entries"] if entry["about"] == "mailgov.outboxmessage"
    ]
    assert about and any("cancelled" in json.dumps(entry["changes"]) for entry in about)
    assert ENVELOPE not in json.dumps(export)


@pytest.mark.django_db
def test_a_non_ascii_address_is_found_wherever_the_audit_trail_quotes_it(site_user, connect):
    owner = site_user("jorg")
    owner.email = "jörg@exämple.test"
    owner.save()
    alice = connect("alice")
    # An entry about someone else's row that quotes the address, in JSON.
    LogEntry.objects.log_create(
        alice, action=LogEntry.Action.UPDATE, changes={"note": ["", "cc jörg@exämple.test"]}
    )
    erase_user(owner)
    entry = LogEntry.objects.get(object_pk=str(alice.pk), changes__has_key="note")
    assert entry.changes["note"] == ["", f"cc {pseudonym('jörg@exämple.test')}"]


@pytest.mark.django_db
def test_messages_being_sent_when_their_owner_is_erased_end_without_a_body(connect, smtp):
    mailbox = connect("alice")
    backend = get_connection("mailgov.backends.queued.EmailBackend")
    with TestCase.captureOnCommitCallbacks(execute=True):
        backend.send_messages(
            [
                EmailMessage(f"Board {i}", BODY, mailbox.address, ["bob@example.test"])
                for i in range(3)
            ]
        )

    def erase_during_the_batch(**kwargs):
        pre_send.disconnect(erase_during_the_batch)
        erase_user(mailbox.owner)

    # The owner is erased while a worker holds their messages (claimed,
    # ``sending``): the erasure deletes the bodies, the worker finishes the
    # one it started, and the others can never go.
    pre_send.connect(erase_during_the_batch, weak=False)
    try:
        delivery.deliver(mailbox_id=mailbox.pk)
    finally:
        pre_send.disconnect(erase_during_the_batch)
    # The batch's first message went; which one that is, the claim's order says.
    rows = OutboxMessage.objects.filter(mailbox=mailbox)
    assert sorted(rows.values_list("state", "error_code")) == [
        ("failed", "body_deleted"),
        ("failed", "body_deleted"),
        ("sent", ""),
    ]
    assert not rows.filter(payload__isnull=False).exists()
    # Their attempts say so too (not "held" or "retry").
    outcomes = OutboxAttempt.objects.filter(message__mailbox=mailbox).order_by("started_at")
    assert sorted(outcomes.values_list("outcome", "error_code")) == [
        ("failed", "body_deleted"),
        ("failed", "body_deleted"),
        ("sent", ""),
    ]
    assert len(smtp.messages) == 1
