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
from mailgov.providers import MicrosoftProvider, OIDCProvider, TokenResponse
from mailgov.services import connect_mailbox, retry_revocations, revoke_mailbox
from mailgov.tokens import get_access_token
from tests.conftest import assert_refresh_token_revoked, refresh_token_state, secrets_of
from tests.stubs import StubReply, token_endpoint_stub
from tests.test_tokens import refresh_tokens_issued

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


def test_full_dump_and_audit_trail_hold_no_token(leak_check, used_mailbox):
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
    selection = {"action": "revoke", "_selected_action": [str(mailbox.pk)]}
    # First a confirmation page, which changes nothing.
    page = admin_client.post("/admin/mailgov/mailbox/", selection)
    assert page.status_code == 200 and 'name="confirm" value="yes"' in page.content.decode()
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE
    response = admin_client.post(
        "/admin/mailgov/mailbox/", {**selection, "confirm": "yes"}, follow=True
    )
    assert "Revoke the grants: 1 revoked" in response.content.decode()
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED
    assert mailbox.revoked_at is not None
    # The provider-side revocation is queued, not made in the request: the
    # refresh token is kept (encrypted) for it, the access token is gone.
    assert secrets_of(mailbox) == [refresh]
    # What the worker's task (or the retry sweep) does.
    assert retry_revocations()["revoked"] == 1
    assert secrets_of(mailbox) == []
    # Revoked at the authorization server: its token table says so, and a
    # refresh grant with it is refused.
    assert_refresh_token_revoked(authserver, refresh)
    entry = LogEntry.objects.get_for_object(mailbox).first()
    assert "revoked" in str(entry.changes)


def test_revoke_needs_the_govern_permission(connect, smtp, client, django_user_model):
    mailbox = connect("alice")
    viewer = django_user_model.objects.create_user("viewer", "v@x.test", "pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_mailbox"))
    client.force_login(viewer)
    response = client.post(
        "/admin/mailgov/mailbox/",
        {"action": "revoke", "_selected_action": [str(mailbox.pk)], "confirm": "yes"},
    )
    assert response.status_code == 403
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


# -- from the mutation review: revocation outcomes --
def test_revoking_a_microsoft_mailbox_deletes_both_tokens(settings, site_user):
    settings.MAILGOV_PROVIDERS = {"microsoft": {"client_id": "cid", "client_secret": "s"}}
    mailbox = connect_mailbox(
        owner=site_user("alice"),
        provider_id="microsoft",
        response=TokenResponse(
            "eyJ-access", "M.C105-refresh", 3600, ["https://outlook.office.com/SMTP.Send"]
        ),
        address="alice@contoso.example",
        requested_scopes=[],
    )
    assert MicrosoftProvider("microsoft", {"client_id": "c"}).revocation_endpoint is None
    result = revoke_mailbox(mailbox, "user: disconnected")
    assert result.at_provider is False  # no endpoint: an administrator's step
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED
    assert secrets_of(mailbox) == []  # nothing left here to retry with or leak
    assert retry_revocations() == {
        "revoked": 0,
        "pending": 0,
        "refused": 0,
        "no_endpoint": 0,
        "gave_up": 0,
    }


def test_a_refused_revocation_is_not_kept_for_a_retry(connect, monkeypatch):
    mailbox = connect("alice")
    with token_endpoint_stub(StubReply(400, {"error": "unsupported_token_type"})) as stub:
        monkeypatch.setattr(OIDCProvider, "revocation_endpoint", property(lambda self: stub.url))
        result = revoke_mailbox(mailbox, "user: disconnected")
    assert result.at_provider is False
    assert MailboxCredentials.objects.get(pk=mailbox.pk).refresh_token is None


def test_a_retry_the_provider_refuses_ends_the_retries(connect, monkeypatch):
    mailbox = connect("alice")
    with token_endpoint_stub(
        StubReply(503, {}), StubReply(400, {"error": "invalid_request"})
    ) as stub:
        monkeypatch.setattr(OIDCProvider, "revocation_endpoint", property(lambda self: stub.url))
        assert revoke_mailbox(mailbox, "user: disconnected").at_provider is None
        out = io.StringIO()
        call_command("mailgov_retry_revocations", stdout=out)
    assert "refused: 1" in out.getvalue()
    assert MailboxCredentials.objects.get(pk=mailbox.pk).refresh_token is None
    assert retry_revocations() == {
        "revoked": 0,
        "pending": 0,
        "refused": 0,
        "no_endpoint": 0,
        "gave_up": 0,
    }


def test_retrying_revocations_leaves_other_mailboxes_alone(connect, authserver, monkeypatch):
    alice = connect("alice")
    bob = connect("bob")
    bobs_tokens = secrets_of(bob)
    with token_endpoint_stub(StubReply(503, {})) as stub:
        monkeypatch.setattr(OIDCProvider, "revocation_endpoint", property(lambda self: stub.url))
        assert revoke_mailbox(alice, "user: disconnected").at_provider is None
        counts = retry_revocations()
    # Only alice's pending revocation was tried, and only her token sent.
    assert counts == {"revoked": 0, "pending": 1, "refused": 0, "no_endpoint": 0, "gave_up": 0}
    assert [r["token"] for r in stub.requests] == [[secrets_of(alice)[0]]] * 2
    assert secrets_of(bob) == bobs_tokens
    # Bob's grant still works at the authorization server.
    MailboxCredentials.objects.filter(pk=bob.pk).update(expires_at=None)
    before = refresh_tokens_issued(authserver, "bob")
    assert get_access_token(bob) != bobs_tokens[0]
    assert refresh_tokens_issued(authserver, "bob") == before + 1


# -- from the mutation review: status read only --
def test_the_admin_cannot_change_a_mailboxs_status(connect, smtp, admin_client):
    mailbox = connect("alice")
    Mailbox.objects.filter(pk=mailbox.pk).update(status=Mailbox.Status.REVOKED)
    url = f"/admin/mailgov/mailbox/{mailbox.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert 'name="status"' not in page
    # Read-only: a forged form post is refused.
    response = admin_client.post(url, {"status": "active", "_save": "Save"})
    assert response.status_code == 403
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED


def test_the_admin_shows_lifecycle_state_and_edits_none_of_it(connect, smtp, admin_client):
    mailbox = connect("alice")
    Mailbox.objects.filter(pk=mailbox.pk).update(refresh_failing_days=5)
    listing = admin_client.get("/admin/mailgov/mailbox/").content.decode()
    assert "Refresh failing" in listing and "icon-yes" in listing
    url = f"/admin/mailgov/mailbox/{mailbox.pk}/change/"
    page = admin_client.get(url).content.decode()
    for name in ("refresh_failing_days", "kept_at", "sending_paused_until", "revocation_attempts"):
        assert f'name="{name}"' not in page
    response = admin_client.post(
        url, {"refresh_failing_days": "0", "kept_at": "2030-01-01", "_save": "Save"}
    )
    assert response.status_code == 403
    mailbox.refresh_from_db()
    assert mailbox.refresh_failing_days == 5 and mailbox.kept_at is None
