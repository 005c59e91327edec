"""End-user pages: consent, my mailboxes, disconnect, how access is protected."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from allauth.socialaccount.adapter import get_adapter
from allauth.socialaccount.models import SocialApp
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ImproperlyConfigured
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods, require_POST

from mailgov.audit import log_access
from mailgov.capabilities import CAPABILITIES, describe_scope, get_capability
from mailgov.conf import mailgov_settings
from mailgov.contrib.allauth.adapter import ERROR_SESSION_KEY
from mailgov.contrib.allauth.consent import start_consent, write_receipt
from mailgov.contrib.allauth.headers import make_private, private
from mailgov.contrib.allauth.limits import limited
from mailgov.contrib.allauth.reasons import reason_text
from mailgov.exceptions import MailgovConfigurationError
from mailgov.lifecycle import last_activity, revocation_due
from mailgov.models import ConsentReceipt, Mailbox
from mailgov.privacy import export_user
from mailgov.providers import get_provider
from mailgov.services import revoke_mailbox

security_logger = logging.getLogger("mailgov.security")


def render_page(
    request: HttpRequest, template: str, context: dict | None = None, status: int | None = None
) -> HttpResponse:
    """Render one of mailgov's pages inside the host's base template
    (``MAILGOV_BASE_TEMPLATE``, which the page extends)."""
    context = {**(context or {}), "mailgov_base_template": mailgov_settings.BASE_TEMPLATE}
    return render(request, template, context, status=status)


def held_capabilities(mailbox: Mailbox, provider) -> list:
    """What an active mailbox may do; nothing for any other status, nor for a
    mailbox whose provider id is now configured as another provider."""
    if (
        provider is None
        or mailbox.status != Mailbox.Status.ACTIVE
        or mailbox.provider_binding != provider.identity
    ):
        return []
    return [
        capability
        for capability in CAPABILITIES.values()
        if mailbox.has_scopes(capability.required_scopes(provider))
    ]


def connectable_providers() -> list[str]:
    return sorted(mailgov_settings.PROVIDERS)


def dormancy(mailbox: Mailbox, now) -> dict | None:
    """For a mailbox close to being revoked as unused: its last activity and
    the day it will be disconnected (see :mod:`mailgov.lifecycle`); else ``None``."""
    if mailbox.status == Mailbox.Status.REVOKED:
        return None
    last = last_activity(mailbox)
    warn_after = mailgov_settings.DORMANT_DAYS - mailgov_settings.DORMANT_WARNING_DAYS
    if now - last < timedelta(days=warn_after):
        return None
    warned_at = mailbox.dormant_warned_at
    if warned_at is None or warned_at < last:
        warned_at = now  # the warning is about to go out
    return {"since": last, "revoke_on": max(revocation_due(last, warned_at), now)}


@private(forms=True)
@login_required
def mailboxes(request: HttpRequest) -> HttpResponse:
    boxes = list(Mailbox.objects.filter(owner=request.user).order_by("address"))
    now = timezone.now()
    rows = []
    for mailbox in boxes:
        try:
            provider = get_provider(mailbox.provider)
        except MailgovConfigurationError:
            provider = None
        capabilities = held_capabilities(mailbox, provider)
        rows.append(
            {
                "mailbox": mailbox,
                "provider_name": provider.name if provider else mailbox.provider,
                "capabilities": capabilities,
                "scopes": [describe_scope(scope) for scope in mailbox.scopes],
                "reason": reason_text(mailbox) if mailbox.status != Mailbox.Status.ACTIVE else "",
                "dormancy": dormancy(mailbox, now),
            }
        )
    receipts = ConsentReceipt.objects.filter(user=request.user)[:50]
    return render_page(
        request,
        "mailgov/mailboxes.html",
        {
            "rows": rows,
            "receipts": receipts,
            "providers": [(pid, get_provider(pid).name) for pid in connectable_providers()],
            "capabilities": CAPABILITIES.values(),
        },
    )


@private
@login_required
@require_http_methods(["GET"])
def my_data(request: HttpRequest) -> HttpResponse:
    """Everything mailgov holds about the signed-in user, as a JSON download
    (:func:`mailgov.privacy.export_user`): only their own, never cached."""
    document = export_user(request.user)
    log_access(request, "own data", get_user_model(), 1)
    response = HttpResponse(
        json.dumps(document, indent=2, ensure_ascii=False),
        content_type="application/json; charset=utf-8",
    )
    response["Content-Disposition"] = 'attachment; filename="my-mailgov-data.json"'
    return response


@private(forms=True)
@login_required
@require_http_methods(["GET", "POST"])
def consent(request: HttpRequest, capability_id: str, provider_id: str) -> HttpResponse:
    """GET shows what is asked and why; a CSRF-protected POST starts the flow.

    Scopes come from the registry only: nothing in the query string or the
    form changes them.
    """
    capability = get_capability(capability_id)
    if capability is None or provider_id not in mailgov_settings.PROVIDERS:
        raise Http404("No such capability or provider")
    try:
        get_adapter().get_provider(request, provider_id)
    except (SocialApp.DoesNotExist, ImproperlyConfigured):
        raise Http404("This provider is not set up for sign-in here") from None
    provider = get_provider(provider_id)
    if request.method == "POST":
        if request.POST.get("version") != str(capability.version):
            # The page the user read is not the explanation in force: show
            # the current one rather than record consent to the wrong text.
            messages.warning(request, _("The explanation has changed; please read it again."))
            return redirect(request.path)
        return _start(request, capability, provider_id)
    scopes = capability.scopes_for(provider)
    return render_page(
        request,
        "mailgov/consent.html",
        {
            "capability": capability,
            "provider": provider,
            "scopes": [(scope, describe_scope(scope)) for scope in scopes],
        },
    )


@limited("CONSENT_RATE")
def _start(request: HttpRequest, capability, provider_id: str) -> HttpResponse:
    return start_consent(request, capability, provider_id)


@private
@login_required
@require_POST
@limited("DISCONNECT_RATE")
def disconnect(request: HttpRequest, pk) -> HttpResponse:
    """Revoke at the provider where it has an endpoint, wipe the tokens, write a receipt."""
    mailbox = get_object_or_404(Mailbox, pk=pk, owner=request.user)
    if mailbox.status == Mailbox.Status.REVOKED:
        messages.info(request, _("This mailbox is already disconnected."))
        return redirect("mailgov:mailboxes")
    withdrawn = list(mailbox.scopes)
    # Every capability this mailbox was granted (fully or in part), whatever
    # its status now: each withdrawal gets its receipt.
    granted_before = set(
        ConsentReceipt.objects.filter(
            mailbox=mailbox,
            action__in=[ConsentReceipt.Action.GRANT, ConsentReceipt.Action.PARTIAL],
        ).values_list("capability", flat=True)
    )
    try:
        provider = get_provider(mailbox.provider)
    except MailgovConfigurationError:
        provider = None
    held = {c.id for c in held_capabilities(mailbox, provider)}
    try:
        result = revoke_mailbox(mailbox, "user: disconnected by the owner")
    except MailgovConfigurationError:
        # The provider is no longer configured: nothing to call; stop here.
        messages.error(request, _("This mailbox's provider is no longer available here."))
        return redirect("mailgov:mailboxes")
    for capability in (c for c in CAPABILITIES.values() if c.id in held | granted_before):
        write_receipt(
            request,
            capability=capability,
            provider_id=mailbox.provider,
            action=ConsentReceipt.Action.WITHDRAW,
            mailbox=mailbox,
            requested=[],
            granted=withdrawn,
        )
    if result.at_provider is False:
        messages.warning(
            request,
            _(
                "Disconnected. Your provider has no way for us to withdraw the access on its "
                "side: you can also remove this application in your account's security settings."
            ),
        )
    elif result.at_provider is None:
        messages.warning(
            request,
            _(
                "Disconnected here. Your provider could not be reached to withdraw the access; "
                "the withdrawal is pending and will be retried. Nothing can be sent meanwhile."
            ),
        )
    else:
        messages.success(request, _("Disconnected. The access was withdrawn at your provider."))
    return redirect("mailgov:mailboxes")


@private
@login_required
@require_POST
@limited("DISCONNECT_RATE")
def keep(request: HttpRequest, pk) -> HttpResponse:
    """The owner keeps a mailbox that was about to be revoked as unused: its
    activity starts again from now, and a new warning comes only after
    another period without use."""
    mailbox = get_object_or_404(Mailbox, pk=pk, owner=request.user)
    if mailbox.status == Mailbox.Status.REVOKED:
        messages.info(request, _("This mailbox is already disconnected."))
        return redirect("mailgov:mailboxes")
    mailbox.kept_at = timezone.now()
    mailbox.dormant_warned_at = None
    # A plain save(): django-auditlog records the owner's decision.
    mailbox.save(update_fields=["kept_at", "dormant_warned_at"])
    messages.success(
        request,
        _("%(address)s stays connected until %(date)s, or longer if it is used.")
        % {
            "address": mailbox.address,
            "date": date_format(
                mailbox.kept_at + timedelta(days=mailgov_settings.DORMANT_DAYS), "DATE_FORMAT"
            ),
        },
    )
    return redirect("mailgov:mailboxes")


def protection(request: HttpRequest) -> HttpResponse:
    """How we protect your mailbox access (public)."""
    return render_page(
        request,
        "mailgov/protection.html",
        {"security_contact": mailgov_settings.SECURITY_CONTACT},
    )


def ratelimited(request: HttpRequest, exception: Exception) -> HttpResponse:
    """``RATELIMIT_VIEW``: a 429 page and a security log line.

    It may answer at a callback URL that carries a code: never cached, never
    referred.
    """
    security_logger.warning(
        "rate limit hit on %r (user %s)", request.path[:200], getattr(request.user, "pk", None)
    )
    response = render_page(request, "mailgov/ratelimited.html", status=429)
    response["Retry-After"] = "60"
    return make_private(response)


@private
def consent_error(request: HttpRequest) -> HttpResponse:
    """Where a failed consent lands, on a URL without code or state."""
    message = request.session.pop(ERROR_SESSION_KEY, None) or _(
        "This consent could not be completed. Nothing was stored."
    )
    return render_page(request, "mailgov/consent_error.html", {"message": message}, status=400)
