"""/metrics: mailgov's counters after real sends and refreshes, its database
gauges, and no label that names a user or an address."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.mail import send_mail
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from mailgov.exceptions import ProviderUnavailableError
from mailgov.models import Incident, Mailbox, OutboxMessage, PendingRevocation
from mailgov.revocation import (
    revoke_at_provider,
    revoke_deleted,
    revoke_mailbox,
)
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
    assert value(samples, "mailgov_revocations_pending", state="retrying") == 0
    assert value(samples, "mailgov_revocations_pending", state="given_up") == 0

    Incident.objects.create(title="t", frozen_at=now)
    _, samples = scrape(client)
    assert value(samples, "mailgov_sending_frozen") == 1


def test_revocations_pending_counts_kept_refresh_tokens(client, connect, authserver, settings):
    mailbox = connect("alice")
    # The provider is down: the grant cannot be revoked there, so the
    # refresh token is kept for the retry, and the gauge shows it.
    with authserver.faults(revoke=503):
        revoke_mailbox(mailbox, "test")
    _, samples = scrape(client)
    assert value(samples, "mailgov_revocations_pending", state="retrying") == 1
    assert value(samples, "mailgov_revocations_pending", state="given_up") == 0
    assert value(samples, "mailgov_mailboxes", status="revoked") == 1

    # A deleted mailbox's grant is kept for its revocation too.
    bob = connect("bob")
    bob_pk, bob_address = bob.pk, bob.address
    with authserver.faults(revoke=503):
        bob.delete()
    pending = PendingRevocation.objects.get(mailbox_id=bob_pk)
    _, samples = scrape(client)
    assert value(samples, "mailgov_revocations_pending", state="retrying") == 2

    # The last allowed attempts fail: given up, for an operator to act on (the
    # grants are still live at the provider), apart from those still retried.
    settings.MAILGOV_REVOCATION_MAX_ATTEMPTS = 1
    with authserver.faults(revoke=503):
        assert revoke_at_provider(mailbox.pk) == "gave_up"
    _, samples = scrape(client)
    assert value(samples, "mailgov_revocations_pending", state="retrying") == 1
    assert value(samples, "mailgov_revocations_pending", state="given_up") == 1
    with authserver.faults(revoke=503):
        assert revoke_deleted(pending.pk) == "gave_up"
    text, samples = scrape(client)
    assert value(samples, "mailgov_revocations_pending", state="retrying") == 0
    assert value(samples, "mailgov_revocations_pending", state="given_up") == 2
    assert mailbox.address not in text and bob_address not in text


def test_multiprocess_mode_collects_the_database_once(client, connect, monkeypatch, tmp_path):
    """Under PROMETHEUS_MULTIPROC_DIR the scrape's registry reads the
    processes' files and adds the database gauges once."""
    connect("alice")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    text, samples = scrape(client)
    assert text.count("# TYPE mailgov_mailboxes gauge") == 1
    assert value(samples, "mailgov_mailboxes", status="active") == 1


# -- /metrics protection (project.monitoring) ---------------------------------------------


def test_metrics_are_not_served_unprotected_in_production(client, settings):
    """DJANGO_DEBUG=0 (METRICS_OPEN off) with no token and no allowlist: 404,
    never the site's counters to whoever asks."""
    settings.METRICS_OPEN = False
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = []
    response = client.get("/metrics")
    assert response.status_code == 404
    assert b"mailgov_" not in response.content


def test_metrics_bearer_token(client, settings):
    settings.METRICS_OPEN = False
    settings.METRICS_TOKEN = "scrape-token-1"
    settings.METRICS_ALLOWED_NETWORKS = []
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics").headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-2")
    assert wrong.status_code == 401
    right = client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token-1")
    assert right.status_code == 200
    assert b"mailgov_metrics_database_up" in right.content
    # Even where the demo would be open, a configured token is required.
    settings.METRICS_OPEN = True
    assert client.get("/metrics").status_code == 401


def test_metrics_address_allowlist(client, settings):
    settings.METRICS_OPEN = False
    settings.METRICS_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ["10.1.0.0/16", "192.0.2.7"]
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.8").status_code == 403
    # A dual-stack listener ([::]) names an IPv4 peer as ::ffff:a.b.c.d.
    assert client.get("/metrics", REMOTE_ADDR="::ffff:10.1.2.3").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::ffff:192.0.2.8").status_code == 403
    # A forwarded header is no way in: the peer's own address counts.
    forged = client.get("/metrics", REMOTE_ADDR="198.51.100.1", HTTP_X_FORWARDED_FOR="10.1.2.3")
    assert forged.status_code == 403
    # Both set: both are required.
    settings.METRICS_TOKEN = "scrape-token-1"
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 401
    both = client.get(
        "/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer scrape-token-1"
    )
    assert both.status_code == 200
