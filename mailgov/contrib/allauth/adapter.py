"""The allauth adapter: where mailgov changes the flow (signals only react)."""

from __future__ import annotations

import logging

from allauth.account.models import EmailAddress
from allauth.core.exceptions import ImmediateHttpResponse
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter
from allauth.socialaccount.models import SocialLogin
from allauth.socialaccount.providers.base.constants import AuthError, AuthProcess
from django.contrib import messages
from django.http import HttpRequest
from django.shortcuts import redirect
from django.utils.translation import gettext as _

from mailgov.capabilities import get_capability
from mailgov.contrib.allauth.consent import STATE_KEY, capture_grant, consent_in_state
from mailgov.contrib.allauth.headers import make_private
from mailgov.exceptions import MailboxUnavailableError, MailgovConfigurationError, MailgovError
from mailgov.models import Mailbox

security_logger = logging.getLogger("mailgov.security")


ERROR_SESSION_KEY = "mailgov_consent_error"


def consent_error(request: HttpRequest, message: str) -> ImmediateHttpResponse:
    """Leave the callback URL (it may carry a code) for a clean error page."""
    request.session[ERROR_SESSION_KEY] = str(message)
    return ImmediateHttpResponse(make_private(redirect("mailgov:consent_error")))


class MailgovSocialAccountAdapter(DefaultSocialAccountAdapter):
    def pre_social_login(self, request: HttpRequest, sociallogin: SocialLogin) -> None:
        """Capture a mailgov grant's tokens into the vault, before allauth
        connects the account. Nothing reaches allauth's SocialToken."""
        super().pre_social_login(request, sociallogin)
        try:
            self._capture(request, sociallogin)
        finally:
            # With SOCIALACCOUNT_STORE_TOKENS off nothing later needs the
            # token, and allauth would otherwise serialize it into the session
            # (pending sign-up, re-authentication) or hand it to receivers.
            sociallogin.token = None

    def _capture(self, request: HttpRequest, sociallogin: SocialLogin) -> None:
        consent = consent_in_state(sociallogin)
        if consent is None:
            return
        capability = get_capability(consent.get("capability", ""))
        if (
            capability is None
            # "redirect": the grant never links the provider account to the
            # user for sign-in (a shared mailbox must not become a way in).
            or sociallogin.state.get("process") != AuthProcess.REDIRECT
            or not request.user.is_authenticated
        ):
            security_logger.warning("consent callback without a signed-in connect flow")
            raise consent_error(
                request, _("This consent could not be completed. Nothing was stored.")
            )
        # Linked to another user for sign-in (not merely sharing an address).
        account = sociallogin.account
        if account.pk is not None and account.user_id != request.user.pk:
            raise consent_error(
                request,
                _(
                    "This account is already connected to another user here, so it cannot be "
                    "connected to yours. Nothing was stored."
                ),
            )
        try:
            mailbox = capture_grant(request, sociallogin, consent, capability)
        except MailboxUnavailableError:
            raise consent_error(
                request,
                _("This address is already connected by another account here. Nothing was stored."),
            ) from None
        except (MailgovError, MailgovConfigurationError) as exc:
            security_logger.warning("consent not stored: %s", type(exc).__name__)
            raise consent_error(
                request,
                _(
                    "Your provider's answer could not be used (for example, it did not "
                    "confirm your email address). Nothing was stored."
                ),
            ) from None
        if mailbox.status == Mailbox.Status.ACTIVE:
            messages.success(request, _("Connected: this application can now send as you."))

    def authenticate_by_email(self, sociallogin: SocialLogin):
        """Sign in by email address only to a local account whose address is
        verified here: matching an unverified address (allauth falls back to
        ``User.email``) would hand the provider's sign-in to whoever
        registered that address first."""
        for email in [e.email for e in sociallogin.email_addresses if e.verified]:
            if not self.can_authenticate_by_email(sociallogin, email):
                continue
            address = (
                EmailAddress.objects.filter(email__iexact=email, verified=True)
                .select_related("user")
                .first()
            )
            if address is not None and address.user.is_active:
                return address.user, email
        return None

    def on_authentication_error(
        self, request, provider, error=None, exception=None, extra_context=None
    ):
        """A clear page for a denied consent, a bad or replayed state, or a
        provider error; logged without any token or code."""
        security_logger.warning(
            "OAuth callback failed (provider %s, error %s, %s)",
            getattr(provider, "id", "?"),
            error,
            type(exception).__name__ if exception else "no exception",
        )
        state = (extra_context or {}).get("state")
        if state is not None and not (
            isinstance(state.get("data"), dict) and STATE_KEY in state["data"]
        ):
            return  # a sign-in flow: allauth's own pages
        if error == AuthError.CANCELLED:
            message = _(
                "You declined the request at your provider. Nothing was stored, and nothing "
                "changes for you here."
            )
        elif extra_context and extra_context.get("state") is None:
            message = _(
                "This sign-in or consent link has expired or was already used. Nothing was "
                "stored; please start again from this site."
            )
        else:
            message = _("Your provider reported an error. Nothing was stored; please try again.")
        raise consent_error(request, message)
