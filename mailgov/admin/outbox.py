"""The outbox and the send log in the admin.

States, attempts, reasons: never the body nor the envelope (``payload``,
encrypted, not even loaded: deferred), never the recipients inside it, never
the claim id of the worker's lease. Retry (failed messages only: a sent
message would be sent twice, and is refused and counted as such), cancel and
release go through :mod:`mailgov.governance`, like the mailbox actions.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from mailgov.admin.jobs import GovernanceActions, ReadOnlyAdmin, governance_action
from mailgov.models import OutboxAttempt, OutboxMessage, SendLog

__all__ = ["OutboxMessageAdmin", "SendLogAdmin"]


class MailboxFilter(admin.SimpleListFilter):
    """One mailbox, by address or id, typed in: a list of every mailbox
    would not fit a sidebar at 100,000 of them. The mailbox's page links
    here with its id."""

    title = _("mailbox")
    parameter_name = "mailbox"
    template = "admin/mailgov/outboxmessage/mailbox_filter.html"

    def lookups(self, request, model_admin):
        return []

    def has_output(self) -> bool:
        return True

    def choices(self, changelist):
        yield {
            "value": self.value() or "",
            "hidden": [
                (name, value)
                for name, value in changelist.params.items()
                if name not in (self.parameter_name, "p")
            ],
            "clear_url": changelist.get_query_string(remove=[self.parameter_name]),
        }

    def queryset(self, request, queryset):
        value = (self.value() or "").strip()
        if not value:
            return queryset
        try:
            return queryset.filter(mailbox_id=uuid.UUID(value))
        except ValueError:
            return queryset.filter(mailbox__address__iexact=value)


class OutboxAttemptInline(admin.TabularInline):
    model = OutboxAttempt
    fields = ("started_at", "finished_at", "outcome", "reply_code", "error_code", "worker")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("started_at",)

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(OutboxMessage)
class OutboxMessageAdmin(GovernanceActions, ReadOnlyAdmin):
    list_display = (
        "created_at",
        "kind",
        "mailbox",
        "state",
        "attempts",
        "next_attempt_at",
        "error_code",
        "reply_code",
        "held_reason",
    )
    list_filter = (
        "state",
        "kind",
        MailboxFilter,
        ("mailbox__provider", admin.AllValuesFieldListFilter),
        ("created_at", admin.DateFieldListFilter),
    )
    search_fields = ("=message_id", "mailbox__address")
    list_select_related = ("mailbox",)
    # Not the payload (body and recipients), not the claim id, not the
    # notified user's account nor the sender's idempotency key.
    fields = (
        "id",
        "kind",
        "event",
        "mailbox",
        "message_id",
        "state",
        "held_reason",
        "attempts",
        "failures",
        "recipient_count",
        "error_code",
        "reply_code",
        "next_attempt_at",
        "claimed_by",
        "lease_expires_at",
        "created_at",
        "sent_at",
        "finished_at",
    )
    readonly_fields = fields
    inlines = [OutboxAttemptInline]
    actions = [
        governance_action("retry"),
        governance_action("cancel"),
        governance_action("release"),
        "export_csv",
    ]
    csv_columns = [
        ("queued", "created_at"),
        ("kind", "kind"),
        ("mailbox", "mailbox__address"),
        ("provider", "mailbox__provider"),
        ("state", "state"),
        ("held because", "held_reason"),
        ("attempts", "attempts"),
        ("failed attempts", "failures"),
        ("error", "error_code"),
        ("SMTP reply code", "reply_code"),
        ("Message-ID", "message_id"),
        ("sent", "sent_at"),
        ("finished", "finished_at"),
    ]

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).defer("payload").select_related("mailbox")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Nothing cascades into outbox rows (a mailbox's deletion sets null).
        return False


@admin.register(SendLog)
class SendLogAdmin(ReadOnlyAdmin):
    list_display = ("attempted_at", "mailbox", "status", "recipient_count", "error_class")
    list_filter = (
        "status",
        ("mailbox__provider", admin.AllValuesFieldListFilter),
        ("attempted_at", admin.DateFieldListFilter),
    )
    search_fields = ("=message_id", "mailbox__address")
    list_select_related = ("mailbox",)
    readonly_fields = [field.name for field in SendLog._meta.fields]
    actions = ["export_csv"]
    csv_columns = [
        ("attempted", "attempted_at"),
        ("mailbox", "mailbox__address"),
        ("provider", "mailbox__provider"),
        ("status", "status"),
        ("recipients", "recipient_count"),
        ("error", "error_class"),
        ("Message-ID", "message_id"),
        ("sent", "sent_at"),
    ]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Nothing cascades into the send log (a mailbox's deletion sets null).
        return False
