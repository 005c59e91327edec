"""The keyring and the AES-GCM envelope (no database)."""

from __future__ import annotations

import base64

import pytest
from django.test import override_settings
from hypothesis import given
from hypothesis import strategies as st

from mailgov import crypto
from mailgov.checks import check_encryption_keys
from mailgov.exceptions import DecryptionError, KeyringError, MailgovConfigurationError

CTX = {"label": "mailgov.mailboxcredentials", "field_name": "access_token", "pk": "row-1"}
BOUND = crypto.binding(**CTX)


def test_round_trip_and_envelope_format():
    value = crypto.encrypt("ya29.secret-token", BOUND)
    assert value.startswith("mg1$test1$")
    assert "ya29" not in value
    assert crypto.decrypt(value, BOUND) == "ya29.secret-token"


def test_same_value_twice_gives_different_ciphertexts():
    assert crypto.encrypt("same", BOUND) != crypto.encrypt("same", BOUND)


@pytest.mark.parametrize(
    "other",
    [
        {"pk": "row-2"},
        {"field_name": "refresh_token"},
        {"label": "other.model"},
    ],
)
def test_value_bound_to_row_field_and_model(other):
    value = crypto.encrypt("token", BOUND)
    with pytest.raises(DecryptionError) as info:
        crypto.decrypt(value, crypto.binding(**{**CTX, **other}))
    assert "authentication failed" in str(info.value)
    assert value not in str(info.value)


def test_flipped_byte_fails_naming_row_and_field():
    value = crypto.encrypt("token", BOUND)
    head, body = value.rsplit("$", 1)
    raw = bytearray(bytes.fromhex(body))
    raw[-5] ^= 0x01
    tampered = f"{head}${bytes(raw).hex()}"
    with pytest.raises(DecryptionError) as info:
        crypto.decrypt(tampered, BOUND)
    message = str(info.value)
    assert "mailgov.mailboxcredentials.access_token of row row-1" in message
    assert "token" not in message.replace("access_token", "")


def test_wrong_key_fails():
    value = crypto.encrypt("token", BOUND)
    with (
        override_settings(MAILGOV_ENCRYPTION_KEYS=[crypto.generate_key_entry("test1")]),
        pytest.raises(DecryptionError, match="authentication failed"),
    ):
        crypto.decrypt(value, BOUND)


def test_unknown_key_id_fails():
    value = crypto.encrypt("token", BOUND)
    with (
        override_settings(MAILGOV_ENCRYPTION_KEYS=[crypto.generate_key_entry("other")]),
        pytest.raises(DecryptionError, match="unknown key id 'test1'"),
    ):
        crypto.decrypt(value, BOUND)


def test_relabelled_key_id_fails():
    # Two keys; a value re-headed with the other key id must not decrypt,
    # because the key id is part of the associated data.
    keys = [crypto.generate_key_entry("a"), crypto.generate_key_entry("b")]
    with override_settings(MAILGOV_ENCRYPTION_KEYS=keys):
        value = crypto.encrypt("token", BOUND)
        relabelled = value.replace("$a$", "$b$", 1)
        with pytest.raises(DecryptionError):
            crypto.decrypt(relabelled, BOUND)


@pytest.mark.parametrize("value", ["", "plain-token", "mg1$test1$", "mg1$test1$!!!", "mg2$x$abc"])
def test_malformed_values_fail_never_returned(value):
    with pytest.raises(DecryptionError):
        crypto.decrypt(value, BOUND)


def test_old_keys_still_decrypt_after_a_new_primary():
    old = crypto.generate_key_entry("old")
    new = crypto.generate_key_entry("new")
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[old]):
        value = crypto.encrypt("token", BOUND)
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[new, old]):
        assert crypto.decrypt(value, BOUND) == "token"
        assert crypto.encrypt("token", BOUND).startswith("mg1$new$")


@pytest.mark.parametrize(
    ("keys", "code"),
    [
        ([], "missing"),
        (["nocolon"], "malformed"),
        (["bad id!:" + base64.b64encode(b"k" * 32).decode()], "malformed"),
        (["k:" + base64.b64encode(b"short").decode()], "length"),
        (["k:%%%notbase64"], "malformed"),
        ([crypto.generate_key_entry("k"), crypto.generate_key_entry("k")], "duplicate"),
    ],
)
def test_bad_keyrings_refuse_to_work(keys, code):
    with override_settings(MAILGOV_ENCRYPTION_KEYS=keys):
        if keys:
            with pytest.raises(KeyringError) as info:
                crypto.get_keyring()
            assert info.value.code == code
        else:
            # An empty list falls through to the (unset) file: nothing to use.
            with pytest.raises(KeyringError) as info:
                crypto.encrypt("token", BOUND)
            assert info.value.code == code
        assert isinstance(info.value, MailgovConfigurationError)
        for entry in keys:
            secret = entry.partition(":")[2]
            if secret:
                assert secret not in str(info.value)


def test_keys_from_environment(monkeypatch):
    entry = crypto.generate_key_entry("envkey")
    monkeypatch.setenv("MAILGOV_ENCRYPTION_KEYS", entry + "," + crypto.generate_key_entry("x"))
    with override_settings(MAILGOV_ENCRYPTION_KEYS=None):
        assert crypto.get_keyring().key_ids == ["envkey", "x"]
        crypto.reset_keyring()


def test_keys_from_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# primary first\n{crypto.generate_key_entry('f1')}\n\n")
    with override_settings(MAILGOV_ENCRYPTION_KEYS=None, MAILGOV_ENCRYPTION_KEYS_FILE=str(path)):
        assert crypto.get_keyring().primary_id == "f1"
    with (
        override_settings(
            MAILGOV_ENCRYPTION_KEYS=None, MAILGOV_ENCRYPTION_KEYS_FILE=str(tmp_path / "missing")
        ),
        pytest.raises(KeyringError) as info,
    ):
        crypto.get_keyring()
    assert info.value.code == "unreadable"


def test_key_is_not_secret_key_derived(settings):
    # Changing SECRET_KEY changes nothing about what decrypts ...
    value = crypto.encrypt("token", BOUND)
    settings.SECRET_KEY = "something-else-entirely"
    crypto.reset_keyring()
    assert crypto.decrypt(value, BOUND) == "token"
    # ... and SECRET_KEY alone never makes a keyring.
    with (
        override_settings(MAILGOV_ENCRYPTION_KEYS=None, MAILGOV_ENCRYPTION_KEYS_FILE=None),
        pytest.raises(KeyringError),
    ):
        crypto.encrypt("token", BOUND)


@given(st.text(max_size=2048), st.text(min_size=1, max_size=40))
def test_property_round_trip(plaintext, pk):
    bound = crypto.binding(CTX["label"], CTX["field_name"], pk)
    assert crypto.decrypt(crypto.encrypt(plaintext, bound), bound) == plaintext


@given(st.text(min_size=1, max_size=256), st.data())
def test_property_any_flipped_bit_is_detected(plaintext, data):
    value = crypto.encrypt(plaintext, BOUND)
    head, body = value.rsplit("$", 1)
    raw = bytearray(bytes.fromhex(body))
    index = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    raw[index] ^= 1 << bit
    tampered = f"{head}${bytes(raw).hex()}"
    with pytest.raises(DecryptionError):
        crypto.decrypt(tampered, BOUND)


# -- from the mutation review: aes256 only --
@pytest.mark.parametrize("size", [16, 24, 31, 33, 64])
def test_only_256_bit_keys_are_accepted(size):
    entry = "k:" + base64.b64encode(b"k" * size).decode()
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[entry]):
        with pytest.raises(KeyringError) as info:
            crypto.get_keyring()
        assert info.value.code == "length"
        [error] = check_encryption_keys()
    assert error.id == "mailgov.E003"


# -- from the mutation review: errors never hold the value --


@pytest.mark.parametrize(
    ("value", "secret"),
    [
        ("ya29.a0-plaintext-token-in-the-column", "ya29.a0-plaintext-token-in-the-column"),
        ("mg1$nokey$ya29deadbeefcafe", "ya29deadbeefcafe"),
        ("mg2$x$ya29.other-version", "ya29.other-version"),
        ("mg1$test1$ya29-not-hex", "ya29-not-hex"),
    ],
    ids=["plaintext", "unknown-key-id", "other-version", "not-hex"],
)
def test_decryption_errors_never_hold_the_value(value, secret):
    with pytest.raises(DecryptionError) as info:
        crypto.decrypt(value, BOUND)
    message = str(info.value)
    assert "mailgov.mailboxcredentials.access_token of row row-1" in message
    assert secret not in message and value not in message


# -- from the mutation review: key id in associated data --


def test_relabelled_key_id_fails_even_with_the_same_key_material():
    material = crypto.generate_key_entry("a").partition(":")[2]
    with override_settings(MAILGOV_ENCRYPTION_KEYS=[f"a:{material}", f"b:{material}"]):
        value = crypto.encrypt("token", BOUND)
        assert crypto.decrypt(value, BOUND) == "token"
        relabelled = value.replace("$a$", "$b$", 1)
        with pytest.raises(DecryptionError, match="authentication failed"):
            crypto.decrypt(relabelled, BOUND)
