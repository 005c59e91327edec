"""A second process for the rotation-while-sending test: runs ``rotate_keys()``
against the test database and prints, as JSON, the wall-clock time at which
each batch ended, and the result counts.

Environment: MAILGOV_TEST_DB_NAME, MAILGOV_TEST_KEYS, MAILGOV_TEST_BATCH_SIZE.
"""

from __future__ import annotations

import json
import os
import time

from tests.workers.setup import setup_django

setup_django()

from mailgov.services import rotate_keys  # noqa: E402


def main() -> None:
    batch_ends: list[float] = []
    started = time.time()
    result = rotate_keys(
        batch_size=int(os.environ["MAILGOV_TEST_BATCH_SIZE"]),
        progress=lambda n: batch_ends.append(time.time()),
    )
    print(
        json.dumps(
            {
                "started": started,
                "batch_ends": batch_ends,
                "rotated": result.rotated,
                "rows": result.rows,
                "failed": result.failed_rows,
                "busy": getattr(result, "busy_rows", []),
            }
        )
    )


if __name__ == "__main__":
    main()
