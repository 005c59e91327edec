"""What every worker process of the tests does first: take the test run's
database, keys and providers from the environment, then set Django up.

Environment: ``MAILGOV_TEST_DB_NAME``, ``MAILGOV_TEST_KEYS`` (JSON), and
optionally ``MAILGOV_TEST_PROVIDERS`` (JSON) and ``MAILGOV_TEST_SETTINGS``
(JSON: more settings by name).
"""

from __future__ import annotations

import json
import os


def setup_django(**settings: object) -> None:
    """Configure ``tests.settings`` from the environment and ``settings``, then set Django up."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from tests import settings as test_settings

    test_settings.DATABASES["default"]["NAME"] = os.environ["MAILGOV_TEST_DB_NAME"]
    test_settings.MAILGOV_ENCRYPTION_KEYS = json.loads(os.environ["MAILGOV_TEST_KEYS"])
    if "MAILGOV_TEST_PROVIDERS" in os.environ:
        test_settings.MAILGOV_PROVIDERS = json.loads(os.environ["MAILGOV_TEST_PROVIDERS"])
    extra = json.loads(os.environ.get("MAILGOV_TEST_SETTINGS", "{}"))
    for name, value in {**extra, **settings}.items():
        setattr(test_settings, name, value)

    import django

    django.setup()
