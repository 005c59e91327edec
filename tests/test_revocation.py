"""Provider-side revocation as a retried, idempotent task, against the real
demo authorization server (its revocation endpoint made to answer 503)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import TestCase
from django.utils import timezone

from mailgov.models import Mailbox, MailboxCredentials
from mailgov.services import retry_revocations, revoke_at_provider, revoke_mailbox
from tests.conftest import assert_refresh_token_revoked, refresh_token_state, secrets_of

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(connect):
    return connect("alice")


def refresh_token_of(mailbox) -> str:
    return MailboxCredentials.objects.get(pk=mailbox.pk).refresh_token


def test_unreachable_provider_keeps_the_token_and_schedules_a_retry(alice, authserver, caplog):
    token = refresh_token_of(alice)
    before = timezone.now()
    with authserver.faults(revoke=503):
        result = revoke_mailbox(alice, "user: disconnected")
    assert result.at_provider is None  # pending
    row = Mailbox.objects.get(pk=alice.pk)
    assert row.status == Mailbox.Status.REVOKED  # here, at once
    assert refresh_token_of(alice) == token  # kept for the retry
    assert MailboxCredentials.objects.get(pk=alice.pk).access_token is None
    assert row.revocation_attempts == 1
    # Backoff with jitter from 60 s: between 30 and 60 s.
    assert before + timedelta(seconds=29) < row.revocation_retry_at < before + timedelta(seconds=61)
    assert refresh_token_state(authserver, token) == "live"
    # The sweep takes it only once its time has come; then it goes through.
    assert retry_revocations(due_only=True)["pending"] == 0
    assert refresh_token_of(alice) == token
    counts = retry_revocations(due_only=True, now=row.revocation_retry_at + timedelta(seconds=1))
    assert counts["revoked"] == 1
    assert_refresh_token_revoked(authserver, token)
    assert secrets_of(alice) == []
    row.refresh_from_db()
    assert row.revocation_retry_at is None and row.revocation_given_up_at is None


def test_after_the_last_attempt_it_is_reported_and_kept_for_a_manual_retry(
    alice, authserver, settings, caplog
):
    settings.MAILGOV_REVOCATION_MAX_ATTEMPTS = 2
    token = refresh_token_of(alice)
    caplog.set_level(logging.ERROR, logger="mailgov.security")
    with authserver.faults(revoke=503):
        revoke_mailbox(alice, "user: disconnected")
        later = timezone.now() + timedelta(hours=1)
        assert retry_revocations(due_only=True, now=later)["gave_up"] == 1
    row = Mailbox.objects.get(pk=alice.pk)
    assert row.revocation_given_up_at is not None and row.revocation_retry_at is None
    assert "failed 2 times" in caplog.text and "mailgov_retry_revocations" in caplog.text
    assert token not in caplog.text
    # The periodic sweep leaves it alone; the operator's command does not.
    assert retry_revocations(due_only=True, now=later + timedelta(days=1))["gave_up"] == 0
    assert refresh_token_of(alice) == token
    call_command("mailgov_retry_revocations")
    assert_refresh_token_revoked(authserver, token)
    row.refresh_from_db()
    assert row.revocation_given_up_at is None


def test_revocation_is_idempotent_and_an_invalid_token_counts_as_done(alice, authserver):
    token = refresh_token_of(alice)
    with authserver.faults(revoke=503):
        revoke_mailbox(alice, "user: disconnected")
    # Revoked at the provider by someone else meanwhile (RFC 7009: the
    # endpoint answers 200 for a token that is already invalid).
    from mailgov.providers import get_provider

    assert get_provider("demo").revoke(token) is True
    assert revoke_at_provider(alice.pk) == "revoked"
    assert revoke_at_provider(alice.pk) == "nothing"  # again: nothing left to do
    assert secrets_of(alice) == []


def test_deferred_revocation_queues_the_task_on_commit(alice, authserver):
    token = refresh_token_of(alice)
    with TestCase.captureOnCommitCallbacks(execute=False) as callbacks:
        result = revoke_mailbox(alice, "dormant: unused", defer=True)
    assert result.at_provider is None
    assert refresh_token_state(authserver, token) == "live"  # no call in the request
    assert len(callbacks) == 1  # the task, published once the revocation commits
    # What the task runs:
    assert revoke_at_provider(alice.pk) == "revoked"
    assert_refresh_token_revoked(authserver, token)


def test_a_token_endpoint_outage_is_not_a_revocation(alice, authserver):
    """503 from the revocation endpoint never wipes the token (that would
    orphan the grant at the provider)."""
    token = refresh_token_of(alice)
    with authserver.faults(revoke=503):
        revoke_mailbox(alice, "user: disconnected")
        assert revoke_at_provider(alice.pk) == "pending"
        assert revoke_at_provider(alice.pk) == "pending"
    assert Mailbox.objects.get(pk=alice.pk).revocation_attempts == 3
    assert refresh_token_of(alice) == token
    assert refresh_token_state(authserver, token) == "live"


def test_a_provider_removed_from_settings_still_revokes_here_at_once(alice, authserver, settings):
    token = refresh_token_of(alice)
    settings.MAILGOV_PROVIDERS = {}
    result = revoke_mailbox(alice, "admin: revoked")
    assert result.at_provider is None  # pending: nowhere to send it now
    row = Mailbox.objects.get(pk=alice.pk)
    assert row.status == Mailbox.Status.REVOKED
    assert MailboxCredentials.objects.get(pk=alice.pk).access_token is None
    assert refresh_token_of(alice) == token  # kept for when the provider is back
