"""What operators can see: the admin pages, a full database dump and the audit
trail hold no token after a real connect, refresh and send."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from auditlog.models import LogEntry
from django.contrib import admin
from django.core.mail import send_mail
from django.core.management import call_command
from django.utils import timezone

from mailgov.backends.smtp import xoauth2_initial_response
from mailgov.models import Mailbox, MailboxCredentials, SendLog
from tests.conftest import secrets_of

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def used_mailbox(connect, smtp, settings):
    """A mailbox connected, refreshed once and used to send; with every token it held."""
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = connect("alice")
    seen = secrets_of(mailbox)
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    send_mail("Hi", "x", "alice@example.test", ["z@x.test"])
    seen += secrets_of(mailbox)
    seen.append(xoauth2_initial_response(mailbox.address, seen[-2]))
    return mailbox, seen


def test_credentials_are_not_in_the_admin():
    assert MailboxCredentials not in admin.site._registry
    assert Mailbox in admin.site._registry
    assert SendLog in admin.site._registry


def test_admin_pages_show_no_token(used_mailbox, admin_client):
    mailbox, tokens = used_mailbox
    pages = [
        admin_client.get("/admin/mailgov/mailbox/"),
        admin_client.get(f"/admin/mailgov/mailbox/{mailbox.pk}/change/"),
        admin_client.get("/admin/mailgov/sendlog/"),
        admin_client.get("/admin/auditlog/logentry/"),
    ]
    for page in pages:
        assert page.status_code == 200
        body = page.content.decode()
        assert all(token not in body for token in tokens)
    assert "alice@example.test" in pages[1].content.decode()
    # Mailboxes are connected by consent, never typed in.
    assert admin_client.get("/admin/mailgov/mailbox/add/").status_code == 403


def test_full_dump_and_audit_trail_hold_no_token(used_mailbox, leak_check):
    mailbox, tokens = used_mailbox
    out = io.StringIO()
    call_command("dumpdata", stdout=out)
    dump = out.getvalue()
    assert "mailgov.mailboxcredentials" in dump
    assert all(token not in dump for token in tokens)
    entries = LogEntry.objects.get_for_object(mailbox)
    assert entries.exists()
    trail = " ".join(str(entry.changes) + str(entry.additional_data) for entry in entries)
    assert all(token not in trail for token in tokens)
    leak_check(tokens)
