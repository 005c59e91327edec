"""PKCE (RFC 7636), S256 only."""

from __future__ import annotations

import base64
import hashlib
import secrets


def code_challenge(verifier: str) -> str:
    """The S256 challenge of ``verifier``."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_pkce_pair() -> tuple[str, str]:
    """A fresh ``(verifier, challenge)``: 43 characters of verifier (256 bits)."""
    verifier = secrets.token_urlsafe(32)
    return verifier, code_challenge(verifier)
