"""Random secrets kept in ``var/`` for the demo: it never ships a fixed one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def secret_from_file(path: Path) -> str:
    """The secret stored at ``path``, created (random, mode 0600) if missing."""
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return path.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()
