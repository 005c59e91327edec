"""A mailbox is bound to the provider that issued its tokens (type, issuer, SMTP host).

The attack: re-declare an existing provider id as another provider (a Google
id as a generic OIDC provider with its own token endpoint and SMTP host), and
the stored tokens would be refreshed at, and sent to, the new endpoints.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.apps import apps
from django.core.checks import run_checks
from django.core.mail import send_mail
from django.core.management import CommandError, call_command
from django.db import connection

from mailgov.exceptions import MailboxUnavailableError, ProviderChangedError
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.providers import TokenResponse, get_provider
from mailgov.providers.oidc import clear_discovery_cache
from mailgov.services import connect_mailbox, retry_revocations, revoke_mailbox
from mailgov.tokens import get_access_token
from tests.conftest import provider_config, secrets_of
from tests.stubs import StubReply, token_endpoint_stub

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "mailgov.backends.smtp.EmailBackend"
GOOGLE = {"google": {"client_id": "c", "client_secret": "s"}}


@pytest.fixture
def google_mailbox(settings, site_user):
    settings.EMAIL_BACKEND = BACKEND
    settings.MAILGOV_PROVIDERS = dict(GOOGLE)
    return connect_mailbox(
        owner=site_user("alice"),
        provider_id="google",
        response=TokenResponse("ya29.google-access", "1//google-refresh", 3599, None),
        address="alice@gmail.example",
        requested_scopes=["https://mail.google.com/"],
    )


@pytest.fixture
def google_redeclared(settings, authserver, smtp_server, tls_files):
    """Provider id "google" re-declared as a working OIDC provider with its own SMTP host."""

    def redeclare():
        settings.MAILGOV_PROVIDERS = {
            "google": {
                **provider_config(authserver, smtp_server.port, tls_files),
                "send_scopes": ["https://mail.google.com/"],
            }
        }
        clear_discovery_cache()

    return redeclare


def test_a_mailbox_is_bound_at_connect_time(google_mailbox):
    assert google_mailbox.provider_binding == (
        "google|https://oauth2.googleapis.com/token|smtp.gmail.com"
    )
    assert Mailbox.objects.get().provider_binding == google_mailbox.provider_binding


def test_a_redeclared_provider_gets_neither_refresh_nor_token(
    leak_check, google_mailbox, google_redeclared, smtp
):
    google_redeclared()
    # An expired token would be refreshed at the new token endpoint ...
    MailboxCredentials.objects.filter(pk=google_mailbox.pk).update(expires_at=None)
    with token_endpoint_stub(StubReply(200, {"access_token": "x"})) as stub:
        with pytest.raises(ProviderChangedError, match="now configured as oidc") as caught:
            get_access_token(google_mailbox)
        assert stub.requests == []
    assert "mailgov_providers status" in str(caught.value)
    # ... and a send goes nowhere: refused before any I/O, never silenced.
    with pytest.raises(MailboxUnavailableError):
        send_mail("x", "x", "alice@gmail.example", ["z@x.test"], fail_silently=True)
    assert smtp.connections == 0
    assert secrets_of(google_mailbox) == ["ya29.google-access", "1//google-refresh"]
    leak_check(["ya29.google-access", "1//google-refresh"])


def test_a_still_valid_access_token_is_not_handed_out_either(google_mailbox, google_redeclared):
    google_redeclared()
    with pytest.raises(ProviderChangedError):
        get_access_token(google_mailbox)


def test_another_smtp_host_of_the_same_oidc_issuer_is_another_provider(settings, connect, smtp):
    settings.EMAIL_BACKEND = BACKEND
    mailbox = connect("alice")
    settings.MAILGOV_PROVIDERS["demo"]["smtp_port"] = smtp.port  # the same door: fine
    assert get_access_token(mailbox)
    settings.MAILGOV_PROVIDERS["demo"]["smtp_host"] = "mail.attacker.example"
    with pytest.raises(ProviderChangedError, match=r"SMTP at mail\.attacker\.example"):
        get_access_token(mailbox)
    with pytest.raises(ProviderChangedError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"])
    assert smtp.connections == 0


def test_the_check_counts_the_mailboxes_and_says_how_to_fix_it(
    google_mailbox, google_redeclared, site_user
):
    assert "mailgov.E013" not in [m.id for m in run_checks()]
    connect_mailbox(
        owner=site_user("bob"),
        provider_id="google",
        response=TokenResponse("ya29.b", "1//b", 3599, None),
        address="bob@gmail.example",
        requested_scopes=["https://mail.google.com/"],
    )
    google_redeclared()
    [error] = [m for m in run_checks() if m.id == "mailgov.E013"]
    assert "2 mailbox(es) of provider 'google'" in error.msg
    assert "google (tokens from https://oauth2.googleapis.com/token" in error.msg
    assert "now configured as oidc" in error.msg
    assert "mailgov_providers bind google" in error.hint
    assert "ya29" not in error.msg + error.hint


def test_an_unbound_mailbox_is_refused_and_reported(google_mailbox):
    Mailbox.objects.filter(pk=google_mailbox.pk).update(provider_binding="")
    google_mailbox.refresh_from_db()
    with pytest.raises(ProviderChangedError, match="no provider"):
        get_access_token(google_mailbox)
    [error] = [m for m in run_checks() if m.id == "mailgov.E014"]
    assert "1 mailbox(es) of provider 'google' are bound to no provider" in error.msg


def test_status_and_bind_commands(google_mailbox, google_redeclared, caplog):
    google_redeclared()
    out = io.StringIO()
    call_command("mailgov_providers", "status", stdout=out)
    assert "google: 1 mailbox(es) connected through google" in out.getvalue()
    assert "REFUSED" in out.getvalue() and "configured now as oidc" in out.getvalue()
    with pytest.raises(CommandError, match="--yes"):
        call_command("mailgov_providers", "bind", "google")
    assert Mailbox.objects.get().provider_binding.startswith("google|")
    caplog.set_level(logging.WARNING, logger="mailgov.security")
    out = io.StringIO()
    call_command("mailgov_providers", "bind", "google", "--yes", stdout=out)
    assert "1 mailbox(es) of 'google' bound." in out.getvalue()
    assert "rebound from google" in caplog.text
    google_mailbox.refresh_from_db()
    assert google_mailbox.provider_binding == get_provider("google").identity
    assert "mailgov.E013" not in [m.id for m in run_checks()]
    with pytest.raises(CommandError, match="not configured"):
        call_command("mailgov_providers", "bind", "nope", "--yes")


def test_reconnecting_binds_to_the_provider_of_the_new_grant(google_mailbox, google_redeclared):
    google_redeclared()
    connect_mailbox(
        owner=google_mailbox.owner,
        provider_id="google",
        response=TokenResponse("new-access", "new-refresh", 3599, None),
        address="alice@gmail.example",
        requested_scopes=["https://mail.google.com/"],
    )
    google_mailbox.refresh_from_db()
    assert google_mailbox.provider_binding == get_provider("google").identity
    assert get_access_token(google_mailbox) == "new-access"


def test_revoking_never_sends_the_refresh_token_to_another_provider(
    google_mailbox, settings, monkeypatch
):
    with token_endpoint_stub(StubReply(200, {})) as stub:
        # Another revocation endpoint under the same provider id: a moved
        # token endpoint is another issuer.
        monkeypatch.setattr(type(get_provider("google")), "token_endpoint", stub.url + "/token")
        monkeypatch.setattr(type(get_provider("google")), "revocation_endpoint", stub.url)
        assert revoke_mailbox(google_mailbox, "user: disconnected").at_provider is None
        assert retry_revocations() == {
            "revoked": 0,
            "pending": 1,
            "refused": 0,
            "no_endpoint": 0,
            "gave_up": 0,
        }
        assert stub.requests == []
    # Kept (encrypted) for the retry once the configuration is restored.
    assert MailboxCredentials.objects.get(pk=google_mailbox.pk).refresh_token == "1//google-refresh"
    assert Mailbox.objects.get().status == Mailbox.Status.REVOKED


def test_the_migration_binds_existing_mailboxes_to_the_configuration(google_mailbox, site_user):
    from importlib import import_module

    migration = import_module("mailgov.migrations.0003_provider_binding")
    Mailbox.objects.update(provider_binding="")
    orphan = Mailbox.objects.create(
        owner=site_user("carol"), provider="gone", address="c@x.test", status="revoked"
    )
    assert orphan.provider_binding == ""  # not configured: nothing to bind to
    migration.bind_existing(apps, SimpleNamespace(connection=connection))
    google_mailbox.refresh_from_db()
    orphan.refresh_from_db()
    assert google_mailbox.provider_binding == get_provider("google").identity
    assert orphan.provider_binding == ""


def test_a_reconnect_through_another_provider_keeps_none_of_the_old_tokens(
    google_mailbox, google_redeclared
):
    """A grant response without a refresh token keeps the stored one, as a
    rule; not when the stored one was issued by another provider."""
    google_redeclared()
    mailbox = connect_mailbox(
        owner=google_mailbox.owner,
        provider_id="google",
        response=TokenResponse("new-access", None, 3599, None),
        address="alice@gmail.example",
        requested_scopes=["https://mail.google.com/"],
    )
    assert secrets_of(mailbox) == ["new-access"]
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT  # no refresh token held


def test_an_oidc_provider_is_identified_by_the_discovery_document_it_fetches(settings, connect):
    mailbox = connect("alice")
    config = settings.MAILGOV_PROVIDERS["demo"]
    # Same server_url, but the endpoints would come from another document.
    config["discovery_url"] = "https://idp.attacker.example/.well-known/openid-configuration"
    with pytest.raises(ProviderChangedError, match=r"idp\.attacker\.example"):
        get_access_token(mailbox)


def test_the_row_decides_not_the_callers_copy(google_mailbox, google_redeclared):
    """A process holding an old copy of the mailbox (bound as it still is
    configured here) gets nothing once the row was bound elsewhere."""
    Mailbox.objects.filter(pk=google_mailbox.pk).update(provider_binding="oidc|x|y")
    with pytest.raises(ProviderChangedError):
        get_access_token(google_mailbox)


def test_checks_run_without_a_database():
    """A build step (collectstatic) with no database configured: the binding
    check must neither fail nor create a database."""
    code = (
        "import os; os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.settings'\n"
        "from tests import settings as s; s.DATABASES = {}\n"
        "import django; django.setup()\n"
        "from django.core.management import call_command; call_command('check')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no issues" in done.stdout
