"""Providers: the registry, pinned SMTP endpoints, discovery, revocation, error mapping."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.mail import send_mail
from django.test import override_settings

from mailgov.checks import check_providers
from mailgov.exceptions import (
    GrantRevokedError,
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderError,
    ProviderUnavailableError,
    TokenRefreshError,
)
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.providers import (
    GoogleProvider,
    MicrosoftProvider,
    OIDCProvider,
    TokenResponse,
    get_provider,
)
from mailgov.providers.oidc import clear_discovery_cache
from mailgov.services import bind_mailboxes, connect_mailbox, suspend_mailbox
from tests.conftest import connect_google, secrets_of
from tests.stubs import StubReply, token_endpoint_stub


def test_registry_is_explicit():
    with override_settings(
        MAILGOV_PROVIDERS={"google": {"client_id": "c"}, "ms": {"type": "microsoft"}}
    ):
        assert isinstance(get_provider("google"), GoogleProvider)
        assert isinstance(get_provider("ms"), MicrosoftProvider)
        with pytest.raises(MailgovConfigurationError, match="not configured"):
            get_provider("yahoo")
    with (
        override_settings(MAILGOV_PROVIDERS={"x": {"type": "nope"}}),
        pytest.raises(MailgovConfigurationError, match="unknown type"),
    ):
        get_provider("x")


@pytest.mark.parametrize(
    ("cls", "host", "scopes"),
    [
        (GoogleProvider, "smtp.gmail.com", ("https://mail.google.com/",)),
        (MicrosoftProvider, "smtp.office365.com", ("https://outlook.office.com/SMTP.Send",)),
    ],
)
def test_smtp_host_is_pinned(cls, host, scopes):
    # Even a configuration that tries to move it cannot: the class decides.
    provider = cls("p", {"client_id": "c", "smtp_host": "evil.example", "smtp_port": 25})
    assert (provider.smtp_host, provider.smtp_port, provider.smtp_security) == (
        host,
        587,
        "starttls",
    )
    assert provider.ca_bundle is None
    assert provider.send_scopes == scopes


def test_microsoft_has_no_revocation_endpoint():
    provider = MicrosoftProvider("ms", {"client_id": "c"})
    assert provider.revoke("anything") is False
    assert provider.token_endpoint.endswith("/common/oauth2/v2.0/token")
    tenant = MicrosoftProvider("ms", {"client_id": "c", "tenant": "contoso.example"})
    assert "/contoso.example/" in tenant.token_endpoint


def test_token_response_repr_hides_tokens():
    response = TokenResponse("ya29.secret", "1//refresh", 3600, ["s"], "id.token.jwt")
    text = repr(response)
    assert "ya29.secret" not in text and "1//refresh" not in text and "id.token" not in text


def test_oidc_provider_reads_the_real_discovery_document(authserver, demo_provider, settings):
    provider = get_provider("demo")
    assert isinstance(provider, OIDCProvider)
    assert provider.token_endpoint == f"{authserver.url}/o/token/"
    assert provider.revocation_endpoint == f"{authserver.url}/o/revoke_token/"
    assert provider.introspection_endpoint == f"{authserver.url}/o/introspect/"
    assert provider.userinfo_endpoint


def test_oidc_discovery_unreachable(settings):
    clear_discovery_cache()
    settings.MAILGOV_HTTP_TIMEOUT_SECONDS = 1
    provider = OIDCProvider(
        "idp",
        {
            "server_url": "http://127.0.0.1:1",
            "client_id": "c",
            "send_scopes": ["s"],
            "smtp_host": "127.0.0.1",
        },
    )
    with pytest.raises(ProviderUnavailableError, match="discovery"):
        _ = provider.token_endpoint


def test_oidc_missing_configuration():
    with pytest.raises(MailgovConfigurationError, match="send_scopes"):
        OIDCProvider("idp", {"server_url": "https://x", "client_id": "c", "smtp_host": "h"})


@pytest.mark.django_db
def test_revocation_at_the_demo_server(connect, authserver):
    mailbox = connect("alice")
    _, refresh = secrets_of(mailbox)
    provider = get_provider("demo")
    assert provider.revoke(refresh) is True
    # RFC 7009: revoking an already-invalid token is a success too.
    assert provider.revoke(refresh) is True
    with pytest.raises(GrantRevokedError):
        provider.refresh(refresh)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (StubReply(503, {}), ProviderUnavailableError),
        (StubReply(400, {"error": "unsupported_token_type"}), ProviderError),
    ],
)
def test_revocation_failures(monkeypatch, reply, error):
    with token_endpoint_stub(reply) as stub:
        monkeypatch.setattr(GoogleProvider, "revocation_endpoint", stub.url)
        with pytest.raises(error):
            GoogleProvider("google", {"client_id": "c"}).revoke("token")
        assert stub.requests[0]["token"] == ["token"]


def test_error_messages_never_echo_the_response(monkeypatch):
    echoed = {"error": "invalid_grant", "error_description": "token 1//0g-secret is bad"}
    with token_endpoint_stub(StubReply(400, echoed)) as stub:
        monkeypatch.setattr(GoogleProvider, "token_endpoint", stub.url)
        with pytest.raises(GrantRevokedError) as info:
            GoogleProvider("google", {"client_id": "c"}).refresh("1//0g-secret")
    assert "1//0g-secret" not in str(info.value)
    assert info.value.error == "invalid_grant"


def test_code_exchange_sends_the_pkce_verifier(monkeypatch):
    body = {"access_token": "a", "refresh_token": "r", "expires_in": 3599, "scope": "s1 s2"}
    with token_endpoint_stub(StubReply(200, body)) as stub:
        monkeypatch.setattr(GoogleProvider, "token_endpoint", stub.url)
        response = GoogleProvider("google", {"client_id": "c", "client_secret": "s"}).exchange_code(
            "the-code", redirect_uri="https://app.example/cb", code_verifier="v" * 43
        )
    assert response.scopes == ["s1", "s2"] and response.expires_in == 3599
    [request] = stub.requests
    assert request["code_verifier"] == ["v" * 43]
    assert request["grant_type"] == ["authorization_code"]
    assert request["redirect_uri"] == ["https://app.example/cb"]


def test_missing_client_id_is_a_configuration_error():
    with pytest.raises(MailgovConfigurationError, match="client_id"):
        GoogleProvider("google", {}).refresh("r")


@pytest.mark.django_db
def test_an_address_is_active_for_one_account_only(site_user, settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "c"}}
    response = TokenResponse("a", "r", 3600, ["https://mail.google.com/"])
    kwargs = {
        "provider_id": "google",
        "response": response,
        "address": "shared@example.test",
        "requested_scopes": [],
    }
    connect_mailbox(owner=site_user("alice"), **kwargs)
    with pytest.raises(MailboxUnavailableError, match="another account"):
        connect_mailbox(owner=site_user("bob"), **kwargs)
    # The same owner reconnecting updates the one mailbox.
    again = connect_mailbox(owner=site_user("alice"), **kwargs)
    assert again.owner.mailgov_mailboxes.count() == 1


# -- from the mutation review: pinned endpoint keys --
MOVES = {
    "smtp_host": "evil.example",
    "smtp_port": 25,
    "smtp_security": "ssl",
    "ca_bundle": "/etc/evil/ca.pem",
}


@pytest.mark.parametrize("cls", [GoogleProvider, MicrosoftProvider])
def test_no_configuration_moves_a_pinned_endpoint(cls):
    provider = cls("p", {"client_id": "c", **MOVES})
    assert (provider.smtp_host, provider.smtp_port, provider.smtp_security) == (
        cls.smtp_host,
        587,
        "starttls",
    )
    assert provider.ca_bundle is None
    assert provider.http_verify is True  # the system trust store, nothing else


@pytest.mark.parametrize("provider_id", ["google", "microsoft"])
@pytest.mark.parametrize("key", sorted(MOVES))
def test_every_pinned_key_is_error_e011(provider_id, key):
    with override_settings(MAILGOV_PROVIDERS={provider_id: {"client_id": "c", key: MOVES[key]}}):
        ids = [message.id for message in check_providers()]
    assert "mailgov.E011" in ids


# -- from the mutation review: redirects and bad urls --
@contextmanager
def redirecting_endpoint(location: str, status: int = 307) -> Iterator[str]:
    """An endpoint that answers every POST with a redirect to ``location``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_never_takes_the_refresh_token_elsewhere(monkeypatch, status):
    elsewhere = StubReply(200, {"access_token": "ya29.from-elsewhere", "expires_in": 3599})
    with token_endpoint_stub(elsewhere) as other, redirecting_endpoint(other.url, status) as url:
        monkeypatch.setattr(GoogleProvider, "token_endpoint", url)
        monkeypatch.setattr(GoogleProvider, "revocation_endpoint", url)
        provider = GoogleProvider("google", {"client_id": "c", "client_secret": "s"})
        with pytest.raises(TokenRefreshError, match=f"HTTP {status}"):
            provider.refresh("1//0g-refresh")
        with pytest.raises(ProviderError, match=f"HTTP {status}"):
            provider.revoke("1//0g-refresh")
        assert other.requests == []  # neither the token nor the client secret went there


@pytest.mark.parametrize(
    "endpoint", ["oauth2.googleapis.com/token", "https://[::1/token", "https://"]
)
@pytest.mark.django_db(transaction=True)
def test_a_malformed_token_endpoint_is_never_silenced(settings, site_user, monkeypatch, endpoint):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "c", "client_secret": "s"}}
    mailbox = connect_google(site_user("alice"))
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
    monkeypatch.setattr(GoogleProvider, "token_endpoint", endpoint)
    # Another token endpoint is another provider identity: bound on purpose,
    # so that the URL itself is what refuses.
    bind_mailboxes("google")
    with pytest.raises(MailgovConfigurationError, match="URL is not valid"):
        send_mail("x", "x", "alice@gmail.example", ["z@x.test"], fail_silently=True)
    assert secrets_of(mailbox) == ["ya29.a", "1//r"]


# -- from the mutation review: connect mailbox statuses --
MAIL = ["https://mail.google.com/"]


@pytest.fixture
def google(settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "c"}}


def test_a_suspended_mailbox_stays_suspended_through_a_new_consent(site_user, google):
    mailbox = connect_google(site_user("alice"))
    assert suspend_mailbox(mailbox, "smtp_auth_disabled: by the tenant")
    again = connect_google(site_user("alice"))
    assert again.pk == mailbox.pk
    assert again.status == Mailbox.Status.SUSPENDED
    assert again.revocation_reason.startswith("smtp_auth_disabled")


def test_a_grant_without_a_refresh_token_is_not_active(site_user, google):
    mailbox = connect_google(site_user("alice"), refresh=None)
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT
    assert mailbox.revocation_reason.startswith("no_refresh_token")


def test_an_address_the_provider_says_is_unverified_is_refused(connect, monkeypatch):
    monkeypatch.setattr(
        OIDCProvider,
        "userinfo",
        lambda self, token: {"email": "alice@example.test", "email_verified": False},
    )
    with pytest.raises(ProviderError, match="no verified email"):
        connect("alice")
    assert Mailbox.objects.count() == 0
