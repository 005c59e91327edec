"""The README's screenshots, taken from the demo: ``.venv/bin/python -m tests.browser.screenshots``.

It starts the demo as ``make demo`` does (``python -m project.demo.run``),
but in a temporary folder and on free ports, so a demo already running is
left alone. Then Debian's Chromium (``/usr/bin/chromium``, or
``MAILGOV_CHROMIUM``), driven by Playwright, signs in as the demo admin,
walks through the README's walkthrough (an incident drill over a few of the
seeded mailboxes: declare, freeze, contain, notify, resolve) and saves
1280-pixel-wide PNGs in ``docs/screenshots/`` (``--out`` elsewhere). While
the incident is frozen, the demo auditor signs in beside the admin and looks
at it; the script checks that a playbook step is refused to them (403). The
demo is stopped on the way out, whatever happens.

A documentation tool, not a test: pytest does not collect it (``make test``
does not run it). It takes a minute or two, most of it the demo's start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from mailgov.testing.peers import free_port, stop_process_group
from project.demo.users import staff_password

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "screenshots"
CHROMIUM = Path(os.environ.get("MAILGOV_CHROMIUM", "/usr/bin/chromium"))
VIEWPORT = {"width": 1280, "height": 800}
#: The tallest screenshot, in pixels.
MAX_HEIGHT = 1600
#: The admin's navigation sidebar closed (its own switch, kept in local
#: storage), so that the pages' content has the width.
CLOSED_SIDEBAR = "localStorage.setItem('django.admin.navSidebarIsOpen', 'false');"
#: What the demo prints once everything runs.
READY = "mailgov demo is running"
#: The seeded mailboxes the drill's incident is about.
SCOPE = ["billing@corp.example.test", "billing-eu@corp.example.test", "invoices@corp.example.test"]
INCIDENTS = "/admin/mailgov/incident/"


class Demo:
    """``python -m project.demo.run`` in a temporary folder, on free ports."""

    def __init__(self, var: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "MAILGOV_VAR_DIR": str(var),
            "MAILGOV_DEMO_SITE_PORT": str(self.port),
            "MAILGOV_DEMO_AUTH_PORT": str(free_port()),
            "MAILGOV_DEMO_SMTP_PORT": str(free_port()),
        }
        # The demo's own settings, database and keys; never the caller's.
        for name in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "MAILGOV_ENCRYPTION_KEYS"):
            env.pop(name, None)
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "project.demo.run"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, stopped as a whole
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not any(READY in line for line in self.lines):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("The demo did not start:\n" + "".join(self.lines[-40:]))
            time.sleep(0.5)

    def stop(self) -> None:
        """Ctrl-C, as a terminal sends it; the runner stops every process it started."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                stop_process_group(self.popen)


@contextlib.contextmanager
def running_demo() -> Iterator[Demo]:
    with tempfile.TemporaryDirectory(prefix="mailgov-screenshots-") as folder:
        demo = Demo(Path(folder) / "var")
        try:
            print(f"Starting the demo in {folder} (a minute or two) ...", flush=True)
            demo.wait_ready()
            yield demo
        finally:
            demo.stop()


class Shots:
    """A signed-in page of the demo, and where its screenshots go."""

    def __init__(self, page: Page, site: str, out: Path) -> None:
        self.page = page
        self.site = site
        self.out = out

    def open(self, path: str, status: int = 200) -> None:
        response = self.page.goto(self.site + path)
        if response is None or response.status != status:
            got = response.status if response else None
            raise SystemExit(f"{path}: HTTP {got}, expected {status}")

    def click(self, role: str, name: str) -> None:
        with self.page.expect_navigation():
            self.page.get_by_role(role, name=name, exact=True).click()

    def sign_in(self, username: str) -> None:
        self.open("/admin/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", staff_password(username))
        self.click("button", "Log in")

    def save(self, name: str, *, down_to: str | None = None, around: str | None = None) -> None:
        """A 1280-wide PNG, ``name``.png: the viewport; or the page from its
        top down to the bottom of the element ``down_to``; or the band of the
        page around the element ``around`` (at most ``MAX_HEIGHT`` high)."""
        path = self.out / f"{name}.png"
        element = down_to or around
        if element is None:
            self.page.screenshot(path=path, full_page=False)
        else:
            box = self.page.locator(element).bounding_box()
            top = 0 if down_to else max(int(box["y"]) - 16, 0)
            bottom = int(box["y"] + box["height"]) + 24
            clip = {
                "x": 0,
                "y": top,
                "width": VIEWPORT["width"],
                "height": min(bottom - top, MAX_HEIGHT),
            }
            self.page.screenshot(path=path, full_page=True, clip=clip)
        print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


def take(shots: Shots, auditor: Shots) -> None:
    page = shots.page
    shots.sign_in("admin")
    shots.save("admin-index")

    shots.open("/admin/mailgov/governance/")
    shots.save("dashboard")
    shots.save("dashboard-sending", around="section[aria-labelledby=mg-h-sends]")

    # The inventory, filtered to the active mailboxes, with the filters beside it.
    shots.open("/admin/mailgov/mailbox/?status=active")
    shots.save("mailboxes")
    with page.expect_navigation():
        page.locator("#result_list tbody tr th a").first.click()
    shots.save("mailbox")

    # The drill: declare an incident over three mailboxes, freeze, contain,
    # notify, resolve.
    shots.open(f"{INCIDENTS}add/")
    page.fill("#id_title", "Billing mailboxes: tokens in a leaked log file")
    page.select_option("#id_severity", "high")
    page.check("input[name=scope][value=mailboxes]")
    page.fill("#id_targets", "\n".join(SCOPE))
    shots.click("button", "Declare the incident")
    incident = page.url.removeprefix(shots.site)
    shots.click("link", "Freeze sending")
    shots.save("incident-freeze")
    shots.click("button", "Yes, freeze sending")

    # Meanwhile the auditor looks at the frozen incident: no playbook for
    # them, and a step's page is refused.
    auditor.sign_in("auditor")
    auditor.open(incident)
    auditor.save("auditor-incident")
    auditor.open(f"{incident.removesuffix('change/')}step/freeze/", status=403)

    shots.click("link", "Contain")
    shots.click("button", "Yes, contain: end these grants")
    shots.click("link", "Notify the owners")
    shots.click("button", "Send the notices")
    shots.click("link", "Resolve")
    page.fill(
        "#id_summary",
        "The log file was deleted from the bucket; the three grants were revoked and "
        "their owners told to reconnect.",
    )
    shots.click("button", "Resolve the incident")
    shots.save("incident-timeline", down_to="#mg-timeline")

    shots.open("/admin/mailgov/auditentry/")
    shots.save("audit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"No Chromium at {CHROMIUM} (apt-get install chromium).", file=sys.stderr)
        return 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with running_demo() as demo, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            pages = []
            for _ in ("admin", "auditor"):
                context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
                context.add_init_script(CLOSED_SIDEBAR)
                page = context.new_page()
                page.set_default_timeout(30_000)
                pages.append(Shots(page, demo.url, out))
            print(f"Screenshots of {demo.url}:", flush=True)
            take(*pages)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
