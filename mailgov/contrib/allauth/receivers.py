"""Reactions of the consent integration to mailgov's signals."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.template.loader import render_to_string
from django.urls import reverse

from mailgov.conf import mailgov_settings
from mailgov.contrib.allauth.reasons import reason_text
from mailgov.models import Mailbox

logger = logging.getLogger("mailgov.consent")


def notify_owner(*, mailbox: Mailbox, reason: str, **kwargs: Any) -> None:
    """Tell the owner once, by email, that a mailbox stopped working and why.

    ``mailbox_needs_reconsent`` is sent once per fall, after commit, so this
    runs once, not at every failed attempt. A failure to notify is logged and
    never breaks what caused it.
    """
    owner = mailbox.owner
    if not owner.email:
        return
    link = (mailgov_settings.SITE_URL or "").rstrip("/") + reverse("mailgov:mailboxes")
    context = {"mailbox": mailbox, "reason": reason_text(mailbox), "link": link}
    message = EmailMessage(
        render_to_string("mailgov/email/needs_reconsent_subject.txt", context).strip(),
        render_to_string("mailgov/email/needs_reconsent.txt", context),
        mailgov_settings.NOTIFICATION_FROM or settings.DEFAULT_FROM_EMAIL,
        [owner.email],
        connection=get_connection(mailgov_settings.NOTIFICATION_BACKEND),
    )
    try:
        message.send()
    except Exception as exc:
        logger.error("could not tell the owner of mailbox %s: %s", mailbox.pk, type(exc).__name__)
