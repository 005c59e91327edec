from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from mailgov.lifecycle import activity, revoke_dormant
from mailgov.management.sweeplock import command_lock
from mailgov.models import Mailbox

LOCK = "mailgov.revoke_dormant"


class Command(BaseCommand):
    help = (
        "Warn the owners of mailboxes about to be revoked as unused, and revoke those "
        "unused for MAILGOV_DORMANT_DAYS days: "
        "what the mailgov.revoke_dormant task does, under the same sweep lock."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="List what would be revoked and warned; change nothing.",
        )

    def handle(self, *args, dry_run: bool = False, **options):
        with command_lock(LOCK) as run:
            if dry_run:
                planned = revoke_dormant(dry_run=True)
                self._list("would be revoked", planned["revoked"])
                self._list("would be warned", planned["warned"])
                return
            with tqdm(unit="mailbox", disable=None, file=self.stderr._out) as bar:
                counts = revoke_dormant(progress=bar.update)
            run.result = counts
        self.stdout.write(
            f"revoked: {counts['revoked']}, warned: {counts['warned']}, "
            f"skipped (used meanwhile): {counts['skipped']}, failed: {counts['failed']}"
        )
        if counts["failed"]:
            raise CommandError(
                f"{counts['failed']} mailboxes could not be warned or revoked; "
                "see the mailgov.lifecycle log."
            )

    def _list(self, what: str, ids: list[str]) -> None:
        self.stdout.write(f"{what}: {len(ids)}")
        rows = (
            Mailbox.objects.filter(pk__in=ids)
            .annotate(last=activity())
            .order_by("last")
            .values_list("pk", "address", "last")
        )
        for pk, address, last in rows:
            self.stdout.write(f"  {pk}  {address}  last activity {last:%Y-%m-%d %H:%M}")
