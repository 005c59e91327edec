"""Why a mailbox stopped working, in plain words, by reason code and provider."""

from __future__ import annotations

from django.utils.translation import gettext_lazy

from mailgov.exceptions import MailgovConfigurationError
from mailgov.models import Mailbox
from mailgov.providers import get_provider

#: Why a mailbox needs re-consent, in plain words, by reason code and provider type.
REASONS = {
    ("invalid_grant", "google"): gettext_lazy(
        "Google ended this access. This happens when you change your Google password, when "
        "the access goes unused for six months, when you remove it in your Google account, "
        "when too many accesses were granted to this application, or, for applications Google "
        "has not yet verified, after seven days."
    ),
    ("invalid_grant", "microsoft"): gettext_lazy(
        "Microsoft ended this access, usually after 90 days without use or when your "
        "organisation revoked it."
    ),
    ("smtp_auth_disabled", "microsoft"): gettext_lazy(
        "Your organisation has switched off sending through SMTP for your mailbox. Connecting "
        "again will not help: ask your Microsoft 365 administrator to enable it."
    ),
    ("scope_missing", None): gettext_lazy(
        "You did not grant permission to send email, so this application cannot send as you."
    ),
    ("no_refresh_token", None): gettext_lazy(
        "Your provider did not grant lasting access. Please connect again."
    ),
    ("invalid_grant", None): gettext_lazy("Your provider ended this access. Please connect again."),
    ("dormant", None): gettext_lazy(
        "Disconnected because it was not used for a long time. Connect it again to send."
    ),
    ("smtp_auth_rejected", None): gettext_lazy(
        "Your provider refused to let this application sign in to send. Please connect again."
    ),
}


def reason_text(mailbox: Mailbox) -> str:
    code = mailbox.revocation_reason.split(":", 1)[0]
    try:
        provider_type = get_provider(mailbox.provider).type
    except MailgovConfigurationError:
        provider_type = None
    return str(REASONS.get((code, provider_type)) or REASONS.get((code, None)) or "")
