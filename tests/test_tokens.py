"""get_access_token(): refresh ahead of expiry, exactly once, and what failures do."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from auditlog.models import LogEntry
from django.conf import settings as django_settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.utils import timezone
from django.views.debug import ExceptionReporter

from mailgov.exceptions import (
    GrantRevokedError,
    MailboxUnavailableError,
    TokenRefreshError,
    TokenRefreshUnavailableError,
)
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.providers import GoogleProvider, MicrosoftProvider, TokenResponse
from mailgov.services import connect_mailbox
from mailgov.signals import mailbox_needs_reconsent, token_refreshed
from mailgov.tokens import get_access_token
from tests.conftest import secrets_of
from tests.stubs import StubReply, token_endpoint_stub

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


def refresh_tokens_issued(authserver, username: str) -> int:
    """Refresh tokens the demo server has ever issued to ``username``'s grants."""
    db = sqlite3.connect(authserver.data_dir / "db.sqlite3", timeout=30)
    try:
        return db.execute(
            "SELECT count(*) FROM oauth2_provider_refreshtoken r "
            "JOIN auth_user u ON u.id = r.user_id WHERE u.username = ?",
            [username],
        ).fetchone()[0]
    finally:
        db.close()


def expire(mailbox):
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )


# -- against the demo authorization server -----------------------------------------


def test_valid_token_is_returned_without_a_refresh(connect, authserver):
    mailbox = connect("alice")
    before = refresh_tokens_issued(authserver, "alice")
    assert get_access_token(mailbox) == secrets_of(mailbox)[0]
    assert refresh_tokens_issued(authserver, "alice") == before


def test_token_inside_the_margin_is_refreshed(connect, authserver, settings):
    mailbox = connect("alice")
    old = secrets_of(mailbox)[0]
    # The token has an hour; a margin of two hours makes it due now.
    settings.MAILGOV_TOKEN_REFRESH_MARGIN_SECONDS = 7200
    seen = []
    token_refreshed.connect(lambda **kw: seen.append(kw), weak=False, dispatch_uid="t")
    try:
        assert get_access_token(mailbox) != old
    finally:
        token_refreshed.disconnect(dispatch_uid="t")
    assert len(seen) == 1 and set(seen[0]) >= {"mailbox", "signal", "sender"}


def test_eight_threads_and_two_processes_sending_cause_one_refresh(
    connect, authserver, demo_provider, smtp, settings
):
    if connection.vendor == "sqlite" and ":memory:" in str(connection.settings_dict["NAME"]):
        pytest.fail("the single-flight test needs a file database")
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = connect("alice")
    expire(mailbox)
    before = refresh_tokens_issued(authserver, "alice")
    start_at = time.time() + 3.0
    env = {
        **os.environ,
        "MAILGOV_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "MAILGOV_TEST_KEYS": json.dumps(django_settings.MAILGOV_ENCRYPTION_KEYS),
        "MAILGOV_TEST_PROVIDERS": json.dumps({"demo": demo_provider}),
        "MAILGOV_TEST_MAILBOX": str(mailbox.pk),
        "MAILGOV_TEST_THREADS": "4",
        "MAILGOV_TEST_START_AT": str(start_at),
    }
    other = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.refresh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    results: list[str] = []

    def work():
        time.sleep(max(0.0, start_at - time.time()))
        try:
            send_mail("From process 1", "x", mailbox.address, ["z@x.test"])
            results.append(hashlib.sha256(get_access_token(mailbox).encode()).hexdigest())
        except Exception as exc:
            results.append(f"error:{type(exc).__name__}")
        finally:
            connection.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err[-2000:]
    results += json.loads(out.strip().splitlines()[-1])
    assert len(results) == 12
    assert not [r for r in results if r.startswith("error:")], results
    # Every message went out, everyone used the same new token, and the
    # authorization server saw exactly one refresh.
    assert len(smtp.messages) == 12
    assert len(set(results)) == 1
    assert refresh_tokens_issued(authserver, "alice") == before + 1
    assert hashlib.sha256(secrets_of(mailbox)[0].encode()).hexdigest() == results[0]


def test_not_active_mailbox_is_refused_before_any_refresh(connect, authserver):
    mailbox = connect("alice")
    expire(mailbox)
    Mailbox.objects.filter(pk=mailbox.pk).update(status=Mailbox.Status.SUSPENDED)
    before = refresh_tokens_issued(authserver, "alice")
    with pytest.raises(MailboxUnavailableError, match="suspended"):
        get_access_token(mailbox)
    assert refresh_tokens_issued(authserver, "alice") == before


# -- Google and Microsoft, from their documented responses ---------------------------

ACCESS = "ya29.a0-stored-access"
REFRESH = "1//0g-stored-refresh"


@pytest.fixture
def google_mailbox(settings, site_user, monkeypatch):
    def make(stub):
        monkeypatch.setattr(GoogleProvider, "token_endpoint", stub.url)
        settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid", "client_secret": "csecret"}}
        mailbox = connect_mailbox(
            owner=site_user("alice"),
            provider_id="google",
            response=TokenResponse(ACCESS, REFRESH, 3599, ["https://mail.google.com/", "openid"]),
            address="alice@gmail.example",
            requested_scopes=["https://mail.google.com/"],
        )
        expire(mailbox)
        return mailbox

    return make


def test_google_refresh_without_refresh_token_keeps_the_old_one(google_mailbox):
    documented = {
        "access_token": "ya29.a0-new-access",
        "expires_in": 3599,
        "scope": "https://mail.google.com/ openid",
        "token_type": "Bearer",
    }
    with token_endpoint_stub(StubReply(200, documented)) as stub:
        mailbox = google_mailbox(stub)
        assert get_access_token(mailbox) == "ya29.a0-new-access"
    assert secrets_of(mailbox) == ["ya29.a0-new-access", REFRESH]
    [request] = stub.requests
    assert request["grant_type"] == ["refresh_token"]
    assert request["refresh_token"] == [REFRESH]
    assert "scope" not in request
    credentials = MailboxCredentials.objects.get(pk=mailbox.pk)
    assert credentials.expires_at > timezone.now() + timedelta(seconds=3500)


def test_microsoft_refresh_asks_for_the_smtp_audience_and_saves_the_rotated_token(
    settings, site_user, monkeypatch
):
    documented = {
        "token_type": "Bearer",
        "scope": "https://outlook.office.com/SMTP.Send",
        "expires_in": 4503,
        "ext_expires_in": 4503,
        "access_token": "eyJ0eXAi-new",
        "refresh_token": "M.C105-rotated",
    }
    with token_endpoint_stub(StubReply(200, documented)) as stub:
        monkeypatch.setattr(MicrosoftProvider, "token_endpoint", stub.url)
        settings.MAILGOV_PROVIDERS = {"microsoft": {"client_id": "cid", "client_secret": "s"}}
        mailbox = connect_mailbox(
            owner=site_user("alice"),
            provider_id="microsoft",
            response=TokenResponse("eyJ-old", "M.C105-old", 3600, None),
            address="alice@contoso.example",
            requested_scopes=["https://outlook.office.com/SMTP.Send", "offline_access"],
        )
        expire(mailbox)
        assert get_access_token(mailbox) == "eyJ0eXAi-new"
    assert secrets_of(mailbox) == ["eyJ0eXAi-new", "M.C105-rotated"]
    assert stub.requests[0]["scope"] == ["https://outlook.office.com/SMTP.Send offline_access"]


def test_invalid_grant_falls_to_needs_reconsent_once(leak_check, google_mailbox):
    documented = {
        "error": "invalid_grant",
        "error_description": "Token has been expired or revoked.",
    }
    fired = []
    mailbox_needs_reconsent.connect(lambda **kw: fired.append(kw), weak=False, dispatch_uid="t")
    try:
        with token_endpoint_stub(StubReply(400, documented)) as stub:
            mailbox = google_mailbox(stub)
            with pytest.raises(GrantRevokedError) as info:
                get_access_token(mailbox)
            # No retry storm: the next call is refused locally.
            with pytest.raises(MailboxUnavailableError):
                get_access_token(mailbox)
            assert len(stub.requests) == 1
    finally:
        mailbox_needs_reconsent.disconnect(dispatch_uid="t")
    assert info.value.status == 400 and info.value.error == "invalid_grant"
    assert [f["reason"] for f in fired] == ["invalid_grant"]
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT
    assert mailbox.revocation_reason == "invalid_grant"
    assert secrets_of(mailbox) == []
    changes = [e.changes_dict for e in LogEntry.objects.get_for_object(mailbox)]
    assert any(c.get("status") == ["active", "needs_reconsent"] for c in changes)
    assert all(ACCESS not in json.dumps(c) and REFRESH not in json.dumps(c) for c in changes)
    leak_check([ACCESS, REFRESH])


@pytest.mark.parametrize(
    "reply",
    [
        StubReply(503, {"error": "backendError"}),
        StubReply(500, "<html>oops</html>"),
        StubReply(429, {"error": "rate_limit_exceeded"}),
        StubReply(200, {"access_token": "late"}, delay=2.0),
    ],
    ids=["503", "500", "429", "timeout"],
)
def test_passing_failures_keep_the_tokens(google_mailbox, settings, reply):
    settings.MAILGOV_HTTP_TIMEOUT_SECONDS = 0.5
    with token_endpoint_stub(reply) as stub:
        mailbox = google_mailbox(stub)
        with pytest.raises(TokenRefreshUnavailableError) as info:
            get_access_token(mailbox)
    assert info.value.retryable
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE
    assert secrets_of(mailbox) == [ACCESS, REFRESH]


def test_other_refusal_keeps_tokens_and_is_not_retryable(google_mailbox):
    with token_endpoint_stub(StubReply(401, {"error": "invalid_client"})) as stub:
        mailbox = google_mailbox(stub)
        with pytest.raises(TokenRefreshError) as info:
            get_access_token(mailbox)
    assert not info.value.retryable and info.value.error == "invalid_client"
    assert secrets_of(mailbox) == [ACCESS, REFRESH]
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE


@pytest.mark.parametrize("expires_in", [None, "soon", -5, 0, 10**12])
def test_missing_or_nonsense_expiry_is_short_lived(google_mailbox, expires_in):
    body = {"access_token": "ya29.new", "token_type": "Bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    with token_endpoint_stub(StubReply(200, body)) as stub:
        mailbox = google_mailbox(stub)
        get_access_token(mailbox)
    expires_at = MailboxCredentials.objects.get(pk=mailbox.pk).expires_at
    lifetime = (expires_at - timezone.now()).total_seconds()
    # The default lifetime for a token of unknown life is 60 seconds.
    assert 0 < lifetime <= 60


def test_no_access_token_in_a_200_is_an_error(google_mailbox):
    with token_endpoint_stub(StubReply(200, {"token_type": "Bearer"})) as stub:
        mailbox = google_mailbox(stub)
        with pytest.raises(TokenRefreshError, match="no access token"):
            get_access_token(mailbox)
    assert secrets_of(mailbox) == [ACCESS, REFRESH]


def test_a_suspended_mailbox_gets_no_token_even_if_one_is_stored(connect):
    mailbox = connect("alice")
    Mailbox.objects.filter(pk=mailbox.pk).update(status=Mailbox.Status.SUSPENDED)
    with pytest.raises(MailboxUnavailableError, match="suspended"):
        get_access_token(mailbox)


def test_inside_a_transaction_the_signal_waits_for_the_commit(google_mailbox):
    documented = {"error": "invalid_grant"}
    fired = []
    mailbox_needs_reconsent.connect(lambda **kw: fired.append(kw), weak=False, dispatch_uid="t")
    try:
        with token_endpoint_stub(StubReply(400, documented)) as stub:
            mailbox = google_mailbox(stub)
            with transaction.atomic():
                with pytest.raises(GrantRevokedError):
                    get_access_token(mailbox)
                assert fired == []  # not committed yet
            assert len(fired) == 1
            # Rolled back instead: no signal, and the mailbox is as it was.
            mailbox = google_mailbox(stub)  # connected again
            fired.clear()
            with pytest.raises(GrantRevokedError), transaction.atomic():
                get_access_token(mailbox)
            assert fired == []
            mailbox.refresh_from_db()
            assert mailbox.status == Mailbox.Status.ACTIVE
    finally:
        mailbox_needs_reconsent.disconnect(dispatch_uid="t")


# -- from the mutation review: rejected token reuse --
def test_a_token_refreshed_meanwhile_is_used_instead_of_refreshing_again(connect, authserver):
    mailbox = connect("alice")
    current = secrets_of(mailbox)[0]
    before = refresh_tokens_issued(authserver, "alice")
    # This worker was refused an older token; another has stored a new one since.
    token = get_access_token(mailbox, force_refresh=True, rejected_token="an-older-access-token")
    assert token == current
    assert refresh_tokens_issued(authserver, "alice") == before
    # Refused the current token itself: a real refresh, exactly one.
    token = get_access_token(mailbox, force_refresh=True, rejected_token=current)
    assert token != current
    assert refresh_tokens_issued(authserver, "alice") == before + 1


# -- from the mutation review: error reports hide tokens --
CLIENT_SECRET = "GOCSPX-" + secrets.token_hex(12)


def raised_by(call):
    """The exception ``call`` raises; caught here so no test frame is in its traceback."""
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("nothing was raised")


def report_of(exc: BaseException) -> str:
    """Django's error report (the debug page / AdminEmailHandler) with DEBUG off."""
    return ExceptionReporter(None, type(exc), exc, exc.__traceback__).get_traceback_html()


def test_a_failed_refresh_report_hides_the_refresh_token(monkeypatch):
    with token_endpoint_stub(StubReply(401, {"error": "invalid_client"})) as stub:
        monkeypatch.setattr(GoogleProvider, "token_endpoint", stub.url)
        provider = GoogleProvider("google", {"client_id": "c", "client_secret": CLIENT_SECRET})
        exc = raised_by(lambda: provider.refresh(REFRESH))
    assert isinstance(exc, TokenRefreshError)
    report = report_of(exc)
    assert "providers/base.py" in report  # the refresh frame is in the report
    assert REFRESH not in report
    assert CLIENT_SECRET not in report


def test_a_failed_forced_refresh_report_hides_the_refused_token(google_mailbox):
    with token_endpoint_stub(StubReply(401, {"error": "invalid_client"})) as stub:
        mailbox = google_mailbox(stub)
        exc = raised_by(
            lambda: get_access_token(mailbox, force_refresh=True, rejected_token=ACCESS)
        )
    assert isinstance(exc, TokenRefreshError)
    report = report_of(exc)
    assert ACCESS not in report and REFRESH not in report
