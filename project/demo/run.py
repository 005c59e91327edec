"""``make demo``: set up and start every demo process; stop them all on Ctrl-C.

Processes: the demo site (http://127.0.0.1:8000/), the demo authorization
server (http://127.0.0.1:8001/, django-oauth-toolkit, its own database) and
the demo SMTP submission server (127.0.0.1:8025, STARTTLS + XOAUTH2, its mail
in the demo inbox). Everything lives in ``var/``: SQLite databases, the
generated encryption key file, the local CA, the Maildir and the logs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailgov.testing.ca import ensure_tls_files
from mailgov.testing.peers import (
    PeerStartError,
    ServerProcess,
    start_authserver,
    start_smtpserver_process,
)
from project.demo.users import DEMO_USERS
from project.localsecrets import secret_from_file

ROOT = Path(__file__).resolve().parents[2]
# The defaults are the README's; the environment moves them (the demo's own
# test runs it on free ports in a temporary folder).
VAR = Path(os.environ.get("MAILGOV_VAR_DIR", ROOT / "var"))
SITE_PORT = int(os.environ.get("MAILGOV_DEMO_SITE_PORT", "8000"))
AUTH_PORT = int(os.environ.get("MAILGOV_DEMO_AUTH_PORT", "8001"))
SMTP_PORT = int(os.environ.get("MAILGOV_DEMO_SMTP_PORT", "8025"))


def manage(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True)


def main() -> int:
    VAR.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "PYTHONUNBUFFERED": "1",
        "MAILGOV_VAR_DIR": str(VAR),
        "MAILGOV_AUTHSERVER_URL": f"http://127.0.0.1:{AUTH_PORT}",
        "MAILGOV_DEMO_SMTP_PORT": str(SMTP_PORT),
        "MAILGOV_DEMO_REDIRECT_URI": f"http://127.0.0.1:{SITE_PORT}/demo/oauth/callback/",
    }
    processes: list = []

    key_file = VAR / "mailgov-keys.txt"
    if not key_file.exists():
        manage("mailgov_generate_key", "--key-id", "demo1", "--file", str(key_file), env=env)
        print(f"Generated a demo encryption key in {key_file} (mode 0600).")
    tls = ensure_tls_files(VAR / "tls")
    client_secret = secret_from_file(VAR / "demo-client-secret")

    try:
        print("Starting the demo authorization server ...")
        authserver = start_authserver(
            VAR / "authserver",
            AUTH_PORT,
            redirect_uris=[
                f"http://127.0.0.1:{SITE_PORT}/accounts/oidc/demo/login/callback/",
                f"http://127.0.0.1:{SITE_PORT}/demo/oauth/callback/",
            ],
            client_secret=client_secret,
            user_passwords={name: password for name, (_, password) in DEMO_USERS.items()},
            cwd=ROOT,
        )
        processes.append(authserver)

        print("Starting the demo SMTP server ...")
        processes.append(
            start_smtpserver_process(
                authserver,
                port=SMTP_PORT,
                tls_dir=tls.ca_cert.parent,
                maildir=VAR / "mail",
                log_path=VAR / "smtpserver.log",
                env=env,
                cwd=ROOT,
            )
        )

        print("Preparing the demo site ...")
        manage("migrate", "--no-input", "-v0", env=env)
        manage("demo_seed", env=env)
        processes.append(
            ServerProcess(
                [sys.executable, "manage.py", "runserver", f"127.0.0.1:{SITE_PORT}", "--noreload"],
                env=env,
                log_path=VAR / "site.log",
                cwd=ROOT,
                ready_url=f"http://127.0.0.1:{SITE_PORT}/",
                name="site",
            ).start()
        )
        # Connect alice's mailbox through the real authorization-code flow and
        # send one message, so the inbox shows the whole path from the start.
        manage("demo_connect", "alice", "--send-test", env=env)
    except (PeerStartError, subprocess.CalledProcessError) as exc:
        print(f"The demo could not start: {exc}", file=sys.stderr)
        for process in reversed(processes):
            process.stop()
        return 1

    print(
        f"""
mailgov demo is running. Stop everything with Ctrl-C.

  Site                    http://127.0.0.1:{SITE_PORT}/
  Demo inbox              http://127.0.0.1:{SITE_PORT}/demo/inbox/
  Admin                   http://127.0.0.1:{SITE_PORT}/admin/
  Authorization server    {authserver.url}/
  SMTP server             127.0.0.1:{SMTP_PORT} (STARTTLS, CA in {tls.ca_cert})

  Site and authorization server users:
    alice / {DEMO_USERS["alice"][1]}    bob / {DEMO_USERS["bob"][1]}
  Site administrator:     admin / admin-demo-password

  Connect bob's mailbox:  .venv/bin/python manage.py demo_connect bob --send-test
  Logs:                   {VAR}/site.log, authserver/authserver.log, smtpserver.log
"""
    )
    stop = False

    def request_stop(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stop:
            time.sleep(0.5)
            for process in processes:
                proc = getattr(process, "process", process)
                if proc.returncode is not None:
                    print(f"{proc.name} exited ({proc.returncode}); see its log.", file=sys.stderr)
                    stop = True
    finally:
        print("\nStopping the demo ...")
        for process in reversed(processes):
            process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
