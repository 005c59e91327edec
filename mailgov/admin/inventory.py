"""The admin for mailboxes and the send log. It never shows a token.

Status changes go through the services (revocation wipes and revokes tokens,
writes the audit trail); the status is therefore read-only here, and the one
action is "Revoke", which needs the ``mailgov.change_mailbox`` permission.
"""

from __future__ import annotations

import logging

from django.contrib import admin, messages
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailgov.exceptions import MailgovConfigurationError
from mailgov.models import Mailbox, OutboxAttempt, OutboxMessage, SendLog
from mailgov.services import revoke_mailbox

security_logger = logging.getLogger("mailgov.security")


@admin.register(Mailbox)
class MailboxAdmin(admin.ModelAdmin):
    list_display = (
        "address",
        "provider",
        "owner",
        "status",
        "refresh_failing_flag",
        "last_used_at",
        "connected_at",
    )
    list_filter = ("status", "provider")
    search_fields = ("address", "owner__username", "owner__email")
    # Every field: a mailbox changes through the services (consent,
    # revocation, the lifecycle sweeps), never through a form; the lifecycle
    # state (refresh failing days, pause, dormancy, pending revocation) is
    # shown, not edited.
    readonly_fields = [field.name for field in Mailbox._meta.fields]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        # A mailbox is connected by its owner's consent, never typed in.
        return False

    @admin.display(description=_("refresh failing"), boolean=True)
    def refresh_failing_flag(self, obj: Mailbox) -> bool:
        return obj.refresh_failing

    @admin.action(description=_("Revoke the selected mailboxes' grants"), permissions=["change"])
    def revoke(self, request, queryset):
        results = {True: 0, False: 0, None: 0}
        for mailbox in queryset.exclude(status=Mailbox.Status.REVOKED):
            try:
                result = revoke_mailbox(mailbox, f"admin: revoked by {request.user.pk}")
            except MailgovConfigurationError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            results[result.at_provider] += 1
        security_logger.info(
            "admin user %s revoked %d mailboxes", request.user.pk, sum(results.values())
        )
        self.message_user(
            request,
            ngettext(
                "%(count)d mailbox revoked.", "%(count)d mailboxes revoked.", sum(results.values())
            )
            % {"count": sum(results.values())},
        )
        if results[False]:
            self.message_user(
                request,
                _(
                    "%(count)d of them have no revocation endpoint (Microsoft 365): their tokens "
                    "are deleted here; to end the grant at the provider, a tenant administrator "
                    "removes the app's consent or revokes the user's sessions."
                )
                % {"count": results[False]},
                messages.WARNING,
            )
        if results[None]:
            self.message_user(
                request,
                _(
                    "%(count)d could not be revoked at the provider yet (unreachable); they are "
                    "revoked here and never send."
                )
                % {"count": results[None]},
                messages.WARNING,
            )


@admin.register(SendLog)
class SendLogAdmin(admin.ModelAdmin):
    list_display = ("attempted_at", "mailbox", "status", "recipient_count", "error_class")
    list_filter = ("status",)
    search_fields = ("message_id",)
    readonly_fields = [f.name for f in SendLog._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class OutboxAttemptInline(admin.TabularInline):
    model = OutboxAttempt
    fields = ("started_at", "finished_at", "outcome", "reply_code", "error_code", "worker")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("started_at",)

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    """The outbox: states, attempts, reasons. Never the body (encrypted, and
    not a field of any form here) nor the recipients (inside it)."""

    list_display = (
        "created_at",
        "kind",
        "mailbox",
        "state",
        "attempts",
        "next_attempt_at",
        "error_code",
        "reply_code",
    )
    list_filter = ("state", "kind", "mailbox__provider")
    search_fields = ("message_id", "mailbox__address")
    list_select_related = ("mailbox",)
    readonly_fields = [f.name for f in OutboxMessage._meta.fields if f.name != "payload"]
    exclude = ("payload", "claim_id")
    inlines = [OutboxAttemptInline]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
