"""The authorization server's OAuth2/OIDC policy, plugged into django-oauth-toolkit.

- ``MailgovOAuth2Validator``: the OIDC claims (``email``, ``email_verified``,
  ``name``, ``preferred_username``).
- ``S256OnlyServer``: PKCE with ``S256`` only. oauthlib accepts ``plain`` and even
  defaults a missing ``code_challenge_method`` to ``plain``; DOT's
  ``COMPLIANT_BCP_RFC9700_PKCE_METHOD`` gate rejects ``plain`` only when the code
  is about to be saved, after the user has already consented. This server refuses
  it before the consent page is shown, and again on the consent POST (whose hidden
  fields a user can edit), because oauthlib re-validates the request there.
- ``MailgovScopes``: a client-credentials client (a resource server such as the
  SMTP server) gets no scopes: ``mail.send`` means "as this user", and such a
  token has no user.
"""

from __future__ import annotations

from typing import Any

from oauth2_provider.models import AbstractApplication
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.scopes import SettingsScopes
from oauthlib.common import Request
from oauthlib.oauth2.rfc6749 import errors
from oauthlib.openid import Server

#: The only PKCE method this server accepts (RFC 9700 §2.1.1).
CODE_CHALLENGE_METHODS = ("S256",)


def require_s256(request: Request) -> dict[str, Any]:
    """oauthlib ``pre_auth`` validator: refuse any PKCE method but ``S256``.

    Runs before oauthlib fills in the ``plain`` default, so a challenge sent
    without a method is refused too. A request without a challenge passes here and
    is refused by oauthlib itself (``PKCE_REQUIRED``).
    """
    if request.code_challenge is not None and (
        request.code_challenge_method not in CODE_CHALLENGE_METHODS
    ):
        raise errors.UnsupportedCodeChallengeMethodError(
            description='code_challenge_method must be "S256".', request=request
        )
    return {}


class S256OnlyServer(Server):
    """oauthlib's OIDC server with ``require_s256`` on every code-issuing grant."""

    def __init__(self, request_validator: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request_validator, *args, **kwargs)
        # The OIDC grants proxy `custom_validators` to their inner OAuth2 grant, so
        # each list below is a distinct grant's own list.
        for grant in (self.auth_grant, self.openid_connect_auth, self.openid_connect_hybrid):
            grant.custom_validators.pre_auth.append(require_s256)


class MailgovOAuth2Validator(OAuth2Validator):
    """Adds the standard claims mailgov reads; DOT's ``oidc_claim_scope`` table
    already releases ``email``/``email_verified`` only under the ``email`` scope
    and ``name``/``preferred_username`` only under ``profile``."""

    def get_additional_claims(self) -> dict[str, Any]:
        # The request-agnostic form (callables of the request) lets DOT list the
        # claims in the discovery document's `claims_supported`.
        return {
            "email": lambda request: request.user.email,
            # Accounts here are made by an operator (authserver_seed, the shell),
            # never by self-service sign-up, so their addresses are vouched for.
            "email_verified": lambda request: bool(request.user.email),
            "name": lambda request: request.user.get_full_name() or request.user.get_username(),
            "preferred_username": lambda request: request.user.get_username(),
        }


class MailgovScopes(SettingsScopes):
    """Settings scopes, except that client-credentials clients get none."""

    def get_available_scopes(
        self, application: Any = None, request: Any = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        if _is_machine_client(application):
            return []
        return super().get_available_scopes(application, request, *args, **kwargs)

    def get_default_scopes(
        self, application: Any = None, request: Any = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        if _is_machine_client(application):
            return []
        return super().get_default_scopes(application, request, *args, **kwargs)


def _is_machine_client(application: Any) -> bool:
    return (
        application is not None
        and application.authorization_grant_type == AbstractApplication.GRANT_CLIENT_CREDENTIALS
    )
