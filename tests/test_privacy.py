"""Data-subject requests (mailgov.privacy): export and erasure, against the
demo authorization server for the grants.

Mailboxes are connected through the real authorization-code flow
(``connect``); the erasure's revocations are queued (the filesystem broker
has no worker here) and run by :func:`retry_revocations`, as the sweep would.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection

from mailgov.models import (
    ConsentReceipt,
    ErasureRecord,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from mailgov.privacy import erase_user, export_user, pseudonym
from mailgov.revocation import retry_revocations
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
