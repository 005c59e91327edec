"""``EMAIL_BACKEND = "mailgov.backends.queued.EmailBackend"``: send through the outbox.

:meth:`EmailBackend.send_messages` checks every message exactly as the SMTP
backend does (:func:`mailgov.validation.prepare_message`, the same mailbox
resolution and recipient limits: a bad message or an unusable sender raises
before anything is stored), then writes one outbox row per message **in the
caller's transaction** and returns. Celery workers send the rows with the
SMTP backend's code once the transaction commits (see :mod:`mailgov.outbox`).

Idempotency: set ``message.idempotency_key = "order-42-receipt"`` (any
string up to 200 printable characters) on a message; submitting a message
with a key already used for the same mailbox stores and sends nothing more.
The Message-ID is fixed here, at enqueue time: every retry, and any
duplicate after a worker was killed mid-send, carries the same one.

``fail_silently`` never hides a refused message: it is a caller's error, and
the outbox exists so that transport errors no longer reach the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import EmailMessage

from mailgov.backends.smtp import EmailBackend as SMTPBackend
from mailgov.exceptions import InvalidMessageError
from mailgov.models import Mailbox
from mailgov.outbox import MAX_IDEMPOTENCY_KEY_LENGTH, enqueue
from mailgov.validation import prepare_message


def idempotency_key(message: EmailMessage) -> str | None:
    """The message's ``idempotency_key`` attribute, checked; ``None`` if unset."""
    key = getattr(message, "idempotency_key", None)
    if key is None:
        return None
    if (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH
        or not key.isprintable()
    ):
        raise InvalidMessageError(
            f"An idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable "
            "characters; nothing was stored."
        )
    return key


class EmailBackend(BaseEmailBackend):
    """Store messages in mailgov's outbox for the workers to send.

    ``mailbox`` (a :class:`Mailbox` or its pk) fixes the sending mailbox, as
    for the SMTP backend; otherwise each message goes from the mailbox of its
    From address.
    """

    def __init__(self, mailbox: Mailbox | Any = None, fail_silently: bool = False, **kwargs: Any):
        super().__init__(fail_silently=fail_silently)
        self.mailbox = mailbox
        # Only its checks are used: it opens no connection here.
        self._checker = SMTPBackend(mailbox=mailbox)
        # A frozen mailbox's mail is accepted and held by the claim (nothing
        # lost; it goes when the freeze is lifted), not refused here.
        self._checker.check_freeze = False

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Check and store ``email_messages``; return how many are in the outbox
        (a message whose idempotency key was already used counts: it is there)."""
        if not email_messages:
            return 0
        keys = [idempotency_key(message) for message in email_messages]
        prepared = [prepare_message(message) for message in email_messages]
        mailboxes = self._checker._resolve(prepared)
        rows = enqueue(prepared, mailboxes, keys)
        for message, row in zip(email_messages, rows, strict=True):
            # The caller can follow its message: message.outbox_id.
            message.outbox_id = row.pk
        return len(rows)
