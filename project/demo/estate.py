"""The demo's seeded estate: a few hundred mailboxes with a history, so that
the governance portal has something to show from the first page.

A company (``corp.example.test``) whose people connected their own
addresses and their teams' addresses over the past year, all through the
demo identity provider. Most mailboxes send every day; some stopped:
refreshing keeps failing for a few, a few went unused and are about to be
revoked (their owners were warned), some are suspended, some need
re-consent, some were revoked. Thirty days of send logs (with a bad day), the
outbox (sent, failed, held), refresh history, consent receipts and one past
incident come with them.

What keeps the demo's own background work (the Celery worker and beat that
``make demo`` starts) from wrecking this estate:

- Every mailbox that holds tokens holds a *real* grant of the demo
  authorization server, minted there for a user of its own whose email is
  the mailbox's address (:mod:`project.demo.authserver_grants`). The refresh
  sweep refreshes them there like any other; a send from one goes through
  the demo SMTP server (whose introspection names the address); containing
  an incident revokes them there. Made-up tokens would have turned every
  mailbox ``needs_reconsent`` at the first refresh sweep (``invalid_grant``).
- Mailboxes that need re-consent or are revoked hold no token at all, as
  real ones in those states do: no sweep has anything to refresh or revoke.
- Times are chosen so that the sweeps find nothing due at start: every
  active mailbox was used within the last two weeks, except the dormant ones,
  whose owners were warned days ago (``dormant_warned_at``), so they are
  revoked only when their time comes; the refresh-failing ones wait for
  their backoff (``refresh_retry_at`` hours ahead), as after real failures.
  If the demo runs that long, they recover or are revoked as they should.
- No seeded outbox row is ``queued``: the held ones belong to mailboxes that
  cannot send (suspended, needs re-consent), which the dispatch sweep leaves
  held; failed ones wait for an operator's retry.

Seeded once: :func:`seed_estate` does nothing when a mailbox of
``corp.example.test`` exists. Deterministic (a fixed random seed), apart
from the times, which are relative to now.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import EmailMessage, get_connection
from django.db import transaction
from django.utils import timezone

from mailgov.audit import acting_as
from mailgov.capabilities import SEND_MAIL
from mailgov.models import (
    ConsentReceipt,
    Incident,
    IncidentEvent,
    Mailbox,
    OutboxAttempt,
    OutboxMessage,
    RefreshEvent,
    SendLog,
)
from mailgov.providers import TokenResponse
from mailgov.services import connect_mailbox

DOMAIN = "corp.example.test"
PROVIDER = "demo"
SCOPES = ["email", "mail.send", "openid", "profile"]
ROOT = Path(__file__).resolve().parents[2]

FIRST = [
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal",
    "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor",
    "Wen", "Ximena", "Yusuf", "Zoe",
]  # fmt: skip
LAST = [
    "Adeyemi", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ito",
    "Jansen", "Kowalski", "Laine", "Moreau", "Nakamura", "Okafor", "Petrov", "Quispe", "Rossi",
    "Santos", "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz",
]  # fmt: skip
TEAMS = [
    "sales", "support", "billing", "hr", "it", "marketing", "ops", "legal", "press", "events",
    "partners", "recruiting", "newsletter", "alerts", "invoices",
]  # fmt: skip
REGIONS = ["", "eu", "us", "apac", "latam", "uk", "de", "fr", "jp", "in", "au", "ca", "br", "mx"]
SUBJECTS = [
    "Your invoice",
    "Order confirmation",
    "Weekly report",
    "Meeting notes",
    "Your support request",
    "Welcome aboard",
    "Password reset requested",
    "Shipping update",
]
SEND_ERRORS = ["SMTPRecipientsRefused", "SMTPDataError", "SMTPServerDisconnected"]
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"

#: Shares of the estate in each condition; the rest is active and in use.
SHARES = {
    "revoked": 20 / 300,
    "needs_reconsent": 15 / 300,
    "suspended": 10 / 300,
    "refresh_failing": 6 / 300,
    "dormant": 8 / 300,
}
#: Days ago of the demo's bad day (the provider timed out on a third of sends).
BAD_DAY = 12


@dataclass
class Seed:
    """One seeded mailbox: its address, its owner and the condition it is in."""

    address: str
    owner: str
    kind: str = "active"
    connected_days: float = 0.0
    rate: float = 1.0  # sends a day while it sends
    since_days: float = 0.0  # days since it stopped (suspended, revoked, ...)
    mailbox: Mailbox | None = field(default=None, repr=False)

    @property
    def holds_tokens(self) -> bool:
        return self.kind in ("active", "refresh_failing", "dormant", "suspended")


def seeded() -> bool:
    return Mailbox.objects.filter(address__iendswith="@" + DOMAIN).exists()


def plan(count: int, rng: random.Random) -> tuple[list[tuple[str, str]], list[Seed]]:
    """People (username, full name) and ``count`` mailboxes, with their condition."""
    people: list[tuple[str, str]] = []
    for index in range(max(1, count // 4)):
        first = FIRST[index % len(FIRST)]
        last = LAST[(index * 7 + index // len(FIRST)) % len(LAST)]
        username = f"{first}.{last}".lower()
        if any(username == known for known, _ in people):
            username = f"{username}{index}"
        people.append((username, f"{first} {last}"))
    seeds = [Seed(f"{username}@{DOMAIN}", username) for username, _ in people]
    round_ = 0
    while len(seeds) < count:
        # Team addresses: sales, sales-eu, ...; then sales2, sales-eu2, ...
        for region in REGIONS:
            for team in TEAMS:
                name = f"{team}-{region}" if region else team
                name += str(round_ + 1) if round_ else ""
                seeds.append(Seed(f"{name}@{DOMAIN}", rng.choice(people)[0]))
        round_ += 1
    seeds = seeds[:count]
    order = list(range(len(seeds)))
    rng.shuffle(order)
    at = 0
    for kind, share in SHARES.items():
        for index in order[at : at + max(1, round(count * share))]:
            seeds[index].kind = kind
        at += max(1, round(count * share))
    for seed in seeds:
        # Most were connected long ago; one in ten within the month.
        seed.connected_days = rng.uniform(2, 29) if rng.random() < 0.1 else rng.uniform(35, 400)
        seed.rate = rng.choice([0.2, 0.5, 1, 1, 2, 3, 5])
        if seed.kind == "dormant":
            seed.connected_days = rng.uniform(120, 300)
            seed.since_days = rng.uniform(54, 58)
        elif seed.kind != "active":
            seed.connected_days = max(seed.connected_days, 40)
            seed.since_days = rng.uniform(3, 5) if seed.kind == "refresh_failing" else 0
            if seed.kind in ("suspended", "needs_reconsent"):
                seed.since_days = rng.uniform(1, 25)
            elif seed.kind == "revoked":
                seed.since_days = rng.uniform(1, 38)
    return people, seeds


def mint_grants(addresses: list[str], authserver_dir: Path) -> dict[str, Any]:
    """A real grant of the demo authorization server for each address (see
    :mod:`project.demo.authserver_grants`); the tokens come through a pipe."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "mailgov.testing.authserver.settings",
        "MAILGOV_AUTHSERVER_DIR": str(authserver_dir),
        "MAILGOV_AUTHSERVER_URL": settings.AUTHSERVER_URL,
    }
    client_id = settings.MAILGOV_PROVIDERS[PROVIDER]["client_id"]
    done = subprocess.run(
        [sys.executable, "-m", "project.demo.authserver_grants", client_id],
        input=json.dumps(addresses),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"minting grants failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def seed_estate(
    count: int, authserver_dir: Path, *, officer: Any = None, now: datetime | None = None
) -> dict[str, int]:
    """Create the estate (see the module); returns counts by condition, of
    outbox rows (``outbox``) and of mailboxes (``mailboxes``)."""
    now = now or timezone.now()
    rng = random.Random(8)
    people, seeds = plan(count, rng)
    grants = mint_grants([s.address for s in seeds if s.holds_tokens], authserver_dir)
    User = get_user_model()
    with transaction.atomic(), acting_as(None, "demo-seed"):
        owners = {}
        for username, full_name in people:
            first, last = full_name.split(" ", 1)
            user = User(username=username, email=f"{username}@{DOMAIN}")
            user.first_name, user.last_name = first, last
            user.set_unusable_password()
            owners[username] = user
        User.objects.bulk_create(owners.values())
        owners = {user.username: user for user in User.objects.filter(username__in=owners)}
        for seed in seeds:
            owner = owners[seed.owner]
            if seed.holds_tokens:
                access, refresh = grants["tokens"][seed.address]
                seed.mailbox = connect_mailbox(
                    owner=owner,
                    provider_id=PROVIDER,
                    response=TokenResponse(access, refresh, grants["expires_in"], SCOPES),
                    address=seed.address,
                    requested_scopes=SCOPES,
                )
            else:
                # Needs re-consent or revoked: no token, as real ones.
                seed.mailbox = Mailbox.objects.create(
                    owner=owner, provider=PROVIDER, address=seed.address, scopes=SCOPES
                )
        outbox = _outbox(seeds, rng, now)
        _history(seeds, rng, now)
        _conditions(seeds, rng, now)
        _incident(seeds, owners, officer, now)
    counts: dict[str, int] = {}
    for seed in seeds:
        counts[seed.kind] = counts.get(seed.kind, 0) + 1
    counts["outbox"] = outbox
    counts["mailboxes"] = len(seeds)
    return counts


def _days(days: float, now: datetime) -> datetime:
    return now - timedelta(days=days)


def _sending_window(seed: Seed, now: datetime) -> tuple[datetime, datetime] | None:
    """When the mailbox sent, within the last 30 days."""
    start = max(_days(seed.connected_days, now), _days(30, now))
    end = now if seed.kind == "active" else _days(seed.since_days, now)
    if seed.kind == "dormant":
        return None
    return (start, end) if start < end else None


def _history(seeds: list[Seed], rng: random.Random, now: datetime) -> None:
    """Send logs, receipts and refresh events; ``last_used_at`` from the logs."""
    logs: list[SendLog] = []
    receipts: list[ConsentReceipt] = []
    refreshes: list[RefreshEvent] = []
    for seed in seeds:
        mailbox = seed.mailbox
        connected = _days(seed.connected_days, now)
        receipts.append(_receipt(mailbox, connected, ConsentReceipt.Action.GRANT))
        last_used = None
        window = _sending_window(seed, now)
        if window is not None:
            start, end = window
            day = start
            while day < end:
                sends = int(rng.expovariate(1 / seed.rate) + rng.random())
                for _ in range(sends):
                    at = day + timedelta(seconds=rng.uniform(0, 86400))
                    if at >= end:
                        continue
                    bad_day = abs((now - at).days - BAD_DAY) < 1
                    failed = rng.random() < (0.3 if bad_day else 0.025)
                    logs.append(
                        SendLog(
                            mailbox=mailbox,
                            message_id=make_msgid(domain=DOMAIN),
                            recipient_count=rng.choice([1, 1, 1, 2, 3, 5]),
                            status=SendLog.Status.FAILED if failed else SendLog.Status.SENT,
                            error_class=(
                                ("TimeoutError" if bad_day else rng.choice(SEND_ERRORS))
                                if failed
                                else ""
                            ),
                            attempted_at=at,
                            sent_at=None if failed else at + timedelta(seconds=1),
                        )
                    )
                    last_used = max(last_used or at, at)
                day += timedelta(days=1)
            if seed.kind != "revoked" and (last_used is None or end - last_used > timedelta(14)):
                # In use until it stopped: a send within the fortnight before
                # (so the dormancy sweep has nothing to warn about).
                at = max(end - timedelta(hours=rng.uniform(1, 96)), start + (end - start) / 2)
                logs.append(
                    SendLog(
                        mailbox=mailbox,
                        message_id=make_msgid(domain=DOMAIN),
                        recipient_count=1,
                        status=SendLog.Status.SENT,
                        attempted_at=at,
                        sent_at=at,
                    )
                )
                last_used = at
        if seed.kind == "dormant":
            last_used = _days(seed.since_days, now)
        Mailbox.objects.filter(pk=mailbox.pk).update(connected_at=connected, last_used_at=last_used)
        # Refreshes: one a day over the last week while it worked.
        if seed.holds_tokens and seed.kind != "dormant":
            for days in range(7):
                at = now - timedelta(days=days, hours=rng.uniform(0, 2))
                if seed.kind == "refresh_failing" and days < seed.since_days:
                    continue
                if at > connected:
                    refreshes.append(
                        RefreshEvent(mailbox=mailbox, at=at, outcome=RefreshEvent.Outcome.OK)
                    )
        if seed.kind == "refresh_failing":
            for hours in range(0, int(seed.since_days * 24), 5):
                refreshes.append(
                    RefreshEvent(
                        mailbox=mailbox,
                        at=now - timedelta(hours=hours + rng.uniform(0, 1)),
                        outcome=RefreshEvent.Outcome.UNAVAILABLE,
                        error_code="503",
                    )
                )
        if seed.kind == "needs_reconsent" and "invalid_grant" in _reason(seed):
            refreshes.append(
                RefreshEvent(
                    mailbox=mailbox,
                    at=_days(seed.since_days, now),
                    outcome=RefreshEvent.Outcome.REVOKED,
                    error_code="invalid_grant",
                )
            )
        if seed.kind == "revoked" and _reason(seed).startswith("user:"):
            receipts.append(
                _receipt(mailbox, _days(seed.since_days, now), ConsentReceipt.Action.WITHDRAW)
            )
    SendLog.objects.bulk_create(logs, batch_size=1000)
    ConsentReceipt.objects.bulk_create(receipts, batch_size=1000)
    RefreshEvent.objects.bulk_create(refreshes, batch_size=1000)


def _receipt(mailbox: Mailbox, at: datetime, action: str) -> ConsentReceipt:
    return ConsentReceipt(
        user_id=mailbox.owner_id,
        mailbox=mailbox,
        provider=PROVIDER,
        address=mailbox.address,
        capability=SEND_MAIL.id,
        action=action,
        scopes_requested=[] if action == ConsentReceipt.Action.WITHDRAW else SCOPES,
        scopes_granted=SCOPES,
        explanation_version=SEND_MAIL.version,
        created_at=at,
        ip_address="198.51.100.0",
        user_agent=USER_AGENT,
    )


REASONS = {
    "suspended": ["admin: suspended by officer", "admin: suspended by admin"],
    "needs_reconsent": [
        "invalid_grant: the provider ended the grant",
        "smtp_auth_rejected: the provider refused XOAUTH2",
        "invalid_grant: the provider ended the grant",
    ],
    "revoked": [
        "user: disconnected by the owner",
        "dormant: unused for 60 days",
        "admin: revoked by officer",
    ],
}


def _reason(seed: Seed) -> str:
    choices = REASONS.get(seed.kind)
    if not choices:
        return ""
    return choices[sum(map(ord, seed.address)) % len(choices)]


def _outbox(seeds: list[Seed], rng: random.Random, now: datetime) -> int:
    """Outbox rows made through the queued backend (so their stored payloads
    are real and a release or retry sends them), then put in their state:
    sent lately, failed (kept for a retry), held for mailboxes that stopped."""
    backend = get_connection("mailgov.backends.queued.EmailBackend")
    wanted: list[tuple[Seed, str]] = []
    for seed in seeds:
        if seed.kind in ("suspended", "needs_reconsent"):
            wanted += [(seed, "held")] * rng.randint(1, 3)
        elif seed.kind == "active":
            roll = rng.random()
            if roll < 0.05 or not any(state == "failed" for _, state in wanted):
                wanted.append((seed, "failed"))
            if roll < 0.3:
                wanted += [(seed, "sent")] * rng.randint(1, 3)
    messages = [
        EmailMessage(
            f"{rng.choice(SUBJECTS)} #{rng.randint(1000, 9999)}",
            "Sent by the mailgov demo's seeded estate.",
            seed.address,
            [f"customer{rng.randint(1, 500)}@example.org"],
        )
        for seed, _ in wanted
    ]
    backend.send_messages(messages)
    attempts: list[OutboxAttempt] = []
    for (seed, state), message in zip(wanted, messages, strict=True):
        at = now - timedelta(hours=rng.uniform(1, 100))
        row = OutboxMessage.objects.filter(pk=message.outbox_id)
        if state == "sent":
            row.update(
                state=OutboxMessage.State.SENT,
                payload=None,
                attempts=1,
                created_at=at,
                sent_at=at + timedelta(seconds=2),
                finished_at=at + timedelta(seconds=2),
            )
            outcome, code, reply = OutboxAttempt.Outcome.SENT, "", 250
        elif state == "failed":
            code = rng.choice(["smtp_550", "smtp_552", "smtp_554"])
            reply = int(code[-3:])
            row.update(
                state=OutboxMessage.State.FAILED,
                attempts=1,
                failures=1,
                error_code=code,
                reply_code=reply,
                created_at=at,
                finished_at=at + timedelta(seconds=2),
            )
            outcome = OutboxAttempt.Outcome.FAILED
        else:
            since = _days(seed.since_days, now)
            code = f"mailbox_{seed.kind}"
            row.update(
                state=OutboxMessage.State.HELD,
                error_code=code,
                held_reason=f"mailbox {seed.kind.replace('_', ' ')}",
                created_at=since + timedelta(minutes=rng.uniform(5, 600)),
                finished_at=since + timedelta(minutes=rng.uniform(600, 700)),
            )
            continue
        attempts.append(
            OutboxAttempt(
                message_id=message.outbox_id,
                worker="demo@seed",
                started_at=at,
                finished_at=at + timedelta(seconds=2),
                outcome=outcome,
                reply_code=reply,
                error_code=code,
            )
        )
    OutboxAttempt.objects.bulk_create(attempts)
    return len(messages)


def _conditions(seeds: list[Seed], rng: random.Random, now: datetime) -> None:
    """Put each mailbox in its condition (after its history and outbox)."""
    today = timezone.localdate(now)
    for seed in seeds:
        rows = Mailbox.objects.filter(pk=seed.mailbox.pk)
        since = _days(seed.since_days, now)
        if seed.holds_tokens and seed.kind != "refresh_failing":
            rows.update(last_refreshed_at=now - timedelta(minutes=rng.uniform(1, 50)))
        if seed.kind == "dormant":
            # Warned days ago (the notice went out then): revoked when due,
            # not at the demo's first sweep.
            rows.update(dormant_warned_at=now - timedelta(days=rng.uniform(0.5, 4)))
        elif seed.kind == "refresh_failing":
            days = max(3, int(seed.since_days))
            rows.update(
                refresh_failing_days=days,
                refresh_failed_on=today,
                refresh_failures=days * 4,
                # The backoff after repeated failures: the sweep waits.
                refresh_retry_at=now + timedelta(hours=rng.uniform(4, 12)),
                refresh_failing_notified=True,
                last_refreshed_at=since,
            )
        elif seed.kind == "suspended":
            rows.update(status=Mailbox.Status.SUSPENDED, revocation_reason=_reason(seed))
        elif seed.kind == "needs_reconsent":
            rows.update(status=Mailbox.Status.NEEDS_RECONSENT, revocation_reason=_reason(seed))
        elif seed.kind == "revoked":
            rows.update(
                status=Mailbox.Status.REVOKED,
                revoked_at=since,
                revocation_reason=_reason(seed),
                revocation_attempts=1,
            )


def _incident(seeds: list[Seed], owners: dict[str, Any], officer: Any, now: datetime) -> None:
    """A past incident, resolved, with its timeline (the portal's history)."""
    team = next((s for s in seeds if s.address.startswith("support-eu@")), seeds[0])
    owner = owners[team.owner]
    declared = _days(19, now)
    incident = Incident.objects.create(
        title="Phishing report: unexpected messages from support-eu",
        severity=Incident.Severity.MEDIUM,
        scope=Incident.Scope.USERS,
        scope_ids=[str(owner.pk)],
        state=Incident.State.RESOLVED,
        declared_at=declared,
        declared_by=officer,
        frozen_at=declared + timedelta(minutes=4),
        unfrozen_at=declared + timedelta(hours=3),
        notified_at=declared + timedelta(minutes=40),
        resolved_at=declared + timedelta(hours=3),
        summary="A scheduled campaign nobody had announced. No token was misused.",
    )
    boxes = Mailbox.objects.filter(owner=owner).count()
    label = officer.get_username() if officer else "officer"
    for minutes, step, counts, note in (
        (0, "declare", {"mailboxes": boxes}, "Medium; Some users: 1"),
        (4, "freeze", {"mailboxes": boxes, "held": 3}, ""),
        (40, "notify", {"owners": 1, "queued": 1, "skipped": 0}, ""),
        (180, "unfreeze", {"released": 3}, ""),
        (181, "resolve", {"released": 0}, incident.summary),
    ):
        IncidentEvent.objects.create(
            incident=incident,
            step=step,
            at=declared + timedelta(minutes=minutes),
            actor=officer,
            actor_label=label,
            counts=counts,
            note=note,
        )
