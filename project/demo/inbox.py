"""Read the demo SMTP server's Maildir."""

from __future__ import annotations

import mailbox
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from pathlib import Path

from django.conf import settings


@dataclass
class InboxMessage:
    key: str
    subject: str
    sender: str
    to: str
    date: str
    auth_user: str
    auth_mechanism: str
    body: str


def _maildir() -> mailbox.Maildir | None:
    path = Path(settings.DEMO_MAILDIR)
    if not path.exists():
        return None
    return mailbox.Maildir(path, factory=None, create=False)


def _parse(key: str, raw: bytes, with_body: bool) -> InboxMessage:
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    body = ""
    if with_body:
        part = msg.get_body(preferencelist=("plain", "html"))
        body = part.get_content() if part is not None else ""
    return InboxMessage(
        key=key,
        subject=str(msg.get("Subject", "")),
        sender=str(msg.get("From", "")),
        to=str(msg.get("To", "")),
        date=str(msg.get("Date", "")),
        auth_user=str(msg.get("X-Mailgov-Auth-User", "")),
        auth_mechanism=str(msg.get("X-Mailgov-Auth-Mechanism", "")),
        body=body,
    )


def list_messages(limit: int = 200) -> list[InboxMessage]:
    box = _maildir()
    if box is None:
        return []
    items = []
    for key in box.iterkeys():
        path = Path(box._path) / box._lookup(key)
        items.append((path.stat().st_mtime, key, path))
    items.sort(reverse=True)
    return [_parse(key, path.read_bytes(), False) for _, key, path in items[:limit]]


def get_message(key: str) -> InboxMessage | None:
    box = _maildir()
    if box is None:
        return None
    try:
        raw = box.get_bytes(key)
    except KeyError:
        return None
    return _parse(key, raw, True)
