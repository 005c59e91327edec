"""mailgov's periodic tasks for Celery beat (importable from settings: no models here).

    from mailgov.schedule import beat_schedule
    CELERY_BEAT_SCHEDULE = beat_schedule()           # or beat_schedule({"mailgov.purge": 3600})

Each sweep takes a database lock and skips a run that starts within half its
period of the previous run (:mod:`mailgov.sweeps`), so a second beat does no
second run; still, run exactly one beat per site.
"""

from __future__ import annotations

from typing import Any

#: Seconds between runs.
PERIODS: dict[str, float] = {
    # Recover interrupted sends, release held mail of working mailboxes, and
    # publish work for due messages whose broker hint was lost or delayed.
    "mailgov.dispatch_outbox": 10,
    "mailgov.refresh_tokens": 300,
    "mailgov.retry_revocations": 300,
    "mailgov.revoke_dormant": 3600,
    "mailgov.purge": 86400,
}


def beat_schedule(periods: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """``CELERY_BEAT_SCHEDULE`` entries for mailgov's sweeps; ``periods`` overrides."""
    periods = {**PERIODS, **(periods or {})}
    return {name: {"task": name, "schedule": float(seconds)} for name, seconds in periods.items()}
