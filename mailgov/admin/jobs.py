"""Governance jobs in the admin: the actions that start them, and their pages.

Every action the portal offers on a selection (mailboxes: revoke, suspend,
resume, require re-consent, release or cancel held mail; outbox messages:
retry, cancel, release) is one of :data:`mailgov.governance.ACTIONS`.
:func:`governance_action` makes it a Django admin action that

1. answers the first POST with a confirmation page (how many rows, the
   first few of them), in the pattern of Django's "delete selected";
2. on the confirming POST (``confirm=yes``, CSRF-protected like every admin
   form) calls :func:`mailgov.governance.start` with the selected ids, the
   user and the request's correlation id;
3. reports the outcome counts of a job that ran in the request, or links to
   the progress page of one queued for a worker (more than
   ``MAILGOV_ADMIN_INLINE_ROWS`` rows).

Each action needs the permission :data:`~mailgov.governance.ACTIONS` names
(``mailgov.govern_mailbox`` or ``mailgov.manage_outbox``): Django hides it
from a user without, and :class:`~mailgov.admin.common.GovernanceAdmin`
answers a forged POST of it with 403, logged and audited.

:class:`ReadOnlyAdmin` is the base of the portal's read-only lists (jobs,
the audit trail, receipts, the outbox...): nothing is added, edited or
deleted through them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from mailgov.admin.common import GovernanceAdmin, deny
from mailgov.conf import mailgov_settings
from mailgov.governance import ACTIONS, start
from mailgov.models import AdminJob, ErasureRecord

__all__ = [
    "AdminJobAdmin",
    "ErasureRecordAdmin",
    "GovernanceActions",
    "ReadOnlyAdmin",
    "describe_counts",
    "governance_action",
]

#: Rows named on a confirmation page (the count says how many in all).
SAMPLE_ROWS = 20

#: Plain words for the result keys of :mod:`mailgov.governance` (others are
#: shown as they are, underscores as spaces).
RESULT_LABELS: dict[str, Any] = {
    "revoked": _("revoked"),
    "already_revoked": _("already revoked"),
    "suspended": _("suspended"),
    "resumed": _("resumed"),
    "reconsent_required": _("sent back for re-consent"),
    "released": _("released"),
    "cancelled": _("cancelled"),
    "retried": _("queued again"),
    "nothing_held": _("nothing held"),
    "unchanged": _("unchanged"),
    "missing": _("no longer there"),
    "refused_changed": _("refused (changed meanwhile)"),
}


def describe_result(key: str) -> str:
    if key in RESULT_LABELS:
        return str(RESULT_LABELS[key])
    if key.startswith("refused_"):
        return str(_("refused (%(state)s)") % {"state": key.removeprefix("refused_")})
    return key.replace("_", " ")


def describe_counts(counts: dict[str, Any] | None) -> str:
    """``{"revoked": 3, "already_revoked": 1}`` as "3 revoked, 1 already revoked"."""
    if not counts:
        return "—"
    return ", ".join(f"{value} {describe_result(key)}" for key, value in sorted(counts.items()))


# -- read-only lists ------------------------------------------------------------------------


class ReadOnlyAdmin(GovernanceAdmin):
    """A list and detail pages, nothing else: no add, no edit, no delete.

    ``has_delete_permission`` stays as Django computes it: deleting a user in
    the admin checks the delete permission of every registered model the
    deletion cascades to (consent receipts, mailboxes, their refresh
    history), and refusing it here would make such users undeletable. No
    page here deletes: the "delete selected" action is gone, the Delete link
    hidden, and the delete page answers 403 (audited).
    """

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def change_view(self, request: HttpRequest, object_id: str, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "show_delete": False}
        return super().change_view(request, object_id, form_url, extra_context)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context=None):
        raise deny(request, "delete a row", self.model)


# -- governance actions ---------------------------------------------------------------------


def governance_action(name: str) -> Callable[..., HttpResponse | None]:
    """The admin action for :data:`mailgov.governance.ACTIONS` ``[name]``,
    for a :class:`GovernanceActions` model admin."""
    action = ACTIONS[name]
    _app_label, codename = action.permission.split(".", 1)

    def run(modeladmin: GovernanceActions, request: HttpRequest, queryset: Any):
        return modeladmin.run_governance_action(request, queryset, name)

    run.__name__ = name
    run.__qualname__ = name
    # Django calls has_<codename>_permission(request) to show it at all.
    return admin.action(description=action.label, permissions=[codename])(run)


class GovernanceActions:
    """Mixin for a :class:`GovernanceAdmin` whose ``actions`` list
    :func:`governance_action` entries."""

    action_confirmation_template: str | list[str] = ""

    # The permissions of mailgov.governance.ACTIONS, as Django's action
    # permission hooks (``allowed_permissions = ("govern_mailbox",)``).
    def has_govern_mailbox_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("mailgov.govern_mailbox")

    def has_manage_outbox_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("mailgov.manage_outbox")

    def run_governance_action(
        self, request: HttpRequest, queryset: Any, name: str
    ) -> HttpResponse | None:
        if request.POST.get("confirm") != "yes":
            return self.action_confirmation(request, queryset, name)
        ids = list(queryset.order_by().values_list("pk", flat=True))
        job = start(name, ids, user=request.user, cid=getattr(request, "correlation_id", ""))
        self.report_job(request, job)
        return None  # back to the list, as it was filtered

    def action_confirmation(self, request: HttpRequest, queryset: Any, name: str) -> HttpResponse:
        opts = self.model._meta
        count = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": _("Are you sure?"),
            "subtitle": None,
            "opts": opts,
            "action_name": name,
            "action_label": ACTIONS[name].label,
            "count": count,
            "objects_name": opts.verbose_name if count == 1 else opts.verbose_name_plural,
            "sample": list(queryset[:SAMPLE_ROWS]),
            "more": max(0, count - SAMPLE_ROWS),
            # What was posted, posted again: the page's selected rows, and
            # "every row of the filtered list" (select_across) if it was asked.
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "queued": count > self.inline_rows(),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request,
            self.action_confirmation_template
            or [
                f"admin/{opts.app_label}/{opts.model_name}/action_confirmation.html",
                "admin/mailgov/mailbox/action_confirmation.html",
            ],
            context,
        )

    @staticmethod
    def inline_rows() -> int:
        return int(mailgov_settings.ADMIN_INLINE_ROWS)

    def report_job(self, request: HttpRequest, job: AdminJob) -> None:
        """The job's outcome (or where to follow it) as a message."""
        label = ACTIONS[job.action].label if job.action in ACTIONS else job.action
        url = reverse("admin:mailgov_adminjob_change", args=[job.pk])
        if job.state in (AdminJob.State.PENDING, AdminJob.State.RUNNING):
            self.message_user(
                request,
                format_html(
                    '{}: {} queued for a worker. <a href="{}">Follow its progress</a>.',
                    label,
                    ngettext("%(count)d row", "%(count)d rows", job.total) % {"count": job.total},
                    url,
                ),
                messages.INFO,
            )
            return
        if job.state == AdminJob.State.FAILED:
            self.message_user(
                request,
                format_html(
                    '{}: failed ({}). <a href="{}">See the job</a>.', label, job.error, url
                ),
                messages.ERROR,
            )
            return
        self.message_user(
            request,
            format_html(
                '{}: {}. <a href="{}">See the job</a>.', label, describe_counts(job.counts), url
            ),
            messages.SUCCESS,
        )
        refused = {k: v for k, v in job.counts.items() if k.startswith("refused_")}
        if refused:
            self.message_user(
                request,
                _("Refused, nothing done for them: %(counts)s.")
                % {"counts": describe_counts(refused)},
                messages.WARNING,
            )


# -- the jobs' own pages --------------------------------------------------------------------


@admin.register(AdminJob)
class AdminJobAdmin(ReadOnlyAdmin):
    """Governance jobs: who asked what, how far it got, the outcome. The
    detail page refreshes itself while the job waits or runs."""

    list_display = (
        "created_at",
        "action_label",
        "requested_by",
        "state",
        "progress",
        "outcome",
        "finished_at",
    )
    list_filter = ("state", "action", "created_at")
    list_select_related = ("requested_by",)
    search_fields = ("=cid", "requested_by__username")
    date_hierarchy = "created_at"
    change_form_template = "admin/mailgov/adminjob/change_form.html"
    # The selection itself (target_ids) can be 100,000 ids: counted, not shown.
    fields = (
        "action_label",
        "state",
        "progress",
        "total",
        "done",
        "outcome_table",
        "requested_by",
        "cid",
        "created_at",
        "started_at",
        "finished_at",
        "error",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest):
        # The selection can be 100,000 ids: never loaded to list or show a job.
        return super().get_queryset(request).defer("target_ids")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The record of who did what; nothing cascades into it (SET_NULL).
        return False

    @admin.display(description=_("action"), ordering="action")
    def action_label(self, obj: AdminJob) -> str:
        if obj.action in ACTIONS:
            return str(ACTIONS[obj.action].label)
        return {"rotate_keys": _("Rotate the encryption key"), "notify": _("Notify owners")}.get(
            obj.action, obj.action
        )

    @admin.display(description=_("progress"))
    def progress(self, obj: AdminJob) -> str:
        return format_html(
            '<progress max="{}" value="{}" aria-label="{}">{}%</progress> {}%',
            obj.total or 1,
            obj.done if obj.total else (1 if obj.state == AdminJob.State.DONE else 0),
            _("progress"),
            obj.percent,
            obj.percent,
        )

    @admin.display(description=_("outcome"))
    def outcome(self, obj: AdminJob) -> str:
        return describe_counts(obj.counts)

    @admin.display(description=_("outcome"))
    def outcome_table(self, obj: AdminJob) -> str:
        if not obj.counts:
            return "—"
        rows = format_html_join(
            "",
            '<tr><th scope="row">{}</th><td>{}</td></tr>',
            ((describe_result(key), value) for key, value in sorted(obj.counts.items())),
        )
        return format_html(
            '<table><thead><tr><th scope="col">{}</th><th scope="col">{}</th></tr></thead>'
            "<tbody>{}</tbody></table>",
            _("result"),
            _("rows"),
            rows,
        )


@admin.register(ErasureRecord)
class ErasureRecordAdmin(ReadOnlyAdmin):
    """Erasures: who asked, when, the pseudonym and the counts; never the
    erased data (there is none left to show)."""

    list_display = ("created_at", "pseudonym", "actor_label", "status", "account_deleted")
    list_filter = ("status", "account_deleted")
    search_fields = ("pseudonym",)
    readonly_fields = [f.name for f in ErasureRecord._meta.fields]
