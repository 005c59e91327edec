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

from mailgov.conf import mailgov_settings
from mailgov.exceptions import MailgovConfigurationError
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


__all__ = [
    "PROVIDER_TYPES",
    "GoogleProvider",
    "MicrosoftProvider",
    "OIDCProvider",
    "Provider",
    "TokenResponse",
    "get_provider",
]
