from __future__ import annotations

from django.core.management.base import BaseCommand
from tqdm import tqdm

from mailgov.management.sweeplock import command_lock
from mailgov.models import Mailbox, MailboxCredentials
from mailgov.services import retry_revocations


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
        with command_lock("mailgov.retry_revocations") as run:
            with tqdm(total=pending, unit="grant", disable=None, file=self.stderr._out) as bar:
                counts = retry_revocations(progress=bar.update)
            run.result = counts
        self.stdout.write(
            f"revoked: {counts['revoked']}, still pending: {counts['pending']}, "
            f"refused: {counts['refused']}, no endpoint: {counts['no_endpoint']}"
        )
