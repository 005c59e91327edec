"""mailgov's own signal handlers, connected in ``MailgovConfig.ready()``."""

from __future__ import annotations

import logging
from typing import Any

from mailgov import crypto

security_logger = logging.getLogger("mailgov.security")


def reset_keyring_on_setting_change(*, setting: str, **kwargs: Any) -> None:
    """``override_settings`` of the keys must take effect at once."""
    if setting in ("MAILGOV_ENCRYPTION_KEYS", "MAILGOV_ENCRYPTION_KEYS_FILE"):
        crypto.reset_keyring()


def log_needs_reconsent(*, mailbox: Any, reason: str, **kwargs: Any) -> None:
    security_logger.warning(
        "mailbox %s needs re-consent (%s)", mailbox.pk, reason.replace("\n", " ")[:100]
    )


def keep_grant_for_revocation(*, instance: Any, **kwargs: Any) -> None:
    """Before a mailbox row is deleted (the admin, an ORM cascade from its
    owner, a shell): its grant must not be orphaned at the provider."""
    from mailgov.models import Mailbox
    from mailgov.revocation import keep_for_revocation

    if instance._meta.concrete_model is Mailbox:
        keep_for_revocation(instance)


def erase_deleted_user(*, instance: Any, **kwargs: Any) -> None:
    """Before a user is deleted (the admin, the ORM): erase their data as
    ``mailgov_erase_user`` does, their grants first (see :mod:`mailgov.privacy`)."""
    from mailgov.privacy import before_user_deleted

    before_user_deleted(instance)


def scrub_deleted_user(*, instance: Any, **kwargs: Any) -> None:
    """After a user's row is deleted, in the same transaction."""
    from mailgov.privacy import after_user_deleted

    after_user_deleted(instance)
