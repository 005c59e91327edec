"""Response headers of the consent flow: never cached, never referred.

Every response of the flow may carry something that must stay between the
browser and us: the redirect to the provider carries the ``state`` and the
PKCE challenge, a callback carries the authorization code, and the pages
themselves show which mailboxes a user has connected. ``Cache-Control:
no-store`` (with the rest of :func:`~django.utils.cache.add_never_cache_headers`)
keeps them out of shared and browser caches; ``Referrer-Policy: no-referrer``
keeps their URLs out of the ``Referer`` of whatever the page links to or
redirects to, whatever the site's default policy is.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.cache import add_never_cache_headers


def make_private(response: HttpResponse) -> HttpResponse:
    """Mark ``response`` as neither cacheable nor to be referred; return it."""
    add_never_cache_headers(response)
    response["Referrer-Policy"] = "no-referrer"
    return response


def private(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Decorate a view of the consent flow so that every response it returns
    (a page, a redirect, an error page it renders itself) is private.

    Put it outermost, so that a redirect to the login page made by an inner
    ``login_required`` is covered too.
    """

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return make_private(view(request, *args, **kwargs))

    return wrapped
