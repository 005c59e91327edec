"""The consent pages in a real browser, against the live site and the demo
authorization server: sign in, consent, send, disconnect; partial grant;
denial; replayed callback."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
from allauth.socialaccount.models import SocialAccount, SocialToken
from django.core.mail import send_mail

from mailgov.exceptions import MailboxUnavailableError
from mailgov.models import ConsentReceipt, Mailbox
from tests.conftest import assert_refresh_token_revoked, refresh_token_state, secrets_of
from tests.test_tokens import refresh_tokens_issued

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def site(live_server, allauth_demo, smtp, settings, maildir):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    settings.DEMO_MAILDIR = maildir
    return live_server.url


def sign_in(page, site: str, authserver, username: str = "alice") -> None:
    """Sign in to the site with the demo identity provider (identity scopes only)."""
    page.goto(f"{site}/accounts/oidc/demo/login/")
    page.get_by_role("button").first.click()  # allauth's "Continue" (a POST)
    page.wait_for_url(re.compile(re.escape(authserver.url)))
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", authserver.users[username].password)
    page.get_by_role("button", name=re.compile("sign in|log in", re.I)).click()
    page.wait_for_selector("#authorizationForm")
    assert page.locator('input[name="granted_scope"][value="mail.send"]').count() == 0
    page.click("button[name=allow]")
    page.wait_for_url(re.compile(re.escape(site)))


def open_consent(page, site: str) -> None:
    page.goto(f"{site}/mailboxes/connect/send_mail/demo/")
    assert "What it never does" in page.content()
    page.get_by_role("button", name=re.compile("Continue to")).click()
    page.wait_for_selector("#authorizationForm")


def test_sign_in_consent_send_and_disconnect(page, site, authserver, smtp):
    requests_seen: list[str] = []
    callbacks = []
    page.on("request", lambda request: requests_seen.append(request.url))
    page.on(
        "response",
        lambda response: callbacks.append(response) if "/login/callback/" in response.url else None,
    )
    sign_in(page, site, authserver)
    assert Mailbox.objects.count() == 0  # sign-in alone asks for no mail access
    sign_in_request = next(url for url in requests_seen if "/o/authorize/" in url)
    params = parse_qs(urlsplit(sign_in_request).query)
    assert params["code_challenge_method"] == ["S256"]
    assert sorted(params["scope"][0].split()) == ["email", "openid", "profile"]

    links = SocialAccount.objects.count()  # the sign-in's own link
    flow = []
    page.on(
        "response",
        lambda response: flow.append(response) if "/mailboxes/connect/" in response.url else None,
    )
    open_consent(page, site)
    # The consent page and the redirect its POST answers with (state and PKCE
    # challenge in its Location) are never cached; the redirect refers nowhere.
    consent_page, to_provider = flow[0], flow[-1]
    assert to_provider.request.method == "POST" and to_provider.status == 302
    for response in (consent_page, to_provider):
        assert "no-store" in response.headers["cache-control"].split(", ")
    assert to_provider.headers["referrer-policy"] == "no-referrer"
    assert consent_page.headers["referrer-policy"] == "same-origin"
    authorize = [url for url in requests_seen if "/o/authorize/" in url][-1]
    params = parse_qs(urlsplit(authorize).query)
    assert params["code_challenge_method"] == ["S256"]
    assert "code_verifier" not in params
    assert "mail.send" in params["scope"][0].split()
    page.click("button[name=allow]")
    page.wait_for_url(f"{site}/mailboxes/")
    assert "alice@example.test" in page.content()
    assert "Active" in page.content()
    # The callback: no-store, no referrer, then a redirect to a clean URL.
    last = callbacks[-1]
    assert "no-store" in last.headers["cache-control"].split(", ")
    assert last.headers["referrer-policy"] == "no-referrer"
    assert "code=" not in page.url

    mailbox = Mailbox.objects.get()
    assert mailbox.status == Mailbox.Status.ACTIVE
    assert "mail.send" in mailbox.scopes
    assert SocialToken.objects.count() == 0  # tokens live in the vault only
    assert SocialAccount.objects.count() == links  # a grant is no way to sign in
    assert "Connected: this application can now send as you" in page.content()
    receipt = ConsentReceipt.objects.get()
    assert (receipt.action, receipt.explanation_version) == ("grant", 1)
    assert receipt.ip_address == "127.0.0.0"
    assert "mail.send" in receipt.scopes_granted

    # Send from the site, then read it in the demo inbox.
    page.goto(f"{site}/")
    page.get_by_role("button", name="Send a test message").click()
    page.wait_for_url(f"{site}/demo/inbox/")
    assert "A test message from the mailgov demo" in page.content()
    assert "XOAUTH2" in page.content()
    [received] = smtp.messages
    assert received.auth_user == "alice@example.test"

    _, refresh = secrets_of(mailbox)
    assert refresh_token_state(authserver, refresh) == "live"
    page.goto(f"{site}/mailboxes/")
    page.get_by_role("button", name="Disconnect").click()
    page.wait_for_url(f"{site}/mailboxes/")
    assert "withdrawn at your provider" in page.content()
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.REVOKED
    # Not by introspection, which answers inactive for any refresh token.
    assert_refresh_token_revoked(authserver, refresh)
    assert ConsentReceipt.objects.filter(action="withdraw").count() == 1


def test_partial_grant_keeps_the_mailbox_without_sending(page, site, authserver, smtp):
    sign_in(page, site, authserver)
    open_consent(page, site)
    page.uncheck('input[name="granted_scope"][value="mail.send"]')
    page.click("button[name=allow]")
    page.wait_for_url(f"{site}/mailboxes/")
    content = page.content()
    assert "You did not grant permission to send email" in content
    assert "Connect again" in content
    mailbox = Mailbox.objects.get()
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT
    assert "mail.send" not in mailbox.scopes
    receipt = ConsentReceipt.objects.get()
    assert receipt.action == "partial"
    assert "mail.send" in receipt.scopes_requested
    assert "mail.send" not in receipt.scopes_granted
    with pytest.raises(MailboxUnavailableError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"])
    assert smtp.connections == 0


def test_denial_stores_nothing(page, site, authserver):
    sign_in(page, site, authserver)
    open_consent(page, site)
    page.click("button[name=deny]")
    page.wait_for_selector("text=You declined the request")
    assert Mailbox.objects.count() == 0
    assert ConsentReceipt.objects.count() == 0


def test_replayed_callback_is_refused(page, site, authserver):
    sign_in(page, site, authserver)
    callback_urls = []
    page.on(
        "request",
        lambda request: (
            callback_urls.append(request.url) if "/login/callback/" in request.url else None
        ),
    )
    open_consent(page, site)
    page.click("button[name=allow]")
    page.wait_for_url(f"{site}/mailboxes/")
    assert Mailbox.objects.count() == 1
    issued = refresh_tokens_issued(authserver, "alice")
    page.goto(callback_urls[-1])
    assert "expired or was already used" in page.content()
    assert "code=" not in page.url  # left the callback URL at once
    assert ConsentReceipt.objects.count() == 1
    assert refresh_tokens_issued(authserver, "alice") == issued  # the code was not redeemed again
