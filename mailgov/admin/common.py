"""What every admin page of the portal shares: refusals that are answered
403 and audited, and CSV export of any filtered list.

Django's admin hides what a user may not do, and answers a forged request
for a hidden action with "No action selected" (200). The portal answers
403 instead, writes the attempt to the ``mailgov.security`` logger and to
the audit trail (:func:`mailgov.audit.log_denied`), and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.utils.translation import gettext_lazy as _

from mailgov.audit import log_access, log_denied
from mailgov.exports import csv_lines, csv_response

#: The permission every export needs (mail auditors have it).
EXPORT_PERMISSION = "mailgov.export_data"


def deny(request: HttpRequest, what: str, target: Any) -> PermissionDenied:
    """Log and audit a refused attempt; return the exception to raise."""
    log_denied(request, what, target)
    return PermissionDenied(f"You may not {what}.")


def require(request: HttpRequest, permission: str, what: str, target: Any) -> None:
    """Raise 403 (logged and audited) unless the user has ``permission``."""
    if not request.user.has_perm(permission):
        raise deny(request, what, target)


def require_superuser(request: HttpRequest, what: str, target: Any) -> None:
    if not request.user.is_superuser:
        raise deny(request, what, target)


class GovernanceAdmin(admin.ModelAdmin):
    """Base of the portal's model admins.

    - A posted action the user may not run: 403, logged, audited.
    - Pages the user may not view: 403, logged, audited.
    - ``csv_columns``: ``[(header, attribute name or callable(obj)), ...]``
      exports the list as filtered and searched (``export.csv`` next to the
      changelist, a link in its tools; needs ``mailgov.export_data``), and
      the "Export selected as CSV" action.
    """

    csv_columns: list[tuple[str, str | Callable[[Any], Any]]] = []
    change_list_template = "admin/mailgov/change_list.html"

    # -- refusals ----------------------------------------------------------------
    def refuse_hidden_action(self, request: HttpRequest) -> None:
        name = request.POST.get("action", "")
        known = {action_name for _func, action_name, _desc in self._get_base_actions()}
        if name in known and name not in self.get_actions(request):
            raise deny(request, f"run the admin action {name!r}", self.model)

    def response_action(self, request: HttpRequest, queryset: Any) -> HttpResponse | None:
        self.refuse_hidden_action(request)
        return super().response_action(request, queryset)

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        if not self.has_view_or_change_permission(request):
            raise deny(request, "view the list", self.model)
        if request.method == "POST" and "action" in request.POST:
            # Django never calls response_action() for a user left with no
            # action at all: a forged one would get a 200 "nothing happened".
            self.refuse_hidden_action(request)
        extra_context = {**(extra_context or {}), "can_export": self.can_export(request)}
        return super().changelist_view(request, extra_context)

    def change_view(self, request: HttpRequest, object_id: str, form_url="", extra_context=None):
        if not self.has_view_or_change_permission(request):
            raise deny(request, "view a row", self.model)
        return super().change_view(request, object_id, form_url, extra_context)

    # -- export ------------------------------------------------------------------
    def can_export(self, request: HttpRequest) -> bool:
        # Exporting a list needs seeing it, too.
        return (
            bool(self.csv_columns)
            and request.user.has_perm(EXPORT_PERMISSION)
            and self.has_view_or_change_permission(request)
        )

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        if not self.csv_columns:
            actions.pop("export_csv", None)
        return actions

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "export.csv",
                self.admin_site.admin_view(self.export_view),
                name="{}_{}_export".format(*info),
            ),
            *super().get_urls(),
        ]

    def csv_rows(self, queryset: Any) -> Iterable[list[Any]]:
        getters = [
            column if callable(column) else (lambda obj, name=column: _attr(obj, name))
            for _header, column in self.csv_columns
        ]
        for obj in queryset.iterator(chunk_size=2000):
            yield [getter(obj) for getter in getters]

    def _export(self, request: HttpRequest, queryset: Any, what: str) -> HttpResponse:
        if not self.can_export(request):
            raise deny(request, "export", self.model)
        log_access(request, what, self.model, queryset.count())
        headers = [header for header, _column in self.csv_columns]
        return csv_response(
            f"{self.opts.model_name}.csv", csv_lines(headers, self.csv_rows(queryset))
        )

    def export_view(self, request: HttpRequest) -> HttpResponse:
        """The changelist's rows as filtered and searched now, as CSV."""
        if not self.can_export(request):
            raise deny(request, "export", self.model)
        changelist = self.get_changelist_instance(request)
        return self._export(request, changelist.get_queryset(request), "filtered list")

    @admin.action(description=_("Export selected as CSV"))
    def export_csv(self, request: HttpRequest, queryset: Any) -> HttpResponse:
        return self._export(request, queryset, "selection")

    actions = ["export_csv"]

    def has_export_csv_permission(self, request: HttpRequest) -> bool:
        return self.can_export(request)

    export_csv.allowed_permissions = ("export_csv",)


def _attr(obj: Any, name: str) -> Any:
    value: Any = obj
    for part in name.split("__"):
        value = getattr(value, part, None)
        if value is None:
            return ""
    if callable(value):
        value = value()
    return value
