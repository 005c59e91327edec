"""``mailgov.validation.prepare_message``: every MIME part's headers, not only the top level.

These call the validator directly (no network); ``test_backend`` shows for a
few of the same forms that nothing reaches the SMTP server.
"""

from __future__ import annotations

from email.mime.base import MIMEBase
from email.mime.text import MIMEText

import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.message import sanitize_address
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgov import validation
from mailgov.exceptions import InvalidMessageError
from mailgov.validation import (
    DJANGO_HEADERS,
    _check_header_block,
    _check_parts_on_the_wire,
    prepare_message,
    sanitized,
)

# Every character class the rules name: C0 but TAB, DEL, C1, the Unicode line
# and paragraph separators.
FORBIDDEN = ["\r", "\n", "\x00", "\x0b", "\x0c", "\x1c", "\x1f", "\x7f", "\x80", "\x85", "\x9f"]
FORBIDDEN += ["\u2028", "\u2029"]
# A CRLF carried by the encodings a mail reader decodes.
ENCODED = [
    "=?utf-8?q?a=0D=0ABcc:_e@x.test?=.txt",  # RFC 2047 Q
    "=?utf-8?b?YQ0KQmNjOiBlQHgudGVzdA==?=",  # RFC 2047 B
    "=?utf-8?q?a=E2=80=A8b?=",  # U+2028, encoded
    "=?iso-8859-1?q?a=85b?=",  # NEL in Latin-1: C1 after decoding
]


def message(**fields) -> EmailMessage:
    defaults = {"subject": "Hi", "body": "x", "from_email": "a@x.test", "to": ["b@x.test"]}
    return EmailMessage(**{**defaults, **fields})


def with_part(name: str, value: str, subtype: str = "octet-stream") -> EmailMessage:
    """A message with one attached MIME part whose header ``name`` is ``value``."""
    part = MIMEBase("application", subtype)
    part.set_payload(b"x")
    part[name] = value
    mail = message()
    mail.attach(part)
    return mail


@pytest.mark.parametrize("char", FORBIDDEN, ids=repr)
def test_a_control_character_in_an_attachment_filename_is_refused(char):
    mail = message()
    mail.attach(f"report{char}Bcc: e@x.test.txt", b"data", "text/plain")
    with pytest.raises(InvalidMessageError, match=r"filename of attachment 1"):
        prepare_message(mail)


@pytest.mark.parametrize("filename", ENCODED)
def test_an_encoded_line_break_in_an_attachment_filename_is_refused(filename):
    mail = message()
    mail.attach(filename, b"data", "text/plain")
    with pytest.raises(InvalidMessageError, match="filename of attachment 1 decodes to"):
        prepare_message(mail)


def test_an_rfc2231_parameter_is_checked_as_decoded():
    # filename*=utf-8''...%0D%0A...: the raw header holds no control
    # character, the decoded parameter does.
    mail = with_part(
        "Content-Disposition", "attachment; filename*=utf-8''a%0D%0ABcc%3A%20e%40x.test"
    )
    with pytest.raises(InvalidMessageError, match="Content-Disposition header of MIME part 2"):
        prepare_message(mail)


def test_an_attachment_mimetype_with_a_line_break_is_refused():
    mail = message()
    mail.attach("f.txt", b"data", "text/plain\x0bBcc: e@x.test")
    with pytest.raises(InvalidMessageError, match="MIME type of attachment 1"):
        prepare_message(mail)


@pytest.mark.parametrize("char", ["\x0b", "\x85", "\u2028", "\x00"], ids=repr)
@pytest.mark.parametrize("header", ["X-Note", "Content-ID", "Content-Description"])
def test_any_header_of_a_custom_part_is_checked(header, char):
    mail = with_part(header, f"a{char}Bcc: e@x.test")
    with pytest.raises(InvalidMessageError, match=f"The {header} header of MIME part 2"):
        prepare_message(mail)


def test_an_invalid_header_name_in_a_part_is_refused():
    mail = with_part("Bad Name", "v")
    with pytest.raises(InvalidMessageError, match=r"MIME part 2 .* invalid name"):
        prepare_message(mail)


def test_an_alternative_part_is_checked():
    mail = EmailMultiAlternatives("Hi", "x", "a@x.test", ["b@x.test"])
    html = MIMEText("<p>x</p>", "html")
    html["Content-Description"] = "=?utf-8?q?x=0D=0ABcc:_e@x.test?="
    mail.attach(html)
    with pytest.raises(InvalidMessageError, match="Content-Description header of MIME part 2"):
        prepare_message(mail)


def test_an_attached_message_is_checked_all_the_way_down():
    inner = message(subject="Forwarded", headers={"X-Trace": "ok"})
    inner_mime = inner.message()
    inner_mime.replace_header("X-Trace", "a\x85Bcc: e@x.test")
    outer = message()
    outer.attach(None, inner_mime, "message/rfc822")
    with pytest.raises(InvalidMessageError, match="X-Trace header of MIME part 3"):
        prepare_message(outer)


def test_the_part_is_named_by_position_and_type_never_by_its_content():
    mail = message()
    mail.attach("fine.txt", b"data", "text/plain")
    mail.attach("secret-plan\x0b.pdf", b"data", "application/pdf")
    with pytest.raises(InvalidMessageError) as caught:
        prepare_message(mail)
    assert "attachment 2" in str(caught.value)
    assert "secret-plan" not in str(caught.value)
    part = MIMEBase("application", "pdf")
    part.set_payload(b"x")
    part["Content-Disposition"] = 'attachment; filename="secret-plan\x0b.pdf"'
    mail = message()
    mail.attach("fine.txt", b"data", "text/plain")
    mail.attach(part)
    with pytest.raises(InvalidMessageError) as caught:
        prepare_message(mail)
    assert "MIME part 3 (application/pdf)" in str(caught.value)
    assert "secret-plan" not in str(caught.value)


@pytest.mark.parametrize(
    "filename",
    ["report.pdf", "résumé - final.pdf", "x" * 300 + ".txt", "a\tb.txt", "日本語.txt"],
)
def test_ordinary_attachments_pass(filename):
    mail = message()
    mail.attach(filename, b"data", "application/octet-stream")
    alt = EmailMultiAlternatives("Hi", "x", "a@x.test", ["b@x.test"])
    alt.attach_alternative("<p>x</p>", "text/html")
    alt.attach(filename, "text", "text/plain")
    for item in (mail, alt):
        prepared = prepare_message(item)
        assert prepared.data.count(b"\r\n--") >= 2


def test_the_wire_check_sees_a_header_line_the_part_does_not_have():
    # Defence in depth: were a value check ever to miss a character that the
    # generator turns into a line break, the serialized part would carry a
    # header line its part does not, and the parse-back comparison refuses it.
    mail = message()
    mail.attach("f.txt", b"data", "text/plain")
    mime = mail.message()
    data = mime.as_bytes(linesep="\r\n")
    assert _check_parts_on_the_wire(mime, data) is None
    tampered = data.replace(b'filename="f.txt"\r\n', b'filename="f.txt"\r\nBcc: e@x.test\r\n', 1)
    assert tampered != data
    with pytest.raises(InvalidMessageError, match=r"MIME part 2 .*unexpected header line"):
        _check_parts_on_the_wire(mime, tampered)
    broken = data.replace(b'filename="f.txt"\r\n', b'filename="f\r\nBcc e@x.test"\r\n', 1)
    with pytest.raises(InvalidMessageError, match="MIME part 2"):
        _check_parts_on_the_wire(mime, broken)


# -- from the review: the top level gets the same decoded-form checks ----------
@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Disposition": "inline; filename*=utf-8''a%0D%0ABcc%3A%20x%40evil.test"},
        {"X-Foo": "a; name*=utf-8''%C2%85"},
    ],
    ids=["rfc2231-crlf", "rfc2231-nel"],
)
@pytest.mark.parametrize("multipart", [False, True], ids=["single", "multipart"])
def test_an_rfc2231_parameter_of_a_top_level_header_is_checked(headers, multipart):
    mail = message(headers=headers)
    if multipart:
        mail.attach("f.txt", b"data", "text/plain")
    with pytest.raises(InvalidMessageError, match="header of the message"):
        prepare_message(mail)


@pytest.mark.parametrize("field", ["subject", "X-Note"])
def test_an_encoded_word_folded_in_two_is_decoded_whole(field):
    # The generator folds this long encoded word inside itself; a reader
    # unfolds and decodes it to a CRLF and a Bcc line.
    value = "=?utf-8?q?" + "x" * 70 + " =0D=0ABcc:_evil@x.test?="
    mail = message(subject=value) if field == "subject" else message(headers={field: value})
    with pytest.raises(InvalidMessageError, match="decodes to a line break"):
        prepare_message(mail)


def test_the_header_block_check_unfolds_before_decoding():
    folded = b"Subject: =?utf-8?q?" + b"x" * 60 + b"\r\n =0D=0ABcc:_evil@x.test?=\r\n\r\nbody"
    with pytest.raises(InvalidMessageError, match="decodes to"):
        _check_header_block(folded, DJANGO_HEADERS)
    fine = b"Subject: =?utf-8?q?caf=C3=A9?=\r\n =?utf-8?q?_ok?=\r\n\r\nx"
    _check_header_block(fine, DJANGO_HEADERS)


def test_raw_8bit_header_bytes_are_refused_not_a_crash():
    mail = message()
    mail.attach(None, "Subject: caf\xe9\r\n\r\nbody", "message/rfc822")
    with pytest.raises(InvalidMessageError, match="8-bit"):
        prepare_message(mail)
    with pytest.raises(InvalidMessageError):
        _check_header_block("Subject: caf\xe9\r\n\r\nx".encode("latin-1"), DJANGO_HEADERS)


@pytest.mark.parametrize(
    "subject", ["word " * 40, "Grüße aus Köln " * 8, "=?utf-8?q?caf=C3=A9?="], ids=repr
)
def test_long_and_non_ascii_subjects_folded_by_the_email_package_pass(subject):
    assert prepare_message(message(subject=subject)).data


# -- the fast path of address sanitizing -------------------------------------------


@given(
    st.text(alphabet="abcXYZ019._+-@=!#\"' <>()[]:;,\\é", min_size=1, max_size=40)
    | st.from_regex(
        r"[A-Za-z0-9_+-]{1,12}(\.[A-Za-z0-9_+-]{1,8}){0,2}@[a-zA-Z0-9-]{1,10}(\.[a-z]{2,5}){1,2}",
        fullmatch=True,
    )
)
@settings(max_examples=500, deadline=None)
def test_the_fast_path_gives_what_django_gives(address):
    def outcome(function):
        try:
            return function(address, "utf-8")
        except Exception:
            return "refused"

    assert outcome(sanitized) == outcome(sanitize_address)


@pytest.mark.parametrize("address", ['"', "0@[", "a@", "@b", "a@b@c"])
@pytest.mark.parametrize("role", ["from_email", "to"])
def test_an_unparsable_address_is_a_clear_refusal(address, role):
    fields = {"from_email": "alice@example.test", "to": ["bob@example.test"]}
    fields[role] = address if role == "from_email" else [address]
    with pytest.raises(InvalidMessageError):
        prepare_message(EmailMessage("s", "b", **fields))


def test_the_fast_path_takes_only_plain_addresses(monkeypatch):
    calls = []
    real = validation.sanitize_address
    monkeypatch.setattr(validation, "sanitize_address", lambda a, e: calls.append(a) or real(a, e))
    for plain in ("alice@example.test", "a.b+tag_1-x@mail.example.co.uk"):
        assert sanitized(plain, "utf-8") == plain
    assert calls == []
    for other in ("Alice <alice@example.test>", "ali ce@example.test", "a@b", "é@example.test"):
        sanitized(other, "utf-8")
    assert len(calls) == 4
