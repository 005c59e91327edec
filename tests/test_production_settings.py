"""The project's settings in production mode (``DJANGO_DEBUG=0``): ``check
--deploy`` is clean, secrets come from the environment, and every page carries
the security headers (the demo's too)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

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
