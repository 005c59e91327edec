"""A real SMTP submission server for tests and the demo (needs ``mailgov[testing]``).

It behaves like the submission ports of Gmail and Exchange Online in the ways that
matter to a sending client, and records what it saw so a test can assert on it:

- STARTTLS is required before AUTH and MAIL (``530`` otherwise); the certificate comes
  from the local CA of :mod:`mailgov.testing.ca`, so clients verify it for real.
- AUTH is advertised only after TLS: ``XOAUTH2`` (when an introspection endpoint is
  configured), plus ``PLAIN LOGIN`` when password accounts are given.
- XOAUTH2 bearer tokens are validated with RFC 7662 token introspection: the token must be
  ``active``, carry ``required_scope`` and, if the response names an ``email``, belong to
  the ``user=`` of the XOAUTH2 string. A refusal follows Gmail: ``334`` with a base64 JSON
  error, the client's empty answer, then ``535 5.7.8``.
- ``MAIL FROM`` must be the authenticated address (``553 5.7.1`` otherwise).
- Faults (:class:`Faults`) can be switched on and off while the server runs.

Nothing secret is ever recorded or logged: the transcript keeps ``AUTH <mechanism>`` but
replaces every AUTH payload, every answer to a ``334`` challenge and every message body
with ``<redacted>``.

Run it as a program for the demo and the benchmark::

    python -m mailgov.testing.smtpserver --port 8025 --tls-dir var/tls \\
        --introspection-url http://127.0.0.1:8000/o/introspect/ \\
        --introspection-client-id smtp --introspection-client-secret-file var/smtp-secret \\
        --required-scope smtp.send --maildir var/maildir
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import datetime
import email
import email.message
import email.policy
import enum
import hashlib
import hmac
import json
import logging
import mailbox
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import requests
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

from mailgov.testing.ca import DEFAULT_HOSTNAMES, TLSFiles, ensure_tls_files

__all__ = [
    "REDACTED",
    "AuthAttempt",
    "Faults",
    "ReceivedMessage",
    "SubmissionServer",
    "main",
]

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
XOAUTH2 = "XOAUTH2"

# In-memory records are bounded so that a demo server left running for days does not
# grow without limit; the oldest entries are dropped first.
MAX_MESSAGES = 10_000
MAX_TRANSCRIPT_LINES = 100_000
MAX_AUTH_ATTEMPTS = 10_000

# RFC 4954 section 4: an AUTH command line may be 12288 octets long. aiosmtpd allows 512
# (and its stream reader 1001), too short for a JWT access token of a couple of kilobytes.
AUTH_LINE_LIMIT = 12_288

DEFAULT_INTROSPECTION_TIMEOUT_SECONDS = 5.0
DEFAULT_READY_TIMEOUT_SECONDS = 10.0
SECRET_ENV_VAR = "MAILGOV_SMTP_INTROSPECTION_SECRET"

# SASL mechanism names the transcript may show after "AUTH"; anything else in that position
# could be a client's misplaced credential and is redacted as well.
_KNOWN_MECHANISMS = frozenset(
    {
        "ANONYMOUS",
        "CRAM-MD5",
        "DIGEST-MD5",
        "EXTERNAL",
        "GSSAPI",
        "LOGIN",
        "NTLM",
        "OAUTHBEARER",
        "PLAIN",
        "SCRAM-SHA-1",
        "SCRAM-SHA-256",
        "XOAUTH",
        XOAUTH2,
    }
)
_ENVELOPE_KEYWORDS = {"MAIL": "FROM:", "RCPT": "TO:"}
# Control characters and white space: never allowed in an XOAUTH2 user or token, nor in a
# password account's name (the user ends up in a Maildir header).
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f]")


# --- public records ---------------------------------------------------------------------


@dataclass
class Faults:
    """Failure modes of the server; flip the attributes at any time while it runs.

    ``no_starttls`` and ``untrusted_certificate`` are read when a connection is accepted,
    ``no_pipelining`` at each EHLO, ``xoauth2_challenge`` and ``smtp_auth_disabled`` at
    each AUTH, ``close_at_rcpt`` at each RCPT and ``close_after_data`` at the end of each
    DATA.

    The server advertises PIPELINING (RFC 2920), as Gmail and Microsoft 365 do: aiosmtpd
    reads commands from a stream and answers them in order, so a client may send MAIL,
    RCPT and DATA in one write.

    - ``no_starttls``: STARTTLS is not offered and AUTH is advertised and accepted in the
      clear, so a test can prove the client refuses to send credentials anyway.
    - ``untrusted_certificate``: STARTTLS presents a certificate from another CA
      (``TLSFiles.other_server_cert``).
    - ``xoauth2_challenge``: every AUTH XOAUTH2 is refused the Gmail way (334 with the JSON
      error, then 535) without asking the introspection endpoint.
    - ``no_pipelining``: EHLO does not advertise PIPELINING (a server that does not
      offer it), so a client must wait for each reply.
    - ``close_at_rcpt``: the connection is dropped without a reply when a ``RCPT TO``
      arrives (after ``MAIL FROM`` was answered): a server that goes away in the middle
      of a pipelined flight.
    - ``close_after_data``: once the message data has been received the connection is
      dropped without a reply; the message goes to ``dropped_messages``, not ``messages``.
    - ``smtp_auth_disabled``: every AUTH XOAUTH2 gets Microsoft's ``535 5.7.139`` (SMTP
      AUTH disabled for the tenant), which no refresh or re-consent can cure.
    - ``data_reply``: when set (a whole reply line such as ``"421 4.7.0 Try again
      later"`` or ``"550 5.4.5 Daily user sending limit exceeded."``), the end of each
      DATA is answered with it instead of ``250`` and the message is not kept; a
      ``421`` reply also closes the connection, as RFC 5321 says it must.
      ``data_reply_count`` limits it to that many messages (0: every message).
    - ``rcpt_replies``: ``{address: reply}``; ``RCPT TO`` for that address (any case)
      is answered with the reply (``"450 4.2.1 Try later"``), the others accepted.
    """

    no_starttls: bool = False
    untrusted_certificate: bool = False
    no_pipelining: bool = False
    close_at_rcpt: bool = False
    xoauth2_challenge: bool = False
    close_after_data: bool = False
    smtp_auth_disabled: bool = False
    data_reply: str = ""
    data_reply_count: int = 0
    rcpt_replies: dict[str, str] = field(default_factory=dict)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The on/off fault names, as accepted by the ``--fault`` option."""
        return tuple(f.name for f in fields(cls) if f.type in (bool, "bool"))

    def reset(self) -> None:
        """Switch every fault off."""
        for item in fields(self):
            default = {} if item.name == "rcpt_replies" else item.default
            setattr(self, item.name, default)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server received it.

    ``data`` is the message exactly as sent after DATA (CRLF line ends, dot-stuffing
    removed). ``auth_user`` is the authenticated address and ``auth_mechanism`` one of
    ``XOAUTH2``, ``PLAIN``, ``LOGIN``. ``received_at`` is timezone-aware UTC.
    ``mail_options`` are the parameters of MAIL FROM (``SIZE=1234``, ``BODY=8BITMIME``).
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    auth_user: str
    auth_mechanism: str
    received_at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )
    mail_options: tuple[str, ...] = ()

    def parse(self) -> email.message.EmailMessage:
        """The message parsed with the modern ``email`` policy (headers decoded)."""
        message = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message


class AuthAttempt(NamedTuple):
    """One AUTH exchange: mechanism, claimed user (``None`` if unparseable), outcome."""

    mechanism: str
    user: str | None
    success: bool


# --- internals --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    """What a successful AUTH leaves in ``session.auth_data``."""

    user: str
    mechanism: str


class _Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    # The introspection endpoint could not answer: a temporary failure (454), which a
    # client must not mistake for a revoked grant.
    UNAVAILABLE = "unavailable"


def _transcript_line(line: bytes) -> str:
    """One received command line as the transcript shows it.

    The verb, and the ``FROM:``/``TO:`` of MAIL and RCPT, are upper-cased (clients differ:
    Python 3.13's smtplib sends ``mail from:``); AUTH keeps only a known mechanism name.
    """
    text = line.rstrip(b"\r").decode("utf-8", "backslashreplace")
    words = text.split(maxsplit=2)
    if not words:
        return ""
    verb = words[0].upper()
    if verb == "AUTH":
        shown = ["AUTH"]
        if len(words) > 1:
            mechanism = words[1].upper()
            shown.append(mechanism if mechanism in _KNOWN_MECHANISMS else REDACTED)
        if len(words) > 2 and shown[-1] != REDACTED:
            shown.append(REDACTED)
        return " ".join(shown)
    rest = text.strip()[len(words[0]) :]
    argument = rest.lstrip()
    keyword = _ENVELOPE_KEYWORDS.get(verb, "")
    if keyword and argument[: len(keyword)].upper() == keyword:
        argument = keyword + argument[len(keyword) :]
    return verb + rest[: len(rest) - len(argument)] + argument


class _TranscriptTap:
    """Cuts the bytes a client sends into lines the way aiosmtpd reads them, and records them.

    aiosmtpd has no hook that sees every command line (lines refused before dispatch, such
    as AUTH before STARTTLS, never reach a handler), so the protocol feeds its raw input
    here, and every reply line it sends to ``replied()``. Lines are split on LF, and on
    CRLF inside message data, as aiosmtpd's reader does.

    What a line is follows the server's replies: after ``354`` the bytes are message data
    up to a lone ``.``. A line that arrives while an AUTH command has had no final reply
    yet may be the answer to a ``334`` challenge, so it is redacted; this also covers a
    client that sends its answers without waiting for the challenge (over-redacting what
    such a client pipelines after AUTH, never leaking it).
    """

    # Longest prefix of one line kept while waiting for its end; enough to see the verb
    # and the AUTH mechanism, bounded so a client cannot make the server buffer megabytes.
    _KEEP = 1024
    _MARK = b"...[truncated]"

    def __init__(self, record: Callable[[str], None]) -> None:
        self._record = record
        self._pending = b""
        self._in_data = False
        self._greeted = False
        # Verbs of the commands received and not yet given their final reply, oldest first.
        self._unanswered: collections.deque[str] = collections.deque()

    @property
    def in_data(self) -> bool:
        """True between a ``354`` reply and the lone ``.`` that ends the message."""
        return self._in_data

    def reset(self) -> None:
        """TLS has started: aiosmtpd discards the plaintext it had not read, so do we."""
        self._pending = b""
        self._unanswered.clear()

    def replied(self, reply: str) -> None:
        """The server is about to send the reply line ``reply``."""
        code, separator = reply[:3], reply[3:4]
        if code == "354":
            self._in_data = True
        elif separator == "-" or code == "334":
            pass  # a continuation line or an AUTH challenge: the command is not done yet
        elif not self._greeted:
            self._greeted = True  # the 220 greeting answers no command
        elif self._unanswered:
            self._unanswered.popleft()

    def feed(self, data: bytes) -> None:
        """Bytes received from the client (already decrypted after STARTTLS)."""
        buffer = self._pending + data if self._pending else data
        position = 0
        while True:
            if self._in_data:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                if end - position == 1 and buffer[position] == 0x2E:  # a lone "."
                    self._record(REDACTED)
                    self._in_data = False
                position = end + 2
                continue
            end = buffer.find(b"\n", position)
            if end < 0:
                break
            if "AUTH" in self._unanswered:
                self._record(REDACTED)
            else:
                line = buffer[position:end]
                if len(line) > self._KEEP + len(self._MARK):
                    line = line[: self._KEEP] + self._MARK
                shown = _transcript_line(line)
                self._record(shown)
                self._unanswered.append(shown.partition(" ")[0])
            position = end + 1
        rest = buffer[position:]
        if self._in_data:
            # Only "is this line a lone dot?" matters: keep a stand-in that is not, plus the
            # last byte in case it is the CR of a CRLF split across two reads.
            if len(rest) > 2:
                rest = b"xx" + rest[-1:]
        elif len(rest) > self._KEEP + len(self._MARK):
            rest = rest[: self._KEEP] + self._MARK
        self._pending = rest


def _parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """``(user, token)`` from ``user={address}\\x01auth=Bearer {token}\\x01\\x01``, or None."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\x01\x01"):
        return None
    values: dict[str, str] = {}
    for part in text[:-2].split("\x01"):
        key, separator, value = part.partition("=")
        if not separator or key in values:
            return None
        values[key] = value
    user = values.get("user", "")
    scheme, _, token = values.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not user or not token:
        return None
    if _UNSAFE_CHARS.search(user) or _UNSAFE_CHARS.search(token):
        return None
    return user, token


def _server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound in the caller's thread so that errors surface at once."""
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address[:2], family=family)


class _QuietSession(Session):
    # aiosmtpd sets ``session.login_data`` after every successful AUTH through a deprecated
    # property that logs a warning each time; a plain attribute keeps the logs readable.
    login_data = None


class _SubmissionSMTP(SMTP):
    """One client connection (aiosmtpd creates a protocol object per connection).

    Beware when extending: aiosmtpd treats every attribute named ``auth_*`` of this class
    and of the handler as an AUTH mechanism, and every ``handle_*`` of the handler as a hook.
    """

    # aiosmtpd clears this class-level dict in every __init__ and adds to it on every EHLO;
    # our own class attribute absorbs that, and each connection gets its own dict below.
    command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
    # The stream reader takes its limit from this attribute during __init__; it must admit
    # a full AUTH line. DATA lines get the RFC 5321 limit back right after __init__.
    line_length_limit = AUTH_LINE_LIMIT + 2

    def __init__(self, handler: _SubmissionHandler, *, owner: SubmissionServer, **kwargs: Any):
        self._owner = owner
        #: A client's connection, counted in ``open_connections`` and ``peak_connections``.
        self.counted = False
        self._tap = _TranscriptTap(owner._record_line)
        super().__init__(handler, **kwargs)
        self.line_length_limit = SMTP.line_length_limit
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"AUTH": AUTH_LINE_LIMIT}
        )

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            self._tap.reset()  # the TLS layer is up
        else:
            self._owner._connection_opened(self)
            # asyncio turns Nagle off only for sockets created with
            # proto=IPPROTO_TCP, and socket.create_server() leaves proto 0. Without
            # this, each multi-line reply (EHLO) stalls ~40 ms on the client's
            # delayed ACK, which would dominate any benchmark against this server.
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._connection_closed(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        # After STARTTLS the SSL protocol hands the decrypted bytes to this same method.
        self._tap.feed(data)
        super().data_received(data)

    async def push(self, status: str | bytes) -> None:
        # Every reply line goes through here (challenge_auth() included), before it is
        # written, so the tap knows the state before the client can react to it.
        self._tap.replied(
            status.decode("ascii", "replace") if isinstance(status, bytes) else status
        )
        await super().push(status)

    def abort(self) -> None:
        """Drop the connection at once (no reply, no TLS close_notify)."""
        if self.transport is not None:
            self.transport.abort()

    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        """AUTH XOAUTH2, with the initial response on the command line or after a ``334``."""
        owner = self._owner
        blob: bytes | None
        if len(args) == 1:
            answer = await self.challenge_auth(b"", encode_to_b64=False)
            if answer is MISSING:  # "*" or bad base64: challenge_auth replied 501 already
                owner._record_auth(XOAUTH2, None, False)
                return AuthResult(success=False, handled=True)
            blob = answer
        else:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                blob = None
        credentials = _parse_xoauth2(blob) if blob is not None else None
        if credentials is None:
            owner._record_auth(XOAUTH2, None, False)
            return AuthResult(
                success=False, handled=False, message="501 5.5.2 Malformed XOAUTH2 response"
            )
        user, token = credentials
        if owner.faults.smtp_auth_disabled:
            owner._record_auth(XOAUTH2, user, False)
            return AuthResult(
                success=False,
                handled=False,
                message="535 5.7.139 Authentication unsuccessful, "
                "SmtpClientAuthentication is disabled for the Tenant.",
            )
        if owner.faults.xoauth2_challenge:
            verdict = _Verdict.REJECT
        else:
            # requests is blocking; the loop serves the other connections meanwhile.
            verdict = await self.loop.run_in_executor(None, owner._introspect, user, token)
        owner._record_auth(XOAUTH2, user, verdict is _Verdict.ACCEPT)
        if verdict is _Verdict.ACCEPT:
            return AuthResult(success=True, auth_data=_Identity(user, XOAUTH2))
        if verdict is _Verdict.UNAVAILABLE:
            return AuthResult(
                success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
            )
        # Gmail's refusal: a 334 challenge carrying the error as base64 JSON; the client
        # answers with an empty line and only then receives the 535.
        answer = await self.challenge_auth(owner._challenge_json())
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )


class _SubmissionHandler:
    """aiosmtpd hooks; deliberately nothing else (see the note on ``_SubmissionSMTP``)."""

    def __init__(self, owner: SubmissionServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With this hook present aiosmtpd leaves recording the client's name to us.
        session.host_name = hostname
        # No mechanism at all (no introspection, no password accounts): say nothing rather
        # than advertise an empty "AUTH" line.
        lines = [line for line in responses if line.strip() != "250-AUTH"]
        if not self._owner.faults.no_pipelining:
            # Before the last line ("250 HELP"), which ends the reply.
            lines.insert(len(lines) - 1, "250-PIPELINING")
        return lines

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        identity = session.auth_data if session.authenticated else None
        if not isinstance(identity, _Identity):
            return "530 5.7.0 Authentication required"
        if address.casefold() != identity.user.casefold():
            return "553 5.7.1 Sender address rejected: not owned by the authenticated user"
        # A MAIL hook that answers takes over what aiosmtpd would otherwise do itself.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._owner.faults.close_at_rcpt:
            assert isinstance(server, _SubmissionSMTP)
            server.abort()
            raise asyncio.CancelledError
        replies = {key.casefold(): value for key, value in self._owner.faults.rcpt_replies.items()}
        reply = replies.get(address.casefold())
        if reply:
            return reply
        # A RCPT hook that answers takes over what aiosmtpd would otherwise do itself.
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        identity = session.auth_data
        assert isinstance(identity, _Identity)  # handle_MAIL admits nobody else
        assert envelope.mail_from is not None
        assert isinstance(envelope.original_content, bytes)
        message = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            auth_user=identity.user,
            auth_mechanism=identity.mechanism,
            mail_options=tuple(envelope.mail_options),
        )
        owner = self._owner
        if owner.faults.close_after_data:
            owner._record_dropped(message)
            assert isinstance(server, _SubmissionSMTP)
            server.abort()
            # Leave without a reply: this is how aiosmtpd's own code ends a session whose
            # connection went away (it closes the writer and lets the task end cancelled).
            raise asyncio.CancelledError
        reply = owner._take_data_reply()
        if reply:
            if reply.startswith("421"):
                assert isinstance(server, _SubmissionSMTP)
                await server.push(reply)
                server.abort()
                raise asyncio.CancelledError
            return reply
        owner._accept(message)
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # Expected whenever a client rejects our certificate; aiosmtpd closes the
            # connection itself and sends nothing.
            logger.info("TLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS not available"
        logger.error("Error in SMTP session", exc_info=error)
        return "451 4.3.0 Local error in processing"


# --- the server -------------------------------------------------------------------------


class SubmissionServer(Controller):
    """A STARTTLS + XOAUTH2 submission server running on a background thread.

    ``tls`` comes from :func:`mailgov.testing.ca.ensure_tls_files`. Tokens are checked by
    POSTing ``token=...`` to ``introspection_url`` (RFC 7662) with HTTP Basic
    ``introspection_client`` (``(client_id, secret)``), verifying TLS against
    ``introspection_ca`` or the default trust store. Without ``introspection_url`` the
    server does not offer XOAUTH2 at all (unless the ``xoauth2_challenge`` fault is on).
    ``password_accounts`` maps an address to its password and enables PLAIN and LOGIN.
    With ``maildir`` every accepted message is also stored in that ``mailbox.Maildir``.

    ``port=0`` picks a free port; ``.port`` holds the real one once started, and a server
    that is stopped and started again binds the same port. Use it as a context manager
    or call ``start()`` and ``stop()``. The record properties return copies and may be
    read from any thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: TLSFiles,
        introspection_url: str | None,
        introspection_client: tuple[str, str] | None,
        required_scope: str,
        introspection_ca: str | None = None,
        password_accounts: dict[str, str] | None = None,
        maildir: Path | None = None,
        faults: Faults | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_SECONDS,
        introspection_timeout: float = DEFAULT_INTROSPECTION_TIMEOUT_SECONDS,
        introspection_cache_seconds: float = 0,
        max_messages: int = MAX_MESSAGES,
    ) -> None:
        super().__init__(
            _SubmissionHandler(self), hostname=host, port=port, ready_timeout=ready_timeout
        )
        # Controller made an event loop already; each start() makes its own (a stopped
        # loop cannot be reused), so this one is closed rather than left to leak.
        self.loop.close()
        self.faults = faults if faults is not None else Faults()
        self.tls = tls
        # Both contexts are built now so that a missing or broken file fails here, not
        # in the middle of a client's handshake.
        self._tls_context = _server_tls_context(tls.server_cert, tls.server_key)
        self._other_tls_context = _server_tls_context(tls.other_server_cert, tls.other_server_key)
        self.introspection_url = introspection_url
        self.required_scope = required_scope
        self._introspection_client = introspection_client
        self._introspection_verify: str | bool = introspection_ca or True
        self._introspection_timeout = introspection_timeout
        # Off by default: tests need a revoked token refused at once. The
        # benchmark turns it on, since a provider validates its own tokens
        # without a network round trip and the figure should measure clients.
        self._introspection_cache_seconds = introspection_cache_seconds
        self._introspection_cache: dict[tuple[str, str], float] = {}
        self._password_accounts = self._check_accounts(password_accounts or {})
        self._maildir_path = Path(maildir) if maildir is not None else None
        self._maildir: mailbox.Maildir | None = None
        self._listen_socket: socket.socket | None = None
        self._ready = False

        self._lock = threading.Lock()
        self._messages: collections.deque[ReceivedMessage] = collections.deque(maxlen=max_messages)
        self._dropped: collections.deque[ReceivedMessage] = collections.deque(maxlen=max_messages)
        self._transcript: collections.deque[str] = collections.deque(maxlen=MAX_TRANSCRIPT_LINES)
        self._auth_attempts: collections.deque[AuthAttempt] = collections.deque(
            maxlen=MAX_AUTH_ATTEMPTS
        )
        self._connections = 0
        # Client connections open now, and the most open at once (under the lock).
        self._open = 0
        self._peak = 0
        # Live connections, touched only on the event loop's thread.
        self._live: set[_SubmissionSMTP] = set()

    @staticmethod
    def _check_accounts(accounts: dict[str, str]) -> dict[str, tuple[str, bytes]]:
        checked: dict[str, tuple[str, bytes]] = {}
        for address, password in accounts.items():
            if not address or _UNSAFE_CHARS.search(address):
                raise ValueError(f"Invalid password account name: {address!r}")
            checked[address.casefold()] = (address, password.encode("utf-8"))
        return checked

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self.hostname

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._thread is not None

    def start(self) -> None:
        """Bind, start the event loop thread and wait until the server answers.

        Raises ``OSError`` at once if the port cannot be bound, ``RuntimeError`` if
        already running, ``TimeoutError`` if the server does not answer in ``ready_timeout``.
        """
        if self._thread is not None:
            raise RuntimeError("SubmissionServer is already running")
        self._listen_socket = _bind(self.hostname, self.port)
        self.port = self._listen_socket.getsockname()[1]
        if self._maildir_path is not None:
            self._maildir = mailbox.Maildir(self._maildir_path, create=True)
        self.loop = asyncio.new_event_loop()
        self._ready = False
        try:
            super().start()
        except BaseException:
            if self._thread is not None:
                super().stop(no_assert=True)
            if not self.loop.is_closed():
                self.loop.close()
            self._listen_socket.close()
            raise
        # Controller.start() opened one connection to wake the server; not a client's.
        self._ready = True

    def stop(self, no_assert: bool = False) -> None:
        """Drop open connections and stop the thread; does nothing if not running."""
        if self._thread is None:
            return
        # Python 3.12+ makes Server.wait_closed() wait for open connections; a client that
        # keeps a session open must not hold up stop().
        self.loop.call_soon_threadsafe(self._abort_connections)
        super().stop(no_assert=no_assert)
        self._listen_socket = None
        self._ready = False

    def __enter__(self) -> SubmissionServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- aiosmtpd Controller hooks --------------------------------------------------------

    def _create_server(self) -> Any:
        # Serve the socket bound in start(): the real port is known before the thread runs
        # and Controller's start-up probe connects to it.
        return self.loop.create_server(self._factory_invoker, sock=self._listen_socket)

    def factory(self) -> _SubmissionSMTP:
        """Build the protocol for one new connection (called by aiosmtpd per connection).

        The faults that shape a connection are read here, so toggling them affects the
        next connection.
        """
        faults = self.faults
        secure = not faults.no_starttls
        if not secure:
            tls_context = None
        elif faults.untrusted_certificate:
            tls_context = self._other_tls_context
        else:
            tls_context = self._tls_context
        excluded: list[str] = []
        if not self._password_accounts:
            excluded += ["PLAIN", "LOGIN"]
        if self.introspection_url is None and not faults.xoauth2_challenge:
            excluded.append(XOAUTH2)
        if self._ready:
            with self._lock:
                self._connections += 1
        protocol = _SubmissionSMTP(
            self.handler,
            owner=self,
            tls_context=tls_context,
            require_starttls=secure,
            auth_require_tls=secure,
            auth_exclude_mechanism=excluded,
            authenticator=self._check_password,
            # A fixed name: aiosmtpd would otherwise call socket.getfqdn() per connection.
            hostname="localhost",
            ident="mailgov.testing ESMTP",
            enable_SMTPUTF8=True,
            decode_data=False,
            loop=self.loop,
        )
        # Controller's start-up probe is no client's connection.
        protocol.counted = self._ready
        return protocol

    # -- records --------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Accepted messages, oldest first (the most recent ``max_messages``)."""
        with self._lock:
            return list(self._messages)

    @property
    def dropped_messages(self) -> list[ReceivedMessage]:
        """Messages received under ``close_after_data``: never acknowledged to the client."""
        with self._lock:
            return list(self._dropped)

    @property
    def transcript(self) -> list[str]:
        """Every line received from any client, in order, with secrets as ``<redacted>``.

        Commands appear as sent with the verb upper-cased (``"MAIL FROM:<a@b>"``);
        ``AUTH`` keeps its mechanism only (``"AUTH XOAUTH2 <redacted>"``); each answer to a
        ``334`` and each message body (through the final ``.``) is one ``"<redacted>"``.
        Lines refused before dispatch, such as AUTH before STARTTLS, are included.
        """
        with self._lock:
            return list(self._transcript)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        """Every AUTH exchange as ``(mechanism, user, success)``."""
        with self._lock:
            return list(self._auth_attempts)

    @property
    def connections(self) -> int:
        """Number of client connections accepted since start (or the last ``clear()``)."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """Client connections open now, as the server sees them."""
        with self._lock:
            return self._open

    @property
    def peak_connections(self) -> int:
        """The most client connections open at once since start (or the last
        ``clear()``, counting those still open then): what a provider's limit
        on simultaneous connections (Microsoft's three per mailbox) judges."""
        with self._lock:
            return self._peak

    def clear(self) -> None:
        """Forget all messages, transcript lines, AUTH attempts and the connection
        counts (the peak starts again from the connections open now)."""
        with self._lock:
            self._messages.clear()
            self._dropped.clear()
            self._transcript.clear()
            self._auth_attempts.clear()
            self._connections = 0
            self._peak = self._open

    def drop_connections(self, timeout: float = 5.0) -> int:
        """Drop every client connection open now, without a reply or a TLS
        close_notify, as a server that ends idle sessions silently or
        restarts does; return how many. Returns once they are dropped."""
        if self._thread is None:
            return 0
        future = asyncio.run_coroutine_threadsafe(self._drop_live(), self.loop)
        return future.result(timeout)

    async def _drop_live(self) -> int:
        live = [protocol for protocol in self._live if protocol.counted]
        for protocol in live:
            protocol.abort()
        return len(live)

    def _record_line(self, line: str) -> None:
        with self._lock:
            self._transcript.append(line)

    def _record_auth(self, mechanism: str, user: str | None, success: bool) -> None:
        with self._lock:
            self._auth_attempts.append(AuthAttempt(mechanism, user, success))
        logger.info("AUTH %s for %r: %s", mechanism, user, "accepted" if success else "refused")

    def _take_data_reply(self) -> str:
        """The reply ``faults.data_reply`` gives this message ("" for none)."""
        with self._lock:
            faults = self.faults
            if not faults.data_reply:
                return ""
            reply = faults.data_reply
            if faults.data_reply_count:
                faults.data_reply_count -= 1
                if not faults.data_reply_count:
                    faults.data_reply = ""
            return reply

    def _record_dropped(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._dropped.append(message)

    def _accept(self, message: ReceivedMessage) -> None:
        if self._maildir is not None:
            # Stored before it counts as accepted: a Maildir error becomes a 451 to the
            # client, never a message acknowledged but missing from the demo page.
            header = (
                f"X-Mailgov-Auth-User: {message.auth_user}\n"
                f"X-Mailgov-Auth-Mechanism: {message.auth_mechanism}\n"
            ).encode()
            # Maildir files use the platform's line ends, not SMTP's CRLF.
            self._maildir.add(header + message.data.replace(b"\r\n", b"\n"))
        with self._lock:
            self._messages.append(message)

    def _connection_opened(self, protocol: _SubmissionSMTP) -> None:
        self._live.add(protocol)
        if protocol.counted:
            with self._lock:
                self._open += 1
                self._peak = max(self._peak, self._open)

    def _connection_closed(self, protocol: _SubmissionSMTP) -> None:
        if protocol not in self._live:
            return  # told twice (the TLS layer and the transport)
        self._live.discard(protocol)
        if protocol.counted:
            with self._lock:
                self._open -= 1

    def _abort_connections(self) -> None:
        for protocol in list(self._live):
            protocol.abort()

    # -- authentication -------------------------------------------------------------------

    def _check_password(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        """aiosmtpd ``authenticator`` for PLAIN and LOGIN."""
        assert isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode("utf-8", "backslashreplace")
        account = self._password_accounts.get(login.casefold())
        ok = account is not None and hmac.compare_digest(account[1], auth_data.password)
        self._record_auth(mechanism, login, ok)
        if account is None or not ok:
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8
        return AuthResult(success=True, auth_data=_Identity(account[0], mechanism))

    def _challenge_json(self) -> str:
        return json.dumps(
            {"status": "401", "schemes": "bearer", "scope": self.required_scope},
            separators=(",", ":"),
        )

    def _introspect(self, user: str, token: str) -> _Verdict:
        """Ask the RFC 7662 endpoint about ``token``; runs on an executor thread.

        Never logs the token: only the endpoint's status or the exception's type.
        """
        if self.introspection_url is None:
            return _Verdict.REJECT
        key = (hashlib.sha256(token.encode()).hexdigest(), user.casefold())
        if self._introspection_cache.get(key, 0.0) > time.monotonic():
            return _Verdict.ACCEPT
        verdict = self._ask_introspection(user, token)
        if verdict is _Verdict.ACCEPT and self._introspection_cache_seconds > 0:
            self._introspection_cache[key] = time.monotonic() + self._introspection_cache_seconds
        return verdict

    def _ask_introspection(self, user: str, token: str) -> _Verdict:
        try:
            response = requests.post(
                self.introspection_url,
                data={"token": token},
                auth=self._introspection_client,
                headers={"Accept": "application/json"},
                timeout=self._introspection_timeout,
                verify=self._introspection_verify,
            )
        except requests.RequestException as exc:
            logger.warning("Token introspection failed: %s", type(exc).__name__)
            return _Verdict.UNAVAILABLE
        if response.status_code != 200:
            logger.warning("Token introspection answered HTTP %s", response.status_code)
            return _Verdict.UNAVAILABLE
        try:
            body = response.json()
        except ValueError:
            logger.warning("Token introspection answered something other than JSON")
            return _Verdict.UNAVAILABLE
        if not isinstance(body, dict):
            return _Verdict.UNAVAILABLE
        if body.get("active") is not True:
            return _Verdict.REJECT
        scope = body.get("scope")
        if not isinstance(scope, str) or self.required_scope not in scope.split():
            return _Verdict.REJECT
        token_email = body.get("email")
        if token_email is not None and (
            not isinstance(token_email, str) or token_email.casefold() != user.casefold()
        ):
            return _Verdict.REJECT
        return _Verdict.ACCEPT


# --- command line -----------------------------------------------------------------------


def _password_account(value: str) -> tuple[str, str]:
    address, separator, password = value.partition(":")
    if not separator or not address or not password:
        raise argparse.ArgumentTypeError("expected ADDRESS:PASSWORD")
    return address, password


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mailgov.testing.smtpserver",
        description="SMTP submission server for mailgov's tests and demo "
        "(STARTTLS required, XOAUTH2 checked by token introspection).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025, help="0 picks a free port")
    parser.add_argument(
        "--tls-dir", type=Path, required=True, help="CA and certificates (created if missing)"
    )
    parser.add_argument(
        "--tls-hostname",
        action="append",
        dest="tls_hostnames",
        metavar="NAME",
        help="name or IP the certificate is for (repeatable; default localhost, 127.0.0.1)",
    )
    parser.add_argument("--introspection-url", help="RFC 7662 endpoint; omit to disable XOAUTH2")
    parser.add_argument("--introspection-client-id")
    parser.add_argument(
        "--introspection-client-secret-file",
        type=Path,
        help=f"file holding the client secret (or set {SECRET_ENV_VAR})",
    )
    parser.add_argument("--introspection-ca", help="CA bundle for an https introspection URL")
    parser.add_argument("--required-scope", default="", help="scope a token must carry")
    parser.add_argument("--maildir", type=Path, help="also store accepted messages here")
    parser.add_argument(
        "--password-account",
        action="append",
        type=_password_account,
        default=[],
        metavar="ADDRESS:PASSWORD",
        help="enable PLAIN/LOGIN for a throw-away account (repeatable)",
    )
    parser.add_argument(
        "--fault", action="append", choices=Faults.names(), default=[], help="repeatable"
    )
    parser.add_argument(
        "--introspection-cache-seconds",
        type=float,
        default=0,
        help="remember accepted tokens this long (off by default; the benchmark uses it)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every connection")
    return parser


def _read_secret(path: Path | None) -> str | None:
    if path is not None:
        return path.read_text(encoding="utf-8").strip()
    return os.environ.get(SECRET_ENV_VAR) or None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM; return the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    client: tuple[str, str] | None = None
    if args.introspection_client_id:
        secret = _read_secret(args.introspection_client_secret_file)
        if not secret:
            parser.error(
                "--introspection-client-id needs --introspection-client-secret-file "
                f"or {SECRET_ENV_VAR}"
            )
        client = (args.introspection_client_id, secret)
    if args.introspection_url and not args.required_scope:
        parser.error("--introspection-url needs --required-scope")

    faults = Faults(**dict.fromkeys(args.fault, True))
    tls = ensure_tls_files(args.tls_dir, args.tls_hostnames or DEFAULT_HOSTNAMES)
    server = SubmissionServer(
        args.host,
        args.port,
        tls=tls,
        introspection_url=args.introspection_url,
        introspection_client=client,
        required_scope=args.required_scope,
        introspection_ca=args.introspection_ca,
        introspection_cache_seconds=args.introspection_cache_seconds,
        password_accounts=dict(args.password_account),
        maildir=args.maildir,
        faults=faults,
    )

    stop_requested = threading.Event()

    def _request_stop(signum: int, frame: object) -> None:
        stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _request_stop)
    with server:
        print(f"SMTP server listening on {server.host}:{server.port}", flush=True)
        stop_requested.wait()
    logger.info("SMTP server stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
