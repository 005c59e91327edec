"""What happens to an outbox message after an attempt: the outcome table.

:func:`classify` maps what an attempt raised to a :class:`Verdict`: a 4xx
reply, a dropped connection or a token endpoint that is down is retried later
(:func:`backoff`: exponential, capped, with jitter); a 5xx reply fails the
message with its reply code; a provider's throttling reply
(:mod:`mailgov.throttling`) pauses the whole mailbox and keeps its messages; a
mailbox that needs re-consent, is suspended or revoked holds them.
"""

from __future__ import annotations

import random
import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime, timedelta

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    ConsentRequiredError,
    DecryptionError,
    GrantRevokedError,
    MailboxContainedError,
    MailboxUnavailableError,
    MailgovConfigurationError,
    ProviderChangedError,
    ProviderUnavailableError,
    SendCancelled,
    SendingFrozenError,
    SMTPAuthenticationRejected,
    SMTPSecurityError,
    TokenRefreshError,
)
from mailgov.models import Mailbox, OutboxAttempt
from mailgov.throttling import classify_reply

Outcome = OutboxAttempt.Outcome

__all__ = ["AUTO_RELEASE_CODES", "MAILBOX_HOLD_CODES", "Verdict", "backoff", "classify"]


@dataclass
class Verdict:
    """What to do with a message after an attempt."""

    outcome: str  # an OutboxAttempt.Outcome
    error_code: str = ""
    reply_code: int | None = None
    # Throttling: pause the mailbox until then (and defer what is left).
    pause_until: datetime | None = None
    held_reason: str = ""


#: Mailbox states that hold its messages, with the code a held row carries.
#: A held row with one of AUTO_RELEASE_CODES is released when its mailbox
#: is active again (the owner reconnected; an administrator resumed it); the
#: others (provider reconfigured, interrupted, security) wait for an operator.
MAILBOX_HOLD_CODES = {
    Mailbox.Status.NEEDS_RECONSENT: "mailbox_needs_reconsent",
    Mailbox.Status.SUSPENDED: "mailbox_suspended",
    Mailbox.Status.REVOKED: "mailbox_revoked",
}
AUTO_RELEASE_CODES = frozenset(
    [
        *MAILBOX_HOLD_CODES.values(),
        "mailbox_unavailable",
        "smtp_auth_rejected",
    ]
)


def backoff(
    failures: int, now: datetime, *, base: float | None = None, cap: float | None = None
) -> datetime:
    """When to try again after ``failures`` failed attempts: exponential, capped,
    with jitter (half to all of the step) so that retries of many messages do
    not arrive together. ``base``/``cap`` default to the outbox's settings."""
    if base is None:
        base = float(mailgov_settings.OUTBOX_RETRY_BASE_SECONDS)
    if cap is None:
        cap = float(mailgov_settings.OUTBOX_RETRY_MAX_SECONDS)
    step = min(cap, base * (2 ** max(0, failures - 1)))
    return now + timedelta(seconds=step * random.uniform(0.5, 1.0))


#: Errors that hold a message until the mailbox works again, with their codes.
HOLD_ERRORS = (
    (SMTPAuthenticationRejected, "smtp_auth_rejected"),
    (GrantRevokedError, "mailbox_needs_reconsent"),
    (ConsentRequiredError, "scope_missing"),
    (ProviderChangedError, "provider_changed"),
    (SendingFrozenError, "frozen"),
    (MailboxContainedError, "contained"),
    (MailboxUnavailableError, "mailbox_unavailable"),
)


def _reply(exc: smtplib.SMTPResponseException) -> tuple[int, bytes | str]:
    return exc.smtp_code, exc.smtp_error


def classify(exc: BaseException, provider_type: str, now: datetime) -> Verdict:
    """The verdict for a message whose attempt raised ``exc``."""
    if isinstance(exc, SendCancelled):
        return Verdict(Outcome.CANCELLED, "cancelled_by_receiver")
    if isinstance(exc, DecryptionError):
        return Verdict(Outcome.FAILED, "decryption_failed")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        for code, text in exc.recipients.values():
            throttle = classify_reply(provider_type, code, text)
            if throttle is not None:
                until = now + timedelta(seconds=throttle.pause_seconds)
                return Verdict(Outcome.DEFERRED, throttle.code, code, pause_until=until)
        codes = [code for code, _ in exc.recipients.values()]
        if any(400 <= code < 500 for code in codes):
            return Verdict(Outcome.RETRY, "recipients_deferred", min(codes))
        return Verdict(
            Outcome.FAILED, f"smtp_{codes[0] if codes else 550}", codes[0] if codes else None
        )
    for kind, code in HOLD_ERRORS:
        if isinstance(exc, kind):
            return Verdict(Outcome.HELD, code, held_reason=code)
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLCertVerificationError):
        # A TLS connection broken or reset (EOF in the handshake, a load
        # balancer dropping it): the network's trouble, not a security one.
        return Verdict(Outcome.RETRY, "tls_error")
    if isinstance(exc, SMTPSecurityError | ssl.SSLError | MailgovConfigurationError):
        # Configuration or security: an operator must look; nothing is lost.
        code = (
            "smtp_security" if not isinstance(exc, MailgovConfigurationError) else "configuration"
        )
        return Verdict(Outcome.HELD, code, held_reason=f"{code}: {type(exc).__name__}")
    if isinstance(exc, smtplib.SMTPResponseException):
        code, text = _reply(exc)
        throttle = classify_reply(provider_type, code, text)
        if throttle is not None:
            until = now + timedelta(seconds=throttle.pause_seconds)
            return Verdict(Outcome.DEFERRED, throttle.code, code, pause_until=until)
        if 400 <= code < 500:
            return Verdict(Outcome.RETRY, f"smtp_{code}", code)
        return Verdict(Outcome.FAILED, f"smtp_{code}", code)
    if isinstance(exc, smtplib.SMTPServerDisconnected | OSError):
        return Verdict(Outcome.RETRY, "connection_lost")
    if isinstance(exc, ProviderUnavailableError):
        return Verdict(Outcome.RETRY, "provider_unavailable")
    if isinstance(exc, TokenRefreshError):
        return Verdict(Outcome.HELD, "token_refresh_refused", held_reason="token_refresh_refused")
    if isinstance(exc, smtplib.SMTPException):
        return Verdict(Outcome.RETRY, "smtp_error")
    return Verdict(Outcome.RETRY, f"error_{type(exc).__name__}"[:64])
