"""The XOAUTH2 email backend against the real SMTP server and authorization server."""

from __future__ import annotations

import dataclasses
import smtplib
import socket
import sqlite3
import ssl
import threading
import time

import pytest
from auditlog.models import LogEntry
from django.core.mail import EmailMessage, get_connection, send_mail
from django.db import connection
from django.test.utils import CaptureQueriesContext

from mailgov.backends.smtp import EmailBackend, xoauth2_initial_response
from mailgov.exceptions import (
    ConsentRequiredError,
    GrantRevokedError,
    InvalidMessageError,
    MailboxUnavailableError,
    ProviderError,
    SMTPAuthenticationRejected,
    SMTPSecurityError,
)
from mailgov.models import Mailbox, MailboxCredentials, SendLog
from mailgov.providers import GoogleProvider, MicrosoftProvider, TokenResponse, get_provider
from mailgov.services import bind_mailboxes, connect_mailbox
from mailgov.signals import mailbox_needs_reconsent
from mailgov.testing.smtpserver import SubmissionServer
from mailgov.validation import DJANGO_HEADERS, _check_header_block
from tests.conftest import connect_google, secrets_of
from tests.stubs import StubReply, token_endpoint_stub
from tests.test_tokens import raised_by, refresh_tokens_issued, report_of

pytestmark = pytest.mark.django_db(transaction=True)

BACKEND = "mailgov.backends.smtp.EmailBackend"


@pytest.fixture(autouse=True)
def _backend(settings):
    settings.EMAIL_BACKEND = BACKEND


def auth_lines(server) -> list[str]:
    return [line for line in server.transcript if line.upper().startswith("AUTH")]


def test_send_mail_end_to_end(leak_check, connect, smtp):
    mailbox = connect("alice")
    assert mailbox.status == Mailbox.Status.ACTIVE
    assert mailbox.address == "alice@example.test"
    sent = send_mail("Hello", "Body text", "Alice <alice@example.test>", ["bob@example.test"])
    assert sent == 1
    [received] = smtp.messages
    assert received.auth_mechanism.upper() == "XOAUTH2"
    assert received.auth_user == "alice@example.test"
    # The envelope is the parsed addresses.
    assert received.mail_from == "alice@example.test"
    assert received.rcpt_tos == ["bob@example.test"]
    assert b"Subject: Hello" in received.data
    [log] = SendLog.objects.all()
    assert log.status == SendLog.Status.SENT
    assert log.recipient_count == 1
    assert log.message_id and log.message_id.encode() in received.data
    mailbox.refresh_from_db()
    assert mailbox.last_used_at is not None
    # Nothing secret in logs, output, or the server's transcript.
    values = secrets_of(mailbox)
    values.append(xoauth2_initial_response(mailbox.address, values[0]))
    leak_check(values)


def test_email_message_batch_one_connection_one_insert(connect, smtp):
    connect("alice")
    messages = [
        EmailMessage(
            f"Message {n}", "Body", "alice@example.test", ["bob@example.test"], bcc=["c@x.test"]
        )
        for n in range(3)
    ]
    backend = get_connection()
    with CaptureQueriesContext(connection) as queries:
        assert backend.send_messages(messages) == 3
    assert smtp.connections == 1
    assert len(auth_lines(smtp)) == 1
    inserts = [q for q in queries.captured_queries if "INSERT" in q["sql"].upper()]
    assert len(inserts) == 1 and "sendlog" in inserts[0]["sql"].lower()
    assert SendLog.objects.filter(status="sent").count() == 3
    # Bcc reaches the envelope, never the headers.
    assert smtp.messages[0].rcpt_tos == ["bob@example.test", "c@x.test"]
    assert b"c@x.test" not in smtp.messages[0].data


def test_email_message_send_single(connect, smtp):
    connect("alice")
    assert EmailMessage("One", "Body", "alice@example.test", ["bob@example.test"]).send() == 1
    assert len(smtp.messages) == 1


def test_two_senders_in_one_batch_are_grouped(connect, smtp):
    connect("alice")
    connect("bob")
    messages = [
        EmailMessage("a1", "x", "alice@example.test", ["z@x.test"]),
        EmailMessage("b1", "x", "bob@example.test", ["z@x.test"]),
        EmailMessage("a2", "x", "alice@example.test", ["z@x.test"]),
    ]
    assert get_connection().send_messages(messages) == 3
    assert smtp.connections == 2
    users = sorted(m.auth_user for m in smtp.messages)
    assert users == ["alice@example.test", "alice@example.test", "bob@example.test"]


def test_explicit_mailbox_argument(connect, smtp):
    mailbox = connect("alice")
    with get_connection(mailbox=mailbox) as backend:
        assert backend.connection is not None  # opened by __enter__
        send_mail("Hi", "x", "alice@example.test", ["z@x.test"], connection=backend)
        send_mail("Hi again", "x", "alice@example.test", ["z@x.test"], connection=backend)
    assert smtp.connections == 1
    assert len(smtp.messages) == 2
    with pytest.raises(MailboxUnavailableError, match="not the address"):
        get_connection(mailbox=mailbox.pk).send_messages(
            [EmailMessage("x", "x", "bob@example.test", ["z@x.test"])]
        )


def test_expired_token_is_refreshed_then_sent(connect, smtp):
    mailbox = connect("alice")
    old_access, old_refresh = secrets_of(mailbox)
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
    assert send_mail("After refresh", "x", "alice@example.test", ["z@x.test"]) == 1
    new_access, new_refresh = secrets_of(mailbox)
    assert new_access != old_access
    # The demo server rotates refresh tokens; the new one was saved.
    assert new_refresh != old_refresh
    mailbox.refresh_from_db()
    assert mailbox.last_refreshed_at is not None


def test_token_revoked_at_server_needs_reconsent(connect, smtp):
    mailbox = connect("alice")
    _, refresh = secrets_of(mailbox)
    assert get_provider("demo").revoke(refresh) is True
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
    fired = []
    mailbox_needs_reconsent.connect(
        lambda **kw: fired.append(kw["reason"]), weak=False, dispatch_uid="test"
    )
    try:
        with pytest.raises(GrantRevokedError):
            send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
        # Once fallen, later attempts are refused locally: no retry storm.
        with pytest.raises(MailboxUnavailableError, match="needs_reconsent"):
            send_mail("x", "x", "alice@example.test", ["z@x.test"])
    finally:
        mailbox_needs_reconsent.disconnect(dispatch_uid="test")
    assert fired == ["invalid_grant"]
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT
    credentials = MailboxCredentials.objects.get(pk=mailbox.pk)
    assert credentials.access_token is None and credentials.refresh_token is None
    entry = LogEntry.objects.get_for_object(mailbox).filter(action=LogEntry.Action.UPDATE).last()
    assert entry is not None and "status" in entry.changes_dict
    assert smtp.messages == []
    assert SendLog.objects.filter(status="failed", error_class="GrantRevokedError").count() == 1


def test_access_token_revoked_at_server_one_forced_refresh(connect, smtp, authserver):
    mailbox = connect("alice")
    access, _ = secrets_of(mailbox)
    # The stored expiry says valid; the server has expired the access token
    # (not the grant), so the SMTP server's introspection says no.
    db = sqlite3.connect(authserver.data_dir / "db.sqlite3", timeout=30)
    with db:
        db.execute(
            "UPDATE oauth2_provider_accesstoken SET expires = '2000-01-01 00:00:00' "
            "WHERE user_id = (SELECT id FROM auth_user WHERE username = 'alice')"
        )
    db.close()
    assert send_mail("Retry", "x", "alice@example.test", ["z@x.test"]) == 1
    lines = auth_lines(smtp)
    assert len(lines) == 2  # refused, then accepted with the refreshed token
    assert [a[2] for a in smtp.auth_attempts] == [False, True]
    assert secrets_of(mailbox)[0] != access


def test_xoauth2_refused_twice_needs_reconsent(connect, smtp):
    mailbox = connect("alice")
    smtp.faults.xoauth2_challenge = True
    with pytest.raises(SMTPAuthenticationRejected) as info:
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert info.value.smtp_code == 535
    assert len(auth_lines(smtp)) == 2  # one forced refresh, one retry, no more
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT
    assert mailbox.revocation_reason.startswith("smtp_auth_rejected")


def test_no_starttls_never_sends_auth(connect, smtp):
    connect("alice")
    smtp.faults.no_starttls = True
    with pytest.raises(SMTPSecurityError, match="STARTTLS"):
        # fail_silently never hides a security refusal.
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert smtp.connections == 1
    assert auth_lines(smtp) == []
    assert not any(line.upper().startswith("MAIL") for line in smtp.transcript)
    assert SendLog.objects.get().error_class == "SMTPSecurityError"


def test_untrusted_certificate_refused(connect, smtp):
    connect("alice")
    smtp.faults.untrusted_certificate = True
    with pytest.raises(ssl.SSLCertVerificationError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert auth_lines(smtp) == []
    assert smtp.messages == []


def test_connection_closed_after_data(connect, smtp):
    connect("alice")
    smtp.faults.close_after_data = True
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send_mail("x", "x", "alice@example.test", ["z@x.test"])
    log = SendLog.objects.get()
    assert log.status == SendLog.Status.FAILED
    assert log.error_class == "SMTPServerDisconnected"
    # fail_silently hides transport errors only; the failure is still logged.
    assert send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True) == 0
    assert SendLog.objects.filter(status="failed").count() == 2


INJECTIONS = [
    {"subject": "Hi\r\nBcc: evil@x.test"},
    {"subject": "Hi\nBcc: evil@x.test"},
    {"subject": "Hi\x00there"},
    {"subject": "=?utf-8?q?Hi=0D=0ABcc:_evil@x.test?="},
    {"subject": "=?utf-8?b?SGkNCkJjYzogZXZpbEB4LnRlc3Q=?="},
    {"to": ["bob@example.test\r\nBcc: evil@x.test"]},
    {"to": ["Bob\r\nBcc: evil@x.test <bob@example.test>"]},
    {"reply_to": ["r@x.test\nBcc: evil@x.test"]},
    {"from_email": "alice@example.test\r\nBcc: evil@x.test"},
    {"headers": {"X-Custom": "v\r\nBcc: evil@x.test"}},
    {"headers": {"X-Custom": "=?utf-8?q?v=0ABcc:_evil@x.test?="}},
    {"headers": {"Bad:Name": "v"}},
    {"headers": {"Bad Name": "v"}},
    {"cc": ["c@x.test\r\nBcc: evil@x.test"]},
    {"bcc": ["b@x.test\nX-Evil: 1"]},
    {"subject": "Hi\x0bthere"},
    {"subject": "Hi\x1cthere"},
    {"headers": {"X-Custom": "v\x0b"}},
    {"subject": "=?x-no-such-charset?q?hi?="},
    {"headers": {"From": "CEO <ceo@corp.test>"}},
    {"headers": {"Sender": "ceo@corp.test"}},
    {"attachment": ("evil\r\nBcc: e@x.test.txt", b"data", "text/plain")},
    {"attachment": ("f.txt", b"data", "text/plain\r\nBcc: e@x.test")},
    {"attachment": ("evil\x0bBcc: e@x.test.txt", b"data", "text/plain")},
    {"attachment": ("evil\u2028Bcc: e@x.test.txt", b"data", "text/plain")},
    {"attachment": ("=?utf-8?q?a=0D=0ABcc:_e@x.test?=", b"data", "text/plain")},
    {"attachment": ("é\r\nBcc: e@x.test.txt", b"data", "text/plain")},
    {"to": []},
    {"to": ["not-an-address"]},
    {"to": [("x" * 65) + "@example.test"]},
    {"to": ["a@" + ("d" * 250) + ".test"]},
    # From the mutation review: Unicode line breaks, and addresses over 254
    # characters whose every label is within 63 (so length alone refuses them).
    {"subject": "Hi\u2028Bcc: evil@x.test"},
    {"subject": "Hi\u2029there"},
    {"subject": "Hi\x85there"},
    {"headers": {"X-Custom": "v\u2028Bcc: evil@x.test"}},
    {"to": ["Bob\u2028Bcc: evil@x.test <bob@example.test>"]},
    {"to": ["x@" + ".".join(["d" * 60] * 5) + ".test"]},
    {"from_email": ("a" * 64) + "@" + ".".join(["d" * 60] * 4) + ".test"},
]


@pytest.mark.parametrize("change", INJECTIONS)
def test_bad_messages_refused_before_any_network_io(connect, smtp, change):
    change = dict(change)
    connect("alice")
    fields = {
        "subject": "Hi",
        "body": "x",
        "from_email": "alice@example.test",
        "to": ["bob@example.test"],
    }
    attachment = change.pop("attachment", None)
    fields.update(change)
    message = EmailMessage(**fields)
    if attachment:
        message.attach(*attachment)
    smtp.clear()
    with pytest.raises(InvalidMessageError):
        get_connection(fail_silently=True).send_messages([message])
    assert smtp.connections == 0
    assert SendLog.objects.count() == 0


def test_bad_message_in_a_batch_stops_the_whole_batch(connect, smtp):
    connect("alice")
    good = EmailMessage("ok", "x", "alice@example.test", ["b@x.test"])
    bad = EmailMessage("bad\nBcc: e@x.test", "x", "alice@example.test", ["b@x.test"])
    with pytest.raises(InvalidMessageError):
        get_connection().send_messages([good, bad])
    assert smtp.connections == 0


def test_too_many_recipients(connect, smtp, settings):
    connect("alice")
    settings.MAILGOV_PROVIDERS["demo"]["max_recipients_per_message"] = 5
    message = EmailMessage("x", "x", "alice@example.test", [f"r{n}@x.test" for n in range(6)])
    with pytest.raises(InvalidMessageError, match="limit of 5"):
        message.send()
    assert smtp.connections == 0


def test_unknown_sender(demo_provider, smtp):
    with pytest.raises(MailboxUnavailableError, match="No connected mailbox"):
        send_mail("x", "x", "nobody@example.test", ["z@x.test"], fail_silently=True)
    assert smtp.connections == 0


@pytest.mark.parametrize("status", ["suspended", "revoked", "needs_reconsent"])
def test_inactive_mailbox(connect, smtp, status):
    mailbox = connect("alice")
    Mailbox.objects.filter(pk=mailbox.pk).update(status=status)
    with pytest.raises(MailboxUnavailableError, match=status):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert smtp.connections == 0


def test_missing_send_scope(connect, smtp):
    mailbox = connect("alice")
    Mailbox.objects.filter(pk=mailbox.pk).update(scopes=["openid", "email"])
    with pytest.raises(ConsentRequiredError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert smtp.connections == 0


def test_grant_without_send_scope_is_not_active(connect, smtp):
    mailbox = connect("alice", scopes=["openid", "email"])
    assert mailbox.status == Mailbox.Status.NEEDS_RECONSENT
    with pytest.raises(MailboxUnavailableError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"])
    assert smtp.connections == 0


def test_refused_transport_is_silenced_only_when_asked(connect, smtp, settings):
    connect("alice")
    # A port nobody listens on: connection refused (a transport error).
    settings.MAILGOV_PROVIDERS["demo"]["smtp_port"] = 1
    assert send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True) == 0
    with pytest.raises(ConnectionRefusedError):
        send_mail("x", "x", "alice@example.test", ["z@x.test"])
    assert SendLog.objects.filter(error_class="ConnectionRefusedError").count() == 2


def test_timeout_is_always_set(settings):
    settings.EMAIL_TIMEOUT = None
    assert EmailBackend().timeout == 30.0
    assert EmailBackend(timeout=5).timeout == 5


def test_password_settings_are_never_used(settings):
    settings.EMAIL_HOST_USER = "someone"
    settings.EMAIL_HOST_PASSWORD = "pw"
    backend = EmailBackend()
    assert backend.username is None and backend.password is None


def test_smtp_auth_disabled_suspends_and_keeps_the_grant(connect, smtp, authserver):
    mailbox = connect("alice")
    tokens = secrets_of(mailbox)
    smtp.faults.smtp_auth_disabled = True
    before = refresh_tokens_issued(authserver, "alice")
    with pytest.raises(SMTPAuthenticationRejected):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert len(auth_lines(smtp)) == 1  # a refresh cannot cure it: no retry
    assert refresh_tokens_issued(authserver, "alice") == before
    mailbox.refresh_from_db()
    # An administrator's matter: suspended, the grant kept for when SMTP AUTH
    # is enabled again.
    assert mailbox.status == Mailbox.Status.SUSPENDED
    assert mailbox.revocation_reason.startswith("smtp_auth_disabled")
    assert secrets_of(mailbox) == tokens


def test_retry_after_a_dropped_connection_keeps_the_message_id(connect, smtp):
    connect("alice")
    message = EmailMessage("Once", "x", "alice@example.test", ["z@x.test"])
    smtp.faults.close_after_data = True
    assert message.send(fail_silently=True) == 0
    smtp.faults.close_after_data = False
    assert message.send() == 1
    [dropped] = smtp.dropped_messages
    [received] = smtp.messages
    assert dropped.parse()["Message-ID"] == received.parse()["Message-ID"]
    logs = list(SendLog.objects.order_by("attempted_at").values_list("status", "message_id"))
    assert [status for status, _ in logs] == ["failed", "sent"]
    assert logs[0][1] == logs[1][1] == received.parse()["Message-ID"]


@pytest.fixture
def other_server(authserver, tls_files):
    """A second SMTP server, configured per test."""
    servers = []

    def start(**kwargs):
        options = {
            "tls": tls_files,
            "introspection_url": authserver.metadata()["introspection_endpoint"],
            "introspection_client": (authserver.smtp_client_id, authserver.smtp_client_secret),
            "required_scope": "mail.send",
            **kwargs,
        }
        server = SubmissionServer(**options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_no_xoauth2_after_tls_is_refused(connect, other_server, settings):
    connect("alice")
    server = other_server(introspection_url=None, password_accounts={"p@x.test": "pw"})
    settings.MAILGOV_PROVIDERS["demo"]["smtp_port"] = server.port
    with pytest.raises(SMTPSecurityError, match="XOAUTH2"):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert auth_lines(server) == []


def test_certificate_for_another_host_is_refused(connect, other_server, settings):
    connect("alice")
    # Linux answers on all of 127.0.0.0/8; the certificate names only
    # localhost and 127.0.0.1.
    server = other_server(host="127.0.0.2")
    settings.MAILGOV_PROVIDERS["demo"].update(smtp_host="127.0.0.2", smtp_port=server.port)
    # Another SMTP host is another provider identity: bound on purpose here,
    # so that the certificate check is what refuses.
    assert bind_mailboxes("demo") == 1
    with pytest.raises(ssl.SSLCertVerificationError, match=r"IP address mismatch|hostname"):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert auth_lines(server) == []


def test_a_silent_server_times_out(connect, settings):
    connect("alice")
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    thread.start()
    settings.MAILGOV_PROVIDERS["demo"]["smtp_port"] = listener.getsockname()[1]
    settings.MAILGOV_SMTP_TIMEOUT_SECONDS = 1
    started = time.monotonic()
    try:
        # smtplib reports the socket timeout as a disconnection.
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            send_mail("x", "x", "alice@example.test", ["z@x.test"])
        assert time.monotonic() - started < 10
        assert send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True) == 0
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()
    assert SendLog.objects.filter(error_class="SMTPServerDisconnected").count() == 2


def test_a_from_header_naming_the_sender_is_allowed(connect, smtp):
    connect("alice")
    message = EmailMessage(
        "x", "x", "alice@example.test", ["z@x.test"], headers={"From": "Alice <ALICE@example.test>"}
    )
    assert message.send() == 1
    assert b"From: Alice <ALICE@example.test>" in smtp.messages[0].data


def test_messages_sharing_a_headers_dict_get_their_own_message_ids(connect, smtp):
    connect("alice")
    shared = {"X-Campaign": "1"}
    messages = [
        EmailMessage(f"m{n}", "x", "alice@example.test", ["z@x.test"], headers=shared)
        for n in range(3)
    ]
    assert get_connection().send_messages(messages) == 3
    ids = {m.parse()["Message-ID"] for m in smtp.messages}
    assert len(ids) == 3
    assert shared == {"X-Campaign": "1"}  # the caller's dict is left alone


def test_a_temporary_auth_failure_keeps_the_grant(connect, other_server, settings):
    mailbox = connect("alice")
    tokens = secrets_of(mailbox)
    # Introspection unreachable: the server answers 454 4.7.0 (try later).
    server = other_server(introspection_url="http://127.0.0.1:1/introspect/")
    settings.MAILGOV_PROVIDERS["demo"]["smtp_port"] = server.port
    with pytest.raises(smtplib.SMTPResponseException) as info:
        send_mail("x", "x", "alice@example.test", ["z@x.test"])
    assert info.value.smtp_code == 454
    assert not isinstance(info.value, smtplib.SMTPAuthenticationError)
    assert len(auth_lines(server)) == 1  # no forced refresh for a passing failure
    assert send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True) == 0
    mailbox.refresh_from_db()
    assert mailbox.status == Mailbox.Status.ACTIVE
    assert secrets_of(mailbox) == tokens


def test_a_suspended_mailbox_stops_an_open_connection(connect, smtp):
    mailbox = connect("alice")
    with get_connection(mailbox=mailbox) as backend:
        assert send_mail("1", "x", "alice@example.test", ["z@x.test"], connection=backend) == 1
        Mailbox.objects.filter(pk=mailbox.pk).update(status=Mailbox.Status.SUSPENDED)
        with pytest.raises(MailboxUnavailableError, match="suspended"):
            send_mail("2", "x", "alice@example.test", ["z@x.test"], connection=backend)
    assert len(smtp.messages) == 1


def _expired_tls(directory):
    """A CA and a server certificate for 127.0.0.1 that expired yesterday."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory


def test_an_expired_certificate_is_refused(connect, other_server, settings, tls_files, tmp_path):
    connect("alice")
    expired = _expired_tls(tmp_path)
    files = dataclasses.replace(
        tls_files,
        ca_cert=expired / "ca.pem",
        server_cert=expired / "server.pem",
        server_key=expired / "server.key",
    )
    server = other_server(tls=files)
    settings.MAILGOV_PROVIDERS["demo"].update(
        smtp_port=server.port, ca_bundle=str(expired / "ca.pem")
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        send_mail("x", "x", "alice@example.test", ["z@x.test"], fail_silently=True)
    assert auth_lines(server) == []


def test_an_untrusted_token_endpoint_is_never_silenced(settings, site_user, monkeypatch, tls_files):
    settings.EMAIL_BACKEND = BACKEND
    settings.MAILGOV_PROVIDERS = {"google": {"client_id": "c", "client_secret": "s"}}
    mailbox = connect_google(site_user("alice"))
    MailboxCredentials.objects.filter(pk=mailbox.pk).update(expires_at=None)
    reply = StubReply(200, {"access_token": "ya29.b", "expires_in": 3599})
    tls = (str(tls_files.other_server_cert), str(tls_files.other_server_key))
    with token_endpoint_stub(reply, tls=tls) as stub:
        monkeypatch.setattr(GoogleProvider, "token_endpoint", stub.url)
        # The stand-in is another token endpoint, hence another provider
        # identity: bound on purpose, so that the certificate is what refuses.
        assert bind_mailboxes("google") == 1
        with pytest.raises(ProviderError, match="certificate"):
            send_mail("x", "x", "alice@gmail.example", ["z@x.test"], fail_silently=True)
        assert stub.requests == []
    assert secrets_of(mailbox) == ["ya29.a", "1//r"]


# -- from the mutation review: auth replies --
class ScriptedConnection:
    """smtplib.SMTP after STARTTLS and EHLO: offers XOAUTH2, answers as scripted."""

    def __init__(self, *replies: tuple[int, bytes]):
        self.esmtp_features = {"auth": "XOAUTH2 PLAIN-CLIENTTOKEN"}
        self.replies = list(replies)
        self.commands: list[str] = []

    def docmd(self, cmd: str, args: str = "") -> tuple[int, bytes]:
        self.commands.append(cmd)
        return self.replies.pop(0)


def authenticate(*replies):
    backend = EmailBackend()
    backend.connection = connection = ScriptedConnection(*replies)
    try:
        backend._authenticate("alice@example.test", "ya29.scripted-token")
    finally:
        backend.connection = None
    return connection


def test_a_503_reply_to_auth_is_never_a_login():
    with pytest.raises(smtplib.SMTPResponseException) as info:
        authenticate((503, b"5.5.1 Bad sequence of commands"))
    assert info.value.smtp_code == 503
    # A transport error, not a refused credential: the grant is left alone.
    assert not isinstance(info.value, smtplib.SMTPAuthenticationError)


@pytest.mark.parametrize(
    "replies",
    [
        [(534, b"5.7.9 Please log in with your web browser and then try again")],
        [(535, b"5.7.8 Username and Password not accepted")],
        [(334, b"eyJzdGF0dXMiOiI0MDAifQ=="), (535, b"5.7.8 Username and Password not accepted")],
        [(334, b"eyJzdGF0dXMiOiI0MDAifQ=="), (534, b"5.7.14 Please log in")],
    ],
    ids=["534", "535", "334-then-535", "334-then-534"],
)
def test_534_and_535_are_refused_credentials(replies):
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        authenticate(*replies)
    assert info.value.smtp_code == replies[-1][0]


def test_the_json_challenge_is_answered_with_an_empty_line():
    connection = authenticate((334, b"eyJzdGF0dXMiOiI0MDAifQ=="), (235, b"2.7.0 Accepted"))
    assert connection.commands == ["AUTH", ""]


# -- from the mutation review: tls context --
@pytest.mark.parametrize("which", ["demo", "google", "microsoft"])
def test_the_tls_context_verifies_and_needs_tls_1_2(demo_provider, which):
    provider = {
        "demo": lambda: get_provider("demo"),
        "google": lambda: GoogleProvider("google", {"client_id": "c"}),
        "microsoft": lambda: MicrosoftProvider("microsoft", {"client_id": "c"}),
    }[which]()
    context = EmailBackend().ssl_context_for(provider)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- from the mutation review: header checks (more cases are in INJECTIONS) --
@pytest.mark.parametrize(
    "head",
    [
        b"Subject: Hi\r\nBcc: evil@x.test",  # a header line nobody asked for
        b"Subject: Hi\r\nX-Evil: 1",
        b"Subject: Hi\x0bthere",  # control characters in the serialized block
        b"Subject: Hi\x0cthere",
        b"Subject: Hi\x1bthere",
        b"Subject: Hi\x7fthere",
        b"Subject: Hi\rBcc: evil@x.test",  # a bare CR
    ],
)
def test_the_serialized_header_block_is_checked_on_its_own(head):
    with pytest.raises(InvalidMessageError):
        _check_header_block(head + b"\r\nTo: bob@example.test\r\n\r\nbody", DJANGO_HEADERS)


def test_the_serialized_header_block_passes_what_was_asked_for():
    data = b"Subject: Hi\r\n =?utf-8?q?caf=C3=A9?=\r\nX-Custom: v\r\n\r\nBcc: in the body is fine"
    _check_header_block(data, DJANGO_HEADERS | {"x-custom"})


def test_bcc_and_cc_count_against_the_recipient_limit(connect, smtp, settings):
    connect("alice")
    settings.MAILGOV_PROVIDERS["demo"]["max_recipients_per_message"] = 5
    message = EmailMessage(
        "x",
        "x",
        "alice@example.test",
        ["to@x.test"],
        cc=["c1@x.test", "c2@x.test"],
        bcc=[f"b{n}@x.test" for n in range(3)],
    )
    with pytest.raises(InvalidMessageError, match="6 recipients exceed"):
        message.send()
    assert smtp.connections == 0


# -- from the mutation review: open never silences security --
def test_open_never_silences_a_missing_starttls(connect, smtp):
    mailbox = connect("alice")
    smtp.faults.no_starttls = True
    backend = get_connection(mailbox=mailbox, fail_silently=True)
    with pytest.raises(SMTPSecurityError, match="STARTTLS"):
        backend.open()
    assert backend.connection is None
    assert auth_lines(smtp) == []


def test_open_never_silences_an_untrusted_certificate(connect, smtp):
    mailbox = connect("alice")
    smtp.faults.untrusted_certificate = True
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        get_connection(mailbox=mailbox, fail_silently=True),
    ):
        pass
    assert auth_lines(smtp) == []


# -- from the mutation review: provider recipient limits --
@pytest.mark.parametrize(
    ("provider_id", "scope", "limit"),
    [
        ("google", "https://mail.google.com/", 100),
        ("microsoft", "https://outlook.office.com/SMTP.Send", 500),
    ],
)
def test_built_in_recipient_limits(settings, site_user, provider_id, scope, limit):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    settings.MAILGOV_PROVIDERS = {provider_id: {"client_id": "c"}}
    connect_mailbox(
        owner=site_user("alice"),
        provider_id=provider_id,
        response=TokenResponse("a", "r", 3600, [scope]),
        address="alice@corp.example",
        requested_scopes=[],
    )
    message = EmailMessage(
        "x",
        "x",
        "alice@corp.example",
        ["to@x.test"],
        bcc=[f"r{n}@x.test" for n in range(limit)],
    )
    with pytest.raises(
        InvalidMessageError, match=f"{limit + 1} recipients exceed .* limit of {limit}"
    ):
        message.send()
    assert SendLog.objects.count() == 0


def test_a_refused_login_report_hides_the_access_token(connect, other_server, settings):
    settings.EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
    mailbox = connect("alice")
    server = other_server(introspection_url=None, password_accounts={"p@x.test": "pw"})
    settings.MAILGOV_PROVIDERS["demo"]["smtp_port"] = server.port
    exc = raised_by(lambda: send_mail("x", "x", "alice@example.test", ["z@x.test"]))
    assert isinstance(exc, SMTPSecurityError)
    report = report_of(exc)
    assert "_open_for" in report
    for token in secrets_of(mailbox):
        assert token not in report
