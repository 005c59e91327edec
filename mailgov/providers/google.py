"""Google (Gmail): SMTP on smtp.gmail.com, scope https://mail.google.com/."""

from __future__ import annotations

from mailgov.providers.base import Provider


class GoogleProvider(Provider):
    type = "google"
    name = "Google"
    smtp_host = "smtp.gmail.com"
    smtp_port = 587
    smtp_security = "starttls"
    send_scopes = ("https://mail.google.com/",)
    # A refresh token only with access_type=offline; prompt=consent to get one
    # again on re-consent; include_granted_scopes makes the grant incremental.
    send_auth_params = {
        "access_type": "offline",
        "include_granted_scopes": "true",
        "prompt": "consent",
    }
    # Workspace: 100 recipients per message over SMTP.
    max_recipients_per_message = 100

    authorization_endpoint = "https://accounts.google.com/o/oauth2/v2/auth"
    token_endpoint = "https://oauth2.googleapis.com/token"
    revocation_endpoint = "https://oauth2.googleapis.com/revoke"
    userinfo_endpoint = "https://openidconnect.googleapis.com/v1/userinfo"
