"""A fault switch for tests: make the token or revocation endpoint fail, then recover.

The server reads ``<data dir>/faults.json`` on every request to those
endpoints (one small file read; no file, no fault), so a test in another
process switches faults on and off without restarting it. The file maps an
endpoint to the HTTP status it answers with, instead of doing its work::

    {"token": 503, "revoke": 503}

The answer's body is ``{"error": "temporarily_unavailable"}`` (RFC 6749
§4.1.2.1's code for a server that cannot handle the request for now).
Tests write the file with :meth:`mailgov.testing.peers.AuthServer.set_faults`
and remove it with ``clear_faults()``; a file that cannot be read or parsed
counts as no fault (and is logged), so a half-written switch never fails a
request by accident (``set_faults`` replaces the file atomically anyway).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger("mailgov.testing.authserver")

#: Fault names, by the URL name of the endpoint they break (see urls.py).
ENDPOINTS = {"token": "token", "revoke-token": "revoke"}
FAULTS_FILE = "faults.json"


def read_faults(path: Path) -> dict[str, int]:
    """The faults switched on in ``path``: fault name to HTTP status (400-599)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s ignored: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        name: status
        for name, status in data.items()
        if name in ENDPOINTS.values() and isinstance(status, int) and 400 <= status <= 599
    }


class FaultMiddleware:
    """Answer a switched-on endpoint with its fault's status instead of its work."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.path = Path(settings.DATA_DIR) / FAULTS_FILE

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request: HttpRequest, view: Any, args: Any, kwargs: Any) -> Any:
        name = ENDPOINTS.get(getattr(request.resolver_match, "url_name", None) or "")
        if name is None:
            return None
        status = read_faults(self.path).get(name)
        if status is None:
            return None
        response = JsonResponse({"error": "temporarily_unavailable"}, status=status)
        response["Cache-Control"] = "no-store"
        return response
