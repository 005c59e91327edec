"""Encrypted fields on the credentials model, against the real database."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from mailgov.exceptions import DecryptionError
from mailgov.fields import Sealed
from mailgov.models import Mailbox, MailboxCredentials

pytestmark = pytest.mark.django_db

ACCESS = "ya29.A0-known-access-token-value"
REFRESH = "1//0g-known-refresh-token-value"


@pytest.fixture
def credentials(django_user_model):
    owner = django_user_model.objects.create_user("owner", "owner@example.test", "pw")
    mailbox = Mailbox.objects.create(owner=owner, provider="demo", address="owner@example.test")
    creds = MailboxCredentials.objects.create(
        mailbox=mailbox, access_token=ACCESS, refresh_token=REFRESH
    )
    return creds


def raw_column(pk, column="access_token"):
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {column} FROM mailgov_mailboxcredentials WHERE mailbox_id = %s",
            [pk.hex if connection.vendor == "sqlite" else pk],
        )
        return cursor.fetchone()[0]


def test_stored_encrypted_and_read_back(credentials):
    stored = raw_column(credentials.pk)
    assert stored.startswith("mg1$test1$")
    assert ACCESS not in stored
    fresh = MailboxCredentials.objects.get(pk=credentials.pk)
    assert fresh.access_token == ACCESS
    assert fresh.refresh_token == REFRESH


def test_repr_and_str_hide_values(credentials):
    fresh = MailboxCredentials.objects.get(pk=credentials.pk)
    for text in (repr(fresh), str(fresh), repr(fresh.__dict__), repr(fresh.mailbox)):
        assert ACCESS not in text
        assert REFRESH not in text
    assert repr(fresh.__dict__["access_token"]) == "<Sealed>"


def test_listing_mailboxes_never_loads_ciphertext(credentials):
    with CaptureQueriesContext(connection) as queries:
        assert Mailbox.objects.count() == 1
        list(Mailbox.objects.all())
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    assert "mailboxcredentials" not in sql.lower()


def test_value_copied_to_another_row_fails(credentials, django_user_model):
    other_owner = django_user_model.objects.create_user("other", "other@example.test", "pw")
    other = Mailbox.objects.create(owner=other_owner, provider="demo", address="o@example.test")
    MailboxCredentials.objects.create(mailbox=other, access_token="other-token")
    # An attacker with database access copies a ciphertext between rows.
    MailboxCredentials.objects.filter(pk=other.pk).update(
        access_token=Sealed(raw_column(credentials.pk))
    )
    moved = MailboxCredentials.objects.get(pk=other.pk)
    with pytest.raises(DecryptionError) as info:
        _ = moved.access_token
    assert str(other.pk) in str(info.value)
    assert "access_token" in str(info.value)


def test_value_copied_to_another_field_fails(credentials):
    MailboxCredentials.objects.filter(pk=credentials.pk).update(
        refresh_token=Sealed(raw_column(credentials.pk, "access_token"))
    )
    with pytest.raises(DecryptionError, match="refresh_token"):
        _ = MailboxCredentials.objects.get(pk=credentials.pk).refresh_token


def test_plaintext_never_written_through_update(credentials):
    with pytest.raises(TypeError, match="encrypted"), transaction.atomic():
        MailboxCredentials.objects.filter(pk=credentials.pk).update(access_token="plain")
    assert raw_column(credentials.pk).startswith("mg1$")


def test_plaintext_never_written_through_bulk_update(credentials):
    credentials.access_token = "plain"
    with pytest.raises(TypeError, match="encrypted"):
        MailboxCredentials.objects.bulk_update([credentials], ["access_token"])


def test_deferred_field_loads_and_decrypts(credentials):
    fresh = MailboxCredentials.objects.defer("access_token").get(pk=credentials.pk)
    assert fresh.access_token == ACCESS


def test_none_stays_none(credentials):
    credentials.access_token = None
    credentials.save()
    assert MailboxCredentials.objects.get(pk=credentials.pk).access_token is None


def test_dumpdata_contains_ciphertext_only_and_loaddata_restores(credentials, tmp_path):
    out = io.StringIO()
    call_command("dumpdata", "auth.user", "mailgov", stdout=out)
    dump = out.getvalue()
    assert ACCESS not in dump and REFRESH not in dump
    assert "mg1$test1$" in dump
    path = tmp_path / "dump.json"
    path.write_text(dump)
    MailboxCredentials.objects.all().delete()
    Mailbox.objects.all().delete()
    call_command("loaddata", str(path), stdout=io.StringIO())
    restored = MailboxCredentials.objects.get(pk=credentials.pk)
    assert restored.access_token == ACCESS
    assert restored.refresh_token == REFRESH
    assert raw_column(credentials.pk) in dump


def test_a_read_value_written_back_keeps_its_ciphertext(credentials):
    fresh = MailboxCredentials.objects.get(pk=credentials.pk)
    before = raw_column(credentials.pk)
    fresh.expires_at = None
    MailboxCredentials.objects.bulk_update([fresh], ["access_token", "expires_at"])
    assert raw_column(credentials.pk) == before
    assert MailboxCredentials.objects.get(pk=credentials.pk).access_token == ACCESS


def test_a_value_assigned_to_another_row_is_encrypted_for_it(credentials, django_user_model):
    owner = django_user_model.objects.create_user("o2", "o2@example.test", "pw")
    other = Mailbox.objects.create(owner=owner, provider="demo", address="o2@example.test")
    copy = MailboxCredentials.objects.create(
        mailbox=other, access_token=MailboxCredentials.objects.get(pk=credentials.pk).access_token
    )
    assert raw_column(copy.pk) != raw_column(credentials.pk)
    assert MailboxCredentials.objects.get(pk=other.pk).access_token == ACCESS


@pytest.mark.django_db(transaction=True)
def test_raw_database_holds_no_token(credentials):
    """SQLite: the raw file (and its WAL). PostgreSQL: every row of every table as text."""
    if connection.vendor == "sqlite":
        connection.close()  # flush to the file
        path = Path(connection.settings_dict["NAME"])
        wal = path.with_name(path.name + "-wal")
        # Read by another process: opening and closing the database file here
        # would drop this process's POSIX locks on it (an SQLite caveat) while
        # other connections (the live server's) still rely on them.
        files = [str(path)] + ([str(wal)] if wal.exists() else [])
        data = subprocess.run(["cat", *files], capture_output=True, check=True).stdout
        assert MailboxCredentials.objects.count() == 1
    else:
        chunks = []
        with connection.cursor() as cursor:
            for table in connection.introspection.table_names(cursor):
                cursor.execute(f"SELECT t::text FROM {connection.ops.quote_name(table)} t")
                chunks.extend(row[0] for row in cursor.fetchall())
        data = "\n".join(chunks).encode()
    assert b"mg1$test1$" in data  # the rows are there, encrypted
    assert ACCESS.encode() not in data
    assert REFRESH.encode() not in data


# -- from the mutation review: lookups refuse plaintext --
@pytest.mark.parametrize(
    "lookup",
    [
        {"access_token": ACCESS},
        {"access_token__in": [ACCESS]},
        {"refresh_token__gt": "1//"},
    ],
    ids=["exact", "in", "gt"],
)
def test_plaintext_never_used_in_a_lookup(credentials, lookup):
    with pytest.raises(TypeError, match="encrypted"):
        list(MailboxCredentials.objects.filter(**lookup))


@pytest.mark.parametrize(
    "lookup", ["iexact", "startswith", "contains", "icontains", "endswith", "regex"]
)
def test_plaintext_never_used_in_a_pattern_lookup(credentials, lookup):
    with pytest.raises(TypeError, match="encrypted"):
        list(MailboxCredentials.objects.filter(**{f"refresh_token__{lookup}": "1//0g"}))


def test_the_lookups_an_encrypted_column_takes_still_work(credentials):
    stored = MailboxCredentials.objects.values_list("refresh_token", flat=True).get()
    assert MailboxCredentials.objects.filter(refresh_token=stored).count() == 1
    assert MailboxCredentials.objects.filter(refresh_token__in=[stored]).count() == 1
    assert MailboxCredentials.objects.filter(refresh_token__isnull=False).count() == 1
    assert MailboxCredentials.objects.filter(access_token=None).count() == 0
