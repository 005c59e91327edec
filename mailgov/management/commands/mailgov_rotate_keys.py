from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from mailgov.crypto import get_keyring
from mailgov.rotation import rotation_pending_by_model, rotation_pending_count
from mailgov.services import key_usage, rotate_keys


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored value (tokens, outbox payloads, every encrypted column) "
        "that is not under the primary (first) key. "
        "Batched, resumable, safe while mail is being sent."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="Only report how many values each key holds."
        )
        parser.add_argument("--batch-size", type=int, default=None, help="Rows per transaction.")

    def handle(self, *args, dry_run: bool = False, batch_size: int | None = None, **options):
        keyring = get_keyring()
        if dry_run:
            by_model = key_usage(by_model=True)
            usage: dict[str, int] = {}
            for counts in by_model.values():
                for key_id, n in counts.items():
                    usage[key_id] = usage.get(key_id, 0) + n
            for key_id in sorted(set(usage) | set(keyring.key_ids)):
                role = (
                    "primary"
                    if key_id == keyring.primary_id
                    else ("decrypt-only" if key_id in keyring.ciphers else "NOT IN KEYRING")
                )
                self.stdout.write(f"{key_id}: {usage.get(key_id, 0)} values ({role})")
            pending = rotation_pending_by_model()
            for label, rows in pending.items():
                values = sum(
                    n
                    for key_id, n in by_model.get(label, {}).items()
                    if key_id != keyring.primary_id
                )
                self.stdout.write(f"{label}: {values} values to rotate in {rows} rows")
            self.stdout.write(f"rows to rotate: {sum(pending.values())}")
            return
        total = rotation_pending_count()
        with tqdm(total=total, unit="row", disable=None, file=self.stderr._out) as bar:
            result = rotate_keys(batch_size=batch_size, progress=bar.update)
        self.stdout.write(
            f"Re-encrypted {result.rotated} values in {result.rows} rows "
            f"under key {keyring.primary_id!r}."
        )
        problems = []
        if result.failed_rows:
            problems.append(
                f"{len(result.failed_rows)} rows could not be decrypted and were left as they "
                f"are: {', '.join(result.failed_rows[:20])}"
            )
        if result.busy_rows:
            problems.append(
                f"{len(result.busy_rows)} rows were being written by senders throughout the "
                "run and still hold values under an old key; run the command again: "
                f"{', '.join(result.busy_rows[:20])}"
            )
        if problems:
            # Non-zero: a script that retires the old key after this command
            # must not do so while values under it remain.
            raise CommandError(" ".join(problems))
