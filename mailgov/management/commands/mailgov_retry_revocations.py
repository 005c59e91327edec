from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from mailgov.models import Mailbox, MailboxCredentials
from mailgov.services import retry_revocations
from mailgov.sweeps import exclusive


class Command(BaseCommand):
    help = (
        "Retry now, at the provider, every pending revocation of a revoked mailbox's grant, "
        "including those the periodic task gave up on (mailgov.retry_revocations retries "
        "them with backoff on its own)."
    )

    def handle(self, *args, **options):
        pending = MailboxCredentials.objects.filter(
            mailbox__status=Mailbox.Status.REVOKED, refresh_token__isnull=False
        ).count()
        with exclusive("mailgov.retry_revocations", ttl=3600) as run:
            if not run:
                raise CommandError("Another run is retrying revocations now; try again later.")
            with tqdm(total=pending, unit="grant", disable=None, file=self.stderr._out) as bar:
                counts = retry_revocations(progress=bar.update)
            run.result = counts
        self.stdout.write(
            f"revoked: {counts['revoked']}, still pending: {counts['pending']}, "
            f"refused: {counts['refused']}, no endpoint: {counts['no_endpoint']}"
        )
