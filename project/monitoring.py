"""``/metrics`` in production: answered only to the monitoring system.

project/settings.py reads two protections from the environment, each
checked when set (both when both are):

- ``METRICS_TOKEN`` (``DJANGO_METRICS_TOKEN`` or ``DJANGO_METRICS_TOKEN_FILE``):
  the scrape sends ``Authorization: Bearer <token>`` (Prometheus:
  ``authorization: {credentials_file: ...}``);
- ``METRICS_ALLOWED_NETWORKS`` (``DJANGO_METRICS_ALLOWED_IPS``, addresses or
  networks, comma separated): the connecting peer (``REMOTE_ADDR``) is in
  one of them. The peer, not a forwarded header: anyone who reaches the
  process can write one, so scrape the process directly, not through the
  proxy.

With neither set, ``/metrics`` answers 404 unless ``METRICS_OPEN`` (the
demo, ``DJANGO_DEBUG`` on): a site's counters say how busy and how healthy
it is, and are not for the internet.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse

from mailgov import metrics


def peer_allowed(request: HttpRequest, networks: list[str]) -> bool:
    try:
        peer = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    # A dual-stack listener ([::]) sees an IPv4 peer as ::ffff:a.b.c.d.
    peer = getattr(peer, "ipv4_mapped", None) or peer
    return any(peer in ipaddress.ip_network(network, strict=False) for network in networks)


def token_matches(request: HttpRequest, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def protected_metrics(request: HttpRequest) -> HttpResponse:
    """:func:`mailgov.metrics.export`, behind the configured protections."""
    token = getattr(settings, "METRICS_TOKEN", "")
    networks = getattr(settings, "METRICS_ALLOWED_NETWORKS", [])
    if not token and not networks:
        if not getattr(settings, "METRICS_OPEN", False):
            raise Http404("metrics are not served without protection")
        return metrics.export(request)
    if networks and not peer_allowed(request, networks):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    if token and not token_matches(request, token):
        response = HttpResponse("unauthorized\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return metrics.export(request)
