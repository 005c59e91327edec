"""Rate limits of the consent pages (django-ratelimit), per user and per IP.

Each limited view carries two limits, one keyed on the client's IP address and
one on the signed-in user (the IP for anonymous requests); over either, the
view answers 429 (see :func:`mailgov.contrib.allauth.views.ratelimited`).
Rates are settings (``MAILGOV_CONSENT_RATE`` and so on), read per request.

The client's address is django-ratelimit's own (:func:`client_ip`): behind a
reverse proxy, the site's ``RATELIMIT_IP_META_KEY`` names the header, or a
function, that gives it, and both limits and consent receipts follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest
from django_ratelimit.core import _get_ip
from django_ratelimit.decorators import ratelimit

from mailgov.conf import mailgov_settings


def client_ip(request: HttpRequest) -> str:
    """The client's address as django-ratelimit's ``key="ip"`` sees it.

    Its own function, so that ``RATELIMIT_IP_META_KEY`` (a ``META`` key such
    as ``HTTP_X_REAL_IP``, a callable, or its dotted path) means one thing
    everywhere, with ``RATELIMIT_IPV4_MASK`` / ``RATELIMIT_IPV6_MASK`` applied
    (by default the whole IPv4 address and the IPv6 /64). Private in
    django-ratelimit 4.x, hence used here only; a test pins its behaviour.
    Raises ``ImproperlyConfigured`` when the setting names a header the
    request lacks, as the rate limits themselves do.
    """
    return _get_ip(request)


def user_key(group: str, request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"ip:{client_ip(request)}"


def limited(setting: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Both limits, at the rate named by ``setting`` (e.g. ``"CONSENT_RATE"``)."""

    def rate(group: str, request: HttpRequest) -> str:
        return getattr(mailgov_settings, setting)

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        group = f"mailgov.{setting.lower()}"
        view = ratelimit(group=group, key=user_key, rate=rate, method=ratelimit.ALL, block=True)(
            view
        )
        return ratelimit(
            group=group + ".ip", key="ip", rate=rate, method=ratelimit.ALL, block=True
        )(view)

    return decorator
