"""allauth's OAuth2 callback routes, served by mailgov's callbacks (same paths
and names), so that the granted scopes are kept. Include before allauth.urls."""

from allauth.socialaccount import app_settings
from django.urls import path

from mailgov.contrib.allauth import callbacks

_oidc = app_settings.OPENID_CONNECT_URL_PREFIX
urlpatterns = [
    path("google/login/callback/", callbacks.google_callback, name="google_callback"),
    path("microsoft/login/callback/", callbacks.microsoft_callback, name="microsoft_callback"),
    path(
        f"{_oidc}/<str:provider_id>/login/callback/"
        if _oidc
        else "<str:provider_id>/login/callback/",
        callbacks.openid_connect_callback,
        name="openid_connect_callback",
    ),
]
