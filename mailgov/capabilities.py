"""The capability registry: what a feature needs from a mailbox, and how to say so.

A capability (first: ``send_mail``) maps, per provider type, to the scopes it
needs and to a plain-language explanation with a version number. Scopes and
authorization parameters are decided here, on the server, and nowhere else:
nothing in a request can widen what is asked for.

Bump ``version`` whenever the explanation's meaning changes: consent receipts
record the version a user was shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from mailgov.providers import Provider

#: Identity scopes asked together with a capability, so that the account the
#: grant belongs to can be read back (its email address).
IDENTITY_SCOPES = {
    "google": ("openid", "email"),
    "microsoft": ("openid", "email", "offline_access", "User.Read"),
    "oidc": ("openid", "email"),
}

#: Plain words for the scopes mailgov asks for.
SCOPE_DESCRIPTIONS: dict[str, Promise] = {
    "openid": _("Confirm who you are (your account identifier)."),
    "email": _("See your email address."),
    "profile": _("See your name and profile picture."),
    "offline_access": _("Keep this access when you are not signed in, until you withdraw it."),
    "User.Read": _("See your basic Microsoft profile (name and email address)."),
    "https://mail.google.com/": _(
        "Send email as you through Gmail. Google offers no narrower permission for sending "
        "over SMTP; this application only ever sends."
    ),
    "https://outlook.office.com/SMTP.Send": _("Send email as you through Microsoft 365."),
    "mail.send": _("Send email as you."),
    "https://www.googleapis.com/auth/userinfo.email": _("See your email address."),
    "https://www.googleapis.com/auth/userinfo.profile": _("See your name and profile picture."),
    "https://graph.microsoft.com/User.Read": _(
        "See your basic Microsoft profile (name and email address)."
    ),
}


def describe_scope(scope: str) -> str:
    """Plain words for ``scope`` (the scope itself when mailgov has none)."""
    return str(SCOPE_DESCRIPTIONS.get(scope, scope))


@dataclass(frozen=True)
class Explanation:
    """What a user is told before granting a capability."""

    allows: Promise
    never: Promise
    duration: Promise
    withdraw: Promise


@dataclass(frozen=True)
class Capability:
    id: str
    name: Promise
    explanation: Explanation
    version: int
    #: Extra authorization parameters per provider type.
    auth_params: dict[str, dict[str, str]] = field(default_factory=dict)

    def scopes_for(self, provider: Provider) -> list[str]:
        """Every scope to ask ``provider`` for: the send scopes and identity."""
        scopes = list(IDENTITY_SCOPES.get(provider.type, ("openid", "email")))
        for scope in provider.send_scopes:
            if scope not in scopes:
                scopes.append(scope)
        return scopes

    def required_scopes(self, provider: Provider) -> list[str]:
        """The scopes without which the capability is off."""
        return list(provider.send_scopes)

    def auth_params_for(self, provider: Provider) -> dict[str, str]:
        return {**provider.send_auth_params, **self.auth_params.get(provider.type, {})}


SEND_MAIL = Capability(
    id="send_mail",
    name=_("Send email as you"),
    version=1,
    explanation=Explanation(
        allows=_(
            "This application can send email from your address, when you use one of its "
            "features that sends mail (for example, an invitation you write). Each message "
            "appears in your Sent folder."
        ),
        never=_(
            "It never reads, searches, deletes or changes the mail in your mailbox, and never "
            "sends anything you did not ask it to send. Your password is never given to it."
        ),
        duration=_(
            "Until you withdraw it. Your provider may also end it: for example when you change "
            "your password, or after months without use."
        ),
        withdraw=_(
            "On your Mailboxes page, choose Disconnect: the access is revoked at your provider "
            "and the keys to it are deleted here at once. You can also remove it from your "
            "Google or Microsoft account's security settings."
        ),
    ),
)

#: The registry: explicit, one entry per capability.
CAPABILITIES: dict[str, Capability] = {SEND_MAIL.id: SEND_MAIL}


def get_capability(capability_id: str) -> Capability | None:
    return CAPABILITIES.get(capability_id)
