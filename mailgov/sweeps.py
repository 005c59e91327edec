"""A database lock per periodic sweep, so that a sweep's work is done once.

Celery beat must run once per site, but a second beat (a deploy that
overlapped, a copy-pasted service) or an operator's command run beside it is
a matter of time. File locks protect one host only; this lock is a row of
:class:`~mailgov.models.SweepLock`, taken with one conditional ``UPDATE``
(atomic on every database Django supports: a concurrent taker re-reads the
row after the first one commits and finds it taken):

- ``locked_until`` makes the lock expire on its own if its holder dies, so a
  killed worker never blocks a sweep for longer than ``ttl``;
- ``min_interval`` also skips a run that starts within that time of the
  previous run's start: two beats that fire the same schedule a second apart
  do the work once, not twice in a row.

Usage::

    with exclusive("refresh_tokens", ttl=600, min_interval=60) as run:
        if not run:
            return None  # another process has it, or it just ran
        ...
        run.result = {"refreshed": 10}
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError
from django.db.models import Q
from django.utils import timezone

from mailgov.models import SweepLock

logger = logging.getLogger("mailgov.sweeps")

__all__ = ["SweepRun", "acquire", "exclusive", "release"]


@dataclass
class SweepRun:
    """A held (truthy) or refused (falsy) sweep lock; ``result`` is stored at release."""

    name: str
    holder: str | None
    result: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.holder is not None


def acquire(
    name: str, *, ttl: float, min_interval: float = 0, now: datetime | None = None
) -> str | None:
    """Take the lock of sweep ``name`` for ``ttl`` seconds; return the holder
    token, or ``None`` if another run holds it (or started within
    ``min_interval`` seconds)."""
    now = now or timezone.now()
    SweepLock.objects.get_or_create(name=name)
    holder = uuid.uuid4().hex
    free = SweepLock.objects.filter(name=name).filter(
        Q(locked_until__isnull=True) | Q(locked_until__lte=now)
    )
    if min_interval:
        free = free.filter(
            Q(last_started_at__isnull=True)
            | Q(last_started_at__lte=now - timedelta(seconds=min_interval))
        )
    taken = free.update(
        holder=holder, locked_until=now + timedelta(seconds=ttl), last_started_at=now
    )
    return holder if taken else None


def release(name: str, holder: str, result: dict[str, Any] | None = None) -> None:
    """Give the lock back (only if ``holder`` still holds it) and store ``result``."""
    SweepLock.objects.filter(name=name, holder=holder).update(
        locked_until=None, last_finished_at=timezone.now(), last_result=result or {}
    )


@contextmanager
def exclusive(
    name: str, *, ttl: float = 3600, min_interval: float = 0, now: datetime | None = None
) -> Iterator[SweepRun]:
    """Hold sweep ``name``'s lock for the block (see the module docstring)."""
    run = SweepRun(name, acquire(name, ttl=ttl, min_interval=min_interval, now=now))
    if not run:
        logger.info("sweep %s skipped: another run holds it or has just run", name)
    try:
        yield run
    finally:
        if run:
            try:
                release(name, run.holder, run.result)
            except DatabaseError as exc:
                # The lock expires on its own (ttl); the sweep's own error,
                # if any, is the one to see.
                logger.error("sweep %s: lock not released: %s", name, type(exc).__name__)
