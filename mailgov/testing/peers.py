"""Start the peers mailgov talks to (servers in their own processes) for tests and demos.

- ``ServerProcess``: a command in its own process group, its output in a log
  file, "ready" once a TCP port accepts or an HTTP URL answers 2xx. Given its
  ``port``, it refuses to start while another server holds that port, whose
  answers would otherwise pass for its own readiness.
- ``start_authserver()``: the demo OAuth2/OIDC authorization server
  (``mailgov.testing.authserver``, shipped in the package) with a fresh data
  directory, migrated and seeded.

Secrets (client secrets, passwords) reach child processes through the
environment, never the command line, which any local user can read.

Every child runs in a session of its own, so a terminal's Ctrl-C reaches only the
Python process that started it, which stops it (``stop_process_group``): no child
races that shutdown or prints a ``KeyboardInterrupt`` traceback of its own. A child
is started inside ``deferred_signals()``, so a signal handler that raises (the
default SIGINT one does) cannot strike between its start and the recording of its
handle, and leave it running unseen.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests

__all__ = [
    "AuthServer",
    "DemoUser",
    "PeerStartError",
    "PortInUseError",
    "ServerProcess",
    "deferred_signals",
    "free_port",
    "port_is_free",
    "run_command",
    "start_authserver",
    "stop_process_group",
]

LOG_TAIL_LINES = 40


class PeerStartError(RuntimeError):
    """A peer process failed to start: it exited, or was not ready in time.

    The message ends with the tail of the process's log.
    """


class PortInUseError(PeerStartError):
    """A peer's port was taken before it started, so nothing was started.

    Starting anyway would let the other server's answers pass for the peer's
    readiness. ``port`` and ``host`` name the address.
    """

    def __init__(self, name: str, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(
            f"{name}: port {port} on {host} is already in use (another server holds it)"
        )
        self.name = name
        self.port = port
        self.host = host


# Stop requests: Ctrl-C, kill's default, a closed terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, then deliver them.

    For starting a child and recording its handle as one step: a handler that
    raises (``KeyboardInterrupt``, or a program's own stop exception) between the
    two would leave the child running with nobody to stop it. The Python-level
    handlers are swapped for a recorder rather than the signals blocked, because a
    child inherits a blocked signal mask across exec and would then ignore SIGTERM.
    Signals whose handler is ``SIG_IGN`` stay ignored. Keep the block short: the
    delivery waits for it. Outside the main thread (where no handler runs) it does
    nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}

    def record(signum: int, frame: Any) -> None:
        received.append(signum)

    try:
        for signum in _STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if handler in (signal.SIG_IGN, None):  # ignored, or not set from Python
                continue
            previous[signum] = signal.signal(signum, record)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            # Runs the restored handler now; if it raises, the exception leaves the block.
            signal.raise_signal(signum)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago.

    The port is released before returning, so another process may take it first;
    ``ServerProcess`` then fails with the server's own "address in use" in its log.
    It is picked below the system's ephemeral range where the system says where
    that is (Linux), so that no outgoing connection is given it as its own
    port in the meantime: a test run opens thousands.
    """
    low = _ephemeral_low()
    if low is not None and low > _LOWEST_PICK + 1000:
        for _ in range(50):
            port = random.randrange(_LOWEST_PICK, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


#: The lowest port :func:`free_port` picks (above the common fixed services).
_LOWEST_PICK = 10000


def _ephemeral_low() -> int | None:
    """The lowest port the system gives outgoing connections, if it says."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now.

    Tried by binding, not by connecting: a port can be held by a socket that
    never answers. ``SO_REUSEADDR`` is set as servers set it, so connections left
    in TIME_WAIT by a server that just stopped do not count as holding the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process_group(popen: subprocess.Popen[Any], grace: float = 5.0) -> int:
    """Stop a child started in its own session, with everything it spawned; return its status.

    SIGTERM to its process group, SIGKILL after ``grace`` seconds. Idempotent; a
    child that already exited is only reaped.
    """
    if popen.poll() is None:
        _kill_group(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _kill_group(popen.pid, signal.SIGKILL)
            popen.wait()
    return popen.returncode


# Started and not yet stopped, by start order; weak, so that a forgotten one is
# still killed by its finalizer when collected.
_running: weakref.WeakValueDictionary[int, ServerProcess] = weakref.WeakValueDictionary()
_start_order = itertools.count()


class ServerProcess:
    """A server command run in its own process group, output appended to ``log_path``.

    Ready means: ``ready_url`` answers with a 2xx status if given, else
    ``(ready_host, ready_port)`` accepts a TCP connection if given, else merely
    started; and in each case the process still runs. ``start()`` returns only
    once ready; it raises ``PeerStartError`` (with the log tail) if the process
    exits first or ``timeout`` seconds pass, and then the process group is
    already stopped; it stops it too if interrupted (``KeyboardInterrupt``).

    ``port``, if given, is the port the server will listen on at ``ready_host``:
    ``start()`` raises ``PortInUseError`` without starting anything if another
    socket holds it, since that server's answers would pass for readiness.

    ``stop()`` sends SIGTERM to the whole group (the server and anything it
    spawned), SIGKILL after ``grace`` seconds; it is idempotent. Used as a context
    manager it starts on enter (if not yet started) and stops on exit. A process
    still running when the interpreter exits is stopped too.
    ``ServerProcess.running()`` lists those started and not yet stopped, for a
    program that must stop everything on its way out.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_url: str | None = None,
        ready_port: int | None = None,
        ready_host: str = "127.0.0.1",
        timeout: float = 30.0,
        name: str | None = None,
        port: int | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ready_url = ready_url
        self.ready_port = ready_port
        self.ready_host = ready_host
        self.timeout = timeout
        self.name = name or Path(self.args[0]).name
        self.port = port
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._order: int | None = None

    @classmethod
    def running(cls) -> list[ServerProcess]:
        """Every ``ServerProcess`` started in this interpreter and not yet stopped, oldest first.

        A process counts from the moment it is spawned, before ``start()`` returns.
        """
        return [process for _, process in sorted(_running.items())]

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        """``None`` while running (or never started), else the exit status."""
        return self.popen.poll() if self.popen is not None else None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def start(self) -> ServerProcess:
        """Start the process and wait until it is ready; see the class docstring."""
        if self.popen is not None:
            raise RuntimeError(f"{self.name} was already started")
        if self.port is not None and not port_is_free(self.port, self.ready_host):
            raise PortInUseError(self.name, self.port, self.ready_host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            with deferred_signals():
                self.popen = subprocess.Popen(
                    self.args,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    # Own session, so its group can be signalled without touching ours
                    # (and a Ctrl-C in the terminal does not race our own shutdown).
                    start_new_session=True,
                )
                self._order = next(_start_order)
                _running[self._order] = self
                # If a test forgets stop(), do not leave a server behind at exit.
                self._finalizer = weakref.finalize(
                    self, _kill_group, self.popen.pid, signal.SIGKILL
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.popen is not None
        deadline = time.monotonic() + self.timeout
        session = requests.Session()
        session.trust_env = False  # a proxy from the environment must not see 127.0.0.1
        try:
            while True:
                if self.popen.poll() is not None:
                    raise PeerStartError(
                        f"{self.name} exited with status {self.popen.returncode} before it "
                        f"was ready; log {self.log_path}:\n{self.log_tail()}"
                    )
                # Still running once ready: a server that could not bind and
                # exited must not pass for ready on another server's answer.
                if self._is_ready(session) and self.popen.poll() is None:
                    return
                if time.monotonic() > deadline:
                    raise PeerStartError(
                        f"{self.name} was not ready after {self.timeout:g} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            session.close()

    def _is_ready(self, session: requests.Session) -> bool:
        if self.ready_url is not None:
            try:
                response = session.get(self.ready_url, timeout=2, allow_redirects=False)
            except requests.RequestException:
                return False
            return 200 <= response.status_code < 300
        if self.ready_port is not None:
            try:
                with socket.create_connection((self.ready_host, self.ready_port), timeout=0.5):
                    return True
            except OSError:
                return False
        return True

    def stop(self, grace: float = 5.0) -> int | None:
        """Stop the process group; return the exit status (``None`` if never started)."""
        if self.popen is None:
            if self._log is not None:  # interrupted before it was spawned
                self._log.close()
                self._log = None
            return None
        stop_process_group(self.popen, grace)
        if self._order is not None:
            _running.pop(self._order, None)
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def __enter__(self) -> ServerProcess:
        if self.popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_command(
    args: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> None:
    """Run a one-shot command to completion, output appended to ``log_path``.

    Raises ``PeerStartError`` with the log tail if it fails or times out. The
    command runs in its own session; if it times out or the wait is interrupted
    (``KeyboardInterrupt``, any exception a signal handler raises), its process
    group is stopped before the exception leaves.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(args)}\n".encode())
        log.flush()
        popen: subprocess.Popen[bytes] | None = None
        try:
            with deferred_signals():
                popen = subprocess.Popen(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                )
            returncode = popen.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(popen)
            raise PeerStartError(
                f"{' '.join(args[:4])} timed out after {timeout:g} s; "
                f"log {log_path}:\n{_tail(log_path)}"
            ) from None
        except BaseException:
            if popen is not None:
                stop_process_group(popen)
            raise
    if returncode != 0:
        raise PeerStartError(
            f"{' '.join(args[:4])} failed with status {returncode}; "
            f"log {log_path}:\n{_tail(log_path)}"
        )


@dataclass(frozen=True)
class DemoUser:
    """A user account on the demo authorization server."""

    username: str
    password: str
    email: str


@dataclass
class AuthServer:
    """A running demo authorization server (see ``start_authserver``).

    ``url`` is the issuer, without a trailing slash; ``users`` maps username to
    ``DemoUser`` (``alice``, ``bob``). ``client_id``/``client_secret`` are the
    confidential authorization-code client (the mailgov site), registered with
    ``redirect_uris``; ``smtp_client_id``/``smtp_client_secret`` the
    client-credentials client that introspects tokens.

    ``set_faults(token=503, revoke=503)`` makes those endpoints fail until
    ``clear_faults()`` (or use ``with server.faults(token=503):``), for tests of
    what a provider outage does.
    """

    url: str
    data_dir: Path
    client_id: str
    client_secret: str = field(repr=False)
    smtp_client_id: str
    smtp_client_secret: str = field(repr=False)
    users: dict[str, DemoUser] = field(repr=False)
    process: ServerProcess
    redirect_uris: list[str] = field(default_factory=list)

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def metadata(self, timeout: float = 10) -> dict[str, Any]:
        """The discovery document, fetched now."""
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(self.discovery_url, timeout=timeout)
            response.raise_for_status()
            return response.json()

    @property
    def faults_path(self) -> Path:
        """The fault switch the server reads (see :mod:`mailgov.testing.authserver.faults`)."""
        return self.data_dir / "faults.json"

    def set_faults(self, *, token: int | None = None, revoke: int | None = None) -> None:
        """Make the token and/or revocation endpoint answer ``token``/``revoke``
        (an HTTP status such as ``503``, with ``{"error": "temporarily_unavailable"}``)
        from the next request on; ``None`` leaves that endpoint working. Replaces
        any faults set before."""
        faults = {
            name: status
            for name, status in (("token", token), ("revoke", revoke))
            if status is not None
        }
        for name, status in faults.items():
            if not isinstance(status, int) or not 400 <= status <= 599:
                raise ValueError(f"{name}: an HTTP error status (400-599), not {status!r}")
        # Written beside and renamed into place: the server never reads half a file.
        tmp = self.faults_path.with_name(f".faults.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(faults), encoding="utf-8")
        os.replace(tmp, self.faults_path)

    def clear_faults(self) -> None:
        """Every endpoint works again, from the next request on."""
        self.faults_path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def faults(self, *, token: int | None = None, revoke: int | None = None) -> Iterator[None]:
        """``set_faults(...)`` for the block, ``clear_faults()`` after it."""
        self.set_faults(token=token, revoke=revoke)
        try:
            yield
        finally:
            self.clear_faults()

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> AuthServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_authserver(
    data_dir: Path,
    port: int | None = None,
    *,
    redirect_uris: list[str],
    access_token_seconds: int | None = None,
    python: str = sys.executable,
    settings_module: str = "mailgov.testing.authserver.settings",
    cwd: Path | None = None,
    client_id: str = "mailgov-demo",
    client_secret: str | None = None,
    smtp_client_id: str = "mailgov-smtp",
    smtp_client_secret: str | None = None,
    fast_hashing: bool = True,
    user_passwords: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> AuthServer:
    """Migrate, seed and serve the demo authorization server on ``127.0.0.1:port``.

    ``data_dir`` holds its database, keys and ``authserver.log`` (created if
    missing; reusing one keeps its users and tokens). ``port`` defaults to a free
    one; a given ``port`` that is taken raises ``PortInUseError`` before anything
    runs. Client secrets and user passwords (``user_passwords``, by username) are
    random unless given, and returned in the ``AuthServer``. ``fast_hashing`` (on
    by default: this is a throw-away server) stores them with MD5 rather than
    PBKDF2, which otherwise costs about 0.3 s per client authentication. The
    server runs with ``python -m django`` in ``cwd`` (default: the working
    directory), so it needs no ``manage.py``. Returns once the discovery
    document answers 200; the caller stops it with ``.stop()`` or a ``with``
    block. Raises ``PeerStartError`` (with the log tail) on failure.
    """
    if port and not port_is_free(port):
        # Before migrating: no point in preparing a server that cannot listen.
        raise PortInUseError("authserver", port)
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # A fault switch left behind by a crashed test must not make a new
    # server fail from its first request.
    (data_dir / "faults.json").unlink(missing_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    passwords = dict(user_passwords or {})
    users = {
        name: DemoUser(
            name, passwords.get(name) or secrets.token_urlsafe(16), f"{name}@example.test"
        )
        for name in ("alice", "bob")
    }
    client_secret = client_secret or secrets.token_urlsafe(32)
    smtp_client_secret = smtp_client_secret or secrets.token_urlsafe(32)

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": settings_module,
        "PYTHONUNBUFFERED": "1",
        "MAILGOV_AUTHSERVER_DIR": str(data_dir),
        "MAILGOV_AUTHSERVER_URL": url,
        "MAILGOV_DEMO_CLIENT_ID": client_id,
        "MAILGOV_DEMO_CLIENT_SECRET": client_secret,
        "MAILGOV_DEMO_REDIRECT_URIS": " ".join(redirect_uris),
        "MAILGOV_SMTP_CLIENT_ID": smtp_client_id,
        "MAILGOV_SMTP_CLIENT_SECRET": smtp_client_secret,
        "MAILGOV_DEMO_ALICE_PASSWORD": users["alice"].password,
        "MAILGOV_DEMO_BOB_PASSWORD": users["bob"].password,
    }
    if fast_hashing:
        env["MAILGOV_AUTHSERVER_INSECURE_FAST_HASHING"] = "1"
    else:
        env.pop("MAILGOV_AUTHSERVER_INSECURE_FAST_HASHING", None)
    if access_token_seconds is not None:
        env["MAILGOV_AUTHSERVER_ACCESS_TOKEN_SECONDS"] = str(access_token_seconds)
    else:
        env.pop("MAILGOV_AUTHSERVER_ACCESS_TOKEN_SECONDS", None)

    log_path = data_dir / "authserver.log"
    # python -m django, not manage.py: the server ships inside mailgov, so a
    # project that installed mailgov[testing] can start it from anywhere.
    manage = [python, "-m", "django"]
    settings_arg = f"--settings={settings_module}"
    run_command(
        [*manage, "migrate", "--no-input", "-v0", settings_arg],
        log_path=log_path,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    run_command(
        [*manage, "authserver_seed", settings_arg],
        log_path=log_path,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    process = ServerProcess(
        [*manage, "runserver", f"127.0.0.1:{port}", "--noreload", settings_arg],
        log_path=log_path,
        env=env,
        cwd=cwd,
        ready_url=f"{url}/.well-known/openid-configuration",
        timeout=timeout,
        name="authserver",
        port=port,
    ).start()
    return AuthServer(
        url=url,
        data_dir=data_dir,
        client_id=client_id,
        client_secret=client_secret,
        smtp_client_id=smtp_client_id,
        smtp_client_secret=smtp_client_secret,
        users=users,
        process=process,
        redirect_uris=list(redirect_uris),
    )


def start_smtpserver_process(
    authserver: AuthServer,
    *,
    port: int,
    tls_dir: Path,
    log_path: Path,
    required_scope: str = "mail.send",
    maildir: Path | None = None,
    password_accounts: Mapping[str, str] | None = None,
    introspection_cache_seconds: float = 0,
    env: Mapping[str, str] | None = None,
    python: str = sys.executable,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start ``python -m mailgov.testing.smtpserver`` against ``authserver``.

    Tokens are checked at the authorization server's introspection endpoint
    with its SMTP client, whose secret reaches the process by environment.
    ``password_accounts`` (address to password) enable PLAIN/LOGIN for
    throw-away accounts, e.g. to measure Django's stock backend. Returns once
    the port accepts connections; raises ``PortInUseError`` if it was taken before.
    """
    args = [
        python,
        "-m",
        "mailgov.testing.smtpserver",
        "--port",
        str(port),
        "--tls-dir",
        str(tls_dir),
        "--introspection-url",
        authserver.metadata()["introspection_endpoint"],
        "--introspection-client-id",
        authserver.smtp_client_id,
        "--required-scope",
        required_scope,
    ]
    if maildir is not None:
        args += ["--maildir", str(maildir)]
    for address, password in (password_accounts or {}).items():
        args += ["--password-account", f"{address}:{password}"]
    if introspection_cache_seconds:
        args += ["--introspection-cache-seconds", str(introspection_cache_seconds)]
    return ServerProcess(
        args,
        env={
            **(env if env is not None else os.environ),
            "MAILGOV_SMTP_INTROSPECTION_SECRET": authserver.smtp_client_secret,
        },
        log_path=log_path,
        cwd=cwd,
        ready_port=port,
        name="smtpserver",
        port=port,
    ).start()
