"""``manage.py mailgov_incident``: the incident playbook from a shell.

The steps are those of :mod:`mailgov.incidents` (tested there); here, that the
command parses, finds, refuses plainly, prints, and writes its steps to the
timeline as ``shell (<os user>)``, and that a freeze made from a shell stops a
send in another process at once.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.mail import EmailMessage, get_connection
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import TestCase, override_settings

from mailgov.crypto import generate_key_entry
from mailgov.models import (
    Incident,
    IncidentEvent,
    Mailbox,
    MailboxCredentials,
    OutboxMessage,
)
from mailgov.providers import TokenResponse
from mailgov.services import connect_mailbox, key_usage

ROOT = Path(__file__).resolve().parent.parent
LABEL = f"shell ({getpass.getuser()})"
GOOGLE_SCOPES = ["https://mail.google.com/"]
State = OutboxMessage.State


def run(*args: str) -> str:
    """Run the command; return what it printed on standard output."""
    out = io.StringIO()
    call_command("mailgov_incident", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def google(settings):
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "cid", "client_secret": "s"}}


@pytest.fixture
def estate(google, django_user_model):
    """Three owners: alice (two mailboxes), bob (one), carol (one, suspended)."""
    boxes = {}
    for username, count in (("alice", 2), ("bob", 1), ("carol", 1)):
        user = django_user_model.objects.create_user(username, f"{username}@example.test", "pw")
        for index in range(count):
            address = f"{username}{index or ''}@gmail.example"
            boxes[address] = connect_mailbox(
                owner=user,
                provider_id="google",
                response=TokenResponse(f"ya29.{address}", f"1//{address}", 3599, GOOGLE_SCOPES),
                address=address,
                requested_scopes=GOOGLE_SCOPES,
            )
    Mailbox.objects.filter(address="carol@gmail.example").update(status=Mailbox.Status.SUSPENDED)
    return boxes


def queue_from(address: str, count: int = 1) -> list[OutboxMessage]:
    backend = get_connection("mailgov.backends.queued.EmailBackend")
    messages = [EmailMessage(f"m{i}", "b", address, ["z@example.test"]) for i in range(count)]
    with TestCase.captureOnCommitCallbacks(execute=False):
        backend.send_messages(messages)
    return [OutboxMessage.objects.get(pk=m.outbox_id) for m in messages]


def declare(*args: str) -> Incident:
    run("declare", "--title", "Leaked key", "--severity", "critical", *args)
    return Incident.objects.latest("pk")


def steps(incident: Incident) -> list[tuple[str, str]]:
    return list(incident.timeline.order_by("at", "id").values_list("step", "actor_label"))


# -- declare --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_declare_every_scope(estate, django_user_model):
    out = run("declare", "--title", "All", "--scope", "all")
    assert "4 mailbox(es) in scope" in out
    incident = Incident.objects.latest("pk")
    assert (incident.scope, incident.severity) == ("all", "high")
    assert steps(incident) == [("declare", LABEL)]
    # The shell has no user: the timeline names the OS user instead.
    assert incident.timeline.get().actor is None

    incident = declare("--scope", "provider", "--provider", "google")
    assert (incident.scope, incident.scope_value) == ("provider", "google")
    incident = declare("--scope", "capability", "--capability", "send_mail")
    assert (incident.scope, incident.scope_value) == ("capability", "send_mail")

    alice = django_user_model.objects.get(username="alice")
    bob = django_user_model.objects.get(username="bob")
    carol = django_user_model.objects.get(username="carol")
    # By username, by email address (any case), by id; repeated --user and
    # several values after one; a user named twice counts once.
    incident = declare(
        "--scope", "users", "--user", "alice", "BOB@example.test", "--user", str(carol.pk), "alice"
    )
    assert sorted(incident.scope_ids) == sorted(str(u.pk) for u in (alice, bob, carol))

    by_id = estate["bob@gmail.example"].pk
    out = run(
        "declare",
        "--title",
        "Two",
        "--scope",
        "mailboxes",
        "--mailbox",
        str(by_id),
        "--mailbox",
        "Alice@Gmail.Example",
    )
    assert "2 mailbox(es) in scope" in out
    incident = Incident.objects.latest("pk")
    assert sorted(incident.scope_ids) == sorted([str(by_id), str(estate["alice@gmail.example"].pk)])


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scope", "users", "--user", "alice", "nobody", "ghost@x.test"], "No user 'nobody', "),
        (["--scope", "users", "--user", "999999"], "No user '999999'"),
        (
            ["--scope", "mailboxes", "--mailbox", "no@where.test", "not-a-uuid"],
            "No mailbox 'no@where.test', 'not-a-uuid'",
        ),
        (
            ["--scope", "mailboxes", "--mailbox", "00000000-0000-0000-0000-000000000000"],
            "No mailbox '00000000-0000-0000-0000-000000000000'",
        ),
        (["--scope", "users"], "--scope users needs --user"),
        (["--scope", "provider"], "--scope provider needs --provider"),
        (["--scope", "all", "--provider", "google"], "--provider does not go with --scope all"),
        (["--scope", "provider", "--provider", "pigeon"], "Unknown provider 'pigeon'"),
        (["--scope", "capability", "--capability", "read_mail"], "Unknown capability"),
    ],
)
def test_declare_refuses_bad_input_and_declares_nothing(estate, args, message):
    with pytest.raises(CommandError) as raised:
        declare(*args)
    assert message in str(raised.value)
    if "nobody" in args:
        # Every unknown one named at once, not only the first.
        assert "'ghost@x.test'" in str(raised.value)
    assert not Incident.objects.exists()


@pytest.mark.django_db
def test_declare_refuses_an_ambiguous_email_and_a_blank_title(estate, django_user_model):
    django_user_model.objects.create_user("alice2", "alice@example.test", "pw")
    with pytest.raises(CommandError, match="names more than one user: give the user id"):
        declare("--scope", "users", "--user", "alice@example.test")
    with pytest.raises(CommandError, match="needs a title"):
        run("declare", "--title", "  ", "--scope", "all")
    with pytest.raises(CommandError, match="invalid choice"):
        run("declare", "--title", "x", "--scope", "all", "--severity", "apocalyptic")
    assert not Incident.objects.exists()


# -- the playbook ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_freeze_holds_and_unfreeze_releases_the_scopes_queued_mail(estate):
    incident = declare("--scope", "users", "--user", "alice")
    alices = queue_from("alice@gmail.example", 2)
    [bobs] = queue_from("bob@gmail.example")
    assert "sending frozen for 2 mailbox(es); 2 queued message(s) held" in run(
        "freeze", str(incident.pk)
    )
    assert {row.state for row in OutboxMessage.objects.filter(pk__in=[r.pk for r in alices])} == {
        State.HELD
    }
    assert OutboxMessage.objects.get(pk=bobs.pk).state == State.QUEUED
    assert "already frozen" in run("freeze", f"#{incident.pk}")
    assert "2 held message(s) queued again" in run("unfreeze", str(incident.pk))
    assert "was not frozen" in run("unfreeze", str(incident.pk))
    assert set(OutboxMessage.objects.values_list("state", flat=True)) == {State.QUEUED}
    assert steps(incident) == [("declare", LABEL), ("freeze", LABEL), ("unfreeze", LABEL)]


@pytest.mark.django_db
def test_contain_makes_the_scopes_tokens_unusable(estate):
    incident = declare("--scope", "users", "--user", "bob", "carol")
    out = run("contain", str(incident.pk))
    assert "the tokens of 2 mailbox(es) are unusable from now on" in out
    assert "2 mailbox(es) revoked, 2 access token(s) wiped" in out
    for address in ("bob@gmail.example", "carol@gmail.example"):
        mailbox = Mailbox.objects.get(address=address)
        assert mailbox.status == Mailbox.Status.REVOKED
        assert MailboxCredentials.objects.get(pk=mailbox.pk).access_token is None
    assert Mailbox.objects.get(address="alice@gmail.example").status == Mailbox.Status.ACTIVE
    switch = incident.timeline.get(step="contain")
    done = incident.timeline.get(step="revoke")
    assert (switch.actor_label, switch.counts) == (LABEL, {"mailboxes": 2})
    assert (done.actor_label, done.counts["revoked"]) == (LABEL, 2)
    # Its correlation id is the shell run's own.
    assert switch.cid.startswith("shell-") and done.cid == switch.cid
    out = run("contain", str(incident.pk))
    assert "was already contained" in out and "0 mailbox(es) revoked" in out


@pytest.mark.django_db
def test_notify_with_edited_templates_and_owners_csv(estate, tmp_path):
    incident = declare("--scope", "provider", "--provider", "google")
    subject = tmp_path / "subject.txt"
    body = tmp_path / "body.txt"
    subject.write_text("Notice: {{ incident.title }}\n")
    body.write_text("Hello {{ owner.username }}: {{ mailboxes|join:', ' }}\n")
    out = run("notify", str(incident.pk), "--subject-file", str(subject), "--body-file", str(body))
    assert "3 owner(s); 3 notice(s) queued" in out
    notices = OutboxMessage.objects.filter(kind=OutboxMessage.Kind.NOTIFICATION)
    assert notices.count() == 3
    incident.refresh_from_db()
    assert incident.notice_subject == "Notice: {{ incident.title }}"
    # Once per owner: a second run tells nobody twice.
    assert "0 notice(s) queued in the outbox, 3 skipped" in run("notify", str(incident.pk))
    assert notices.count() == 3

    rows = list(csv.reader(io.StringIO(run("owners", str(incident.pk)))))
    assert rows[0] == ["user_id", "username", "email", "mailboxes", "statuses"]
    assert [row[1] for row in rows[1:]] == ["alice", "bob", "carol"]
    assert rows[1][3] == "alice1@gmail.example alice@gmail.example"
    assert incident.timeline.get(step="export").counts == {"owners": 3}
    assert [step for step, _ in steps(incident)] == ["declare", "notify", "notify", "export"]


@pytest.mark.django_db
def test_notify_refuses_a_broken_template_or_a_missing_file(estate, tmp_path):
    incident = declare("--scope", "all")
    broken = tmp_path / "broken.txt"
    broken.write_text("{% if %}")
    with pytest.raises(CommandError, match="not a valid template"):
        run("notify", str(incident.pk), "--body-file", str(broken))
    with pytest.raises(CommandError, match="Cannot read"):
        run("notify", str(incident.pk), "--body-file", str(tmp_path / "nope.txt"))
    assert not OutboxMessage.objects.exists()
    assert [step for step, _ in steps(incident)] == ["declare"]


OLD = generate_key_entry("old")
NEW = generate_key_entry("new")


@pytest.mark.django_db
def test_rotate_re_encrypts_and_records_the_step(google, django_user_model):
    owner = django_user_model.objects.create_user("owner", "o@example.test", "pw")
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[OLD]):
        for index in range(3):
            connect_mailbox(
                owner=owner,
                provider_id="google",
                response=TokenResponse(f"ya29.{index}", f"1//{index}", 3599, GOOGLE_SCOPES),
                address=f"o{index}@gmail.example",
                requested_scopes=GOOGLE_SCOPES,
            )
        incident = declare("--scope", "all")
        assert "add a new key in front" in run("rotate", str(incident.pk))
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[NEW, OLD]):
        out = run("rotate", str(incident.pk))
        assert "re-encrypted 6 value(s) in 3 row(s) under key 'new'" in out
        assert "No value is left under 'old'" in out
        assert key_usage() == {"new": 6}
    event = incident.timeline.get(step="rotate")
    assert event.actor_label == LABEL
    assert event.counts == {"rotated_values": 6, "rows": 3, "failed_rows": 0, "busy_rows": 0}


@pytest.mark.django_db
def test_resolve_status_and_timeline(estate):
    incident = declare("--scope", "provider", "--provider", "google")
    other = declare("--scope", "users", "--user", "bob")
    run("freeze", str(incident.pk))
    listing = run("status")
    assert f"#{incident.pk}  critical  FROZEN" in listing
    assert f"#{other.pk}  critical  sending" in listing
    status = run("status", str(incident.pk))
    assert "frozen: True" in status
    assert "mailboxes: 4" in status
    assert "active 3, needs_reconsent 0, suspended 1, revoked 0" in status

    with pytest.raises(CommandError, match="needs a summary"):
        run("resolve", str(incident.pk), "--summary", " ")
    out = run("resolve", str(incident.pk), "--summary", "Key rotated; no misuse seen.")
    assert f"Incident #{incident.pk} resolved" in out
    incident.refresh_from_db()
    assert (incident.state, incident.frozen) == ("resolved", False)
    assert f"#{incident.pk}" not in run("status")
    run("resolve", str(other.pk), "--summary", "False alarm.")
    assert run("status") == "No open incident.\n"

    # A resolved incident takes no more steps; its reports still work.
    for step in ("freeze", "contain", "rotate", "notify"):
        with pytest.raises(CommandError, match=f"Incident #{incident.pk} is resolved"):
            run(step, str(incident.pk))
    document = json.loads(run("timeline", str(incident.pk), "--format", "json"))
    assert document["incident"]["summary"] == "Key rotated; no misuse seen."
    assert [(row["step"], row["actor"]) for row in document["timeline"]] == [
        ("declare", LABEL),
        ("freeze", LABEL),
        ("resolve", LABEL),
    ]
    rows = list(csv.DictReader(io.StringIO(run("timeline", str(incident.pk), "--format", "csv"))))
    assert [row["step"] for row in rows] == ["declare", "freeze", "resolve"]
    assert {row["actor"] for row in rows} == {LABEL}
    text = run("timeline", str(incident.pk))
    assert f"resolve   {LABEL}" in text and "Key rotated; no misuse seen." in text


@pytest.mark.django_db
@pytest.mark.parametrize("step", ["freeze", "unfreeze", "contain", "owners", "status", "timeline"])
def test_an_unknown_incident_is_a_plain_error(step):
    with pytest.raises(CommandError, match="No incident #404"):
        run(step, "404")
    with pytest.raises(CommandError, match="Incident ids are numbers, not 'x1'"):
        run(step, "x1")
    assert not IncidentEvent.objects.exists()


RUN_COMMAND = """
from tests.workers.setup import setup_django
setup_django()
import sys
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", *sys.argv[1:]])
"""


def other_process_env() -> dict[str, str]:
    """What another process needs to work on this test's database."""
    return {
        **os.environ,
        "MAILGOV_TEST_DB_NAME": str(connection.settings_dict["NAME"]),
        "MAILGOV_TEST_KEYS": json.dumps(django_settings.MAILGOV_ENCRYPTION_KEYS),
    }


@pytest.mark.django_db
def test_a_failing_step_exits_non_zero():
    # As an operator runs it: a plain message on stderr, status 1, no traceback.
    done = subprocess.run(
        [sys.executable, "-c", RUN_COMMAND, "mailgov_incident", "freeze", "404"],
        cwd=ROOT,
        env=other_process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "No incident #404" in done.stderr
    assert "Traceback" not in done.stderr


# -- the kill switch reaches other processes ------------------------------------------------

SEND_IN_ANOTHER_PROCESS = """
from tests.workers.setup import setup_django
setup_django(EMAIL_BACKEND="mailgov.backends.smtp.EmailBackend")
import sys
from django.core.mail import send_mail
try:
    send_mail("From another process", "x", sys.argv[1], ["z@example.test"])
except Exception as exc:
    print("refused:" + type(exc).__name__)
else:
    print("sent")
"""


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_freeze_from_the_shell_stops_a_send_in_another_process(
    connect, demo_provider, smtp, settings
):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = connect("alice")
    env = {**other_process_env(), "MAILGOV_TEST_PROVIDERS": json.dumps({"demo": demo_provider})}

    def send_elsewhere() -> str:
        done = subprocess.run(
            [sys.executable, "-c", SEND_IN_ANOTHER_PROCESS, mailbox.address],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    incident = declare("--scope", "mailboxes", "--mailbox", mailbox.address)
    # Declared, not frozen: the other process sends (so what refuses it next
    # is the freeze, nothing else).
    assert send_elsewhere() == "sent"
    assert len(smtp.messages) == 1
    run("freeze", str(incident.pk))
    assert send_elsewhere() == "refused:SendingFrozenError"
    assert len(smtp.messages) == 1
    run("unfreeze", str(incident.pk))
    assert send_elsewhere() == "sent"
    assert len(smtp.messages) == 2
