"""The provider registry: explicit, no import magic.

``MAILGOV_PROVIDERS`` maps a provider id to its configuration; the ``type``
key (default: the id itself) picks a class from :data:`PROVIDER_TYPES`::

    MAILGOV_PROVIDERS = {
        "google": {"client_id": "...", "client_secret": "..."},
        "microsoft": {"client_id": "...", "client_secret": "...", "tenant": "common"},
        "demo": {"type": "oidc", "server_url": "http://127.0.0.1:8001", ...},
    }
"""

from __future__ import annotations

from typing import Any

from mailgov.conf import mailgov_settings
from mailgov.exceptions import MailgovConfigurationError, ProviderChangedError
from mailgov.providers.base import Provider, TokenResponse
from mailgov.providers.google import GoogleProvider
from mailgov.providers.microsoft import MicrosoftProvider
from mailgov.providers.oidc import OIDCProvider

PROVIDER_TYPES: dict[str, type[Provider]] = {
    GoogleProvider.type: GoogleProvider,
    MicrosoftProvider.type: MicrosoftProvider,
    OIDCProvider.type: OIDCProvider,
}

#: Keys that would move a pinned provider's SMTP endpoint; refused by a check.
PINNED_KEYS = ("smtp_host", "smtp_port", "smtp_security", "ca_bundle")


def provider_type(provider_id: str, config: dict) -> type[Provider]:
    type_name = config.get("type", provider_id)
    try:
        return PROVIDER_TYPES[type_name]
    except KeyError:
        raise MailgovConfigurationError(
            f"Provider {provider_id!r} has unknown type {type_name!r}; "
            f"known types: {', '.join(sorted(PROVIDER_TYPES))}."
        ) from None


def get_provider(provider_id: str) -> Provider:
    """The configured provider ``provider_id``.

    Raises :class:`MailgovConfigurationError` when it is not configured.
    """
    config = mailgov_settings.PROVIDERS.get(provider_id)
    if config is None:
        raise MailgovConfigurationError(
            f"Provider {provider_id!r} is not configured in MAILGOV_PROVIDERS."
        )
    return provider_type(provider_id, config)(provider_id, config)


def describe_identity(identity: str) -> str:
    """A provider identity in words, for errors and checks."""
    kind, _, rest = identity.partition("|")
    issuer, _, smtp_host = rest.partition("|")
    if not kind:
        return "no provider (never bound)"
    return f"{kind} (tokens from {issuer}, SMTP at {smtp_host})"


def get_mailbox_provider(mailbox: Any) -> Provider:
    """The provider ``mailbox`` may use: the configured one, if it is still
    the provider the mailbox was connected through.

    Raises :class:`ProviderChangedError` when the configuration of the
    mailbox's provider id no longer gives the identity the mailbox was bound
    to at connect time (another type, token endpoint or issuer, or SMTP
    host): its tokens are then neither refreshed nor sent anywhere.
    :class:`MailgovConfigurationError` when the provider is not configured.
    """
    provider = get_provider(mailbox.provider)
    if mailbox.provider_binding != provider.identity:
        raise ProviderChangedError(
            f"Mailbox {mailbox.pk} was connected through "
            f"{describe_identity(mailbox.provider_binding)}, but provider "
            f"{mailbox.provider!r} is now configured as {describe_identity(provider.identity)}. "
            "Its tokens are not sent to the new configuration. Restore the provider's "
            "configuration, or see 'manage.py mailgov_providers status'.",
            provider_id=mailbox.provider,
        )
    return provider


__all__ = [
    "PROVIDER_TYPES",
    "GoogleProvider",
    "MicrosoftProvider",
    "OIDCProvider",
    "Provider",
    "TokenResponse",
    "describe_identity",
    "get_mailbox_provider",
    "get_provider",
]
