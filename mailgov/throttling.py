"""Provider quotas per mailbox, and which SMTP replies mean "throttled".

Three questions the outbox asks before and after each SMTP transaction:

- :func:`quota_for` -- what may a mailbox of this provider send? A
  :class:`Quota`: messages per rolling window, recipients per rolling 24 hours,
  simultaneous SMTP connections.
- :func:`allowance` -- how much of that is left right now? Counted from the
  ``SendLog`` rows of messages the mailbox *sent* (not failed, not in flight:
  the caller accounts for a batch it holds). When nothing is left, ``opens_at``
  says when the rolling window next lets one more through.
- :func:`classify_reply` -- is this SMTP reply the provider throttling the
  mailbox? A :class:`Throttle` means: pause the whole mailbox for
  ``pause_seconds`` and keep its messages, even when the reply is a 5xx.
  ``None`` means the ordinary rule applies (4xx retry, 5xx permanent failure).

Where the numbers come from (see ``PROVIDERS.md`` and ``LIFECYCLE.md``,
"Provider throttling"; providers change them without notice):

- Google Workspace: about 2,000 messages a day (500 on trial accounts: override
  ``messages``) and 10,000 recipients a day, over a rolling 24 hours; "users
  can't send new messages for up to 24 hours" after reaching one (Google's
  "Gmail sending limits in Google Workspace").
- Microsoft 365: 30 messages a minute, 10,000 recipients a day (rolling), three
  concurrent connections per mailbox ("Message storage and concurrent connection
  throttling for SMTP Authenticated Submission"); 5.2.251-255 from "Continuous
  error throttling for SMTP AUTH submissions", whose period Microsoft does not
  publish.
- A generic OIDC provider has no published limits: unlimited unless configured.

Every default can be overridden per provider in
``MAILGOV_PROVIDERS[id]["quota"]`` (any subset of the :class:`Quota` fields).
Reply texts are matched here and never logged or stored: they may quote
addresses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, F, Q, QuerySet, Sum, Window

from mailgov.exceptions import MailgovConfigurationError
from mailgov.models import SendLog
from mailgov.providers.base import Provider

DAY_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Quota:
    messages: int | None  # messages per window; None = unlimited
    window_seconds: int  # the rolling window of ``messages``
    recipients_per_day: int | None  # recipients per rolling 24 h; None = unlimited
    concurrency: int  # simultaneous SMTP connections per mailbox


#: Defaults by provider type; any other type gets ``GENERIC_QUOTA``.
DEFAULT_QUOTAS: dict[str, Quota] = {
    "google": Quota(
        messages=2000, window_seconds=DAY_SECONDS, recipients_per_day=10_000, concurrency=3
    ),
    "microsoft": Quota(messages=30, window_seconds=60, recipients_per_day=10_000, concurrency=3),
}
# Google publishes no connection limit; 3 keeps one mailbox from hogging the
# workers and matches Microsoft's. Unknown servers get the same courtesy.
GENERIC_QUOTA = Quota(
    messages=None, window_seconds=DAY_SECONDS, recipients_per_day=None, concurrency=3
)

#: Keys that may be None (unlimited); every key must otherwise be an int >= 1.
_NULLABLE = frozenset({"messages", "recipients_per_day"})


def quota_for(provider: Provider) -> Quota:
    """The quota of ``provider``'s mailboxes: its type's default, overridden by
    ``MAILGOV_PROVIDERS[provider.id]["quota"]``.

    Raises :class:`MailgovConfigurationError`, naming the provider and key, for
    an unknown key or a value that is not a positive int (``None`` allowed for
    ``messages`` and ``recipients_per_day``). Zero is refused too: a mailbox that
    may never send is suspended, not throttled.
    """
    quota = DEFAULT_QUOTAS.get(provider.type, GENERIC_QUOTA)
    overrides = provider.config.get("quota")
    if overrides is None:
        overrides = {}
    where = f"MAILGOV_PROVIDERS[{provider.id!r}]['quota']"
    if not isinstance(overrides, dict):
        raise MailgovConfigurationError(f"{where} must be a dict, not {type(overrides).__name__}.")
    known = {field.name for field in fields(Quota)}
    for key, value in overrides.items():
        if key not in known:
            # A typo ("recipients") silently keeping the default would be worse.
            raise MailgovConfigurationError(
                f"{where} has unknown key {key!r}; known keys: {', '.join(sorted(known))}."
            )
        if value is None and key in _NULLABLE:
            continue
        # bool is an int subclass: True must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "a positive int or None" if key in _NULLABLE else "a positive int"
            raise MailgovConfigurationError(f"{where}[{key!r}] must be {allowed}, not {value!r}.")
    return replace(quota, **overrides)


@dataclass(frozen=True)
class Allowance:
    messages: int | None  # how many more messages may go now (None = unlimited)
    recipients: int | None  # how many more recipients may go now (None = unlimited)
    opens_at: datetime | None  # when either is 0: when one more fits; else None


def allowance(mailbox: Any, quota: Quota, now: datetime) -> Allowance:
    """What ``mailbox`` may still send at ``now`` under ``quota``.

    A send counts while ``attempted_at > now - window`` (``now - 1 day`` for
    recipients): it stops counting at ``attempted_at + window`` exactly, the
    instant ``opens_at`` names for the send whose expiry makes room.

    Queries: none when unlimited; otherwise one aggregate (both limits at
    once, on the ``(mailbox, -attempted_at)`` index), plus one per exhausted
    limit to find ``opens_at``.
    """
    limits = {"messages": quota.messages, "recipients": quota.recipients_per_day}
    spans = {
        "messages": timedelta(seconds=quota.window_seconds),
        "recipients": timedelta(seconds=DAY_SECONDS),
    }
    active = [name for name, limit in limits.items() if limit is not None]
    if not active:
        return Allowance(messages=None, recipients=None, opens_at=None)
    sent = SendLog.objects.filter(mailbox=mailbox, status=SendLog.Status.SENT)
    used = sent.filter(attempted_at__gt=now - max(spans[name] for name in active)).aggregate(
        **{name: _weight(name, Q(attempted_at__gt=now - spans[name])) for name in active}
    )
    left: dict[str, int | None] = {"messages": None, "recipients": None}
    opens: list[datetime] = []
    for name, limit in limits.items():
        if limit is None:
            continue
        left[name] = max(0, limit - (used[name] or 0))  # Sum() of no rows is None
        if left[name] == 0:
            in_window = sent.filter(attempted_at__gt=now - spans[name])
            opens.append(_opens_at(in_window, _weight(name), limit, spans[name], now))
    return Allowance(
        messages=left["messages"],
        recipients=left["recipients"],
        # Both exhausted: nothing fits until both have made room.
        opens_at=max(opens) if opens else None,
    )


def _weight(name: str, condition: Q | None = None) -> Count | Sum:
    """What a send weighs in limit ``name``: one message; its recipients."""
    if name == "messages":
        return Count("pk", filter=condition)
    return Sum("recipient_count", filter=condition)


def _opens_at(
    rows: QuerySet[SendLog], weight: Count | Sum, limit: int, span: timedelta, now: datetime
) -> datetime:
    """When the window over ``rows`` (the sends it counts now) next has room for one more.

    Going from the newest send back, the first one at which the running total
    reaches ``limit`` is the one whose expiry leaves at most ``limit - 1``
    counted: for messages that is the ``limit``-th newest, i.e. the
    ``(sent - limit + 1)``-th oldest. Sends at the same instant expire together,
    which the window's default RANGE frame reflects (peers share one total).
    """
    running = Window(weight, order_by=F("attempted_at").desc())
    first = (
        rows.annotate(running=running)
        .filter(running__gte=limit)
        .order_by("-attempted_at")
        .values_list("attempted_at", flat=True)
        .first()
    )
    # None: sends were deleted between the two queries; room has opened.
    return first + span if first is not None else now


@dataclass(frozen=True)
class Throttle:
    code: str  # short code for logs, admin and Mailbox.sending_paused_reason
    pause_seconds: int  # how long the whole mailbox's sending pauses


@dataclass(frozen=True)
class ReplyRule:
    """One row of a reply table. ``status`` is an enhanced status code
    ("5.4.5"), or a prefix of one when it ends with a dot ("5.2."). ``text``
    is searched case-insensitively in the reply text (lines joined by spaces).
    ``throttle=None`` is a decision too: "not throttling", which stops the
    search before a later row (or the default table) could claim the reply."""

    code: int | None  # the reply code; None = any
    status: str
    text: re.Pattern[str] | None
    throttle: Throttle | None


def _rule(code: int | None, status: str, text: str | None, throttle: Throttle | None) -> ReplyRule:
    return ReplyRule(code, status, re.compile(text, re.IGNORECASE) if text else None, throttle)


# After a daily limit Google's users "can't send new messages for up to 24
# hours"; retrying sooner only collects more 5.4.5s from a locked account.
GMAIL_DAILY_LIMIT = Throttle("gmail_daily_limit", DAY_SECONDS)
GMAIL_LOGIN_RATE = Throttle("gmail_login_rate", 10 * 60)
# More than three connections: one of ours will finish within a minute.
MS_CONCURRENCY = Throttle("ms_concurrency", 60)
# The rolling 24 h recipient limit frees gradually as old sends age out; an
# hour costs one rejected submission per retry, and quota refusals are not
# among the errors Microsoft's continuous-error throttling punishes.
MS_QUOTA = Throttle("ms_quota", 3600)
# Microsoft decides the period and it needs a human fix (mailbox full, Send
# As, licence, recipients) first; probing sooner only renews it.
MS_THROTTLED = Throttle("ms_throttled", 6 * 3600)
TRY_LATER = Throttle("try_later", 5 * 60)

#: Per provider type, searched before DEFAULT_REPLY_RULES; first match wins.
REPLY_RULES: dict[str, tuple[ReplyRule, ...]] = {
    "google": (
        # X.4.5 is "mail system congestion", a persistent transient error
        # (RFC 3463): Gmail's daily sending limit, whatever its wording.
        _rule(None, "5.4.5", None, GMAIL_DAILY_LIMIT),
        _rule(454, "4.7.0", r"too many login attempts", GMAIL_LOGIN_RATE),
        # Too many recipients in one message: that message's fault, not a quota.
        _rule(452, "4.5.3", None, None),
    ),
    "microsoft": (
        # The submission docs word it "Concurrent connections limit exceeded";
        # servers answer "STOREDRV.ClientSubmit; sender thread limit exceeded".
        # "recipient thread limit" is the recipient's mailbox, not ours.
        _rule(432, "4.3.2", r"sender thread limit|concurrent connections limit", MS_CONCURRENCY),
        # Only by its text: other 554 5.2.0 replies (SendAsDenied) are permanent.
        _rule(554, "5.2.0", r"SubmissionQuotaExceededException", MS_QUOTA),
        _rule(550, "5.2.251", None, MS_THROTTLED),  # continuous mailbox full errors
        _rule(550, "5.2.252", None, MS_THROTTLED),  # continuous Send As denied errors
        _rule(550, "5.2.253", None, MS_THROTTLED),  # continuous invalid licence errors
        _rule(550, "5.2.254", None, MS_THROTTLED),  # continuous too many recipients
        _rule(550, "5.2.255", None, MS_THROTTLED),  # continuous invalid recipients
        # SMTP AUTH disabled for the tenant or mailbox: waiting does not help.
        _rule(535, "5.7.139", None, None),
    ),
}
#: Searched for every provider type, after its own table.
DEFAULT_REPLY_RULES: tuple[ReplyRule, ...] = (_rule(421, "4.7.0", r"try again later", TRY_LATER),)

# A leading "550 " / "550-" (when the caller passed whole lines), then the
# enhanced status code. smtplib's smtp_error holds the text without the reply
# code, each line starting with the enhanced code again.
_STATUS = re.compile(r"^\s*(?:\d{3}[ -])?([245]\.\d{1,3}\.\d{1,3})(?=\s|$)")


def classify_reply(provider_type: str, code: int, text: str | bytes) -> Throttle | None:
    """The :class:`Throttle` an SMTP reply asks for, or ``None`` if it is not throttling.

    ``text`` is the reply text as smtplib gives it (bytes are decoded as UTF-8,
    bad bytes replaced). A reply without an enhanced status code matches no
    row. The text is never logged.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    status = ""
    lines = []
    for line in text.splitlines():
        found = _STATUS.match(line)
        if found:
            status = status or found.group(1)
            line = line[found.end() :]
        lines.append(line.strip())
    # Long replies wrap mid-phrase ("too many login\n4.7.0 attempts").
    flat = " ".join(" ".join(lines).split())
    for rule in REPLY_RULES.get(provider_type, ()) + DEFAULT_REPLY_RULES:
        if rule.code is not None and rule.code != code:
            continue
        if not status or not (
            status == rule.status or (rule.status.endswith(".") and status.startswith(rule.status))
        ):
            continue
        if rule.text is not None and not rule.text.search(flat):
            continue
        return rule.throttle
    return None
