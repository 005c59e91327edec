"""An incident's scope: which mailboxes it covers, as a filter (set-based
work) and as a test of one mailbox (the kill switches, before every
message). Both give the same answer; ``tests/test_incidents.py`` checks it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from django.db.models import Q, QuerySet

from mailgov.capabilities import get_capability
from mailgov.exceptions import IncidentStateError, MailgovConfigurationError
from mailgov.models import Incident, Mailbox
from mailgov.providers import get_provider

__all__ = ["covers", "scope_q", "scope_queryset"]


def _capability_q(capability_id: str) -> Q:
    """Mailboxes granted the capability's required scopes, per provider.

    Scopes are a JSON list: matched as the quoted scope in its text, which
    works on every database (JSON containment is PostgreSQL's alone). A
    provider id that is no longer configured matches whole: an incident
    errs on the side of covering a mailbox.
    """
    capability = get_capability(capability_id)
    if capability is None:
        raise IncidentStateError(f"Unknown capability {capability_id!r}.")
    q = Q(pk__in=[])
    for provider_id in Mailbox.objects.order_by().values_list("provider", flat=True).distinct():
        try:
            provider = get_provider(provider_id)
        except MailgovConfigurationError:  # not configured now
            q |= Q(provider=provider_id)
            continue
        scopes_q = Q(provider=provider_id)
        for scope in capability.required_scopes(provider):
            scopes_q &= Q(scopes__icontains=json.dumps(scope))
        q |= scopes_q
    return q


def scope_q(incident: Incident) -> Q:
    """The incident's scope as a filter on :class:`Mailbox`."""
    kind = incident.scope
    if kind == Incident.Scope.ALL:
        return Q()
    if kind == Incident.Scope.PROVIDER:
        return Q(provider=incident.scope_value)
    if kind == Incident.Scope.CAPABILITY:
        return _capability_q(incident.scope_value)
    if kind == Incident.Scope.USERS:
        return Q(owner_id__in=[str(pk) for pk in incident.scope_ids])
    if kind == Incident.Scope.MAILBOXES:
        return Q(pk__in=[str(pk) for pk in incident.scope_ids])
    raise IncidentStateError(f"Unknown scope {kind!r}.")


def scope_queryset(incident: Incident) -> QuerySet[Mailbox]:
    """Every mailbox in the incident's scope, whatever its status."""
    return Mailbox.objects.filter(scope_q(incident))


@functools.lru_cache(maxsize=64)
def _scope_ids_of(incident_id: int, declared_at: Any) -> frozenset[str]:
    ids = Incident.objects.filter(pk=incident_id).values_list("scope_ids", flat=True).first()
    return frozenset(str(pk) for pk in ids or ())


def _scope_ids(incident: Incident) -> frozenset[str]:
    """The incident's ids as a set, kept per process: a scope never changes
    once declared, and the kill switches test it before every message."""
    if incident.pk is None:
        return frozenset(str(pk) for pk in incident.scope_ids)
    # Keyed by the declaration time too: a database restored or flushed
    # (tests) may give another incident the same id.
    return _scope_ids_of(incident.pk, incident.declared_at)


def covers(incident: Incident, mailbox: Mailbox) -> bool:
    """Whether ``mailbox`` is in ``incident``'s scope (in Python, no query
    except for a capability scope)."""
    kind = incident.scope
    if kind == Incident.Scope.ALL:
        return True
    if kind == Incident.Scope.PROVIDER:
        return mailbox.provider == incident.scope_value
    if kind == Incident.Scope.USERS:
        return str(mailbox.owner_id) in _scope_ids(incident)
    if kind == Incident.Scope.MAILBOXES:
        return str(mailbox.pk) in _scope_ids(incident)
    if kind == Incident.Scope.CAPABILITY:
        capability = get_capability(incident.scope_value)
        if capability is None:
            return True
        try:
            provider = get_provider(mailbox.provider)
        except MailgovConfigurationError:
            return True
        return mailbox.has_scopes(capability.required_scopes(provider))
    return True
