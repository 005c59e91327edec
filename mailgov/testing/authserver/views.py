"""The authorization server's own views, each a thin subclass of DOT's.

- ``ConsentView``: DOT's authorization view with our consent template, and the
  RFC 9207 ``iss`` on error redirects too.
- ``DiscoveryView``: DOT's OIDC discovery document does not list the revocation
  and introspection endpoints (only its RFC 8414 document does), and lists
  ``plain`` PKCE unless a gate is on; mailgov reads all three from here.
- ``IntrospectionView``: RFC 7662, POST only, with the token owner's ``email``
  (the SMTP server compares it with the XOAUTH2 ``user=``) and ``sub``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.contrib.auth.views import LoginView, LogoutView
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.generic import TemplateView
from oauth2_provider.models import get_access_token_model
from oauth2_provider.settings import oauth2_settings
from oauth2_provider.views import AuthorizationView, ConnectDiscoveryInfoView, IntrospectTokenView
from oauthlib.common import add_params_to_uri

from mailgov.testing.authserver.oauth import CODE_CHALLENGE_METHODS

#: What discovery advertises: only what this server actually accepts.
GRANT_TYPES_SUPPORTED = ["authorization_code", "refresh_token", "client_credentials"]


class HomeView(TemplateView):
    """A landing page: who is signed in, and where the discovery document is."""

    template_name = "authserver/home.html"


class AuthserverLoginView(LoginView):
    template_name = "authserver/login.html"


class AuthserverLogoutView(LogoutView):
    """POST-only logout (Django 5), so a cross-site link cannot sign you out."""


@method_decorator(never_cache, name="dispatch")
class ConsentView(AuthorizationView):
    """The consent page: application name, each scope in plain words, Allow/Deny.

    The template gets ``scope_items``, a list of ``(scope, description)`` pairs,
    each shown with a checkbox: the user may untick single scopes, as Google's
    granular consent allows (see :meth:`post`).
    """

    template_name = "authserver/authorize.html"

    def redirect(self, redirect_to: str, application: Any) -> HttpResponse:
        # RFC 9207 §2: `iss` goes in every authorization response, errors included;
        # DOT adds it only to the responses oauthlib builds, not to access_denied
        # or to errors found before the consent page.
        if oauth2_settings.COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS and "iss" not in parse_qs(
            urlsplit(redirect_to).query
        ):
            issuer = oauth2_settings.oauth2_authorization_server_issuer(self.request)
            redirect_to = add_params_to_uri(redirect_to, [("iss", issuer)])
        return super().redirect(redirect_to, application)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        # Granular consent: grant only the scopes left ticked, and never one
        # the client did not request (read from the authorization request in
        # the URL, not from the user-editable form). Nothing ticked is a deny.
        if request.POST.get("scope_choices") == "1":
            requested = request.GET.get("scope", request.POST.get("scope", "")).split()
            ticked = set(request.POST.getlist("granted_scope"))
            data = request.POST.copy()
            granted = [scope for scope in requested if scope in ticked]
            data["scope"] = " ".join(granted)
            if not granted:
                data.pop("allow", None)
            request.POST = data
        return super().post(request, *args, **kwargs)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        scopes = context.get("scopes") or []
        descriptions = context.get("scopes_descriptions") or []
        context["scope_items"] = list(zip(scopes, descriptions, strict=False))
        return context


class DiscoveryView(ConnectDiscoveryInfoView):
    """OIDC discovery, completed with revocation, introspection and S256-only PKCE."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = super().get(request, *args, **kwargs)
        data = json.loads(response.content)
        auth_methods = list(oauth2_settings.OIDC_TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED)
        data.update(
            {
                "revocation_endpoint": self._get_endpoint_url(
                    request, "revoke-token", required=True
                ),
                "revocation_endpoint_auth_methods_supported": auth_methods,
                "introspection_endpoint": self._get_endpoint_url(
                    request, "introspect", required=True
                ),
                "introspection_endpoint_auth_methods_supported": auth_methods,
                "code_challenge_methods_supported": list(CODE_CHALLENGE_METHODS),
                "grant_types_supported": GRANT_TYPES_SUPPORTED,
                "response_modes_supported": ["query"],
                # Every client here signs with RS256; HS256 would mean the client
                # secret is stored unhashed, as the HMAC key.
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )
        new = JsonResponse(data)
        new["Access-Control-Allow-Origin"] = "*"
        return new


class IntrospectionView(IntrospectTokenView):
    """RFC 7662 token introspection for confidential clients (HTTP Basic or body).

    Answers ``{"active": false}`` for an unknown, expired or revoked token; for an
    active one: ``active``, ``scope``, ``exp``, ``client_id``, ``token_type``, and
    when the token has a user ``username``, ``sub`` and ``email``.
    """

    # GET would put the token in the URL, and so in server logs.
    http_method_names = ["post", "options"]

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = super().post(request, *args, **kwargs)
        if response.status_code == 200:
            data = json.loads(response.content)
            if data.get("active"):
                data["token_type"] = "Bearer"
                user = self._token_user(request.POST.get("token", ""))
                if user is not None:
                    data["sub"] = str(user.pk)
                    data["email"] = user.email
                response = JsonResponse(data)
        # RFC 7662 §4: the answer describes a live credential.
        response["Cache-Control"] = "no-store"
        return response

    @staticmethod
    def _token_user(token_value: str) -> Any:
        # Same lookup as DOT's view: tokens are found by their SHA-256 checksum
        # (and stored only as that, see COMPLIANT_BCP_RFC9700_TOKEN_STORAGE).
        checksum = hashlib.sha256(token_value.encode("utf-8")).hexdigest()
        token = (
            get_access_token_model()
            .objects.select_related("user")
            .filter(token_checksum=checksum)
            .first()
        )
        return token.user if token is not None else None
