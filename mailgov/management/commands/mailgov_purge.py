from __future__ import annotations

from django.core.management.base import BaseCommand
from tqdm import tqdm

from mailgov.lifecycle import purge
from mailgov.management.sweeplock import command_lock

LOCK = "mailgov.purge"


class Command(BaseCommand):
    help = (
        "Delete what is past its retention: send logs and outbox attempts, finished "
        "outbox rows, expired bodies of failed mail, consent receipts of grants that ended "
        "long ago (what the mailgov.purge task does, under the same sweep lock). The audit "
        "trail is kept: use 'manage.py auditlogflush --before-date YYYY-MM-DD' for it."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )

    def handle(self, *args, dry_run: bool = False, **options):
        with command_lock(LOCK) as run:
            with tqdm(unit="row", disable=None, file=self.stderr._out) as bar:
                counts = purge(dry_run=dry_run, progress=bar.update)
            if not dry_run:
                run.result = counts
        verb = "would delete" if dry_run else "deleted"
        self.stdout.write(
            f"{verb}: send logs: {counts['sendlogs']}, outbox attempts: {counts['attempts']}, "
            f"finished outbox rows: {counts['outbox']}, consent receipts: {counts['receipts']}, "
            f"refresh history: {counts['refreshes']}, governance jobs: {counts['jobs']}"
            + ("" if dry_run else f"; bodies of failed mail expired: {counts['bodies']}")
        )
