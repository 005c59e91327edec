"""What every provider is: endpoints, pinned SMTP, and the token calls.

A provider object is cheap and built from settings on demand; nothing is read
at import time. Every HTTP call has a timeout, and errors are mapped onto the
exception tree by OAuth error code and HTTP status, never by echoing the
response body (which may quote what was sent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import requests
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    GrantRevokedError,
    MailgovConfigurationError,
    MailgovError,
    ProviderError,
    ProviderUnavailableError,
    TokenRefreshError,
    TokenRefreshUnavailableError,
)

logger = logging.getLogger("mailgov.providers")

#: ``expires_in`` values outside this range are treated as missing.
MAX_SANE_LIFETIME_SECONDS = 366 * 24 * 3600


@dataclass(frozen=True)
class TokenResponse:
    """A parsed token endpoint response. Token values are kept out of ``repr``."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    #: Seconds of life, or ``None`` when absent or nonsense.
    expires_in: int | None = None
    #: Granted scopes when the response said; ``None`` means "as requested".
    scopes: list[str] | None = None
    id_token: str | None = field(default=None, repr=False)


def parse_expires_in(value: Any) -> int | None:
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        return None
    if 0 < seconds <= MAX_SANE_LIFETIME_SECONDS:
        return seconds
    return None


class Provider:
    """Base provider. Subclasses set the class attributes."""

    #: The provider type, as used in ``MAILGOV_PROVIDERS[...]["type"]``.
    type: ClassVar[str] = ""
    name: str = ""
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: Literal["starttls", "ssl"] = "starttls"
    #: Whether the SMTP endpoint is fixed by mailgov (True for Google and
    #: Microsoft: a bearer token is never sent to any other host).
    smtp_pinned: ClassVar[bool] = True
    #: Scopes a mailbox must hold to send.
    send_scopes: tuple[str, ...] = ()
    #: Scope parameter of a refresh request (``None``: not sent).
    refresh_scopes: tuple[str, ...] | None = None
    #: Extra authorization parameters for the consent that grants sending.
    send_auth_params: dict[str, str] = {}
    max_recipients_per_message: int = 100
    ca_bundle: str | None = None

    def __init__(self, provider_id: str, config: dict[str, Any]):
        self.id = provider_id
        self.config = config
        self.client_id: str = config.get("client_id", "")
        self.client_secret: str = config.get("client_secret", "")
        if config.get("name"):
            self.name = config["name"]
        if config.get("max_recipients_per_message"):
            self.max_recipients_per_message = int(config["max_recipients_per_message"])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    # -- identity -------------------------------------------------------------
    @property
    def issuer(self) -> str:
        """Who issues this provider's tokens: its token endpoint (Google,
        Microsoft) or the discovery document it reads (OIDC). From settings
        only."""
        return self.token_endpoint

    @property
    def identity(self) -> str:
        """What a mailbox is bound to when it is connected: ``type|issuer|SMTP host``.

        A mailbox's tokens are refreshed at, and sent to, only the provider
        that issued them: when the configuration of its provider id no longer
        gives this same identity, mailgov refuses to use them
        (:func:`mailgov.providers.get_mailbox_provider`). The SMTP port and
        TLS mode are left out: they change the door, not who holds the
        token on the other side (587 and 465 on one host are one operator).
        Computed from settings alone, never from the network.
        """
        return f"{self.type}|{self.issuer}|{self.smtp_host.lower()}"

    # -- endpoints (overridden or discovered) -----------------------------
    @property
    def authorization_endpoint(self) -> str:
        raise NotImplementedError

    @property
    def token_endpoint(self) -> str:
        raise NotImplementedError

    @property
    def revocation_endpoint(self) -> str | None:
        return None

    @property
    def userinfo_endpoint(self) -> str | None:
        return None

    # -- HTTP ---------------------------------------------------------------
    @property
    def http_verify(self) -> str | bool:
        return self.ca_bundle or True

    def _post(self, url: str, data: dict[str, str], *, what: str) -> requests.Response:
        try:
            return requests.post(
                url,
                data=data,
                headers={"Accept": "application/json"},
                timeout=mailgov_settings.HTTP_TIMEOUT_SECONDS,
                verify=self.http_verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise http_failure(self.name, what, exc) from None

    @sensitive_variables()
    def _token_request(self, data: dict[str, str], *, what: str) -> TokenResponse:
        if not self.client_id:
            raise MailgovConfigurationError(f"Provider {self.id!r} has no client_id configured.")
        payload = {"client_id": self.client_id, **data}
        if self.client_secret:
            payload["client_secret"] = self.client_secret
        response = self._post(self.token_endpoint, payload, what=what)
        body = _json_or_none(response)
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailableError(
                f"{self.name}: {what} answered HTTP {response.status_code}.",
                status=response.status_code,
            )
        if response.status_code != 200 or body is None:
            error = body.get("error") if isinstance(body, dict) else None
            error = error if isinstance(error, str) else None
            message = f"{self.name}: {what} refused (HTTP {response.status_code}"
            message += f", error {error!r})." if error else ")."
            if error == "invalid_grant":
                raise GrantRevokedError(message, status=response.status_code, error=error)
            raise ProviderError(message, status=response.status_code, error=error)
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise ProviderError(f"{self.name}: {what} returned no access token.", status=200)
        scope = body.get("scope")
        return TokenResponse(
            access_token=access_token,
            refresh_token=body.get("refresh_token") or None,
            expires_in=parse_expires_in(body.get("expires_in")),
            scopes=scope.split() if isinstance(scope, str) else None,
            id_token=body.get("id_token") or None,
        )

    # -- operations ---------------------------------------------------------
    @sensitive_variables()
    def exchange_code(self, code: str, *, redirect_uri: str, code_verifier: str) -> TokenResponse:
        """Redeem an authorization code (with its PKCE verifier)."""
        return self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": code_verifier,
            },
            what="code exchange",
        )

    @sensitive_variables()
    def refresh(self, refresh_token: str) -> TokenResponse:
        """Redeem a refresh token for a fresh access token.

        Raises :class:`GrantRevokedError` on ``invalid_grant``,
        :class:`TokenRefreshUnavailableError` on a network error, timeout, 429
        or 5xx (retry later), :class:`TokenRefreshError` otherwise.
        """
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self.refresh_scopes:
            data["scope"] = " ".join(self.refresh_scopes)
        try:
            return self._token_request(data, what="token refresh")
        except GrantRevokedError:
            raise
        except ProviderUnavailableError as exc:
            raise TokenRefreshUnavailableError(str(exc), status=exc.status) from None
        except ProviderError as exc:
            raise TokenRefreshError(str(exc), status=exc.status, error=exc.error) from None

    @sensitive_variables()
    def revoke(self, token: str, *, token_type_hint: str = "refresh_token") -> bool:
        """Revoke ``token`` at the provider (RFC 7009).

        Returns ``True`` when the provider confirmed (200, also for a token
        that was already invalid), ``False`` when it has no revocation
        endpoint. Raises :class:`ProviderUnavailableError` for 5xx/timeouts.
        """
        endpoint = self.revocation_endpoint
        if not endpoint:
            return False
        data = {"token": token, "token_type_hint": token_type_hint, "client_id": self.client_id}
        if self.client_secret:
            data["client_secret"] = self.client_secret
        response = self._post(endpoint, data, what="revocation")
        if response.status_code == 200:
            return True
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailableError(
                f"{self.name}: revocation answered HTTP {response.status_code}.",
                status=response.status_code,
            )
        body = _json_or_none(response)
        error = body.get("error") if isinstance(body, dict) else None
        raise ProviderError(
            f"{self.name}: revocation refused (HTTP {response.status_code}).",
            status=response.status_code,
            error=error if isinstance(error, str) else None,
        )

    @sensitive_variables()
    def userinfo(self, access_token: str) -> dict[str, Any]:
        """The OIDC userinfo claims for ``access_token`` (used to learn the address)."""
        endpoint = self.userinfo_endpoint
        if not endpoint:
            raise ProviderError(f"{self.name}: no userinfo endpoint.")
        try:
            response = requests.get(
                endpoint,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                timeout=mailgov_settings.HTTP_TIMEOUT_SECONDS,
                verify=self.http_verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise http_failure(self.name, "userinfo", exc) from None
        body = _json_or_none(response)
        if response.status_code != 200 or not isinstance(body, dict):
            raise ProviderError(
                f"{self.name}: userinfo refused (HTTP {response.status_code}).",
                status=response.status_code,
            )
        return body


def http_failure(name: str, what: str, exc: requests.RequestException) -> MailgovError:
    """The exception for a failed HTTP call, by what failed.

    Only passing trouble (a timeout, a refused or dropped connection) is
    retryable and may be hidden by ``fail_silently``. A certificate that does
    not verify is a security failure and a malformed URL a configuration
    error: neither is ever hidden.
    """
    if isinstance(exc, requests.exceptions.SSLError):
        return ProviderError(f"{name}: {what} refused: the TLS certificate did not verify.")
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return MailgovConfigurationError(f"{name}: the {what} URL is not valid.")
    if isinstance(exc, requests.Timeout):
        return ProviderUnavailableError(f"{name}: {what} timed out.")
    return ProviderUnavailableError(f"{name}: {what} failed: {type(exc).__name__}.")


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
