"""WSGI entry point of the demo authorization server."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailgov.testing.authserver.settings")

application = get_wsgi_application()
