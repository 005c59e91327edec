from __future__ import annotations

from django.core.management.base import BaseCommand

from mailgov.services import retry_revocations


class Command(BaseCommand):
    help = (
        "Retry revoking, at the provider, the grants of revoked mailboxes whose provider "
        "could not be reached at the time. Run it periodically (cron) until the "
        "background tasks take it over."
    )

    def handle(self, *args, **options):
        counts = retry_revocations()
        self.stdout.write(
            f"revoked: {counts['revoked']}, still pending: {counts['pending']}, "
            f"refused: {counts['refused']}"
        )
