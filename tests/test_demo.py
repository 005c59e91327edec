"""`make demo` from nothing: every process starts, a message arrives, Ctrl-C stops all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from mailgov.testing.peers import free_port

ROOT = Path(__file__).resolve().parent.parent


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_make_demo_runs_from_nothing(tmp_path):
    ports = {name: free_port() for name in ("site", "auth", "smtp")}
    env = {
        **os.environ,
        "MAILGOV_VAR_DIR": str(tmp_path / "var"),
        "MAILGOV_DEMO_SITE_PORT": str(ports["site"]),
        "MAILGOV_DEMO_AUTH_PORT": str(ports["auth"]),
        "MAILGOV_DEMO_SMTP_PORT": str(ports["smtp"]),
    }
    for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "MAILGOV_ENCRYPTION_KEYS"):
        env.pop(name, None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "project.demo.run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in demo.stdout:
            lines.append(line)
            if "mailgov demo is running" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines)[-3000:]
        output = "".join(lines)
        assert "Generated a demo encryption key" in output
        assert "Connected alice@example.test (active)" in output
        site = f"http://127.0.0.1:{ports['site']}"
        assert requests.get(site + "/", timeout=10).status_code == 200
        discovery = requests.get(
            f"http://127.0.0.1:{ports['auth']}/.well-known/openid-configuration", timeout=10
        )
        assert discovery.json()["code_challenge_methods_supported"] == ["S256"]
        assert port_open(ports["smtp"])
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
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert demo.returncode == 0, "".join(lines)[-3000:]
    time.sleep(0.5)
    assert not any(port_open(port) for port in ports.values())
    # Nothing secret in what the demo printed beyond the documented demo passwords.
    keys = (tmp_path / "var" / "mailgov-keys.txt").read_text().split(":", 1)[1].strip()
    assert keys not in "".join(lines)
