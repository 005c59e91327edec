"""The kill switch: an open incident's freeze stops sending in its scope.

Checked at send time by every process that sends (the web process calling
the SMTP backend, a Celery worker, a shell), against the database, never a
cache: a send that starts after the freeze committed sees it. The check is
one query while nothing is frozen (a count of frozen incidents), and one
more to read the frozen scopes when something is.

Where it is checked:

- :class:`mailgov.backends.smtp.EmailBackend` before a batch and before
  each message (a frozen mailbox raises :class:`SendingFrozenError`);
- :func:`mailgov.claims.claim_batch` (the queued path): a frozen mailbox's
  due messages are held with ``error_code="frozen"``, not sent, not lost;
  :func:`mailgov.incidents.unfreeze` queues them again.
"""

from __future__ import annotations

from django.db.models import Exists, Q

from mailgov.exceptions import MailboxUnavailableError, SendingFrozenError
from mailgov.models import Incident, Mailbox

__all__ = ["active_freezes", "check_not_frozen", "freeze_of", "send_gate"]

FROZEN = Q(frozen_at__isnull=False, unfrozen_at__isnull=True)


def active_freezes() -> list[Incident]:
    """The incidents whose freeze is on now."""
    return list(Incident.objects.filter(FROZEN).order_by("pk"))


def freeze_of(mailbox: Mailbox, freezes: list[Incident] | None = None) -> Incident | None:
    """The first frozen incident whose scope covers ``mailbox``, or ``None``."""
    from mailgov.incidents import covers

    for incident in active_freezes() if freezes is None else freezes:
        if covers(incident, mailbox):
            return incident
    return None


def _raise(mailbox: Mailbox, incident: Incident) -> None:
    raise SendingFrozenError(
        f"Sending from mailbox {mailbox.pk} is frozen by incident #{incident.pk}; "
        "nothing was sent.",
        incident_id=incident.pk,
    )


def check_not_frozen(mailbox: Mailbox, freezes: list[Incident] | None = None) -> None:
    """Raise :class:`SendingFrozenError` if a freeze covers ``mailbox``."""
    incident = freeze_of(mailbox, freezes)
    if incident is not None:
        _raise(mailbox, incident)


def send_gate(mailbox: Mailbox) -> None:
    """Before each message: the mailbox is still active and not frozen.

    One query (the mailbox's status, and whether any freeze is on): a
    connection opened before an incident's containment or freeze must not
    go on sending. Raises :class:`SendingFrozenError` or
    :class:`~mailgov.exceptions.MailboxUnavailableError`.
    """
    row = (
        Mailbox.objects.filter(pk=mailbox.pk)
        .annotate(any_freeze=Exists(Incident.objects.filter(FROZEN)))
        .values_list("status", "any_freeze")
        .first()
    )
    if row is None:
        raise MailboxUnavailableError(f"Mailbox {mailbox.pk} no longer exists; nothing was sent.")
    status, any_freeze = row
    if status != Mailbox.Status.ACTIVE:
        raise MailboxUnavailableError(
            f"Mailbox {mailbox.pk} is {status}; nothing more is sent from it."
        )
    if any_freeze:
        check_not_frozen(mailbox)
