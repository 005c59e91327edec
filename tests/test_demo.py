"""`make demo` from nothing: every process starts, a message arrives, any stop stops all.

The demo runs as ``python -m project.demo.run`` in a session of its own (so a
test can signal its whole process group, as a terminal does), on free ports,
with everything in a temporary ``var`` folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.core.mail import send_mail
from django.core.management import call_command
from django.utils import timezone

from mailgov import outbox
from mailgov.lifecycle import refresh_expiring, revoke_dormant
from mailgov.models import (
    ConsentReceipt,
    Incident,
    Mailbox,
    MailboxCredentials,
    OutboxAttempt,
    OutboxMessage,
    RefreshEvent,
    SendLog,
)
from mailgov.revocation import retry_revocations
from mailgov.testing.peers import free_port
from tests.conftest import secrets_of

ROOT = Path(__file__).resolve().parent.parent
PORT_NAMES = ("site", "auth", "smtp")
PORT_VARIABLES = {
    "site": "MAILGOV_DEMO_SITE_PORT",
    "auth": "MAILGOV_DEMO_AUTH_PORT",
    "smtp": "MAILGOV_DEMO_SMTP_PORT",
}


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return False
    return True


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now (bound, not merely unanswered)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections in TIME_WAIT do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Demo:
    """A running ``python -m project.demo.run`` and everything it printed so far."""

    def __init__(self, tmp_path: Path, ports: dict[str, int]) -> None:
        self.var = tmp_path / "var"
        self.ports = ports
        env = {
            **os.environ,
            "MAILGOV_VAR_DIR": str(self.var),
            **{PORT_VARIABLES[name]: str(port) for name, port in ports.items()},
        }
        for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "MAILGOV_ENCRYPTION_KEYS"):
            env.pop(name, None)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "project.demo.run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Its own process group, signalled as a whole like a terminal's job.
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        """Return once ``text`` was printed; fail (with the output) if the demo exits first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while text not in "".join(self.lines):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {text!r} in time:\n{self.output[-3000:]}"
                assert self.popen.poll() is None, f"exited before {text!r}:\n{self.output}"
                self._changed.wait(min(remaining, 0.2))

    def signal_group(self, signum: int) -> None:
        os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit in {timeout:g} s:\n{self.output[-3000:]}")

    def leftover_processes(self) -> dict[int, str]:
        """Processes still running with this demo's ``MAILGOV_VAR_DIR``, by pid (Linux /proc).

        Every process the demo starts inherits that variable, whatever its session.
        """
        marker = f"MAILGOV_VAR_DIR={self.var}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:  # gone meanwhile, or not ours
                continue
            if marker in environ:
                found[int(entry.name)] = cmdline.decode(errors="replace")
        return found

    def assert_nothing_left(self, timeout: float = 15) -> None:
        """Every port is free again and no process the demo started still runs."""
        deadline = time.monotonic() + timeout
        while True:
            taken = [port for port in self.ports.values() if not port_free(port)]
            left = self.leftover_processes()
            if not taken and not left:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"left behind: ports {taken}, processes {left}\n{self.output[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """Last resort after a failed test: kill the group and anything left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        for pid in self.leftover_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def demo_ports() -> dict[str, int]:
    return {name: free_port() for name in PORT_NAMES}


@pytest.fixture
def start_demo(tmp_path: Path, demo_ports: dict[str, int]) -> Iterator[Callable[[], Demo]]:
    """Start the demo on ``demo_ports`` (``start_demo()``); killed at teardown if still running."""
    started: list[Demo] = []

    def start() -> Demo:
        demo = Demo(tmp_path, demo_ports)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.kill()


@pytest.mark.slow
def test_make_demo_runs_from_nothing(start_demo, demo_ports, tmp_path):
    demo = start_demo()
    try:
        demo.wait_for("mailgov demo is running")
        output = demo.output
        assert "Generated a demo encryption key" in output
        assert "Connected alice@example.test (active)" in output
        site = f"http://127.0.0.1:{demo_ports['site']}"
        assert requests.get(site + "/", timeout=10).status_code == 200
        discovery = requests.get(
            f"http://127.0.0.1:{demo_ports['auth']}/.well-known/openid-configuration", timeout=10
        )
        assert discovery.json()["code_challenge_methods_supported"] == ["S256"]
        assert port_open(demo_ports["smtp"])
        # Sign in as alice and read the message her token sent.
        session = requests.Session()
        login = session.get(site + "/admin/login/", timeout=10)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
        session.post(
            site + "/admin/login/?next=/demo/inbox/",
            data={
                "csrfmiddlewaretoken": token,
                "username": "alice",
                "password": "alice-demo-password",
                "next": "/demo/inbox/",
            },
            headers={"Referer": site + "/admin/login/"},
            timeout=10,
        )
        inbox = session.get(site + "/demo/inbox/", timeout=10)
        assert "Hello from mailgov" in inbox.text
        assert "XOAUTH2" in inbox.text.upper()
        # Through the queued backend: stored by the site, sent by the demo's
        # Celery worker (filesystem broker), in the inbox moments later.
        home = session.get(site + "/", timeout=10).text
        mailbox = re.search(r'name="mailbox" value="([^"]+)"', home).group(1)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', home).group(1)
        queued = session.post(
            site + "/demo/send-test/",
            data={"csrfmiddlewaretoken": token, "mailbox": mailbox, "queued": "1"},
            headers={"Referer": site + "/"},
            timeout=10,
        )
        assert queued.status_code == 200 and "Queued" in queued.text
        deadline = time.monotonic() + 60
        while "A queued test message" not in session.get(site + "/demo/inbox/", timeout=10).text:
            assert time.monotonic() < deadline, demo.output[-3000:]
            time.sleep(0.5)
        check_the_portal(site, tmp_path / "var" / "db.sqlite3", demo.output)
        check_operations_endpoints(site)
    finally:
        # Ctrl-C, as a terminal sends it: to the whole foreground process group.
        demo.signal_group(signal.SIGINT)
        returncode = demo.wait()
    assert returncode == 0, demo.output[-3000:]
    assert "Stopping the demo" in demo.output
    assert "Traceback" not in demo.output, demo.output[-3000:]
    demo.assert_nothing_left()
    # Nothing secret in what the demo printed beyond the documented demo passwords.
    keys = (tmp_path / "var" / "mailgov-keys.txt").read_text().split(":", 1)[1].strip()
    assert keys not in demo.output


def check_operations_endpoints(site: str) -> None:
    """The demo serves /metrics and the health probes; readiness comes once
    beat and the worker have run the dispatch sweep."""
    assert requests.get(site + "/health/live", timeout=10).text == "ok\n"
    deadline = time.monotonic() + 30
    while (ready := requests.get(site + "/health/ready", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.5)
    assert "SweepHeartbeat(sweep='mailgov.dispatch_outbox'): OK" in ready.text
    metrics = requests.get(site + "/metrics", timeout=10).text
    assert 'mailgov_mailboxes{status="active"}' in metrics
    assert 'mailgov_send_attempts_total{provider="demo",result="sent"}' in metrics
    assert "alice@example.test" not in metrics


def staff_session(site: str, username: str, password: str) -> requests.Session:
    """A session signed in to the demo's admin as ``username``."""
    session = requests.Session()
    login = session.get(site + "/admin/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
    answer = session.post(
        site + "/admin/login/?next=/admin/",
        data={"csrfmiddlewaretoken": token, "username": username, "password": password},
        headers={"Referer": site + "/admin/login/"},
        timeout=10,
    )
    assert answer.url.endswith("/admin/"), f"{username} could not sign in"
    return session


def check_the_portal(site: str, database: Path, output: str) -> None:
    """The seeded estate in the admin; the auditor looks and exports but changes nothing."""
    assert "Seeded the demo estate: 300 mailboxes" in output
    for username, password in (
        ("admin", "admin-demo-password"),
        ("officer", "officer-demo-password"),
        ("auditor", "auditor-demo-password"),
    ):
        assert f"{username} / {password}" in output
    admin = staff_session(site, "admin", "admin-demo-password")
    index = admin.get(site + "/admin/", timeout=10)
    assert "Mail governance" in index.text and "Django administration" not in index.text
    dashboard = admin.get(site + "/admin/mailgov/governance/", timeout=30)
    assert dashboard.status_code == 200
    # The seeded estate and alice's mailbox, in the dashboard's count.
    shown = re.search(r"Mailboxes \((\d+)\)", dashboard.text)
    assert shown and int(shown.group(1)) == 301, re.findall(
        r".{0,80}Mailboxes.{0,80}", dashboard.text
    )
    listing = admin.get(site + "/admin/mailgov/mailbox/?q=corp.example.test", timeout=30)
    assert listing.status_code == 200 and "@corp.example.test" in listing.text

    auditor = staff_session(site, "auditor", "auditor-demo-password")
    listing = auditor.get(site + "/admin/mailgov/mailbox/", timeout=30)
    assert listing.status_code == 200 and "@corp.example.test" in listing.text
    export = auditor.get(site + "/admin/mailgov/mailbox/export.csv", timeout=30)
    assert export.status_code == 200
    assert export.headers["Content-Type"].startswith("text/csv")
    assert export.text.count("@corp.example.test") >= 300
    db = sqlite3.connect(database, timeout=30)
    try:
        [mailbox_id] = db.execute(
            "SELECT id FROM mailgov_mailbox WHERE status = 'active' AND address LIKE '%@corp%'"
        ).fetchone()
    finally:
        db.close()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', listing.text).group(1)
    refused = auditor.post(
        site + "/admin/mailgov/mailbox/",
        data={
            "csrfmiddlewaretoken": token,
            "action": "revoke",
            "_selected_action": [mailbox_id],
            "index": "0",
        },
        headers={"Referer": site + "/admin/mailgov/mailbox/"},
        timeout=30,
    )
    assert refused.status_code == 403
    db = sqlite3.connect(database, timeout=30)
    try:
        [status] = db.execute(
            "SELECT status FROM mailgov_mailbox WHERE id = ?", [mailbox_id]
        ).fetchone()
    finally:
        db.close()
    assert status == "active"


# What the demo prints just before each slow step of its start: a stop there
# lands in the authorization server's migrate, in a peer's readiness wait, or in
# one of the site's manage.py commands.
STARTING = [
    "Starting the demo authorization server",
    "Starting the demo SMTP server",
    "Preparing the demo site",
    "Starting the Celery worker and beat",
]


@pytest.mark.slow
@pytest.mark.parametrize("moment", STARTING)
def test_sigterm_while_starting_stops_everything(start_demo, moment):
    demo = start_demo()
    demo.wait_for(moment)
    demo.signal_group(signal.SIGTERM)
    returncode = demo.wait()
    demo.assert_nothing_left()
    assert "Traceback" not in demo.output, demo.output
    assert "Stopping the demo" in demo.output, demo.output
    assert returncode == 0, demo.output
    assert "mailgov demo is running" not in demo.output


@pytest.mark.slow
@pytest.mark.parametrize("moment", STARTING[1:])
def test_ctrl_c_while_starting_stops_quietly(start_demo, moment):
    demo = start_demo()
    demo.wait_for(moment)
    demo.signal_group(signal.SIGINT)
    # A second Ctrl-C while it stops (an impatient user) changes nothing.
    time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError):
        demo.signal_group(signal.SIGINT)
    returncode = demo.wait()
    demo.assert_nothing_left()
    assert "Traceback" not in demo.output, demo.output
    assert "KeyboardInterrupt" not in demo.output, demo.output
    assert "Stopping the demo" in demo.output, demo.output
    assert returncode == 0, demo.output


@pytest.mark.slow
@pytest.mark.parametrize("taken", PORT_NAMES)
def test_a_taken_port_is_named_and_nothing_starts(start_demo, demo_ports, tmp_path, taken):
    port = demo_ports[taken]
    # Listening but never answering: a connect-only check would see nothing wrong.
    with socket.create_server(("127.0.0.1", port)):
        demo = start_demo()
        started = time.monotonic()
        returncode = demo.wait(30)
        elapsed = time.monotonic() - started
        output = demo.output
        assert returncode != 0, output
        assert f"port {port}" in output, output
        assert PORT_VARIABLES[taken] in output, output
        assert f"lsof -i :{port}" in output, output
        assert "Traceback" not in output, output
        assert elapsed < 15, f"took {elapsed:.1f} s:\n{output}"
        # Nothing was started or created: no var folder, no process, other ports free.
        assert not (tmp_path / "var").exists(), output
        assert not demo.leftover_processes()
        assert all(port_free(other) for name, other in demo_ports.items() if name != taken)


# -- the seeded estate and the portal's accounts (demo_seed), without the whole demo -------


@pytest.fixture
def seed(settings, authserver, demo_provider):
    """Run ``demo_seed`` against the session's authorization server; return its output."""
    settings.AUTHSERVER_URL = authserver.url

    def run(mailboxes: int = 40) -> str:
        out = io.StringIO()
        call_command(
            "demo_seed",
            "--mailboxes",
            str(mailboxes),
            "--authserver-dir",
            str(authserver.data_dir),
            stdout=out,
        )
        return out.getvalue()

    return run


@pytest.mark.slow
@pytest.mark.django_db
def test_demo_seed_gives_the_portal_data_once(seed, django_user_model):
    out = seed()
    assert "Seeded the demo estate: 40 mailboxes of corp.example.test" in out
    estate = Mailbox.objects.filter(address__endswith="@corp.example.test")
    by_status = dict(Counter(estate.values_list("status", flat=True)))
    assert by_status == {"active": 34, "revoked": 3, "needs_reconsent": 2, "suspended": 1}
    assert len({mailbox.owner_id for mailbox in estate}) == 10
    assert estate.filter(refresh_failing_days__gte=3).count() == 1
    assert estate.filter(dormant_warned_at__isnull=False).count() == 1
    # Thirty days of history, with failures; receipts; refreshes; the outbox
    # in every state but queued; a past incident on its timeline.
    logs = SendLog.objects.filter(mailbox__in=estate)
    assert logs.filter(status="failed").exists() and logs.filter(status="sent").count() > 300
    assert logs.earliest("attempted_at").attempted_at > timezone.now() - timedelta(days=31)
    assert ConsentReceipt.objects.filter(mailbox__in=estate).count() >= 40
    assert RefreshEvent.objects.filter(mailbox__in=estate, outcome="unavailable").exists()
    states = set(OutboxMessage.objects.values_list("state", flat=True))
    assert {"sent", "failed", "held"} <= states and "queued" not in states
    assert OutboxAttempt.objects.exists()
    incident = Incident.objects.get()
    assert incident.state == "resolved" and incident.timeline.count() == 5
    # Only mailboxes that can hold tokens hold them; none left for the others.
    assert not MailboxCredentials.objects.filter(
        mailbox__status__in=["revoked", "needs_reconsent"]
    ).exists()
    for mailbox in estate.filter(status__in=["active", "suspended"]):
        assert secrets_of(mailbox)[1]  # a refresh token
        assert not set(secrets_of(mailbox)) & set(out.split())

    # The portal's accounts, in the groups of mailgov's migration.
    auditor = django_user_model.objects.get(username="auditor")
    officer = django_user_model.objects.get(username="officer")
    admin = django_user_model.objects.get(username="admin")
    assert [g.name for g in auditor.groups.all()] == ["Mail auditors"]
    assert [g.name for g in officer.groups.all()] == ["Mail security officers"]
    assert auditor.is_staff and officer.is_staff and not officer.is_superuser
    assert admin.is_superuser
    assert auditor.check_password("auditor-demo-password")
    assert auditor.has_perm("mailgov.export_data")
    assert not auditor.has_perm("mailgov.govern_mailbox")

    # Once: a second run changes nothing.
    assert "already seeded" in seed()
    assert estate.count() == 40 and Incident.objects.count() == 1


@pytest.mark.slow
@pytest.mark.django_db
def test_the_demos_sweeps_leave_the_seeded_estate_alone(seed, smtp, settings):
    seed()
    estate = Mailbox.objects.filter(address__endswith="@corp.example.test")
    before = dict(estate.values_list("pk", "status"))
    warned = dict(estate.values_list("pk", "dormant_warned_at"))
    # What beat runs, once each, now.
    assert refresh_expiring(concurrency=1)["revoked"] == 0
    assert revoke_dormant() == {"revoked": 0, "warned": 0, "skipped": 0, "failed": 0}
    assert retry_revocations(due_only=True)["revoked"] == 0
    outbox.dispatch(publish_fn=lambda *args, **kwargs: 0)
    assert dict(estate.values_list("pk", "status")) == before
    assert dict(estate.values_list("pk", "dormant_warned_at")) == warned
    assert not OutboxMessage.objects.filter(state="queued").exists()

    # Their grants are real: a due refresh is a refresh at the authorization
    # server, and a send goes through the demo SMTP server as the address.
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = estate.filter(status="active", refresh_failures=0).first()
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=timezone.now())
    assert refresh_expiring(concurrency=1)["refreshed"] == 1
    send_mail("Hello", "From the seeded estate.", mailbox.address, ["z@example.test"])
    assert [m.mail_from for m in smtp.messages] == [mailbox.address]
