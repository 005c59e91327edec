"""The exception tree. Nothing else lives here.

``MailgovError`` is the root of what can go wrong at run time. Subclasses also
inherit the standard type callers already catch (``ValueError``,
``PermissionDenied``, ``smtplib.SMTPException``). Configuration problems are a
separate branch, ``MailgovConfigurationError(ImproperlyConfigured)``, which is
deliberately *not* a ``MailgovError`` so that ``fail_silently`` never hides it.

No exception message ever contains a token, a code, a key or an XOAUTH2
string; where a row is concerned, the message names the row and the field.
"""

from __future__ import annotations

import smtplib

from django.core.exceptions import ImproperlyConfigured, PermissionDenied


class MailgovError(Exception):
    """Root of mailgov's run-time errors."""


class ProviderError(MailgovError):
    """An HTTP or JSON exchange with a provider failed.

    ``status`` is the HTTP status (``None`` for a network error or timeout),
    ``error`` the OAuth ``error`` code when the provider sent one.
    """

    #: Whether trying again later may succeed (network error, timeout, 5xx).
    retryable: bool = False

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error


class ProviderUnavailableError(ProviderError):
    """The provider could not be reached, timed out or answered 5xx: retry later."""

    retryable = True


class TokenRefreshError(ProviderError):
    """A refresh token could not be redeemed; the stored tokens are kept."""


class TokenRefreshUnavailableError(TokenRefreshError, ProviderUnavailableError):
    """Refresh failed for a passing reason (5xx, timeout); tokens kept, retry later."""


class GrantRevokedError(TokenRefreshError):
    """The grant is gone (``invalid_grant``): the mailbox needs re-consent."""


class ConsentRequiredError(MailgovError, PermissionDenied):
    """The mailbox lacks a scope the operation needs; its owner must consent again."""


class MailboxUnavailableError(MailgovError):
    """No usable mailbox: unknown sender, or a mailbox suspended, revoked or frozen."""


class ProviderChangedError(MailboxUnavailableError):
    """The mailbox's provider id is now configured as another provider (type,
    token endpoint or issuer, SMTP host) than the one it was connected
    through: its tokens are neither refreshed nor sent. ``provider_id`` names it."""

    def __init__(self, message: str, *, provider_id: str = ""):
        super().__init__(message)
        self.provider_id = provider_id


class SendingFrozenError(MailboxUnavailableError):
    """Sending is frozen for this mailbox by an open incident (the kill
    switch); nothing was sent. ``incident_id`` names the incident."""

    def __init__(self, message: str, *, incident_id: int | None = None):
        super().__init__(message)
        self.incident_id = incident_id


class MailboxContainedError(MailboxUnavailableError):
    """An incident's containment made this mailbox's tokens unusable; its
    grant is being revoked. ``incident_id`` names the incident."""

    def __init__(self, message: str, *, incident_id: int | None = None):
        super().__init__(message)
        self.incident_id = incident_id


class IncidentStateError(MailgovError, ValueError):
    """An incident step does not fit the incident's state (freezing a
    resolved incident, resolving one twice)."""


class GovernanceActionError(MailgovError, ValueError):
    """An unknown governance action, or one asked of the wrong kind of row."""


class UserLookupError(MailgovError, LookupError):
    """No user, or more than one, answers to an identifier given to a
    data-subject command; the message says which users and how to choose."""


class DecryptionError(MailgovError):
    """A stored value could not be decrypted. Names the row and field, never the value."""


class InvalidMessageError(MailgovError, ValueError):
    """A message cannot be sent as it is (header injection, bad address, too many
    recipients). Raised before any network I/O; nothing was sent."""


class SMTPSecurityError(MailgovError, smtplib.SMTPException):
    """The SMTP server did not offer what a safe login needs (STARTTLS, XOAUTH2)."""


class SMTPAuthenticationRejected(MailgovError, smtplib.SMTPAuthenticationError):
    """The SMTP server refused the XOAUTH2 login even after one forced refresh."""


class OutboxStateError(MailgovError, ValueError):
    """An outbox message is not in a state that allows what was asked (retry a
    sent message, cancel one being sent), or does not exist."""


class SendCancelled(MailgovError):
    """Raised by a pre-send receiver to stop a message."""


class MailgovConfigurationError(ImproperlyConfigured):
    """mailgov is configured wrongly (keys, providers). Never hidden by fail_silently."""


class KeyringError(MailgovConfigurationError):
    """The encryption keys are missing or malformed: nothing is encrypted or decrypted.

    ``code`` is one of ``missing``, ``malformed``, ``length``, ``duplicate``,
    ``unreadable`` (the system checks map it to a stable id).
    """

    def __init__(self, message: str, *, code: str = "malformed"):
        super().__init__(message)
        self.code = code
