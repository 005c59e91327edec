"""Incidents in the admin: declare, follow, and run the playbook.

The list (filters by state, severity, scope, freeze); "Add incident" is the
declare form; an incident's page shows its status, its timeline and the
playbook's steps. Each step has a confirmation page (GET says what will
happen and to how many mailboxes and owners; a POST with its CSRF token does
it) and calls :mod:`mailgov.incidents` or :mod:`mailgov.governance`, which
write the timeline and the audit trail; the result's counts come back as a
message.

Permissions: looking needs ``mailgov.view_incident``; declaring and every
step ``mailgov.manage_incident``; exports (affected owners, timeline)
``mailgov.export_data``; the key rotation a superuser. A refused attempt is
answered 403, logged on ``mailgov.security`` and audited
(:func:`mailgov.admin.common.deny`), and changes nothing. A resolved
incident's steps are refused with a message; its exports still work.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Q
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils.functional import Promise
from django.utils.html import format_html
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from mailgov import incidents
from mailgov.admin.common import (
    EXPORT_PERMISSION,
    GovernanceAdmin,
    deny,
    require,
    require_superuser,
)
from mailgov.audit import log_access
from mailgov.capabilities import CAPABILITIES
from mailgov.conf import mailgov_settings
from mailgov.crypto import get_keyring
from mailgov.exceptions import IncidentStateError, KeyringError
from mailgov.exports import csv_response
from mailgov.governance import start_containment, start_notify, start_rotation
from mailgov.models import AdminJob, Incident, Mailbox, MailboxCredentials, OutboxMessage
from mailgov.notifications import mailboxes_link
from mailgov.rotation import key_usage, rotation_pending_count

MANAGE_PERMISSION = "mailgov.manage_incident"

Scope = Incident.Scope
State = OutboxMessage.State


# -- forms ------------------------------------------------------------------------------

#: Users or mailboxes are typed one per line, or separated by commas, semicolons or spaces.
_SEPARATORS = re.compile(r"[\s,;]+")
#: At most this many users or mailboxes typed in one scope.
MAX_TARGETS = 10_000


def _tokens(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for token in _SEPARATORS.split(text or ""):
        if token:
            seen.setdefault(token, None)
    return list(seen)


def _pk_or_none(field: Any, token: str) -> Any:
    """``token`` as a value of primary key ``field``, or ``None`` if it
    cannot be one (not a number, out of the column's range, not a UUID)."""
    try:
        value = field.to_python(token)
        field.run_validators(value)
    except (ValidationError, ValueError, TypeError):
        return None
    return value


def resolve_users(tokens: list[str]) -> tuple[list[str], list[str]]:
    """User ids for ``tokens`` (ids, usernames or email addresses, in three
    queries). Returns ``(ids, errors)``: a token that names nobody, or
    several users, is an error."""
    User = get_user_model()
    username_field = User.USERNAME_FIELD
    pks = {token: pk for token in tokens if (pk := _pk_or_none(User._meta.pk, token)) is not None}
    by_pk = {
        str(pk): pk
        for pk in User.objects.filter(pk__in=set(pks.values())).values_list("pk", flat=True)
    }
    by_name: dict[str, Any] = dict(
        User.objects.filter(**{f"{username_field}__in": tokens}).values_list(username_field, "pk")
    )
    by_email: dict[str, set[Any]] = {}
    emails = [token.lower() for token in tokens if "@" in token]
    if emails and "email" in {f.name for f in User._meta.get_fields()}:
        rows = User.objects.annotate(_email=Lower("email")).filter(_email__in=emails)
        for email, pk in rows.values_list("_email", "pk"):
            by_email.setdefault(email, set()).add(pk)
    ids: list[str] = []
    errors: list[str] = []
    for token in tokens:
        found = set(by_email.get(token.lower(), ()))
        if token in by_name:
            found.add(by_name[token])
        if token in pks and str(pks[token]) in by_pk:
            found.add(by_pk[str(pks[token])])
        if not found:
            errors.append(_("No user is %(token)s.") % {"token": token})
        elif len(found) > 1:
            errors.append(
                _("%(token)s names %(count)d users: give their ids or usernames instead.")
                % {"token": token, "count": len(found)}
            )
        else:
            ids.append(str(found.pop()))
    return list(dict.fromkeys(ids)), errors


def resolve_mailboxes(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Mailbox ids for ``tokens`` (mailbox ids or sending addresses: an
    address covers every mailbox with it, connected again or not), in two
    queries. Returns ``(ids, errors)``."""
    pks = {
        token: pk for token in tokens if (pk := _pk_or_none(Mailbox._meta.pk, token)) is not None
    }
    known = {
        str(pk)
        for pk in Mailbox.objects.filter(pk__in=set(pks.values())).values_list("pk", flat=True)
    }
    by_address: dict[str, list[str]] = {}
    addresses = [token.lower() for token in tokens if "@" in token]
    if addresses:
        rows = Mailbox.objects.annotate(_address=Lower("address")).filter(_address__in=addresses)
        for address, pk in rows.order_by("pk").values_list("_address", "pk"):
            by_address.setdefault(address, []).append(str(pk))
    ids: list[str] = []
    errors: list[str] = []
    for token in tokens:
        if token in pks and str(pks[token]) in known:
            ids.append(str(pks[token]))
        elif token.lower() in by_address:
            ids.extend(by_address[token.lower()])
        else:
            errors.append(_("No mailbox is %(token)s.") % {"token": token})
    return list(dict.fromkeys(ids)), errors


class DeclareForm(forms.Form):
    title = forms.CharField(label=gettext_lazy("Title"), max_length=200)
    severity = forms.ChoiceField(
        label=gettext_lazy("Severity"),
        choices=Incident.Severity.choices,
        initial=Incident.Severity.HIGH,
    )
    scope = forms.ChoiceField(
        label=gettext_lazy("Scope"),
        choices=Scope.choices,
        initial=Scope.ALL,
        widget=forms.RadioSelect,
    )
    provider = forms.ChoiceField(
        label=gettext_lazy("Provider (for a provider scope)"), required=False
    )
    capability = forms.ChoiceField(
        label=gettext_lazy("Capability (for a capability scope)"), required=False
    )
    targets = forms.CharField(
        label=gettext_lazy("Users or mailboxes (for a users or mailboxes scope)"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 5}),
        help_text=gettext_lazy(
            "One per line, or separated by commas or spaces. Users: ids, usernames or email "
            "addresses. Mailboxes: mailbox ids or sending addresses (an address covers every "
            "mailbox with it)."
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        in_use = Mailbox.objects.order_by().values_list("provider", flat=True).distinct()
        providers = sorted({*mailgov_settings.PROVIDERS, *in_use})
        self.fields["provider"].choices = [("", "---------")] + [(p, p) for p in providers]
        self.fields["capability"].choices = [("", "---------")] + [
            (capability_id, f"{capability.name} ({capability_id})")
            for capability_id, capability in CAPABILITIES.items()
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        scope = data.get("scope")
        data["scope_value"], data["scope_ids"] = "", []
        if scope == Scope.PROVIDER:
            if not data.get("provider"):
                self.add_error("provider", _("Choose the provider this incident is about."))
            data["scope_value"] = data.get("provider", "")
        elif scope == Scope.CAPABILITY:
            if not data.get("capability"):
                self.add_error("capability", _("Choose the capability this incident is about."))
            data["scope_value"] = data.get("capability", "")
        elif scope in (Scope.USERS, Scope.MAILBOXES):
            tokens = _tokens(data.get("targets", ""))
            if not tokens:
                self.add_error(
                    "targets",
                    _("Name at least one user.")
                    if scope == Scope.USERS
                    else _("Name at least one mailbox."),
                )
            elif len(tokens) > MAX_TARGETS:
                self.add_error(
                    "targets",
                    _(
                        "At most %(max)d at once; scope the incident to a provider or to every "
                        "mailbox instead."
                    )
                    % {"max": MAX_TARGETS},
                )
            else:
                resolve = resolve_users if scope == Scope.USERS else resolve_mailboxes
                ids, errors = resolve(tokens)
                if errors:
                    self.add_error("targets", errors)
                data["scope_ids"] = ids
        return data


class NoticeForm(forms.Form):
    subject = forms.CharField(label=gettext_lazy("Subject"), max_length=200)
    body = forms.CharField(
        label=gettext_lazy("Text"),
        widget=forms.Textarea(attrs={"rows": 16}),
        help_text=gettext_lazy(
            "A Django template, as plain text. Variables: {{ owner.name }}, "
            "{{ owner.username }}, {{ mailboxes }} (the owner's addresses in the scope, "
            "e.g. {{ mailboxes|join:', ' }}), {{ incident.title }}, "
            "{{ incident.declared_at }}, {{ link }} (the owner's mailboxes page)."
        ),
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if "subject" in data and "body" in data:
            try:
                incidents.validate_notice(data["subject"], data["body"])
            except IncidentStateError as exc:
                raise ValidationError(str(exc)) from None
        return data


class ResolveForm(forms.Form):
    summary = forms.CharField(
        label=gettext_lazy("Summary"),
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text=gettext_lazy("What happened, what was done, what follows. Kept on the timeline."),
    )


# -- the playbook's steps -------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A one-click playbook step: its confirmation page and what it runs."""

    name: str
    label: Promise
    confirm: Promise
    explain: Promise
    done: Promise
    #: Does it; returns the counts, and the job doing the rest if any.
    run: Callable[[Incident, HttpRequest, dict[str, Any]], tuple[dict[str, int], AdminJob | None]]
    form: type[forms.Form] | None = None
    danger: bool = False


STEPS: dict[str, Step] = {
    step.name: step
    for step in [
        Step(
            "freeze",
            gettext_lazy("Freeze sending"),
            gettext_lazy("Yes, freeze sending"),
            gettext_lazy(
                "Sending stops in the scope as soon as you confirm: every send that starts "
                "afterwards, in the web processes, the workers or a shell, is refused, and the "
                "queued messages of the scope are held (not lost, not sent). Lifting the freeze "
                "queues them again."
            ),
            gettext_lazy("Sending frozen"),
            lambda incident, request, data: (incidents.freeze(incident, actor=request.user), None),
        ),
        Step(
            "unfreeze",
            gettext_lazy("Lift the freeze"),
            gettext_lazy("Yes, lift the freeze"),
            gettext_lazy(
                "Sending resumes in the scope. The messages this freeze held are queued again, "
                "except those of mailboxes another freeze still covers, or contained since."
            ),
            gettext_lazy("Freeze lifted"),
            lambda incident, request, data: (
                incidents.unfreeze(incident, actor=request.user),
                None,
            ),
        ),
        Step(
            "contain",
            gettext_lazy("Contain"),
            gettext_lazy("Yes, contain: end these grants"),
            gettext_lazy(
                "Every token in the scope becomes unusable at once: the mailboxes are revoked, "
                "their access tokens wiped and their queued mail held; the revocation of each "
                "grant at its provider is queued (retried until confirmed). Owners have to "
                "connect their mailboxes again. This cannot be undone."
            ),
            gettext_lazy("Contained"),
            lambda incident, request, data: start_containment(incident, user=request.user),
            danger=True,
        ),
        Step(
            "resolve",
            gettext_lazy("Resolve"),
            gettext_lazy("Resolve the incident"),
            gettext_lazy(
                "The incident is closed with your summary. Its freeze, if on, is lifted and the "
                "mail it held is queued again. A resolved incident's steps are closed; its "
                "timeline and exports stay."
            ),
            gettext_lazy("Resolved"),
            lambda incident, request, data: (
                incidents.resolve(incident, summary=data["summary"], actor=request.user),
                None,
            ),
            form=ResolveForm,
        ),
    ]
}


def format_counts(counts: dict[str, Any]) -> str:
    """``{"tokens_wiped": 2, "held": 1}`` as "held: 1, tokens wiped: 2" (sorted:
    a JSON column on PostgreSQL does not keep the keys' order)."""
    return ", ".join(f"{key.replace('_', ' ')}: {counts[key]}" for key in sorted(counts))


def impact(incident: Incident) -> dict[str, Any]:
    """What a step would touch, counted now (a few queries, none per row)."""
    scope = incidents.scope_queryset(incident).order_by()
    by_status = dict.fromkeys(Mailbox.Status.values, 0)
    for status, n in scope.values_list("status").annotate(n=Count("pk")):
        by_status[status] = n
    in_scope = Q(mailbox__in=incidents.scope_queryset(incident).order_by().values("pk"))
    mail = OutboxMessage.objects.filter(in_scope, kind=OutboxMessage.Kind.MAIL)
    counts = mail.aggregate(
        queued=Count("pk", filter=Q(state=State.QUEUED)),
        held_frozen=Count("pk", filter=Q(state=State.HELD, error_code="frozen")),
    )
    return {
        "mailboxes": sum(by_status.values()),
        "by_status": [(Mailbox.Status(status).label, n) for status, n in by_status.items()],
        "not_revoked": sum(n for s, n in by_status.items() if s != Mailbox.Status.REVOKED),
        "owners": scope.values("owner_id").distinct().count(),
        "access_tokens": MailboxCredentials.objects.filter(
            in_scope, access_token__isnull=False
        ).count(),
        **counts,
    }


def _check_open(incident: Incident) -> None:
    if incident.state != Incident.State.OPEN:
        raise IncidentStateError(
            _("Incident #%(id)d is resolved: its playbook steps are closed (exports remain).")
            % {"id": incident.pk}
        )


class FrozenFilter(admin.SimpleListFilter):
    title = gettext_lazy("sending frozen")
    parameter_name = "frozen"

    def lookups(self, request, model_admin):
        return [("yes", _("Frozen")), ("no", _("Not frozen"))]

    def queryset(self, request, queryset):
        frozen = Q(frozen_at__isnull=False, unfrozen_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(frozen)
        if self.value() == "no":
            return queryset.exclude(frozen)
        return queryset


# -- the admin --------------------------------------------------------------------------


@admin.register(Incident)
class IncidentAdmin(GovernanceAdmin):
    list_display = (
        "title",
        "severity",
        "scope_text",
        "state",
        "frozen_flag",
        "declared_at",
        "resolved_at",
    )
    list_filter = ("state", "severity", "scope", FrozenFilter)
    search_fields = ("title", "summary")
    actions = ["export_csv"]
    change_list_template = "admin/mailgov/incident/change_list.html"
    csv_columns = [
        ("id", "pk"),
        ("title", "title"),
        ("severity", "severity"),
        ("scope", incidents.describe_scope),
        ("state", "state"),
        ("frozen", lambda incident: incident.frozen),
        ("declared_at", "declared_at"),
        ("contained_at", "contained_at"),
        ("notified_at", "notified_at"),
        ("resolved_at", "resolved_at"),
        ("summary", "summary"),
    ]

    @admin.display(description=gettext_lazy("scope"))
    def scope_text(self, incident: Incident) -> str:
        return incidents.describe_scope(incident)

    @admin.display(description=gettext_lazy("frozen"), boolean=True)
    def frozen_flag(self, incident: Incident) -> bool:
        return incident.frozen

    # -- permissions -------------------------------------------------------------
    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(MANAGE_PERMISSION)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # An incident changes through its steps only, never through a form.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The record of an incident is kept.
        return False

    def delete_view(self, request: HttpRequest, object_id: str, extra_context=None):
        raise deny(request, "delete an incident", Incident)

    def _incident(self, request: HttpRequest, object_id: Any) -> Incident:
        if not self.has_view_permission(request):
            raise deny(request, "view an incident", Incident)
        incident = self.get_object(request, str(object_id))
        if incident is None:
            raise Http404(_("No incident #%(id)s.") % {"id": object_id})
        return incident

    def _manage(self, request: HttpRequest, incident: Incident, what: str) -> None:
        require(request, MANAGE_PERMISSION, f"{what} (incident #{incident.pk})", incident)

    def _back(self, incident: Incident) -> HttpResponseRedirect:
        return HttpResponseRedirect(
            reverse(f"{self.admin_site.name}:mailgov_incident_change", args=[incident.pk])
        )

    def _context(self, request: HttpRequest, incident: Incident | None, **extra: Any) -> dict:
        request.current_app = self.admin_site.name
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "incident": incident,
            **extra,
        }

    # -- URLs --------------------------------------------------------------------
    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path(
                "<int:object_id>/step/<slug:step>/",
                wrap(self.step_view),
                name="mailgov_incident_step",
            ),
            path("<int:object_id>/notify/", wrap(self.notify_view), name="mailgov_incident_notify"),
            path("<int:object_id>/rotate/", wrap(self.rotate_view), name="mailgov_incident_rotate"),
            path(
                "<int:object_id>/rotate/retire/",
                wrap(self.retire_view),
                name="mailgov_incident_retire",
            ),
            path(
                "<int:object_id>/rotate/<uuid:job_id>/",
                wrap(self.rotation_progress_view),
                name="mailgov_incident_rotation",
            ),
            path(
                "<int:object_id>/owners.csv", wrap(self.owners_view), name="mailgov_incident_owners"
            ),
            path(
                "<int:object_id>/timeline.json",
                wrap(self.timeline_json_view),
                name="mailgov_incident_timeline_json",
            ),
            path(
                "<int:object_id>/timeline.csv",
                wrap(self.timeline_csv_view),
                name="mailgov_incident_timeline_csv",
            ),
            *super().get_urls(),
        ]

    # -- declare -------------------------------------------------------------------
    def add_view(self, request: HttpRequest, form_url: str = "", extra_context=None):
        if not self.has_add_permission(request):
            raise deny(request, "declare an incident", Incident)
        form = DeclareForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                incident = incidents.declare(
                    title=data["title"],
                    severity=data["severity"],
                    scope=data["scope"],
                    scope_value=data["scope_value"],
                    scope_ids=data["scope_ids"],
                    actor=request.user,
                )
            except IncidentStateError as exc:
                form.add_error(None, str(exc))
            else:
                [event] = incident.timeline.all()[:1]
                messages.success(
                    request,
                    _("Incident #%(id)d declared: %(count)d mailboxes in its scope.")
                    % {"id": incident.pk, "count": event.counts.get("mailboxes", 0)},
                )
                return self._back(incident)
        context = self._context(
            request,
            None,
            title=_("Declare an incident"),
            form=form,
            errors=form.errors,
        )
        return TemplateResponse(request, "admin/mailgov/incident/declare.html", context)

    # -- the incident's page -----------------------------------------------------------
    def change_view(self, request: HttpRequest, object_id: str, form_url="", extra_context=None):
        incident = self._incident(request, object_id)
        user = request.user
        is_open = incident.state == Incident.State.OPEN
        can_manage = user.has_perm(MANAGE_PERMISSION)
        status = incidents.incident_status(incident)
        context = self._context(
            request,
            incident,
            title=str(incident),
            status=status,
            status_rows=[
                (Mailbox.Status(name).label, n) for name, n in status["by_status"].items()
            ],
            scope=incidents.describe_scope(incident),
            events=[
                (event, format_counts(event.counts))
                for event in incident.timeline.order_by("at", "id")
            ],
            is_open=is_open,
            can_manage=can_manage and is_open,
            can_rotate=user.is_superuser and is_open,
            can_export=user.has_perm(EXPORT_PERMISSION),
        )
        return TemplateResponse(request, "admin/mailgov/incident/detail.html", context)

    # -- freeze, unfreeze, contain, resolve ------------------------------------------
    def step_view(self, request: HttpRequest, object_id: int, step: str):
        if step not in STEPS:
            raise Http404(_("No such playbook step."))
        playbook = STEPS[step]
        incident = self._incident(request, object_id)
        self._manage(request, incident, step)
        try:
            _check_open(incident)
        except IncidentStateError as exc:
            messages.error(request, str(exc))
            return self._back(incident)
        form = None
        if playbook.form is not None:
            form = playbook.form(request.POST if request.method == "POST" else None)
        if request.method == "POST" and (form is None or form.is_valid()):
            try:
                counts, job = playbook.run(incident, request, form.cleaned_data if form else {})
            except IncidentStateError as exc:
                messages.error(request, str(exc))
                return self._back(incident)
            if counts.get("already"):
                messages.warning(request, _("%(step)s: nothing to do.") % {"step": playbook.label})
                counts = {}
            else:
                counts = dict(counts)
            self._report(request, playbook.done, counts, job)
            return self._back(incident)
        context = self._context(
            request,
            incident,
            title=_("%(step)s: incident #%(id)d") % {"step": playbook.label, "id": incident.pk},
            step=playbook,
            form=form,
            impact=impact(incident),
            scope=incidents.describe_scope(incident),
        )
        return TemplateResponse(request, "admin/mailgov/incident/confirm.html", context)

    def _report(
        self, request: HttpRequest, done: Any, counts: dict[str, Any], job: AdminJob | None
    ) -> None:
        """The step's counts as a message; and the job's, or where it runs."""
        finished = job is not None and job.state == AdminJob.State.DONE
        if finished:
            counts.update(job.counts)
        if counts or finished:
            messages.success(
                request,
                _("%(done)s: %(counts)s.")
                % {"done": done, "counts": format_counts(counts) or _("nothing to do")},
            )
        if job is None or job.state == AdminJob.State.DONE:
            return
        if job.state == AdminJob.State.FAILED:
            messages.error(
                request,
                _("%(done)s: the job failed (%(error)s).") % {"done": done, "error": job.error},
            )
        else:
            text = _("%(done)s: %(total)d rows are handled by a worker.") % {
                "done": done,
                "total": job.total,
            }
            url = self._job_url(request, job)
            messages.info(
                request,
                format_html('{} <a href="{}">{}</a>', text, url, _("Follow the job."))
                if url
                else text,
            )

    def _job_url(self, request: HttpRequest, job: AdminJob) -> str | None:
        """The job's page in the jobs admin, if it is there for this user."""
        model_admin = self.admin_site._registry.get(AdminJob)
        if model_admin is None or not model_admin.has_view_or_change_permission(request):
            return None
        try:
            return reverse(f"{self.admin_site.name}:mailgov_adminjob_change", args=[job.pk])
        except NoReverseMatch:
            return None

    # -- notify -------------------------------------------------------------------------
    def notify_view(self, request: HttpRequest, object_id: int):
        incident = self._incident(request, object_id)
        self._manage(request, incident, "notify the owners")
        try:
            _check_open(incident)
        except IncidentStateError as exc:
            messages.error(request, str(exc))
            return self._back(incident)
        posted = request.method == "POST"
        initial = {"subject": incident.notice_subject, "body": incident.notice_body}
        form = NoticeForm(request.POST if posted else None, initial=initial)
        # The preview: of the posted template once valid, else of the stored one.
        draft = copy.copy(incident)
        valid = form.is_valid() if posted else True
        if posted and valid:
            draft.notice_subject = form.cleaned_data["subject"]
            draft.notice_body = form.cleaned_data["body"]
        preview, preview_error = None, ""
        if valid:
            try:
                preview = self._preview(draft)
            except Exception as exc:  # a filter failing at render time, say
                preview_error = _("The notice cannot be rendered: %(error)s") % {
                    "error": f"{type(exc).__name__}: {exc}"
                }
                valid = False
        if posted and valid and "_send" in request.POST:
            return self._notify(request, incident, draft)
        context = self._context(
            request,
            incident,
            title=_("Notify the owners: incident #%(id)d") % {"id": incident.pk},
            form=form,
            preview=preview,
            preview_error=preview_error,
            impact=impact(incident),
            scope=incidents.describe_scope(incident),
        )
        return TemplateResponse(request, "admin/mailgov/incident/notify.html", context)

    def _preview(self, draft: Incident) -> dict[str, Any] | None:
        """The notice as the first affected owner would get it (two queries)."""
        scope = incidents.scope_queryset(draft)
        first = scope.order_by("owner_id").values_list("owner_id", flat=True).first()
        if first is None:
            return None
        owner = get_user_model().objects.get(pk=first)
        addresses = list(
            scope.filter(owner_id=first).order_by("address").values_list("address", flat=True)
        )
        subject, body = incidents.render_notice(draft, owner, addresses, mailboxes_link())
        return {"owner": owner.get_username(), "to": owner.email, "subject": subject, "body": body}

    def _notify(self, request: HttpRequest, incident: Incident, draft: Incident):
        with transaction.atomic():
            locked = Incident.objects.select_for_update().get(pk=incident.pk)
            try:
                _check_open(locked)
            except IncidentStateError as exc:
                messages.error(request, str(exc))
                return self._back(incident)
            locked.notice_subject = draft.notice_subject
            locked.notice_body = draft.notice_body
            # save(), not update(): the edited template is in the audit trail.
            locked.save(update_fields=["notice_subject", "notice_body"])
        try:
            job = start_notify(locked, user=request.user)
        except IncidentStateError as exc:
            messages.error(request, str(exc))
            return self._back(incident)
        self._report(request, _("Owners notified"), {}, job)
        return self._back(incident)

    # -- rotate (guided; superusers) -----------------------------------------------------
    def _superuser(self, request: HttpRequest, incident: Incident, what: str) -> None:
        require_superuser(request, f"{what} (incident #{incident.pk})", incident)

    def _keys(self) -> dict[str, Any]:
        """The keyring as loaded in this process (key ids only, never a key)
        and how many stored values each key id holds."""
        try:
            keyring = get_keyring()
        except KeyringError as exc:
            return {"keyring_error": str(exc), "keys": [], "usage": {}, "pending": None}
        usage = key_usage()
        keys = [
            {"id": key_id, "primary": key_id == keyring.primary_id, "values": usage.get(key_id, 0)}
            for key_id in keyring.key_ids
        ]
        unknown = {key_id: n for key_id, n in usage.items() if key_id not in keyring.key_ids}
        old = [key for key in keys if not key["primary"]]
        return {
            "keyring_error": "",
            "primary": keyring.primary_id,
            "keys": keys,
            "unknown": unknown,
            "old_keys": old,
            "old_in_use": [key for key in old if key["values"]],
            "pending": rotation_pending_count(),
        }

    def rotate_view(self, request: HttpRequest, object_id: int):
        incident = self._incident(request, object_id)
        self._superuser(request, incident, "rotate the encryption key")
        try:
            _check_open(incident)
        except IncidentStateError as exc:
            messages.error(request, str(exc))
            return self._back(incident)
        keys = self._keys()
        if request.method == "POST":
            if keys["keyring_error"]:
                messages.error(request, keys["keyring_error"])
                return HttpResponseRedirect(request.path)
            with transaction.atomic():
                job = start_rotation(user=request.user, incident=incident)
                incidents.record(
                    incident,
                    "note",
                    actor=request.user,
                    counts={"rows": job.total},
                    note=f"Key rotation started under key {keys['primary']} (job {job.pk}).",
                )
            messages.success(
                request,
                _("Key rotation started: %(rows)d rows to re-encrypt.") % {"rows": job.total},
            )
            return HttpResponseRedirect(
                reverse(
                    f"{self.admin_site.name}:mailgov_incident_rotation",
                    args=[incident.pk, job.pk],
                )
            )
        context = self._context(
            request,
            incident,
            title=_("Rotate the encryption key: incident #%(id)d") % {"id": incident.pk},
            jobs=self._rotation_jobs(incident),
            **keys,
        )
        return TemplateResponse(request, "admin/mailgov/incident/rotate.html", context)

    def _rotation_jobs(self, incident: Incident) -> list[AdminJob]:
        # target_ids is a JSON list: matched in Python (a few jobs at most).
        jobs = AdminJob.objects.filter(action="rotate_keys").order_by("-created_at")[:50]
        return [job for job in jobs if str(incident.pk) in job.target_ids][:5]

    def rotation_progress_view(self, request: HttpRequest, object_id: int, job_id: Any):
        incident = self._incident(request, object_id)
        self._superuser(request, incident, "follow a key rotation")
        job = AdminJob.objects.filter(pk=job_id, action="rotate_keys").first()
        if job is None or str(incident.pk) not in job.target_ids:
            raise Http404(_("No such key rotation."))
        running = job.state in (AdminJob.State.PENDING, AdminJob.State.RUNNING)
        context = self._context(
            request,
            incident,
            title=_("Key rotation: incident #%(id)d") % {"id": incident.pk},
            job=job,
            running=running,
            counts=format_counts(job.counts),
        )
        return TemplateResponse(request, "admin/mailgov/incident/rotation_progress.html", context)

    def retire_view(self, request: HttpRequest, object_id: int):
        incident = self._incident(request, object_id)
        self._superuser(request, incident, "retire an encryption key")
        keys = self._keys()
        if request.method == "POST":
            try:
                _check_open(incident)
            except IncidentStateError as exc:
                messages.error(request, str(exc))
                return self._back(incident)
            if keys["keyring_error"]:
                messages.error(request, keys["keyring_error"])
                return HttpResponseRedirect(request.path)
            loaded = ", ".join(
                f"{key['id']}{' (primary)' if key['primary'] else ''}: {key['values']} values"
                for key in keys["keys"]
            )
            incidents.record(
                incident,
                "note",
                actor=request.user,
                counts={"pending_rows": keys["pending"]},
                note=f"Keyring checked: {loaded}.",
            )
            messages.success(request, _("The keyring's state is on the timeline."))
            return self._back(incident)
        context = self._context(
            request,
            incident,
            title=_("Retire the old key: incident #%(id)d") % {"id": incident.pk},
            is_open=incident.state == Incident.State.OPEN,
            **keys,
        )
        return TemplateResponse(request, "admin/mailgov/incident/retire.html", context)

    # -- exports -----------------------------------------------------------------------
    def _require_export(self, request: HttpRequest, incident: Incident, what: str) -> None:
        require(request, EXPORT_PERMISSION, f"export {what} (incident #{incident.pk})", incident)

    def owners_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """The affected owners as CSV; the export is on the timeline."""
        incident = self._incident(request, object_id)
        self._require_export(request, incident, "the affected owners")
        owners = incidents.scope_queryset(incident).order_by().values("owner_id").distinct().count()
        incidents.record(incident, "export", actor=request.user, counts={"owners": owners})
        log_access(request, f"affected owners of incident #{incident.pk}", Incident, owners)
        return csv_response(f"incident-{incident.pk}-owners.csv", incidents.owners_csv(incident))

    def timeline_json_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        incident = self._incident(request, object_id)
        self._require_export(request, incident, "the timeline")
        text = incidents.timeline_json(incident)
        log_access(
            request, f"timeline of incident #{incident.pk}", Incident, incident.timeline.count()
        )
        response = HttpResponse(text, content_type="application/json; charset=utf-8")
        response["Content-Disposition"] = (
            f'attachment; filename="incident-{incident.pk}-timeline.json"'
        )
        response["Cache-Control"] = "no-store"
        return response

    def timeline_csv_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        incident = self._incident(request, object_id)
        self._require_export(request, incident, "the timeline")
        text = incidents.timeline_csv(incident)
        log_access(
            request, f"timeline of incident #{incident.pk}", Incident, incident.timeline.count()
        )
        return csv_response(f"incident-{incident.pk}-timeline.csv", [text])
