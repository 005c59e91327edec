"""Incident playbooks over the grants mailgov holds.

An :class:`~mailgov.models.Incident` has a scope (every mailbox, one
provider, one capability, some users, some mailboxes) and steps, each
written to its timeline (:class:`~mailgov.models.IncidentEvent`) with the
actor, the time and counts, and to the audit trail:

- :func:`freeze` / :func:`unfreeze`: the kill switch (:mod:`mailgov.freeze`);
  queued mail in the scope is held, not lost, and queued again when lifted.
- :func:`contain`: every token in the scope unusable at once, by set-based
  updates (statuses to ``revoked``, access tokens wiped), then provider
  revocations queued (the refresh tokens are kept, encrypted, only until
  their revocation has been confirmed).
- :func:`notify`: the owners told, through the outbox, with the incident's
  editable template; :func:`affected_owners` for a CSV.
- key rotation is a governance job (:func:`mailgov.governance.start_rotation`),
  recorded here with :func:`record`.
- :func:`resolve`: summary, freeze lifted.

The admin pages and ``manage.py mailgov_incident`` both call these.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet
from django.template import Context, Engine, TemplateSyntaxError
from django.utils import timezone, translation
from django.utils.translation import gettext_lazy as _

from mailgov.audit import current_cid, log_rows, log_summary
from mailgov.capabilities import get_capability
from mailgov.exceptions import IncidentStateError
from mailgov.exports import csv_lines
from mailgov.freeze import active_freezes, freeze_of
from mailgov.models import (
    Incident,
    IncidentEvent,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
)
from mailgov.scopes import covers, scope_q, scope_queryset

logger = logging.getLogger("mailgov")
security_logger = logging.getLogger("mailgov.security")

State = OutboxMessage.State
Step = IncidentEvent.Step

__all__ = [
    "affected_owners",
    "contain",
    "covers",
    "declare",
    "freeze",
    "incident_status",
    "notify",
    "owners_csv",
    "record",
    "render_notice",
    "resolve",
    "scope_queryset",
    "timeline",
    "timeline_csv",
    "timeline_json",
    "unfreeze",
]

DEFAULT_NOTICE_SUBJECT = _("Security notice about your connected mailbox")
DEFAULT_NOTICE_BODY = _(
    "Hello {{ owner.name }},\n\n"
    "We are handling a security incident that concerns the access you gave us to send "
    "email as you from: {{ mailboxes|join:', ' }}.\n\n"
    "To protect you, we have stopped sending from it and ended our access at your email "
    "provider. No message has been read by us: we never had access to read your mail.\n\n"
    "If you want us to send email for you again, reconnect your mailbox here:\n{{ link }}\n\n"
    "You can also check the apps connected to your Google or Microsoft account in its "
    "security settings.\n"
)

#: The plain-text template engine of notices: no autoescaping (plain text),
#: no custom tags, and a context of plain values only (never a model
#: instance: an edited template must not reach a user's password hash).
_ENGINE = Engine(autoescape=False, libraries={}, builtins=["django.template.defaultfilters"])


def actor_label(actor: Any, label: str = "") -> str:
    if label:
        return label[:200]
    if getattr(actor, "is_authenticated", False):
        return actor.get_username()[:200]
    return "system"


# -- scope ----------------------------------------------------------------------------


# -- timeline -------------------------------------------------------------------------


def record(
    incident: Incident,
    step: str,
    *,
    actor: Any = None,
    label: str = "",
    counts: dict[str, Any] | None = None,
    note: str = "",
) -> IncidentEvent:
    """Write one timeline entry (in the caller's transaction)."""
    return IncidentEvent.objects.create(
        incident=incident,
        step=step,
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        actor_label=actor_label(actor, label),
        counts=counts or {},
        note=note,
        cid=current_cid()[:255],
    )


def _open(incident: Incident) -> Incident:
    locked = Incident.objects.select_for_update().get(pk=incident.pk)
    if locked.state != Incident.State.OPEN:
        raise IncidentStateError(f"Incident #{incident.pk} is resolved; reopen a new one.")
    return locked


def _refresh(incident: Incident, locked: Incident) -> None:
    for field in Incident._meta.concrete_fields:
        setattr(incident, field.attname, getattr(locked, field.attname))


def declare(
    *,
    title: str,
    severity: str = Incident.Severity.HIGH,
    scope: str = Incident.Scope.ALL,
    scope_value: str = "",
    scope_ids: Sequence[Any] = (),
    actor: Any = None,
    label: str = "",
) -> Incident:
    """Open an incident. Raises :class:`IncidentStateError` for a scope that
    names nothing (no provider, an unknown capability, no users or mailboxes)."""
    title = " ".join((title or "").split())
    if not title:
        raise IncidentStateError("An incident needs a title.")
    if severity not in Incident.Severity.values:
        raise IncidentStateError(f"Unknown severity {severity!r}.")
    if scope not in Incident.Scope.values:
        raise IncidentStateError(f"Unknown scope {scope!r}.")
    ids = [str(pk) for pk in scope_ids]
    if scope == Incident.Scope.PROVIDER and not scope_value:
        raise IncidentStateError("A provider scope needs the provider's id.")
    if scope == Incident.Scope.CAPABILITY and get_capability(scope_value) is None:
        raise IncidentStateError(f"Unknown capability {scope_value!r}.")
    if scope in (Incident.Scope.USERS, Incident.Scope.MAILBOXES) and not ids:
        raise IncidentStateError(f"A {scope} scope needs at least one id.")
    with translation.override(settings.LANGUAGE_CODE):
        subject, body = str(DEFAULT_NOTICE_SUBJECT), str(DEFAULT_NOTICE_BODY)
    with transaction.atomic():
        incident = Incident.objects.create(
            title=title[:200],
            severity=severity,
            scope=scope,
            scope_value=scope_value if scope in ("provider", "capability") else "",
            scope_ids=ids if scope in ("users", "mailboxes") else [],
            declared_by=actor if getattr(actor, "is_authenticated", False) else None,
            notice_subject=subject,
            notice_body=body,
        )
        record(
            incident,
            Step.DECLARE,
            actor=actor,
            label=label,
            counts={"mailboxes": scope_queryset(incident).count()},
            note=f"{incident.get_severity_display()}; {describe_scope(incident)}",
        )
    security_logger.warning("incident #%s declared (%s)", incident.pk, incident.severity)
    return incident


def describe_scope(incident: Incident) -> str:
    kind = incident.scope
    if kind in (Incident.Scope.PROVIDER, Incident.Scope.CAPABILITY):
        return f"{incident.get_scope_display()}: {incident.scope_value}"
    if kind in (Incident.Scope.USERS, Incident.Scope.MAILBOXES):
        return f"{incident.get_scope_display()}: {len(incident.scope_ids)}"
    return str(incident.get_scope_display())


# -- freeze ---------------------------------------------------------------------------


def freeze(incident: Incident, *, actor: Any = None, label: str = "") -> dict[str, int]:
    """Turn the kill switch on for the scope; hold its queued mail.

    Effective for every send that starts after this commits (see
    :mod:`mailgov.freeze`). Returns ``{"mailboxes", "held"}``; freezing a
    frozen incident changes nothing (``{"already": 1}``).
    """
    now = timezone.now()
    with transaction.atomic():
        locked = _open(incident)
        if locked.frozen:
            _refresh(incident, locked)
            return {"already": 1}
        locked.frozen_at = now
        locked.unfrozen_at = None
        locked.save(update_fields=["frozen_at", "unfrozen_at"])
        scope = scope_queryset(locked)
        held = OutboxMessage.objects.filter(
            kind=OutboxMessage.Kind.MAIL, state=State.QUEUED, mailbox__in=scope
        ).update(
            state=State.HELD,
            error_code="frozen",
            held_reason=f"frozen: incident #{locked.pk}",
            finished_at=now,
        )
        counts = {"mailboxes": scope.count(), "held": held}
        if held:
            # A bulk change sends no model signal: its audit entry is written here.
            ids = OutboxMessage.objects.filter(
                state=State.HELD, held_reason=f"frozen: incident #{locked.pk}", finished_at=now
            ).values_list("pk", flat=True)
            log_summary(
                locked,
                what="outbox messages held by the freeze",
                ids=list(ids),
                changes={"state": [State.QUEUED, State.HELD]},
                actor=actor,
            )
        record(locked, Step.FREEZE, actor=actor, label=label, counts=counts)
    _refresh(incident, locked)
    security_logger.warning("incident #%s: sending frozen (%d held)", incident.pk, held)
    return counts


def release_frozen(*, now=None, incident: Incident | None = None, actor: Any = None) -> int:
    """Queue again mail held by a freeze that no longer covers its mailbox
    (lifted, or its incident resolved), if the mailbox can send; returns how
    many were queued."""
    from mailgov.outbox import publish
    from mailgov.outcomes import MAILBOX_HOLD_CODES

    now = now or timezone.now()
    freezes = active_freezes()
    held = OutboxMessage.objects.filter(state=State.HELD, error_code="frozen")
    if freezes:
        still = [
            mailbox.pk
            for mailbox in Mailbox.objects.filter(
                pk__in=held.values("mailbox_id").order_by().distinct()
            )
            if freeze_of(mailbox, freezes) is not None
        ]
        held = held.exclude(mailbox_id__in=still)
    # A mailbox that cannot send any more (contained, revoked, suspended
    # meanwhile): its mail stays held, under its status's reason, and goes
    # when the mailbox is active again (mailgov.outbox.release_auto_held).
    for status, code in MAILBOX_HOLD_CODES.items():
        # Its retention period starts now, not when the freeze held it.
        held.filter(mailbox__status=status).update(
            error_code=code, held_reason=code, finished_at=now
        )
    held = held.filter(mailbox__status=Mailbox.Status.ACTIVE)
    mailbox_ids = [
        str(pk) for pk in held.order_by().values_list("mailbox_id", flat=True).distinct()
    ]
    ids = list(held.values_list("pk", flat=True))
    count = OutboxMessage.objects.filter(pk__in=ids, state=State.HELD).update(
        state=State.QUEUED, next_attempt_at=now, finished_at=None, held_reason="", error_code=""
    )
    if count:
        change = {"state": [State.HELD, State.QUEUED]}
        if incident is not None:
            log_summary(
                incident, what="outbox messages released", ids=ids, changes=change, actor=actor
            )
        else:
            log_rows(OutboxMessage, [(pk, f"outbox message {pk}") for pk in ids], changes=change)
        transaction.on_commit(lambda: publish(mailbox_ids))
    return count


def unfreeze(incident: Incident, *, actor: Any = None, label: str = "") -> dict[str, int]:
    """Lift the freeze; its held mail is queued again (unless another
    freeze still covers the mailbox). Returns ``{"released"}``."""
    now = timezone.now()
    with transaction.atomic():
        locked = Incident.objects.select_for_update().get(pk=incident.pk)
        if not locked.frozen:
            _refresh(incident, locked)
            return {"already": 1}
        locked.unfrozen_at = now
        locked.save(update_fields=["unfrozen_at"])
        counts = {"released": release_frozen(now=now, incident=locked, actor=actor)}
        record(locked, Step.UNFREEZE, actor=actor, label=label, counts=counts)
    _refresh(incident, locked)
    security_logger.warning("incident #%s: freeze lifted", incident.pk)
    return counts


# -- contain --------------------------------------------------------------------------


def contain(
    incident: Incident,
    *,
    actor: Any = None,
    label: str = "",
    finish: bool = True,
    progress: Any = None,
) -> dict[str, int]:
    """Make every token in the scope unusable at once; then revoke the rows.

    At once: one write, whatever the size of the scope (the incident's
    ``contained_at``, checked by every process before a token is handed out,
    refreshed or sent with, see :mod:`mailgov.freeze`). It covers the
    mailboxes in the scope connected before it. Then, unless ``finish`` is
    false (the admin leaves it to a worker), :func:`finish_containment`.
    Returns ``{"mailboxes"}`` (in the scope when contained), plus the counts
    of :func:`finish_containment` when it ran here.
    """
    now = timezone.now()
    with transaction.atomic():
        locked = _open(incident)
        if locked.contained_at is None:
            locked.contained_at = now
            locked.save(update_fields=["contained_at"])
            counts = {"mailboxes": _contained(locked).count()}
            record(locked, Step.CONTAIN, actor=actor, label=label, counts=counts)
        else:
            counts = {"already": 1}
    _refresh(incident, locked)
    if "already" not in counts:
        security_logger.warning(
            "incident #%s: tokens of %d mailboxes made unusable", incident.pk, counts["mailboxes"]
        )
    if finish:
        counts.update(finish_containment(incident, actor=actor, label=label, progress=progress))
    return counts


def _contained(incident: Incident) -> QuerySet[Mailbox]:
    """The mailboxes a containment covers: in the scope, connected before it."""
    return Mailbox.objects.filter(scope_q(incident), connected_at__lte=incident.contained_at)


def contained_unrevoked(incident: Incident) -> QuerySet[Mailbox]:
    """The mailboxes a containment covers that are not revoked yet (none
    before it is switched on or once it is done)."""
    if incident.contained_at is None or incident.containment_done_at is not None:
        return Mailbox.objects.none()
    return _contained(incident).exclude(status=Mailbox.Status.REVOKED)


def finish_containment(
    incident: Incident,
    *,
    actor: Any = None,
    label: str = "",
    progress: Any = None,
) -> dict[str, int]:
    """Revoke the contained mailboxes' rows, set-based, and queue their
    provider revocations. All or nothing: a run cut short changes nothing,
    and the containment stays on until a run completes.

    In one transaction: the mailboxes become ``revoked``
    (so the revocation sweep takes them up), their access tokens are wiped,
    their queued mail is held (it goes if the owner reconnects), and the
    provider revocations are published on commit. Refresh tokens stay,
    encrypted and unusable, only until the provider confirms. Then one
    summarised audit entry names every mailbox, and the containment is done.
    Returns ``{"revoked", "tokens_wiped", "held"}``.
    """
    from mailgov.revocation import queue_revocations

    locked = Incident.objects.get(pk=incident.pk)
    if locked.contained_at is None:
        raise IncidentStateError(f"Incident #{incident.pk} is not contained.")
    if locked.containment_done_at is not None:
        return {"revoked": 0, "tokens_wiped": 0, "held": 0}
    reason = f"incident #{locked.pk}: contained"
    now = timezone.now()
    with transaction.atomic():
        # One statement per table (chunks cost SQLite a checkpoint each and
        # PostgreSQL as many index passes): the switch already protects
        # every token, so a lock held for the seconds this takes at 100,000
        # rows only delays what would be refused anyway.
        revoked = (
            _contained(locked)
            .exclude(status=Mailbox.Status.REVOKED)
            .update(
                status=Mailbox.Status.REVOKED,
                revoked_at=now,
                revocation_reason=reason,
                revocation_attempts=0,
                revocation_retry_at=now,
                revocation_given_up_at=None,
            )
        )
        # Exactly the rows just revoked: their time and reason are this run's.
        these = Mailbox.objects.filter(revoked_at=now, revocation_reason=reason)
        # EXISTS, not IN: SQLite runs the correlated form several times
        # faster at this size.
        wiped = MailboxCredentials.objects.filter(
            Exists(these.filter(pk=OuterRef("pk"))), access_token__isnull=False
        ).update(access_token=None, expires_at=None)
        held = OutboxMessage.objects.filter(
            Exists(these.filter(pk=OuterRef("mailbox_id"))),
            kind=OutboxMessage.Kind.MAIL,
            state=State.QUEUED,
        ).update(
            state=State.HELD, error_code="mailbox_revoked", held_reason=reason, finished_at=now
        )
        # Mail a claim held while the containment was on waits, from now,
        # like any revoked mailbox's: until its owner reconnects.
        held += OutboxMessage.objects.filter(
            Exists(these.filter(pk=OuterRef("mailbox_id"))),
            state=State.HELD,
            error_code="contained",
        ).update(error_code="mailbox_revoked", held_reason=reason, finished_at=now)
        every_id = list(these.values_list("pk", flat=True))
        transaction.on_commit(lambda: queue_revocations(every_id))
        if progress is not None:
            progress(revoked)
    totals = {"revoked": revoked, "tokens_wiped": wiped, "held": held}
    with transaction.atomic():
        Incident.objects.filter(pk=locked.pk).update(containment_done_at=timezone.now())
        log_summary(
            locked,
            what="contained",
            ids=every_id,
            changes={"status": ["(various)", Mailbox.Status.REVOKED]},
            actor=actor,
            counts=totals,
        )
        record(
            locked,
            Step.REVOKE,
            actor=actor,
            label=label,
            counts=totals,
            note="every contained mailbox revoked; provider revocations queued",
        )
    incident.containment_done_at = timezone.now()
    logger.info("incident #%s: containment done (%d mailboxes revoked)", locked.pk, len(every_id))
    return totals


# -- notify ---------------------------------------------------------------------------


def validate_notice(subject: str, body: str) -> None:
    """Raise :class:`IncidentStateError` for a template that does not compile."""
    for name, text in (("subject", subject), ("text", body)):
        try:
            _ENGINE.from_string(text)
        except TemplateSyntaxError as exc:
            raise IncidentStateError(f"The notice {name} is not a valid template: {exc}") from None


def render_notice(
    incident: Incident, owner: Any, addresses: list[str], link: str
) -> tuple[str, str]:
    """The notice to ``owner`` about ``addresses``, from the incident's template.

    The context holds plain values only: ``owner.name``, ``owner.username``,
    ``mailboxes`` (addresses), ``incident.title``, ``incident.declared_at``,
    ``link`` (the owner's mailboxes page).
    """
    context = Context(
        {
            "owner": {
                "name": (owner.get_full_name() if hasattr(owner, "get_full_name") else "")
                or owner.get_username(),
                "username": owner.get_username(),
            },
            "mailboxes": addresses,
            "incident": {"title": incident.title, "declared_at": incident.declared_at},
            "link": link,
        },
        # Plain text: a Context escapes for HTML unless told not to (the
        # engine's autoescape=False applies only to contexts it makes itself).
        autoescape=False,
    )
    subject = _ENGINE.from_string(incident.notice_subject or str(DEFAULT_NOTICE_SUBJECT))
    body = _ENGINE.from_string(incident.notice_body or str(DEFAULT_NOTICE_BODY))
    return " ".join(subject.render(context).split()), body.render(context)


def affected_owners(incident: Incident) -> Iterator[dict[str, Any]]:
    """Per owner with a mailbox in the scope: id, username, email, addresses.
    Ordered by owner; streamed (two queries whatever the size)."""
    from django.contrib.auth import get_user_model

    User = get_user_model()
    rows = (
        scope_queryset(incident)
        .order_by("owner_id", "address")
        .values_list("owner_id", "address", "status")
    )
    current: Any = None
    addresses: list[str] = []
    statuses: list[str] = []
    users = {
        user.pk: user
        for user in User.objects.filter(
            pk__in=scope_queryset(incident).values("owner_id")
        ).iterator(chunk_size=2000)
    }
    for owner_id, address, status in rows.iterator(chunk_size=2000):
        if owner_id != current and current is not None:
            yield _owner_row(users.get(current), current, addresses, statuses)
            addresses, statuses = [], []
        current = owner_id
        addresses.append(address)
        statuses.append(status)
    if current is not None:
        yield _owner_row(users.get(current), current, addresses, statuses)


def _owner_row(user: Any, owner_id: Any, addresses: list[str], statuses: list[str]) -> dict:
    return {
        "user": user,
        "user_id": owner_id,
        "username": user.get_username() if user else "",
        "email": getattr(user, "email", "") if user else "",
        "mailboxes": addresses,
        "statuses": statuses,
    }


def owners_csv(incident: Incident) -> Iterator[str]:
    """The affected owners as CSV lines (user id, username, email, mailboxes)."""
    return csv_lines(
        ["user_id", "username", "email", "mailboxes", "statuses"],
        (
            [
                row["user_id"],
                row["username"],
                row["email"],
                " ".join(row["mailboxes"]),
                " ".join(row["statuses"]),
            ]
            for row in affected_owners(incident)
        ),
    )


def notify(
    incident: Incident,
    *,
    actor: Any = None,
    label: str = "",
    subject: str | None = None,
    body: str | None = None,
    progress: Any = None,
) -> dict[str, int]:
    """Tell every affected owner, through the outbox, with the incident's
    template (``subject``/``body`` replace it first).

    At most one notice per owner and incident: a second run tells only
    owners who were not told yet (new in the scope, or without an address
    the first time). Returns ``{"owners", "queued", "skipped"}``.
    """
    from mailgov.notifications import enqueue_notification, mailboxes_link

    with transaction.atomic():
        locked = _open(incident)
        if subject is not None or body is not None:
            new_subject = locked.notice_subject if subject is None else subject
            new_body = locked.notice_body if body is None else body
            validate_notice(new_subject, new_body)
            locked.notice_subject, locked.notice_body = new_subject, new_body
            locked.save(update_fields=["notice_subject", "notice_body"])
        else:
            validate_notice(locked.notice_subject, locked.notice_body)
    _refresh(incident, locked)
    link = mailboxes_link()
    counts = {"owners": 0, "queued": 0, "skipped": 0}
    for row in affected_owners(locked):
        counts["owners"] += 1
        user = row["user"]
        if user is None:
            counts["skipped"] += 1
            continue
        subject_text, body_text = render_notice(locked, user, row["mailboxes"], link)
        with transaction.atomic():
            queued = enqueue_notification(
                event="incident",
                user=user,
                mailbox=None,
                subject=subject_text,
                body=body_text,
                key=f"incident:{locked.pk}:{user.pk}",
            )
        counts["queued" if queued is not None else "skipped"] += 1
        if progress is not None:
            progress(1)
    with transaction.atomic():
        Incident.objects.filter(pk=locked.pk).update(notified_at=timezone.now())
        record(locked, Step.NOTIFY, actor=actor, label=label, counts=counts)
    incident.notified_at = timezone.now()
    return counts


# -- resolve --------------------------------------------------------------------------


def resolve(
    incident: Incident, *, summary: str, actor: Any = None, label: str = ""
) -> dict[str, int]:
    """Close the incident with ``summary``; its freeze is lifted (held mail
    queued again). Returns ``{"released"}``."""
    summary = (summary or "").strip()
    if not summary:
        raise IncidentStateError("Resolving an incident needs a summary.")
    now = timezone.now()
    with transaction.atomic():
        locked = _open(incident)
        released = 0
        if locked.frozen:
            locked.unfrozen_at = now
        locked.state = Incident.State.RESOLVED
        locked.resolved_at = now
        locked.summary = summary
        locked.save(update_fields=["unfrozen_at", "state", "resolved_at", "summary"])
        released = release_frozen(now=now, incident=locked, actor=actor)
        counts = {"released": released}
        record(locked, Step.RESOLVE, actor=actor, label=label, counts=counts, note=summary)
    _refresh(incident, locked)
    security_logger.warning("incident #%s resolved", incident.pk)
    return counts


# -- reports --------------------------------------------------------------------------


def incident_status(incident: Incident) -> dict[str, Any]:
    """Where the incident stands: scope size by status, held mail, pending
    revocations, notices queued and sent."""
    scope = scope_queryset(incident)
    by_status = {status: 0 for status in Mailbox.Status.values}
    for status in scope.order_by().values_list("status", flat=True):
        by_status[status] += 1
    pending = MailboxCredentials.objects.filter(
        mailbox__in=scope, mailbox__status=Mailbox.Status.REVOKED, refresh_token__isnull=False
    )
    notices = OutboxMessage.objects.filter(
        kind=OutboxMessage.Kind.NOTIFICATION,
        idempotency_key__startswith=f"notify:incident:{incident.pk}:",
    )
    return {
        "id": incident.pk,
        "title": incident.title,
        "state": incident.state,
        "severity": incident.severity,
        "scope": describe_scope(incident),
        "frozen": incident.frozen,
        "contained": incident.contained_at is not None,
        "containment_done": incident.containment_done_at is not None,
        "mailboxes": sum(by_status.values()),
        "by_status": by_status,
        "held": OutboxMessage.objects.filter(
            state=State.HELD, mailbox__in=scope, error_code__in=["frozen", "mailbox_revoked"]
        ).count(),
        "revocations_pending": pending.filter(mailbox__revocation_given_up_at__isnull=True).count(),
        "revocations_given_up": pending.filter(
            mailbox__revocation_given_up_at__isnull=False
        ).count(),
        "notices_queued": notices.filter(state__in=[State.QUEUED, State.SENDING]).count(),
        "notices_sent": notices.filter(state=State.SENT).count(),
    }


TIMELINE_FIELDS = ("at", "step", "actor", "counts", "note", "cid")


def timeline(incident: Incident) -> list[dict[str, Any]]:
    """The incident's timeline as plain values (ISO times)."""
    return [
        {
            "at": event.at.isoformat(),
            "step": event.step,
            "actor": event.actor_label,
            "counts": event.counts,
            "note": event.note,
            "cid": event.cid,
        }
        for event in incident.timeline.order_by("at", "id")
    ]


def timeline_json(incident: Incident) -> str:
    return json.dumps(
        {
            "incident": {
                "id": incident.pk,
                "title": incident.title,
                "severity": incident.severity,
                "scope": describe_scope(incident),
                "state": incident.state,
                "declared_at": incident.declared_at.isoformat(),
                "resolved_at": incident.resolved_at.isoformat() if incident.resolved_at else None,
                "summary": incident.summary,
            },
            "timeline": timeline(incident),
        },
        indent=2,
    )


def timeline_csv(incident: Incident) -> str:
    return "".join(
        csv_lines(
            TIMELINE_FIELDS,
            (
                [
                    row["at"],
                    row["step"],
                    row["actor"],
                    json.dumps(row["counts"], sort_keys=True),
                    row["note"],
                    row["cid"],
                ]
                for row in timeline(incident)
            ),
        )
    )
