"""The test SMTP server (mailgov.testing) against plain smtplib clients, no mocks.

Every test talks to a real server started on a free port, over real STARTTLS verified
against a CA made in a temporary directory; XOAUTH2 tokens are checked by a real RFC 7662
endpoint (a small http.server in a thread). None of these tests needs the database.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import itertools
import json
import logging
import mailbox
import os
import secrets
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from mailgov.testing import ca
from mailgov.testing.ca import TLSFiles, ensure_tls_files
from mailgov.testing.smtpserver import REDACTED, AuthAttempt, SubmissionServer, _TranscriptTap
from tests.conftest import wait_until

SCOPE = "mail.send"
CLIENT_ID = "smtp-relay"
# Random per run, so that grepping output for them proves something.
CLIENT_SECRET = "introspection-" + secrets.token_urlsafe(16)
ALICE = "alice@example.test"
BOB = "bob@example.test"
PASSWORD = "pw-" + secrets.token_urlsafe(16)

GOOD = "good-" + secrets.token_urlsafe(24)
NO_EMAIL = "noemail-" + secrets.token_urlsafe(24)
INACTIVE = "inactive-" + secrets.token_urlsafe(24)
WRONG_SCOPE = "scope-" + secrets.token_urlsafe(24)
OTHER_EMAIL = "other-" + secrets.token_urlsafe(24)
LONG = "long-" + secrets.token_urlsafe(2400)  # a JWT-sized token: ~3.2 KB
TOKENS: dict[str, dict] = {
    GOOD: {"active": True, "scope": f"openid email {SCOPE}", "email": ALICE.upper()},
    NO_EMAIL: {"active": True, "scope": SCOPE},
    INACTIVE: {"active": False},
    WRONG_SCOPE: {"active": True, "scope": "openid email", "email": ALICE},
    OTHER_EMAIL: {"active": True, "scope": SCOPE, "email": "mallory@example.test"},
    LONG: {"active": True, "scope": SCOPE, "email": ALICE},
}


# --- peers ------------------------------------------------------------------------------


@dataclass
class Introspection:
    """A tiny RFC 7662 endpoint: Basic client auth, form ``token=``, JSON answer."""

    url: str = ""
    calls: int = 0
    status: int = 200
    bad_client_auth: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def introspection() -> Iterator[Introspection]:
    state = Introspection()
    expected_auth = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            with state.lock:
                state.calls += 1
            if self.headers.get("Authorization") != expected_auth:
                with state.lock:
                    state.bad_client_auth += 1
                self._reply(401, {"error": "invalid_client"})
            elif state.status != 200:
                self._reply(state.status, {"error": "server_error"})
            else:
                [token] = form.get("token", [""])
                self._reply(200, TOKENS.get(token, {"active": False}))

        def _reply(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/o/introspect/"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TLSFiles:
    return ensure_tls_files(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture(scope="module")
def maildir_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("maildir") / "inbox"


@pytest.fixture(scope="module")
def running_server(tls, introspection, maildir_path) -> Iterator[SubmissionServer]:
    server = SubmissionServer(
        tls=tls,
        introspection_url=introspection.url,
        introspection_client=(CLIENT_ID, CLIENT_SECRET),
        required_scope=SCOPE,
        password_accounts={ALICE: PASSWORD},
        maildir=maildir_path,
    )
    with server:
        yield server


@pytest.fixture
def server(running_server, introspection) -> Iterator[SubmissionServer]:
    """The module's server with empty records, no faults, a healthy introspection endpoint."""
    running_server.clear()
    running_server.faults.reset()
    introspection.status = 200
    with introspection.lock:
        introspection.calls = 0
    yield running_server
    running_server.faults.reset()


# --- client helpers ---------------------------------------------------------------------


def trusting(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def plain(server: SubmissionServer, host: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP(host, server.port, timeout=10)
    client.ehlo("client.test")
    return client


def secure(server: SubmissionServer, tls: TLSFiles) -> smtplib.SMTP:
    client = plain(server)
    client.starttls(context=trusting(tls.ca_cert))
    client.ehlo("client.test")
    return client


def xoauth2(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class XOAuth2:
    """smtplib authobject: the initial response first, then an empty answer to a challenge."""

    def __init__(self, user: str, token: str) -> None:
        self.initial = xoauth2(user, token)
        self.challenges: list[bytes] = []

    def __call__(self, challenge: bytes | None = None) -> str:
        if challenge is None:
            return self.initial
        self.challenges.append(challenge)
        return ""


def message(sender: str = ALICE, subject: str = "Hello") -> bytes:
    return (
        f"From: {sender}\r\nTo: {BOB}\r\nSubject: {subject}\r\n"
        "Message-ID: <1@client.test>\r\n\r\nBody line\r\n"
        # Looks like a command; must never reach the transcript.
        f"AUTH PLAIN {b64(PASSWORD)}\r\n"
        "..leading dot\r\n"
    ).encode()


def auth_lines(server: SubmissionServer) -> list[str]:
    return [line for line in server.transcript if line.upper().startswith("AUTH")]


# --- the CA -----------------------------------------------------------------------------


def test_tls_files_are_idempotent_and_keys_private(tmp_path):
    files = ensure_tls_files(tmp_path / "tls")
    paths = [getattr(files, name) for name in TLSFiles.__dataclass_fields__]
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in paths}
    again = ensure_tls_files(tmp_path / "tls")
    assert again == files
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in paths} == before
    for key in (files.server_key, files.other_server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700

    # A missing file regenerates the whole set, CA included, so nothing is mixed.
    files.server_key.unlink()
    ensure_tls_files(tmp_path / "tls")
    assert files.ca_cert.read_bytes() != before[files.ca_cert][1]
    # Asking for other host names does too.
    ensure_tls_files(tmp_path / "tls", hostnames=("localhost", "127.0.0.1", "smtp.test"))
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "smtp.test" in san.get_values_for_type(x509.DNSName)


def test_tls_certificates(tls):
    ca_cert = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    other_ca = x509.load_pem_x509_certificate(tls.other_ca_cert.read_bytes())
    for cert_path, key_path, issuer, stranger in (
        (tls.server_cert, tls.server_key, ca_cert, other_ca),
        (tls.other_server_cert, tls.other_server_key, other_ca, ca_cert),
    ):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == cert.public_key()
        cert.verify_directly_issued_by(issuer)
        with pytest.raises((ValueError, InvalidSignature)):
            cert.verify_directly_issued_by(stranger)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert datetime.timedelta(days=700) < lifetime < datetime.timedelta(days=740)
    assert not (tls.ca_cert.parent / "ca.key").exists()  # CA keys are never written


def test_ca_name_constraints_refuse_other_hosts(tmp_path):
    """A certificate for another host from our CA is refused by the client's OpenSSL."""
    now = datetime.datetime.now(datetime.UTC)
    ca_cert, ca_key = ca._make_ca("constrained", ["localhost", "127.0.0.1"], now)
    cert, key = ca._make_server_cert(["example.com"], ca_cert, ca_key, now)
    (tmp_path / "ca.pem").write_bytes(ca._cert_pem(ca_cert))
    (tmp_path / "cert.pem").write_bytes(ca._cert_pem(cert))
    (tmp_path / "key.pem").write_bytes(ca._key_pem(key))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_side, server_side = socket.socketpair()

    def serve() -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            server_context.wrap_socket(server_side, server_side=True).close()

    thread = threading.Thread(target=serve)
    thread.start()
    with client_side, server_side:
        with pytest.raises(ssl.SSLCertVerificationError, match="subtree"):
            trusting(tmp_path / "ca.pem").wrap_socket(client_side, server_hostname="example.com")
        thread.join(10)


# --- STARTTLS and certificates ----------------------------------------------------------


def test_starttls_required_before_auth_and_mail(server):
    client = plain(server)
    assert client.has_extn("starttls")
    assert not client.has_extn("auth")  # nothing advertised in the clear
    code, _ = client.docmd("AUTH", "PLAIN " + b64(f"\0{ALICE}\0{PASSWORD}"))
    assert code == 530
    code, _ = client.docmd("MAIL", f"FROM:<{ALICE}>")
    assert code == 530
    with pytest.raises(smtplib.SMTPNotSupportedError):
        client.login(ALICE, PASSWORD)
    client.quit()
    assert server.transcript == [
        "EHLO client.test",
        "AUTH PLAIN <redacted>",
        f"MAIL FROM:<{ALICE}>",
        "QUIT",
    ]
    assert server.auth_attempts == []
    assert server.connections == 1


def test_open_and_peak_connections(server, tls):
    """Connections open at once, as a provider's per-mailbox limit counts
    them; ``clear()`` starts the peak again from those still open."""
    first, second = secure(server, tls), plain(server)
    assert wait_until(lambda: server.open_connections == 2)
    first.quit()
    assert wait_until(lambda: server.open_connections == 1)
    third = plain(server)
    assert wait_until(lambda: server.open_connections == 2)
    assert server.peak_connections == 2
    server.clear()
    assert server.peak_connections == 2  # both still open
    second.quit()
    third.quit()
    assert wait_until(lambda: server.open_connections == 0)
    server.clear()
    assert server.peak_connections == 0
    assert server.connections == 0


def test_drop_connections_closes_them_without_a_word(server, tls):
    """A server ending sessions silently: the client learns of it only when
    it next reads or writes."""
    client = secure(server, tls)
    assert wait_until(lambda: server.open_connections == 1)
    assert server.drop_connections() == 1
    assert wait_until(lambda: server.open_connections == 0)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    assert server.drop_connections() == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_certificate_verified_against_our_ca(server, tls, host):
    client = plain(server, host)
    client.starttls(context=trusting(tls.ca_cert))
    assert client.sock.version() in {"TLSv1.2", "TLSv1.3"}
    client.ehlo("client.test")
    assert client.has_extn("auth")
    assert set(client.esmtp_features["auth"].split()) == {"XOAUTH2", "PLAIN", "LOGIN"}
    assert not client.has_extn("starttls")
    client.quit()


def test_default_trust_store_refuses_our_certificate(server):
    client = plain(server)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(context=ssl.create_default_context())
    client.close()


def test_untrusted_certificate_fault(server, tls):
    server.faults.untrusted_certificate = True
    client = plain(server)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(context=trusting(tls.ca_cert))
    client.close()
    # The certificate is otherwise sound: it verifies against the CA that made it.
    client = plain(server)
    client.starttls(context=trusting(tls.other_ca_cert))
    client.quit()
    # Read per connection: switched off, the next connection is fine again.
    server.faults.untrusted_certificate = False
    secure(server, tls).quit()
    assert server.connections == 3


def test_no_starttls_fault(server, tls):
    server.faults.no_starttls = True
    client = plain(server)
    assert not client.has_extn("starttls")
    with pytest.raises(smtplib.SMTPNotSupportedError):
        client.starttls(context=trusting(tls.ca_cert))
    client.quit()
    assert auth_lines(server) == []
    # The trap is real: this server would take a password in the clear, so only the
    # client's own refusal keeps credentials off the wire.
    client = plain(server)
    assert "PLAIN" in client.esmtp_features["auth"].split()
    client.login(ALICE, PASSWORD)
    client.quit()
    assert server.auth_attempts == [AuthAttempt("PLAIN", ALICE, True)]


# --- password accounts, MAIL FROM, DATA -------------------------------------------------


def test_password_login_and_message_recorded(server, tls, maildir_path):
    client = secure(server, tls)
    client.login(ALICE, PASSWORD)
    refused = client.sendmail(ALICE, [BOB, "carol@example.test"], message())
    assert refused == {}
    client.quit()
    [received] = server.messages
    assert received.mail_from == ALICE
    assert received.rcpt_tos == [BOB, "carol@example.test"]
    assert received.auth_user == ALICE
    assert received.auth_mechanism == "PLAIN"
    assert received.received_at.tzinfo is not None
    assert received.data == message()  # smtplib dot-stuffs, the server un-stuffs
    assert received.parse()["Subject"] == "Hello"
    assert server.auth_attempts == [("PLAIN", ALICE, True)]
    # The body is one redacted entry, however command-like its lines look.
    assert server.transcript == [
        "EHLO client.test",
        "STARTTLS",
        "EHLO client.test",
        "AUTH PLAIN <redacted>",
        f"MAIL FROM:<{ALICE}> size={len(message())}",
        f"RCPT TO:<{BOB}>",
        "RCPT TO:<carol@example.test>",
        "DATA",
        "<redacted>",
        "QUIT",
    ]
    stored = [m for m in mailbox.Maildir(maildir_path, create=False) if m["Subject"] == "Hello"]
    assert stored
    assert stored[-1]["X-Mailgov-Auth-User"] == ALICE
    assert stored[-1]["X-Mailgov-Auth-Mechanism"] == "PLAIN"


def test_login_mechanism_and_wrong_password(server, tls):
    client = secure(server, tls)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.login(ALICE, PASSWORD + "x")
    assert refused.value.smtp_code == 535
    client.user, client.password = ALICE.upper(), PASSWORD
    code, _ = client.auth("LOGIN", client.auth_login)
    assert code == 235
    client.quit()
    # smtplib's login() falls back from PLAIN to LOGIN by itself.
    assert server.auth_attempts == [
        ("PLAIN", ALICE, False),
        ("LOGIN", ALICE, False),
        ("LOGIN", ALICE.upper(), True),
    ]
    # The answer to LOGIN's password challenge is redacted too.
    assert server.transcript[3:] == [
        "AUTH PLAIN <redacted>",
        "AUTH LOGIN <redacted>",
        REDACTED,
        "AUTH LOGIN <redacted>",
        REDACTED,
        "QUIT",
    ]


def test_pipelined_auth_answers_are_not_recorded(server, tls):
    """A client that sends LOGIN's answers without waiting for the challenges."""
    client = secure(server, tls)
    client.send(f"AUTH LOGIN\r\n{b64(ALICE)}\r\n{b64(PASSWORD)}\r\n".encode())
    assert [client.getreply()[0] for _ in range(3)] == [334, 334, 235]
    client.quit()
    assert server.auth_attempts == [("LOGIN", ALICE, True)]
    assert server.transcript[3:] == ["AUTH LOGIN", REDACTED, REDACTED, "QUIT"]


def test_mail_requires_auth_and_the_authenticated_address(server, tls):
    client = secure(server, tls)
    assert client.docmd("MAIL", f"FROM:<{ALICE}>")[0] == 530
    client.login(ALICE, PASSWORD)
    code, reply = client.docmd("MAIL", "FROM:<mallory@example.test>")
    assert (code, reply[:5]) == (553, b"5.7.1")
    assert client.docmd("MAIL", f"FROM:<{ALICE.upper()}>")[0] == 250  # case-insensitive
    client.quit()


def test_close_after_data_drops_the_connection(server, tls):
    server.faults.close_after_data = True
    client = secure(server, tls)
    client.login(ALICE, PASSWORD)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail(ALICE, [BOB], message(subject="Dropped"))
    client.close()
    assert server.messages == []
    [dropped] = server.dropped_messages
    assert dropped.parse()["Message-ID"] == "<1@client.test>"
    server.faults.close_after_data = False
    client = secure(server, tls)
    client.login(ALICE, PASSWORD)
    client.sendmail(ALICE, [BOB], message(subject="Retried"))
    client.quit()
    assert [m.parse()["Subject"] for m in server.messages] == ["Retried"]


# --- XOAUTH2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [GOOD, NO_EMAIL, LONG], ids=["email", "no-email", "long"])
def test_xoauth2_accepted(server, tls, introspection, token):
    client = secure(server, tls)
    authobject = XOAuth2(ALICE, token)
    code, _ = client.auth("XOAUTH2", authobject)
    assert code == 235
    assert authobject.challenges == []
    client.sendmail(ALICE, [BOB], message())
    client.quit()
    [received] = server.messages
    assert (received.auth_user, received.auth_mechanism) == (ALICE, "XOAUTH2")
    assert server.auth_attempts == [("XOAUTH2", ALICE, True)]
    assert introspection.calls == 1
    assert introspection.bad_client_auth == 0
    assert "AUTH XOAUTH2 <redacted>" in server.transcript


@pytest.mark.parametrize(
    "token",
    [INACTIVE, WRONG_SCOPE, OTHER_EMAIL, "unknown-token"],
    ids=["inactive", "wrong-scope", "other-email", "unknown"],
)
def test_xoauth2_refused_the_gmail_way(server, tls, introspection, token):
    client = secure(server, tls)
    code, challenge = client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(ALICE, token)))
    assert code == 334
    assert json.loads(base64.b64decode(challenge)) == {
        "status": "401",
        "schemes": "bearer",
        "scope": SCOPE,
    }
    code, reply = client.docmd("")  # the client's empty answer to the challenge
    assert (code, reply) == (535, b"5.7.8 Username and Password not accepted")
    # The session goes on: MAIL is still refused, a good token still works.
    assert client.docmd("MAIL", f"FROM:<{ALICE}>")[0] == 530
    assert client.auth("XOAUTH2", XOAuth2(ALICE, GOOD))[0] == 235
    client.quit()
    assert server.auth_attempts == [("XOAUTH2", ALICE, False), ("XOAUTH2", ALICE, True)]
    assert server.transcript[3:5] == ["AUTH XOAUTH2 <redacted>", REDACTED]


def test_xoauth2_mail_from_must_match(server, tls):
    client = secure(server, tls)
    client.auth("XOAUTH2", XOAuth2(ALICE, NO_EMAIL))
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        client.sendmail(BOB, [ALICE], message(sender=BOB))
    assert refused.value.smtp_code == 553
    client.quit()


def test_xoauth2_challenge_fault(server, tls, introspection):
    server.faults.xoauth2_challenge = True
    client = secure(server, tls)
    authobject = XOAuth2(ALICE, GOOD)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        client.auth("XOAUTH2", authobject)
    assert refused.value.smtp_code == 535
    assert [json.loads(c)["status"] for c in authobject.challenges] == ["401"]
    client.close()
    assert introspection.calls == 0  # refused without asking
    assert server.auth_attempts == [("XOAUTH2", ALICE, False)]


def test_xoauth2_initial_response_after_empty_challenge(server, tls):
    client = secure(server, tls)
    assert client.docmd("AUTH", "XOAUTH2") == (334, b"")
    assert client.docmd(b64(xoauth2(ALICE, GOOD)))[0] == 235
    client.quit()
    assert server.transcript[3:5] == ["AUTH XOAUTH2", REDACTED]


@pytest.mark.parametrize(
    "argument",
    [
        "not-base64!",
        b64("user=alice@example.test\x01auth=Bearer tok\x01"),  # no final \x01\x01
        b64("user=alice@example.test\x01auth=Basic tok\x01\x01"),
        b64("user=alice@example.test\r\nX-Injected: 1\x01auth=Bearer tok\x01\x01"),
        b64("auth=Bearer tok\x01\x01"),
    ],
)
def test_xoauth2_malformed(server, tls, introspection, argument):
    client = secure(server, tls)
    code, _ = client.docmd("AUTH", "XOAUTH2 " + argument)
    assert code == 501
    client.quit()
    assert introspection.calls == 0
    assert server.auth_attempts == [("XOAUTH2", None, False)]


def test_introspection_unavailable_is_a_temporary_failure(server, tls, introspection):
    introspection.status = 503
    client = secure(server, tls)
    code, reply = client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(ALICE, GOOD)))
    assert (code, reply[:5]) == (454, b"4.7.0")
    client.quit()


def test_no_xoauth2_without_introspection(tls):
    with SubmissionServer(
        tls=tls, introspection_url=None, introspection_client=None, required_scope=SCOPE
    ) as bare:
        client = secure(bare, tls)
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(ALICE, GOOD)))[0] == 504
        client.quit()
        bare.faults.xoauth2_challenge = True
        client = secure(bare, tls)
        assert client.esmtp_features["auth"].split() == ["XOAUTH2"]
        client.quit()


# A conversation as (what the client sends, what the server answers to it).
CONVERSATION: list[tuple[bytes, list[str]]] = [
    (b"EHLO x\r\n", ["250-localhost", "250 HELP"]),
    (b"AUTH PLAIN c2VjcmV0\r\n", ["535 5.7.8 no"]),
    (b"auth login\r\n", ["334 VXNlcm5hbWU6"]),
    (b"c2VjcmV0\r\n", ["334 UGFzc3dvcmQ6"]),
    (b"c2VjcmV0\r\n", ["235 2.7.0 ok"]),
    (b"mail from:<a@b>\r\n", ["250 OK"]),
    (b"DATA\r\n", ["354 go on"]),
    # A body whose lines look like commands; "x\n." is no end (DATA lines end in CRLF).
    (b"AUTH PLAIN c2VjcmV0\r\n..\r\nx\n.\r\n.\r\n", ["250 OK"]),
    (b"QUIT\r\n", ["221 Bye"]),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_transcript_tap_survives_any_split_of_the_input(chunk):
    """The server answers each command once it has fully arrived, reads come in pieces."""
    lines: list[str] = []
    tap = _TranscriptTap(lines.append)
    tap.replied("220 localhost ESMTP")
    wire = b"".join(sent for sent, _ in CONVERSATION)
    ends = list(itertools.accumulate(len(sent) for sent, _ in CONVERSATION))
    answered = 0
    for start in range(0, len(wire), chunk):
        tap.feed(wire[start : start + chunk])
        while answered < len(ends) and ends[answered] <= start + chunk:
            for reply in CONVERSATION[answered][1]:
                tap.replied(reply)
            answered += 1
    assert lines == [
        "EHLO x",
        "AUTH PLAIN <redacted>",
        "AUTH LOGIN",
        REDACTED,
        REDACTED,
        "MAIL FROM:<a@b>",
        "DATA",
        REDACTED,
        "QUIT",
    ]


def test_transcript_tap_redacts_what_is_pipelined_after_auth():
    """A client that sends AUTH answers without waiting for the challenge leaks nothing."""
    lines: list[str] = []
    tap = _TranscriptTap(lines.append)
    tap.replied("220 localhost ESMTP")
    tap.feed(b"EHLO x\r\nAUTH LOGIN\r\nc2VjcmV0\r\nc2VjcmV0\r\n")
    assert lines == ["EHLO x", "AUTH LOGIN", REDACTED, REDACTED]
    for reply in ["250 HELP", "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 ok"]:
        tap.replied(reply)
    tap.feed(b"QUIT\r\n")
    assert lines[-1] == "QUIT"


def test_transcript_tap_bounds_a_line_without_end():
    lines: list[str] = []
    tap = _TranscriptTap(lines.append)
    tap.replied("220 localhost ESMTP")
    tap.feed(b"AUTH PLAIN " + b"A" * 100_000)
    tap.feed(b"B" * 100_000 + b"\r\n")
    tap.replied("500 Command line too long")
    tap.feed(b"NOOP " + b"x" * 5000 + b"\r\n")
    assert lines[0] == "AUTH PLAIN <redacted>"
    assert lines[1].startswith("NOOP xxx") and lines[1].endswith("...[truncated]")
    assert len(lines[1]) < 1100


# --- secrets, records, lifecycle --------------------------------------------------------


def test_secrets_never_recorded_or_logged(server, tls, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    client = secure(server, tls)
    client.login(ALICE, PASSWORD)
    client.quit()
    client = secure(server, tls)
    client.user, client.password = ALICE, PASSWORD
    client.auth("LOGIN", client.auth_login)
    client.quit()
    for token in (INACTIVE, GOOD):
        client = secure(server, tls)
        with contextlib.suppress(smtplib.SMTPAuthenticationError):
            client.auth("XOAUTH2", XOAuth2(ALICE, token))
        client.quit()
    captured = capfd.readouterr()
    text = "\n".join(
        [*server.transcript, caplog.text, captured.out, captured.err]
        + [str(record.args) for record in caplog.records]
    )
    assert "AUTH XOAUTH2 <redacted>" in text  # the grep sees the transcript
    for secret in (
        PASSWORD,
        b64(PASSWORD),
        b64(f"\0{ALICE}\0{PASSWORD}"),
        CLIENT_SECRET,
        GOOD,
        INACTIVE,
        b64(xoauth2(ALICE, GOOD)),
        b64(xoauth2(ALICE, INACTIVE)),
    ):
        assert secret not in text


def test_records_are_bounded_and_cleared(tls, introspection):
    with SubmissionServer(
        tls=tls,
        introspection_url=introspection.url,
        introspection_client=(CLIENT_ID, CLIENT_SECRET),
        required_scope=SCOPE,
        password_accounts={ALICE: PASSWORD},
        max_messages=3,
    ) as small:
        assert small.connections == 0  # Controller's start-up probe is not counted
        client = secure(small, tls)
        client.login(ALICE, PASSWORD)
        for n in range(5):
            client.sendmail(ALICE, [BOB], message(subject=f"n{n}"))
        client.quit()
        assert [m.parse()["Subject"] for m in small.messages] == ["n2", "n3", "n4"]
        assert small.connections == 1
        small.clear()
        assert (small.messages, small.transcript, small.auth_attempts) == ([], [], [])
        assert small.connections == 0


def test_port_zero_binds_a_real_port_and_restart_keeps_it(tls):
    server = SubmissionServer(
        tls=tls, introspection_url=None, introspection_client=None, required_scope=SCOPE
    )
    server.start()
    port = server.port
    assert port != 0
    assert server.host == "127.0.0.1"
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with server:
        assert server.port == port
        plain(server).quit()
    # A busy port fails at once, in the caller.
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = SubmissionServer(
            port=busy.getsockname()[1],
            tls=tls,
            introspection_url=None,
            introspection_client=None,
            required_scope=SCOPE,
        )
        with pytest.raises(OSError):
            taken.start()


def test_stop_with_a_client_still_connected(tls):
    server = SubmissionServer(
        tls=tls, introspection_url=None, introspection_client=None, required_scope=SCOPE
    )
    server.start()
    client = secure(server, tls)
    server.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()


# --- command line -----------------------------------------------------------------------


def _read_line(stream, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


@pytest.mark.slow
def test_cli_runs_until_sigterm(tmp_path, tls, introspection):
    env = dict(os.environ, MAILGOV_SMTP_INTROSPECTION_SECRET=CLIENT_SECRET)
    # fmt: off
    command = [
        sys.executable, "-m", "mailgov.testing.smtpserver",
        "--port", "0", "--tls-dir", str(tls.ca_cert.parent),
        "--introspection-url", introspection.url,
        "--introspection-client-id", CLIENT_ID,
        "--required-scope", SCOPE,
        "--maildir", str(tmp_path / "maildir"),
        "--password-account", "bench@example.test:throwaway",
    ]
    # fmt: on
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = _read_line(process.stdout, timeout=30)
        assert line.startswith("SMTP server listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        client.starttls(context=trusting(tls.ca_cert))
        client.ehlo("client.test")  # smtplib's auth() never sends EHLO itself
        # The secret came from the environment: introspection accepts the server's client.
        assert client.auth("XOAUTH2", XOAuth2(ALICE, GOOD))[0] == 235
        client.sendmail(ALICE, [BOB], message())
        client.quit()
        assert len(mailbox.Maildir(tmp_path / "maildir", create=False)) == 1
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert CLIENT_SECRET not in line + out + err
    assert GOOD not in line + out + err


@pytest.mark.slow
def test_cli_stops_on_sigint(tmp_path, tls):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailgov.testing.smtpserver",
            "--port",
            "0",
            "--tls-dir",
            str(tmp_path / "tls"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _read_line(process.stdout, timeout=30).startswith("SMTP server listening on")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err


def test_cli_refuses_a_client_id_without_secret(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MAILGOV_SMTP_INTROSPECTION_SECRET"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailgov.testing.smtpserver",
            "--tls-dir",
            str(tmp_path / "tls"),
            "--introspection-url",
            "http://127.0.0.1:9/",
            "--introspection-client-id",
            CLIENT_ID,
            "--required-scope",
            SCOPE,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "MAILGOV_SMTP_INTROSPECTION_SECRET" in result.stderr


@pytest.mark.parametrize(("cache_seconds", "calls"), [(0, 3), (300, 1)])
def test_introspection_cache_is_opt_in(tls, introspection, cache_seconds, calls):
    """Off by default (a revoked token is refused at once); the benchmark turns it on."""
    with introspection.lock:
        introspection.calls = 0
    with SubmissionServer(
        tls=tls,
        introspection_url=introspection.url,
        introspection_client=(CLIENT_ID, CLIENT_SECRET),
        required_scope=SCOPE,
        introspection_cache_seconds=cache_seconds,
    ) as cached:
        for _ in range(3):
            client = secure(cached, tls)
            assert client.auth("XOAUTH2", XOAuth2(ALICE, GOOD))[0] == 235
            client.quit()
        # A refused token is never cached as accepted.
        client = secure(cached, tls)
        assert client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(ALICE, INACTIVE)))[0] == 334
        client.close()
    assert introspection.calls == calls + 1
