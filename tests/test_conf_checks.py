"""The settings object, system checks and the operator commands around keys."""

from __future__ import annotations

import io
import os
import stat

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from mailgov.checks import (
    check_encryption_keys,
    check_providers,
    check_sqlite_transaction_mode,
    check_worker_metrics,
)
from mailgov.conf import DEFAULTS, mailgov_settings
from mailgov.crypto import generate_key_entry, parse_key_entries


def test_defaults_and_overrides():
    assert DEFAULTS["TOKEN_REFRESH_MARGIN_SECONDS"] == mailgov_settings.TOKEN_REFRESH_MARGIN_SECONDS
    with override_settings(MAILGOV_TOKEN_REFRESH_MARGIN_SECONDS=5):
        assert mailgov_settings.TOKEN_REFRESH_MARGIN_SECONDS == 5


def test_unknown_setting_raises():
    with pytest.raises(AttributeError, match="Invalid mailgov setting: NOPE"):
        _ = mailgov_settings.NOPE


def test_settings_are_not_written_into_django_settings():
    _ = mailgov_settings.SMTP_TIMEOUT_SECONDS
    assert not hasattr(settings, "MAILGOV_SMTP_TIMEOUT_SECONDS")


@pytest.mark.parametrize(
    ("keys", "check_id"),
    [
        ([], "mailgov.E001"),
        (["broken"], "mailgov.E002"),
        (["k:" + "QUJD"], "mailgov.E003"),
        ([generate_key_entry("k"), generate_key_entry("k")], "mailgov.E004"),
    ],
)
def test_keyring_checks(keys, check_id):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=keys):
        [error] = check_encryption_keys()
    assert error.id == check_id
    assert error.level >= 40  # an Error, not a warning


def test_unreadable_key_file_check(tmp_path):
    with override_settings(
        MAILGOV_ENCRYPTION_KEYS=None, MAILGOV_ENCRYPTION_KEYS_FILE=str(tmp_path / "nope")
    ):
        [error] = check_encryption_keys()
    assert error.id == "mailgov.E005"


def test_good_keyring_passes():
    assert check_encryption_keys() == []


@pytest.mark.parametrize(
    ("providers", "check_id"),
    [
        ({"x": {"type": "carrier-pigeon", "client_id": "c"}}, "mailgov.E010"),
        ({"idp": {"type": "oidc", "client_id": "c"}}, "mailgov.E010"),
        ({"google": {"client_id": "c", "smtp_host": "evil.example"}}, "mailgov.E011"),
        ({"microsoft": {"client_id": "c", "smtp_port": 25}}, "mailgov.E011"),
        ({"google": {"client_secret": "s"}}, "mailgov.E012"),
    ],
)
def test_provider_checks(providers, check_id):
    with override_settings(MAILGOV_PROVIDERS=providers):
        ids = [message.id for message in check_providers()]
    assert check_id in ids


def test_valid_providers_pass():
    providers = {
        "google": {"client_id": "c", "client_secret": "s"},
        "idp": {
            "type": "oidc",
            "server_url": "https://idp.example",
            "client_id": "c",
            "send_scopes": ["mail.send"],
            "smtp_host": "smtp.idp.example",
        },
    }
    with override_settings(MAILGOV_PROVIDERS=providers):
        assert check_providers() == []


def test_sqlite_without_immediate_transactions_warns():
    connection = connections["default"]
    if connection.vendor != "sqlite":
        assert check_sqlite_transaction_mode(databases=["default"]) == []
        return
    assert check_sqlite_transaction_mode(databases=["default"]) == []
    options = connection.settings_dict["OPTIONS"]
    saved = options.pop("transaction_mode")
    try:
        [warning] = check_sqlite_transaction_mode(databases=["default"])
    finally:
        options["transaction_mode"] = saved
    assert warning.id == "mailgov.W001"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAILGOV_HTTP_TIMEOUT_SECONDS", None),
        ("MAILGOV_SMTP_TIMEOUT_SECONDS", 0),
        ("MAILGOV_TOKEN_REFRESH_MARGIN_SECONDS", -1),
        ("MAILGOV_ROTATION_BATCH_SIZE", "500"),
        ("MAILGOV_OUTBOX_LEASE_SECONDS", 0),
        ("MAILGOV_OUTBOX_MAX_ATTEMPTS", True),
        ("MAILGOV_REFRESH_FAILING_DAYS", -3),
        ("MAILGOV_DORMANT_DAYS", None),
    ],
)
@pytest.mark.django_db  # the binding check (E013) reads mailboxes
def test_numbers_must_be_positive(name, value):
    with override_settings(**{name: value}):
        ids = [m.id for m in run_checks()]
    assert "mailgov.E020" in ids


@pytest.mark.django_db  # the binding check (E013) reads mailboxes
@pytest.mark.parametrize(
    ("value", "valid"), [(0, True), (2.5, True), (-1, False), ("5", False), (None, False)]
)
def test_smtp_idle_seconds_must_not_be_negative(value, valid):
    with override_settings(MAILGOV_SMTP_IDLE_SECONDS=value):
        ids = [m.id for m in run_checks()]
    assert ("mailgov.E025" not in ids) is valid


@pytest.mark.django_db  # the binding check (E013) reads mailboxes
@pytest.mark.parametrize(
    ("overrides", "check_id"),
    [
        ({"MAILGOV_OUTBOX_ON_INTERRUPTED": "resend"}, "mailgov.E021"),
        ({"MAILGOV_DORMANT_DAYS": 7, "MAILGOV_DORMANT_WARNING_DAYS": 7}, "mailgov.E022"),
    ],
)
def test_lifecycle_settings_are_checked(overrides, check_id):
    assert check_id not in [m.id for m in run_checks()]
    with override_settings(**overrides):
        assert check_id in [m.id for m in run_checks()]


@pytest.mark.django_db  # the binding check (E013) reads mailboxes
def test_sqlite_warning_shows_in_a_plain_check():
    """W001 is not database-tagged, so `manage.py check` shows it."""
    connection = connections["default"]
    if connection.vendor != "sqlite":
        assert "mailgov.W001" not in [m.id for m in run_checks()]
        return
    options = connection.settings_dict["OPTIONS"]
    saved = options.pop("transaction_mode")
    try:
        assert "mailgov.W001" in [m.id for m in run_checks()]
    finally:
        options["transaction_mode"] = saved


@pytest.mark.django_db  # the binding check (E013) reads mailboxes
def test_checks_registered_with_django():
    with override_settings(MAILGOV_ENCRYPTION_KEYS=["broken"]):
        ids = [m.id for m in run_checks()]
    assert "mailgov.E002" in ids


def test_generate_key_prints_a_valid_entry():
    out = io.StringIO()
    call_command("mailgov_generate_key", "--key-id", "k1", stdout=out)
    keyring = parse_key_entries([out.getvalue().strip()])
    assert keyring.primary_id == "k1"


def test_generate_key_file_prepends_and_keeps_old_keys(tmp_path):
    path = tmp_path / "keys.txt"
    call_command(
        "mailgov_generate_key", "--key-id", "old", "--file", str(path), stdout=io.StringIO()
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    out = io.StringIO()
    call_command("mailgov_generate_key", "--key-id", "new", "--file", str(path), stdout=out)
    assert "1 older entries kept" in out.getvalue()
    material = path.read_text().splitlines()[0].partition(":")[2]
    assert material not in out.getvalue()  # the key itself is not printed
    keyring = parse_key_entries([line for line in path.read_text().splitlines() if line])
    assert keyring.key_ids == ["new", "old"]
    with pytest.raises(CommandError, match="already"):
        call_command("mailgov_generate_key", "--key-id", "new", "--file", str(path))
    out = io.StringIO()
    call_command("mailgov_generate_key", "--file", str(path), "--if-missing", stdout=out)
    assert "left as it is" in out.getvalue()
    with pytest.raises(CommandError, match="Key id"):
        call_command("mailgov_generate_key", "--key-id", "bad id")


@pytest.mark.parametrize(
    ("port", "address", "ids"),
    [
        (None, "0.0.0.0", []),
        (9540, "127.0.0.1", []),
        (9540, "::", []),
        (9540, "", []),
        (0, "0.0.0.0", ["mailgov.E026"]),
        (70000, "0.0.0.0", ["mailgov.E026"]),
        ("9540", "0.0.0.0", ["mailgov.E026"]),
        (True, "0.0.0.0", ["mailgov.E026"]),
        (9540, "localhost:9540", ["mailgov.E027"]),
        (9540, None, ["mailgov.E027"]),
    ],
)
def test_worker_metrics_checks(port, address, ids):
    """A bad port or address would only show as metrics that never arrive."""
    with override_settings(
        MAILGOV_WORKER_METRICS_PORT=port, MAILGOV_WORKER_METRICS_ADDRESS=address
    ):
        assert [message.id for message in check_worker_metrics()] == ids
        # Registered with Django's checks: the same verdict from run_checks().
        found = {message.id for message in run_checks()}
        assert found & {"mailgov.E026", "mailgov.E027"} == set(ids)
