from __future__ import annotations

import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from mailgov.crypto import generate_key_entry


class Command(BaseCommand):
    # It must run before any key exists, when the keyring check fails.
    requires_system_checks = []
    help = (
        "Generate an encryption key entry ('key_id:base64key'). With --file, write it to a "
        "key file (mode 0600) as the new primary key, keeping the old keys for decryption."
    )

    def add_arguments(self, parser):
        parser.add_argument("--key-id", default=None, help="Default: k<UTC date and time>.")
        parser.add_argument("--file", type=Path, help="Key file to create or prepend to.")
        parser.add_argument(
            "--if-missing", action="store_true", help="With --file: do nothing if it exists."
        )

    def handle(self, *args, key_id=None, file=None, if_missing=False, **options):
        key_id = key_id or timezone.now().strftime("k%Y%m%d%H%M%S")
        try:
            entry = generate_key_entry(key_id)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if file is None:
            # Printed on purpose: the operator asked for a key on stdout.
            self.stdout.write(entry)
            return
        if file.exists() and if_missing:
            self.stdout.write(f"Key file {file} exists; left as it is.")
            return
        old = file.read_text().splitlines() if file.exists() else []
        if any(line.split(":", 1)[0].strip() == key_id for line in old):
            raise CommandError(f"Key id {key_id!r} is already in {file}.")
        tmp = file.with_name(file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join([entry, *old]) + "\n")
        os.replace(tmp, file)
        self.stdout.write(
            f"Wrote new primary key {key_id!r} to {file}"
            + (f" ({len(old)} older entries kept for decryption)." if old else ".")
        )
