"""The project's settings in production mode (``DJANGO_DEBUG=0``): ``check
--deploy`` is clean, secrets come from the environment, and every page carries
the security headers (the demo's too)."""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import Client

from mailgov.contrib.allauth.consent import truncated_ip
from mailgov.contrib.allauth.limits import client_ip, user_key
from mailgov.crypto import generate_key_entry
from project.csp import provider_origins

ROOT = Path(__file__).resolve().parents[1]


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a deployment, everything in ``tmp_path``."""
    keys = tmp_path / "mailgov-keys.txt"
    keys.write_text(generate_key_entry("prod1") + "\n")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DJANGO_", "MAILGOV_", "CELERY_", "DATABASE_URL"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="project.settings",
        MAILGOV_VAR_DIR=str(tmp_path / "var"),
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="mail.example.com,admin.mail.example.com",
        DJANGO_CSRF_TRUSTED_ORIGINS="https://mail.example.com",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/0",
        MAILGOV_ENCRYPTION_KEYS_FILE=str(keys),
    )
    env.update(extra)
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def settings_of(env: dict[str, str], *names: str) -> dict:
    script = (
        "import json, sys; import project.settings as s; "
        "print(json.dumps({n: getattr(s, n, None) for n in sys.argv[1:]}))"
    )
    result = run(env, "-c", script, *names)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_check_deploy_reports_nothing_in_production_mode(tmp_path):
    result = run(
        production_env(tmp_path), "manage.py", "check", "--deploy", "--fail-level", "WARNING"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNINGS:" not in result.stdout + result.stderr


@pytest.mark.slow
def test_check_deploy_flags_the_demo_settings(tmp_path):
    # The same check with the demo's defaults is not clean: the test above
    # passes because of the production settings, not because the check is mute.
    env = production_env(tmp_path, DJANGO_DEBUG="1")
    result = run(env, "manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0
    for check_id in ("security.W004", "security.W008", "security.W012", "security.W018"):
        assert check_id in result.stdout + result.stderr


@pytest.mark.slow
def test_production_settings_come_from_the_environment(tmp_path):
    env = production_env(tmp_path)
    values = settings_of(
        env,
        "DEBUG",
        "SECRET_KEY",
        "ALLOWED_HOSTS",
        "CSRF_TRUSTED_ORIGINS",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "SECURE_SSL_REDIRECT",
        "SECURE_REDIRECT_EXEMPT",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "X_FRAME_OPTIONS",
        "SECURE_PROXY_SSL_HEADER",
        "CELERY_BROKER_URL",
        "MAILGOV_ENCRYPTION_KEYS_FILE",
    )
    assert values["DEBUG"] is False
    assert values["SECRET_KEY"] == env["DJANGO_SECRET_KEY"]
    assert values["ALLOWED_HOSTS"] == ["mail.example.com", "admin.mail.example.com"]
    assert values["CSRF_TRUSTED_ORIGINS"] == ["https://mail.example.com"]
    assert values["SECURE_HSTS_SECONDS"] == 31_536_000
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is values["SECURE_HSTS_PRELOAD"] is True
    assert values["SECURE_SSL_REDIRECT"] is True
    # The probes and the scraper, on plain HTTP inside the cluster.
    assert values["SECURE_REDIRECT_EXEMPT"] == [r"^health/", r"^metrics$"]
    assert values["SESSION_COOKIE_SECURE"] is values["CSRF_COOKIE_SECURE"] is True
    assert values["X_FRAME_OPTIONS"] == "DENY"
    assert values["SECURE_PROXY_SSL_HEADER"] is None
    assert values["CELERY_BROKER_URL"] == env["CELERY_BROKER_URL"]
    assert values["MAILGOV_ENCRYPTION_KEYS_FILE"] == env["MAILGOV_ENCRYPTION_KEYS_FILE"]

    # Behind a proxy that terminates TLS.
    behind_proxy = settings_of(
        {
            **env,
            "DJANGO_SECURE_SSL_REDIRECT": "0",
            "DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
        },
        "SECURE_SSL_REDIRECT",
        "SECURE_PROXY_SSL_HEADER",
    )
    assert behind_proxy == {
        "SECURE_SSL_REDIRECT": False,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
    }

    # A key file mounted as a secret.
    key_file = tmp_path / "secret-key"
    key_file.write_text("from-a-file-" + secrets.token_urlsafe(50) + "\n")
    del env["DJANGO_SECRET_KEY"]
    from_file = settings_of({**env, "DJANGO_SECRET_KEY_FILE": str(key_file)}, "SECRET_KEY")
    assert from_file["SECRET_KEY"] == key_file.read_text().strip()


@pytest.mark.slow
def test_production_offers_no_demo_provider_and_mails_notices_over_smtp(tmp_path):
    """A deployment never shows the demo's sign-in button nor trusts its local
    authorization server; owner notices go out over the site's SMTP relay."""
    password_file = tmp_path / "smtp-password"
    password_file.write_text("relay-pw\n")
    env = production_env(
        tmp_path,
        DJANGO_EMAIL_HOST="smtp.relay.example.com",
        DJANGO_EMAIL_HOST_USER="notices",
        DJANGO_EMAIL_HOST_PASSWORD_FILE=str(password_file),
        DJANGO_DEFAULT_FROM_EMAIL="notices@example.com",
        MAILGOV_SITE_URL="https://mail.example.com",
    )
    names = (
        "DEMO",
        "MAILGOV_PROVIDERS",
        "SOCIALACCOUNT_PROVIDERS",
        "MAILGOV_NOTIFICATION_BACKEND",
        "MAILGOV_SITE_URL",
        "DEFAULT_FROM_EMAIL",
        "EMAIL_HOST",
        "EMAIL_PORT",
        "EMAIL_HOST_USER",
        "EMAIL_HOST_PASSWORD",
        "EMAIL_USE_TLS",
        "EMAIL_USE_SSL",
    )
    values = settings_of(env, *names)
    assert values["DEMO"] is False
    assert values["MAILGOV_PROVIDERS"] == {}
    assert values["SOCIALACCOUNT_PROVIDERS"]["openid_connect"]["APPS"] == []
    assert not (tmp_path / "var" / "demo-client-secret").exists()
    assert values["MAILGOV_NOTIFICATION_BACKEND"] == "django.core.mail.backends.smtp.EmailBackend"
    assert values["MAILGOV_SITE_URL"] == "https://mail.example.com"
    assert values["DEFAULT_FROM_EMAIL"] == "notices@example.com"
    assert (values["EMAIL_HOST"], values["EMAIL_PORT"]) == ("smtp.relay.example.com", 587)
    assert (values["EMAIL_HOST_USER"], values["EMAIL_HOST_PASSWORD"]) == ("notices", "relay-pw")
    assert (values["EMAIL_USE_TLS"], values["EMAIL_USE_SSL"]) == (True, False)

    # Google and Microsoft from the environment; the demo only when asked for.
    with_google = settings_of(
        {
            **env,
            "GOOGLE_CLIENT_ID": "g-id",
            "GOOGLE_CLIENT_SECRET": "g-secret",
            "MAILGOV_DEMO": "1",
        },
        "MAILGOV_PROVIDERS",
    )["MAILGOV_PROVIDERS"]
    assert sorted(with_google) == ["demo", "google"]
    assert with_google["google"]["client_id"] == "g-id"


@pytest.mark.slow
def test_production_mode_refuses_to_invent_a_secret_key(tmp_path):
    env = production_env(tmp_path)
    del env["DJANGO_SECRET_KEY"]
    result = run(env, "-c", "import project.settings")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr
    assert not (tmp_path / "var" / "secret_key").exists()


@pytest.mark.slow
def test_the_demo_defaults_are_unchanged(tmp_path):
    env = production_env(tmp_path)
    for name in ("DJANGO_DEBUG", "DJANGO_SECRET_KEY", "DJANGO_ALLOWED_HOSTS"):
        del env[name]
    values = settings_of(
        env,
        "DEBUG",
        "ALLOWED_HOSTS",
        "SECURE_SSL_REDIRECT",
        "X_FRAME_OPTIONS",
        "MAILGOV_NOTIFICATION_BACKEND",
    )
    assert values == {
        "DEBUG": True,
        "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
        "SECURE_SSL_REDIRECT": None,
        "X_FRAME_OPTIONS": "DENY",
        "MAILGOV_NOTIFICATION_BACKEND": "django.core.mail.backends.console.EmailBackend",
    }
    assert sorted(settings_of(env, "MAILGOV_PROVIDERS")["MAILGOV_PROVIDERS"]) == ["demo"]


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/admin/login/", "/accounts/login/", "/mailboxes/"])
def test_security_headers_on_every_page(path, allauth_demo, authserver):
    response = Client().get(path, follow=True)
    assert response.status_code == 200
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] in ("same-origin", "no-referrer")
    policy = csp_directives(response["Content-Security-Policy"])
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["object-src"] == ["'none'"]
    # The consent and sign-in forms are answered by a redirect to the provider.
    assert policy["form-action"][0] == "'self'"
    assert authserver.url.rstrip("/") in policy["form-action"]


def test_form_action_names_each_configured_provider(settings):
    settings.MAILGOV_PROVIDERS = {
        "corp": {"type": "oidc", "server_url": "https://idp.example.com/realms/x"},
        "gmail": {"type": "google"},
        "microsoft": {"client_id": "x"},
    }
    settings.SOCIALACCOUNT_PROVIDERS = {"openid_connect": {"APPS": []}}
    assert sorted(set(provider_origins())) == [
        "https://accounts.google.com",
        "https://idp.example.com",
        "https://login.microsoftonline.com",
    ]


# -- production never falls back to the demo ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DATABASE_URL", "CELERY_BROKER_URL"])
def test_production_mode_requires_the_database_and_the_broker(tmp_path, name):
    """Without them, production must stop, naming the variable: not a SQLite
    file or a filesystem broker in var/ that no other host shares."""
    env = production_env(tmp_path)
    del env[name]
    result = run(env, "-c", "import project.settings")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert f"needs {name}" in result.stderr
    # The demo, asked for by name, still runs on its embedded defaults.
    values = settings_of({**env, "MAILGOV_DEMO": "1"}, "DATABASES", "CELERY_BROKER_URL")
    if name == "DATABASE_URL":
        assert values["DATABASES"]["default"]["ENGINE"] == "django.db.backends.sqlite3"
    else:
        assert values["CELERY_BROKER_URL"] == "filesystem://localhost/"


@pytest.mark.slow
def test_production_neither_creates_var_nor_invents_a_security_contact(tmp_path):
    """A read-only image: importing the settings writes nothing; and the
    protection page shows no made-up address."""
    env = production_env(tmp_path, MAILGOV_VAR_DIR=str(tmp_path / "read-only" / "var"))
    values = settings_of(env, "MAILGOV_SECURITY_CONTACT", "METRICS_OPEN", "CACHES")
    assert not (tmp_path / "read-only").exists()
    assert values["MAILGOV_SECURITY_CONTACT"] is None
    assert values["METRICS_OPEN"] is False
    assert values["CACHES"]["default"]["BACKEND"].endswith("LocMemCache")
    # The demo keeps its contact and its var/.
    demo = settings_of({**env, "DJANGO_DEBUG": "1"}, "MAILGOV_SECURITY_CONTACT", "METRICS_OPEN")
    assert demo == {"MAILGOV_SECURITY_CONTACT": "security@example.test", "METRICS_OPEN": True}
    assert (tmp_path / "read-only" / "var").is_dir()


@pytest.mark.slow
def test_proxy_cache_and_metrics_settings_come_from_the_environment(tmp_path):
    token_file = tmp_path / "metrics-token"
    token_file.write_text("tok-123\n")
    env = production_env(
        tmp_path,
        DJANGO_CACHE_URL="redis://:pw@redis.internal:6379/1",
        DJANGO_CLIENT_IP_HEADER="X-Forwarded-For",
        DJANGO_TRUSTED_PROXY_COUNT="2",
        DJANGO_METRICS_TOKEN_FILE=str(token_file),
        DJANGO_METRICS_ALLOWED_IPS="10.0.0.0/8, 192.0.2.7",
        MAILGOV_WORKER_METRICS_PORT="9540",
        MAILGOV_SECURITY_CONTACT="security@example.com",
    )
    names = (
        "CACHES",
        "RATELIMIT_IP_META_KEY",
        "TRUSTED_PROXY_COUNT",
        "METRICS_TOKEN",
        "METRICS_ALLOWED_NETWORKS",
        "MAILGOV_WORKER_METRICS_PORT",
        "MAILGOV_SECURITY_CONTACT",
    )
    assert settings_of(env, *names) == {
        "CACHES": {
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": "redis://:pw@redis.internal:6379/1",
            }
        },
        "RATELIMIT_IP_META_KEY": "project.clientip.forwarded_for",
        "TRUSTED_PROXY_COUNT": 2,
        "METRICS_TOKEN": "tok-123",
        "METRICS_ALLOWED_NETWORKS": ["10.0.0.0/8", "192.0.2.7"],
        "MAILGOV_WORKER_METRICS_PORT": 9540,
        "MAILGOV_SECURITY_CONTACT": "security@example.com",
    }
    real_ip = settings_of({**env, "DJANGO_CLIENT_IP_HEADER": "X-Real-IP"}, "RATELIMIT_IP_META_KEY")
    assert real_ip == {"RATELIMIT_IP_META_KEY": "HTTP_X_REAL_IP"}
    for bad in (
        {"DJANGO_CACHE_URL": "memcached://x"},
        {"DJANGO_METRICS_ALLOWED_IPS": "not-a-network"},
        {"MAILGOV_WORKER_METRICS_PORT": "ninety"},
    ):
        result = run({**env, **bad}, "-c", "import project.settings")
        assert result.returncode != 0
        assert next(iter(bad)) in result.stderr


# -- the client's address behind a proxy -------------------------------------------------------


@pytest.fixture
def behind_proxies(settings):
    settings.RATELIMIT_IP_META_KEY = "project.clientip.forwarded_for"
    settings.TRUSTED_PROXY_COUNT = 1
    return settings


def test_rate_limits_and_receipts_see_the_forwarded_client(rf, behind_proxies):
    """One helper (django-ratelimit's own reading of RATELIMIT_IP_META_KEY)
    for the per-user limit's anonymous key, the ``ip`` limit and receipts."""
    request = rf.get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.77")
    request.user = AnonymousUser()
    assert client_ip(request) == "203.0.113.77"  # not the forged 6.6.6.6, not the proxy
    assert user_key("g", request) == "ip:203.0.113.77"
    assert truncated_ip(request) == "203.0.113.0"
    # Two proxies of ours: the entry the outer one wrote.
    behind_proxies.TRUSTED_PROXY_COUNT = 2
    assert client_ip(request) == "6.6.6.6"
    # Fewer entries than proxies: none is forged; the first one.
    short = rf.get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert client_ip(short) == "203.0.113.9"
    # No header: the peer.
    assert client_ip(rf.get("/", REMOTE_ADDR="198.51.100.4")) == "198.51.100.4"
    # A proxy that writes a port, or "unknown": the address, else the peer
    # (django-ratelimit would fail on anything that is no address).
    behind_proxies.TRUSTED_PROXY_COUNT = 1
    for written, seen in [
        ("203.0.113.77:51234", "203.0.113.77"),
        ("[2001:db8::7]:443", "2001:db8::"),  # django-ratelimit keeps the /64
        ("unknown", "10.0.0.5"),
        ("", "10.0.0.5"),
    ]:
        odd = rf.get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR=f"6.6.6.6, {written}")
        odd.user = AnonymousUser()
        assert client_ip(odd) == seen
        assert user_key("g", odd).startswith("ip:")


def test_a_header_named_directly(rf, settings):
    settings.RATELIMIT_IP_META_KEY = "HTTP_X_REAL_IP"
    request = rf.get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_REAL_IP="2001:db8:1:2:3:4:5:6")
    request.user = AnonymousUser()
    assert user_key("g", request) == "ip:2001:db8:1:2::"  # django-ratelimit's IPv6 /64
    assert truncated_ip(request) == "2001:db8:1::"
    # A request without the header: no receipt address rather than an error.
    assert truncated_ip(rf.get("/", REMOTE_ADDR="10.0.0.5")) == ""


# -- the README's environment variables are the settings' ---------------------------------------

#: The helpers of project/settings.py that read environment variables by the
#: name in their first argument, and the suffixes each reads.
ENV_READERS = {
    "env_flag": ("",),
    "env_list": ("",),
    "env_int": ("",),
    "env_secret": ("", "_FILE"),
    "required_env": ("",),
}
ENV_NAME = re.compile(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`")


def settings_environment() -> set[str]:
    """The names of the variables project/settings.py reads (its source)."""
    tree = ast.parse((ROOT / "project" / "settings.py").read_text())
    names: set[str] = set()
    helpers_with_variable_names = set()

    def literal(node: ast.AST) -> str | None:
        return (
            node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
        )

    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            key = None
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "os.environ.get":
                key = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                key = node.slice
            if key is not None and literal(key) is None:
                helpers_with_variable_names.add(function.name)
    # Every function that reads a variable whose name it is given is known
    # here, so that no variable escapes this test.
    assert helpers_with_variable_names <= {*ENV_READERS, "_app"}, helpers_with_variable_names

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            first = literal(node.args[0]) if node.args else None
            if func in ENV_READERS and first:
                names.update(first + suffix for suffix in ENV_READERS[func])
            elif func == "_app":
                client_id, secret = (literal(arg) for arg in node.args[:2])
                names.update({client_id, secret, secret + "_FILE"})
            elif func == "os.environ.get" and first:
                names.add(first)
        elif (
            isinstance(node, ast.Subscript)
            and ast.unparse(node.value) == "os.environ"
            and literal(node.slice)
        ):
            names.add(literal(node.slice))
    return names


def readme_deploying_environment() -> tuple[set[str], set[str]]:
    """The variables of the README's "Deploying" table, and those its
    example sets (``NAME=`` in its sh block)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Deploying\n") :]
    section = section[: section.index("\n### ", 1)]
    table = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in ENV_NAME.findall(line.split(" | ")[0])
    }
    block = section[section.index("```sh\n") : section.index("```\n", section.index("```sh\n") + 6)]
    example = set(re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]+)=", block, re.MULTILINE))
    return table, example


def test_readme_deploying_names_every_variable_the_settings_read():
    table, example = readme_deploying_environment()
    read = settings_environment()
    assert read - table == set(), "read by project/settings.py, missing from the README"
    assert table - read == set(), "in the README's table, never read by project/settings.py"
    assert example <= table


# -- make audit says what it exits with ----------------------------------------------------------


@pytest.mark.slow
def test_make_audit_exit_status_is_what_the_readme_says(tmp_path):
    """make exits 2 whatever its recipe exits with; the script under it
    exits 3 when the audit could not run. Both as the README says, and the
    line .ci/run reads is printed."""
    missing = f"AUDIT_ARGS=--requirements {tmp_path / 'no-such-constraints.txt'}"
    result = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "audit", missing],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "dependency audit could not run: " in result.stdout
    assert result.returncode == 2
    script = run(
        dict(os.environ), "-m", "project.audit", "--requirements", str(tmp_path / "none.txt")
    )
    assert script.returncode == 3
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`make audit` exits 2 on both failures" in readme
    assert "exits 1 for a finding and 3 when it could not run" in readme
