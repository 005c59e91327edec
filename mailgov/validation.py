"""Message validation shared by mailgov's email backends.

:func:`prepare_message` checks and serializes a Django ``EmailMessage``
before any network I/O or storage: a message that could carry a header line
nobody asked for, in any of its MIME parts, is refused with
:class:`~mailgov.exceptions.InvalidMessageError`, and nothing of it is sent.

What counts as unsafe, in every header of every part (the top-level block and
each attachment or alternative part, nested ``message/rfc822`` parts included):

- a header name that is not an RFC 5322 field name;
- in a value, any C0 control character but TAB, DEL, any C1 control character
  (U+0080 to U+009F, NEL among them) and the Unicode line and paragraph
  separators (U+2028, U+2029), which some readers split lines on;
- the same characters in the *decoded* forms a reader will show: RFC 2047
  encoded words (``=?utf-8?q?a=0D=0A?=``) and RFC 2231 parameters
  (``filename*=utf-8''a%0D%0A``);
- on the wire, a part whose serialized header block holds another set of
  header lines than the part has (the email package turns some control
  characters into line breaks when it folds a line).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.errors import (
    FirstHeaderLineIsContinuationDefect,
    MessageError,
    MisplacedEnvelopeHeaderDefect,
    MissingHeaderBodySeparatorDefect,
)
from email.header import decode_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value, make_msgid
from typing import Any

from django.conf import settings
from django.core.mail.message import EmailMessage, sanitize_address
from django.core.mail.utils import DNS_NAME

from mailgov.exceptions import InvalidMessageError

__all__ = ["PreparedMessage", "prepare_message"]

#: Top-level headers Django writes itself; any other name in the serialized
#: header block must be one the caller set in ``extra_headers``.
DJANGO_HEADERS = frozenset(
    {
        "content-type",
        "mime-version",
        "content-transfer-encoding",
        "subject",
        "from",
        "to",
        "cc",
        "reply-to",
        "date",
        "message-id",
    }
)
# CR, LF and NUL, every other C0 control character but TAB (RFC 5322 allows
# none in a header), DEL, the C1 controls (NEL among them) and the Unicode
# line and paragraph separators: some readers split lines on each of them.
FORBIDDEN_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# The same for the serialized header block, where CRLF separates lines.
FORBIDDEN_BYTES_RE = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A folded header line's line break, which a reader removes.
_UNFOLD_RE = re.compile(r"(?:\r\n|\r|\n)(?=[ \t])")
# What the parser reports for a header block broken by a stray line break.
_HEADER_DEFECTS = (
    FirstHeaderLineIsContinuationDefect,
    MisplacedEnvelopeHeaderDefect,
    MissingHeaderBodySeparatorDefect,
)
# A bare ASCII address of dot-atoms, which Django's sanitize_address()
# returns unchanged: the fast path of sanitized().
_PLAIN_ADDRESS_RE = re.compile(
    r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
)
MAX_ADDRESS_LENGTH = 254  # RFC 5321 path limit less the angle brackets
MAX_LOCAL_PART_LENGTH = 64


def _is_header_name(name: str) -> bool:
    # RFC 5322 field name: printable ASCII except ":" and space.
    return bool(name) and all(33 <= ord(char) <= 126 and char != ":" for char in name)


def _addr_spec(formatted: str) -> str:
    """The bare address in what ``sanitize_address`` returned ("a@b" or "Name <a@b>")."""
    if formatted.endswith(">"):
        return formatted[formatted.rfind("<") + 1 : -1]
    return formatted


def _check_value(what: str, value: Any) -> None:
    if FORBIDDEN_RE.search(str(value)):
        raise InvalidMessageError(
            f"{what} contains a line break or control character; nothing was sent."
        )


@dataclass
class PreparedMessage:
    """A checked, serialized message, ready for the wire."""

    message: EmailMessage
    address: str  # the From address, lower-cased, for the mailbox lookup
    from_addr: str
    recipients: list[str]
    data: bytes
    message_id: str
    #: The caller's handle on this message (the outbox puts its row here).
    ref: Any = None


def sanitized(address: Any, encoding: str) -> str:
    """Django's ``sanitize_address()``, without its parser for the common case.

    A bare ASCII address of dot-atoms (``alice.smith+tag@example.com``) is
    returned as it is, which is what ``sanitize_address()`` returns for it
    (tested against it); anything else goes through ``sanitize_address()``,
    whose parser errors all become ``ValueError``.
    The parser costs more than the rest of the message's checks together.
    """
    if isinstance(address, str) and _PLAIN_ADDRESS_RE.fullmatch(address):
        return address
    try:
        return sanitize_address(address, encoding)
    except (IndexError, AttributeError) as exc:
        # The email package's parser trips over some garbage ('"', '0@[')
        # instead of refusing it: a malformed address all the same.
        raise ValueError("The address cannot be parsed.") from exc


def prepare_message(message: EmailMessage) -> PreparedMessage:
    """Check and serialize ``message``; raise :class:`InvalidMessageError` if unsafe.

    Refuses control characters and line separators in any header value,
    address or header name of any MIME part, in plain, RFC 2047 or RFC 2231
    form, and any header block that would carry a header line the caller did
    not ask for (see the module docstring). Gives the message a Message-ID if
    it has none, so that a retry sends the same one.
    """
    _check_value("The subject", message.subject)
    _check_value("The From address", message.from_email)
    for what, addresses in (
        ("A To address", message.to),
        ("A Cc address", message.cc),
        ("A Bcc address", message.bcc),
        ("A Reply-To address", message.reply_to),
    ):
        for address in addresses:
            _check_value(what, address)
    for number, attachment in enumerate(message.attachments, start=1):
        # Django refuses a CR or LF here itself, but without naming the
        # attachment; the other characters it lets through. Parts given as
        # MIME objects are checked once serialized (_check_parts).
        if not isinstance(attachment, Message):
            filename, _content, mimetype = attachment
            if filename is not None:
                _check_text(str(filename), f"The filename of attachment {number}")
            if mimetype is not None:
                _check_text(str(mimetype), f"The MIME type of attachment {number}")
    extra_names = set()
    for name, value in message.extra_headers.items():
        if not _is_header_name(str(name)):
            raise InvalidMessageError("A custom header has an invalid name; nothing was sent.")
        _check_value(f"Header {name}", value)
        extra_names.add(str(name).lower())
    if "message-id" not in extra_names:
        # A new dict: Django keeps the caller's ``headers=`` dict as it is, and
        # messages built from one shared dict must not share one Message-ID.
        message.extra_headers = {**message.extra_headers, "Message-ID": make_msgid(domain=DNS_NAME)}
        extra_names.add("message-id")
    recipients_raw = message.recipients()
    if not recipients_raw:
        raise InvalidMessageError("The message has no recipients; nothing was sent.")
    encoding = message.encoding or settings.DEFAULT_CHARSET
    try:
        from_addr = sanitized(message.from_email, encoding)
        recipients = [sanitized(addr, encoding) for addr in recipients_raw]
        mime = message.message()
        # Before serializing: the generator may fail on (or fold into a line
        # break) the very characters refused here.
        _check_part_headers(mime)
        data = mime.as_bytes(linesep="\r\n")
        _check_header_block(data, DJANGO_HEADERS | extra_names)
        if mime.is_multipart():
            _check_parts_on_the_wire(mime, data)
    except InvalidMessageError:
        raise
    except (ValueError, MessageError, LookupError) as exc:
        # ValueError includes Django's BadHeaderError; MessageError what the
        # email package raises for control characters; LookupError an
        # unknown charset in an encoded word.
        raise InvalidMessageError(
            f"The message cannot be sent as it is ({type(exc).__name__}); nothing was sent."
        ) from None
    address = _addr_spec(from_addr).lower()
    for formatted in [from_addr, *recipients]:
        addr_spec = _addr_spec(formatted)
        local, _, domain = addr_spec.rpartition("@")
        if (
            not local
            or not domain
            or len(addr_spec) > MAX_ADDRESS_LENGTH
            or len(local) > MAX_LOCAL_PART_LENGTH
        ):
            raise InvalidMessageError("An address is malformed or too long; nothing was sent.")
    # A From or Sender header naming someone else would show the recipients
    # a sender other than the mailbox that authenticated.
    for name, value in message.extra_headers.items():
        if str(name).lower() in ("from", "sender"):
            try:
                shown = _addr_spec(sanitized(str(value), encoding)).lower()
            except ValueError:
                shown = None
            if shown != address:
                raise InvalidMessageError(
                    f"The {name} header names another address than the sender; nothing was sent."
                )
    return PreparedMessage(
        message=message,
        address=address,
        from_addr=from_addr,
        recipients=recipients,
        data=data,
        message_id=str(mime["Message-ID"] or ""),
    )


def _check_header_block(data: bytes, allowed: frozenset[str] | set[str]) -> None:
    """The bytes on the wire must hold no header line nobody asked for.

    Checked per logical header (continuation lines joined, as a reader
    unfolds them), so that an encoded word the generator folded across two
    lines is decoded whole. Only 7-bit bytes: Django encodes every non-ASCII
    header (RFC 2047), and a raw 8-bit byte could be a C1 control in Latin-1.
    """
    head = data.split(b"\r\n\r\n", 1)[0]
    if FORBIDDEN_BYTES_RE.search(head) or not head.isascii():
        raise InvalidMessageError("The header block has a control character; nothing was sent.")
    logical: list[bytes] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            raise InvalidMessageError("The header block has a bare line break; nothing was sent.")
        if line[:1] in (b" ", b"\t") and logical:
            logical[-1] += line
            continue
        name, colon, _value = line.partition(b":")
        if not colon or name.decode("ascii").lower() not in allowed:
            raise InvalidMessageError(
                "The message would carry an unexpected header line; nothing was sent."
            )
        logical.append(line)
    for header in logical:
        value = header.partition(b":")[2]
        if b"=?" in value:
            # An encoded word must not decode to a line break either: the
            # receiving side would show it as a new header.
            _check_text(value.decode("ascii"), "An encoded header")


def _check_text(text: str, what: str) -> None:
    """``text`` and the RFC 2047 encoded words in it must carry no forbidden character."""
    if FORBIDDEN_RE.search(text):
        raise InvalidMessageError(
            f"{what} contains a line break or control character; nothing was sent."
        )
    if "=?" in text:
        for chunk, charset in decode_header(text):
            decoded = (
                chunk.decode(charset or "ascii", "replace") if isinstance(chunk, bytes) else chunk
            )
            if FORBIDDEN_RE.search(decoded):
                raise InvalidMessageError(
                    f"{what} decodes to a line break or control character; nothing was sent."
                )


def _part_label(index: int, part: Message) -> str:
    # The content type as the email package normalizes it: never the caller's
    # raw text, which may be the very thing refused.
    return f"MIME part {index} ({part.get_content_type()})"


def _check_part_headers(mime: Message) -> None:
    """Check the headers of every part, the top level included, as set.

    Raises :class:`InvalidMessageError` naming the part (its position in
    ``walk()`` order, 0 being the top-level message, and its content type)
    and the header.
    """
    for index, part in enumerate(mime.walk()):
        label = "the message" if index == 0 else _part_label(index, part)
        for name, value in part.items():
            if not _is_header_name(str(name)):
                raise InvalidMessageError(
                    f"{label} has a header with an invalid name; nothing was sent."
                )
            what = f"The {name} header of {label}"
            text = str(value)
            if "\n" in text or "\r" in text:
                # Unfolded as a reader unfolds it: the email package folds
                # long and encoded values itself (a line break followed by
                # blank space); any other line break is refused below.
                text = _UNFOLD_RE.sub("", text)
            _check_text(text, what)
            if "*" in text:
                # RFC 2231 parameters (name*=charset'lang'percent-encoded,
                # continuations name*0*=...) as a reader decodes them; every
                # other parameter form was checked raw just above.
                for _key, param in part.get_params(header=name, failobj=[]) or []:
                    _check_text(_UNFOLD_RE.sub("", collapse_rfc2231_value(param)), what)


def _check_parts_on_the_wire(mime: Message, data: bytes) -> None:
    """The serialized ``data`` must parse back into ``mime``'s parts, each with
    the same header names and no forbidden character.

    A character the generator turned into a line break while folding would
    show here as another header line or a malformed header block.
    """
    parts = list(mime.walk())
    parsed = list(BytesParser(policy=compat32).parsebytes(data).walk())
    if len(parsed) != len(parts):
        raise InvalidMessageError(
            "The serialized message has another MIME structure than the message; nothing was sent."
        )
    for index, (part, wire) in enumerate(zip(parts[1:], parsed[1:], strict=True), start=1):
        expected = [str(name).lower() for name in part]
        if [name.lower() for name in wire] != expected or any(
            isinstance(defect, _HEADER_DEFECTS) for defect in wire.defects
        ):
            label = _part_label(index, part)
            raise InvalidMessageError(
                f"{label} would carry an unexpected header line; nothing was sent."
            )
        for name, value in wire.items():
            if not isinstance(value, str):
                # The parser keeps raw 8-bit header bytes as a Header: not
                # 7-bit, and a Latin-1 C1 control would hide in it.
                raise InvalidMessageError(
                    f"The {name} header of {_part_label(index, part)} has 8-bit bytes; "
                    "nothing was sent."
                )
            _check_text(
                _UNFOLD_RE.sub("", value), f"The {name} header of {_part_label(index, part)}"
            )
