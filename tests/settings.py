"""Test settings: the demo site's, with a throwaway key and a file SQLite database.

The SQLite test database is a file (not ``:memory:``) so that a second
process can open it: the single-flight refresh test runs two processes.
``DATABASE_URL`` selects PostgreSQL as in the demo.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault(
    "MAILGOV_VAR_DIR", str(Path(tempfile.gettempdir()) / f"mailgov-test-var-{os.getpid()}")
)

from mailgov.crypto import generate_key_entry
from project.settings import *  # noqa: F403
from project.settings import DATABASES, VAR_DIR

SECRET_KEY = "test-only-secret-key-not-for-production"
DEBUG = False
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# A fresh key per test run; never the demo's key file, never SECRET_KEY.
MAILGOV_ENCRYPTION_KEYS = [generate_key_entry("test1")]
MAILGOV_ENCRYPTION_KEYS_FILE = None
# Filled in by the session fixtures once the peers are started.
MAILGOV_PROVIDERS = {}

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
else:
    # A database of this run's own on a shared server: two runs at once (a
    # developer's beside CI's) must not drop each other's. (Helper processes
    # that tests start are given the run's database by name.)
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"mailgov": {"level": "DEBUG", "propagate": True}},
}
