"""URLs of the demo authorization server.

The OAuth endpoints sit under ``/o/`` (DOT's usual prefix); OIDC discovery and
RFC 8414 metadata sit at the root, where the specifications put them. Every
OAuth route is in the ``oauth2_provider`` namespace because DOT reverses those
names to build the discovery documents.
"""

from __future__ import annotations

from django.urls import include, path, re_path
from oauth2_provider import views as dot_views

from mailgov.testing.authserver import views

oauth2_urlpatterns = [
    path("o/authorize/", views.ConsentView.as_view(), name="authorize"),
    path("o/token/", dot_views.TokenView.as_view(), name="token"),
    path("o/revoke_token/", dot_views.RevokeTokenView.as_view(), name="revoke-token"),
    path("o/introspect/", views.IntrospectionView.as_view(), name="introspect"),
    path("o/userinfo/", dot_views.UserInfoView.as_view(), name="user-info"),
    path("o/.well-known/jwks.json", dot_views.JwksInfoView.as_view(), name="jwks-info"),
    # OpenID Connect Discovery 1.0 §4: no trailing slash.
    re_path(
        r"^\.well-known/openid-configuration$",
        views.DiscoveryView.as_view(),
        name="oidc-connect-discovery-info",
    ),
    path(
        ".well-known/oauth-authorization-server",
        dot_views.OAuthServerMetadataView.as_view(),
        name="oauth-server-metadata",
    ),
]

urlpatterns = [
    path("", include((oauth2_urlpatterns, "oauth2_provider"))),
    path("accounts/login/", views.AuthserverLoginView.as_view(), name="login"),
    path("accounts/logout/", views.AuthserverLogoutView.as_view(), name="logout"),
    path("", views.HomeView.as_view(), name="home"),
]
