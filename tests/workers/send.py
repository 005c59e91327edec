"""Send one message through mailgov's SMTP backend from this process; print
the outcome as JSON (``{"sent": n}`` or ``{"error": "ClassName"}``).

For the kill-switch test: a process other than the one that froze sending.
Environment: as tests/workers/celery_worker.py, plus ``MAILGOV_TEST_FROM``.
"""

from __future__ import annotations

import json
import os

from tests.workers.setup import setup_django

setup_django()

from django.core.mail import EmailMessage, get_connection  # noqa: E402


def main() -> None:
    message = EmailMessage(
        "From another process", "Body.", os.environ["MAILGOV_TEST_FROM"], ["carol@example.test"]
    )
    try:
        sent = get_connection("mailgov.backends.smtp.EmailBackend").send_messages([message])
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__}))
    else:
        print(json.dumps({"sent": sent}))


if __name__ == "__main__":
    main()
