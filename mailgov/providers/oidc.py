"""A generic OpenID Connect provider, configured from its discovery document.

Endpoints (token, revocation, introspection, userinfo) come from
``<server_url>/.well-known/openid-configuration``; the SMTP endpoint and the CA
bundle that verifies both come from settings. This is the only provider whose
SMTP host is configurable.

Configuration (``MAILGOV_PROVIDERS["<id>"]``)::

    {
        "type": "oidc",
        "name": "Example IdP",
        "server_url": "https://idp.example.com",   # or "discovery_url"
        "client_id": "...", "client_secret": "...",
        "send_scopes": ["mail.send"],
        "smtp_host": "smtp.example.com", "smtp_port": 587,
        "smtp_security": "starttls",                # or "ssl"
        "ca_bundle": "/path/to/ca.pem",             # optional
    }
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

import requests

from mailgov.conf import mailgov_settings
from mailgov.exceptions import MailgovConfigurationError, ProviderError, ProviderUnavailableError
from mailgov.providers.base import Provider, _json_or_none, http_failure

_discovery_lock = threading.Lock()
_discovery_cache: dict[str, tuple[float, dict[str, Any]]] = {}

REQUIRED_KEYS = ("client_id", "send_scopes", "smtp_host")


def clear_discovery_cache() -> None:
    with _discovery_lock:
        _discovery_cache.clear()


class OIDCProvider(Provider):
    type = "oidc"
    name = "OpenID Connect"
    smtp_pinned: ClassVar[bool] = False

    def __init__(self, provider_id: str, config: dict[str, Any]):
        super().__init__(provider_id, config)
        missing = [key for key in REQUIRED_KEYS if not config.get(key)]
        if not (config.get("server_url") or config.get("discovery_url")):
            missing.append("server_url")
        if missing:
            raise MailgovConfigurationError(
                f"Provider {provider_id!r} (oidc) is missing: {', '.join(missing)}."
            )
        self.name = config.get("name") or provider_id
        self.discovery_url = config.get("discovery_url") or (
            config["server_url"].rstrip("/") + "/.well-known/openid-configuration"
        )
        self.send_scopes = tuple(config["send_scopes"])
        self.smtp_host = config["smtp_host"]
        self.smtp_port = int(config.get("smtp_port", 587))
        self.smtp_security = config.get("smtp_security", "starttls")
        self.ca_bundle = config.get("ca_bundle") or None

    @property
    def discovery(self) -> dict[str, Any]:
        """The discovery document, fetched once per ``DISCOVERY_CACHE_SECONDS``."""
        now = time.monotonic()
        cached = _discovery_cache.get(self.discovery_url)
        if cached and cached[0] > now:
            return cached[1]
        try:
            response = requests.get(
                self.discovery_url,
                timeout=mailgov_settings.HTTP_TIMEOUT_SECONDS,
                verify=self.http_verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise http_failure(self.name, "discovery", exc) from None
        document = _json_or_none(response)
        if response.status_code >= 500 or response.status_code == 429:
            raise ProviderUnavailableError(
                f"{self.name}: discovery answered HTTP {response.status_code}.",
                status=response.status_code,
            )
        if response.status_code != 200 or not isinstance(document, dict):
            # A 404 or a page that is not JSON: the server_url is wrong.
            raise MailgovConfigurationError(
                f"{self.name}: no discovery document at {self.discovery_url} "
                f"(HTTP {response.status_code})."
            )
        if not isinstance(document.get("token_endpoint"), str):
            raise ProviderError(f"{self.name}: discovery document has no token_endpoint.")
        with _discovery_lock:
            _discovery_cache[self.discovery_url] = (
                now + mailgov_settings.DISCOVERY_CACHE_SECONDS,
                document,
            )
        return document

    @property
    def issuer(self) -> str:
        # The discovery document actually fetched names every endpoint, so it
        # is the identity (from settings, with no network call: a binding
        # must be computable offline). Its CA bundle is not part of it: a
        # path, which moves between deployments.
        return self.discovery_url

    @property
    def authorization_endpoint(self) -> str:
        return self.discovery["authorization_endpoint"]

    @property
    def token_endpoint(self) -> str:
        return self.discovery["token_endpoint"]

    @property
    def revocation_endpoint(self) -> str | None:
        return self.discovery.get("revocation_endpoint")

    @property
    def introspection_endpoint(self) -> str | None:
        return self.discovery.get("introspection_endpoint")

    @property
    def userinfo_endpoint(self) -> str | None:
        return self.discovery.get("userinfo_endpoint")
