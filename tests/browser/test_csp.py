"""The Content Security Policy in Chromium: the consent and mailbox pages and
the admin's run under it with no violation.

Chromium reports each violation on the page's console ("Refused to ...
because it violates the following Content Security Policy directive ..."),
so the test listens to the console rather than adding a script of its own.
"""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client

from tests.browser.test_consent_browser import open_consent, sign_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def violations(page) -> list[str]:
    """The CSP violations Chromium reports on ``page``'s console."""
    found: list[str] = []
    page.on(
        "console",
        lambda message: (
            found.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return found


def session_cookie(page, site: str, user) -> None:
    client = Client()
    client.force_login(user)
    page.context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": site,
            }
        ]
    )


def visit(page, url: str) -> None:
    response = page.goto(url)
    page.wait_for_load_state("load")
    assert (response.status, page.url) == (200, url)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


def test_the_console_listener_sees_a_violation(page, live_server, violations):
    # An inline style added after load is refused and reported: the other
    # tests' empty lists mean no violation, not a deaf listener.
    visit(page, f"{live_server.url}/admin/login/")
    page.evaluate(
        "() => { const s = document.createElement('style');"
        " s.textContent = 'body { color: red }'; document.head.append(s); }"
    )
    for _ in range(100):  # up to 10 s: the report arrives a moment later
        if any("style-src" in text for text in violations):
            break
        page.wait_for_timeout(100)
    assert any("style-src" in text for text in violations), violations


def test_consent_and_mailbox_pages(page, live_server, allauth_demo, connect, violations):
    site = live_server.url
    mailbox = connect("alice")
    session_cookie(page, site, mailbox.owner)
    for path in ("/", "/mailboxes/", "/mailboxes/protection/"):
        visit(page, site + path)
    visit(page, f"{site}/mailboxes/connect/send_mail/demo/")
    assert not violations, violations


def test_sign_in_and_consent_redirect_to_the_provider(
    page, live_server, allauth_demo, authserver, violations
):
    # Both forms post here and are answered by a redirect to the authorization
    # server: form-action must name it, or Chromium stops at the redirect.
    site = live_server.url
    sign_in(page, site, authserver)
    open_consent(page, site)
    page.wait_for_selector("#authorizationForm")
    page.click("button[name=allow]")
    page.wait_for_url(re.compile(re.escape(site) + "/mailboxes/"))
    assert not violations, violations


def test_admin_pages(page, live_server, connect, violations):
    site = live_server.url
    mailbox = connect("alice")
    visit(page, f"{site}/admin/login/")
    admin = get_user_model().objects.create_superuser("root", "root@staff.test", "pw")
    session_cookie(page, site, admin)
    for path in (
        "/admin/",
        "/admin/mailgov/mailbox/",
        f"/admin/mailgov/mailbox/{mailbox.pk}/change/",
        "/admin/mailgov/governance/",
        "/admin/mailgov/incident/",
        "/admin/mailgov/outboxmessage/",
    ):
        visit(page, site + path)
    assert not violations, violations
