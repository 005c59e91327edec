"""Notices to mailbox owners, sent through the outbox, at most once per event.

A notice (re-consent needed, refresh failing or recovered, dormancy warning)
is an outbox row of kind ``notification`` whose idempotency key names the
event (``notify:<event>:<mailbox>:<occurrence>``): raising the same event
twice stores one row and sends one message. Workers send notices with
``MAILGOV_NOTIFICATION_BACKEND`` (any Django email backend), retried like
mail; a notice never blocks or breaks what raised it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.core.mail.utils import DNS_NAME
from django.db import transaction
from django.template.loader import render_to_string
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from mailgov.conf import mailgov_settings
from mailgov.exceptions import MailboxUnavailableError, MailgovConfigurationError
from mailgov.models import Mailbox, OutboxAttempt, OutboxMessage

logger = logging.getLogger("mailgov.notifications")

__all__ = ["enqueue_notification", "mailboxes_link", "notify_owner", "send_notices"]


def enqueue_notification(
    *,
    event: str,
    user: Any,
    mailbox: Mailbox | None,
    subject: str,
    body: str,
    key: str,
) -> OutboxMessage | None:
    """Queue a notice to ``user`` about ``mailbox``; ``None`` if one was
    already queued for ``key`` (the event) or the user has no address.

    Runs in the caller's transaction; the workers are told on commit.
    """
    from mailgov.outbox import _insert, publish

    address = getattr(user, "email", "") or ""
    if not address:
        logger.info("no notice %s: the owner has no email address", event)
        return None
    stored_key = f"notify:{key}"
    if OutboxMessage.objects.filter(idempotency_key=stored_key).exists():
        return None
    from email.utils import make_msgid

    row = OutboxMessage(
        kind=OutboxMessage.Kind.NOTIFICATION,
        mailbox=mailbox,
        recipient_user=user,
        event=event[:64],
        message_id=make_msgid(domain=DNS_NAME),
        idempotency_key=stored_key,
        recipient_count=1,
    )
    row.payload = json.dumps(
        {
            "from": mailgov_settings.NOTIFICATION_FROM or settings.DEFAULT_FROM_EMAIL,
            "to": [address],
            "subject": " ".join(subject.split()),
            "body": body,
        }
    )
    saved = _insert([row])[0]
    if saved.pk != row.pk:
        return None  # another process queued this event meanwhile
    transaction.on_commit(lambda: publish([None], kind=OutboxMessage.Kind.NOTIFICATION))
    return saved


def mailboxes_link() -> str:
    """The owner's mailboxes page, absolute if ``MAILGOV_SITE_URL`` is set
    ("" in a project without mailgov's pages)."""
    try:
        path = reverse("mailgov:mailboxes")
    except NoReverseMatch:
        path = ""
    return (mailgov_settings.SITE_URL or "").rstrip("/") + path


def notify_owner(
    mailbox: Mailbox, *, event: str, template: str, key: str, context: dict[str, Any]
) -> OutboxMessage | None:
    """Render ``mailgov/email/<template>.txt`` and ``<template>_subject.txt``
    and queue them to ``mailbox``'s owner (see :func:`enqueue_notification`).
    Templates get ``mailbox`` and ``link`` (:func:`mailboxes_link`) besides
    ``context``."""
    context = {"mailbox": mailbox, "link": mailboxes_link(), **context}
    return enqueue_notification(
        event=event,
        user=mailbox.owner,
        mailbox=mailbox,
        subject=render_to_string(f"mailgov/email/{template}_subject.txt", context).strip(),
        body=render_to_string(f"mailgov/email/{template}.txt", context),
        key=key,
    )


def send_notices(claim: Any, record: Callable[[OutboxMessage, Any], None]) -> None:
    """Send claimed notices with the notification backend; ``record(row, verdict)``."""
    from mailgov.outcomes import Verdict, classify

    outcome = OutboxAttempt.Outcome
    try:
        backend = get_connection(mailgov_settings.NOTIFICATION_BACKEND, fail_silently=False)
        backend.open()
    except (MailgovConfigurationError, ImportError) as exc:
        for row in claim.rows:
            record(row, Verdict(outcome.HELD, "configuration", held_reason=type(exc).__name__))
        return
    except Exception as exc:
        for row in claim.rows:
            record(row, classify(exc, "", timezone.now()))
        return
    try:
        for row in claim.rows:
            try:
                payload = json.loads(row.payload)
            except Exception as exc:
                logger.error("notice %s cannot be opened: %s", row.pk, type(exc).__name__)
                record(row, Verdict(outcome.FAILED, "decryption_failed"))
                continue
            message = EmailMessage(
                payload["subject"],
                payload["body"],
                payload["from"],
                payload["to"],
                headers={"Message-ID": row.message_id},
                connection=backend,
            )
            try:
                message.send()
            except (MailgovConfigurationError, MailboxUnavailableError) as exc:
                record(row, Verdict(outcome.HELD, "configuration", held_reason=type(exc).__name__))
            except Exception as exc:
                record(row, classify(exc, "", timezone.now()))
            else:
                record(row, Verdict(outcome.SENT, "", 250))
    finally:
        try:
            backend.close()
        except Exception as exc:  # closing a broken connection
            logger.debug("notification backend close: %s", type(exc).__name__)
