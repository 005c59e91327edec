"""The kill switches of incidents: freeze (no sending) and containment (no
token used), checked at the moment of use by every process.

Both are one row of :class:`~mailgov.models.Incident` (its scope and a
time), so that switching them on takes one small write, whatever the size
of the scope, and is seen by every process (the web process calling the
SMTP backend, a Celery worker, a shell) as soon as it commits. The checks
read the database, never a cache: one query while nothing is switched on
(whether any incident blocks anything), and one more to read the scopes
when something is.

- A **freeze** covers the mailboxes in its scope while it is on: nothing is
  sent (:class:`~mailgov.exceptions.SendingFrozenError`); queued mail is
  held by the claim, not lost, and queued again when it is lifted.
- A **containment** covers the mailboxes in its scope connected before it:
  their tokens are neither handed out nor refreshed
  (:class:`~mailgov.exceptions.MailboxContainedError`) while
  :func:`mailgov.incidents.contain` revokes the rows, set-based; once every
  row is revoked the containment is done and no longer checked. A mailbox
  its owner reconnects afterwards is a new grant and is not covered.

Checked by :class:`mailgov.backends.smtp.EmailBackend` (before a batch and
before each message), :func:`mailgov.tokens.get_access_token` (every token
handed out or refreshed) and :func:`mailgov.claims.claim_batch`.
"""

from __future__ import annotations

from typing import Any

from django.db import connection
from django.db.models import Exists, Q

from mailgov.exceptions import MailboxContainedError, MailboxUnavailableError, SendingFrozenError
from mailgov.models import Incident, Mailbox
from mailgov.scopes import covers

__all__ = [
    "BLOCKING",
    "FROZEN",
    "active_blocks",
    "active_freezes",
    "block_of",
    "check_not_blocked",
    "freeze_of",
    "send_gate",
]

FROZEN = Q(frozen_at__isnull=False, unfrozen_at__isnull=True)
CONTAINING = Q(contained_at__isnull=False, containment_done_at__isnull=True)
#: Incidents whose switch is on.
BLOCKING = FROZEN | CONTAINING


def active_blocks() -> list[Incident]:
    """The incidents whose freeze or containment is on now."""
    return list(Incident.objects.filter(BLOCKING).order_by("pk"))


def block_of(
    mailbox: Mailbox, incidents: list[Incident] | None = None, *, sending: bool = True
) -> tuple[Incident, str] | None:
    """The first incident that blocks ``mailbox`` and how (``"contained"``,
    or ``"frozen"`` when ``sending``), or ``None``. A containment comes first."""
    incidents = active_blocks() if incidents is None else incidents
    for incident in incidents:
        if (
            incident.contained_at is not None
            and incident.containment_done_at is None
            and mailbox.connected_at <= incident.contained_at
            and covers(incident, mailbox)
        ):
            return incident, "contained"
    if sending:
        for incident in incidents:
            if incident.frozen and covers(incident, mailbox):
                return incident, "frozen"
    return None


def check_not_blocked(
    mailbox: Mailbox, incidents: list[Incident] | None = None, *, sending: bool = True
) -> None:
    """Raise :class:`MailboxContainedError` or :class:`SendingFrozenError`
    (``sending`` only) if an incident blocks ``mailbox``."""
    found = block_of(mailbox, incidents, sending=sending)
    if found is None:
        return
    incident, how = found
    if how == "contained":
        raise MailboxContainedError(
            f"Mailbox {mailbox.pk} was contained by incident #{incident.pk}: its tokens are "
            "not used; nothing was sent.",
            incident_id=incident.pk,
        )
    raise SendingFrozenError(
        f"Sending from mailbox {mailbox.pk} is frozen by incident #{incident.pk}; "
        "nothing was sent.",
        incident_id=incident.pk,
    )


def any_block() -> Exists:
    """An expression: whether any incident's switch is on (for annotations)."""
    return Exists(Incident.objects.filter(BLOCKING))


def send_gate(mailbox: Mailbox) -> None:
    """Before each message: the mailbox is still active, not contained and
    not frozen.

    One query (the mailbox's status, and whether any switch is on): a
    connection opened before an incident's containment or freeze must not
    go on sending. Raises :class:`SendingFrozenError`,
    :class:`MailboxContainedError` or :class:`MailboxUnavailableError`.
    """
    row = _gate_row(mailbox.pk)
    if row is None:
        raise MailboxUnavailableError(f"Mailbox {mailbox.pk} no longer exists; nothing was sent.")
    status, blocked = row
    if status != Mailbox.Status.ACTIVE:
        raise MailboxUnavailableError(
            f"Mailbox {mailbox.pk} is {status}; nothing more is sent from it."
        )
    if blocked:
        # Rare (an incident's switch is on): the ORM reads connected_at,
        # converted as the database backend does, for the scope check.
        mailbox.connected_at = (
            Mailbox.objects.filter(pk=mailbox.pk).values_list("connected_at", flat=True).first()
        ) or mailbox.connected_at
        check_not_blocked(mailbox)


def _gate_row(pk: Any) -> tuple[str, bool] | None:
    """``(status, any switch on)`` of the mailbox ``pk``, or ``None``.

    The hot path of every message sent: the statement is compiled once per
    database vendor from the ORM's own queries (building the queryset each
    time cost ten times the query itself); only the primary key is a
    parameter.
    """
    sql = _GATE_SQL.get(connection.vendor)
    if sql is None:
        sql = _GATE_SQL[connection.vendor] = _compile_gate()
    params = [Mailbox._meta.pk.get_db_prep_value(pk, connection)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else (row[0], bool(row[1]))


def _compile_gate() -> str:
    switch, switch_params = (
        Incident.objects.filter(BLOCKING).values("pk")[:1].query.sql_with_params()
    )
    if switch_params:  # BLOCKING holds no values; a change that adds some lands here
        raise AssertionError("send_gate: the switch query must take no parameters")
    meta = Mailbox._meta
    q = connection.ops.quote_name
    # Only quoted names from the models' metadata and the ORM's own SQL go
    # into the text.
    return (
        f"SELECT {q(meta.get_field('status').column)}, EXISTS({switch}) "  # noqa: S608
        f"FROM {q(meta.db_table)} WHERE {q(meta.pk.column)} = %s"
    )


_GATE_SQL: dict[str, str] = {}


def active_freezes() -> list[Incident]:
    """The incidents whose freeze is on now."""
    return list(Incident.objects.filter(FROZEN).order_by("pk"))


def freeze_of(mailbox: Mailbox, freezes: list[Incident] | None = None) -> Incident | None:
    """The first frozen incident whose scope covers ``mailbox``, or ``None``."""
    for incident in active_freezes() if freezes is None else freezes:
        if incident.frozen and covers(incident, mailbox):
            return incident
    return None
