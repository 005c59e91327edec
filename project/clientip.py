"""The client's address behind reverse proxies, for django-ratelimit's
``RATELIMIT_IP_META_KEY`` (which mailgov's rate limits and consent receipts
read too: :func:`mailgov.contrib.allauth.limits.client_ip`).

``DJANGO_CLIENT_IP_HEADER=X-Forwarded-For`` with ``DJANGO_TRUSTED_PROXY_COUNT=N``
(project/settings.py) points the setting at :func:`forwarded_for`. Another
header (``X-Real-IP``) is named directly, as django-ratelimit reads it: one
value, set by the proxy.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def forwarded_for(request: HttpRequest) -> str:
    """The address the outermost of our ``TRUSTED_PROXY_COUNT`` proxies saw.

    Each proxy appends the address it received the request from to
    ``X-Forwarded-For``; whatever the client put there comes first. So the
    N-th entry from the right is the one our outermost proxy wrote, the
    client's address; anything left of it may be forged. A shorter header
    (a request through fewer proxies) has no forged entry: its first one is
    taken. No header at all: the connecting peer (``REMOTE_ADDR``).
    """
    hops = [hop.strip() for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    hops = [hop for hop in hops if hop]
    if not hops:
        return request.META.get("REMOTE_ADDR", "")
    count = settings.TRUSTED_PROXY_COUNT
    return hops[-count] if len(hops) >= count else hops[0]
