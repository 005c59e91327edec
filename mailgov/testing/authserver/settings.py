"""Settings of the demo OAuth2/OIDC authorization server.

A separate Django project from the demo site, with its own SQLite database, so
that mailgov talks to it only over HTTP, as it would to Google or Microsoft.
Run it with ``python -m django <command> --settings=mailgov.testing.authserver.settings``
(no ``manage.py`` needed: it ships inside the package, for projects' own tests).

Environment:

``MAILGOV_AUTHSERVER_DIR``
    Data directory (default ``./var/authserver``): the SQLite database, the
    OIDC signing key and the ``SECRET_KEY``, the last two generated at first start
    (mode 0600).
``MAILGOV_AUTHSERVER_URL``
    Issuer and base URL (default ``http://127.0.0.1:8001``).
``MAILGOV_AUTHSERVER_ACCESS_TOKEN_SECONDS``
    Access token lifetime (default 3600).
``MAILGOV_AUTHSERVER_DEBUG``
    ``1`` turns ``DEBUG`` on; off by default.
``MAILGOV_AUTHSERVER_INSECURE_FAST_HASHING``
    ``1`` hashes passwords and client secrets with salted MD5 instead of PBKDF2,
    for throw-away test servers only: every client authentication otherwise costs
    about 0.3 s of CPU.

Fault switch: while ``<data directory>/faults.json`` holds e.g.
``{"token": 503}``, the token endpoint (or ``"revoke"``: the revocation
endpoint) answers that status with ``{"error": "temporarily_unavailable"}``;
see :mod:`mailgov.testing.authserver.faults` and ``AuthServer.set_faults()``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.exceptions import ImproperlyConfigured

DATA_DIR = Path(
    os.environ.get("MAILGOV_AUTHSERVER_DIR") or Path.cwd() / "var" / "authserver"
).resolve()
DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)


def _read_or_create(path: Path, make: Callable[[], bytes]) -> str:
    """Return the file's text, creating it with ``make()`` (mode 0600) if missing.

    Safe when several processes start at once (``migrate``, ``authserver_seed`` and
    ``runserver`` may overlap): the value is written to a private temporary file
    and then hard-linked into place, which fails if another process won the race,
    so every process ends up reading the same complete value.
    """
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(make())
            with contextlib.suppress(FileExistsError):  # another process won
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text(encoding="ascii")


def _make_rsa_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ImproperlyConfigured(f"{name} must be a positive whole number of seconds")
    return value


# Generated per data directory: a demo server still must not share a signing
# secret with every checkout of the repository.
SECRET_KEY = _read_or_create(
    DATA_DIR / "secret_key", lambda: secrets.token_urlsafe(50).encode("ascii")
).strip()
OIDC_RSA_PRIVATE_KEY = _read_or_create(DATA_DIR / "oidc_rsa_private_key.pem", _make_rsa_key)

ISSUER = os.environ.get("MAILGOV_AUTHSERVER_URL", "http://127.0.0.1:8001").rstrip("/")
_issuer_parts = urlsplit(ISSUER)
if _issuer_parts.scheme not in ("http", "https") or not _issuer_parts.hostname:
    raise ImproperlyConfigured("MAILGOV_AUTHSERVER_URL must be an absolute http(s) URL")
ACCESS_TOKEN_SECONDS = _env_seconds("MAILGOV_AUTHSERVER_ACCESS_TOKEN_SECONDS", 3600)

DEBUG = os.environ.get("MAILGOV_AUTHSERVER_DEBUG") == "1"
ALLOWED_HOSTS = sorted({"127.0.0.1", "localhost", _issuer_parts.hostname})

INSTALLED_APPS = [
    # Before oauth2_provider, so that our templates win where names collide.
    "mailgov.testing.authserver",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
]

MIDDLEWARE = [
    # Tests' fault switch (faults.json in DATA_DIR); does nothing without the file.
    "mailgov.testing.authserver.faults.FaultMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mailgov.testing.authserver.urls"
WSGI_APPLICATION = "mailgov.testing.authserver.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ],
        },
    },
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DATA_DIR / "db.sqlite3",
        "OPTIONS": {
            # The threaded dev server writes from several threads: take the write
            # lock at BEGIN (no lock-upgrade deadlocks) and wait for it.
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL;",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if os.environ.get("MAILGOV_AUTHSERVER_INSECURE_FAST_HASHING") == "1":
    # DOT hashes client secrets with the first hasher too (CLIENT_SECRET_HASHER).
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LANGUAGE_CODE = "en"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# The demo site runs on the same host (127.0.0.1:8000) and browsers do not
# separate cookies by port: with Django's default names the two sites would
# overwrite each other's session and CSRF cookies.
SESSION_COOKIE_NAME = "authserver_sessionid"
CSRF_COOKIE_NAME = "authserver_csrftoken"
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _issuer_parts.scheme == "https"
# The consent page is the one a clickjacker would frame.
X_FRAME_OPTIONS = "DENY"
# The authorization URL (state, PKCE challenge) must not reach other origins as a
# Referer; "no-referrer" would be stricter but makes browsers send `Origin: null`
# on our own forms, which Django's CSRF check refuses over HTTPS.
SECURE_REFERRER_POLICY = "same-origin"

OAUTH2_PROVIDER = {
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": OIDC_RSA_PRIVATE_KEY,
    "OIDC_ISS_ENDPOINT": ISSUER,
    "OIDC_RESPONSE_TYPES_SUPPORTED": ["code"],
    "OAUTH2_RESPONSE_TYPES_SUPPORTED": ["code"],
    "OAUTH2_GRANT_TYPES_SUPPORTED": ["authorization_code", "refresh_token", "client_credentials"],
    "OAUTH2_VALIDATOR_CLASS": "mailgov.testing.authserver.oauth.MailgovOAuth2Validator",
    "OIDC_SERVER_CLASS": "mailgov.testing.authserver.oauth.S256OnlyServer",
    "SCOPES_BACKEND_CLASS": "mailgov.testing.authserver.oauth.MailgovScopes",
    # Descriptions are what the consent page shows, so they are written for the
    # person who clicks "Allow".
    "SCOPES": {
        "openid": "Confirm who you are (your account on this server)",
        "email": "See your email address",
        "profile": "See your name",
        "mail.send": "Send email as you",
    },
    # A request without `scope` gets only sign-in, never the power to send mail.
    "DEFAULT_SCOPES": ["openid"],
    "PKCE_REQUIRED": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_SECONDS,
    "ID_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_SECONDS,
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 60,
    "REQUEST_APPROVAL_PROMPT": "force",
    # RFC 9700 gates of DOT 3.x (all default to the legacy behaviour): no plain
    # PKCE, no implicit or password grant, no access token in a query string,
    # tokens stored only as hashes, and the RFC 9207 `iss` in every
    # authorization response.
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,
    "COMPLIANT_BCP_RFC9700_REFRESH_TOKEN": True,
    "COMPLIANT_BCP_RFC9700_PKCE_REQUIRED": True,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        # oauthlib and DOT log whole requests, tokens included, at DEBUG.
        "oauthlib": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        "oauth2_provider": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
