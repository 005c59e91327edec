"""``manage.py mailgov_incident``: the incident playbook from a shell.

For the day the web admin is down. Each subcommand parses, calls
:mod:`mailgov.incidents` (or :mod:`mailgov.rotation`) and prints; the steps
go to the incident's timeline as ``shell (<os user>)`` and to the audit
trail under one correlation id per run (``shell-<hex>``), so the entries of
one command can be found together.
"""

from __future__ import annotations

import getpass
import json
import uuid
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q
from tqdm import tqdm

from mailgov import incidents
from mailgov.audit import acting_as
from mailgov.conf import mailgov_settings
from mailgov.crypto import get_keyring
from mailgov.exceptions import IncidentStateError, MailgovError
from mailgov.models import Incident, IncidentEvent, Mailbox
from mailgov.rotation import rotation_pending_count
from mailgov.services import key_usage, rotate_keys

Step = IncidentEvent.Step


def shell_label() -> str:
    """``shell (<os user>)``: who ran the command, as the timeline shows it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        user = "unknown"
    return f"shell ({user})"


class Command(BaseCommand):
    help = (
        "Incident playbook for operators, when the web admin is not available: "
        "`declare`, `freeze`, `unfreeze`, `contain`, `notify`, `owners` (CSV), `rotate`, "
        "`resolve`, `status`, `timeline`. Every step is written to the incident's "
        "timeline as 'shell (<os user>)'."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        declare = sub.add_parser("declare", help="Open an incident over a scope of mailboxes.")
        declare.add_argument("--title", required=True)
        declare.add_argument(
            "--severity", choices=Incident.Severity.values, default=Incident.Severity.HIGH
        )
        declare.add_argument("--scope", choices=Incident.Scope.values, required=True)
        declare.add_argument("--provider", help="The provider id (scope 'provider').")
        declare.add_argument("--capability", help="The capability id (scope 'capability').")
        declare.add_argument(
            "--user",
            dest="users",
            action="append",
            nargs="+",
            default=[],
            metavar="USER",
            help="Users by username, email or id (scope 'users'); repeatable.",
        )
        declare.add_argument(
            "--mailbox",
            dest="mailboxes",
            action="append",
            nargs="+",
            default=[],
            metavar="MAILBOX",
            help="Mailboxes by id or address (scope 'mailboxes'); repeatable.",
        )
        for name, text in (
            ("freeze", "Stop sending in the scope (queued mail is held)."),
            ("unfreeze", "Lift the freeze (held mail is queued again)."),
            ("contain", "Make every token in the scope unusable; queue the revocations."),
            ("owners", "The affected owners as CSV, on standard output."),
            ("rotate", "Re-encrypt every stored value under the primary key, now."),
        ):
            sub.add_parser(name, help=text).add_argument("incident_id")
        notify = sub.add_parser("notify", help="Tell the affected owners, through the outbox.")
        notify.add_argument("incident_id")
        notify.add_argument("--subject-file", type=Path, help="The notice's subject template.")
        notify.add_argument("--body-file", type=Path, help="The notice's text template.")
        resolve = sub.add_parser("resolve", help="Close the incident (lifts its freeze).")
        resolve.add_argument("incident_id")
        resolve.add_argument("--summary", required=True)
        status = sub.add_parser("status", help="One incident, or the list of open ones.")
        status.add_argument("incident_id", nargs="?")
        timeline = sub.add_parser("timeline", help="The incident's timeline.")
        timeline.add_argument("incident_id")
        timeline.add_argument("--format", choices=("text", "json", "csv"), default="text")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        self.label = shell_label()
        # One correlation id per run: its timeline lines and audit entries
        # can be found together, as those of one admin request can.
        with acting_as(None, f"shell-{uuid.uuid4().hex}"):
            try:
                getattr(self, f"do_{action}")(**options)
            except (IncidentStateError, MailgovError, ValidationError) as exc:
                raise CommandError(_message(exc)) from None

    # -- steps --------------------------------------------------------------------------

    def do_declare(self, **options: Any) -> None:
        scope = options["scope"]
        users = [value for group in options["users"] for value in group]
        boxes = [value for group in options["mailboxes"] for value in group]
        given = {
            "provider": bool(options["provider"]),
            "capability": bool(options["capability"]),
            "users": bool(users),
            "mailboxes": bool(boxes),
        }
        needs = {
            "provider": "--provider",
            "capability": "--capability",
            "users": "--user",
            "mailboxes": "--mailbox",
        }
        stray = [needs[kind] for kind, present in given.items() if present and kind != scope]
        if stray:
            raise CommandError(f"{', '.join(stray)} does not go with --scope {scope}.")
        if scope in needs and not given[scope]:
            raise CommandError(f"--scope {scope} needs {needs[scope]}.")
        scope_value, scope_ids = "", []
        if scope == Incident.Scope.PROVIDER:
            scope_value = options["provider"]
            known = scope_value in mailgov_settings.PROVIDERS
            if not known and not Mailbox.objects.filter(provider=scope_value).exists():
                raise CommandError(
                    f"Unknown provider {scope_value!r}: not configured and no mailbox has it."
                )
        elif scope == Incident.Scope.CAPABILITY:
            scope_value = options["capability"]
        elif scope == Incident.Scope.USERS:
            scope_ids = find_users(users)
        elif scope == Incident.Scope.MAILBOXES:
            scope_ids = find_mailboxes(boxes)
        incident = incidents.declare(
            title=options["title"],
            severity=options["severity"],
            scope=scope,
            scope_value=scope_value,
            scope_ids=scope_ids,
            label=self.label,
        )
        count = incidents.scope_queryset(incident).count()
        self.stdout.write(
            f"Incident #{incident.pk} declared: {incident.title} "
            f"({incident.get_severity_display()}; {incidents.describe_scope(incident)}); "
            f"{count} mailbox(es) in scope."
        )
        self.stdout.write(f"Next: manage.py mailgov_incident freeze {incident.pk}")

    def do_freeze(self, incident_id: str, **options: Any) -> None:
        incident = get_incident(incident_id)
        counts = incidents.freeze(incident, label=self.label)
        if counts.get("already"):
            self.stdout.write(f"Incident #{incident.pk}: sending was already frozen.")
            return
        self.stdout.write(
            f"Incident #{incident.pk}: sending frozen for {counts['mailboxes']} mailbox(es); "
            f"{counts['held']} queued message(s) held."
        )

    def do_unfreeze(self, incident_id: str, **options: Any) -> None:
        incident = get_incident(incident_id)
        counts = incidents.unfreeze(incident, label=self.label)
        if counts.get("already"):
            self.stdout.write(f"Incident #{incident.pk}: sending was not frozen.")
            return
        self.stdout.write(
            f"Incident #{incident.pk}: freeze lifted; {counts['released']} held message(s) "
            "queued again."
        )

    def do_contain(self, incident_id: str, **options: Any) -> None:
        incident = get_incident(incident_id)
        total = incidents.scope_queryset(incident).count()
        # At once, one write (the switch every process checks); then the rows
        # revoked and the provider revocations queued, here rather than by a
        # worker: the shell is for the day the rest may not be running.
        with tqdm(total=total, unit="mailbox", disable=None, file=self.stderr._out) as bar:
            counts = incidents.contain(incident, label=self.label, progress=bar.update)
        if counts.get("already"):
            self.stdout.write(f"Incident #{incident.pk} was already contained.")
        else:
            self.stdout.write(
                f"Incident #{incident.pk}: the tokens of {counts['mailboxes']} mailbox(es) "
                "are unusable from now on."
            )
        self.stdout.write(
            f"{counts['revoked']} mailbox(es) revoked, {counts['tokens_wiped']} access "
            f"token(s) wiped, {counts['held']} queued message(s) held; revocations at the "
            "providers are queued."
        )

    def do_notify(
        self, incident_id: str, subject_file: Path | None, body_file: Path | None, **options: Any
    ) -> None:
        incident = get_incident(incident_id)
        subject = read_template(subject_file)
        body = read_template(body_file)
        if subject is not None:
            subject = " ".join(subject.split())
        owners = incidents.scope_queryset(incident).values("owner_id").distinct().count()
        with tqdm(total=owners, unit="owner", disable=None, file=self.stderr._out) as bar:
            counts = incidents.notify(
                incident, label=self.label, subject=subject, body=body, progress=bar.update
            )
        self.stdout.write(
            f"Incident #{incident.pk}: {counts['owners']} owner(s); {counts['queued']} "
            f"notice(s) queued in the outbox, {counts['skipped']} skipped (already told, "
            "or no address)."
        )

    def do_owners(self, incident_id: str, **options: Any) -> None:
        incident = get_incident(incident_id, open_only=False)
        lines = 0
        for line in incidents.owners_csv(incident):
            self.stdout.write(line, ending="")
            lines += 1
        incidents.record(
            incident, Step.EXPORT, label=self.label, counts={"owners": max(lines - 1, 0)}
        )

    def do_rotate(self, incident_id: str, **options: Any) -> None:
        incident = get_incident(incident_id)
        keyring = get_keyring()
        old_keys = [key_id for key_id in keyring.key_ids if key_id != keyring.primary_id]
        total = rotation_pending_count()
        if total == 0 and not old_keys:
            self.stdout.write(
                f"Every value is under key {keyring.primary_id!r}, the only key. To rotate, "
                "first add a new key in front (manage.py mailgov_generate_key --file <keys "
                "file>, or a new first entry in MAILGOV_ENCRYPTION_KEYS), restart every "
                "process, then run this again."
            )
            return
        with tqdm(total=total, unit="row", disable=None, file=self.stderr._out) as bar:
            result = rotate_keys(progress=bar.update)
        counts = {
            "rotated_values": result.rotated,
            "rows": result.rows,
            "failed_rows": len(result.failed_rows),
            "busy_rows": len(result.busy_rows),
        }
        incidents.record(
            incident, Step.ROTATE, label=self.label, counts=counts, note=keyring.primary_id
        )
        self.stdout.write(
            f"Incident #{incident.pk}: re-encrypted {result.rotated} value(s) in "
            f"{result.rows} row(s) under key {keyring.primary_id!r}."
        )
        if result.failed_rows or result.busy_rows:
            raise CommandError(
                f"{len(result.failed_rows)} row(s) could not be decrypted and "
                f"{len(result.busy_rows)} row(s) were busy throughout; they still hold values "
                "under an old key: do not retire it. Run this again (manage.py "
                "mailgov_rotate_keys --dry-run shows what each key holds)."
            )
        usage = key_usage()
        retire = [key_id for key_id in old_keys if not usage.get(key_id)]
        if retire:
            self.stdout.write(
                f"No value is left under {', '.join(map(repr, retire))}: remove it from the "
                "keyring and restart every process."
            )

    def do_resolve(self, incident_id: str, summary: str, **options: Any) -> None:
        incident = get_incident(incident_id)
        counts = incidents.resolve(incident, summary=summary, label=self.label)
        self.stdout.write(
            f"Incident #{incident.pk} resolved; {counts['released']} held message(s) queued again."
        )

    def do_status(self, incident_id: str | None, **options: Any) -> None:
        if incident_id is None:
            open_ = Incident.objects.filter(state=Incident.State.OPEN).order_by("declared_at")
            rows = list(open_)
            if not rows:
                self.stdout.write("No open incident.")
            for incident in rows:
                self.stdout.write(
                    f"#{incident.pk}  {incident.severity:<8}  "
                    f"{'FROZEN' if incident.frozen else 'sending':<7}  "
                    f"{incident.declared_at:%Y-%m-%d %H:%M}Z  {incident.title}  "
                    f"({incidents.describe_scope(incident)})"
                )
            return
        status = incidents.incident_status(get_incident(incident_id, open_only=False))
        by_status = status.pop("by_status")
        for key, value in status.items():
            self.stdout.write(f"{key}: {value}")
        self.stdout.write(
            "mailboxes by status: " + ", ".join(f"{key} {n}" for key, n in by_status.items())
        )

    def do_timeline(self, incident_id: str, format: str, **options: Any) -> None:
        incident = get_incident(incident_id, open_only=False)
        if format == "json":
            self.stdout.write(incidents.timeline_json(incident))
        elif format == "csv":
            self.stdout.write(incidents.timeline_csv(incident), ending="")
        else:
            for row in incidents.timeline(incident):
                counts = json.dumps(row["counts"], sort_keys=True) if row["counts"] else ""
                note = f"  {row['note']}" if row["note"] else ""
                self.stdout.write(f"{row['at']}  {row['step']:<8}  {row['actor']}  {counts}{note}")


# -- lookups ------------------------------------------------------------------------------


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(exc.messages)
    return str(exc)


def get_incident(incident_id: str, *, open_only: bool = True) -> Incident:
    """The incident numbered ``incident_id`` (``#12`` or ``12``); a
    :class:`CommandError` if there is none, or if it is resolved and the
    step needs an open one."""
    text = str(incident_id).lstrip("#")
    if not text.isdigit():
        raise CommandError(f"Incident ids are numbers, not {incident_id!r}.")
    incident = Incident.objects.filter(pk=int(text)).first()
    if incident is None:
        raise CommandError(f"No incident #{text}.")
    if open_only and incident.state != Incident.State.OPEN:
        raise CommandError(f"Incident #{text} is resolved; declare a new one.")
    return incident


def find_users(values: list[str]) -> list[str]:
    """User ids for usernames, email addresses or ids; a :class:`CommandError`
    naming every value that finds no user, or more than one."""
    User = get_user_model()
    username_field = User.USERNAME_FIELD
    ids: list[str] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for value in values:
        query = Q(**{username_field: value}) | Q(email__iexact=value)
        if value.isdigit():
            query |= Q(pk=int(value))
        found = list(User.objects.filter(query).values_list("pk", flat=True).distinct()[:2])
        if not found:
            unknown.append(value)
        elif len(found) > 1:
            ambiguous.append(value)
        else:
            ids.append(str(found[0]))
    problems = []
    if unknown:
        problems.append(f"No user {', '.join(map(repr, unknown))}.")
    if ambiguous:
        problems.append(
            f"{', '.join(map(repr, ambiguous))} names more than one user: give the user id."
        )
    if problems:
        raise CommandError(" ".join(problems))
    return list(dict.fromkeys(ids))


def find_mailboxes(values: list[str]) -> list[str]:
    """Mailbox ids for ids or sending addresses (an address names every mailbox
    with it, whatever the status); a :class:`CommandError` naming the unknown."""
    ids: list[str] = []
    unknown: list[str] = []
    for value in values:
        if "@" in value:
            found = [
                str(pk)
                for pk in Mailbox.objects.filter(address__iexact=value).values_list("pk", flat=True)
            ]
        else:
            try:
                pk = uuid.UUID(value)
            except ValueError:
                found = []
            else:
                found = [str(pk)] if Mailbox.objects.filter(pk=pk).exists() else []
        if found:
            ids.extend(found)
        else:
            unknown.append(value)
    if unknown:
        raise CommandError(f"No mailbox {', '.join(map(repr, unknown))}.")
    return list(dict.fromkeys(ids))


def read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"Cannot read {path}: {exc}") from None
