"""The consent pages without a browser: what starts a flow, with which scopes,
rate limits, error pages, notifications, and the integration's checks."""

from __future__ import annotations

import logging
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from allauth.account.models import EmailAddress
from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.models import SocialAccount, SocialApp, SocialLogin, SocialToken
from django.contrib.auth.models import AnonymousUser
from django.core import mail
from django.core.checks import run_checks
from django.test import Client, TestCase, override_settings
from django.urls import clear_url_caches
from django.utils import timezone

from mailgov import delivery
from mailgov.capabilities import SEND_MAIL, describe_scope
from mailgov.contrib.allauth.adapter import MailgovSocialAccountAdapter
from mailgov.contrib.allauth.callbacks import GoogleAdapter
from mailgov.contrib.allauth.consent import (
    capture_grant,
    consent_in_state,
    truncated_ip,
    verified_address,
)
from mailgov.exceptions import MailgovError
from mailgov.models import ConsentReceipt, Mailbox, OutboxMessage
from mailgov.providers import GoogleProvider, MicrosoftProvider, TokenResponse
from mailgov.services import connect_mailbox, mark_needs_reconsent
from tests.conftest import secrets_of
from tests.stubs import StubReply, token_endpoint_stub
from tests.test_tokens import refresh_tokens_issued

pytestmark = pytest.mark.django_db

CONSENT = "/mailboxes/connect/send_mail/demo/"


@pytest.fixture
def alice(client, site_user, allauth_demo):
    user = site_user("alice")
    client.force_login(user)
    return user


def test_get_shows_the_explanation_and_starts_nothing(client, alice):
    response = client.get(CONSENT + "?scope=https://mail.google.com/")
    assert response.status_code == 200
    body = response.content.decode()
    assert str(SEND_MAIL.explanation.never) in body
    assert describe_scope("mail.send") in body
    assert "https://mail.google.com/" not in body  # the query string changes nothing
    assert not client.session.get("socialaccount_states")


def start(client, path=CONSENT, **data):
    return client.post(path, {"version": str(SEND_MAIL.version), **data})


def test_post_starts_the_flow_with_the_registry_scopes_only(client, alice, authserver):
    response = start(
        client,
        CONSENT + "?scope=admin&auth_params=prompt%3Dnone%26access_type%3Donline",
        scope="admin",
        auth_params="x=y",
    )
    assert response.status_code == 302
    location = urlsplit(response["Location"])
    assert location.geturl().startswith(authserver.url)
    params = parse_qs(location.query)
    assert sorted(params["scope"][0].split()) == ["email", "mail.send", "openid"]
    assert params["code_challenge_method"] == ["S256"]
    assert "prompt" not in params and "access_type" not in params and "x" not in params
    assert "code_verifier" not in location.query


def test_consent_needs_a_signed_in_user(client, allauth_demo):
    response = start(client)
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


def test_unknown_capability_or_provider_is_404(client, alice):
    assert client.get("/mailboxes/connect/read_mail/demo/").status_code == 404
    assert client.get("/mailboxes/connect/send_mail/yahoo/").status_code == 404


def test_consent_post_needs_csrf(alice):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post(CONSENT, {"version": "1"}).status_code == 403


def test_rate_limit_gives_429_and_a_log_line(client, alice, caplog):
    caplog.set_level(logging.WARNING, logger="mailgov.security")
    with override_settings(MAILGOV_CONSENT_RATE="2/m"):
        responses = [start(client) for _ in range(4)]
    assert [r.status_code for r in responses] == [302, 302, 429, 429]
    assert "no-store" in responses[-1]["Cache-Control"]
    assert responses[-1]["Referrer-Policy"] == "no-referrer"
    assert "rate limit hit on '/mailboxes/connect/send_mail/demo/'" in caplog.text


def assert_private(response, policy: str = "no-referrer") -> None:
    assert "no-store" in response["Cache-Control"].split(", "), response["Cache-Control"]
    assert response["Referrer-Policy"] == policy


def test_every_response_of_the_consent_flow_is_private(client, alice, connect, allauth_demo):
    """Never cached, never referred to another origin: the pages, the redirect
    to the provider (state and PKCE challenge in its URL), the error page,
    disconnect, sign-in; every redirect no-referrer."""
    # A page with a form posting here says same-origin (no-referrer would make
    # the browser send Origin: null, which the CSRF check refuses: the browser
    # tests walk that path); nothing goes to another origin either way.
    page = client.get(CONSENT)
    assert page.status_code == 200
    assert_private(page, "same-origin")
    to_provider = start(client)
    assert to_provider.status_code == 302
    assert "code_challenge=" in to_provider["Location"]
    assert_private(to_provider)
    stale = client.post(CONSENT, {"version": "0"})
    assert (stale.status_code, stale["Location"]) == (302, CONSENT)
    assert_private(stale)
    listing = client.get("/mailboxes/")
    assert listing.status_code == 200
    assert_private(listing, "same-origin")
    error = client.get("/mailboxes/not-connected/")
    assert error.status_code == 400
    assert_private(error)
    mailbox = connect("alice")
    disconnected = client.post(f"/mailboxes/{mailbox.pk}/disconnect/")
    assert disconnected.status_code == 302
    assert_private(disconnected)
    anonymous = Client()
    to_login = anonymous.get(CONSENT)
    assert to_login.status_code == 302 and "/accounts/login/" in to_login["Location"]
    assert_private(to_login)
    sign_in_page = anonymous.get("/accounts/oidc/demo/login/")
    assert sign_in_page.status_code == 200
    assert_private(sign_in_page, "same-origin")
    sign_in = anonymous.post("/accounts/oidc/demo/login/")
    assert sign_in.status_code == 302 and "code_challenge=" in sign_in["Location"]
    assert_private(sign_in)


def test_callback_with_an_unknown_state_is_a_clear_page(client, alice, caplog, authserver):
    caplog.set_level(logging.WARNING, logger="mailgov.security")
    issued = refresh_tokens_issued(authserver, "alice")
    response = client.get(
        "/accounts/oidc/demo/login/callback/", {"code": "stolen-code", "state": "forged"}
    )
    # Away from the URL with the code, at once; never cached, never referred.
    assert response.status_code == 302
    assert response["Location"] == "/mailboxes/not-connected/"
    assert "no-store" in response["Cache-Control"]
    assert response["Referrer-Policy"] == "no-referrer"
    page = client.get(response["Location"])
    assert page.status_code == 400
    assert "expired or was already used" in page.content.decode()
    assert Mailbox.objects.count() == 0
    assert refresh_tokens_issued(authserver, "alice") == issued  # no code was redeemed


def test_owner_told_once_with_a_banner(client, alice, connect, settings):
    settings.MAILGOV_NOTIFICATION_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    mailbox = connect("alice")
    mail.outbox.clear()
    with django_capture_on_commit():
        assert mark_needs_reconsent(mailbox, "invalid_grant")
        assert not mark_needs_reconsent(mailbox, "invalid_grant")  # once
    # Queued in the outbox; a worker sends it with the notification backend.
    assert mail.outbox == []
    delivery.deliver(kind=OutboxMessage.Kind.NOTIFICATION)
    [notice] = mail.outbox
    assert notice.to == ["alice@example.test"]
    assert "Your provider ended this access" in notice.body
    assert "/mailboxes/" in notice.body
    page = client.get("/mailboxes/").content.decode()
    assert "Sending from alice@example.test has stopped" in page


def django_capture_on_commit():
    return TestCase.captureOnCommitCallbacks(execute=True)


def test_ip_is_truncated(rf):
    assert truncated_ip(rf.get("/", REMOTE_ADDR="203.0.113.77")) == "203.0.113.0"
    assert truncated_ip(rf.get("/", REMOTE_ADDR="2001:db8:1:2:3:4:5:6")) == "2001:db8:1::"
    assert truncated_ip(rf.get("/", REMOTE_ADDR="garbage")) == ""


def test_integration_checks():
    ids = [m.id for m in run_checks(databases=["default"])]
    assert not {"mailgov.E030", "mailgov.E031", "mailgov.E032", "mailgov.W010"} & set(ids)
    with override_settings(SOCIALACCOUNT_STORE_TOKENS=True, SOCIALACCOUNT_ADAPTER="x.Y"):
        ids = [m.id for m in run_checks()]
    assert {"mailgov.E030", "mailgov.E031"} <= set(ids)
    SocialApp.objects.create(provider="google", name="Google", client_id="c", secret="s3cr3t")
    ids = [m.id for m in run_checks(databases=["default"])]
    assert "mailgov.W010" in ids


def _sociallogin(user, provider, token, refresh, scopes, email="alice@contoso.example"):
    login = SocialLogin(
        user=user,
        account=SocialAccount(
            provider=provider,
            uid="uid-1",
            # Graph's /me: Microsoft marks no address verified.
            extra_data={"mail": email, "userPrincipalName": email},
        ),
        email_addresses=[EmailAddress(email=email, verified=True, primary=True)],
    )
    login.token = SocialToken(
        token=token, token_secret=refresh, expires_at=timezone.now() + timedelta(hours=1)
    )
    login.token.mailgov_granted_scopes = scopes
    login.state = {
        "process": "redirect",
        "data": {
            "mailgov": {
                "capability": "send_mail",
                "provider": provider,
                "version": 1,
                "scopes": ["openid", "email", "offline_access", "User.Read"],
            }
        },
    }
    return login


def test_microsoft_grant_is_redeemed_for_the_smtp_audience(rf, site_user, settings, monkeypatch):
    """The flow's token is for Graph; the SMTP token comes from the refresh token."""
    settings.MAILGOV_PROVIDERS = {"microsoft": {"client_id": "cid", "client_secret": "s"}}
    documented = {
        "token_type": "Bearer",
        "scope": "https://outlook.office.com/SMTP.Send",
        "expires_in": 4503,
        "access_token": "eyJ-smtp-audience",
        "refresh_token": "M.C105-rotated",
    }
    request = rf.get("/")
    request.user = site_user("alice")
    login = _sociallogin(
        None, "microsoft", "eyJ-graph-audience", "M.C105-first", ["openid", "User.Read"]
    )
    with token_endpoint_stub(StubReply(200, documented)) as stub:
        monkeypatch.setattr(MicrosoftProvider, "token_endpoint", stub.url)
        mailbox = capture_grant(request, login, consent_in_state(login), SEND_MAIL)
    assert stub.requests[0]["refresh_token"] == ["M.C105-first"]
    assert stub.requests[0]["scope"] == ["https://outlook.office.com/SMTP.Send offline_access"]
    assert mailbox.status == Mailbox.Status.ACTIVE
    assert "https://outlook.office.com/SMTP.Send" in mailbox.scopes
    assert secrets_of(mailbox) == ["eyJ-smtp-audience", "M.C105-rotated"]


def test_an_account_of_another_user_is_not_captured(rf, site_user, settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid"}}
    request = rf.get("/")
    request.user = site_user("alice")
    login = _sociallogin(site_user("bob"), "google", "ya29.x", "1//x", ["https://mail.google.com/"])
    # The provider account is linked to bob for sign-in.
    login.account.user = site_user("bob")
    login.account.save()
    request.session = {}
    with pytest.raises(ImmediateHttpResponse) as info:
        MailgovSocialAccountAdapter().pre_social_login(request, login)
    assert info.value.response["Location"] == "/mailboxes/not-connected/"
    assert "another user" in request.session["mailgov_consent_error"]
    assert login.token is None  # never left for allauth to serialize
    assert Mailbox.objects.count() == 0


def test_reconsent_without_a_refresh_token_keeps_the_stored_one(site_user, settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid"}}
    scopes = ["https://mail.google.com/"]
    first = TokenResponse("ya29.first", "1//kept", 3599, scopes)
    again = TokenResponse("ya29.second", None, 3599, scopes)  # Google's re-consent
    options = {"provider_id": "google", "address": "a@gmail.example", "requested_scopes": scopes}
    connect_mailbox(owner=site_user("alice"), response=first, **options)
    mailbox = connect_mailbox(owner=site_user("alice"), response=again, **options)
    assert secrets_of(mailbox) == ["ya29.second", "1//kept"]
    assert mailbox.status == Mailbox.Status.ACTIVE


@pytest.mark.parametrize(
    ("setting", "request_args"),
    [
        ("MAILGOV_DISCONNECT_RATE", ("post", "/mailboxes/{pk}/disconnect/")),
        ("MAILGOV_CALLBACK_RATE", ("get", "/accounts/oidc/demo/login/callback/?state=x&code=y")),
    ],
)
def test_disconnect_and_callback_are_rate_limited(client, alice, connect, setting, request_args):
    mailbox = connect("alice")
    method, path = request_args
    with override_settings(**{setting: "1/m"}):
        first = getattr(client, method)(path.format(pk=mailbox.pk))
        second = getattr(client, method)(path.format(pk=mailbox.pk))
    assert first.status_code != 429
    assert second.status_code == 429


def test_provider_error_on_return_stores_nothing(client, alice):
    started = start(client)
    state = parse_qs(urlsplit(started["Location"]).query)["state"][0]
    response = client.get(
        "/accounts/oidc/demo/login/callback/",
        {"error": "server_error", "state": state},
        follow=True,
    )
    assert response.status_code == 400
    assert "Your provider reported an error" in response.content.decode()
    assert Mailbox.objects.count() == 0


def test_users_see_only_their_own_receipts(client, alice, site_user, settings):
    settings.MAILGOV_PROVIDERS = {**settings.MAILGOV_PROVIDERS, "google": {"client_id": "c"}}
    scopes = ["https://mail.google.com/"]
    for user, address in ((alice, "alice@gmail.example"), (site_user("bob"), "bob@gmail.example")):
        mailbox = connect_mailbox(
            owner=user,
            provider_id="google",
            response=TokenResponse("a", "r", 3600, scopes),
            address=address,
            requested_scopes=scopes,
        )
        ConsentReceipt.objects.create(
            user=user,
            mailbox=mailbox,
            provider="google",
            address=address,
            capability="send_mail",
            action="grant",
            explanation_version=1,
        )
    page = client.get("/mailboxes/").content.decode()
    assert "alice@gmail.example" in page
    assert "bob@gmail.example" not in page


def test_allauth_login_ignores_scopes_from_the_query_string(client, allauth_demo, authserver):
    response = client.post(
        "/accounts/oidc/demo/login/?process=login&scope=mail.send"
        "&auth_params=redirect_uri%3Dhttps%3A%2F%2Fevil.example%2Fcb%26prompt%3Dnone"
    )
    assert response.status_code == 302
    params = parse_qs(urlsplit(response["Location"]).query)
    assert sorted(params["scope"][0].split()) == ["email", "openid", "profile"]
    assert params["redirect_uri"] == ["http://testserver/accounts/oidc/demo/login/callback/"]
    assert "prompt" not in params
    assert params["code_challenge_method"] == ["S256"]


def test_a_stale_explanation_version_starts_nothing(client, alice):
    response = client.post(CONSENT, {"version": "0"})
    assert response.status_code == 302
    assert response["Location"] == CONSENT
    assert not client.session.get("socialaccount_states")


def test_a_state_from_another_session_is_refused(client, alice, site_user):
    state = parse_qs(urlsplit(start(client)["Location"]).query)["state"][0]
    other = Client()
    other.force_login(site_user("bob"))
    response = other.get(
        "/accounts/oidc/demo/login/callback/", {"code": "c", "state": state}, follow=True
    )
    assert "expired or was already used" in response.content.decode()
    assert Mailbox.objects.count() == 0


def test_disconnecting_another_users_mailbox_is_404(client, alice, connect):
    bobs = connect("bob")
    assert client.post(f"/mailboxes/{bobs.pk}/disconnect/").status_code == 404
    bobs.refresh_from_db()
    assert bobs.status == Mailbox.Status.ACTIVE


def test_disconnect_receipts_name_what_was_withdrawn(client, alice, connect):
    mailbox = connect("alice")
    client.post(f"/mailboxes/{mailbox.pk}/disconnect/")
    client.post(f"/mailboxes/{mailbox.pk}/disconnect/")  # again: nothing more to withdraw
    [receipt] = ConsentReceipt.objects.filter(action="withdraw")
    assert receipt.capability == "send_mail"
    assert "mail.send" in receipt.scopes_granted
    page = client.get("/mailboxes/").content.decode()
    assert "nothing yet" in page  # a revoked mailbox may do nothing


def test_a_partial_mailbox_withdraws_no_capability(client, alice, connect):
    mailbox = connect("alice", scopes=["openid", "email"])
    client.post(f"/mailboxes/{mailbox.pk}/disconnect/")
    assert ConsentReceipt.objects.filter(action="withdraw").count() == 0


@pytest.mark.parametrize("expires_in", ["soon", -1, None])
def test_nonsense_expires_in_does_not_break_the_callback(expires_in):
    adapter = GoogleAdapter.__new__(GoogleAdapter)
    data = {"access_token": "a", "refresh_token": "r", "scope": "openid email"}
    if expires_in is not None:
        data["expires_in"] = expires_in
    token = adapter.parse_token(data)
    assert token.expires_at is None
    assert token.mailgov_granted_scopes == ["openid", "email"]


def test_callback_order_check(settings):
    settings.ROOT_URLCONF = "tests.urls_allauth_first"
    clear_url_caches()
    try:
        assert "mailgov.E032" in [m.id for m in run_checks()]
    finally:
        clear_url_caches()


def test_sign_in_by_email_only_to_verified_local_addresses(site_user):
    victim = site_user("victim")  # User.email set, no verified EmailAddress row
    login = _sociallogin(None, "demo", "t", "r", ["openid"], email="victim@example.test")
    adapter = MailgovSocialAccountAdapter()
    adapter.can_authenticate_by_email = lambda sociallogin, email: True  # per-provider setting
    assert adapter.authenticate_by_email(login) is None
    EmailAddress.objects.create(user=victim, email="victim@example.test", verified=True)
    assert adapter.authenticate_by_email(login) == (victim, "victim@example.test")


@pytest.mark.parametrize(
    ("mail", "upn", "expected"),
    [
        ("alice@contoso.example", "alice@contoso.example", "alice@contoso.example"),
        ("Alice.Smith@contoso.example", "asmith@contoso.example", "Alice.Smith@contoso.example"),
        ("ceo@victim.example", "mallory@evil.example", "mallory@evil.example"),
        (None, "bob@contoso.example", "bob@contoso.example"),
    ],
)
def test_microsoft_address_stays_in_the_tenants_verified_domain(mail, upn, expected):
    login = _sociallogin(None, "microsoft", "t", "r", [])
    login.account.extra_data = {"mail": mail, "userPrincipalName": upn}
    assert verified_address(login, MicrosoftProvider("microsoft", {"client_id": "c"})) == expected


def test_disconnecting_a_suspended_mailbox_writes_its_receipt(client, alice, connect):
    mailbox = connect("alice")
    ConsentReceipt.objects.create(
        user=alice,
        mailbox=mailbox,
        provider="demo",
        capability="send_mail",
        action="grant",
        explanation_version=1,
    )
    Mailbox.objects.filter(pk=mailbox.pk).update(status=Mailbox.Status.SUSPENDED)
    client.post(f"/mailboxes/{mailbox.pk}/disconnect/")
    assert ConsentReceipt.objects.filter(action="withdraw", mailbox=mailbox).count() == 1


def test_a_failed_sign_in_keeps_allauths_own_page(client, allauth_demo):
    started = client.post("/accounts/oidc/demo/login/")
    state = parse_qs(urlsplit(started["Location"]).query)["state"][0]
    response = client.get(
        "/accounts/oidc/demo/login/callback/", {"error": "access_denied", "state": state}
    )
    # allauth's own "login cancelled" page, not mailgov's consent page.
    assert response["Location"] == "/accounts/3rdparty/login/cancelled/"


def test_unknown_oidc_provider_callback_is_404(client, allauth_demo):
    assert client.get("/accounts/oidc/nope/login/callback/").status_code == 404


class SubclassedAdapter(MailgovSocialAccountAdapter):
    pass


def test_a_subclass_of_the_adapter_passes_the_check(settings):
    settings.SOCIALACCOUNT_ADAPTER = f"{__name__}.SubclassedAdapter"
    assert "mailgov.E031" not in [m.id for m in run_checks()]


def test_demo_sign_up_forms_are_closed(client):
    assert client.get("/accounts/signup/").status_code in (200, 302)
    page = client.get("/accounts/signup/", follow=True).content.decode()
    assert "Sign Up Closed" in page or "closed" in page.lower()


# -- from the mutation review: callback headers --
def test_every_callback_answer_is_neither_cached_nor_referred(client, allauth_demo):
    started = client.post("/accounts/oidc/demo/login/")
    state = parse_qs(urlsplit(started["Location"]).query)["state"][0]
    response = client.get(
        "/accounts/oidc/demo/login/callback/",
        {"error": "access_denied", "state": state, "code": "would-be-code"},
    )
    assert response["Location"] == "/accounts/3rdparty/login/cancelled/"  # allauth's answer
    assert "no-store" in response["Cache-Control"]
    assert response["Referrer-Policy"] == "no-referrer"


# -- from the mutation review: capture only signed in redirect flows --
@pytest.mark.parametrize(
    ("process", "signed_in"),
    [("login", True), ("connect", True), (None, True), ("redirect", False)],
    ids=["login", "connect", "no-process", "anonymous"],
)
def test_a_grant_is_captured_only_from_a_signed_in_redirect_flow(
    rf, site_user, settings, process, signed_in
):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid"}}
    request = rf.get("/")
    request.user = site_user("alice") if signed_in else AnonymousUser()
    request.session = {}
    login = _sociallogin(
        None,
        "google",
        "ya29.x",
        "1//x",
        ["openid", "email", "https://mail.google.com/"],
        email="alice@gmail.example",
    )
    if process is None:
        del login.state["process"]
    else:
        login.state["process"] = process
    with pytest.raises(ImmediateHttpResponse) as info:
        MailgovSocialAccountAdapter().pre_social_login(request, login)
    assert info.value.response["Location"] == "/mailboxes/not-connected/"
    assert login.token is None
    assert Mailbox.objects.count() == 0
    assert ConsentReceipt.objects.count() == 0


def test_the_consent_flow_is_started_as_a_redirect_not_a_connect(client, alice):
    location = start(client)["Location"]
    state_id = parse_qs(urlsplit(location).query)["state"][0]
    state, _, provider_id = client.session["socialaccount_states"][state_id]
    assert provider_id == "demo"
    assert state["process"] == "redirect"
    assert state["data"]["mailgov"]["capability"] == "send_mail"


# -- from the mutation review: rate limits per user and per ip --


def post_consent(client, ip):
    return client.post(CONSENT, {"version": str(SEND_MAIL.version)}, REMOTE_ADDR=ip)


def test_one_ip_is_limited_across_users(site_user, allauth_demo):
    clients = []
    for name in ("alice", "bob", "carol"):
        client = Client()
        client.force_login(site_user(name))
        clients.append(client)
    with override_settings(MAILGOV_CONSENT_RATE="2/m"):
        codes = [post_consent(client, "203.0.113.9").status_code for client in clients]
    assert codes == [302, 302, 429]


def test_one_user_is_limited_across_ips(client, site_user, allauth_demo):
    client.force_login(site_user("alice"))
    with override_settings(MAILGOV_CONSENT_RATE="2/m"):
        codes = [post_consent(client, f"203.0.113.{n}").status_code for n in (1, 2, 3)]
    assert codes == [302, 302, 429]


# -- from the mutation review: receipts and verified addresses --
MAIL = "https://mail.google.com/"


@pytest.fixture
def google(settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid"}}


def grant(rf, user, scopes, email="alice@gmail.example", verified=True):
    request = rf.get("/", REMOTE_ADDR="198.51.100.23", HTTP_USER_AGENT="Test/1.0")
    request.user = user
    login = _sociallogin(None, "google", "ya29.x", "1//x", scopes, email=email)
    login.email_addresses = [EmailAddress(email=email, verified=verified, primary=True)]
    login.state["data"]["mailgov"]["scopes"] = ["openid", "email", MAIL]
    return capture_grant(request, login, consent_in_state(login), SEND_MAIL)


@pytest.mark.parametrize(
    ("scopes", "action", "status"),
    [
        (["openid", "email", MAIL], "grant", Mailbox.Status.ACTIVE),
        (["openid", "email"], "partial", Mailbox.Status.NEEDS_RECONSENT),
    ],
    ids=["full", "partial"],
)
def test_the_receipt_says_what_was_granted(rf, site_user, google, scopes, action, status):
    mailbox = grant(rf, site_user("alice"), scopes)
    assert mailbox.status == status
    receipt = ConsentReceipt.objects.get()
    assert receipt.action == action
    assert receipt.mailbox == mailbox
    assert receipt.scopes_requested == ["openid", "email", MAIL]
    assert receipt.scopes_granted == sorted(scopes)
    assert (receipt.ip_address, receipt.user_agent) == ("198.51.100.0", "Test/1.0")


def test_an_unverified_address_is_never_bound(rf, site_user, google):
    login = _sociallogin(None, "google", "t", "r", [MAIL], email="ceo@victim.example")
    login.email_addresses = [EmailAddress(email="ceo@victim.example", verified=False, primary=True)]
    assert verified_address(login, GoogleProvider("google", {"client_id": "c"})) is None
    with pytest.raises(MailgovError, match="did not confirm"):
        grant(rf, site_user("alice"), [MAIL], email="ceo@victim.example", verified=False)
    assert Mailbox.objects.count() == 0
    assert ConsentReceipt.objects.count() == 0


def test_login_routes_that_are_not_mailgovs_are_error_e032(settings):
    settings.ROOT_URLCONF = "tests.urls_callbacks_only"
    clear_url_caches()
    try:
        assert "mailgov.E032" in [m.id for m in run_checks()]
    finally:
        clear_url_caches()


# -- the host's base template (MAILGOV_BASE_TEMPLATE) ----------------------------------


MAILGOV_PAGES = ["/mailboxes/", CONSENT, "/mailboxes/protection/"]


@pytest.mark.parametrize("path", MAILGOV_PAGES)
def test_pages_carry_the_hosts_header_and_sign_out(client, alice, path):
    # The demo names its own base template (templates/base.html).
    page = client.get(path).content.decode()
    assert '<a class="brand" href="/">mailgov demo</a>' in page
    assert 'action="/accounts/logout/"' in page and ">Sign out</button>" in page
    assert '<html lang="en">' in page and '<main id="content">' in page
    # mailgov's stylesheet comes with the page, for its own part only.
    assert 'href="/static/mailgov/mailgov.css"' in page
    assert '<div class="mailgov mg-page">' in page
    assert 'class="mg-header"' not in page
    with override_settings(MAILGOV_BASE_TEMPLATE="mailgov/base.html"):
        page = client.get(path).content.decode()
    assert 'class="mg-header"' in page and "mailgov demo" not in page
    assert page.count('href="/static/mailgov/mailgov.css"') == 1


def test_the_mailbox_page_has_a_title_of_its_own(client, alice):
    page = client.get("/mailboxes/").content.decode()
    assert "<title>Your mailboxes</title>" in page


def test_error_pages_use_the_hosts_base_too(client, alice):
    assert "mailgov demo" in client.get("/mailboxes/not-connected/").content.decode()


def test_allauths_sign_in_page_uses_the_demo_layout(client):
    page = client.get("/accounts/login/").content.decode()
    assert '<html lang="en">' in page and '<main id="content">' in page
    assert '<a class="brand" href="/">mailgov demo</a>' in page
    assert "Sign In" in page and "<title>" in page


def test_base_template_check():
    ids = [m.id for m in run_checks()]
    assert not {"mailgov.E023", "mailgov.E024"} & set(ids)
    with override_settings(MAILGOV_BASE_TEMPLATE="no/such/base.html"):
        [error] = [m for m in run_checks() if m.id.startswith("mailgov.E02")]
    assert error.id == "mailgov.E023" and "'no/such/base.html' does not exist" in error.msg
    with override_settings(MAILGOV_BASE_TEMPLATE=None):
        assert "mailgov.E023" in [m.id for m in run_checks()]
    # A template without the blocks: its pages would render empty.
    with override_settings(MAILGOV_BASE_TEMPLATE="mailgov/alerts.html"):
        [error] = [m for m in run_checks() if m.id == "mailgov.E024"]
    assert "'title', 'content'" in error.msg
    # Blocks defined further up the chain count (demo/home.html extends base.html).
    with override_settings(MAILGOV_BASE_TEMPLATE="demo/home.html"):
        assert "mailgov.E024" not in [m.id for m in run_checks()]
