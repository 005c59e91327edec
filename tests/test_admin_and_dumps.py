"""What operators can see: the admin pages, a full database dump and the audit
trail hold no token after a real connect, refresh and send."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from auditlog.models import LogEntry
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.core.mail import send_mail
from django.core.management import call_command
from django.utils import timezone

from mailgov.backends.smtp import xoauth2_initial_response
from mailgov.exceptions import MailboxUnavailableError
from mailgov.models import Mailbox, MailboxCredentials, SendLog
from mailgov.providers import OIDCProvider
from mailgov.services import revoke_mailbox
from tests.conftest import assert_refresh_token_revoked, refresh_token_state, secrets_of
from tests.stubs import StubReply, token_endpoint_stub

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


def test_admin_revoke_action_revokes_at_the_provider(connect, smtp, admin_client, authserver):
    mailbox = connect("alice")
    _, refresh = secrets_of(mailbox)
    assert refresh_token_state(authserver, refresh) == "live"
    response = admin_client.post(
        "/admin/mailgov/mailbox/",
        {"action": "revoke", "_selected_action": [str(mailbox.pk)]},
        follow=True,
    )
    assert "1 mailbox revoked" in response.content.decode()
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED
    assert mailbox.revoked_at is not None
    assert secrets_of(mailbox) == []
    # Revoked at the authorization server: its token table says so, and a
    # refresh grant with it is refused.
    assert_refresh_token_revoked(authserver, refresh)
    entry = LogEntry.objects.get_for_object(mailbox).first()
    assert "revoked" in str(entry.changes)


def test_revoke_needs_the_change_permission(connect, smtp, client, django_user_model):
    mailbox = connect("alice")
    viewer = django_user_model.objects.create_user("viewer", "v@x.test", "pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_mailbox"))
    client.force_login(viewer)
    response = client.post(
        "/admin/mailgov/mailbox/",
        {"action": "revoke", "_selected_action": [str(mailbox.pk)]},
        follow=True,
    )
    assert response.status_code == 200
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE


def test_revoke_with_the_provider_down_keeps_the_refresh_token_only(
    connect, smtp, settings, authserver, monkeypatch
):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = connect("alice")
    _, refresh = secrets_of(mailbox)
    settings.MAILGOV_HTTP_TIMEOUT_SECONDS = 1
    with token_endpoint_stub(StubReply(503, {})) as stub:
        monkeypatch.setattr(OIDCProvider, "revocation_endpoint", property(lambda self: stub.url))
        result = revoke_mailbox(mailbox, "user: disconnected")
        assert stub.requests[0]["token"] == [refresh]
    assert result.at_provider is None
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED
    credentials = MailboxCredentials.objects.get(pk=mailbox.pk)
    assert credentials.access_token is None
    assert credentials.refresh_token == refresh  # kept, encrypted, for the retry
    with pytest.raises(MailboxUnavailableError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)


def test_pending_revocations_are_retried(connect, smtp, authserver, monkeypatch):
    mailbox = connect("alice")
    _, refresh = secrets_of(mailbox)
    with token_endpoint_stub(StubReply(503, {})) as stub:
        monkeypatch.setattr(OIDCProvider, "revocation_endpoint", property(lambda self: stub.url))
        assert revoke_mailbox(mailbox, "user: disconnected").at_provider is None
        assert refresh_token_state(authserver, refresh) == "live"
        out = io.StringIO()
        call_command("mailgov_retry_revocations", stdout=out)
        assert "still pending: 1" in out.getvalue()
    monkeypatch.undo()  # the provider is back
    out = io.StringIO()
    call_command("mailgov_retry_revocations", stdout=out)
    assert "revoked: 1" in out.getvalue()
    assert MailboxCredentials.objects.get(pk=mailbox.pk).refresh_token is None
    assert_refresh_token_revoked(authserver, refresh)
