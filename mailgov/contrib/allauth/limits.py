"""Rate limits of the consent pages (django-ratelimit), per user and per IP.

Each limited view carries two limits, one keyed on the client's IP address and
one on the signed-in user (the IP for anonymous requests); over either, the
view answers 429 (see :func:`mailgov.contrib.allauth.views.ratelimited`).
Rates are settings (``MAILGOV_CONSENT_RATE`` and so on), read per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest
from django_ratelimit.decorators import ratelimit

from mailgov.conf import mailgov_settings


def user_key(group: str, request: HttpRequest) -> str:
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"ip:{request.META.get('REMOTE_ADDR', '')}"


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
