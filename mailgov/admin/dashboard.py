"""The dashboard page: the changelist of the ``Governance`` proxy model.

So it is listed as "Dashboard" in the "Mail governance" section of any
host's admin index, without replacing the index. Needs
``mailgov.view_dashboard`` (403, logged and audited, otherwise); its CSV
export needs ``mailgov.export_data``.

The figures come from :func:`mailgov.dashboard.build` (a constant number of
queries). Charts are SVG drawn here, on the server: no script, no inline
style (a Content Security Policy may forbid both), colours from classes in
``mailgov/admin.css``. Every chart has its table, with a caption, and every
number links to the changelist filtered to what it counts, where the user
may see that list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils import formats
from django.utils.translation import gettext as _

from mailgov.admin.common import EXPORT_PERMISSION, deny, require
from mailgov.audit import log_access
from mailgov.dashboard import Cell, Dashboard, Table, build
from mailgov.exports import csv_lines, csv_response
from mailgov.models import Governance, Mailbox

VIEW_PERMISSION = "mailgov.view_dashboard"


# -- charts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    css: str
    # Geometry, in the SVG's user units.
    y: float
    width: float
    text_y: float
    value_x: float


@dataclass(frozen=True)
class BarChart:
    """A horizontal bar chart: one bar per row, labelled, with its value."""

    id: str
    summary: str
    bars: list[Bar]
    height: float
    width: int = 480
    label_width: int = 150
    bar_area: int = 270
    row: int = 26
    bar: int = 16

    @classmethod
    def of(cls, chart_id: str, summary: str, rows: list[tuple[str, int, str]]) -> BarChart:
        top = max((value for _label, value, _css in rows), default=0) or 1
        bars = []
        for index, (label, value, css) in enumerate(rows):
            y = 4 + index * cls.row
            width = round(cls.bar_area * value / top, 1)
            bars.append(
                Bar(
                    label=label if len(label) <= 22 else label[:21] + "…",
                    value=value,
                    css=css,
                    y=y,
                    width=width,
                    text_y=y + cls.bar / 2,
                    value_x=cls.label_width + width + 6,
                )
            )
        return cls(chart_id, summary, bars, height=8 + len(rows) * cls.row)


@dataclass(frozen=True)
class DayBar:
    title: str
    x: float
    sent_y: float
    sent_height: float
    failed_y: float
    failed_height: float


@dataclass(frozen=True)
class SendsChart:
    """Sent and failed per day (stacked bars) and the failure rate (a line
    on a 0-100 % scale)."""

    summary: str
    days: list[DayBar]
    rate_points: str
    top: int
    x_labels: list[tuple[float, str]]
    width: int = 640
    height: int = 240
    left: int = 52
    right: int = 588
    plot_top: int = 16
    bottom: int = 196
    bar_width: float = 12.0

    @classmethod
    def of(cls, dashboard: Dashboard) -> SendsChart:
        sends = dashboard.sends
        top = _nice_top(max((day.total for day in sends), default=0))
        slot = (cls.right - cls.left) / max(len(sends), 1)
        height = cls.bottom - cls.plot_top
        days, points, labels = [], [], []
        for index, day in enumerate(sends):
            x = cls.left + index * slot + (slot - cls.bar_width) / 2
            sent_h = round(height * day.sent / top, 1)
            failed_h = round(height * day.failed / top, 1)
            rate = day.failure_rate
            when = formats.date_format(day.day, "SHORT_DATE_FORMAT")
            days.append(
                DayBar(
                    title=_("%(day)s: %(sent)d sent, %(failed)d failed")
                    % {"day": when, "sent": day.sent, "failed": day.failed}
                    + ("" if rate is None else f" ({rate * 100:.1f} %)"),
                    x=round(x, 1),
                    sent_y=round(cls.bottom - sent_h, 1),
                    sent_height=sent_h,
                    failed_y=round(cls.bottom - sent_h - failed_h, 1),
                    failed_height=failed_h,
                )
            )
            if rate is not None:
                center = round(x + cls.bar_width / 2, 1)
                points.append(f"{center},{round(cls.bottom - height * rate, 1)}")
            if index in (0, len(sends) // 2, len(sends) - 1):
                labels.append((round(x + cls.bar_width / 2, 1), day.day.strftime("%d %b")))
        busiest = max(sends, key=lambda d: d.total, default=None)
        rate = dashboard.failure_rate
        summary = _(
            "Sends over the last %(days)d days: %(sent)d sent, %(failed)d failed "
            "(failure rate %(rate)s)."
        ) % {
            "days": len(sends),
            "sent": dashboard.sent,
            "failed": dashboard.failed,
            "rate": "-" if rate is None else f"{rate * 100:.1f} %",
        }
        if busiest is not None and busiest.total:
            summary += " " + _("Busiest day: %(day)s, %(total)d sends.") % {
                "day": formats.date_format(busiest.day, "SHORT_DATE_FORMAT"),
                "total": busiest.total,
            }
        return cls(summary, days, " ".join(points), top, labels)


def _nice_top(value: int) -> int:
    """The axis maximum: ``value`` rounded up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _summary(what: str, rows: list[tuple[str, int, str]]) -> str:
    parts = ", ".join(f"{label}: {value}" for label, value, _css in rows)
    return f"{what}: {parts}." if parts else f"{what}: " + _("none.")


def status_chart(dashboard: Dashboard) -> BarChart:
    rows = [
        (str(Mailbox.Status(status).label), n, f"mg-status-{status}")
        for status, n in dashboard.by_status.items()
    ]
    return BarChart.of("mg-chart-status", _summary(_("Mailboxes by status"), rows), rows)


def provider_chart(dashboard: Dashboard) -> BarChart:
    rows = [
        (dashboard.provider_names[provider], sum(counts.values()), "mg-provider")
        for provider, counts in dashboard.by_provider.items()
    ]
    return BarChart.of("mg-chart-provider", _summary(_("Mailboxes by provider"), rows), rows)


# -- links ------------------------------------------------------------------------------


class Links:
    """Changelist URLs of the admin site, for the models the user may list."""

    def __init__(self, site: admin.AdminSite, request: HttpRequest):
        self.site, self.request = site, request
        self._bases: dict[str, str | None] = {}

    def base(self, model_name: str) -> str | None:
        if model_name not in self._bases:
            self._bases[model_name] = self._find(model_name)
        return self._bases[model_name]

    def _find(self, model_name: str) -> str | None:
        for model, model_admin in self.site._registry.items():
            opts = model._meta
            if opts.app_label == "mailgov" and opts.model_name == model_name:
                if not model_admin.has_view_or_change_permission(self.request):
                    return None
                try:
                    return reverse(f"{self.site.name}:mailgov_{model_name}_changelist")
                except NoReverseMatch:
                    return None
        return None

    def change(self, model_name: str, pk: str) -> str | None:
        if not model_name or self.base(model_name) is None:
            return None
        try:
            return reverse(f"{self.site.name}:mailgov_{model_name}_change", args=[pk])
        except NoReverseMatch:
            return None

    def of(self, cell: Cell) -> str | None:
        base = self.base(cell.target) if cell.target else None
        if base is None:
            return None
        return f"{base}?{urlencode(cell.params)}" if cell.params else base


@dataclass(frozen=True)
class LinkedRow:
    key: str
    label: str
    #: ``(value, url or None, whether it is a number)``
    cells: list[tuple[Any, str | None, bool]]
    url: str | None = None


@dataclass(frozen=True)
class LinkedTable:
    id: str
    caption: str
    row_header: str
    #: ``(header, whether the column holds numbers)``
    columns: list[tuple[str, bool]]
    rows: list[LinkedRow]


def _number(value: Any) -> bool:
    if isinstance(value, str):
        return value == "" or value.replace(".", "", 1).isdigit()
    return isinstance(value, int | float)


def linked(table: Table, links: Links) -> LinkedTable:
    """``table`` with the URLs of its numbers' lists, for the template."""
    rows = [
        LinkedRow(
            row.key,
            row.label,
            [(cell.value, links.of(cell), _number(cell.value)) for cell in row.cells],
            links.change(row.target, row.pk),
        )
        for row in table.rows
    ]
    numeric = [all(row.cells[index][2] for row in rows) for index in range(len(table.columns))]
    return LinkedTable(
        table.id,
        table.caption,
        table.row_header,
        list(zip(table.columns, numeric, strict=True)),
        rows,
    )


# -- the admin --------------------------------------------------------------------------


@admin.register(Governance)
class DashboardAdmin(admin.ModelAdmin):
    """The dashboard, as the ``Governance`` proxy model's changelist.

    Only two URLs: the dashboard and its CSV. The proxy model's rows are
    mailboxes; its change, add, delete and history views do not exist
    here (the inventory is the mailbox admin's).
    """

    template = "admin/mailgov/governance/dashboard.html"

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(VIEW_PERMISSION)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.changelist_view), name="{}_{}_changelist".format(*info)),
            path("export.csv", wrap(self.export_view), name="{}_{}_export".format(*info)),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        if not self.has_view_permission(request):
            raise deny(request, "view the dashboard", Governance)
        dashboard = build()
        links = Links(self.admin_site, request)
        tables = {table.id: linked(table, links) for table in dashboard.tables()}
        context = {
            **self.admin_site.each_context(request),
            "title": _("Mail governance dashboard"),
            "subtitle": None,
            "opts": self.opts,
            "dashboard": dashboard,
            "tables": tables,
            "status_chart": status_chart(dashboard),
            "provider_chart": provider_chart(dashboard),
            "sends_chart": SendsChart.of(dashboard),
            "can_export": request.user.has_perm(EXPORT_PERMISSION),
            "incident_list": links.base("incident"),
            "can_declare": request.user.has_perm("mailgov.manage_incident"),
            "open_incidents_more": dashboard.open_incident_count - len(dashboard.open_incidents),
            "freeze_text": [
                (
                    incident,
                    _("Sending is frozen by incident #%(id)d (%(scope)s).")
                    % {"id": incident.pk, "scope": dashboard.scope_of(incident)},
                )
                for incident in dashboard.freezes
            ],
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.template, context)

    def export_view(self, request: HttpRequest) -> HttpResponse:
        """Every table of the dashboard, as one CSV (long format: table,
        row, column, value)."""
        if not self.has_view_permission(request):
            raise deny(request, "view the dashboard", Governance)
        require(request, EXPORT_PERMISSION, "export the dashboard", Governance)
        dashboard = build()
        rows = list(dashboard.csv_rows())
        log_access(request, "dashboard", Governance, len(rows))
        filename = f"mailgov-dashboard-{dashboard.now:%Y%m%d-%H%M}.csv"
        return csv_response(filename, csv_lines(["table", "key", "row", "column", "value"], rows))
