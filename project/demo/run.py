"""``make demo``: set up and start every demo process; stop them all on any stop.

Processes: the demo site (http://127.0.0.1:8000/), the demo authorization
server (http://127.0.0.1:8001/, django-oauth-toolkit, its own database), the
demo SMTP submission server (127.0.0.1:8025, STARTTLS + XOAUTH2, its mail
in the demo inbox), and a Celery worker and beat on kombu's filesystem
transport (the broker is a folder, ``var/broker``: nothing to install).
Everything lives in ``var/``: SQLite databases, the generated encryption key
file, the local CA, the Maildir, the broker folder and the logs. The
ports move with ``MAILGOV_DEMO_SITE_PORT``, ``MAILGOV_DEMO_AUTH_PORT`` and
``MAILGOV_DEMO_SMTP_PORT``, the folder with ``MAILGOV_VAR_DIR``.

Before starting anything, the runner checks that the three ports are free (by
binding them: a port can be held by a socket that never answers). If one is
taken it names it, says how to find and free it or choose other ports, and exits
with status 1; otherwise the new demo's readiness checks would pass on the old
servers' answers, and its first request would be refused by a server holding
other secrets.

Stopping: Ctrl-C (SIGINT), SIGTERM or SIGHUP at any moment, while the key is
generated, while a server starts, during the site's ``manage.py`` commands or
while everything runs, stops every process the demo started and prints
"Stopping the demo ..." without a traceback; a second signal while it stops is
ignored. The handlers are installed before any child starts. Every child runs in
a session of its own, so a terminal's Ctrl-C reaches only this runner, which
stops the children (SIGTERM to each group, SIGKILL after 5 s): none prints a
``KeyboardInterrupt`` traceback or races the shutdown.

Exit status: 0 after a requested stop (a signal: the demo did what was asked, and
``make`` reports no error for it), 1 if the demo could not start or one of its
servers exited on its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _leave_before_start(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    # The imports below take a fifth of a second, before main() installs the real
    # handling: a stop meanwhile has nothing to stop and must not print a
    # KeyboardInterrupt traceback.
    for _signum in STOP_SIGNALS:
        signal.signal(_signum, _leave_before_start)

from mailgov.testing.ca import ensure_tls_files  # noqa: E402
from mailgov.testing.peers import (  # noqa: E402
    PeerStartError,
    ServerProcess,
    deferred_signals,
    port_is_free,
    start_authserver,
    start_smtpserver_process,
    stop_process_group,
)
from project.demo.users import DEMO_USERS, STAFF_USERS, staff_password  # noqa: E402
from project.localsecrets import secret_from_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def _port_from_env(variable: str, default: int) -> int:
    value = os.environ.get(variable, str(default))
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise SystemExit(f"{variable}={value!r} is not a TCP port (1-65535).")
    return port


# The defaults are the README's; the environment moves them (the demo's own
# test runs it on free ports in a temporary folder).
VAR = Path(os.environ.get("MAILGOV_VAR_DIR", ROOT / "var"))
SITE_PORT = _port_from_env("MAILGOV_DEMO_SITE_PORT", 8000)
AUTH_PORT = _port_from_env("MAILGOV_DEMO_AUTH_PORT", 8001)
SMTP_PORT = _port_from_env("MAILGOV_DEMO_SMTP_PORT", 8025)

# (environment variable, port, what the demo uses it for)
PORTS = (
    ("MAILGOV_DEMO_SITE_PORT", SITE_PORT, "the demo site"),
    ("MAILGOV_DEMO_AUTH_PORT", AUTH_PORT, "the demo authorization server"),
    ("MAILGOV_DEMO_SMTP_PORT", SMTP_PORT, "the demo SMTP server"),
)


class DemoStopped(BaseException):
    """A stop signal arrived; raised by its handler to unwind ``main()`` to its cleanup.

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception``
    on the way (in Django, in requests) swallows it.
    """


class _StopHandler:
    """The handler of ``STOP_SIGNALS``: the first raises ``DemoStopped``, later ones nothing.

    Once ``stopping`` is set (by the first signal, or by ``main()`` when it begins
    to stop for another reason) a signal must not interrupt the cleanup, which is
    what stops the children: a second Ctrl-C from an impatient user, or a SIGHUP
    after the SIGINT when the terminal is closed on a stopping demo.
    """

    def __init__(self) -> None:
        self.stopping = False

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return
        self.stopping = True
        raise DemoStopped(signum)


def _say(text: str, *, error: bool = False) -> None:
    """Print, unless the terminal is gone (SIGHUP): stopping must go on regardless."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr if error else sys.stdout, flush=True)


def manage(*args: str, env: Mapping[str, str], commands: list[subprocess.Popen[bytes]]) -> None:
    """Run ``manage.py *args`` to completion; raise ``CalledProcessError`` if it fails.

    Its output goes to the terminal, but it runs in a session of its own, so a
    Ctrl-C there reaches only the runner, which stops it. The child is appended to
    ``commands`` before any stop signal can interrupt, so ``main()`` can stop it.
    """
    with deferred_signals():
        popen = subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        commands.append(popen)
    if popen.wait() != 0:
        raise subprocess.CalledProcessError(popen.returncode, ["manage.py", *args])


def taken_ports_message() -> str | None:
    """Why the demo cannot listen where it wants, with what to do; ``None`` if it can."""
    seen: dict[int, str] = {}
    for variable, port, _ in PORTS:
        if port in seen:
            return (
                f"The demo cannot start: {seen[port]} and {variable} are both {port}; "
                "each server needs a port of its own."
            )
        seen[port] = variable
    taken = [(variable, port, use) for variable, port, use in PORTS if not port_is_free(port)]
    if not taken:
        return None
    lines = ["The demo cannot start: a port it needs is already in use."]
    lines += [f"  port {port} on {HOST}, for {use} ({variable})" for variable, port, use in taken]
    lines += [
        "Another demo may still be running (from this or another checkout, or in a",
        "terminal that was closed): stop it with Ctrl-C in its terminal. To see which",
        "process holds a port, and then stop it:",
    ]
    for _, port, _ in taken:
        lines.append(f"  lsof -i :{port}    or    ss -ltnp 'sport = :{port}'")
    lines.append("Or run this demo on other ports, chosen with environment variables:")
    lines.append(
        "  " + " ".join(f"{variable}={port}" for variable, port in _other_ports()) + " make demo"
    )
    return "\n".join(lines)


def _other_ports() -> list[tuple[str, int | str]]:
    """The configured ports moved by the first step of 100 that makes all three free."""
    for offset in range(100, 1000, 100):
        moved = [(variable, port + offset) for variable, port, _ in PORTS]
        if all(port < 65536 and port_is_free(port) for _, port in moved):
            return moved
    return [(variable, "<port>") for variable, _, _ in PORTS]


def main() -> int:
    """Run the demo until a stop signal or until one of its servers exits; see the module."""
    # First, before any child exists: from here on every stop goes through the
    # cleanup below, which stops everything started so far.
    stop_handler = _StopHandler()
    stop_handler.install()
    commands: list[subprocess.Popen[bytes]] = []
    started = False
    try:
        problem = taken_ports_message()
        if problem is not None:
            _say(problem, error=True)
            return 1
        started = True
        # Nested, so that a stop signal while the failure is printed is caught too.
        try:
            return _run(commands)
        except (PeerStartError, subprocess.CalledProcessError) as exc:
            _say(f"The demo could not start: {exc}", error=True)
            return 1
    except DemoStopped:
        return 0
    finally:
        # First: from here on a stop signal is ignored, so that nothing interrupts
        # the cleanup that stops the children. Then ignored by the kernel too, which
        # lasts through the interpreter's exit (where Python restores the default
        # action of a signal with a Python handler, and a late Ctrl-C would kill it).
        stop_handler.stopping = True
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if started:
            _say("\nStopping the demo ...")
        # The one-shot commands first (they talk to the servers), then the servers,
        # newest first; ServerProcess.running() includes one whose start() was
        # interrupted before it could return its handle.
        for popen in reversed(commands):
            stop_process_group(popen)
        for server in reversed(ServerProcess.running()):
            server.stop()


def _run(commands: list[subprocess.Popen[bytes]]) -> int:
    """Set up and start everything, then wait; return 1 when a server exits by itself."""
    VAR.mkdir(exist_ok=True)
    # prometheus-client's multiprocess mode: the site, the worker and the
    # commands count into files here, summed at each scrape of /metrics.
    # Emptied at each start, as prometheus-client requires.
    metrics_dir = VAR / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "PYTHONUNBUFFERED": "1",
        "MAILGOV_VAR_DIR": str(VAR),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "MAILGOV_AUTHSERVER_URL": f"http://{HOST}:{AUTH_PORT}",
        "MAILGOV_DEMO_SMTP_PORT": str(SMTP_PORT),
        "MAILGOV_DEMO_REDIRECT_URI": f"http://{HOST}:{SITE_PORT}/demo/oauth/callback/",
    }

    key_file = VAR / "mailgov-keys.txt"
    if not key_file.exists():
        generate = ("mailgov_generate_key", "--key-id", "demo1", "--file", str(key_file))
        manage(*generate, env=env, commands=commands)
        _say(f"Generated a demo encryption key in {key_file} (mode 0600).")
    tls = ensure_tls_files(VAR / "tls")
    # Created and written in one go: a stop in between would leave an empty secret.
    with deferred_signals():
        client_secret = secret_from_file(VAR / "demo-client-secret")

    _say("Starting the demo authorization server ...")
    authserver = start_authserver(
        VAR / "authserver",
        AUTH_PORT,
        redirect_uris=[
            f"http://{HOST}:{SITE_PORT}/accounts/oidc/demo/login/callback/",
            f"http://{HOST}:{SITE_PORT}/demo/oauth/callback/",
        ],
        client_secret=client_secret,
        user_passwords={name: password for name, (_, password) in DEMO_USERS.items()},
        cwd=ROOT,
    )

    _say("Starting the demo SMTP server ...")
    smtpserver = start_smtpserver_process(
        authserver,
        port=SMTP_PORT,
        tls_dir=tls.ca_cert.parent,
        maildir=VAR / "mail",
        log_path=VAR / "smtpserver.log",
        env=env,
        cwd=ROOT,
    )

    _say("Preparing the demo site ...")
    manage("migrate", "--no-input", "-v0", env=env, commands=commands)
    # Accounts, and (the first time) a few hundred mailboxes with a history
    # for the governance portal, their grants minted by the authorization server.
    manage("demo_seed", "--authserver-dir", str(authserver.data_dir), env=env, commands=commands)
    site = ServerProcess(
        [sys.executable, "manage.py", "runserver", f"{HOST}:{SITE_PORT}", "--noreload"],
        env=env,
        log_path=VAR / "site.log",
        cwd=ROOT,
        ready_url=f"http://{HOST}:{SITE_PORT}/",
        name="site",
        port=SITE_PORT,
    ).start()
    # Background work: one Celery worker and the one beat, on kombu's
    # filesystem transport under var/broker (no broker server to install).
    _say("Starting the Celery worker and beat (broker: files in var/broker) ...")
    celery = [sys.executable, "-m", "celery", "-A", "project"]
    worker = ServerProcess(
        [*celery, "worker", "--loglevel=INFO", "--concurrency=2", "--hostname=demo@%h"],
        env=env,
        log_path=VAR / "worker.log",
        cwd=ROOT,
        name="worker",
    ).start()
    beat = ServerProcess(
        [
            *celery,
            "beat",
            "--loglevel=INFO",
            f"--schedule={VAR / 'celerybeat-schedule'}",
        ],
        env=env,
        log_path=VAR / "beat.log",
        cwd=ROOT,
        name="beat",
    ).start()
    # Connect alice's mailbox through the real authorization-code flow and
    # send one message, so the inbox shows the whole path from the start.
    manage("demo_connect", "alice", "--send-test", env=env, commands=commands)

    # The portal's accounts, one of each kind (passwords: project/demo/users.py).
    roles = {"admin": "superuser", "officer": "security officer", "auditor": "auditor"}
    staff = "\n".join(
        f"    {name} / {staff_password(name)}    ({roles.get(name, STAFF_USERS[name][3])})"
        for name in STAFF_USERS
    )
    _say(
        f"""
mailgov demo is running. Stop everything with Ctrl-C.

  Site                    http://{HOST}:{SITE_PORT}/
  Demo inbox              http://{HOST}:{SITE_PORT}/demo/inbox/
  Metrics and health      http://{HOST}:{SITE_PORT}/metrics  /health/live  /health/ready
  Mail governance (admin) http://{HOST}:{SITE_PORT}/admin/
  Authorization server    {authserver.url}/
  SMTP server             {HOST}:{SMTP_PORT} (STARTTLS, CA in {tls.ca_cert})

  Site and authorization server users:
    alice / {DEMO_USERS["alice"][1]}    bob / {DEMO_USERS["bob"][1]}
  Mail governance users (a few hundred seeded mailboxes to look at):
{staff}

  Background work:        a Celery worker and beat, broker in {VAR}/broker (files)
  Connect bob's mailbox:  .venv/bin/python manage.py demo_connect bob --send-test
  Logs:                   {VAR}/site.log, worker.log, beat.log,
                          authserver/authserver.log, smtpserver.log
"""
    )
    servers = [authserver.process, smtpserver, site, worker, beat]
    while True:
        time.sleep(0.5)
        for server in servers:
            if server.returncode is not None:
                _say(f"{server.name} exited ({server.returncode}); see its log.", error=True)
                return 1


if __name__ == "__main__":
    sys.exit(main())
