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

from allauth.socialaccount.models import SocialApp
from allauth.socialaccount.providers.google.views import GoogleOAuth2Adapter
from allauth.socialaccount.providers.microsoft.views import MicrosoftGraphOAuth2Adapter
from allauth.socialaccount.providers.oauth2.views import OAuth2CallbackView
from allauth.socialaccount.providers.openid_connect.views import OpenIDConnectOAuth2Adapter
from allauth.utils import get_request_param
from django.contrib.auth.decorators import login_not_required
from django.http import Http404, HttpRequest, HttpResponse

from mailgov.contrib.allauth.headers import private
from mailgov.contrib.allauth.limits import limited
from mailgov.providers.base import parse_expires_in

#: Query parameters through which allauth would let a request widen itself.
WIDENING_PARAMETERS = ("scope", "auth_params")


def server_decides_scopes(view):
    """Drop ``scope`` and ``auth_params`` from the request before allauth sees it.

    The answer (allauth's confirmation page, or the redirect to the provider
    that carries the ``state`` and the PKCE challenge) is private.
    """

    @wraps(view)
    @private(forms=True)  # allauth's confirmation page posts back here
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        for name in ("GET", "POST"):
            params = getattr(request, name)
            if any(key in params for key in WIDENING_PARAMETERS):
                params = params.copy()
                for key in WIDENING_PARAMETERS:
                    params.pop(key, None)
                setattr(request, name, params)
        return view(request, *args, **kwargs)

    wrapped.mailgov_route = True
    return wrapped


class KeepGrantedScopes:
    def parse_token(self, data: dict[str, Any]):
        # allauth would int() a nonsense expires_in and fail with a 500 while
        # the code is still in the URL; mailgov reads it as "short-lived".
        data = {**data, "expires_in": parse_expires_in(data.get("expires_in"))}
        if data["expires_in"] is None:
            data.pop("expires_in")
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
    def get_access_token_data(self, request, app, client, pkce_code_verifier=None):
        # allauth joins the scopes through a set, so their order (and with it
        # the audience of the token Microsoft issues for the code) is random;
        # ask for Graph explicitly, since allauth reads the profile from it.
        # The SMTP-audience token comes from the refresh token afterwards.
        code = get_request_param(self.request, "code")
        data = client.get_access_token(
            code,
            pkce_code_verifier=pkce_code_verifier,
            extra_data={"scope": "openid email offline_access User.Read"},
        )
        self.did_fetch_access_token = True
        return data


class OpenIDConnectAdapter(KeepGrantedScopes, OpenIDConnectOAuth2Adapter):
    pass


def callback_view(view):
    """Rate limit, and make the callback's answer neither cached nor referred."""

    @wraps(view)
    @login_not_required
    @private
    @limited("CALLBACK_RATE")
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return view(request, *args, **kwargs)

    wrapped.mailgov_route = True
    return wrapped


google_callback = callback_view(OAuth2CallbackView.adapter_view(GoogleAdapter))
microsoft_callback = callback_view(OAuth2CallbackView.adapter_view(MicrosoftAdapter))


@callback_view
def openid_connect_callback(request: HttpRequest, provider_id: str) -> HttpResponse:
    try:
        view = OAuth2CallbackView.adapter_view(OpenIDConnectAdapter(request, provider_id))
        return view(request)
    except SocialApp.DoesNotExist:
        raise Http404("Unknown provider") from None
