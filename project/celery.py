"""The project's Celery app, the way Django projects wire it.

Settings come from Django's, prefixed ``CELERY_`` (``CELERY_BROKER_URL``,
``CELERY_BEAT_SCHEDULE`` ...); tasks are found in each installed app's
``tasks`` module (mailgov's are in :mod:`mailgov.tasks`).

    celery -A project worker -l info        # as many as you like, on any host
    celery -A project beat -l info          # exactly one per site
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
