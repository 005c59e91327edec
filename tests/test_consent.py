"""The consent pages without a browser: what starts a flow, with which scopes,
rate limits, error pages, notifications, and the integration's checks."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pytest
from allauth.socialaccount.models import SocialApp
from django.core import mail
from django.core.checks import run_checks
from django.test import Client, TestCase, override_settings

from mailgov.capabilities import SEND_MAIL, describe_scope
from mailgov.contrib.allauth.consent import truncated_ip
from mailgov.models import Mailbox
from mailgov.services import mark_needs_reconsent

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


def test_post_starts_the_flow_with_the_registry_scopes_only(client, alice, authserver):
    response = client.post(
        CONSENT + "?scope=admin&auth_params=prompt%3Dnone%26access_type%3Donline",
        {"scope": "admin", "auth_params": "x=y"},
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
    response = client.post(CONSENT)
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


def test_unknown_capability_or_provider_is_404(client, alice):
    assert client.get("/mailboxes/connect/read_mail/demo/").status_code == 404
    assert client.get("/mailboxes/connect/send_mail/yahoo/").status_code == 404


def test_consent_post_needs_csrf(alice):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post(CONSENT).status_code == 403


def test_rate_limit_gives_429_and_a_log_line(client, alice, caplog):
    caplog.set_level(logging.WARNING, logger="mailgov.security")
    with override_settings(MAILGOV_CONSENT_RATE="2/m"):
        statuses = [client.post(CONSENT).status_code for _ in range(4)]
    assert statuses[:2] == [302, 302]
    assert statuses[2:] == [429, 429]
    assert "rate limit hit on /mailboxes/connect/send_mail/demo/" in caplog.text


def test_callback_with_an_unknown_state_is_a_clear_page(client, alice, caplog):
    caplog.set_level(logging.WARNING, logger="mailgov.security")
    response = client.get(
        "/accounts/oidc/demo/login/callback/", {"code": "stolen-code", "state": "forged"}
    )
    assert response.status_code == 400
    assert "expired or was already used" in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    assert response["Referrer-Policy"] == "no-referrer"
    assert Mailbox.objects.count() == 0
    assert "stolen-code" not in caplog.text


def test_owner_told_once_with_a_banner(client, alice, connect, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    mailbox = connect("alice")
    mail.outbox.clear()
    with django_capture_on_commit():
        assert mark_needs_reconsent(mailbox, "invalid_grant")
        assert not mark_needs_reconsent(mailbox, "invalid_grant")  # once
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
