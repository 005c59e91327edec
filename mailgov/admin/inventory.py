"""The inventory of grants: mailboxes, their consent receipts, refresh
history and the grants of deleted mailboxes still to revoke.

No page here holds a token or a ciphertext: the mailbox list reads the
token's expiry through an annotation (``credentials__expires_at``) and never
loads the credentials row, whose columns are encrypted; pending revocations
are listed without their refresh token (not even deferred-loaded).

A mailbox changes through the governance actions (:mod:`mailgov.governance`:
revoke, suspend, resume, require re-consent, release or cancel held mail),
never through a form. Its Delete button is replaced by Revoke: deleting a
row would drop its tokens, and a grant must end at the provider first. A
user's deletion (which cascades to the user's mailboxes) still works: the
``pre_delete`` receiver keeps each refresh token for its revocation
(:func:`mailgov.revocation.keep_for_revocation`).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from auditlog.models import LogEntry
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import display_for_value, quote, unquote
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db.models import Count, Exists, F, IntegerField, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce, TruncDate
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from mailgov.admin.common import EXPORT_PERMISSION, deny
from mailgov.admin.jobs import SAMPLE_ROWS, GovernanceActions, ReadOnlyAdmin, governance_action
from mailgov.audit import log_access
from mailgov.capabilities import CAPABILITIES
from mailgov.conf import mailgov_settings
from mailgov.governance import allowed, start
from mailgov.lifecycle import activity
from mailgov.models import (
    AdminJob,
    ConsentReceipt,
    Incident,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from mailgov.privacy import erase_user, export_user
from mailgov.scopes import scope_q

__all__ = [
    "ConsentReceiptAdmin",
    "MailboxAdmin",
    "PendingRevocationAdmin",
    "RefreshEventAdmin",
]

#: Rows of each history shown on a mailbox's page (the full lists are a
#: filtered changelist away).
DETAIL_ROWS = 20

#: Days of send statistics on a mailbox's page.
STATS_DAYS = 30


def held_messages() -> Any:
    return OutboxMessage.objects.filter(mailbox=OuterRef("pk"), state=OutboxMessage.State.HELD)


# -- filters --------------------------------------------------------------------------------


class StatusFilter(admin.SimpleListFilter):
    """The status, and two states that are not statuses: refreshing has
    failed for ``MAILGOV_REFRESH_FAILING_DAYS`` days or more, and held mail."""

    title = _("status")
    parameter_name = "status"
    REFRESH_FAILING = "refresh_failing"
    HELD = "held"

    def lookups(self, request, model_admin):
        return [
            *Mailbox.Status.choices,
            (self.REFRESH_FAILING, _("Refresh failing")),
            (self.HELD, _("Has held mail")),
        ]

    def queryset(self, request, queryset):
        value = self.value()
        if value in Mailbox.Status.values:
            return queryset.filter(status=value)
        if value == self.REFRESH_FAILING:
            return queryset.filter(refresh_failing_days__gte=mailgov_settings.REFRESH_FAILING_DAYS)
        if value == self.HELD:
            return queryset.filter(Exists(held_messages()))
        return queryset


class ProviderFilter(admin.SimpleListFilter):
    """Django's field filter reads its choices through the list's queryset
    (with its joins and annotations); this one reads the indexed column."""

    title = _("provider")
    parameter_name = "provider__exact"

    def lookups(self, request, model_admin):
        providers = Mailbox.objects.order_by("provider").values_list("provider", flat=True)
        return [(provider, provider) for provider in providers.distinct()]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(provider=self.value())
        return queryset


class CapabilityFilter(admin.SimpleListFilter):
    """Mailboxes granted a capability's required scopes (of their provider,
    as configured now), as an incident of that scope covers them."""

    title = _("capability")
    parameter_name = "capability"

    def lookups(self, request, model_admin):
        return [(capability.id, capability.name) for capability in CAPABILITIES.values()]

    def queryset(self, request, queryset):
        value = self.value()
        if value not in CAPABILITIES:
            return queryset
        return queryset.filter(
            scope_q(Incident(scope=Incident.Scope.CAPABILITY, scope_value=value))
        )


class DormancyFilter(admin.SimpleListFilter):
    """Grants the dormancy sweep warns about (or revokes) next: no activity
    for ``MAILGOV_DORMANT_DAYS - MAILGOV_DORMANT_WARNING_DAYS`` days
    (:func:`mailgov.lifecycle.activity`: used, connected or kept)."""

    title = _("dormancy")
    parameter_name = "dormant"

    def lookups(self, request, model_admin):
        return [("soon", _("Dormant soon or now"))]

    def queryset(self, request, queryset):
        if self.value() != "soon":
            return queryset
        warn_after = mailgov_settings.DORMANT_DAYS - mailgov_settings.DORMANT_WARNING_DAYS
        return (
            queryset.exclude(status=Mailbox.Status.REVOKED)
            .annotate(activity=activity())
            .filter(activity__lt=timezone.now() - timedelta(days=warn_after))
        )


class TokenExpiryFilter(admin.SimpleListFilter):
    """The access token's expiry (read in clear from the credentials row)."""

    title = _("access token")
    parameter_name = "token"

    def lookups(self, request, model_admin):
        return [("24h", _("Expiring within 24 hours")), ("expired", _("Expired"))]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "24h":
            return queryset.filter(
                token_expires__gte=now, token_expires__lt=now + timedelta(days=1)
            )
        if self.value() == "expired":
            return queryset.filter(token_expires__lt=now)
        return queryset


# -- mailboxes ------------------------------------------------------------------------------


@admin.register(Mailbox)
class MailboxAdmin(GovernanceActions, ReadOnlyAdmin):
    list_display = (
        "address",
        "owner_name",
        "provider",
        "status",
        "refresh_failing_flag",
        "held_count",
        "token_expires",
        "last_used_at",
        "connected_at",
    )
    list_filter = (
        StatusFilter,
        ProviderFilter,
        CapabilityFilter,
        DormancyFilter,
        TokenExpiryFilter,
        ("last_used_at", admin.DateFieldListFilter),
    )
    list_select_related = ("owner",)
    search_fields = ("address", "owner__username", "owner__email")
    ordering = ("address",)
    # One count of the filtered rows, not a second of every row (at 100,000
    # mailboxes each costs a scan).
    show_full_result_count = False
    change_form_template = "admin/mailgov/mailbox/change_form.html"
    fieldsets = [
        (
            _("Grant"),
            {
                "fields": [
                    "address",
                    "owner",
                    "provider",
                    "provider_binding",
                    "status",
                    "scopes",
                    "connected_at",
                    "last_used_at",
                    "last_refreshed_at",
                    "token_expires",
                    "held_count",
                ]
            },
        ),
        (
            _("Refreshing"),
            {
                "fields": [
                    "refresh_failing_days",
                    "refresh_failed_on",
                    "refresh_failures",
                    "refresh_retry_at",
                    "refresh_failing_notified",
                ]
            },
        ),
        (
            _("Dormancy and pauses"),
            {
                "fields": [
                    "kept_at",
                    "dormant_warned_at",
                    "sending_paused_until",
                    "sending_paused_reason",
                ]
            },
        ),
        (
            _("Revocation"),
            {
                "fields": [
                    "revoked_at",
                    "revocation_reason",
                    "revocation_attempts",
                    "revocation_retry_at",
                    "revocation_given_up_at",
                ]
            },
        ),
    ]
    # Every field: a mailbox changes through the governance actions, never a form.
    readonly_fields = [
        *(field.name for field in Mailbox._meta.fields),
        "token_expires",
        "held_count",
    ]
    actions = [
        governance_action("revoke"),
        governance_action("suspend"),
        governance_action("resume"),
        governance_action("require_reconsent"),
        governance_action("release_held"),
        governance_action("cancel_held"),
        "export_csv",
        "export_owners_data",
        "erase_owners_data",
    ]
    csv_columns = [
        ("address", "address"),
        ("owner", "owner__username"),
        ("owner email", "owner__email"),
        ("provider", "provider"),
        ("status", "status"),
        ("scopes", lambda obj: " ".join(obj.scopes or [])),
        ("refresh failing days", "refresh_failing_days"),
        ("held messages", "held_count"),
        ("access token expires", "token_expires"),
        ("last used", "last_used_at"),
        ("connected", "connected_at"),
        ("revoked", "revoked_at"),
        ("revocation reason", "revocation_reason"),
    ]

    def get_queryset(self, request: HttpRequest):
        # The expiry through the credentials row's clear column: one LEFT
        # JOIN, never the encrypted columns (no select_related("credentials")).
        held = Subquery(
            held_messages()
            .order_by()
            .values("mailbox")
            .annotate(count=Count("pk"))
            .values("count")[:1],
            output_field=IntegerField(),
        )
        return (
            super()
            .get_queryset(request)
            .select_related("owner")
            .annotate(
                token_expires=F("credentials__expires_at"), held_count=Coalesce(held, Value(0))
            )
        )

    # -- columns ----------------------------------------------------------------------
    @admin.display(description=_("owner"), ordering="owner__username")
    def owner_name(self, obj: Mailbox) -> str:
        return obj.owner.get_username()

    @admin.display(description=_("refresh failing"), boolean=True, ordering="refresh_failing_days")
    def refresh_failing_flag(self, obj: Mailbox) -> bool:
        return obj.refresh_failing

    @admin.display(description=_("held"), ordering="held_count")
    def held_count(self, obj: Mailbox) -> int:
        return getattr(obj, "held_count", 0)

    @admin.display(description=_("access token expires"), ordering="token_expires")
    def token_expires(self, obj: Mailbox) -> str:
        # Formatted here: a read-only field that is not a model field is
        # shown as it is (an ISO string) on the detail page.
        return display_for_value(
            getattr(obj, "token_expires", None), self.get_empty_value_display()
        )

    # -- data-subject requests (mailgov.privacy) --------------------------------------
    def has_export_data_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(EXPORT_PERMISSION)

    def has_erase_data_permission(self, request: HttpRequest) -> bool:
        return request.user.is_superuser or request.user.has_perm("mailgov.erase_data")

    @staticmethod
    def owners_of(queryset: Any) -> Any:
        return (
            get_user_model()
            .objects.filter(pk__in=queryset.order_by().values("owner"))
            .order_by("pk")
        )

    @admin.action(description=_("Export the owners' data (JSON)"), permissions=["export_data"])
    def export_owners_data(self, request: HttpRequest, queryset: Any) -> HttpResponse:
        """Everything mailgov holds about each owner of the selected mailboxes
        (:func:`mailgov.privacy.export_user`), one JSON download; audited."""
        owners = list(self.owners_of(queryset))
        log_access(request, "owners' data", get_user_model(), len(owners))
        response = HttpResponse(
            json.dumps({"owners": [export_user(owner) for owner in owners]}, indent=2),
            content_type="application/json; charset=utf-8",
        )
        response["Content-Disposition"] = 'attachment; filename="mailgov-owners-data.json"'
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description=_("Erase the owners' data"), permissions=["erase_data"])
    def erase_owners_data(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        """Confirm, then erase each owner of the selected mailboxes
        (:func:`mailgov.privacy.erase_user`; their accounts stay)."""
        owners = self.owners_of(queryset)
        if request.POST.get("confirm") != "yes":
            count = owners.count()
            context = {
                **self.admin_site.each_context(request),
                "title": _("Are you sure?"),
                "subtitle": None,
                "opts": self.opts,
                "action_name": "erase_owners_data",
                "action_label": _(
                    "Erase the owners' data: every grant is revoked, outbox bodies and "
                    "notices deleted, addresses pseudonymised. This cannot be undone."
                ),
                "count": count,
                "objects_name": _("owner") if count == 1 else _("owners"),
                "sample": [owner.get_username() for owner in owners[:SAMPLE_ROWS]],
                "more": max(0, count - SAMPLE_ROWS),
                "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
                "select_across": request.POST.get("select_across", "0"),
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "queued": False,
            }
            request.current_app = self.admin_site.name
            return TemplateResponse(
                request, "admin/mailgov/mailbox/action_confirmation.html", context
            )
        records = [erase_user(owner, actor=request.user) for owner in list(owners)]
        pending = sum(1 for record in records if record.status == record.Status.PENDING)
        self.message_user(
            request,
            _(
                "Erased the data of %(count)d owner(s): %(pseudonyms)s. "
                "%(pending)d wait for their revocations at the provider."
            )
            % {
                "count": len(records),
                "pseudonyms": ", ".join(record.pseudonym for record in records),
                "pending": pending,
            },
            messages.SUCCESS,
        )
        return None

    # -- no delete: revoke ------------------------------------------------------------
    def get_urls(self):
        return [
            path(
                "<path:object_id>/revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="mailgov_mailbox_revoke",
            ),
            *super().get_urls(),
        ]

    def delete_view(self, request: HttpRequest, object_id: str, extra_context=None):
        """Deleting would drop the tokens of a live grant: revoke instead."""
        return HttpResponseRedirect(
            reverse(f"{self.admin_site.name}:mailgov_mailbox_revoke", args=[object_id])
        )

    def revoke_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Confirm (GET), then revoke one mailbox's grant (POST, CSRF)."""
        if not allowed(request.user, "revoke"):
            raise deny(request, "revoke a mailbox", self.model)
        mailbox = self.get_object(request, unquote(object_id))
        if mailbox is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        change_url = reverse(
            f"{self.admin_site.name}:mailgov_mailbox_change", args=[quote(mailbox.pk)]
        )
        if request.method == "POST":
            job = start(
                "revoke",
                [mailbox.pk],
                user=request.user,
                cid=getattr(request, "correlation_id", ""),
            )
            self.report_job(request, job)
            return redirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "title": _("Revoke the grant of %(mailbox)s?") % {"mailbox": mailbox.address},
            "subtitle": None,
            "opts": self.opts,
            "object": mailbox,
            "change_url": change_url,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/mailgov/mailbox/revoke_confirmation.html", context)

    # -- the detail page --------------------------------------------------------------
    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(self.detail_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def detail_context(self, request: HttpRequest, mailbox: Mailbox) -> dict[str, Any]:
        """The histories of ``mailbox``: one query each, whatever their length."""
        since = timezone.now() - timedelta(days=STATS_DAYS)
        stats = list(
            SendLog.objects.filter(mailbox=mailbox, attempted_at__gte=since)
            .annotate(day=TruncDate("attempted_at"))
            .values("day")
            .annotate(
                sent=Count("pk", filter=Q(status=SendLog.Status.SENT)),
                failed=Count("pk", filter=Q(status=SendLog.Status.FAILED)),
            )
            .order_by("day")
        )
        mailbox_type = ContentType.objects.get_for_model(Mailbox)
        summaries = [
            ContentType.objects.get_for_model(model, for_concrete_model=False)
            for model in (AdminJob, Incident)
        ]
        audit = list(
            LogEntry.objects.filter(
                Q(content_type=mailbox_type, object_pk=str(mailbox.pk))
                # Set-based changes write one summary on the job or incident,
                # naming the ids it touched.
                | Q(content_type__in=summaries, additional_data__icontains=str(mailbox.pk))
            )
            .select_related("actor", "content_type")
            .order_by("-timestamp")[: DETAIL_ROWS * 2]
        )
        return {
            "can_revoke": allowed(request.user, "revoke")
            and mailbox.status != Mailbox.Status.REVOKED,
            "receipts": list(
                ConsentReceipt.objects.filter(mailbox=mailbox)
                .order_by("-created_at")
                .values(
                    "pk",
                    "created_at",
                    "action",
                    "capability",
                    "scopes_granted",
                    "explanation_version",
                )[:DETAIL_ROWS]
            ),
            "send_stats": stats,
            "send_totals": {
                "sent": sum(row["sent"] for row in stats),
                "failed": sum(row["failed"] for row in stats),
            },
            "stats_days": STATS_DAYS,
            # Never the payload (nor the recipients inside it): values() only.
            "outbox_rows": list(
                OutboxMessage.objects.filter(mailbox=mailbox)
                .order_by("-created_at")
                .values(
                    "pk", "created_at", "kind", "state", "attempts", "error_code", "held_reason"
                )[:DETAIL_ROWS]
            ),
            "refresh_events": list(
                RefreshEvent.objects.filter(mailbox=mailbox)
                .order_by("-at")
                .values("at", "outcome", "error_code")[:DETAIL_ROWS]
            ),
            "audit_entries": audit,
            "revocation": self.revocation_state(mailbox),
        }

    @staticmethod
    def revocation_state(mailbox: Mailbox) -> dict[str, Any]:
        """Where the provider-side revocation stands (no token is read:
        ``isnull`` on the encrypted column)."""
        held = MailboxCredentials.objects.filter(
            pk=mailbox.pk, refresh_token__isnull=False
        ).exists()
        ended = mailbox.status in (Mailbox.Status.REVOKED, Mailbox.Status.NEEDS_RECONSENT)
        if not ended or (mailbox.status == Mailbox.Status.NEEDS_RECONSENT and not held):
            state = "none"
        elif not held:
            state = "done"
        elif mailbox.revocation_given_up_at is not None:
            state = "given_up"
        else:
            state = "pending"
        return {
            "state": state,
            "attempts": mailbox.revocation_attempts,
            "retry_at": mailbox.revocation_retry_at,
            "given_up_at": mailbox.revocation_given_up_at,
        }


# -- receipts, refresh history, deleted mailboxes' grants --------------------------------------


@admin.register(ConsentReceipt)
class ConsentReceiptAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "user",
        "address",
        "provider",
        "capability",
        "action",
        "explanation_version",
    )
    list_filter = ("action", "capability", "provider", ("created_at", admin.DateFieldListFilter))
    list_select_related = ("user",)
    search_fields = ("address", "user__username", "user__email")
    date_hierarchy = "created_at"
    readonly_fields = [field.name for field in ConsentReceipt._meta.fields]
    actions = ["export_csv"]
    csv_columns = [
        ("time", "created_at"),
        ("user", "user__username"),
        ("address", "address"),
        ("provider", "provider"),
        ("capability", "capability"),
        ("action", "action"),
        ("scopes requested", lambda obj: " ".join(obj.scopes_requested or [])),
        ("scopes granted", lambda obj: " ".join(obj.scopes_granted or [])),
        ("explanation version", "explanation_version"),
        ("IP address (truncated)", "ip_address"),
        ("browser", "user_agent"),
    ]


@admin.register(RefreshEvent)
class RefreshEventAdmin(ReadOnlyAdmin):
    list_display = ("at", "mailbox", "outcome", "error_code")
    list_filter = ("outcome", ("at", admin.DateFieldListFilter), "mailbox__provider")
    list_select_related = ("mailbox",)
    search_fields = ("mailbox__address",)
    readonly_fields = [field.name for field in RefreshEvent._meta.fields]
    actions = ["export_csv"]
    csv_columns = [
        ("time", "at"),
        ("mailbox", "mailbox__address"),
        ("outcome", "outcome"),
        ("error", "error_code"),
    ]


@admin.register(PendingRevocation)
class PendingRevocationAdmin(ReadOnlyAdmin):
    """Grants of deleted mailboxes, still to revoke at their provider. The
    refresh token kept for it is never shown, exported, nor even loaded."""

    list_display = ("mailbox_id", "provider", "created_at", "attempts", "retry_at", "given_up_at")
    list_filter = ("provider", ("given_up_at", admin.EmptyFieldListFilter))
    search_fields = ("=mailbox_id",)
    fields = (
        "mailbox_id",
        "provider",
        "provider_binding",
        "created_at",
        "attempts",
        "retry_at",
        "given_up_at",
    )
    readonly_fields = fields
    exclude = ("refresh_token",)
    actions = ["export_csv"]
    csv_columns = [
        ("deleted mailbox", "mailbox_id"),
        ("provider", "provider"),
        ("queued", "created_at"),
        ("attempts", "attempts"),
        ("next attempt", "retry_at"),
        ("given up", "given_up_at"),
    ]

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).defer("refresh_token")
