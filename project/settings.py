"""Settings of the demo site (and the base of the test settings).

Runs on embedded defaults: SQLite in ``var/``, a generated secret key, a
generated encryption key file, and the demo authorization server and SMTP
server that ``make demo`` starts. ``DATABASE_URL`` selects PostgreSQL.

Everything secret or site-specific comes from the environment; the README's
"Deploying" section lists every variable read here (a test keeps the two
lists equal). With ``DJANGO_DEBUG=0`` (production: HSTS, HTTPS redirect,
secure cookies) nothing falls back to the demo's embedded defaults: a
missing ``DJANGO_SECRET_KEY`` stops the import with an
``ImproperlyConfigured`` that names it (a generated key is never right off
DEBUG), and so does a missing ``DATABASE_URL`` or ``CELERY_BROKER_URL``,
unless ``MAILGOV_DEMO=1`` asks for the demo's SQLite and filesystem broker.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from mailgov.schedule import beat_schedule
from project.localsecrets import secret_from_file

BASE_DIR = Path(__file__).resolve().parent.parent
# The demo's writable state (SQLite, generated secrets, the filesystem broker,
# beat's schedule file). Created below in the demo only: a production image
# may be read-only, and needs it only for beat's schedule (give beat a
# writable MAILGOV_VAR_DIR, or --schedule).
VAR_DIR = Path(os.environ.get("MAILGOV_VAR_DIR", BASE_DIR / "var"))


def env_flag(name: str, default: bool) -> bool:
    """``1``/``true``/``yes``/``on`` (any case) or ``0``/``false``/``no``/``off``."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={value!r}: expected 1 or 0")


def env_list(name: str, default: list[str]) -> list[str]:
    """A comma-separated list (blanks dropped), or ``default`` when unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_int(name: str, default: int | None) -> int | None:
    """A whole number, or ``default`` when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: expected a whole number") from None


def env_secret(name: str) -> str:
    """``name``'s value, else the content of the file named by ``name_FILE``
    (a secret mount), else empty."""
    if os.environ.get(name):
        return os.environ[name]
    if os.environ.get(name + "_FILE"):
        return Path(os.environ[name + "_FILE"]).read_text().strip()
    return ""


def required_env(name: str, why: str) -> str:
    """``name``'s value; in production (not the demo) it must be set."""
    value = os.environ.get(name, "")
    if not value and not (DEBUG or DEMO):
        raise ImproperlyConfigured(
            f"DJANGO_DEBUG=0 needs {name} ({why}); MAILGOV_DEMO=1 runs the demo's "
            "embedded default instead"
        )
    return value


# The demo runs with DEBUG on; a deployment sets DJANGO_DEBUG=0 (see "Deploying"
# in the README), which turns on the production security settings below.
DEBUG = env_flag("DJANGO_DEBUG", True)
# The demo's parts (its provider, the authorization server `make demo` starts
# on this host; its sender address) only in the demo: with DJANGO_DEBUG=0
# the demo provider is neither a mailgov provider nor a sign-in button,
# unless MAILGOV_DEMO=1 asks for it.
DEMO = env_flag("MAILGOV_DEMO", DEBUG)
if DEBUG or DEMO:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
if os.environ.get("DJANGO_SECRET_KEY_FILE"):  # a secret mount
    SECRET_KEY = Path(os.environ["DJANGO_SECRET_KEY_FILE"]).read_text().strip()
elif os.environ.get("DJANGO_SECRET_KEY"):
    SECRET_KEY = os.environ["DJANGO_SECRET_KEY"]
elif DEBUG:
    SECRET_KEY = secret_from_file(VAR_DIR / "secret_key")
else:
    # Never a key generated into var/ in production: it would differ per host.
    raise ImproperlyConfigured("DJANGO_DEBUG=0 needs DJANGO_SECRET_KEY or DJANGO_SECRET_KEY_FILE")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
# Origins (scheme://host[:port]) allowed to POST, when they differ from the Host
# header, e.g. behind a proxy that rewrites it.
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "auditlog",
    "mailgov",
    # Before allauth: its templates (the authentication error page) win.
    "mailgov.contrib.allauth",
    "allauth",
    "allauth.account",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "allauth.socialaccount.providers.google",
    "allauth.socialaccount.providers.microsoft",
    # django-csp: its system checks (the policy itself is set by the middleware).
    "csp",
    # Metrics (/metrics) and health checks (/health/...): see project/urls.py.
    "django_prometheus",
    "health_check",
    "project.demo",
]

MIDDLEWARE = [
    # First and last: django-prometheus times the whole request.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # The Content-Security-Policy header (CONTENT_SECURITY_POLICY below).
    "project.csp.ProviderFormActionCSPMiddleware",
    "auditlog.middleware.AuditlogMiddleware",
    # After auditlog's: every request gets a correlation id for its audit entries.
    "mailgov.middleware.CorrelationIdMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django_ratelimit.middleware.RatelimitMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]

ROOT_URLCONF = "project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "mailgov.contrib.allauth.context_processors.mailbox_alerts",
            ],
        },
    },
]
WSGI_APPLICATION = "project.wsgi.application"


def database_config(default_sqlite: Path) -> dict:
    """``DATABASE_URL`` (via dj-database-url) or, in the demo, SQLite at ``default_sqlite``."""
    url = required_env("DATABASE_URL", "e.g. postgres://user@host:5432/mailgov")
    config = dj_database_url.parse(url or f"sqlite:///{default_sqlite}", conn_max_age=0)
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config.setdefault("OPTIONS", {}).update(
            # Single-flight token refresh across processes: take the write
            # lock at BEGIN (select_for_update() is a no-op on SQLite). The
            # lock timeout exceeds the HTTP timeout of a refresh.
            {
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                # WAL: readers never wait for the writer, and a commit costs
                # one fsync instead of several.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            }
        )
    return config


DATABASES = {"default": database_config(VAR_DIR / "db.sqlite3")}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"


def cache_config(url: str) -> dict:
    """``DJANGO_CACHE_URL``: ``redis://`` or ``rediss://`` (Django's own
    RedisCache), or empty for a per-process memory cache (the demo)."""
    if not url:
        return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    if url.startswith(("redis://", "rediss://", "unix://")):
        return {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    raise ImproperlyConfigured("DJANGO_CACHE_URL: expected a redis:// or rediss:// URL")


# The rate limits of the sign-in and consent pages count in the cache: with
# several processes (gunicorn workers, hosts), a shared cache makes them one
# limit, not one per process.
CACHES = {"default": cache_config(env_secret("DJANGO_CACHE_URL"))}

# --- security headers --------------------------------------------------------
# On every page, in the demo too: no framing, no sniffing, a same-origin
# referrer (the consent flow sets its own, stricter Referrer-Policy per
# response: mailgov.contrib.allauth.headers).
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# No inline script or style anywhere (the pages load static files only).
# form-action also gets the origin of every configured provider's
# authorization endpoint, at request time (project.csp): Chromium applies it
# to the redirect that answers the consent and sign-in forms.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "form-action": ["'self'", *env_list("DJANGO_CSP_FORM_ACTION", [])],
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
        "object-src": ["'none'"],
    },
}
if not DEBUG:
    # HTTPS only: a year of HSTS (with subdomains, and eligible for the
    # browsers' preload lists), cookies never sent in clear.
    SECURE_HSTS_SECONDS = 365 * 24 * 3600
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_SSL_REDIRECT = env_flag("DJANGO_SECURE_SSL_REDIRECT", True)
    # Probes and the Prometheus scraper talk plain HTTP to the process itself,
    # inside the cluster: a redirect to https:// would fail them.
    SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
# Behind a proxy: the client's address (rate limits, consent receipts) from
# the header the proxy sets. X-Forwarded-For: the entry written by the
# outermost of DJANGO_TRUSTED_PROXY_COUNT proxies (project.clientip); any
# other header (X-Real-IP) as django-ratelimit reads it, one value. Unset:
# the connecting peer, REMOTE_ADDR.
TRUSTED_PROXY_COUNT = env_int("DJANGO_TRUSTED_PROXY_COUNT", 1)
if TRUSTED_PROXY_COUNT < 1:
    raise ImproperlyConfigured("DJANGO_TRUSTED_PROXY_COUNT: expected 1 or more")
if os.environ.get("DJANGO_CLIENT_IP_HEADER"):
    _ip_header = os.environ["DJANGO_CLIENT_IP_HEADER"].strip().upper().replace("-", "_")
    RATELIMIT_IP_META_KEY = (
        "project.clientip.forwarded_for"
        if _ip_header == "X_FORWARDED_FOR"
        else f"HTTP_{_ip_header}"
    )
# /metrics (project.monitoring): a bearer token and/or the networks allowed to
# scrape; with neither, open in the demo (DEBUG) and 404 in production.
METRICS_TOKEN = env_secret("DJANGO_METRICS_TOKEN")
METRICS_ALLOWED_NETWORKS = env_list("DJANGO_METRICS_ALLOWED_IPS", [])
for _network in METRICS_ALLOWED_NETWORKS:
    try:
        ipaddress.ip_network(_network, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"DJANGO_METRICS_ALLOWED_IPS: {_network!r} is not an address or network"
        ) from None
METRICS_OPEN = DEBUG
# Behind a proxy that terminates TLS: DJANGO_SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto
# (only if the proxy always sets or overwrites that header), so that Django
# knows the request came over HTTPS.
if os.environ.get("DJANGO_SECURE_PROXY_SSL_HEADER"):
    _header = os.environ["DJANGO_SECURE_PROXY_SSL_HEADER"].upper().replace("-", "_")
    SECURE_PROXY_SSL_HEADER = (f"HTTP_{_header}", "https")

EMAIL_BACKEND = "mailgov.backends.smtp.EmailBackend"
# The queued backend (mailgov.backends.queued) stores each message in the
# outbox, in the caller's transaction, for the Celery workers to send.
DEFAULT_FROM_EMAIL = os.environ.get("DJANGO_DEFAULT_FROM_EMAIL") or (
    "alice@example.test" if DEMO else "webmaster@localhost"
)

# --- mailgov ---------------------------------------------------------------
MAILGOV_ENCRYPTION_KEYS_FILE = os.environ.get(
    "MAILGOV_ENCRYPTION_KEYS_FILE", str(VAR_DIR / "mailgov-keys.txt")
)
AUTHSERVER_URL = os.environ.get("MAILGOV_AUTHSERVER_URL", "http://127.0.0.1:8001")
DEMO_SMTP_PORT = env_int("MAILGOV_DEMO_SMTP_PORT", 8025)
DEMO_TLS_DIR = Path(os.environ.get("MAILGOV_DEMO_TLS_DIR", VAR_DIR / "tls"))
DEMO_MAILDIR = Path(os.environ.get("MAILGOV_DEMO_MAILDIR", VAR_DIR / "mail"))
MAILGOV_PROVIDERS = {}
if DEMO:
    MAILGOV_PROVIDERS["demo"] = {
        "type": "oidc",
        "name": "Demo identity provider",
        "server_url": AUTHSERVER_URL,
        "client_id": os.environ.get("MAILGOV_DEMO_CLIENT_ID", "mailgov-demo"),
        # Random per checkout, shared with the demo authorization server by
        # `make demo` through this file.
        "client_secret": os.environ.get("MAILGOV_DEMO_CLIENT_SECRET")
        or secret_from_file(VAR_DIR / "demo-client-secret"),
        "send_scopes": ["mail.send"],
        "smtp_host": "127.0.0.1",
        "smtp_port": DEMO_SMTP_PORT,
        "smtp_security": "starttls",
        # The demo trusts the locally generated CA alone.
        "ca_bundle": str(DEMO_TLS_DIR / "ca.pem"),
    }
DEMO_REDIRECT_URI = os.environ.get(
    "MAILGOV_DEMO_REDIRECT_URI", "http://127.0.0.1:8000/demo/oauth/callback/"
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"mailgov": {"handlers": ["console"], "level": "INFO"}},
}

# --- background work (Celery) ----------------------------------------------------
# Embedded default (the demo): kombu's filesystem transport under var/broker
# (one host, no server to install). Production: CELERY_BROKER_URL=redis://...
# or amqp://..., required.
CELERY_BROKER_URL = (
    required_env("CELERY_BROKER_URL", "e.g. redis://host:6379/0 or amqp://...")
    or "filesystem://localhost/"
)


def filesystem_broker(folder: Path) -> dict[str, object]:
    """kombu's filesystem transport options for a broker in ``folder``
    (its subfolders created)."""
    for name in ("queue", "processed", "control"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "store_processed": False,
        # Broadcast (worker control) messages; kombu's default is ./control.
        "control_folder": str(folder / "control"),
        # Files are polled for: every 0.2 s instead of every second.
        "polling_interval": 0.2,
    }


if CELERY_BROKER_URL.startswith("filesystem://"):
    BROKER_DIR = Path(os.environ.get("MAILGOV_BROKER_DIR", VAR_DIR / "broker"))
    CELERY_BROKER_TRANSPORT_OPTIONS = filesystem_broker(BROKER_DIR)
else:
    # Redis: a task not acknowledged within the visibility timeout is given to
    # another worker. mailgov's tasks never use countdowns, and the outbox
    # rows, not the broker, decide what is sent, so redelivery is harmless.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
    if os.environ.get("CELERY_BROKER_KEYPREFIX"):
        CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = os.environ["CELERY_BROKER_KEYPREFIX"]
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = beat_schedule()
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- sign-in (django-allauth) and consent ----------------------------------------
# Sign-in asks for identity only; mail access is asked for later, on mailgov's
# consent page, which decides the scopes itself. Tokens never go to allauth's
# SocialToken: mailgov's adapter puts them into its encrypted vault.
SOCIALACCOUNT_STORE_TOKENS = False
SOCIALACCOUNT_ADAPTER = "mailgov.contrib.allauth.adapter.MailgovSocialAccountAdapter"
SOCIALACCOUNT_LOGIN_ON_GET = False
SOCIALACCOUNT_EMAIL_AUTHENTICATION = True
SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT = True
ACCOUNT_EMAIL_VERIFICATION = "none"
ACCOUNT_ADAPTER = "project.demo.adapters.DemoAccountAdapter"
# Behind a proxy, DJANGO_CLIENT_IP_HEADER (RATELIMIT_IP_META_KEY above) makes
# rate limits and consent receipts see the client's address, not the proxy's.
RATELIMIT_VIEW = "mailgov.contrib.allauth.views.ratelimited"
IDENTITY_SCOPES = ["openid", "email", "profile"]


def _app(client_id_env: str, secret_env: str, **extra) -> list[dict]:
    """An allauth app from the environment (or a secret file): never from the database."""
    client_id = os.environ.get(client_id_env)
    if not client_id:
        return []
    return [{"client_id": client_id, "secret": env_secret(secret_env), **extra}]


SOCIALACCOUNT_PROVIDERS = {
    "openid_connect": {
        "OAUTH_PKCE_ENABLED": True,
        "APPS": [
            {
                "provider_id": "demo",
                "name": "Demo identity provider",
                "client_id": MAILGOV_PROVIDERS["demo"]["client_id"],
                "secret": MAILGOV_PROVIDERS["demo"]["client_secret"],
                "settings": {
                    "server_url": AUTHSERVER_URL,
                    "oauth_pkce_enabled": True,
                    "token_auth_method": "client_secret_post",
                    "scope": IDENTITY_SCOPES,
                },
            }
        ]
        if DEMO
        else [],
    },
    "google": {
        "OAUTH_PKCE_ENABLED": True,
        "SCOPE": IDENTITY_SCOPES,
        "APPS": _app("GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET"),
    },
    "microsoft": {
        "OAUTH_PKCE_ENABLED": True,
        "SCOPE": ["openid", "email", "profile", "User.Read"],
        "APPS": _app(
            "MICROSOFT_CLIENT_ID", "MICROSOFT_CLIENT_SECRET", settings={"tenant": "organizations"}
        ),
    },
}
for _provider_id, _allauth_id in (("google", "google"), ("microsoft", "microsoft")):
    if SOCIALACCOUNT_PROVIDERS[_allauth_id]["APPS"]:
        _app_config = SOCIALACCOUNT_PROVIDERS[_allauth_id]["APPS"][0]
        MAILGOV_PROVIDERS[_provider_id] = {
            "client_id": _app_config["client_id"],
            "client_secret": _app_config["secret"],
            **({"tenant": "organizations"} if _provider_id == "microsoft" else {}),
        }
# Owner notices (re-consent needed, incident notices) go out from the site's
# own system mailbox, over plain SMTP with a password or relay: not through
# mailgov's backend, which sends as connected users only. The demo prints
# them to the console: its only SMTP server accepts mail from connected
# mailboxes, and there is no system mailbox.
MAILGOV_NOTIFICATION_BACKEND = os.environ.get("MAILGOV_NOTIFICATION_BACKEND") or (
    "django.core.mail.backends.console.EmailBackend"
    if DEBUG
    else "django.core.mail.backends.smtp.EmailBackend"
)
MAILGOV_NOTIFICATION_FROM = os.environ.get("MAILGOV_NOTIFICATION_FROM") or None
MAILGOV_SITE_URL = os.environ.get("MAILGOV_SITE_URL") or None
# Shown on the protection page; never a made-up address in production
# (unset, the page says to use the site's contact details).
MAILGOV_SECURITY_CONTACT = os.environ.get("MAILGOV_SECURITY_CONTACT") or (
    "security@example.test" if DEMO else None
)
# Each Celery worker serves its own counters on this port (mailgov.metrics).
MAILGOV_WORKER_METRICS_PORT = env_int("MAILGOV_WORKER_METRICS_PORT", None)
if os.environ.get("MAILGOV_WORKER_METRICS_ADDRESS"):
    MAILGOV_WORKER_METRICS_ADDRESS = os.environ["MAILGOV_WORKER_METRICS_ADDRESS"]
# Django's SMTP backend (the notices' default in production) reads these.
EMAIL_HOST = os.environ.get("DJANGO_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("DJANGO_EMAIL_PORT", 587)
EMAIL_HOST_USER = os.environ.get("DJANGO_EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_secret("DJANGO_EMAIL_HOST_PASSWORD")
EMAIL_USE_TLS = env_flag("DJANGO_EMAIL_USE_TLS", EMAIL_PORT == 587)
EMAIL_USE_SSL = env_flag("DJANGO_EMAIL_USE_SSL", EMAIL_PORT == 465)
# The consent and mailbox pages extend the demo's own base template
# (templates/base.html): its header, navigation and sign-out.
MAILGOV_BASE_TEMPLATE = "base.html"
