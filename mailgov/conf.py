"""The one settings object.

Every setting is ``MAILGOV_<NAME>`` in Django settings, with its default in
:data:`DEFAULTS`. Values are read on each access, so ``override_settings`` works
and nothing is written into ``django.conf.settings``. An unknown name raises
``AttributeError`` instead of silently returning ``None``.

Validation lives in :mod:`mailgov.checks` (system checks with stable ids), not
here: importing this module never fails because of a bad setting.
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings as django_settings

PREFIX = "MAILGOV_"

DEFAULTS: dict[str, Any] = {
    # Ordered ``key_id:base64key`` entries; the first encrypts, all decrypt.
    # Also read from the environment variable of the same name (comma
    # separated) or from a file (one entry a line) named by ENCRYPTION_KEYS_FILE.
    "ENCRYPTION_KEYS": None,
    "ENCRYPTION_KEYS_FILE": None,
    # Refresh an access token this long before it expires.
    "TOKEN_REFRESH_MARGIN_SECONDS": 300,
    # Lifetime assumed when a token response has no usable ``expires_in``:
    # short, so a token of unknown life is refreshed soon rather than trusted.
    "TOKEN_DEFAULT_LIFETIME_SECONDS": 60,
    # Timeout of every HTTP call to a provider (token, revocation, discovery).
    "HTTP_TIMEOUT_SECONDS": 10.0,
    # Timeout of every SMTP connection.
    "SMTP_TIMEOUT_SECONDS": 30.0,
    # Send MAIL FROM, every RCPT TO and DATA in one flight when the server
    # offers PIPELINING (RFC 2920): two round trips a message instead of
    # three plus one per recipient. Off only for a server that advertises it
    # and mishandles it.
    "SMTP_PIPELINING": True,
    # How long a worker keeps a mailbox's authenticated SMTP connection open,
    # idle, for its next batch (0: close after each run). Kept connections
    # count against the provider's connection limit.
    "SMTP_IDLE_SECONDS": 5.0,
    # How long an OIDC discovery document is kept in memory.
    "DISCOVERY_CACHE_SECONDS": 3600,
    # Provider configuration: {provider_id: {...}}; see mailgov.providers.
    "PROVIDERS": {},
    # Rows re-encrypted per transaction by mailgov_rotate_keys.
    "ROTATION_BATCH_SIZE": 500,
    # django-ratelimit rates of the consent pages, each applied per user and
    # per IP address: starting a consent, the provider's callback, disconnect.
    "CONSENT_RATE": "10/m",
    # Telling an owner that a mailbox needs re-consent: the backend to send
    # with (None: EMAIL_BACKEND; with mailgov's backend, NOTIFICATION_FROM
    # must then be a connected system mailbox), the sender (None:
    # DEFAULT_FROM_EMAIL) and the site's address for links (None: relative).
    "NOTIFICATION_BACKEND": None,
    "NOTIFICATION_FROM": None,
    "SITE_URL": None,
    # Where users report a problem (shown on the protection page).
    "SECURITY_CONTACT": None,
    "CALLBACK_RATE": "20/m",
    "DISCONNECT_RATE": "10/m",
    # -- the outbox (mailgov.outbox, mailgov.backends.queued) -----------------
    # Messages claimed (and sent over one connection) per batch and mailbox.
    "OUTBOX_BATCH_SIZE": 50,
    # How long a claimed batch may stay ``sending`` before it counts as
    # interrupted (its worker died). Longer than a batch takes to send.
    "OUTBOX_LEASE_SECONDS": 300,
    # An interrupted message (its worker died after claiming it, perhaps after
    # the server accepted it): "retry" sends it again with the same
    # Message-ID (at least once), "hold" holds it for an operator.
    "OUTBOX_ON_INTERRUPTED": "retry",
    # Retries after a passing error: exponential backoff with jitter, from
    # BASE up to MAX seconds, and how many failed attempts before ``failed``.
    "OUTBOX_RETRY_BASE_SECONDS": 30,
    "OUTBOX_RETRY_MAX_SECONDS": 3600,
    "OUTBOX_MAX_ATTEMPTS": 10,
    # Bodies of failed or held messages are kept this long (to retry them).
    "OUTBOX_FAILED_RETENTION_DAYS": 7,
    # -- background work (mailgov.lifecycle, mailgov.tasks) --------------------
    # The proactive refresh renews access tokens expiring within this window,
    # of mailboxes used within DORMANT_DAYS, CONCURRENCY at a time.
    "REFRESH_AHEAD_SECONDS": 900,
    "REFRESH_CONCURRENCY": 8,
    # After refreshing failed on this many calendar days, the mailbox shows as
    # "refresh failing" and its owner is told (once; and once on recovery).
    "REFRESH_FAILING_DAYS": 3,
    # Grants unused this long are revoked; owners are warned this long before.
    "DORMANT_DAYS": 60,
    "DORMANT_WARNING_DAYS": 7,
    # Provider-side revocation: attempts (with backoff) before it is reported
    # and left for a manual retry (mailgov_retry_revocations).
    "REVOCATION_MAX_ATTEMPTS": 8,
    # Retention of send logs and outbox attempts, and of consent receipts of
    # grants that have ended (proof of consent outlives the grant).
    "SENDLOG_RETENTION_DAYS": 90,
    "RECEIPT_RETENTION_DAYS": 1095,
    # -- the governance portal (mailgov.governance, mailgov.admin) --------------
    # Selections up to this many rows are acted on in the request; larger
    # ones by a Celery worker, with progress shown in the admin.
    "ADMIN_INLINE_ROWS": 200,
    # The template the consent and mailbox pages extend: the host's base
    # template, whose header and sign-out they then carry. It must define
    # the blocks "title" and "content".
    "BASE_TEMPLATE": "mailgov/base.html",
    # -- metrics (mailgov.metrics) ----------------------------------------------
    # Each Celery worker serves its own Prometheus counters over HTTP on this
    # port (None: off), at this address: for workers whose metrics files are
    # not on the web processes' disk (another host, another container). Every
    # interface by default: the scraper is on another host (the port is the
    # opt-in; firewall it to the monitoring network).
    "WORKER_METRICS_PORT": None,
    "WORKER_METRICS_ADDRESS": "0.0.0.0",  # noqa: S104
}

#: Settings that may also come from the process environment.
ENVIRONMENT = ("ENCRYPTION_KEYS", "ENCRYPTION_KEYS_FILE")


class MailgovSettings:
    """Lazy accessor: ``mailgov_settings.HTTP_TIMEOUT_SECONDS``."""

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Invalid mailgov setting: {name}")
        full = PREFIX + name
        if hasattr(django_settings, full):
            value = getattr(django_settings, full)
            # None in settings leaves room for the environment.
            if value is not None or name not in ENVIRONMENT:
                return value
        if name in ENVIRONMENT and os.environ.get(full):
            return os.environ[full]
        return DEFAULTS[name]

    def __dir__(self) -> list[str]:
        return sorted(DEFAULTS)


mailgov_settings = MailgovSettings()
