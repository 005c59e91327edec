"""System checks. Ids are stable: a retired id stays here as a comment."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.db import connections

from mailgov.conf import mailgov_settings
from mailgov.crypto import configured_key_entries, parse_key_entries
from mailgov.exceptions import KeyringError, MailgovConfigurationError
from mailgov.providers import PINNED_KEYS, provider_type

#: One table of ids and texts.
KEYRING_IDS = {
    "missing": "mailgov.E001",
    "malformed": "mailgov.E002",
    "length": "mailgov.E003",
    "duplicate": "mailgov.E004",
    "unreadable": "mailgov.E005",
}
PROVIDER_INVALID = "mailgov.E010"
PROVIDER_PINNED = "mailgov.E011"
PROVIDER_NO_CLIENT = "mailgov.E012"
NUMBER_NOT_POSITIVE = "mailgov.E020"
SQLITE_NOT_IMMEDIATE = "mailgov.W001"

#: Settings that must be positive numbers (a None timeout would mean "wait forever").
POSITIVE_NUMBERS = (
    "TOKEN_REFRESH_MARGIN_SECONDS",
    "TOKEN_DEFAULT_LIFETIME_SECONDS",
    "HTTP_TIMEOUT_SECONDS",
    "SMTP_TIMEOUT_SECONDS",
    "DISCOVERY_CACHE_SECONDS",
    "ROTATION_BATCH_SIZE",
)


@checks.register(checks.Tags.security)
def check_encryption_keys(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The keyring must parse: without it mailgov neither encrypts nor decrypts."""
    try:
        parse_key_entries(configured_key_entries())
    except KeyringError as exc:
        return [
            checks.Error(
                str(exc),
                hint="Keys are 'key_id:base64key' with a 32-byte key; the first one encrypts. "
                "Generate one with 'manage.py mailgov_generate_key'.",
                id=KEYRING_IDS.get(exc.code, "mailgov.E002"),
            )
        ]
    return []


@checks.register()
def check_providers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    providers = mailgov_settings.PROVIDERS
    if not isinstance(providers, dict):
        return [checks.Error("MAILGOV_PROVIDERS must be a dict.", id=PROVIDER_INVALID)]
    for provider_id, config in providers.items():
        try:
            cls = provider_type(provider_id, config)
            cls(provider_id, config)
        except MailgovConfigurationError as exc:
            messages.append(checks.Error(str(exc), obj=provider_id, id=PROVIDER_INVALID))
            continue
        if cls.smtp_pinned and any(key in config for key in PINNED_KEYS):
            messages.append(
                checks.Error(
                    f"Provider {provider_id!r}: the SMTP endpoint of {cls.name} is pinned and "
                    "cannot be configured; a bearer token is never sent to another host.",
                    obj=provider_id,
                    id=PROVIDER_PINNED,
                )
            )
        if not config.get("client_id"):
            messages.append(
                checks.Error(
                    f"Provider {provider_id!r} has no client_id.",
                    obj=provider_id,
                    id=PROVIDER_NO_CLIENT,
                )
            )
    return messages


@checks.register()
def check_numbers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages = []
    for name in POSITIVE_NUMBERS:
        value = getattr(mailgov_settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            messages.append(
                checks.Error(
                    f"MAILGOV_{name} must be a positive number, not {value!r}.",
                    id=NUMBER_NOT_POSITIVE,
                )
            )
    return messages


@checks.register()
def check_sqlite_transaction_mode(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """On SQLite, single-flight refresh across processes needs IMMEDIATE transactions.

    Not tagged ``database``: it reads settings only, and ``manage.py check``
    and ``runserver`` skip database-tagged checks.
    """
    messages = []
    for alias in databases if databases is not None else connections:
        connection = connections[alias]
        if connection.vendor != "sqlite":
            continue
        mode = connection.settings_dict.get("OPTIONS", {}).get("transaction_mode")
        if str(mode).upper() != "IMMEDIATE":
            messages.append(
                checks.Warning(
                    f"Database {alias!r} is SQLite without transaction_mode 'IMMEDIATE': "
                    "select_for_update() is a no-op there, so two processes could refresh "
                    "the same token at once.",
                    hint="Set DATABASES[...]['OPTIONS']['transaction_mode'] = 'IMMEDIATE'.",
                    id=SQLITE_NOT_IMMEDIATE,
                )
            )
    return messages
