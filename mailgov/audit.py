"""The audit trail: django-auditlog entries, with what its signals cannot see.

django-auditlog records a model's ``save()`` and ``delete()`` through model
signals. Bulk updates (``QuerySet.update()``, raw SQL) send none, so every
bulk governance action and every containment writes its entries here:
one per affected row (:func:`log_rows`) or one summarised entry naming the
ids (:func:`log_summary`). Denied attempts are entries too
(:func:`log_denied`), and go to the ``mailgov.security`` logger.

Every entry carries the request's correlation id (set by
:class:`mailgov.middleware.CorrelationIdMiddleware`; a Celery job runs under
the id and the actor of the request that started it, :func:`acting_as`).
No entry holds a token, a ciphertext or a message body: the models'
registrations exclude those fields (see ``MailgovConfig.ready``).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from auditlog.cid import correlation_id, get_cid
from auditlog.context import set_actor
from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.utils import timezone

security_logger = logging.getLogger("mailgov.security")

__all__ = [
    "acting_as",
    "current_cid",
    "log_access",
    "log_denied",
    "log_rows",
    "log_summary",
    "new_cid",
]

#: auditlog's actions, by name.
ACTIONS = {
    "create": LogEntry.Action.CREATE,
    "update": LogEntry.Action.UPDATE,
    "delete": LogEntry.Action.DELETE,
    "access": LogEntry.Action.ACCESS,
}


def new_cid() -> str:
    return uuid.uuid4().hex


def current_cid() -> str:
    """The correlation id of the request or job in progress ("" outside one)."""
    return get_cid() or ""


def _actor(actor: Any) -> Any:
    return actor if getattr(actor, "is_authenticated", False) else None


@contextlib.contextmanager
def acting_as(actor: Any, cid: str = "") -> Iterator[None]:
    """Run the block as ``actor`` (a user, or ``None``) under correlation id
    ``cid``: django-auditlog's entries written meanwhile, by signals or by
    this module, carry both. For Celery jobs started from the admin."""
    token = correlation_id.set(cid or None)
    try:
        with set_actor(_actor(actor)):
            yield
    finally:
        correlation_id.reset(token)


def _entry(
    content_type: ContentType,
    pk: Any,
    repr_: str,
    action: str,
    changes: dict[str, Any],
    actor: Any,
    additional: dict[str, Any] | None,
    now,
) -> LogEntry:
    actor = _actor(actor)
    return LogEntry(
        content_type=content_type,
        object_pk=str(pk),
        object_id=pk if isinstance(pk, int) else None,
        object_repr=repr_[:1000],
        action=ACTIONS[action],
        changes=changes,
        changes_text="",
        actor=actor,
        actor_email=getattr(actor, "email", None) if actor else None,
        cid=current_cid() or None,
        timestamp=now,
        additional_data=additional,
    )


def log_rows(
    model: type[models.Model],
    rows: Iterable[tuple[Any, str]],
    *,
    changes: dict[str, list[Any]],
    actor: Any = None,
    action: str = "update",
    additional: dict[str, Any] | None = None,
) -> int:
    """One entry per ``(pk, repr)`` of ``model``, with auditlog's
    ``{"field": [before, after]}`` ``changes``; written in bulk. Returns how many."""
    content_type = ContentType.objects.get_for_model(model, for_concrete_model=False)
    now = timezone.now()
    entries = [
        _entry(content_type, pk, repr_, action, changes, actor, additional, now)
        for pk, repr_ in rows
    ]
    LogEntry.objects.bulk_create(entries, batch_size=500)
    return len(entries)


def log_summary(
    obj: models.Model,
    *,
    what: str,
    ids: list[Any],
    changes: dict[str, list[Any]] | None = None,
    actor: Any = None,
    counts: dict[str, int] | None = None,
) -> LogEntry:
    """One entry on ``obj`` (an incident, a job) summarising a set-based
    change: ``what`` happened to the rows ``ids`` (in ``additional_data``)."""
    content_type = ContentType.objects.get_for_model(obj, for_concrete_model=False)
    entry = _entry(
        content_type,
        obj.pk,
        f"{obj}: {what}",
        "update",
        changes or {what: [None, len(ids)]},
        actor,
        {"what": what, "ids": [str(pk) for pk in ids], "counts": counts or {}},
        timezone.now(),
    )
    entry.save()
    return entry


def log_denied(request: Any, what: str, target: type[models.Model] | models.Model) -> None:
    """A refused attempt: to the security log, and as an ``access`` entry of
    the audit trail (who, what, on which model or row). Changes nothing else."""
    user = getattr(request, "user", None)
    model = target if isinstance(target, type) else type(target)
    pk = getattr(target, "pk", None) if not isinstance(target, type) else None
    security_logger.warning(
        "denied: user %s tried %r on %s%s",
        getattr(user, "pk", None),
        what,
        model._meta.label_lower,
        f" {pk}" if pk is not None else "",
    )
    content_type = ContentType.objects.get_for_model(model, for_concrete_model=False)
    _entry(
        content_type,
        pk if pk is not None else "-",
        f"denied: {what}",
        "access",
        {"denied": [None, what]},
        user,
        {"denied": what, "path": getattr(request, "path", "")[:300]},
        timezone.now(),
    ).save()


def log_access(request: Any, what: str, model: type[models.Model], count: int) -> None:
    """An export (``what``, ``count`` rows of ``model``) as an ``access``
    entry: exports of personal data are themselves audited."""
    content_type = ContentType.objects.get_for_model(model, for_concrete_model=False)
    _entry(
        content_type,
        "-",
        f"export: {what}",
        "access",
        {"exported": [None, count]},
        getattr(request, "user", None),
        {"export": what, "rows": count, "path": getattr(request, "path", "")[:300]},
        timezone.now(),
    ).save()
