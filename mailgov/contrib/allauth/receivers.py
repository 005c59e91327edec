"""Reactions of the consent integration to mailgov's signals."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from mailgov.contrib.allauth.reasons import reason_text
from mailgov.models import Mailbox
from mailgov.notifications import notify_owner as notify_owner_of

logger = logging.getLogger("mailgov.consent")


def notify_owner(*, mailbox: Mailbox, reason: str, **kwargs: Any) -> None:
    """Tell the owner once, by email, that a mailbox stopped working and why.

    The notice goes through the outbox (sent by a worker with
    ``MAILGOV_NOTIFICATION_BACKEND``, retried like mail), keyed by the
    mailbox and the connection it fell from: one notice per fall, however
    often the signal came. A failure to queue it is logged and never breaks
    what caused it.
    """
    try:
        with transaction.atomic():
            notify_owner_of(
                mailbox,
                event="needs_reconsent",
                template="needs_reconsent",
                key=f"needs_reconsent:{mailbox.pk}:{mailbox.connected_at.isoformat()}",
                context={"reason": reason_text(mailbox)},
            )
    except Exception as exc:
        logger.error("could not tell the owner of mailbox %s: %s", mailbox.pk, type(exc).__name__)
