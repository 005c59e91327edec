"""An incident drill in a real browser: a security officer declares an
incident over one provider, freezes it, sees a queued send held in the
outbox, contains it, notifies the owners, lifts the freeze and resolves it,
all through the admin's pages, and finds every step on the timeline. Then an
auditor looks and exports, and is refused (403, nothing changed) when
posting a playbook step or a mailbox action.

The mailbox is connected through the real authorization-code flow at the
demo authorization server; a message is queued with mailgov's queued
backend, and ``mailgov.delivery.deliver()`` in this process stands in for a
worker. No page the browser saw, no export and no log holds a token of the
mailbox or the message's body.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.mail import EmailMessage, get_connection

from mailgov import incidents
from mailgov.delivery import deliver
from mailgov.exceptions import MailboxUnavailableError
from mailgov.models import AdminJob, Incident, Mailbox, MailboxCredentials, OutboxMessage
from mailgov.tokens import get_access_token
from tests.conftest import secrets_of

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# The groups' permission lists, as the data migration grants them.
GROUPS = importlib.import_module("mailgov.migrations.0006_governance_groups")
PASSWORD = "drill-password-1"
QUEUED = "mailgov.backends.queued.EmailBackend"
BODY = "Board minutes, confidential: never shown in the admin."
State = OutboxMessage.State
INCIDENTS = "/admin/mailgov/incident/"


def group(name: str, pairs: list[tuple[str, str]]) -> Group:
    """The group as the migration makes it. A transactional test's flush
    empties the groups table (the permissions come back with post_migrate,
    the groups do not), so they are made again here from its lists."""
    found, _ = Group.objects.get_or_create(name=name)
    permissions = [
        Permission.objects.get(content_type__app_label=app_label, codename=codename)
        for app_label, codename in pairs
    ]
    found.permissions.set(permissions)
    return found


def staff(username: str, group_name: str, pairs: list[tuple[str, str]]):
    user = get_user_model().objects.create_user(
        username, f"{username}@staff.test", PASSWORD, is_staff=True
    )
    user.groups.add(group(group_name, pairs))
    return user


class Browser:
    """A signed-in page that keeps every page it saw (for the secrets grep)."""

    def __init__(self, page, site: str):
        self.page = page
        self.site = site
        self.seen: list[str] = []

    def keep(self) -> str:
        content = self.page.content()
        self.seen.append(content)
        return content

    def open(self, path: str, status: int = 200) -> str:
        response = self.page.goto(self.site + path)
        assert response.status == status, (path, response.status)
        return self.keep()

    def sign_in(self, username: str) -> None:
        self.open("/admin/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_url(f"{self.site}/admin/")
        assert "Mail governance" in self.keep()

    def click(self, role: str, name: str) -> str:
        """Click a link or button and wait for the page it leads to."""
        with self.page.expect_navigation():
            self.page.get_by_role(role, name=name, exact=True).click()
        return self.keep()

    def posted_status(self, submit) -> int:
        """The status of the POST that ``submit()`` makes, once its page is there."""
        with self.page.expect_navigation() as navigation:
            submit()
        # The POST itself, not the page a redirect after it led to.
        request = navigation.value.request
        while request.redirected_from is not None:
            request = request.redirected_from
        assert request.method == "POST"
        self.keep()
        return request.response().status


def queue(sender: str, subject: str) -> str:
    message = EmailMessage(subject, BODY, sender, ["carol@example.test"])
    get_connection(QUEUED).send_messages([message])
    return message.outbox_id


def timeline_steps(page) -> list[str]:
    return [text.strip() for text in page.locator("#mg-timeline tbody th").all_inner_texts()]


@pytest.fixture
def drill(leak_check, chromium, page, live_server, connect, smtp):
    """Alice's demo mailbox (in the scope), bob's Google one (not), the
    officer and the auditor, and a browser for each."""
    alice = connect("alice")
    bob = get_user_model().objects.create_user("bob", "bob@example.test", "x")
    outside = Mailbox.objects.create(owner=bob, provider="google", address="bob@gmail.example")
    officer = staff("olivia", GROUPS.OFFICERS, GROUPS.VIEW + GROUPS.ACT)
    auditor = staff("arthur", GROUPS.AUDITORS, GROUPS.VIEW)
    context = chromium.new_context(accept_downloads=True)
    auditor_page = context.new_page()
    auditor_page.set_default_timeout(20_000)
    yield {
        "alice": alice,
        "outside": outside,
        "officer": officer,
        "auditor": auditor,
        "secrets": secrets_of(alice),
        "check_logs": leak_check,
        "officer_browser": Browser(page, live_server.url),
        "auditor_browser": Browser(auditor_page, live_server.url),
    }
    context.close()


def test_officer_drill_then_auditor_looks_and_is_refused(drill, smtp):
    alice, outside = drill["alice"], drill["outside"]
    officer = drill["officer_browser"]
    page = officer.page
    officer.sign_in("olivia")

    # Declare: one provider.
    officer.open(f"{INCIDENTS}add/")
    page.fill("#id_title", "Drill: demo provider client secret leaked")
    page.select_option("#id_severity", "critical")
    page.check("input[name=scope][value=provider]")
    page.select_option("#id_provider", "demo")
    content = officer.click("button", "Declare the incident")
    incident = Incident.objects.get()
    assert page.url == f"{officer.site}{INCIDENTS}{incident.pk}/change/"
    assert (incident.scope, incident.scope_value, incident.declared_by) == (
        "provider",
        "demo",
        drill["officer"],
    )
    assert f"Incident #{incident.pk} declared: 1 mailboxes in its scope." in content

    # Freeze, through its confirmation page: mail queued before is held.
    before = queue("alice@example.test", "Queued before the freeze")
    content = officer.click("link", "Freeze sending")
    assert "/step/freeze/" in page.url
    assert "1 mailbox (1 owners) stops sending; 1 queued messages will be held." in content
    content = officer.click("button", "Yes, freeze sending")
    assert "Sending frozen: held: 1, mailboxes: 1." in content
    assert "sending in this incident's scope is frozen" in content
    incident.refresh_from_db()
    assert incident.frozen

    # A message queued now is held by the worker's claim, not sent.
    after = queue("alice@example.test", "Queued after the freeze")
    deliver(mailbox_id=str(alice.pk))
    rows = OutboxMessage.objects.filter(pk__in=[before, after])
    assert {(row.state, row.error_code) for row in rows} == {(State.HELD, "frozen")}
    assert smtp.messages == []

    # The officer sees both held in the outbox admin.
    content = officer.open("/admin/mailgov/outboxmessage/?state__exact=held")
    assert page.locator("#result_list tbody tr").count() == 2
    assert content.count(f"frozen: incident #{incident.pk}") == 2

    # Contain: every token in the scope unusable.
    officer.open(f"{INCIDENTS}{incident.pk}/change/")
    content = officer.click("link", "Contain")
    assert "/step/contain/" in page.url
    assert "1 mailboxes (1 owners in the scope) will be revoked, 1 access tokens wiped" in content
    content = officer.click("button", "Yes, contain: end these grants")
    assert "Contained:" in content and "tokens wiped: 1" in content
    alice.refresh_from_db()
    assert alice.status == Mailbox.Status.REVOKED
    assert MailboxCredentials.objects.get(pk=alice.pk).access_token is None
    with pytest.raises(MailboxUnavailableError):
        get_access_token(alice)
    outside.refresh_from_db()
    assert outside.status == Mailbox.Status.ACTIVE  # another provider: out of scope

    # Notify: the template edited in the form, previewed, then sent.
    content = officer.click("link", "Notify the owners")
    assert "{{ mailboxes" in page.input_value("#id_body")
    page.fill("#id_subject", "Drill: your mailbox connection was ended")
    page.fill(
        "#id_body",
        "Hello {{ owner.username }},\n\nThis is a drill. We ended our access to "
        "{{ mailboxes|join:', ' }}.\nReconnect at {{ link }}\n",
    )
    content = officer.click("button", "Preview")
    assert "This is a drill. We ended our access to alice@example.test." in content
    content = officer.click("button", "Send the notices")
    assert "Owners notified:" in content
    incident.refresh_from_db()
    assert incident.notice_subject == "Drill: your mailbox connection was ended"
    assert "This is a drill." in incident.notice_body
    assert OutboxMessage.objects.filter(kind=OutboxMessage.Kind.NOTIFICATION).count() == 1

    # Lift the freeze, then resolve with a summary.
    content = officer.click("link", "Lift the freeze")
    assert "/step/unfreeze/" in page.url
    content = officer.click("button", "Yes, lift the freeze")
    assert "Freeze lifted" in content
    content = officer.click("link", "Resolve")
    page.fill("#id_summary", "Drill over: the client secret was rotated, the grants revoked.")
    content = officer.click("button", "Resolve the incident")
    assert "Resolved" in content
    incident.refresh_from_db()
    assert incident.state == Incident.State.RESOLVED
    assert not incident.frozen
    assert "This incident is resolved" in content
    assert timeline_steps(page) == [
        "Declared",
        "Froze sending",
        "Contained (tokens made unusable)",
        "Revoked the contained grants",
        "Notified owners",
        "Lifted the freeze",
        "Resolved",
    ]
    assert "Drill over: the client secret was rotated" in content
    assert [event.actor_label for event in incident.timeline.all()] == ["olivia"] * 7
    # The held mail of the contained mailbox: not lost, never sent.
    deliver(mailbox_id=str(alice.pk))
    assert set(rows.values_list("state", flat=True)) == {State.HELD}
    assert smtp.messages == []

    # -- the auditor: looks and exports ----------------------------------------------
    second = incidents.declare(title="Drill: open incident", scope="all")
    auditor = drill["auditor_browser"]
    apage = auditor.page
    auditor.sign_in("arthur")
    content = auditor.open("/admin/mailgov/governance/")
    assert "Dashboard" in content
    content = auditor.open("/admin/mailgov/mailbox/")
    assert "alice@example.test" in content and "bob@gmail.example" in content
    with apage.expect_download() as download:
        apage.get_by_role("link", name="Export as CSV").click()
    exported = Path(download.value.path()).read_text()
    auditor.seen.append(exported)
    assert exported.startswith("address,") and "alice@example.test" in exported
    content = auditor.open(f"{INCIDENTS}{incident.pk}/change/")
    assert timeline_steps(apage)[-1] == "Resolved"
    assert "This incident is resolved" in content
    content = auditor.open(f"{INCIDENTS}{second.pk}/change/")
    assert "You can look and export; the playbook's steps need" in content
    assert apage.get_by_role("link", name="Freeze sending").count() == 0
    content = auditor.open("/admin/mailgov/auditentry/")
    assert "Drill: demo provider client secret leaked" in content

    # A playbook step: its confirmation page, and a POST to it (with a valid
    # CSRF token, from the page's own sign-out form), are refused.
    auditor.open(f"{INCIDENTS}{second.pk}/step/freeze/", status=403)
    auditor.open(f"{INCIDENTS}{second.pk}/change/")
    status = auditor.posted_status(
        lambda: apage.evaluate(
            """(url) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = url;
                form.appendChild(document.querySelector("input[name=csrfmiddlewaretoken]").cloneNode());
                document.body.appendChild(form);
                form.submit();
            }""",
            f"{INCIDENTS}{second.pk}/step/freeze/",
        )
    )
    assert status == 403
    second.refresh_from_db()
    assert not second.frozen
    assert list(second.timeline.values_list("step", flat=True)) == ["declare"]

    # A mailbox action: select bob's row, choose revoke (not offered to an
    # auditor, so put into the menu as a forged request would), submit.
    auditor.open("/admin/mailgov/mailbox/")
    options = apage.locator("select[name=action] option").all_inner_texts()
    assert not any("Revoke" in option for option in options)
    apage.evaluate(
        """() => {
            const option = document.createElement("option");
            option.value = "revoke";
            option.textContent = "Revoke";
            document.querySelector("select[name=action]").appendChild(option);
        }"""
    )
    apage.check(f"input.action-select[value='{outside.pk}']")
    apage.select_option("select[name=action]", "revoke")
    status = auditor.posted_status(
        lambda: apage.get_by_role("button", name=re.compile("^Go$")).click()
    )
    assert status == 403
    outside.refresh_from_db()
    assert outside.status == Mailbox.Status.ACTIVE
    assert AdminJob.objects.filter(action="revoke").count() == 0
    # Every refusal is in the audit trail, with who tried what.
    denied = LogEntry.objects.filter(actor=drill["auditor"], object_repr__startswith="denied:")
    assert sorted(denied.values_list("object_repr", flat=True)) == [
        f"denied: freeze (incident #{second.pk})",
        f"denied: freeze (incident #{second.pk})",
        "denied: run the admin action 'revoke'",
    ]

    # No page either of them saw, no export and no log holds a token or the body.
    for text in officer.seen + auditor.seen:
        for value in [*drill["secrets"], BODY]:
            assert value not in text, "a secret or a message body reached a page"
    drill["check_logs"]([*drill["secrets"], BODY])
