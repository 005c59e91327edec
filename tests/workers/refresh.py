"""A second process for the single-flight test: N threads send a message through
mailgov's backend at the same instant against the test database, then print,
per thread, the digest of the token it used (or the error).

Environment: MAILGOV_TEST_DB_NAME, MAILGOV_TEST_KEYS, MAILGOV_TEST_PROVIDERS
(JSON), MAILGOV_TEST_MAILBOX, MAILGOV_TEST_THREADS, MAILGOV_TEST_START_AT.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from tests.workers.setup import setup_django

setup_django(EMAIL_BACKEND="mailgov.backends.smtp.EmailBackend")

from django.core.mail import send_mail  # noqa: E402
from django.db import connection  # noqa: E402

from mailgov.models import Mailbox  # noqa: E402
from mailgov.tokens import get_access_token  # noqa: E402


def main() -> None:
    mailbox = Mailbox.objects.get(pk=os.environ["MAILGOV_TEST_MAILBOX"])
    threads = int(os.environ.get("MAILGOV_TEST_THREADS", "4"))
    start_at = float(os.environ["MAILGOV_TEST_START_AT"])
    results: list[str] = []

    def work() -> None:
        time.sleep(max(0.0, start_at - time.time()))
        try:
            send_mail("From process 2", "x", mailbox.address, ["z@x.test"])
            token = get_access_token(mailbox)
            results.append(hashlib.sha256(token.encode()).hexdigest())
        except Exception as exc:
            results.append(f"error:{type(exc).__name__}")
        finally:
            connection.close()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
