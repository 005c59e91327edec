"""Microsoft 365 (Exchange Online): SMTP on smtp.office365.com.

The SMTP token is for the ``outlook.office.com`` audience, which a Graph token
is not; one token cannot cover both. Every refresh therefore asks for the SMTP
scope explicitly. Microsoft rotates refresh tokens on every refresh.

There is no per-token revocation endpoint: revoking is deleting the tokens
here, and a tenant administrator removes the consent (Enterprise applications
→ the app → Permissions) or calls ``revokeSignInSessions`` for the user.
"""

from __future__ import annotations

from typing import Any

from mailgov.providers.base import Provider


class MicrosoftProvider(Provider):
    type = "microsoft"
    name = "Microsoft 365"
    smtp_host = "smtp.office365.com"
    smtp_port = 587
    smtp_security = "starttls"
    send_scopes = ("https://outlook.office.com/SMTP.Send",)
    refresh_scopes = ("https://outlook.office.com/SMTP.Send", "offline_access")
    max_recipients_per_message = 500

    def __init__(self, provider_id: str, config: dict[str, Any]):
        super().__init__(provider_id, config)
        self.tenant = config.get("tenant", "common")

    @property
    def authorization_endpoint(self) -> str:
        return f"https://login.microsoftonline.com/{self.tenant}/oauth2/v2.0/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"https://login.microsoftonline.com/{self.tenant}/oauth2/v2.0/token"

    # No RFC 7009 endpoint: revoke() returns False and the caller documents
    # the admin step.
    revocation_endpoint = None
