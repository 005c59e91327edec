"""The Content-Security-Policy of the demo site, with the providers' origins in
``form-action``.

The consent page and allauth's "Continue" page hold a form that posts to this
site, which answers with a redirect to the provider's authorization endpoint.
Chromium (and the CSP 3 draft) checks ``form-action`` against every redirect
that follows a form submission, so with ``form-action 'self'`` alone the
browser would stop at the redirect and nobody could connect a mailbox. The
origins come from the configured providers (``MAILGOV_PROVIDERS`` and allauth's
``SOCIALACCOUNT_PROVIDERS``), read on each response so that
``override_settings`` and the tests' live authorization server are honoured;
``DJANGO_CSP_FORM_ACTION`` adds any others.

It is the project's, not mailgov's: the reusable app does not require
django-csp.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

from csp.middleware import CSPMiddleware, PolicyParts
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase

#: The origins of the authorization endpoints of the providers whose
#: endpoints are fixed (see mailgov.providers.google and .microsoft).
FIXED_ORIGINS = {
    "google": "https://accounts.google.com",
    "microsoft": "https://login.microsoftonline.com",
}


def origin(url: str) -> str | None:
    parts = urlsplit(url)
    if not (parts.scheme and parts.netloc):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def provider_origins() -> Iterator[str]:
    """The origin of every configured provider's authorization endpoint.

    For an OpenID Connect provider, the origin of its ``server_url`` (or
    ``discovery_url``): its authorization endpoint is assumed to be on the same
    origin. Where it is not, add it with ``DJANGO_CSP_FORM_ACTION``.
    """
    for provider_id, config in getattr(settings, "MAILGOV_PROVIDERS", {}).items():
        kind = config.get("type", provider_id)
        if kind in FIXED_ORIGINS:
            yield FIXED_ORIGINS[kind]
        elif found := origin(config.get("server_url") or config.get("discovery_url") or ""):
            yield found
    allauth = getattr(settings, "SOCIALACCOUNT_PROVIDERS", {})
    for kind, fixed in FIXED_ORIGINS.items():
        if allauth.get(kind, {}).get("APPS"):
            yield fixed
    for app in allauth.get("openid_connect", {}).get("APPS", []):
        if found := origin(app.get("settings", {}).get("server_url", "")):
            yield found


class ProviderFormActionCSPMiddleware(CSPMiddleware):
    """django-csp's middleware, adding :func:`provider_origins` to ``form-action``."""

    def get_policy_parts(
        self, request: HttpRequest, response: HttpResponseBase, report_only: bool = False
    ) -> PolicyParts:
        parts = super().get_policy_parts(request, response, report_only)
        if report_only:
            return parts
        update = dict(parts.update or {})
        extra = update.get("form-action") or []
        if isinstance(extra, str):
            extra = [extra]
        update["form-action"] = sorted({*extra, *provider_origins()})
        parts.update = update
        return parts
