"""An automated accessibility check (axe-core, in Chromium) of the pages people
reach first: the demo's sign-in page (allauth's, in the demo's layout), the
mailboxes page, the consent page and the admin's sign-in page.

axe-core comes from the npm registry (``package.json`` at the repository's
root pins it, so Dependabot watches it) and is vendored under
``tests/browser/vendor/axe-core/``: the test never downloads anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from mailgov.models import ConsentReceipt, Mailbox

ROOT = Path(__file__).resolve().parents[2]
AXE = Path(__file__).resolve().parent / "vendor" / "axe-core"

#: Rules whose every violation fails, whatever axe's impact rating: the
#: language of the page and its landmarks (allauth's stock layout has
#: neither; axe rates the landmark rules "moderate").
ALWAYS = {"html-has-lang", "html-lang-valid", "landmark-one-main", "region", "bypass"}


def axe_version_in_package_json() -> str:
    return json.loads((ROOT / "package.json").read_text())["devDependencies"]["axe-core"]


def test_the_vendored_axe_is_the_version_package_json_pins():
    version = axe_version_in_package_json()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "pin an exact version"
    banner = (AXE / "axe.min.js").read_text()[:200]
    assert banner.startswith(f"/*! axe v{version}\n"), banner[:40]
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/axe-core"]["version"] == version
    # Byte for byte what Deque published for that version (its own SRI list).
    published = json.loads((AXE / "sri-history.json").read_text())[version]["axe.min.js"]
    digest = base64.b64encode(hashlib.sha256((AXE / "axe.min.js").read_bytes()).digest())
    assert f"sha256-{digest.decode()}" == published
    assert "Mozilla Public License" in (AXE / "LICENSE").read_text()


def run_axe(page) -> list[dict]:
    """axe's violations on the page as loaded."""
    page.evaluate((AXE / "axe.min.js").read_text())
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return result["violations"]


def assert_accessible(page, url: str) -> None:
    response = page.goto(url)
    page.wait_for_load_state("load")
    # The page itself, not a sign-in page it redirected to.
    assert (response.status, page.url) == (200, url)
    failing = [
        violation
        for violation in run_axe(page)
        if violation["impact"] in ("serious", "critical") or violation["id"] in ALWAYS
    ]
    report = "\n".join(
        f"{v['id']} ({v['impact']}): {v['help']}\n"
        + "\n".join(f"    {node['target']}" for node in v["nodes"][:10])
        for v in failing
    )
    assert not failing, f"axe found on {url}:\n{report}"


@pytest.fixture
def signed_in(page, live_server, site_user):
    """``page`` signed in as alice (a session made by the test client)."""

    def sign_in(username: str = "alice"):
        user = site_user(username)
        client = Client()
        client.force_login(user)
        page.context.add_cookies(
            [
                {
                    "name": settings.SESSION_COOKIE_NAME,
                    "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                    "url": live_server.url,
                }
            ]
        )
        return user

    return sign_in


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_sign_in_pages(page, live_server, allauth_demo):
    # allauth's sign-in, and its "Continue to the provider" page, in the demo's layout.
    assert_accessible(page, f"{live_server.url}/accounts/login/")
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("main").count() == 1
    assert page.get_by_role("link", name="Sign in").count() == 1
    assert_accessible(page, f"{live_server.url}/accounts/oidc/demo/login/")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_mailboxes_and_consent_pages(page, live_server, allauth_demo, connect, signed_in):
    user = signed_in("alice")
    mailbox = connect("alice")
    # Every state a row can show: active, needs re-consent (with its reason
    # and the banner), revoked; and a receipt.
    for status, address in (
        (Mailbox.Status.NEEDS_RECONSENT, "alice+old@example.test"),
        (Mailbox.Status.REVOKED, "alice+gone@example.test"),
    ):
        Mailbox.objects.create(
            owner=user,
            provider="demo",
            address=address,
            status=status,
            scopes=["mail.send"],
            revocation_reason="invalid_grant",
        )
    ConsentReceipt.objects.create(
        user=user,
        mailbox=mailbox,
        provider="demo",
        address=mailbox.address,
        capability="send_mail",
        action=ConsentReceipt.Action.GRANT,
        scopes_requested=["mail.send"],
        scopes_granted=["mail.send"],
        explanation_version=1,
    )
    assert_accessible(page, f"{live_server.url}/mailboxes/")
    assert page.get_by_role("button", name="Sign out").count() == 1
    assert_accessible(page, f"{live_server.url}/mailboxes/connect/send_mail/demo/")
    assert_accessible(page, f"{live_server.url}/mailboxes/protection/")
    assert_accessible(page, f"{live_server.url}/")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_admin_sign_in_page(page, live_server):
    assert_accessible(page, f"{live_server.url}/admin/login/")
    assert "Mail governance" in page.title()
