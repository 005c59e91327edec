"""allauth's OAuth2 callbacks, keeping the granted ``scope`` of the token response.

allauth's ``parse_token()`` drops the ``scope`` field, yet a user may untick
single scopes (Google's granular consent), so what was granted must be read
from the response. These views are allauth's own, with adapters that keep
it on the token as ``mailgov_granted_scopes`` (``None`` when the response did
not say, which RFC 6749 §5.1 reads as "as requested").

They also set ``Cache-Control: no-store`` and ``Referrer-Policy: no-referrer``
on the callback's response (RFC 9700), and are rate limited.
"""

from __future__ import annotations

from functools import wraps
from typing import Any

from allauth.socialaccount.providers.google.views import GoogleOAuth2Adapter
from allauth.socialaccount.providers.microsoft.views import MicrosoftGraphOAuth2Adapter
from allauth.socialaccount.providers.oauth2.views import OAuth2CallbackView
from allauth.socialaccount.providers.openid_connect.views import OpenIDConnectOAuth2Adapter
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache

from mailgov.contrib.allauth.limits import limited


class KeepGrantedScopes:
    def parse_token(self, data: dict[str, Any]):
        token = super().parse_token(data)
        scope = data.get("scope")
        if isinstance(scope, str):
            token.mailgov_granted_scopes = scope.split()
        elif isinstance(scope, list):
            token.mailgov_granted_scopes = [str(s) for s in scope]
        else:
            token.mailgov_granted_scopes = None
        return token


class GoogleAdapter(KeepGrantedScopes, GoogleOAuth2Adapter):
    pass


class MicrosoftAdapter(KeepGrantedScopes, MicrosoftGraphOAuth2Adapter):
    pass


class OpenIDConnectAdapter(KeepGrantedScopes, OpenIDConnectOAuth2Adapter):
    pass


def callback_view(view):
    """Rate limit, and make the callback's answer neither cached nor referred."""

    @wraps(view)
    @login_not_required
    @never_cache
    @limited("CALLBACK_RATE")
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        # never_cache adds Cache-Control: no-store (and more) on the way out.
        response["Referrer-Policy"] = "no-referrer"
        return response

    return wrapped


google_callback = callback_view(OAuth2CallbackView.adapter_view(GoogleAdapter))
microsoft_callback = callback_view(OAuth2CallbackView.adapter_view(MicrosoftAdapter))


@callback_view
def openid_connect_callback(request: HttpRequest, provider_id: str) -> HttpResponse:
    view = OAuth2CallbackView.adapter_view(OpenIDConnectAdapter(request, provider_id))
    return view(request)
