"""What happens around a grant: start it, capture its tokens, write its receipt."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from allauth.socialaccount.adapter import get_adapter
from allauth.socialaccount.models import SocialLogin
from allauth.socialaccount.providers.base.constants import AuthProcess
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from mailgov.capabilities import Capability
from mailgov.contrib.allauth.limits import client_ip
from mailgov.exceptions import MailgovError, TokenRefreshError
from mailgov.models import ConsentReceipt, Mailbox
from mailgov.providers import Provider, TokenResponse, get_provider
from mailgov.services import connect_mailbox

logger = logging.getLogger("mailgov.consent")

#: What a provider answers when a refresh asks for a scope never granted.
NOT_GRANTED_ERRORS = frozenset({"invalid_grant", "consent_required", "invalid_scope"})

#: The key of mailgov's data in allauth's state.
STATE_KEY = "mailgov"


def truncated_ip(request: HttpRequest) -> str:
    """The client's IP without its host part: /24 for IPv4, /48 for IPv6.

    The address the rate limits see (:func:`~mailgov.contrib.allauth.limits.client_ip`,
    which follows ``RATELIMIT_IP_META_KEY`` behind a proxy); empty when there
    is none. A receipt is never refused for want of an address.
    """
    try:
        address = ipaddress.ip_address(client_ip(request))
    except (ValueError, KeyError, ImproperlyConfigured):
        return ""
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


def write_receipt(
    request: HttpRequest,
    *,
    capability: Capability,
    version: int | None = None,
    provider_id: str,
    action: str,
    mailbox: Mailbox | None,
    address: str = "",
    requested: list[str] | None = None,
    granted: list[str] | None = None,
) -> ConsentReceipt:
    return ConsentReceipt.objects.create(
        user=request.user,
        mailbox=mailbox,
        provider=provider_id,
        address=address or (mailbox.address if mailbox else ""),
        capability=capability.id,
        action=action,
        scopes_requested=list(requested or []),
        scopes_granted=list(granted or []),
        explanation_version=version if version is not None else capability.version,
        created_at=timezone.now(),
        ip_address=truncated_ip(request),
        user_agent=request.META.get("HTTP_USER_AGENT", "")[:300],
    )


def start_consent(request: HttpRequest, capability: Capability, provider_id: str) -> HttpResponse:
    """Redirect to the provider with the scopes and parameters the registry
    decides, through allauth's connect flow (state and PKCE in the session)."""
    provider = get_provider(provider_id)
    scopes = capability.scopes_for(provider)
    allauth_provider = get_adapter().get_provider(request, provider_id)
    data = {
        STATE_KEY: {
            "capability": capability.id,
            "provider": provider_id,
            "version": capability.version,
            "scopes": scopes,
        }
    }
    return allauth_provider.redirect(
        request,
        # Not "connect": a grant of mail access must not link the provider
        # account to the user as a way to sign in.
        AuthProcess.REDIRECT,
        next_url=reverse("mailgov:mailboxes"),
        data=data,
        scope=scopes,
        auth_params=capability.auth_params_for(provider),
    )


def consent_in_state(sociallogin: SocialLogin) -> dict[str, Any] | None:
    data = (sociallogin.state or {}).get("data")
    if isinstance(data, dict) and isinstance(data.get(STATE_KEY), dict):
        return data[STATE_KEY]
    return None


@sensitive_variables()
def token_response_from(sociallogin: SocialLogin, provider: Provider) -> TokenResponse:
    """The grant's tokens, as mailgov stores them.

    For Microsoft the token of the flow is for Graph (allauth reads the
    profile with it); the SMTP token is a different audience, so the refresh
    token is redeemed at once for it, which also tells whether SMTP.Send was
    granted.
    """
    token = sociallogin.token
    expires_in = None
    if token.expires_at:
        expires_in = max(1, int((token.expires_at - timezone.now()).total_seconds()))
    response = TokenResponse(
        access_token=token.token,
        refresh_token=token.token_secret or None,
        expires_in=expires_in,
        scopes=getattr(token, "mailgov_granted_scopes", None),
    )
    if provider.refresh_scopes:
        identity = set(response.scopes or [])
        if not response.refresh_token:
            # Never keep the Graph token as the mailbox's (SMTP) token.
            return TokenResponse("", None, None, sorted(identity))
        try:
            smtp = provider.refresh(response.refresh_token)
        except TokenRefreshError as exc:
            if exc.retryable or exc.error not in NOT_GRANTED_ERRORS:
                raise
            # SMTP.Send was not granted (a partial grant): keep the refresh
            # token without the capability, and never the Graph token as an
            # SMTP token.
            return TokenResponse("", response.refresh_token, None, sorted(identity))
        granted = smtp.scopes if smtp.scopes is not None else list(provider.refresh_scopes)
        return TokenResponse(
            access_token=smtp.access_token,
            refresh_token=smtp.refresh_token or response.refresh_token,
            expires_in=smtp.expires_in,
            scopes=sorted(set(granted) | identity),
        )
    return response


def verified_address(sociallogin: SocialLogin, provider: Provider) -> str | None:
    """The address to bind the mailbox to.

    Microsoft marks no address verified (allauth has no claim to read); its
    Graph ``mail`` (else the user principal name) is used to bind the mailbox
    only, never to sign anyone in, and the SMTP server checks that the token
    belongs to that mailbox at every login anyway.
    """
    if provider.type == "microsoft":
        data = sociallogin.account.extra_data or {}
        upn = data.get("userPrincipalName") or ""
        mail = data.get("mail") or ""
        # ``mail`` is an attribute a tenant administrator can set to anything;
        # the UPN's domain is one the tenant has verified. Take ``mail`` only
        # within that domain.
        if mail and upn and mail.rpartition("@")[2].lower() == upn.rpartition("@")[2].lower():
            return mail
        return upn or None
    for email in sociallogin.email_addresses:
        if email.verified and (email.primary or len(sociallogin.email_addresses) == 1):
            return email.email
    for email in sociallogin.email_addresses:
        if email.verified:
            return email.email
    return None


@sensitive_variables()
def capture_grant(
    request: HttpRequest, sociallogin: SocialLogin, consent: dict[str, Any], capability: Capability
) -> Mailbox:
    """Put the grant's tokens into the vault and write the receipt.

    Raises :class:`MailgovError` (nothing stored) when the account has no
    verified address or the address is taken by another user.
    """
    provider_id = consent["provider"]
    provider = get_provider(provider_id)
    address = verified_address(sociallogin, provider)
    if not address:
        raise MailgovError("The provider did not confirm an email address for this account.")
    response = token_response_from(sociallogin, provider)
    mailbox = connect_mailbox(
        owner=request.user,
        provider_id=provider_id,
        response=response,
        address=address,
        requested_scopes=consent.get("scopes") or [],
    )
    granted = mailbox.has_scopes(capability.required_scopes(provider))
    write_receipt(
        request,
        capability=capability,
        provider_id=provider_id,
        action=ConsentReceipt.Action.GRANT if granted else ConsentReceipt.Action.PARTIAL,
        version=consent.get("version"),
        mailbox=mailbox,
        requested=consent.get("scopes") or [],
        granted=mailbox.scopes,
    )
    logger.info(
        "consent %s for mailbox %s: %s",
        capability.id,
        mailbox.pk,
        "granted" if granted else "partial",
    )
    return mailbox
