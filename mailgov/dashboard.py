"""The governance dashboard's figures: the estate of grants at a glance.

:func:`build` computes everything in a constant number of queries, whatever
the number of mailboxes, send logs or outbox rows: aggregates and
``GROUP BY``\\s, never a query per row. Credentials are read through
aggregates on ``expires_at`` and ``IS NULL`` tests only, so no token's
ciphertext is ever loaded.

:meth:`Dashboard.tables` gives the figures as tables (a caption, row labels,
column headers and cells), each cell naming the changelist filter that
lists what it counts (``Cell.target`` and ``Cell.params``: plain field
lookups a changelist accepts). :mod:`mailgov.admin.dashboard` renders them
as HTML with links and SVG charts, and as CSV (:meth:`Dashboard.csv_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Count, F, Q, Value
from django.db.models.functions import Greatest, TruncDate
from django.utils import timezone
from django.utils.translation import gettext as _

from mailgov.capabilities import CAPABILITIES
from mailgov.conf import mailgov_settings
from mailgov.freeze import FROZEN
from mailgov.incidents import describe_scope, scope_q
from mailgov.lifecycle import activity
from mailgov.models import (
    Incident,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from mailgov.providers import get_provider
from mailgov.revocation import PENDING

__all__ = ["Cell", "Dashboard", "DayCount", "Row", "Table", "build"]

#: Days of sending shown (today included).
SEND_DAYS = 30
#: Days of refresh history counted.
REFRESH_EVENT_DAYS = 7
#: Access tokens expiring within this many hours.
TOKEN_EXPIRY_HOURS = 24
#: Dormant grants listed by their revocation date.
UPCOMING_REVOCATIONS = 10
#: Open incidents listed.
OPEN_INCIDENTS = 20

Status = Mailbox.Status
State = OutboxMessage.State
Outcome = RefreshEvent.Outcome


@dataclass(frozen=True)
class DayCount:
    """One day of sending (the site's time zone)."""

    day: date
    sent: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.sent + self.failed

    @property
    def failure_rate(self) -> float | None:
        """Failed over attempted, ``None`` on a day without a send."""
        return self.failed / self.total if self.total else None


@dataclass(frozen=True)
class UpcomingRevocation:
    """A dormant grant whose owner was warned: revoked on ``due``."""

    mailbox_id: Any
    address: str
    provider: str
    owner: str
    last_activity: datetime
    warned_at: datetime
    due: datetime


@dataclass(frozen=True)
class Cell:
    """A number, and the changelist filter that lists what it counts.

    ``target`` is a model name (``"mailbox"``, ``"outboxmessage"``, ...) and
    ``params`` the query string's lookups (plain field lookups, which any
    changelist of that model accepts); no target: no list to link to.
    """

    value: Any
    target: str = ""
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Row:
    """A row: its key (for CSV), its label, its cells; ``target`` and
    ``pk`` name the row's object (a mailbox's page), if it is one."""

    key: str
    label: str
    cells: tuple[Cell, ...]
    target: str = ""
    pk: str = ""


@dataclass(frozen=True)
class Table:
    id: str
    caption: str
    row_header: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


@dataclass
class Dashboard:
    """The figures, as of ``now``. Every dict is ordered for display."""

    now: datetime
    #: Mailboxes by status (every status, zeros included).
    by_status: dict[str, int]
    #: Mailboxes by provider, then by status.
    by_provider: dict[str, dict[str, int]]
    #: Provider names as configured (the id for one no longer configured).
    provider_names: dict[str, str]
    #: Per capability: ``{"name", "mailboxes", "active"}``.
    by_capability: dict[str, dict[str, Any]]
    #: ``to_warn``: dormant, owner not warned yet; ``warned``: to be revoked;
    #: ``due``: to be revoked at the next sweep.
    dormant: dict[str, int]
    upcoming_revocations: list[UpcomingRevocation]
    #: Active mailboxes' access tokens: ``expiring`` (within
    #: TOKEN_EXPIRY_HOURS), ``expired`` (renewed at the next send or refresh).
    tokens: dict[str, int]
    #: Active mailboxes: ``failing`` (on REFRESH_FAILING_DAYS days or more),
    #: ``retrying`` (the last refresh failed).
    refresh: dict[str, int]
    #: Token refreshes of the last REFRESH_EVENT_DAYS days, by outcome.
    refresh_events: dict[str, int]
    sends: list[DayCount]
    #: Outbox rows by state (every state), and held and failed ones by reason.
    outbox: dict[str, int]
    held_reasons: dict[str, int]
    failed_reasons: dict[str, int]
    #: Provider-side revocations still to do: ``pending``/``given_up`` of
    #: mailboxes, ``deleted_pending``/``deleted_given_up`` of deleted ones.
    revocations: dict[str, int]
    open_incidents: list[Incident]
    open_incident_count: int
    freezes: list[Incident]
    #: The day the sends start (local date), for links.
    sends_since: date = field(init=False)

    def __post_init__(self) -> None:
        self.sends_since = self.sends[0].day if self.sends else timezone.localdate(self.now)

    # -- summaries ----------------------------------------------------------------
    @property
    def mailboxes(self) -> int:
        return sum(self.by_status.values())

    @property
    def sent(self) -> int:
        return sum(day.sent for day in self.sends)

    @property
    def failed(self) -> int:
        return sum(day.failed for day in self.sends)

    @property
    def failure_rate(self) -> float | None:
        total = self.sent + self.failed
        return self.failed / total if total else None

    def scope_of(self, incident: Incident) -> str:
        return describe_scope(incident)

    # -- tables ---------------------------------------------------------------------
    def tables(self) -> list[Table]:
        """Every figure, as tables (the HTML page's and the CSV's)."""
        return [
            self._status_table(),
            self._provider_table(),
            self._capability_table(),
            self._attention_table(),
            self._refresh_events_table(),
            self._upcoming_table(),
            self._sends_table(),
            self._outbox_table(),
            self._held_table(),
        ]

    def csv_rows(self) -> Iterator[list[Any]]:
        """``[table, row key, row label, column, value]`` for every cell
        (times in ISO 8601)."""
        for table in self.tables():
            for row in table.rows:
                for column, cell in zip(table.columns, row.cells, strict=True):
                    value = cell.value
                    if isinstance(value, datetime):
                        value = value.isoformat()
                    yield [table.caption, row.key, row.label, column, value]

    def _status_table(self) -> Table:
        rows = tuple(
            Row(status, str(Status(status).label), (_mailboxes(n, status=status),))
            for status, n in self.by_status.items()
        )
        total = Row("total", _("Total"), (_mailboxes(self.mailboxes),))
        return Table(
            "status", _("Mailboxes by status"), _("Status"), (_("Mailboxes"),), (*rows, total)
        )

    def _provider_table(self) -> Table:
        columns = (*(str(label) for label in Status.labels), _("Total"))
        rows = []
        for provider, counts in self.by_provider.items():
            cells = [
                _mailboxes(counts.get(status, 0), provider=provider, status=status)
                for status in Status.values
            ]
            cells.append(_mailboxes(sum(counts.values()), provider=provider))
            rows.append(Row(provider, self.provider_names[provider], tuple(cells)))
        return Table("provider", _("Mailboxes by provider"), _("Provider"), columns, tuple(rows))

    def _capability_table(self) -> Table:
        rows = tuple(
            Row(
                capability_id,
                counts["name"],
                (
                    _mailboxes(counts["mailboxes"], capability=capability_id),
                    _mailboxes(counts["active"], capability=capability_id, status=Status.ACTIVE),
                ),
            )
            for capability_id, counts in self.by_capability.items()
        )
        return Table(
            "capability",
            _("Mailboxes by capability granted"),
            _("Capability"),
            (_("Mailboxes"), _("Active")),
            rows,
        )

    def _attention_table(self) -> Table:
        failing_days = str(mailgov_settings.REFRESH_FAILING_DAYS)
        warn_after = mailgov_settings.DORMANT_DAYS - mailgov_settings.DORMANT_WARNING_DAYS
        # status__exact, not status: the mailbox list's status filter also
        # offers states that are not statuses; a field lookup is exact.
        active = ("status__exact", Status.ACTIVE)
        rows = [
            Row(
                "dormant",
                _("Dormant grants (unused for %(days)d days or more)") % {"days": warn_after},
                (_mailboxes(self.dormant["to_warn"] + self.dormant["warned"], dormant="soon"),),
            ),
            Row(
                "dormant_to_warn",
                _("of which the owner is to be warned"),
                (Cell(self.dormant["to_warn"]),),
            ),
            Row(
                "dormant_warned",
                _("of which the owner was warned: to be revoked"),
                (Cell(self.dormant["warned"]),),
            ),
            Row(
                "dormant_due",
                _("of which revoked at the next sweep"),
                (Cell(self.dormant["due"]),),
            ),
            Row(
                "tokens_expiring",
                _("Access tokens expiring within %(hours)d hours") % {"hours": TOKEN_EXPIRY_HOURS},
                (_mailboxes(self.tokens["expiring"], active, token="24h"),),
            ),
            Row(
                "tokens_expired",
                _("Access tokens expired (renewed at the next use)"),
                (_mailboxes(self.tokens["expired"], active, token="expired"),),
            ),
            Row(
                "refresh_failing",
                _("Refresh failing (on %(days)s days or more)") % {"days": failing_days},
                (
                    _mailboxes(
                        self.refresh["failing"], active, refresh_failing_days__gte=failing_days
                    ),
                ),
            ),
            Row(
                "refresh_retrying",
                _("Last refresh failed, retrying"),
                (_mailboxes(self.refresh["retrying"], active, refresh_failures__gt="0"),),
            ),
            Row(
                "revocations_pending",
                _("Revocations at the provider pending"),
                (_mailboxes(self.revocations["pending"], revocation_retry_at__isnull="0"),),
            ),
            Row(
                "revocations_given_up",
                _("Revocations at the provider given up (retry by hand)"),
                (_mailboxes(self.revocations["given_up"], revocation_given_up_at__isnull="0"),),
            ),
            Row(
                "deleted_pending",
                _("Revocations of deleted mailboxes pending"),
                (
                    Cell(
                        self.revocations["deleted_pending"],
                        "pendingrevocation",
                        (("given_up_at__isnull", "1"),),
                    ),
                ),
            ),
            Row(
                "deleted_given_up",
                _("Revocations of deleted mailboxes given up"),
                (
                    Cell(
                        self.revocations["deleted_given_up"],
                        "pendingrevocation",
                        (("given_up_at__isnull", "0"),),
                    ),
                ),
            ),
        ]
        return Table(
            "attention", _("Grants needing attention"), _("What"), (_("Mailboxes"),), tuple(rows)
        )

    def _refresh_events_table(self) -> Table:
        since = (self.now - timedelta(days=REFRESH_EVENT_DAYS)).date().isoformat()
        rows = tuple(
            Row(
                outcome,
                str(Outcome(outcome).label),
                (
                    Cell(
                        n,
                        "refreshevent",
                        (("outcome__exact", outcome), ("at__date__gte", since)),
                    ),
                ),
            )
            for outcome, n in self.refresh_events.items()
        )
        return Table(
            "refresh_events",
            _("Token refreshes, last %(days)d days") % {"days": REFRESH_EVENT_DAYS},
            _("Outcome"),
            (_("Refreshes"),),
            rows,
        )

    def _upcoming_table(self) -> Table:
        rows = tuple(
            Row(
                str(item.mailbox_id),
                item.address,
                (
                    Cell(item.owner),
                    Cell(item.provider),
                    Cell(item.last_activity),
                    Cell(item.due),
                ),
                target="mailbox",
                pk=str(item.mailbox_id),
            )
            for item in self.upcoming_revocations
        )
        return Table(
            "upcoming_revocations",
            _("Dormant grants to be revoked next"),
            _("Mailbox"),
            (_("Owner"), _("Provider"), _("Last activity"), _("Revoked on")),
            rows,
        )

    def _sends_table(self) -> Table:
        rows = []
        for day in self.sends:
            iso = day.day.isoformat()
            on_day = ("attempted_at__date", iso)
            rate = day.failure_rate
            rows.append(
                Row(
                    iso,
                    iso,
                    (
                        Cell(day.sent, "sendlog", (on_day, ("status__exact", "sent"))),
                        Cell(day.failed, "sendlog", (on_day, ("status__exact", "failed"))),
                        Cell("" if rate is None else f"{rate * 100:.1f}"),
                    ),
                )
            )
        return Table(
            "sends",
            _("Sends per day, last %(days)d days") % {"days": SEND_DAYS},
            _("Day"),
            (_("Sent"), _("Failed"), _("Failure rate (%)")),
            tuple(rows),
        )

    def _outbox_table(self) -> Table:
        rows = tuple(
            Row(state, str(State(state).label), (_outbox(n, state__exact=state),))
            for state, n in self.outbox.items()
        )
        return Table("outbox", _("Outbox by state"), _("State"), (_("Messages"),), rows)

    def _held_table(self) -> Table:
        rows = []
        for state, reasons in (
            (State.HELD, self.held_reasons),
            (State.FAILED, self.failed_reasons),
        ):
            for reason, n in reasons.items():
                rows.append(
                    Row(
                        f"{state}:{reason}",
                        f"{State(state).label}: {reason or _('(no reason recorded)')}",
                        (_outbox(n, state__exact=state, error_code__exact=reason),),
                    )
                )
        return Table(
            "outbox_reasons",
            _("Held and failed messages by reason"),
            _("State and reason"),
            (_("Messages"),),
            tuple(rows),
        )


def _mailboxes(value: int, *pairs: tuple[str, str], **params: str) -> Cell:
    return Cell(value, "mailbox", (*pairs, *params.items()))


def _outbox(value: int, **params: str) -> Cell:
    return Cell(value, "outboxmessage", tuple(params.items()))


# -- computing ----------------------------------------------------------------------------


def build(now: datetime | None = None) -> Dashboard:
    """The dashboard as of ``now``, in a constant number of queries."""
    now = now or timezone.now()
    by_status, by_provider = _mailbox_counts()
    return Dashboard(
        now=now,
        by_status=by_status,
        by_provider=by_provider,
        provider_names={provider: _provider_name(provider) for provider in by_provider},
        **_mailbox_aggregates(now),
        upcoming_revocations=_upcoming_revocations(now),
        **_credential_aggregates(now),
        refresh_events=_refresh_events(now),
        sends=_sends(now),
        **_outbox_counts(),
        open_incidents=list(
            Incident.objects.filter(state=Incident.State.OPEN).order_by("-declared_at")[
                :OPEN_INCIDENTS
            ]
        ),
        open_incident_count=Incident.objects.filter(state=Incident.State.OPEN).count(),
        freezes=list(Incident.objects.filter(FROZEN).order_by("pk")),
    )


def _provider_name(provider_id: str) -> str:
    try:
        return str(get_provider(provider_id).name)
    except Exception:  # not configured (any more): its id is all there is
        return provider_id


def _mailbox_counts() -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """By status and by provider and status: one ``GROUP BY``."""
    by_status = dict.fromkeys(Status.values, 0)
    by_provider: dict[str, dict[str, int]] = {}
    rows = (
        Mailbox.objects.order_by()
        .values_list("provider", "status")
        .annotate(n=Count("pk"))
        .order_by("provider", "status")
    )
    for provider, status, n in rows:
        by_status[status] = by_status.get(status, 0) + n
        by_provider.setdefault(provider, {})[status] = n
    return by_status, by_provider


def _dormancy(now: datetime) -> dict[str, Q]:
    """The dormancy states as filters on mailboxes annotated with ``activity``
    (as :func:`mailgov.lifecycle.revoke_dormant` decides them)."""
    days, warning = mailgov_settings.DORMANT_DAYS, mailgov_settings.DORMANT_WARNING_DAYS
    dormant = Q(activity__lt=now - timedelta(days=days - warning)) & ~Q(status=Status.REVOKED)
    warned = Q(dormant_warned_at__isnull=False, dormant_warned_at__gte=F("activity"))
    # revocation_due(): activity + DORMANT_DAYS, not before warned + WARNING_DAYS.
    due = Q(
        activity__lte=now - timedelta(days=days),
        dormant_warned_at__lte=now - timedelta(days=warning),
    )
    return {"to_warn": dormant & ~warned, "warned": dormant & warned, "due": dormant & warned & due}


def _mailbox_aggregates(now: datetime) -> dict[str, Any]:
    """Dormancy, refresh failures and capabilities: one aggregate.

    A capability counts the mailboxes an incident scoped to it would cover
    (:func:`mailgov.incidents.scope_q`, one query per capability for the
    providers in use).
    """
    active = Q(status=Status.ACTIVE)
    aggregates: dict[str, Any] = {name: Count("pk", filter=q) for name, q in _dormancy(now).items()}
    aggregates["failing"] = Count(
        "pk", filter=active & Q(refresh_failing_days__gte=mailgov_settings.REFRESH_FAILING_DAYS)
    )
    aggregates["retrying"] = Count("pk", filter=active & Q(refresh_failures__gt=0))
    for index, capability_id in enumerate(CAPABILITIES):
        q = scope_q(Incident(scope=Incident.Scope.CAPABILITY, scope_value=capability_id))
        aggregates[f"cap{index}"] = Count("pk", filter=q)
        aggregates[f"cap{index}_active"] = Count("pk", filter=q & active)
    counts = Mailbox.objects.annotate(activity=activity()).aggregate(**aggregates)
    return {
        "dormant": {name: counts[name] for name in ("to_warn", "warned", "due")},
        "refresh": {name: counts[name] for name in ("failing", "retrying")},
        "by_capability": {
            capability_id: {
                "name": str(capability.name),
                "mailboxes": counts[f"cap{index}"],
                "active": counts[f"cap{index}_active"],
            }
            for index, (capability_id, capability) in enumerate(CAPABILITIES.items())
        },
    }


def _upcoming_revocations(now: datetime) -> list[UpcomingRevocation]:
    """The warned dormant grants revoked first: one query."""
    days, warning = mailgov_settings.DORMANT_DAYS, mailgov_settings.DORMANT_WARNING_DAYS
    owner = f"owner__{get_user_model().USERNAME_FIELD}"
    rows = (
        Mailbox.objects.annotate(activity=activity())
        .filter(_dormancy(now)["warned"])
        .annotate(
            due=Greatest(
                F("activity") + Value(timedelta(days=days)),
                F("dormant_warned_at") + Value(timedelta(days=warning)),
            )
        )
        .order_by("due", "pk")
        .values_list("pk", "address", "provider", owner, "activity", "dormant_warned_at", "due")[
            :UPCOMING_REVOCATIONS
        ]
    )
    return [UpcomingRevocation(*row) for row in rows]


def _credential_aggregates(now: datetime) -> dict[str, Any]:
    """Token expiry and pending revocations: one aggregate over the
    credentials (their ``expires_at`` and whether a refresh token is held;
    never a token) and one over pending revocations of deleted mailboxes."""
    active = Q(mailbox__status=Status.ACTIVE)
    pending = PENDING & Q(refresh_token__isnull=False)
    given_up = Q(mailbox__revocation_given_up_at__isnull=False)
    counts = MailboxCredentials.objects.aggregate(
        expiring=Count(
            "pk",
            filter=active
            & Q(expires_at__gte=now, expires_at__lt=now + timedelta(hours=TOKEN_EXPIRY_HOURS)),
        ),
        expired=Count("pk", filter=active & Q(expires_at__lt=now)),
        pending=Count("pk", filter=pending & ~given_up),
        given_up=Count("pk", filter=pending & given_up),
    )
    deleted = PendingRevocation.objects.filter(refresh_token__isnull=False).aggregate(
        deleted_pending=Count("pk", filter=Q(given_up_at__isnull=True)),
        deleted_given_up=Count("pk", filter=Q(given_up_at__isnull=False)),
    )
    return {
        "tokens": {"expiring": counts["expiring"], "expired": counts["expired"]},
        "revocations": {
            "pending": counts["pending"],
            "given_up": counts["given_up"],
            **deleted,
        },
    }


def _refresh_events(now: datetime) -> dict[str, int]:
    counts = dict.fromkeys(Outcome.values, 0)
    rows = (
        RefreshEvent.objects.filter(at__gte=now - timedelta(days=REFRESH_EVENT_DAYS))
        .order_by()
        .values_list("outcome")
        .annotate(n=Count("pk"))
    )
    for outcome, n in rows:
        counts[outcome] = n
    return counts


def _sends(now: datetime) -> list[DayCount]:
    """Sent and failed per local day over SEND_DAYS days: one ``GROUP BY``
    (``TruncDate`` in the current time zone); days without a send are zeros."""
    today = timezone.localdate(now)
    first = today - timedelta(days=SEND_DAYS - 1)
    start = timezone.make_aware(datetime.combine(first, time.min))
    rows = (
        SendLog.objects.filter(attempted_at__gte=start)
        .annotate(day=TruncDate("attempted_at"))
        .order_by()
        .values_list("day")
        .annotate(
            sent=Count("pk", filter=Q(status=SendLog.Status.SENT)),
            failed=Count("pk", filter=Q(status=SendLog.Status.FAILED)),
        )
    )
    found = {day: DayCount(day, sent, failed) for day, sent, failed in rows}
    days = (first + timedelta(days=offset) for offset in range(SEND_DAYS))
    return [found.get(day, DayCount(day)) for day in days]


def _outbox_counts() -> dict[str, Any]:
    """By state, and held and failed ones by reason: one ``GROUP BY``."""
    by_state = dict.fromkeys(State.values, 0)
    reasons: dict[str, dict[str, int]] = {State.HELD: {}, State.FAILED: {}}
    rows = (
        OutboxMessage.objects.order_by()
        .values_list("state", "error_code")
        .annotate(n=Count("pk"))
        .order_by("state", "error_code")
    )
    for state, reason, n in rows:
        by_state[state] = by_state.get(state, 0) + n
        if state in reasons:
            reasons[state][reason] = n
    return {
        "outbox": by_state,
        "held_reasons": reasons[State.HELD],
        "failed_reasons": reasons[State.FAILED],
    }
