"""allauth's OAuth2 login and callback routes, served through mailgov (same
paths and names). Include before ``allauth.urls``.

- Login: allauth lets ``?scope=`` and ``?auth_params=`` in the query string
  widen a request (even replace ``redirect_uri``); mailgov's login routes drop
  both, so sign-in asks for what settings say and nothing more.
- Callback: allauth drops the granted ``scope`` of the token response;
  mailgov's callbacks keep it (see :mod:`mailgov.contrib.allauth.callbacks`).
"""

from allauth.socialaccount import app_settings
from allauth.socialaccount.providers.google.views import oauth2_login as google_login
from allauth.socialaccount.providers.microsoft.views import oauth2_login as microsoft_login
from allauth.socialaccount.providers.openid_connect.views import login as openid_connect_login
from django.urls import path

from mailgov.contrib.allauth import callbacks
from mailgov.contrib.allauth.callbacks import server_decides_scopes

_oidc = (
    f"{app_settings.OPENID_CONNECT_URL_PREFIX}/" if app_settings.OPENID_CONNECT_URL_PREFIX else ""
)
urlpatterns = [
    path("google/login/", server_decides_scopes(google_login), name="google_login"),
    path("google/login/callback/", callbacks.google_callback, name="google_callback"),
    path("microsoft/login/", server_decides_scopes(microsoft_login), name="microsoft_login"),
    path("microsoft/login/callback/", callbacks.microsoft_callback, name="microsoft_callback"),
    path(
        f"{_oidc}<str:provider_id>/login/",
        server_decides_scopes(openid_connect_login),
        name="openid_connect_login",
    ),
    path(
        f"{_oidc}<str:provider_id>/login/callback/",
        callbacks.openid_connect_callback,
        name="openid_connect_callback",
    ),
]
