"""/metrics: mailgov's counters after real sends and refreshes, its database
gauges, and no label that names a user or an address."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.mail import send_mail
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from mailgov.exceptions import ProviderUnavailableError
from mailgov.models import Incident, Mailbox, OutboxMessage
from mailgov.revocation import revoke_mailbox
from mailgov.tokens import get_access_token

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client) -> tuple[str, dict[tuple[str, frozenset], float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    text = response.content.decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_after_sends_refreshes_and_failures(client, connect, smtp, authserver, settings):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = connect("alice")
    _, before = scrape(client)

    assert send_mail("Hi", "Body", "alice@example.test", ["bob@example.test"]) == 1
    smtp.faults.data_reply = "550 5.4.5 Daily user sending limit exceeded."
    send_mail("Hi", "Body", "alice@example.test", ["bob@example.test"], fail_silently=True)
    smtp.faults.data_reply = None
    get_access_token(mailbox, force_refresh=True)
    with authserver.faults(token=503), pytest.raises(ProviderUnavailableError):
        get_access_token(mailbox, force_refresh=True)

    text, after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    sends = "mailgov_send_attempts_total"
    refreshes = "mailgov_token_refreshes_total"
    assert delta(sends, provider="demo", result="sent") == 1
    assert delta(sends, provider="demo", result="failed") == 1
    assert delta(refreshes, provider="demo", outcome="ok") == 1
    assert delta(refreshes, provider="demo", outcome="unavailable") == 1
    # No label, anywhere on the page, names the user or the mailbox.
    user = mailbox.owner
    for secret in {mailbox.address, "bob@example.test", user.username, user.email} - {""}:
        assert secret not in text
    assert str(mailbox.pk) not in text


def test_database_gauges(client, connect):
    alice = connect("alice")
    bob = connect("bob")
    Mailbox.objects.filter(pk=bob.pk).update(status=Mailbox.Status.NEEDS_RECONSENT)
    now = timezone.now()
    OutboxMessage.objects.create(
        mailbox=alice, message_id="<a@x>", created_at=now - timedelta(seconds=120)
    )
    OutboxMessage.objects.create(mailbox=alice, message_id="<b@x>", created_at=now)
    OutboxMessage.objects.create(mailbox=alice, message_id="<c@x>", state=OutboxMessage.State.SENT)

    _, samples = scrape(client)
    assert value(samples, "mailgov_metrics_database_up") == 1
    assert value(samples, "mailgov_mailboxes", status="active") == 1
    assert value(samples, "mailgov_mailboxes", status="needs_reconsent") == 1
    assert ("mailgov_mailboxes", frozenset({("status", "revoked")})) in samples
    assert value(samples, "mailgov_outbox_messages", state="queued") == 2
    assert value(samples, "mailgov_outbox_messages", state="sent") == 1
    assert value(samples, "mailgov_outbox_messages", state="failed") == 0
    assert 120 <= value(samples, "mailgov_outbox_oldest_queued_age_seconds") < 600
    assert value(samples, "mailgov_sending_frozen") == 0
    assert value(samples, "mailgov_revocations_pending") == 0

    Incident.objects.create(title="t", frozen_at=now)
    _, samples = scrape(client)
    assert value(samples, "mailgov_sending_frozen") == 1


def test_revocations_pending_counts_kept_refresh_tokens(client, connect, authserver):
    mailbox = connect("alice")
    # The provider is down: the grant cannot be revoked there, so the
    # refresh token is kept for the retry, and the gauge shows it.
    with authserver.faults(revoke=503):
        revoke_mailbox(mailbox, "test")
    _, samples = scrape(client)
    assert value(samples, "mailgov_revocations_pending") == 1
    assert value(samples, "mailgov_mailboxes", status="revoked") == 1


def test_multiprocess_mode_collects_the_database_once(client, connect, monkeypatch, tmp_path):
    """Under PROMETHEUS_MULTIPROC_DIR the scrape's registry reads the
    processes' files and adds the database gauges once."""
    connect("alice")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    text, samples = scrape(client)
    assert text.count("# TYPE mailgov_mailboxes gauge") == 1
    assert value(samples, "mailgov_mailboxes", status="active") == 1
