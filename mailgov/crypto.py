"""The keyring and AES-256-GCM envelope used by the encrypted fields.

Stored form, as text::

    mg1$<key id>$<hex(nonce[12] || ciphertext || tag[16])>

``mg1`` is the format version. The associated data binds each value to the
model, field and row it was written for, and to the key id in its header, so a
value copied to another row or field, or relabelled with another key id, fails
to decrypt instead of being read as someone else's token.

Keys come from ``MAILGOV_ENCRYPTION_KEYS`` (a list of ``key_id:base64key``, the
first one encrypts, all of them decrypt), or the environment variable of the
same name (comma separated), or the file named by
``MAILGOV_ENCRYPTION_KEYS_FILE`` (one entry a line, ``#`` comments allowed:
fits a secret mount). They are never derived from ``SECRET_KEY``: rotating
Django's signing key must not cost every stored token, and one secret must not
guard both sessions and mailboxes.

Without a valid keyring every operation raises :class:`KeyringError`; there is
no fallback that would store a token unencrypted.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailgov.conf import mailgov_settings
from mailgov.exceptions import DecryptionError, KeyringError

VERSION = "mg1"
SEPARATOR = "$"
NONCE_BYTES = 12  # 96 bits, the size GCM is defined for
KEY_BYTES = 32  # AES-256
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True)
class Keyring:
    """Parsed keys: ``primary_id`` encrypts, every id in ``ciphers`` decrypts."""

    primary_id: str
    ciphers: dict[str, AESGCM] = field(repr=False)
    # Precomputed header of values written under the primary key.
    primary_prefix: str = ""

    @property
    def key_ids(self) -> list[str]:
        return list(self.ciphers)


def parse_key_entries(entries: Iterable[str]) -> Keyring:
    """Parse ``key_id:base64key`` entries into a :class:`Keyring`.

    Raises :class:`KeyringError` for an empty list, a malformed entry, a bad
    key id, a key that is not 32 bytes, or a duplicated key id. Messages name
    the entry by position and key id, never by its key material.
    """
    ciphers: dict[str, AESGCM] = {}
    primary = None
    for position, raw in enumerate(entries, start=1):
        entry = raw.strip()
        key_id, sep, encoded = entry.partition(":")
        if not sep or not encoded:
            raise KeyringError(
                f"Encryption key entry {position} is malformed: expected 'key_id:base64key'.",
                code="malformed",
            )
        if not KEY_ID_RE.match(key_id):
            raise KeyringError(
                f"Encryption key entry {position} has an invalid key id: use 1-32 "
                "letters, digits, '_' or '-'.",
                code="malformed",
            )
        try:
            key = base64.b64decode(encoded.strip(), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise KeyringError(
                    f"Encryption key {key_id!r} (entry {position}) is not valid base64.",
                    code="malformed",
                ) from None
        if len(key) != KEY_BYTES:
            raise KeyringError(
                f"Encryption key {key_id!r} (entry {position}) is {len(key)} bytes; "
                f"AES-256 needs exactly {KEY_BYTES}.",
                code="length",
            )
        if key_id in ciphers:
            raise KeyringError(
                f"Encryption key id {key_id!r} appears more than once.", code="duplicate"
            )
        ciphers[key_id] = AESGCM(key)
        primary = primary or key_id
    if primary is None:
        raise KeyringError(
            "No encryption keys configured: set MAILGOV_ENCRYPTION_KEYS or "
            "MAILGOV_ENCRYPTION_KEYS_FILE (generate one with manage.py mailgov_generate_key).",
            code="missing",
        )
    return Keyring(primary, ciphers, f"{VERSION}{SEPARATOR}{primary}{SEPARATOR}")


def configured_key_entries() -> list[str]:
    """The raw key entries from settings, the environment or the key file.

    Raises :class:`KeyringError` when the file cannot be read.
    """
    keys = mailgov_settings.ENCRYPTION_KEYS
    if keys:
        if isinstance(keys, str):
            return [k for k in keys.split(",") if k.strip()]
        return list(keys)
    path = mailgov_settings.ENCRYPTION_KEYS_FILE
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(
                f"Cannot read MAILGOV_ENCRYPTION_KEYS_FILE {os.fspath(path)!r}: {exc.strerror}.",
                code="unreadable",
            ) from None
        return [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return []


_cache_lock = threading.Lock()
_cached: Keyring | None = None


def get_keyring() -> Keyring:
    """The process's keyring, parsed once and kept until :func:`reset_keyring`.

    ``setting_changed`` (``override_settings``) resets it; a process whose key
    file changes must be restarted or call :func:`reset_keyring`.
    """
    global _cached
    keyring = _cached
    if keyring is None:
        with _cache_lock:
            if _cached is None:
                _cached = parse_key_entries(configured_key_entries())
            keyring = _cached
    return keyring


def reset_keyring() -> None:
    global _cached
    with _cache_lock:
        _cached = None


def generate_key_entry(key_id: str) -> str:
    """A fresh ``key_id:base64key`` entry with a random 256-bit key."""
    if not KEY_ID_RE.match(key_id):
        raise ValueError("Key id must be 1-32 letters, digits, '_' or '-'.")
    return f"{key_id}:{base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def binding(label: str, field_name: str, pk: object) -> str:
    """What a value is bound to: ``<app.model>|<field>|<row pk>``.

    The associated data of a value is ``mg1|<binding>|<key id>``: a value
    copied to another row, field or model, or relabelled with another key id,
    fails to decrypt.
    """
    return f"{label}|{field_name}|{pk}"


def encrypt(plaintext: str, bound_to: str) -> str:
    """Encrypt ``plaintext`` under the primary key, bound to ``bound_to`` (see :func:`binding`)."""
    keyring = _cached or get_keyring()
    key_id = keyring.primary_id
    nonce = os.urandom(NONCE_BYTES)
    sealed = keyring.ciphers[key_id].encrypt(
        nonce, plaintext.encode(), f"{VERSION}|{bound_to}|{key_id}".encode()
    )
    # Hex rather than base64: decoding is about 3 times faster in CPython,
    # which keeps the vault near raw AES-GCM speed (make bench); tokens are
    # short, so the larger text costs little.
    return keyring.primary_prefix + (nonce + sealed).hex()


def key_id_of(value: str) -> str | None:
    """The key id in a stored value's header, or ``None`` if it is not one of ours."""
    parts = value.split(SEPARATOR, 2)
    if len(parts) != 3 or parts[0] != VERSION:
        return None
    return parts[1]


def is_envelope(value: object) -> bool:
    return isinstance(value, str) and key_id_of(value) is not None


def decrypt(value: str, bound_to: str) -> str:
    """Decrypt a stored value written for ``bound_to`` (see :func:`binding`).

    Raises :class:`DecryptionError` naming the row and field for any failure:
    a malformed value, an unknown key id, a tampered byte, a wrong key, or a
    value moved from another row or field. Never returns the ciphertext.
    """
    # Positional arguments and no work beyond the necessary on the hot path:
    # the vault is measured against raw AES-GCM. Messages are made on failure.
    try:
        version, key_id, body = value.split(SEPARATOR, 2)
    except (ValueError, AttributeError):
        raise _failure(bound_to, "not a mailgov ciphertext") from None
    if version != VERSION:
        raise _failure(bound_to, "not a mailgov ciphertext")
    cipher = (_cached or get_keyring()).ciphers.get(key_id)
    if cipher is None:
        raise _failure(bound_to, f"unknown key id {key_id!r}")
    try:
        blob = binascii.unhexlify(body)  # faster than bytes.fromhex()
    except (binascii.Error, ValueError):
        raise _failure(bound_to, "malformed value") from None
    try:
        return cipher.decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], f"{VERSION}|{bound_to}|{key_id}".encode()
        ).decode()
    except UnicodeDecodeError:  # pragma: no cover - only mailgov writes these values
        raise _failure(bound_to, "plaintext is not text") from None
    except (InvalidTag, ValueError):
        # ValueError: too short to hold a nonce (cryptography checks its size);
        # a value too short for the tag fails as InvalidTag.
        raise _failure(
            bound_to,
            "authentication failed (tampered value, wrong key, "
            "or a value copied from another row or field)",
        ) from None


def _failure(bound_to: str, reason: str) -> DecryptionError:
    label, field_name, pk = [*bound_to.split("|", 2), "?", "?"][:3]
    return DecryptionError(f"Cannot decrypt {label}.{field_name} of row {pk}: {reason}.")
