"""Data-subject requests: export everything mailgov holds about a user, and erase it.

:func:`export_user` gathers one JSON-serialisable document: the user, their
mailboxes, consent receipts, send-log and outbox metadata, the notices sent
to them, refresh history and the audit entries about them or made by them.
It never holds a token, a ciphertext or a message body: it reads no
encrypted column at all (``MailboxCredentials`` is never loaded, the
outbox's ``payload`` is deferred).

:func:`erase_user` answers an erasure request:

1. every grant is revoked here at once and at the provider (queued and
   retried by the revocation sweep, :mod:`mailgov.revocation`);
2. outbox bodies of the user's mailboxes are deleted (what was still to be
   sent is cancelled), and the notices to the user are deleted;
3. the user's addresses, username and email are replaced by a keyed-hash
   pseudonym (``erased-<hex16>@invalid``) in the mailbox rows, the consent
   receipts (whose IP address and browser are cleared) and the audit trail.
   The same input always gives the same pseudonym, so counts, send logs and
   incident timelines still add up;
4. an :class:`~mailgov.models.ErasureRecord` says who erased whom (by
   pseudonym), when and how much, and becomes ``done`` once the
   revocations have happened (:func:`check_erasures`).

Mailbox rows are kept, revoked and pseudonymised, rather than deleted: the
send log and incident scopes refer to them by id, and the completion check
reads their revocation state. They go with the account when it is deleted.

Consent receipts are kept, pseudonymised, for
``MAILGOV_RECEIPT_RETENTION_DAYS`` after their grant ended and are then
purged (``mailgov_purge``): they are the controller's proof that each grant
was consented to (GDPR Art. 7(1)), which the law asks it to be able to show
even after the grant ended. They outlive the account too (``ConsentReceipt.user``
is set null), their retention running from when the grant ended
(``grant_ended_at``), not from the account's deletion.

Replacements match whole values only: an address or IP address is not
replaced inside a longer one (erasing ``bob@example.test`` leaves
``jimbob@example.test``), and a username is replaced in the rows about the
user or by them, and elsewhere only where mailgov wrote it as an actor
(``... by <username>``), never inside other words. A value that is already
a pseudonym is never pseudonymised again, so erasing twice (or erasing, then
deleting the account) keeps one pseudonym per value.

The pseudonym's key is derived from ``SECRET_KEY`` (``salted_hmac`` with a
salt of its own, HMAC-SHA256), not from the mailgov encryption keyring: the
keyring's keys are for AES-GCM only and are rotated as routine
(``mailgov_rotate_keys``), which would change every later pseudonym; a
pseudonym only needs to be consistent and not reversible without the key.

Deleting a user through Django (the admin, ``user.delete()``, a queryset)
runs the same erasure: see :func:`mailgov.receivers.erase_deleted_user`.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from auditlog.context import auditlog_value
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.db.models import Q, QuerySet
from django.db.models.signals import pre_save
from django.utils import timezone
from django.utils.crypto import salted_hmac

from mailgov.exceptions import UserLookupError
from mailgov.models import (
    AdminJob,
    ConsentReceipt,
    ErasureRecord,
    Incident,
    IncidentEvent,
    Mailbox,
    MailboxCredentials,
    OutboxAttempt,
    OutboxMessage,
    PendingRevocation,
    RefreshEvent,
    SendLog,
)
from mailgov.revocation import restart_given_up, revoke_mailbox

security_logger = logging.getLogger("mailgov.security")

__all__ = [
    "check_erasures",
    "erase_user",
    "export_user",
    "find_user",
    "pseudonym",
    "scrub_audit",
]

#: The salt of the pseudonyms' key (see the module docstring).
PSEUDONYM_SALT = "mailgov.privacy.pseudonym"

#: The revocation reason written to an erased user's mailboxes.
ERASURE_REASON = "erased: the owner's data was erased"

#: Statuses whose grant an erasure revokes.
LIVE = (Mailbox.Status.ACTIVE, Mailbox.Status.SUSPENDED, Mailbox.Status.NEEDS_RECONSENT)

#: Outbox states whose message was still to be sent: cancelled by an erasure
#: (a failed one only loses its body).
UNSENT = (OutboxMessage.State.QUEUED, OutboxMessage.State.HELD)

#: What replaces a receipt's IP address or browser in the audit trail.
CLEARED = "[erased]"


#: What :func:`pseudonym` returns: never pseudonymised again.
PSEUDONYM_RE = re.compile(r"erased-[0-9a-f]{16}(?:@invalid)?", re.IGNORECASE)


def pseudonym(value: str, *, address: bool = True) -> str:
    """The keyed-hash pseudonym of ``value`` (case-insensitive):
    ``erased-<hex16>@invalid`` for an address, ``erased-<hex16>`` otherwise."""
    digest = salted_hmac(PSEUDONYM_SALT, value.strip().lower(), algorithm="sha256").hexdigest()
    return f"erased-{digest[:16]}" + ("@invalid" if address else "")


def _is_pseudonym(value: str) -> bool:
    return PSEUDONYM_RE.fullmatch(value.strip()) is not None


#: The prefixes :func:`find_user` understands, and the lookup each makes.
LOOKUPS = ("id", "username", "email")


def find_user(identifier: str) -> Any:
    """The one user named by ``identifier``: ``id:<pk>``, ``username:<name>``,
    ``email:<address>`` (case-insensitive), or with no prefix any of them that
    fits. Raises :class:`~mailgov.exceptions.UserLookupError` when none does,
    or when more than one user does (the message lists their ids and the
    prefix that chooses)."""
    User = get_user_model()
    identifier = identifier.strip()
    kind, _sep, value = identifier.partition(":")
    if kind in LOOKUPS and value:
        kinds: tuple[str, ...] = (kind,)
    else:
        kinds, value = LOOKUPS, identifier
    if not value:
        raise UserLookupError("no user named: give a username, an email address or an id")
    has_email = any(field.name == "email" for field in User._meta.get_fields())
    found: dict[Any, list[str]] = {}
    for lookup in kinds:
        if lookup == "id":
            try:
                query = Q(pk=User._meta.pk.to_python(value))
            except Exception:  # ValidationError: not an id of this user model
                if kinds == ("id",):
                    raise UserLookupError(f"{value!r} is not a user id") from None
                continue
        elif lookup == "username":
            query = Q(**{User.USERNAME_FIELD: value})
        elif not has_email:
            if kinds == ("email",):
                raise UserLookupError("the user model has no email field")
            continue
        else:
            query = Q(email__iexact=value)
        for pk in User.objects.filter(query).values_list("pk", flat=True)[:10]:
            found.setdefault(pk, []).append(lookup)
    if not found:
        raise UserLookupError(f"no user with the {' or '.join(kinds)} {value!r}")
    if len(found) > 1:
        which = "; ".join(
            f"id {pk} (by {' and '.join(how)})" for pk, how in sorted(found.items(), key=str)
        )
        raise UserLookupError(
            f"{value!r} names more than one user: {which}. Choose one with a prefix: "
            f"id:<id>, username:<name> or email:<address>."
        )
    return User.objects.get(pk=next(iter(found)))


# -- export -------------------------------------------------------------------------------


def _date(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _content_types() -> dict[str, ContentType]:
    return {
        "user": ContentType.objects.get_for_model(get_user_model()),
        "mailbox": ContentType.objects.get_for_model(Mailbox),
        "receipt": ContentType.objects.get_for_model(ConsentReceipt),
        "outbox": ContentType.objects.get_for_model(OutboxMessage),
    }


def _audit_query(
    user: Any,
    mailbox_ids: list[str],
    receipt_ids: list[str],
    *,
    outbox_ids: list[str] | None = None,
    by_them: bool = False,
) -> Q:
    """Audit entries about ``user``, their mailboxes, receipts or outbox
    messages; with ``by_them``, also the entries of what they did (which name
    others, so they are scrubbed of the user but not exported to them)."""
    types = _content_types()
    query = (
        Q(content_type=types["user"], object_pk=str(user.pk))
        | Q(content_type=types["mailbox"], object_pk__in=mailbox_ids)
        | Q(content_type=types["receipt"], object_pk__in=receipt_ids)
    )
    if outbox_ids:
        query |= Q(content_type=types["outbox"], object_pk__in=outbox_ids)
    return query | Q(actor=user) if by_them else query


def export_user(user: Any) -> dict[str, Any]:
    """Everything mailgov holds about ``user``, as one JSON-serialisable
    document. No token, no ciphertext, no message body."""
    mailboxes = list(Mailbox.objects.filter(owner=user).order_by("connected_at"))
    mailbox_ids = [mailbox.pk for mailbox in mailboxes]
    receipts = list(ConsentReceipt.objects.filter(user=user).order_by("created_at"))
    # Never the payload column: not even loaded.
    outbox = (
        OutboxMessage.objects.filter(mailbox__in=mailbox_ids, kind=OutboxMessage.Kind.MAIL)
        .defer("payload")
        .order_by("created_at")
    )
    attempts: dict[Any, list[dict[str, Any]]] = {}
    for attempt in OutboxAttempt.objects.filter(message__in=outbox.values("pk")).order_by(
        "started_at"
    ):
        attempts.setdefault(attempt.message_id, []).append(
            {
                "started": _date(attempt.started_at),
                "finished": _date(attempt.finished_at),
                "outcome": attempt.outcome,
                "reply_code": attempt.reply_code,
                "error": attempt.error_code,
            }
        )
    notices = (
        OutboxMessage.objects.filter(recipient_user=user, kind=OutboxMessage.Kind.NOTIFICATION)
        .defer("payload")
        .order_by("created_at")
    )
    audit = LogEntry.objects.filter(
        _audit_query(
            user,
            [str(pk) for pk in mailbox_ids],
            [str(receipt.pk) for receipt in receipts],
            outbox_ids=[str(pk) for pk in outbox.values_list("pk", flat=True)],
        )
    ).order_by("timestamp", "pk")
    return {
        "format": "mailgov.export/1",
        "exported_at": _date(timezone.now()),
        "user": {
            "id": user.pk,
            "username": user.get_username(),
            "email": getattr(user, "email", ""),
            "date_joined": _date(getattr(user, "date_joined", None)),
        },
        "mailboxes": [
            {
                "id": str(mailbox.pk),
                "address": mailbox.address,
                "provider": mailbox.provider,
                "status": mailbox.status,
                "scopes": list(mailbox.scopes or []),
                "connected": _date(mailbox.connected_at),
                "last_used": _date(mailbox.last_used_at),
                "last_refreshed": _date(mailbox.last_refreshed_at),
                "revoked": _date(mailbox.revoked_at),
                "revocation_reason": mailbox.revocation_reason,
                "sending_paused_until": _date(mailbox.sending_paused_until),
                "sending_paused_reason": mailbox.sending_paused_reason,
            }
            for mailbox in mailboxes
        ],
        "consent_receipts": [
            {
                "time": _date(receipt.created_at),
                "mailbox": str(receipt.mailbox_id) if receipt.mailbox_id else None,
                "provider": receipt.provider,
                "address": receipt.address,
                "capability": receipt.capability,
                "action": receipt.action,
                "scopes_requested": receipt.scopes_requested,
                "scopes_granted": receipt.scopes_granted,
                "explanation_version": receipt.explanation_version,
                "ip_address": receipt.ip_address,
                "user_agent": receipt.user_agent,
                "grant_ended": _date(receipt.grant_ended_at),
            }
            for receipt in receipts
        ],
        "send_log": [
            {
                "mailbox": str(row.mailbox_id),
                "message_id": row.message_id,
                "status": row.status,
                "recipients": row.recipient_count,
                "error": row.error_class,
                "attempted": _date(row.attempted_at),
                "sent": _date(row.sent_at),
            }
            for row in SendLog.objects.filter(mailbox__in=mailbox_ids).order_by("attempted_at")
        ],
        "outbox": [
            {
                "mailbox": str(row.mailbox_id),
                "message_id": row.message_id,
                "state": row.state,
                "recipients": row.recipient_count,
                "attempts": row.attempts,
                "error": row.error_code,
                "reply_code": row.reply_code,
                "held_reason": row.held_reason,
                "queued": _date(row.created_at),
                "sent": _date(row.sent_at),
                "finished": _date(row.finished_at),
                "attempt_log": attempts.get(row.pk, []),
            }
            for row in outbox
        ],
        "notifications": [
            {
                "event": row.event,
                "mailbox": str(row.mailbox_id) if row.mailbox_id else None,
                "state": row.state,
                "queued": _date(row.created_at),
                "sent": _date(row.sent_at),
            }
            for row in notices
        ],
        "refresh_history": [
            {
                "mailbox": str(row.mailbox_id),
                "time": _date(row.at),
                "outcome": row.outcome,
                "error": row.error_code,
            }
            for row in RefreshEvent.objects.filter(mailbox__in=mailbox_ids).order_by("at")
        ],
        "audit_entries": [
            {
                "time": _date(entry.timestamp),
                "about": f"{entry.content_type.app_label}.{entry.content_type.model}",
                "object": entry.object_repr,
                "action": entry.get_action_display(),
                "changes": entry.changes,
            }
            for entry in audit.select_related("content_type")
        ],
    }


# -- erasure ------------------------------------------------------------------------------


def _user_pseudonym(user: Any) -> str:
    return pseudonym(f"user:{user.get_username()}", address=False)


def _replacements(user: Any, addresses: Iterable[str], cleared: Iterable[str]) -> dict[str, str]:
    """Original value (lowercased) -> what replaces it. Values that are
    pseudonyms already are left out: they are never pseudonymised again."""
    found: dict[str, str] = {}
    for address in addresses:
        if address and not _is_pseudonym(address):
            found[address.strip().lower()] = pseudonym(address)
    email = (getattr(user, "email", "") or "").strip()
    if email and not _is_pseudonym(email):
        found.setdefault(email.lower(), pseudonym(email))
    username = user.get_username()
    if username and not _is_pseudonym(username):
        found.setdefault(username.lower(), _user_pseudonym(user))
    for value in cleared:
        if value and value.lower() not in found:
            found[value.lower()] = CLEARED
    return found


#: Around a replaced value: not inside a longer address, name or number
#: (``bob@example.test`` is not replaced in ``jimbob@example.test`` nor in
#: ``bob@example.test.org``; a sentence's full stop may follow it).
_BEFORE = r"(?<![\w.+@-])"
_AFTER = r"(?![\w@-]|\.\w)"


def _pattern(replacements: dict[str, str], *, prefix: str = "") -> re.Pattern[str] | None:
    if not replacements:
        return None
    # Longest first: an address is replaced whole before the username inside it.
    words = sorted(replacements, key=len, reverse=True)
    alternatives = "|".join(re.escape(word) for word in words)
    return re.compile(f"{prefix}{_BEFORE}(?:{alternatives}){_AFTER}", re.IGNORECASE)


def _replace(value: Any, pattern: re.Pattern[str], replacements: dict[str, str]) -> Any:
    """``value`` with every whole match replaced; in JSON, values only (a
    key is a field name, never the user's data)."""
    if isinstance(value, str):
        return pattern.sub(lambda match: replacements[match.group(0).lower()], value)
    if isinstance(value, list):
        return [_replace(item, pattern, replacements) for item in value]
    if isinstance(value, dict):
        return {key: _replace(item, pattern, replacements) for key, item in value.items()}
    return value


#: mailgov's free-text columns that may quote an address or name an actor
#: (a governance reason is "admin: revoked by <username>"), in any row.
FREE_TEXT = (
    (Mailbox, ("revocation_reason", "sending_paused_reason")),
    (OutboxMessage, ("held_reason",)),
    (Incident, ("title", "summary", "notice_subject", "notice_body")),
    (IncidentEvent, ("note",)),
    (AdminJob, ("error",)),
)


def scrub_free_text(replacements: dict[str, str], username: str = "") -> int:
    """Replace the addresses of ``replacements`` (whole) in mailgov's
    free-text columns of every row, and ``username`` where a row names it as
    who acted (``by <username>``). Returns rows changed."""
    addresses = {key: value for key, value in replacements.items() if "@" in key}
    address_pattern = _pattern(addresses)
    actor = username.lower() if username and not _is_pseudonym(username) else ""
    actor_pattern = _pattern({actor: replacements[actor]}, prefix=r"(?<=\bby )") if actor else None

    def rewrite(text: str) -> str:
        if address_pattern is not None:
            text = _replace(text, address_pattern, addresses)
        if actor_pattern is not None:
            text = _replace(text, actor_pattern, replacements)
        return text

    changed = 0
    for model, fields in FREE_TEXT:
        query = Q(pk__in=[])
        for field in fields:
            for value in addresses:
                query |= Q(**{f"{field}__icontains": value})
            if actor:
                query |= Q(**{f"{field}__icontains": f"by {actor}"})
        changed += _rewrite(model.objects.filter(query), fields, rewrite)
    return changed


def _rewrite(
    rows: QuerySet, fields: Sequence[str], rewrite: Callable[[Any], Any], **cleared: Any
) -> int:
    """Rewrite ``fields`` of each row of ``rows`` with ``rewrite``, and set the
    fields of ``cleared`` to its values: one ``update()`` a row that changed
    (no signal, so no audit entry about the rewriting). Returns rows changed."""
    changed = 0
    for row in rows.only("pk", *fields, *cleared).iterator(chunk_size=500):
        values = {name: rewrite(getattr(row, name)) for name in fields} | cleared
        update = {name: value for name, value in values.items() if getattr(row, name) != value}
        if update:
            rows.model.objects.filter(pk=row.pk).update(**update)
            changed += 1
    return changed


#: The audit entries' text fields that may quote an erased value.
AUDIT_TEXT = ("object_repr", "changes_text", "actor_email")
AUDIT_JSON = ("changes", "additional_data", "serialized_data")


def scrub_audit(replacements: dict[str, str], related: Q | None = None) -> int:
    """Replace every occurrence of the keys of ``replacements`` in the audit
    trail: in the entries ``related`` (about the subject or by them), and in
    any entry whose text quotes one of the values that hold an ``@`` (an
    address is specific enough to be searched for everywhere; a username or
    a browser string is replaced only in related entries). Returns entries changed."""
    pattern = _pattern(replacements)
    if pattern is None:
        return 0
    query = Q(pk__in=[])
    if related is not None:
        query |= related
    for value in replacements:
        if "@" in value:
            for field in AUDIT_TEXT:
                query |= Q(**{f"{field}__icontains": value})
            # JSON as stored: SQLite keeps a non-ASCII character \u-escaped.
            for form in {value, json.dumps(value)[1:-1]}:
                for field in AUDIT_JSON:
                    query |= Q(**{f"{field}__icontains": form})
    # Related entries also lose where they came from (the subject's IP).
    cleared = {"remote_addr": None} if related is not None else {}
    return _rewrite(
        LogEntry.objects.filter(query),
        (*AUDIT_TEXT, *AUDIT_JSON),
        lambda value: _replace(value, pattern, replacements),
        **cleared,
    )


#: The erasure record's "by" when users erased their own data.
SELF_SERVICE = "the user (self-service)"


def _actor_label(actor: Any, user: Any = None) -> str:
    if getattr(actor, "is_authenticated", False):
        if user is not None and actor.pk == user.pk:
            return SELF_SERVICE  # never the erased username
        return actor.get_username()
    try:
        return f"shell ({getpass.getuser()})"
    except Exception:  # no login name (a container): still say it was not a person
        return "shell"


def erase_user(user: Any, *, actor: Any = None, delete_account: bool = False) -> ErasureRecord:
    """Erase what mailgov holds about ``user`` (see the module docstring);
    with ``delete_account``, delete the Django user too. Returns the record,
    ``done`` at once when no revocation at a provider is left to do."""
    with transaction.atomic():
        record = _erase(user, actor=actor)
        if delete_account:
            # The pre_delete receiver sees it is done; the post_delete one
            # scrubs what the cascade itself writes to the audit trail.
            user._mailgov_erasure = record
            user.delete()
    check_erasures([record])
    record.refresh_from_db()
    return record


def _erase(user: Any, *, actor: Any = None) -> ErasureRecord:
    now = timezone.now()
    counts: dict[str, int] = {}
    mailboxes = list(Mailbox.objects.filter(owner=user))
    mailbox_ids = [mailbox.pk for mailbox in mailboxes]
    # 1. Every grant first: revoked here at once, at the provider on commit
    # (and by the revocation sweep until the provider confirms).
    revoked = 0
    for mailbox in mailboxes:
        if mailbox.status in LIVE:
            revoke_mailbox(mailbox, ERASURE_REASON, defer=True)
            revoked += 1
    counts["grants_revoked"] = revoked
    # A revocation given up before (the provider unreachable too long) starts
    # a fresh series now: the erasure is done only when it has happened.
    counts["revocations_restarted"] = restart_given_up(mailbox_ids, now=now)
    # A revoked mailbox whose earlier revocation is still pending keeps its
    # refresh token for that; an access token is never needed again.
    MailboxCredentials.objects.filter(pk__in=mailbox_ids).update(access_token=None, expires_at=None)
    # 2. Bodies and notices.
    counts["outbox_cancelled"] = OutboxMessage.objects.filter(
        mailbox__in=mailbox_ids, kind=OutboxMessage.Kind.MAIL, state__in=UNSENT
    ).update(
        state=OutboxMessage.State.CANCELLED,
        error_code="erased",
        finished_at=now,
        payload=None,
        claim_id=None,
    )
    counts["outbox_bodies_deleted"] = OutboxMessage.objects.filter(
        mailbox__in=mailbox_ids, payload__isnull=False
    ).update(payload=None)
    counts["notifications_deleted"], _ = OutboxMessage.objects.filter(recipient_user=user).delete()
    # 3. Pseudonyms.
    receipts = ConsentReceipt.objects.filter(user=user)
    addresses = {mailbox.address for mailbox in mailboxes}
    addresses |= set(receipts.exclude(address="").values_list("address", flat=True))
    cleared = set()
    for ip, agent in receipts.values_list("ip_address", "user_agent"):
        cleared |= {ip, agent}
    replacements = _replacements(user, addresses, cleared)
    for address in addresses:
        if _is_pseudonym(address):
            continue  # erased before: one pseudonym per value
        Mailbox.objects.filter(pk__in=mailbox_ids, address__iexact=address).update(
            address=pseudonym(address)
        )
        receipts.filter(address__iexact=address).update(address=pseudonym(address))
    counts["mailboxes_pseudonymised"] = len(mailbox_ids)
    counts["receipts_pseudonymised"] = receipts.update(ip_address="", user_agent="")
    # Incident timelines and erasure records keep their counts; only who took
    # a step, or asked for an erasure, is renamed.
    counts["incident_steps_renamed"] = IncidentEvent.objects.filter(actor=user).update(
        actor_label=_user_pseudonym(user)
    )
    ErasureRecord.objects.filter(actor=user).update(actor_label=_user_pseudonym(user))
    counts["free_text_pseudonymised"] = scrub_free_text(replacements, user.get_username())
    outbox_ids = OutboxMessage.objects.filter(mailbox__in=mailbox_ids).values_list("pk", flat=True)
    related = _audit_query(
        user,
        [str(pk) for pk in mailbox_ids],
        [str(pk) for pk in receipts.values_list("pk", flat=True)],
        outbox_ids=[str(pk) for pk in outbox_ids],
        by_them=True,
    )
    counts["audit_entries_pseudonymised"] = scrub_audit(replacements, related)
    record = ErasureRecord.objects.create(
        user=user,
        pseudonym=_user_pseudonym(user),
        mailbox_ids=[str(pk) for pk in mailbox_ids],
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        actor_label=_actor_label(actor, user),
        counts=counts,
    )
    if record.actor_label == SELF_SERVICE:
        # The subject asked: the audit entry of the record itself names them
        # (auditlog's actor_email) and where they asked from.
        scrub_audit(
            replacements,
            Q(
                content_type=ContentType.objects.get_for_model(ErasureRecord),
                object_pk=str(record.pk),
            ),
        )
    # Kept on the instance for the account's deletion (see before_user_deleted).
    user._mailgov_replacements = replacements
    user._mailgov_related = related
    security_logger.info("erasure %s of user %s recorded: %s", record.pk, user.pk, counts)
    return record


# -- the account's deletion through Django ------------------------------------------------


def current_actor() -> Any:
    """The user django-auditlog's middleware says is acting (``None`` outside a request)."""
    try:
        context = auditlog_value.get()
    except LookupError:
        return None
    # auditlog never resets its context variable when the request ends: it
    # disconnects the request's receiver instead. The actor is current only
    # while that receiver is connected (auditlog's own test, _set_actor).
    duid = context.get("signal_duid")
    if not any(key[0] == duid for key, *_rest in pre_save.receivers):
        return None
    return context.get("actor")


def before_user_deleted(user: Any) -> None:
    """``pre_delete`` of a user (the admin, the ORM): erase first, unless
    :func:`erase_user` is the one deleting (recursion guard).

    Django collected the rows its cascade deletes before any ``pre_delete``
    receiver runs, and auditlog writes their deletion from those (old)
    instances: :func:`after_user_deleted` scrubs what it wrote."""
    if getattr(user, "_mailgov_erasure", None) is not None:
        return
    user._mailgov_erasure = _erase(user, actor=current_actor())


def after_user_deleted(user: Any) -> None:
    """``post_delete`` of a user, in the deletion's transaction: scrub the
    audit entries the cascade wrote, and record that the account went."""
    record = getattr(user, "_mailgov_erasure", None)
    if record is None:
        return
    scrub_audit(getattr(user, "_mailgov_replacements", {}), getattr(user, "_mailgov_related", None))
    # The record, and the audit entries of the erasure, were written after
    # Django collected what refers to the user: a user deleting their own
    # account is the actor of both, and a reference left to the deleted row
    # would fail the whole deletion at commit.
    ErasureRecord.objects.filter(pk=record.pk).update(user=None, account_deleted=True)
    ErasureRecord.objects.filter(actor_id=user.pk).update(actor=None)
    LogEntry.objects.filter(actor_id=user.pk).update(actor=None)
    transaction.on_commit(lambda: check_erasures(ErasureRecord.objects.filter(pk=record.pk)))


def note_revocation(mailbox_id: Any, outcome: str) -> int:
    """Count ``outcome`` (``revoked``, ``no_endpoint``, ``refused``) of a
    grant's revocation in the pending erasures that wait for it, so a record
    says how many grants the providers confirmed revoked and how many they
    could not (those tokens are wiped all the same). Returns records updated."""
    key = f"revocations_{outcome}"
    updated = 0
    # Few erasures are pending at a time; their mailbox lists are JSON.
    for record in ErasureRecord.objects.filter(status=ErasureRecord.Status.PENDING):
        if str(mailbox_id) in record.mailbox_ids:
            with transaction.atomic():
                locked = ErasureRecord.objects.select_for_update().get(pk=record.pk)
                counts = dict(locked.counts)
                counts[key] = counts.get(key, 0) + 1
                ErasureRecord.objects.filter(pk=record.pk).update(counts=counts)
            updated += 1
    if outcome != "revoked" and updated:
        security_logger.warning(
            "erased user's grant %s: revocation at the provider ended %s, not confirmed; "
            "the token is wiped here",
            mailbox_id,
            outcome,
        )
    return updated


def erasure_pending(record: ErasureRecord) -> bool:
    """Whether a grant of ``record``'s mailboxes still waits for its
    revocation at the provider."""
    ids = record.mailbox_ids
    return (
        PendingRevocation.objects.filter(mailbox_id__in=ids).exists()
        or MailboxCredentials.objects.filter(pk__in=ids, refresh_token__isnull=False).exists()
    )


def check_erasures(records: Iterable[ErasureRecord] | None = None) -> int:
    """Mark ``done`` the pending erasures (all, by default) whose revocations
    have all happened. Returns how many were."""
    if records is None:
        records = ErasureRecord.objects.filter(status=ErasureRecord.Status.PENDING)
    done = 0
    for record in records:
        if record.status == ErasureRecord.Status.PENDING and not erasure_pending(record):
            ErasureRecord.objects.filter(pk=record.pk).update(
                status=ErasureRecord.Status.DONE, finished_at=timezone.now()
            )
            done += 1
    return done
