"""`make demo` from nothing: every process starts, a message arrives, any stop stops all.

The demo runs as ``python -m project.demo.run`` in a session of its own (so a
test can signal its whole process group, as a terminal does), on free ports,
with everything in a temporary ``var`` folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from mailgov.testing.peers import free_port

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
