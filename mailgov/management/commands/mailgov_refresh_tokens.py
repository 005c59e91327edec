from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from mailgov.lifecycle import refresh_expiring
from mailgov.management.sweeplock import command_lock

LOCK = "mailgov.refresh_tokens"


class Command(BaseCommand):
    help = (
        "Refresh now the access tokens of mailboxes in use that expire soon (what the "
        "mailgov.refresh_tokens task does), under the same sweep lock."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--concurrency", type=int, default=None, help="Refreshes at once (default: setting)."
        )

    def handle(self, *args, concurrency: int | None = None, **options):
        with command_lock(LOCK) as run:
            with tqdm(unit="mailbox", disable=None, file=self.stderr._out) as bar:
                counts = refresh_expiring(progress=bar.update, concurrency=concurrency)
            run.result = counts
        self.stdout.write(
            f"refreshed: {counts['refreshed']}, failed (retried later): {counts['failed']}, "
            f"grant revoked (owner told): {counts['revoked']}, skipped: {counts['skipped']}, "
            f"errors: {counts['errors']}"
        )
        if counts["errors"]:
            # Not a passing provider failure: a provider removed or reconfigured,
            # or a token that cannot be decrypted (see the log).
            raise CommandError(
                f"{counts['errors']} mailboxes could not be refreshed for a reason an "
                "operator must fix; see the mailgov.lifecycle log."
            )
