"""A read-mostly admin for mailboxes and the send log. It never shows a token."""

from __future__ import annotations

from django.contrib import admin

from mailgov.models import Mailbox, SendLog


@admin.register(Mailbox)
class MailboxAdmin(admin.ModelAdmin):
    list_display = ("address", "provider", "owner", "status", "last_used_at", "connected_at")
    list_filter = ("status", "provider")
    search_fields = ("address", "owner__username", "owner__email")
    readonly_fields = (
        "id",
        "owner",
        "provider",
        "address",
        "scopes",
        "connected_at",
        "last_used_at",
        "last_refreshed_at",
        "revoked_at",
        "revocation_reason",
    )
    fields = ("id", "owner", "provider", "address", "status", *readonly_fields[4:])

    def has_add_permission(self, request) -> bool:
        # A mailbox is connected by its owner's consent, never typed in.
        return False


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
