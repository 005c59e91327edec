"""System checks. Ids are stable: a retired id stays here as a comment."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from django.apps import apps
from django.core import checks
from django.db import DatabaseError, connections, router
from django.template import TemplateDoesNotExist, TemplateSyntaxError
from django.template.loader import get_template
from django.template.loader_tags import BlockNode, ExtendsNode

from mailgov.conf import mailgov_settings
from mailgov.crypto import configured_key_entries, parse_key_entries
from mailgov.exceptions import KeyringError, MailgovConfigurationError
from mailgov.models import Mailbox
from mailgov.providers import PINNED_KEYS, describe_identity, provider_type
from mailgov.services import provider_bindings
from mailgov.throttling import quota_for

logger = logging.getLogger("mailgov")
DUMMY_ENGINE = "django.db.backends.dummy"

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
PROVIDER_CHANGED = "mailgov.E013"
PROVIDER_UNBOUND = "mailgov.E014"
PROVIDER_QUOTA = "mailgov.E015"
NUMBER_NOT_POSITIVE = "mailgov.E020"
OUTBOX_POLICY = "mailgov.E021"
DORMANT_WARNING_TOO_LONG = "mailgov.E022"
BASE_TEMPLATE_MISSING = "mailgov.E023"
BASE_TEMPLATE_BLOCKS = "mailgov.E024"
NUMBER_NEGATIVE = "mailgov.E025"
WORKER_METRICS_PORT_INVALID = "mailgov.E026"
WORKER_METRICS_ADDRESS_INVALID = "mailgov.E027"
SQLITE_NOT_IMMEDIATE = "mailgov.W001"

#: Settings that must be positive numbers (a None timeout would mean "wait forever").
POSITIVE_NUMBERS = (
    "TOKEN_REFRESH_MARGIN_SECONDS",
    "TOKEN_DEFAULT_LIFETIME_SECONDS",
    "HTTP_TIMEOUT_SECONDS",
    "SMTP_TIMEOUT_SECONDS",
    "DISCOVERY_CACHE_SECONDS",
    "ROTATION_BATCH_SIZE",
    "OUTBOX_BATCH_SIZE",
    "OUTBOX_LEASE_SECONDS",
    "OUTBOX_RETRY_BASE_SECONDS",
    "OUTBOX_RETRY_MAX_SECONDS",
    "OUTBOX_MAX_ATTEMPTS",
    "OUTBOX_FAILED_RETENTION_DAYS",
    "REFRESH_AHEAD_SECONDS",
    "REFRESH_CONCURRENCY",
    "REFRESH_FAILING_DAYS",
    "DORMANT_DAYS",
    "DORMANT_WARNING_DAYS",
    "REVOCATION_MAX_ATTEMPTS",
    "SENDLOG_RETENTION_DAYS",
    "RECEIPT_RETENTION_DAYS",
)
#: Settings that must be numbers >= 0 (0 turns the feature off).
NON_NEGATIVE_NUMBERS = ("SMTP_IDLE_SECONDS",)


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
            provider = cls(provider_id, config)
        except MailgovConfigurationError as exc:
            messages.append(checks.Error(str(exc), obj=provider_id, id=PROVIDER_INVALID))
            continue
        try:
            quota_for(provider)
        except MailgovConfigurationError as exc:
            messages.append(checks.Error(str(exc), obj=provider_id, id=PROVIDER_QUOTA))
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
    for name in NON_NEGATIVE_NUMBERS:
        value = getattr(mailgov_settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            messages.append(
                checks.Error(
                    f"MAILGOV_{name} must be a number, 0 or more, not {value!r}.",
                    id=NUMBER_NEGATIVE,
                )
            )
    return messages


@checks.register()
def check_worker_metrics(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILGOV_WORKER_METRICS_PORT`` is off (``None``) or a TCP port, and its
    address an IP address (or empty: every address). A bad value would only
    show in a worker's log, as metrics that never arrive."""
    messages = []
    port = mailgov_settings.WORKER_METRICS_PORT
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        messages.append(
            checks.Error(
                f"MAILGOV_WORKER_METRICS_PORT must be None (off) or a port number "
                f"(1-65535), not {port!r}.",
                id=WORKER_METRICS_PORT_INVALID,
            )
        )
    address = mailgov_settings.WORKER_METRICS_ADDRESS
    try:
        if not isinstance(address, str):
            raise ValueError(address)
        if address:
            ipaddress.ip_address(address)
    except ValueError:
        messages.append(
            checks.Error(
                f"MAILGOV_WORKER_METRICS_ADDRESS must be an IP address to listen on "
                f"(e.g. '0.0.0.0', '127.0.0.1', '::'), not {address!r}.",
                id=WORKER_METRICS_ADDRESS_INVALID,
            )
        )
    return messages


@checks.register()
def check_lifecycle(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages = []
    policy = mailgov_settings.OUTBOX_ON_INTERRUPTED
    if policy not in ("retry", "hold"):
        messages.append(
            checks.Error(
                f"MAILGOV_OUTBOX_ON_INTERRUPTED must be 'retry' or 'hold', not {policy!r}.",
                id=OUTBOX_POLICY,
            )
        )
    dormant, warning = mailgov_settings.DORMANT_DAYS, mailgov_settings.DORMANT_WARNING_DAYS
    if isinstance(dormant, int | float) and isinstance(warning, int | float) and warning >= dormant:
        messages.append(
            checks.Error(
                f"MAILGOV_DORMANT_WARNING_DAYS ({warning}) must be less than "
                f"MAILGOV_DORMANT_DAYS ({dormant}): owners are warned before the revocation.",
                id=DORMANT_WARNING_TOO_LONG,
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


@checks.register(checks.Tags.security)
def check_provider_bindings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Mailboxes whose provider id is now configured as another provider.

    Each mailbox is bound at connect time to its provider's identity (type,
    token endpoint or issuer, SMTP host); mailgov refuses to refresh or send
    for a mailbox whose provider id no longer gives that identity. This check
    says how many there are, per provider id, and what to do.

    Not tagged ``database``, although it runs one aggregate query: a provider
    re-declared as another is a security matter that ``manage.py check``,
    ``runserver`` and every management command must report, and those skip
    database-tagged checks. Where there is no database yet (before
    ``migrate``, a build step), it reports nothing.
    """
    db = router.db_for_read(Mailbox)
    if connections.settings.get(db, {}).get("ENGINE", "") in ("", DUMMY_ENGINE):
        return []  # no database configured (a build step): nothing to count
    try:
        rows = provider_bindings()
    except DatabaseError:
        return []  # not reachable, or not migrated yet
    except Exception as exc:
        # Whatever else refuses a query here (a test that forbids the
        # database, a misconfigured backend) must not break every command.
        logger.debug("provider binding check skipped: %s", type(exc).__name__)
        return []
    messages: list[checks.CheckMessage] = []
    for row in rows:
        if row["matches"] or not row["configured"]:
            # A provider that is not configured at all is refused by name at
            # send time; E010 covers an invalid configuration.
            continue
        provider_id, count = row["provider"], row["count"]
        fix = (
            f"Restore the configuration of {provider_id!r} in MAILGOV_PROVIDERS. If the change "
            "is intended and the new endpoints belong to the provider that issued these "
            f"grants, run 'manage.py mailgov_providers bind {provider_id} --yes'. Otherwise "
            "revoke the mailboxes (their owners reconnect through the new provider). "
            "'manage.py mailgov_providers status' lists every binding."
        )
        if not row["binding"]:
            messages.append(
                checks.Error(
                    f"{count} mailbox(es) of provider {provider_id!r} are bound to no provider "
                    "identity (created before binding existed, or written without the ORM's "
                    "save()); mailgov refuses to refresh or send for them.",
                    hint=fix,
                    obj=provider_id,
                    id=PROVIDER_UNBOUND,
                )
            )
            continue
        messages.append(
            checks.Error(
                f"{count} mailbox(es) of provider {provider_id!r} were connected through "
                f"{describe_identity(row['binding'])}, but {provider_id!r} is now configured "
                f"as {describe_identity(row['configured'])}. mailgov refuses to refresh or "
                "send for them: their tokens never go to another provider.",
                hint=fix,
                obj=provider_id,
                id=PROVIDER_CHANGED,
            )
        )
    return messages


#: The blocks mailgov's pages fill in the host's base template.
BASE_TEMPLATE_NEEDS = ("title", "content")


@checks.register(checks.Tags.templates)
def check_base_template(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """``MAILGOV_BASE_TEMPLATE`` exists, and defines the blocks the consent and
    mailbox pages fill ("title", "content"): a missing template is a 500 on
    every consent page, a missing block an empty page. Only where those pages
    are installed (``mailgov.contrib.allauth``)."""
    if not apps.is_installed("mailgov.contrib.allauth"):
        return []
    name = mailgov_settings.BASE_TEMPLATE
    hint = (
        "Name a template of your site (e.g. 'base.html') that defines the blocks "
        f"{' and '.join(map(repr, BASE_TEMPLATE_NEEDS))} and shows Django's messages, or "
        "leave MAILGOV_BASE_TEMPLATE unset for mailgov's own 'mailgov/base.html'."
    )
    if not isinstance(name, str) or not name:
        return [
            checks.Error(
                f"MAILGOV_BASE_TEMPLATE must be a template name, not {name!r}.",
                hint=hint,
                id=BASE_TEMPLATE_MISSING,
            )
        ]
    try:
        template = get_template(name)
    except TemplateDoesNotExist:
        return [
            checks.Error(
                f"MAILGOV_BASE_TEMPLATE {name!r} does not exist: the consent and mailbox "
                "pages extend it.",
                hint=hint,
                id=BASE_TEMPLATE_MISSING,
            )
        ]
    except TemplateSyntaxError as exc:
        return [
            checks.Error(
                f"MAILGOV_BASE_TEMPLATE {name!r} does not compile: {exc}",
                hint=hint,
                id=BASE_TEMPLATE_MISSING,
            )
        ]
    blocks = _block_names(getattr(template, "template", None))
    missing = [block for block in BASE_TEMPLATE_NEEDS if blocks is not None and block not in blocks]
    if missing:
        return [
            checks.Error(
                f"MAILGOV_BASE_TEMPLATE {name!r} (with the templates it extends) has no block "
                f"{', '.join(map(repr, missing))}: mailgov's pages would render without it.",
                hint=hint,
                id=BASE_TEMPLATE_BLOCKS,
            )
        ]
    return []


def _block_names(template: Any) -> set[str] | None:
    """The names of the blocks of a Django template and of those it extends;
    ``None`` where that cannot be known without rendering (another template
    engine, or ``{% extends some_variable %}``)."""
    names: set[str] = set()
    seen: set[str] = set()
    while template is not None:
        nodelist = getattr(template, "nodelist", None)
        if nodelist is None:
            return None
        names.update(node.name for node in nodelist.get_nodes_by_type(BlockNode))
        extends = nodelist.get_nodes_by_type(ExtendsNode)
        if not extends:
            return names
        parent = extends[0].parent_name
        if parent.filters or not isinstance(parent.var, str) or parent.var in seen:
            return None
        seen.add(parent.var)
        try:
            template = get_template(parent.var).template
        except (TemplateDoesNotExist, TemplateSyntaxError, AttributeError):
            return None
    return names
