"""gunicorn's configuration for the site (README, "Deploying"):

    gunicorn -c project/gunicorn.conf.py

Workers: ``WEB_CONCURRENCY`` (gunicorn reads it itself), or ``-w N``.
Address: ``--bind`` or ``GUNICORN_CMD_ARGS="--bind=0.0.0.0:8000"``.

Metrics: with ``PROMETHEUS_MULTIPROC_DIR`` set (one empty folder, emptied
before gunicorn starts), every worker counts into files there, and
``/metrics`` sums them. A worker that exits leaves its files behind:
:func:`child_exit` tells prometheus-client, which drops the dead process's
live gauges (its counters stay in the sums, as they should).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import multiprocess

wsgi_app = "project.wsgi:application"


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's hook, in the arbiter, after a worker exited."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
