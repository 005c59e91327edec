"""Signals mailgov sends. Definitions only; mailgov's own handlers are in receivers.py.

Use signals to react (notify, log, count); to change a flow, use the
documented hooks instead: receivers run in no guaranteed order.
"""

from __future__ import annotations

from django.dispatch import Signal

#: A mailbox fell to ``needs_reconsent``; sent once per fall, after commit.
#: Arguments: ``mailbox`` (Mailbox), ``reason`` (str code, e.g. "invalid_grant").
mailbox_needs_reconsent = Signal()

#: An access token was refreshed. Arguments: ``mailbox``. Carries no token.
token_refreshed = Signal()

#: About to send one message. Arguments: ``message`` (EmailMessage; ``None``
#: for a message sent from the outbox, whose EmailMessage is long gone),
#: ``message_id`` (its Message-ID), ``mailbox``. A receiver may raise
#: ``SendCancelled`` to skip the message (it is logged as failed, or for an
#: outbox message cancelled; the rest of the batch goes on).
pre_send = Signal()

#: A batch finished for one mailbox. Arguments: ``mailbox``, ``sent`` (int),
#: ``failed`` (int: the batch's messages not sent, those left unattempted
#: after a lost connection included; the queued path sends those later).
post_send = Signal()

#: A grant's revocation at its provider came to an end (no more attempts):
#: ``mailbox_id`` (the mailbox row may be gone), ``provider`` (its id) and
#: ``outcome``: ``"revoked"`` (confirmed), ``"no_endpoint"`` (the provider
#: has none to call: Microsoft) or ``"refused"`` (the provider refused it).
#: The refresh token is wiped in each case. Sent in the revocation's
#: transaction. Carries no token.
grant_revocation_ended = Signal()
