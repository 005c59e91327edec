"""Run one mailgov sweep task in this process at a given instant; print its result.

For the "two beats" test: two of these start the same sweep at the same
moment, as two beats (or beat and an operator's command) would.
Environment: as tests/workers/celery_worker.py, plus ``MAILGOV_TEST_TASK``
(e.g. ``refresh_tokens``) and ``MAILGOV_TEST_START_AT`` (a time.time()).
"""

from __future__ import annotations

import json
import os
import time

from tests.workers.setup import setup_django

setup_django()

from mailgov import tasks  # noqa: E402


def main() -> None:
    task = getattr(tasks, os.environ["MAILGOV_TEST_TASK"])
    time.sleep(max(0.0, float(os.environ["MAILGOV_TEST_START_AT"]) - time.time()))
    # The task's body, run here as a worker would run it.
    print(json.dumps(task.run()))


if __name__ == "__main__":
    main()
