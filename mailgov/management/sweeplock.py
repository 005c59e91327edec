"""The sweep lock as the operators' commands take it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.core.management.base import CommandError

from mailgov.sweeps import SweepRun, exclusive


@contextmanager
def command_lock(name: str) -> Iterator[SweepRun]:
    """Hold sweep ``name``'s lock for a manual run (no minimum interval), or
    stop the command with a plain message when another run holds it."""
    with exclusive(name, min_interval=0) as run:
        if not run:
            raise CommandError(
                f"Another run holds the {name} lock (the periodic task, or another "
                "command): nothing was done. Try again when it has finished."
            )
        yield run
