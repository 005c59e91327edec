"""Fixtures: the real peers (demo authorization server, SMTP server) and factories.

The peers start once per test session: the authorization server as its own
process with its own database, the SMTP server in a thread of this process
(so a test can flip its fault switches and read what it saw).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from django.core.cache import cache

from mailgov.crypto import reset_keyring
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.pkce import make_pkce_pair
from mailgov.providers import TokenResponse
from mailgov.providers.oidc import clear_discovery_cache
from mailgov.services import connect_mailbox, connect_mailbox_from_code
from mailgov.testing.ca import TLSFiles, ensure_tls_files
from mailgov.testing.latency import LatencyProxy
from mailgov.testing.oauth import authorize
from mailgov.testing.peers import AuthServer, free_port, start_authserver
from mailgov.testing.smtpserver import Faults, SubmissionServer

REDIRECT_URI = "http://127.0.0.1:8000/demo/oauth/callback/"

# The live server's address is fixed before the session starts, so that the
# demo authorization server can register its allauth callback as a redirect URI.
if not os.environ.get("DJANGO_LIVE_TEST_SERVER_ADDRESS"):
    os.environ["DJANGO_LIVE_TEST_SERVER_ADDRESS"] = f"127.0.0.1:{free_port()}"
LIVE_SERVER_URL = f"http://{os.environ['DJANGO_LIVE_TEST_SERVER_ADDRESS']}"
ALLAUTH_CALLBACK = f"{LIVE_SERVER_URL}/accounts/oidc/demo/login/callback/"
SEND_SCOPE = "mail.send"
SCOPES = ["openid", "email", "profile", SEND_SCOPE]


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Rate-limit counters live in the cache: each test starts with none."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _one_rate_limit_window(monkeypatch):
    """django-ratelimit counts in fixed windows whose edges fall at any
    second (a per-key offset): a test's few requests could straddle one and
    start a fresh count. Each test runs inside one window instead."""
    import django_ratelimit.core

    start = int(time.time())
    monkeypatch.setattr(django_ratelimit.core, "_get_window", lambda value, period: start + period)


@pytest.fixture(autouse=True)
def _fresh_keyring():
    reset_keyring()
    yield
    reset_keyring()


@pytest.fixture(autouse=True)
def _no_kept_connections():
    """SMTP connections a test's deliver() kept open end with the test: the
    next test's server, faults and mailboxes are its own."""
    yield
    from mailgov.delivery import POOL

    POOL.close_all()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TLSFiles:
    return ensure_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def authserver(tmp_path_factory) -> Iterator[AuthServer]:
    with start_authserver(
        tmp_path_factory.mktemp("authserver"), redirect_uris=[REDIRECT_URI, ALLAUTH_CALLBACK]
    ) as server:
        yield server


@pytest.fixture(scope="session")
def maildir(tmp_path_factory):
    """Where the SMTP server delivers, as the demo's does (its inbox page reads it)."""
    return tmp_path_factory.mktemp("maildir") / "inbox"


@pytest.fixture(scope="session")
def smtp_server(authserver, tls_files, maildir) -> Iterator[SubmissionServer]:
    server = SubmissionServer(
        maildir=maildir,
        tls=tls_files,
        introspection_url=authserver.metadata()["introspection_endpoint"],
        introspection_client=(authserver.smtp_client_id, authserver.smtp_client_secret),
        required_scope=SEND_SCOPE,
    )
    with server:
        yield server


@pytest.fixture
def smtp(smtp_server) -> Iterator[SubmissionServer]:
    """The SMTP server, emptied and with no fault switched on."""
    smtp_server.clear()
    smtp_server.faults = Faults()
    yield smtp_server
    smtp_server.faults = Faults()


@pytest.fixture
def proxy(smtp, settings, demo_provider) -> Iterator[LatencyProxy]:
    """The demo provider's SMTP traffic through a :class:`LatencyProxy` with
    no delay, which counts connections and round trips."""
    with LatencyProxy("127.0.0.1", smtp.port, delay=0) as running:
        settings.MAILGOV_PROVIDERS = {"demo": {**demo_provider, "smtp_port": running.port}}
        yield running


def provider_config(authserver: AuthServer, smtp_port: int, tls: TLSFiles) -> dict:
    """mailgov's ``demo`` provider, pointed at the running peers."""
    return {
        "type": "oidc",
        "name": "Demo identity provider",
        "server_url": authserver.url,
        "client_id": authserver.client_id,
        "client_secret": authserver.client_secret,
        "send_scopes": [SEND_SCOPE],
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "smtp_security": "starttls",
        "ca_bundle": str(tls.ca_cert),
    }


@pytest.fixture
def demo_provider(settings, authserver, smtp_server, tls_files) -> dict:
    """Point mailgov's ``demo`` provider at the running peers."""
    config = provider_config(authserver, smtp_server.port, tls_files)
    settings.MAILGOV_PROVIDERS = {"demo": config}
    clear_discovery_cache()
    return config


@pytest.fixture
def allauth_demo(settings, authserver, demo_provider) -> dict:
    """allauth's demo OpenID Connect app, pointed at the running authorization server."""
    app = {
        "provider_id": "demo",
        "name": "Demo identity provider",
        "client_id": authserver.client_id,
        "secret": authserver.client_secret,
        "settings": {
            "server_url": authserver.url,
            "oauth_pkce_enabled": True,
            "token_auth_method": "client_secret_post",
            "scope": ["openid", "email", "profile"],
        },
    }
    settings.SOCIALACCOUNT_PROVIDERS = {
        **settings.SOCIALACCOUNT_PROVIDERS,
        "openid_connect": {"OAUTH_PKCE_ENABLED": True, "APPS": [app]},
    }
    return app


@pytest.fixture
def site_user(django_user_model) -> Callable[[str], object]:
    def make(username: str = "alice"):
        user, _ = django_user_model.objects.get_or_create(
            username=username, defaults={"email": f"{username}@example.test"}
        )
        return user

    return make


def connect_through_flow(
    authserver: AuthServer, owner, username: str, scopes: list[str]
) -> Mailbox:
    """Sign ``username`` in at the authorization server, consent to ``scopes``
    with PKCE, and let mailgov redeem the code for ``owner``."""
    verifier, challenge = make_pkce_pair()
    result = authorize(
        authserver.url,
        client_id=authserver.client_id,
        redirect_uri=REDIRECT_URI,
        scopes=scopes,
        username=username,
        password=authserver.users[username].password,
        code_challenge=challenge,
        state=secrets.token_urlsafe(16),
    )
    assert result.code, result.error
    return connect_mailbox_from_code(
        owner=owner,
        provider_id="demo",
        code=result.code,
        code_verifier=verifier,
        redirect_uri=REDIRECT_URI,
        requested_scopes=scopes,
    )


@pytest.fixture
def connect(authserver, demo_provider, site_user) -> Callable[..., Mailbox]:
    """Connect a mailbox through the real authorization-code flow with PKCE.

    The demo authorization server signs the user in and records consent;
    mailgov redeems the code itself. No token is written by hand.
    """

    def make(username: str = "alice", scopes: list[str] | None = None) -> Mailbox:
        return connect_through_flow(authserver, site_user(username), username, scopes or SCOPES)

    return make


def refresh_token_state(authserver: AuthServer, token: str) -> str:
    """What the demo authorization server holds of refresh ``token``:
    ``"live"``, ``"revoked"`` or ``"unknown"``, read from its token table.

    Not by introspection: django-oauth-toolkit's introspection answers
    inactive for every refresh token, revoked or not.
    """
    # The server stores tokens only as SHA-256 checksums (RFC 9700 storage).
    checksum = hashlib.sha256(token.encode()).hexdigest()
    db = sqlite3.connect(authserver.data_dir / "db.sqlite3", timeout=30)
    try:
        row = db.execute(
            "SELECT revoked FROM oauth2_provider_refreshtoken WHERE token_checksum = ?",
            [checksum],
        ).fetchone()
    finally:
        db.close()
    if row is None:
        return "unknown"
    return "live" if row[0] is None else "revoked"


def refresh_grant_error(authserver: AuthServer, token: str) -> str | None:
    """Redeem refresh ``token`` at the token endpoint: the OAuth error code if
    it is refused (``invalid_grant`` for a revoked one), ``None`` if a new
    token was issued (which uses the grant up: call it only to prove death)."""
    answer = requests.post(
        authserver.metadata()["token_endpoint"],
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": authserver.client_id,
            "client_secret": authserver.client_secret,
        },
        timeout=10,
    )
    if answer.status_code == 200:
        return None
    return answer.json().get("error", f"HTTP {answer.status_code}")


def assert_refresh_token_revoked(authserver: AuthServer, token: str) -> None:
    """The server marked ``token`` revoked, and redeeming it is refused."""
    assert refresh_token_state(authserver, token) == "revoked"
    assert refresh_grant_error(authserver, token) == "invalid_grant"


def connect_google(owner, *, access: str = "ya29.a", refresh: str | None = "1//r") -> Mailbox:
    """``owner``'s Google mailbox from a token response (no network: Google's
    endpoints are stood in for where a test needs them). The caller configures
    the ``google`` provider."""
    scopes = ["https://mail.google.com/"]
    return connect_mailbox(
        owner=owner,
        provider_id="google",
        response=TokenResponse(access, refresh, 3599, scopes),
        address="alice@gmail.example",
        requested_scopes=scopes,
    )


def token_active(authserver: AuthServer, token: str) -> bool:
    """Whether the authorization server's introspection endpoint says ``token`` is active.

    For access tokens only: see :func:`refresh_token_state`.
    """
    answer = requests.post(
        authserver.metadata()["introspection_endpoint"],
        data={"token": token},
        auth=(authserver.smtp_client_id, authserver.smtp_client_secret),
        timeout=10,
    )
    answer.raise_for_status()
    return answer.json()["active"] is True


def secrets_of(mailbox: Mailbox) -> list[str]:
    """The token values currently stored for ``mailbox`` (for leak greps)."""
    credentials = MailboxCredentials.objects.get(pk=mailbox.pk)
    return [v for v in (credentials.access_token, credentials.refresh_token) if v]


@pytest.fixture
def leak_check(caplog, capsys) -> Callable[[list[str]], None]:
    """Collect every log record (DEBUG and up) of the setup and call phases and
    all output since this fixture was set up; ``check(values)`` greps them all.

    List it before the fixtures that handle tokens, so that what they log or
    print is captured too (capsys captures from its own set-up on)."""
    caplog.set_level(logging.DEBUG)
    formatter = logging.Formatter()

    def check(values: list[str]) -> None:
        captured = capsys.readouterr()
        records = [*caplog.get_records("setup"), *caplog.get_records("call")]
        text = "\n".join(
            [caplog.text, captured.out, captured.err]
            + [formatter.format(r) for r in records]
            + [str(r.args) for r in records]
            + [str(getattr(r, "exc_text", "") or "") for r in records]
        )
        for value in values:
            assert value and value not in text, "a secret reached the logs or output"

    return check


#: The groups of the data migration (mailgov/migrations/0006_governance_groups.py).
AUDITORS = "Mail auditors"
OFFICERS = "Mail security officers"


def staff_user(username: str, group: str | None = None, perms=(), **extra):
    """A staff user (password "pw") in ``group``, with extra ``perms``
    ("app_label.codename")."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group, Permission

    user = get_user_model().objects.create_user(
        username, f"{username}@staff.test", "pw", is_staff=True, **extra
    )
    if group:
        user.groups.add(Group.objects.get(name=group))
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def wait_until(condition: Callable[[], object], seconds: float = 5.0) -> bool:
    """Poll ``condition`` every 10 ms for up to ``seconds``; whether it came
    true (the server sees a close a moment after the client)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
