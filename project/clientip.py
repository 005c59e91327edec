"""The client's address behind reverse proxies, for django-ratelimit's
``RATELIMIT_IP_META_KEY`` (which mailgov's rate limits and consent receipts
read too: :func:`mailgov.contrib.allauth.limits.client_ip`).

``DJANGO_CLIENT_IP_HEADER=X-Forwarded-For`` with ``DJANGO_TRUSTED_PROXY_COUNT=N``
(project/settings.py) points the setting at :func:`forwarded_for`. Another
header (``X-Real-IP``) is named directly, as django-ratelimit reads it: one
value, set by the proxy.
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def _address(value: str) -> str | None:
    """``value`` as an IP address (a port a proxy wrote after it dropped,
    ``[v6]:port`` too), or ``None`` when it is none (``unknown``, garbage)."""
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # IPv4 with a port
        value = value.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def forwarded_for(request: HttpRequest) -> str:
    """The address the outermost of our ``TRUSTED_PROXY_COUNT`` proxies saw.

    Each proxy appends the address it received the request from to
    ``X-Forwarded-For``; whatever the client put there comes first. So the
    N-th entry from the right is the one our outermost proxy wrote, the
    client's address; anything left of it may be forged. A shorter header
    (a request through fewer proxies) has no forged entry: its first one is
    taken. No header at all, or an entry that is no IP address (``unknown``;
    django-ratelimit would fail on it): the connecting peer (``REMOTE_ADDR``).
    """
    header = request.META.get("HTTP_X_FORWARDED_FOR", "").strip()
    # Empty entries keep their place: counting from the right must not slide
    # onto an entry the client wrote.
    hops = [hop.strip() for hop in header.split(",")] if header else []
    peer = request.META.get("REMOTE_ADDR", "")
    if not hops:
        return peer
    count = settings.TRUSTED_PROXY_COUNT
    return _address(hops[-count] if len(hops) >= count else hops[0]) or peer
