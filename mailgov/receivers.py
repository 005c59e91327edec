"""mailgov's own signal handlers, connected in ``MailgovConfig.ready()``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from django.db.models import Model
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import Signal
from django.utils import timezone

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
    owner, a shell): its grant must not be orphaned at the provider, and its
    receipts, which outlive it, record when the grant ended."""
    from mailgov.revocation import keep_for_revocation

    keep_for_revocation(instance)
    end_receipts(instance)


def end_receipts(mailbox: Any) -> None:
    """The mailbox row is going: its receipts (which outlive it, as proof of
    consent) say when the grant ended, from which their retention runs."""
    from mailgov.models import ConsentReceipt

    # A mailbox revoked earlier ended its grant then.
    ended = mailbox.revoked_at if mailbox.status == mailbox.Status.REVOKED else None
    ConsentReceipt.objects.filter(mailbox_id=mailbox.pk, grant_ended_at__isnull=True).update(
        grant_ended_at=ended or timezone.now()
    )


def erase_deleted_user(*, instance: Any, **kwargs: Any) -> None:
    """Before a user is deleted (the admin, the ORM, through a proxy model or
    not): erase their data as ``mailgov_erase_user`` does, their grants first
    (see :mod:`mailgov.privacy`)."""
    from mailgov.privacy import before_user_deleted

    before_user_deleted(instance)


def scrub_deleted_user(*, instance: Any, **kwargs: Any) -> None:
    """After a user's row is deleted, in the same transaction."""
    from mailgov.privacy import after_user_deleted

    after_user_deleted(instance)


def _deletion_receivers() -> list[tuple[Signal, Callable[..., None], type[Model]]]:
    """(signal, receiver, concrete model) of the deletions mailgov acts on."""
    from django.contrib.auth import get_user_model

    from mailgov.models import Mailbox

    user = get_user_model()
    return [
        (pre_delete, keep_grant_for_revocation, Mailbox),
        (pre_delete, erase_deleted_user, user),
        (post_delete, scrub_deleted_user, user),
    ]


def connect_deletion_receivers(models: Iterable[type[Model]]) -> None:
    """Connect the deletion receivers to each of ``models`` that is their
    model or a proxy of it (Django names the proxy as the sender when a
    deletion goes through one: the admin of a proxy, a host's own).

    Never with no sender: a ``pre_delete`` or ``post_delete`` receiver for
    every model would cost every bulk delete of the site its fast path
    (Django would load and signal each row of a purge of millions)."""
    receivers = _deletion_receivers()
    for model in models:
        for signal, receiver, concrete in receivers:
            if model._meta.concrete_model is concrete:
                uid = f"mailgov.{receiver.__name__}.{model._meta.label_lower}"
                signal.connect(receiver, sender=model, dispatch_uid=uid)


def connect_late_proxy(*, sender: type[Model], **kwargs: Any) -> None:
    """``class_prepared``: a proxy model defined after start-up (in a test
    module, or made at run time) gets the deletion receivers too."""
    if sender._meta.proxy:
        connect_deletion_receivers([sender])


def note_revocation_for_erasures(*, mailbox_id: Any, outcome: str, **kwargs: Any) -> None:
    """An erasure waiting for this grant's revocation records how it ended."""
    from mailgov.privacy import note_revocation

    note_revocation(mailbox_id, outcome)
