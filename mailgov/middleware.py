"""Request middleware of the governance portal."""

from __future__ import annotations

import re
from collections.abc import Callable

from auditlog.cid import correlation_id
from django.http import HttpRequest, HttpResponse

from mailgov.audit import new_cid

#: What a correlation id from a client or proxy may look like.
CID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
HEADER = "X-Correlation-ID"


class CorrelationIdMiddleware:
    """Give every request a correlation id that reaches its audit entries.

    Takes the ``X-Correlation-ID`` request header when it looks like an id
    (a proxy's or a load balancer's), else makes one; returns it in the
    response header of the same name. Place it after
    ``auditlog.middleware.AuditlogMiddleware``, which reads the header
    itself but leaves the id empty when there is none.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        given = request.headers.get(HEADER, "")
        cid = given if CID_PATTERN.match(given) else new_cid()
        request.correlation_id = cid
        token = correlation_id.set(cid)
        try:
            response = self.get_response(request)
        finally:
            correlation_id.reset(token)
        response[HEADER] = cid
        return response
