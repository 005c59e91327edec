"""The demo's accounts.

``DEMO_USERS`` exist on the site and on the demo authorization server (they
sign in there and connect their mailboxes). ``STAFF_USERS`` exist on the site
only: the administrator, and one account of each governance group created by
mailgov's migration, to try the portal with. Their passwords are the demo's
documented ones unless the environment variable names another.
"""

from __future__ import annotations

import os

DEMO_USERS = {
    "alice": ("alice@example.test", "alice-demo-password"),
    "bob": ("bob@example.test", "bob-demo-password"),
}

#: username: (email, password variable, default password, group or None for a superuser)
STAFF_USERS = {
    "admin": ("admin@example.test", "MAILGOV_DEMO_ADMIN_PASSWORD", "admin-demo-password", None),
    "officer": (
        "officer@example.test",
        "MAILGOV_DEMO_OFFICER_PASSWORD",
        "officer-demo-password",
        "Mail security officers",
    ),
    "auditor": (
        "auditor@example.test",
        "MAILGOV_DEMO_AUDITOR_PASSWORD",
        "auditor-demo-password",
        "Mail auditors",
    ),
}


def staff_password(username: str) -> str:
    _, variable, default, _ = STAFF_USERS[username]
    return os.environ.get(variable) or default
