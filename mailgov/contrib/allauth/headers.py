"""Response headers of the consent flow: never cached, never referred elsewhere.

Every response of the flow may carry something that must stay between the
browser and us: the redirect to the provider carries the ``state`` and the
PKCE challenge, a callback URL carries the authorization code, and the pages
show which mailboxes a user has connected. So every response gets
``Cache-Control: no-store`` (with the rest of
:func:`~django.utils.cache.add_never_cache_headers`) and a ``Referrer-Policy``
of its own, whatever the site's default is:

- ``no-referrer`` on every redirect, on every response at a URL that may carry
  a code or state (callbacks, the 429 page) and on pages without a form;
- ``same-origin`` on the few pages at clean URLs that hold a form posting back
  to this site (the consent page, the mailboxes page, the sign-in
  confirmation). It sends nothing to any other origin either; ``no-referrer``
  there would make browsers send ``Origin: null`` with the form's POST (the
  Fetch standard's rule for that policy), which Django's CSRF protection
  rightly refuses, and the user could never give or withdraw consent.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils.cache import add_never_cache_headers

NO_REFERRER = "no-referrer"
SAME_ORIGIN = "same-origin"


def make_private(response: HttpResponse, page_policy: str = NO_REFERRER) -> HttpResponse:
    """Mark ``response`` as never cached; ``no-referrer`` for a redirect,
    ``page_policy`` for anything else. Returns ``response``."""
    add_never_cache_headers(response)
    redirect = 300 <= response.status_code < 400
    response["Referrer-Policy"] = NO_REFERRER if redirect else page_policy
    return response


def private(
    view: Callable[..., HttpResponse] | None = None, *, forms: bool = False
) -> Callable[..., Any]:
    """Decorate a view of the consent flow so that every response it returns
    (a page, a redirect, an error page it renders itself) is private.

    ``forms=True`` for a view whose pages hold a form that posts to this site
    (see the module docstring). Put it outermost, so that a redirect to the
    login page made by an inner ``login_required`` is covered too.
    """
    page_policy = SAME_ORIGIN if forms else NO_REFERRER

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            return make_private(view(request, *args, **kwargs), page_policy)

        return wrapped

    return decorator(view) if view is not None else decorator
