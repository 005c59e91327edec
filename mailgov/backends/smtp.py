"""``EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"``: SMTP with XOAUTH2.

A subclass of Django's SMTP backend that sends each message from the mailbox
its From address belongs to (or from the ``mailbox=`` given to the
constructor), authenticated with XOAUTH2 over verified TLS only.

Order of work in :meth:`EmailBackend.send_messages`, and why:

1. Every message is checked and serialized first
   (:func:`mailgov.validation.prepare_message`: header injection in any MIME
   part, address syntax, recipient counts): a bad message raises before any
   network I/O, and nothing of the batch is sent.
2. Mailboxes are resolved in one query; a sender that is unknown, inactive or
   lacks the send scope raises (configuration errors are never hidden by
   ``fail_silently``).
3. Messages are grouped by mailbox; one authenticated connection per mailbox
   is opened and reused for all its messages. Each goes in two round trips
   when the server offers PIPELINING (:func:`pipelined_sendmail`): at
   Gmail's or Microsoft's distance, round trips are what sending costs.
4. One ``SendLog`` row per message attempted (sent or failed) is written in
   a single bulk insert at the end of the batch, whatever happened (a
   database error there is logged, never raised: the mail has already
   gone). When the connection is lost, only the message in flight failed:
   the server saw nothing of the ones after it, which get no row.

``fail_silently`` hides transport errors only (refused or dropped connection,
timeout, an SMTP error reply, a provider that is down). It never hides a
configuration or security error: bad input, unknown sender, missing scope,
a server without STARTTLS or XOAUTH2, an SMTP or HTTPS certificate that does
not verify, or a login refused even after a forced refresh.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hmac
import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from django.core.mail.backends import smtp
from django.core.mail.message import EmailMessage
from django.core.mail.utils import DNS_NAME
from django.db import DatabaseError, transaction
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.exceptions import (
    ConsentRequiredError,
    InvalidMessageError,
    MailboxContainedError,
    MailboxUnavailableError,
    ProviderUnavailableError,
    SendCancelled,
    SendingFrozenError,
    SMTPAuthenticationRejected,
    SMTPSecurityError,
)
from mailgov.freeze import active_blocks, check_not_blocked, send_gate
from mailgov.metrics import count_sends
from mailgov.models import Mailbox, MailboxCredentials, SendLog
from mailgov.providers import Provider, get_mailbox_provider
from mailgov.services import mark_needs_reconsent, suspend_mailbox
from mailgov.signals import post_send, pre_send
from mailgov.tokens import get_access_token
from mailgov.validation import PreparedMessage, prepare_message

logger = logging.getLogger("mailgov.backends.smtp")


@sensitive_variables()
def xoauth2_initial_response(address: str, token: str) -> str:
    """The base64 SASL XOAUTH2 initial response. Never log what this returns."""
    raw = f"user={address}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode()).decode("ascii")


#: ``on_result(item, error, refused)`` of :meth:`EmailBackend.send_prepared`.
ResultCallback = Callable[[PreparedMessage, BaseException | None, dict[str, Any]], None]

#: Transport failures: the only ones ``fail_silently`` may hide.
TRANSPORT_ERRORS = (smtplib.SMTPException, OSError, ProviderUnavailableError)
#: Never hidden, even though some subclass the transport errors above.
NEVER_SILENT = (SMTPSecurityError, SMTPAuthenticationRejected, ssl.SSLError)


# --- SMTP PIPELINING (RFC 2920) ------------------------------------------------


class _LostBeforeMail(smtplib.SMTPServerDisconnected):
    """The connection was found gone before the server answered ``MAIL FROM``.

    Nothing of the message can have been accepted: its content is only ever
    written after the server's ``354``, which follows that answer. A
    :class:`smtplib.SMTPServerDisconnected` like any other (callers that do
    not care see no difference); :meth:`EmailBackend._send_group` sends the
    message again over a new connection when the dead one was kept from an
    earlier batch.
    """


class _GuardedMail:
    """``smtplib`` connection mixin: ``mail()`` raises :class:`_LostBeforeMail`
    when the connection is found gone, so that ``sendmail`` (the path without
    PIPELINING) tells a connection that died while it idled from one lost
    later in the transaction."""

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        try:
            return super().mail(sender, options)
        except OSError as exc:  # SMTPServerDisconnected included
            raise _LostBeforeMail(str(exc)) from exc


class _SMTP(_GuardedMail, smtplib.SMTP):
    """:class:`smtplib.SMTP` with :class:`_GuardedMail`."""


class _SMTP_SSL(_GuardedMail, smtplib.SMTP_SSL):
    """:class:`smtplib.SMTP_SSL` with :class:`_GuardedMail`."""


def _quote_periods(data: bytes) -> bytes:
    """RFC 5321 4.5.2 dot-stuffing, and the end-of-data line."""
    data = re.sub(rb"(?m)^\.", b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _command(verb: str, argument: str) -> str:
    line = f"{verb} {argument}"
    if "\r" in line or "\n" in line:
        # prepare_message() refuses such addresses already; a second fence
        # because a CR/LF here would inject a command into the flight.
        raise InvalidMessageError("An SMTP command may not contain a line break; nothing was sent.")
    return line + "\r\n"


def _end_transaction(connection: smtplib.SMTP, code: int) -> None:
    """After a refused transaction: RSET, or close on 421 (the server is
    closing the channel). A connection already gone is left closed."""
    if code == 421:
        connection.close()
        return
    with contextlib.suppress(smtplib.SMTPServerDisconnected):
        connection.rset()


def pipelined_sendmail(
    connection: smtplib.SMTP,
    from_addr: str,
    to_addrs: Sequence[str],
    msg: bytes,
    mail_options: Sequence[str] = (),
) -> dict[str, tuple[int, bytes]]:
    """``smtplib.SMTP.sendmail`` with PIPELINING: two round trips a message.

    MAIL FROM, every RCPT TO and DATA go out in one write; their replies are
    read in order. Then the content and its end in a second write, and its
    reply. Returns, and raises, as ``sendmail`` does:
    ``{recipient: (code, reply)}`` of refused recipients when the message
    was accepted for the others; :class:`smtplib.SMTPSenderRefused`,
    :class:`smtplib.SMTPRecipientsRefused` (none accepted) or
    :class:`smtplib.SMTPDataError`, after an RSET (or a close on 421), when
    it was not. A connection found gone before the reply to ``MAIL FROM``
    raises :class:`_LostBeforeMail` (a
    :class:`smtplib.SMTPServerDisconnected`): nothing of the message was
    accepted.

    The caller checks that the server advertised PIPELINING after TLS
    (RFC 2920 forbids pipelining STARTTLS, and AUTH is never pipelined: the
    token is sent only once the server has answered everything before it).
    """
    options = []
    if connection.has_extn("size"):
        options.append(f"SIZE={len(msg)}")
    options.extend(mail_options)
    if any(option.lower() == "smtputf8" for option in options):
        if not connection.has_extn("smtputf8"):
            raise smtplib.SMTPNotSupportedError("SMTPUTF8 not supported by server")
        connection.command_encoding = "utf-8"
    suffix = "".join(" " + option for option in options)
    flight = [_command("MAIL", f"FROM:{smtplib.quoteaddr(from_addr)}{suffix}")]
    flight += [_command("RCPT", f"TO:{smtplib.quoteaddr(rcpt)}") for rcpt in to_addrs]
    flight.append("DATA\r\n")
    try:
        connection.send("".join(flight))
        # Every reply is read, whatever the earlier ones said: the server
        # answers each command of the flight, and an unread reply would be
        # taken for the answer to the next command.
        mail_code, mail_reply = connection.getreply()
    except OSError as exc:  # smtplib closed it and raised SMTPServerDisconnected
        raise _LostBeforeMail(str(exc)) from exc
    if mail_code == 421:
        # The server closes the channel: nothing more will be answered.
        connection.close()
        raise smtplib.SMTPSenderRefused(mail_code, mail_reply, from_addr)
    refused: dict[str, tuple[int, bytes]] = {}
    for rcpt in to_addrs:
        code, reply = connection.getreply()
        if code not in (250, 251):
            refused[rcpt] = (code, reply)
        if code == 421:
            # The server closes the channel: nothing more will be answered.
            connection.close()
            raise smtplib.SMTPRecipientsRefused(refused)
    data_code, data_reply = connection.getreply()

    failure: smtplib.SMTPException | None = None
    if mail_code != 250:
        failure = smtplib.SMTPSenderRefused(mail_code, mail_reply, from_addr)
    elif len(refused) == len(to_addrs):
        failure = smtplib.SMTPRecipientsRefused(refused)
    elif data_code != 354:
        failure = smtplib.SMTPDataError(data_code, data_reply)
    if failure is not None:
        if data_code == 354:
            # DATA was accepted although the transaction cannot go on (RFC
            # 2920 3.1): end it with an empty message, which the server
            # refuses for want of a sender or a recipient.
            connection.send(b".\r\n")
            connection.getreply()
        _end_transaction(connection, data_code)
        raise failure

    connection.send(_quote_periods(msg))
    code, reply = connection.getreply()
    if code != 250:
        _end_transaction(connection, code)
        raise smtplib.SMTPDataError(code, reply)
    return refused


def _no_nagle(connection: smtplib.SMTP) -> None:
    """TCP_NODELAY on an SMTP client socket.

    Every write mailgov makes is a whole flight (a command, a pipelined
    group, a message), so Nagle's algorithm only ever delays one: the EHLO
    written right after the TLS Finished would wait for the server's ACK, a
    round trip or its delayed-ACK timer (40 ms on Linux), on every new
    connection.
    """
    sock = connection.sock
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _body_options(connection: smtplib.SMTP, data: bytes) -> list[str]:
    """MAIL FROM's ``BODY=8BITMIME`` (RFC 6152) for content with 8-bit
    bytes, when the server offers it. Django's messages carry UTF-8 text
    as ``Content-Transfer-Encoding: 8bit``; a server that does not offer
    8BITMIME gets them as Django's own backend sends them (Gmail and
    Microsoft 365 offer it)."""
    if connection.has_extn("8bitmime") and not data.isascii():
        return ["BODY=8BITMIME"]
    return []


@sensitive_variables()
def _expiry_of(mailbox: Mailbox, token: str) -> datetime.datetime | None:
    """When ``token``, which ``get_access_token()`` returned for ``mailbox``,
    expires.

    Read with the stored token, from one row in one query, and taken only if
    the stored token is still ``token``: another process may have refreshed
    meanwhile, and the newer token's expiry would let a connection
    authenticated with the older one be kept past that one's end. Then (the
    older token was within the refresh margin of its end, or refused) the
    expiry is taken as now, so that the connection is not kept after its
    batch. ``None`` when the provider gave no expiry.
    """
    stored = (
        MailboxCredentials.objects.filter(pk=mailbox.pk).only("access_token", "expires_at").first()
    )
    if stored is None or not stored.access_token:
        return timezone.now()
    if not hmac.compare_digest(stored.access_token.encode(), token.encode()):
        return timezone.now()
    return stored.expires_at


class EmailBackend(smtp.EmailBackend):
    """Send through each sender's connected mailbox with SMTP + XOAUTH2.

    ``mailbox`` (a :class:`Mailbox` or its pk) fixes the mailbox for every
    message; the From address must then be the mailbox's address. Host,
    port, username and password arguments and ``EMAIL_*`` settings are
    ignored: the provider decides where a token may go.
    """

    def __init__(
        self,
        mailbox: Mailbox | Any = None,
        fail_silently: bool = False,
        timeout: float | None = None,
        **kwargs: Any,
    ):
        for ignored in ("host", "port", "username", "password", "use_tls", "use_ssl"):
            kwargs.pop(ignored, None)
        super().__init__(
            fail_silently=fail_silently, timeout=timeout, use_tls=False, use_ssl=False, **kwargs
        )
        # Never a password login, whatever EMAIL_HOST_USER says.
        self.username = self.password = None
        if self.timeout is None:
            self.timeout = mailgov_settings.SMTP_TIMEOUT_SECONDS
        self.mailbox = mailbox
        #: Keep a connection opened by send_prepared()/send_messages() open
        #: after the batch (the outbox's worker sends several batches of one
        #: mailbox in a row); the caller then close()s it.
        self.keep_connection = False
        self.connected_at: float | None = None
        #: Expiry of the access token the connection authenticated with.
        self.token_expires_at: datetime.datetime | None = None
        #: Whether the last batch ended because no connection could be had
        #: (at its start, or when a kept connection found dead was reopened):
        #: the messages it did not send were failed with the open's error.
        self.failed_at_open = False
        self._connected_mailbox: Mailbox | None = None
        #: Refuse a mailbox frozen by an incident before any I/O (the queued
        #: backend, which holds such mail instead, turns it off).
        self.check_freeze = True
        self._ssl_contexts: dict[str | None, ssl.SSLContext] = {}

    # -- connection --------------------------------------------------------
    def ssl_context_for(self, provider: Provider) -> ssl.SSLContext:
        """A verifying TLS 1.2+ context; a provider's CA bundle is its only trust root."""
        context = self._ssl_contexts.get(provider.ca_bundle)
        if context is None:
            context = ssl.create_default_context(cafile=provider.ca_bundle)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl_contexts[provider.ca_bundle] = context
        return context

    def _connect(self, provider: Provider) -> None:
        """Open a TLS connection to the provider's SMTP endpoint; EHLO done."""
        context = self.ssl_context_for(provider)
        params = {"local_hostname": DNS_NAME.get_fqdn(), "timeout": self.timeout}
        if provider.smtp_security == "ssl":
            connection = _SMTP_SSL(
                provider.smtp_host, provider.smtp_port, context=context, **params
            )
            self.connection = connection
            _no_nagle(connection)
        else:
            connection = _SMTP(provider.smtp_host, provider.smtp_port, **params)
            self.connection = connection
            _no_nagle(connection)
            connection.ehlo()
            if not connection.has_extn("starttls"):
                raise SMTPSecurityError(
                    f"{provider.smtp_host} does not offer STARTTLS; mailgov never "
                    "authenticates over a clear connection, so nothing was sent."
                )
            connection.starttls(context=context)
        connection.ehlo()  # CPython's auth never sends EHLO itself

    @method_decorator(sensitive_variables())
    def _authenticate(self, address: str, token: str) -> None:
        connection = self.connection
        mechanisms = connection.esmtp_features.get("auth", "").upper().split()
        if "XOAUTH2" not in mechanisms:
            raise SMTPSecurityError("The SMTP server does not offer AUTH XOAUTH2 after TLS.")
        # Not smtplib's auth(): it treats a 503 reply as success.
        code, reply = connection.docmd(
            "AUTH", "XOAUTH2 " + xoauth2_initial_response(address, token)
        )
        if code == 334:
            # The server's JSON error challenge: an empty answer makes the
            # failure arrive as a 535.
            code, reply = connection.docmd("")
        if code == 235:
            return
        if code in (534, 535):
            # The token was refused.
            raise smtplib.SMTPAuthenticationError(code, reply)
        # Anything else (454 "try again later", 421, a 5xx that is not about
        # the credential) is the server's trouble, not the grant's: a
        # transport error that leaves the tokens alone.
        raise smtplib.SMTPResponseException(code, reply)

    @method_decorator(sensitive_variables())
    def _open_for(self, mailbox: Mailbox) -> bool:
        """Ensure an authenticated connection for ``mailbox``; True if newly opened."""
        if self.connection is not None and self._connected_mailbox == mailbox:
            return False
        self.close()
        provider = get_mailbox_provider(mailbox)
        token = get_access_token(mailbox)
        try:
            self._connect(provider)
            self._authenticate(mailbox.address, token)
        except smtplib.SMTPAuthenticationError as exc:
            self.close()
            reply = (
                exc.smtp_error.decode("utf-8", "replace")
                if isinstance(exc.smtp_error, bytes)
                else str(exc.smtp_error)
            )
            if "5.7.139" in reply:
                # Microsoft: SMTP AUTH disabled for the tenant or mailbox. A
                # refresh or re-consent cannot help, so the grant is kept and
                # the mailbox suspended until an administrator enables it.
                suspend_mailbox(mailbox, "smtp_auth_disabled: SMTP AUTH is disabled for the tenant")
                raise SMTPAuthenticationRejected(exc.smtp_code, exc.smtp_error) from None
            # One forced refresh and one retry, then the mailbox needs re-consent.
            token = get_access_token(mailbox, force_refresh=True, rejected_token=token)
            try:
                self._connect(provider)
                self._authenticate(mailbox.address, token)
            except smtplib.SMTPAuthenticationError as retry_exc:
                self.close()
                mark_needs_reconsent(mailbox, "smtp_auth_rejected: login refused after refresh")
                raise SMTPAuthenticationRejected(
                    retry_exc.smtp_code, retry_exc.smtp_error
                ) from None
            except BaseException:
                self.close()
                raise
        except BaseException:
            self.close()
            raise
        self._connected_mailbox = mailbox
        self.connected_at = time.monotonic()
        # When the token this session authenticated with expires: a worker
        # keeping the connection open (mailgov.delivery) closes it by then.
        self.token_expires_at = _expiry_of(mailbox, token)
        return True

    def open(self) -> bool | None:
        """Open a connection for the constructor's ``mailbox``, if one was given.

        Returns ``True`` if a connection was opened, ``False`` if one was
        already open or no mailbox is fixed (connections are then opened per
        sender in :meth:`send_messages`), ``None`` if it failed silently.
        """
        if self.mailbox is None:
            return False
        mailbox = self._fixed_mailbox()
        self._check_mailbox(mailbox, mailbox.address)
        try:
            return self._open_for(mailbox)
        except NEVER_SILENT:
            raise
        except TRANSPORT_ERRORS:
            if not self.fail_silently:
                raise
            return None

    def close(self) -> None:
        self._connected_mailbox = None
        self.connected_at = self.token_expires_at = None
        if self.connection is None:
            return
        try:
            self.connection.quit()
        except (ssl.SSLError, smtplib.SMTPServerDisconnected, smtplib.SMTPException, OSError):
            # The connection is gone or broken either way.
            self.connection.close()
        finally:
            self.connection = None

    # -- mailboxes ---------------------------------------------------------
    def _fixed_mailbox(self) -> Mailbox:
        """The constructor's mailbox, read again: its status may have changed."""
        pk = self.mailbox.pk if isinstance(self.mailbox, Mailbox) else self.mailbox
        mailbox = Mailbox.objects.filter(pk=pk).first()
        if mailbox is None:
            raise MailboxUnavailableError("The mailbox given to the backend does not exist.")
        return mailbox

    def _check_mailbox(self, mailbox: Mailbox | None, address: str) -> Provider:
        if mailbox is None:
            raise MailboxUnavailableError(
                f"No connected mailbox sends as {address!r}; nothing was sent."
            )
        if mailbox.status != Mailbox.Status.ACTIVE:
            raise MailboxUnavailableError(
                f"Mailbox {mailbox.pk} ({mailbox.address}) is {mailbox.status}; nothing was sent."
            )
        provider = get_mailbox_provider(mailbox)
        if not mailbox.has_scopes(provider.send_scopes):
            raise ConsentRequiredError(
                f"Mailbox {mailbox.pk} was not granted the send scope; its owner must consent."
            )
        return provider

    def _resolve(self, prepared: Sequence[PreparedMessage]) -> list[Mailbox]:
        """The mailbox of each message, in one query; raises for any unusable one."""
        if self.mailbox is not None:
            mailbox = self._fixed_mailbox()
            by_address = {mailbox.address.lower(): mailbox}
        else:
            wanted = {item.address for item in prepared}
            by_address = {}
            for mailbox in (
                Mailbox.objects.annotate(address_lower=Lower("address"))
                .filter(address_lower__in=wanted)
                .order_by("-connected_at")
            ):
                current = by_address.get(mailbox.address_lower)
                # An active mailbox wins over an older inactive one.
                if current is None or (
                    mailbox.status == Mailbox.Status.ACTIVE
                    and current.status != Mailbox.Status.ACTIVE
                ):
                    by_address[mailbox.address_lower] = mailbox
        result = []
        checked: dict[Any, Provider] = {}  # one check per mailbox, not per message
        blocks = active_blocks()
        for item in prepared:
            mailbox = by_address.get(item.address)
            if mailbox is None and self.mailbox is not None:
                raise MailboxUnavailableError(
                    f"The From address {item.address!r} is not the address of the given "
                    "mailbox; nothing was sent."
                )
            provider = checked.get(mailbox.pk) if mailbox is not None else None
            if provider is None:
                provider = self._check_mailbox(mailbox, item.address)
                check_not_blocked(mailbox, blocks, sending=self.check_freeze)
                checked[mailbox.pk] = provider
            if len(item.recipients) > provider.max_recipients_per_message:
                raise InvalidMessageError(
                    f"{len(item.recipients)} recipients exceed {provider.name}'s limit of "
                    f"{provider.max_recipients_per_message} per message; nothing was sent."
                )
            result.append(mailbox)
        return result

    # -- sending -----------------------------------------------------------
    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """Send ``email_messages``; return how many were sent.

        Raises before any network I/O for a bad message or an unusable
        mailbox. Every message that reached the sending stage gets one
        ``SendLog`` row, written in one insert per batch.
        """
        if not email_messages:
            return 0
        prepared = [prepare_message(message) for message in email_messages]
        mailboxes = self._resolve(prepared)
        groups: dict[Any, tuple[Mailbox, list[PreparedMessage]]] = {}
        for item, mailbox in zip(prepared, mailboxes, strict=True):
            groups.setdefault(mailbox.pk, (mailbox, []))[1].append(item)
        logs: list[SendLog] = []
        sent_total = 0
        with self._lock:
            try:
                for mailbox, items in groups.values():
                    sent_total += self._send_group(mailbox, items, logs)
            finally:
                self._record(logs)
        return sent_total

    def send_prepared(
        self,
        mailbox: Mailbox,
        items: Sequence[PreparedMessage],
        on_result: ResultCallback,
    ) -> int:
        """Send messages already checked and serialized (the outbox's), all
        from ``mailbox``, over one connection; return how many were sent.

        ``on_result(item, error, refused)`` is called for each message as
        soon as its fate is known: ``error`` is ``None`` once the server
        accepted it (``refused`` then maps the recipients it refused to their
        replies), else the exception. With ``fail_silently`` transport errors
        reach ``on_result`` only; anything else is also raised, after
        ``on_result`` was called for every message it concerns. The send log
        is written as by :meth:`send_messages`.

        When the connection is lost (or the server closes it with a ``421``)
        only the message in flight fails; the batch ends there, and the
        messages after it were not attempted: ``on_result`` is never called
        for them and they get no send log row (the caller sends them later,
        with no failure counted). A connection kept from an earlier batch
        that turns out dead before the server answered ``MAIL FROM`` is
        reopened once and the message sent over the new one: nothing of it
        had reached the server.
        """
        logs: list[SendLog] = []
        with self._lock:
            try:
                return self._send_group(mailbox, list(items), logs, on_result)
            finally:
                self._record(logs)

    def _send_group(
        self,
        mailbox: Mailbox,
        items: list[PreparedMessage],
        logs: list[SendLog],
        on_result: ResultCallback | None = None,
    ) -> int:
        self.failed_at_open = False

        def fail(rest: Sequence[PreparedMessage], exc: BaseException) -> None:
            now = timezone.now()
            # An incident's switch stopping a message is not a failed send
            # (it is held, on the queued path): the send log counts attempts.
            switched_off = isinstance(exc, SendingFrozenError | MailboxContainedError)
            logs.extend(
                SendLog(
                    mailbox=mailbox,
                    message_id=item.message_id,
                    recipient_count=len(item.recipients),
                    status=SendLog.Status.FAILED,
                    error_class=type(exc).__name__,
                    attempted_at=now,
                )
                for item in ([] if switched_off else rest)
            )
            if on_result is not None:
                for item in rest:
                    on_result(item, exc, {})

        new_connection = self._open_for_batch(mailbox, items, fail)
        if new_connection is None:
            return 0
        sent = 0
        index = 0
        reopened = False
        retry = False  # the same message again, over a reopened connection
        try:
            while index < len(items):
                item = items[index]
                if index and not retry:
                    try:
                        send_gate(mailbox)
                    except MailboxUnavailableError as exc:
                        # Frozen or contained during the batch: nothing more
                        # goes out over this connection.
                        fail(items[index:], exc)
                        self.close()
                        raise
                if not retry:
                    try:
                        pre_send.send(
                            sender=type(self),
                            message=item.message,
                            message_id=item.message_id,
                            mailbox=mailbox,
                        )
                    except SendCancelled as exc:
                        fail([item], exc)
                        index += 1
                        continue
                retry = False
                try:
                    refused = self._sendmail(item)
                except OSError as exc:  # every SMTPException too
                    if isinstance(exc, _LostBeforeMail) and not (new_connection or reopened):
                        # Kept from an earlier batch, the connection died while
                        # it idled: closed by the server just after the pool's
                        # check, or a link dropped without a word. Nothing of
                        # this message reached the server: once, a new one.
                        logger.info(
                            "mailbox %s: kept SMTP connection found closed; reopened", mailbox.pk
                        )
                        reopened = retry = True
                        self.close()
                        if self._open_for_batch(mailbox, items[index:], fail) is None:
                            break
                        continue
                    # This message failed (only this one: the server saw no
                    # other of the rest). A refusal leaves the transaction
                    # reset and the connection in step; a lost connection, or
                    # one the server closed after its 421, ends the batch, and
                    # the messages after this one are not attempted.
                    fail([item], exc)
                    gone = self._lost(exc)
                    if gone:
                        self.close()
                        if on_result is None:
                            # Sent directly (send_messages): nothing will send
                            # the rest later, so they failed with this batch,
                            # and the send log says so.
                            fail(items[index + 1 :], exc)
                    if not self.fail_silently:
                        raise
                    if gone:
                        break
                    index += 1
                    continue
                now = timezone.now()
                logs.append(
                    SendLog(
                        mailbox=mailbox,
                        message_id=item.message_id,
                        recipient_count=len(item.recipients) - len(refused or ()),
                        status=SendLog.Status.SENT,
                        attempted_at=now,
                        sent_at=now,
                    )
                )
                sent += 1
                index += 1
                if on_result is not None:
                    on_result(item, None, refused or {})
        finally:
            if new_connection and not self.keep_connection:
                self.close()
            # A receiver's error must neither hide the send's own exception nor
            # turn sent mail into a failure: robust, and logged.
            for receiver, error in post_send.send_robust(
                sender=type(self), mailbox=mailbox, sent=sent, failed=len(items) - sent
            ):
                if isinstance(error, Exception):
                    logger.error("post_send receiver %r failed: %s", receiver, type(error).__name__)
        return sent

    def _open_for_batch(
        self,
        mailbox: Mailbox,
        rest: Sequence[PreparedMessage],
        fail: Callable[[Sequence[PreparedMessage], BaseException], None],
    ) -> bool | None:
        """:meth:`_open_for` ``mailbox`` for a batch whose messages ``rest``
        are still to go; whether the connection is new, as ``_open_for``.

        The kill switch and the mailbox's status are checked first, as
        committed now, before the token is used (an incident may have frozen
        or contained the mailbox since the batch was resolved or claimed).
        If either refuses, or no connection can be had, every message of
        ``rest`` is failed with the error (``failed_at_open`` is set) and
        the error is raised, unless ``fail_silently`` hides it: ``None``
        then.
        """
        try:
            send_gate(mailbox)
            return self._open_for(mailbox)
        except Exception as exc:
            self.failed_at_open = True
            fail(rest, exc)
            if (
                self.fail_silently
                and isinstance(exc, TRANSPORT_ERRORS)
                and not isinstance(exc, NEVER_SILENT)
            ):
                return None
            raise

    def _lost(self, exc: OSError) -> bool:
        """Whether the connection is gone after a transaction raised ``exc``:
        dropped, timed out, or closed by the server's ``421`` (the
        transaction closed it), as opposed to a refusal that left it in
        step for the next message."""
        if isinstance(exc, smtplib.SMTPServerDisconnected) or not isinstance(
            exc, smtplib.SMTPException
        ):
            return True
        return self.connection is None or getattr(self.connection, "sock", None) is None

    def _sendmail(self, item: PreparedMessage) -> dict[str, tuple[int, bytes]]:
        """One SMTP transaction: pipelined when the server offers PIPELINING
        (after TLS: the features of the last EHLO) and MAILGOV_SMTP_PIPELINING
        is on; else ``smtplib``'s one command per round trip."""
        connection = self.connection
        options = _body_options(connection, item.data)
        if mailgov_settings.SMTP_PIPELINING and connection.has_extn("pipelining"):
            return pipelined_sendmail(
                connection, item.from_addr, item.recipients, item.data, options
            )
        return connection.sendmail(item.from_addr, item.recipients, item.data, options)

    def _record(self, logs: list[SendLog]) -> None:
        """Write the batch's send log in one transaction.

        Never raises: the mail has gone (or failed) already, and a database
        error here must not make a caller resend what was sent, nor replace
        the exception of a failed send. The failure is logged instead.
        """
        if not logs:
            return
        count_sends(logs)
        used = {log.mailbox_id for log in logs if log.status == SendLog.Status.SENT}
        try:
            with transaction.atomic():
                SendLog.objects.bulk_create(logs)
                if used:
                    Mailbox.objects.filter(pk__in=used).update(last_used_at=timezone.now())
        except DatabaseError as exc:
            logger.error(
                "send log of %d messages (%d sent) not written: %s",
                len(logs),
                sum(log.status == SendLog.Status.SENT for log in logs),
                type(exc).__name__,
            )
