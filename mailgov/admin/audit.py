"""The audit view: django-auditlog's entries, read-only, filtered and exported.

Every entry auditlog holds is listed, the host's own models' too; nothing
is filtered out by default. Filters: actor (the users who appear in the
trail, and "system"), action, kind of object, time; search by the object's
representation, its id or a correlation id (exact). Export as CSV needs
``mailgov.export_data``, and is itself audited.

django-auditlog registers its own admin for :class:`auditlog.models.LogEntry`;
this one is on the :class:`~mailgov.models.AuditEntry` proxy, with the
portal's permissions (``mailgov.view_auditentry``), and leaves that alone.
An entry is never edited or deleted here.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.contrib.auth import get_user_model
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _

from mailgov.admin.jobs import ReadOnlyAdmin
from mailgov.models import AuditEntry

__all__ = ["AuditEntryAdmin"]

#: Users offered by the actor filter (the most recent actors first would
#: need a query per page; the trail's actors by name, this many).
ACTOR_CHOICES = 200

#: Ids of a summarised entry shown on its page.
LISTED_IDS = 100


class ActorFilter(admin.SimpleListFilter):
    """The users who appear in the trail as actors, and "system" (no actor:
    sweeps, shell commands, workers without an admin behind them)."""

    title = _("actor")
    parameter_name = "actor"
    SYSTEM = "system"

    def lookups(self, request, model_admin):
        User = get_user_model()
        actors = (
            User._default_manager.filter(
                pk__in=AuditEntry.objects.exclude(actor=None).values("actor").distinct()
            )
            .order_by(User.USERNAME_FIELD)
            .values_list("pk", User.USERNAME_FIELD)[:ACTOR_CHOICES]
        )
        return [(self.SYSTEM, _("system")), *((str(pk), name) for pk, name in actors)]

    def queryset(self, request, queryset):
        value = self.value()
        if value == self.SYSTEM:
            return queryset.filter(actor__isnull=True)
        if value:
            try:
                return queryset.filter(actor_id=int(value))
            except (TypeError, ValueError):
                return queryset.filter(actor_id=value)
        return queryset


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ("timestamp", "actor_name", "action", "object_name", "cid")
    list_filter = (
        ActorFilter,
        "action",
        ("content_type", admin.RelatedOnlyFieldListFilter),
        ("timestamp", admin.DateFieldListFilter),
    )
    list_select_related = ("actor", "content_type")
    search_fields = ("object_repr", "=object_pk", "=cid")
    date_hierarchy = "timestamp"
    fields = (
        "timestamp",
        "actor_name",
        "action",
        "content_type",
        "object_pk",
        "object_repr",
        "changes_table",
        "additional_data_text",
        "cid",
        "remote_addr",
    )
    readonly_fields = fields
    actions = ["export_csv"]
    csv_columns = [
        ("time", "timestamp"),
        ("actor", lambda obj: AuditEntryAdmin.actor_label(obj)),
        ("action", lambda obj: obj.get_action_display()),
        ("object kind", lambda obj: obj.content_type.app_labeled_name),
        ("object id", "object_pk"),
        ("object", "object_repr"),
        ("changes", lambda obj: _json(obj.changes) if obj.changes else ""),
        ("additional data", lambda obj: _json(obj.additional_data) if obj.additional_data else ""),
        ("correlation id", "cid"),
        ("remote address", "remote_addr"),
    ]

    def get_queryset(self, request: HttpRequest):
        # serialized_data (a copy of a whole row, when a model asks for it)
        # is never shown: not loaded. The changes and additional data (a
        # summary names every id it touched) are loaded by the pages that
        # show them: an entry's page, and the export.
        return (
            super()
            .get_queryset(request)
            .select_related("actor", "content_type")
            .defer("serialized_data", "changes", "additional_data")
        )

    def get_object(self, request: HttpRequest, object_id: str, from_field=None):
        entry = super().get_object(request, object_id, from_field)
        if entry is not None:
            entry.refresh_from_db(fields=["changes", "additional_data"])
        return entry

    def csv_rows(self, queryset: Any):
        return super().csv_rows(
            queryset.defer(None).defer("serialized_data").select_related("actor", "content_type")
        )

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @staticmethod
    def actor_label(obj: AuditEntry) -> str:
        if obj.actor is not None:
            return obj.actor.get_username()
        return obj.actor_email or str(_("system"))

    @admin.display(description=_("actor"), ordering="actor")
    def actor_name(self, obj: AuditEntry) -> str:
        return self.actor_label(obj)

    @admin.display(description=_("object"), ordering="object_repr")
    def object_name(self, obj: AuditEntry) -> str:
        return f"{obj.content_type.name}: {obj.object_repr}"

    @admin.display(description=_("changes"))
    def changes_table(self, obj: AuditEntry) -> str:
        changes = obj.changes
        if not changes:
            return "—"
        if not isinstance(changes, dict):
            return _json(changes)
        rows = []
        for field, value in sorted(changes.items()):
            if isinstance(value, list | tuple) and len(value) == 2:
                rows.append((field, _json(value[0]), _json(value[1])))
            else:
                rows.append((field, "", _json(value)))
        return format_html(
            '<table><thead><tr><th scope="col">{}</th><th scope="col">{}</th>'
            '<th scope="col">{}</th></tr></thead><tbody>{}</tbody></table>',
            _("field"),
            _("before"),
            _("after"),
            format_html_join("", '<tr><th scope="row">{}</th><td>{}</td><td>{}</td></tr>', rows),
        )

    @admin.display(description=_("additional data"))
    def additional_data_text(self, obj: AuditEntry) -> str:
        data = obj.additional_data
        if not data:
            return "—"
        if isinstance(data, dict):
            # A summary of a job over 100,000 rows names them all: the page
            # shows the first ones, the CSV export every one.
            data = {
                key: [*value[:LISTED_IDS], f"... {len(value) - LISTED_IDS} more"]
                if isinstance(value, list) and len(value) > LISTED_IDS
                else value
                for key, value in data.items()
            }
        return format_html("<pre>{}</pre>", json.dumps(data, indent=2, sort_keys=True, default=str))
