from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from mailgov.exceptions import UserLookupError
from mailgov.models import ErasureRecord
from mailgov.privacy import check_erasures, erase_user, find_user


class Command(BaseCommand):
    help = (
        "Erase what mailgov holds about a user (a data-subject erasure request): revoke "
        "every grant (at the provider: queued and retried), delete outbox bodies and "
        "notices, pseudonymise the user's addresses in mailboxes, receipts and the audit "
        "trail. The erasure is recorded (without the erased data)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "user",
            nargs="?",
            help="username, email address or id; a prefix id:, username: or email: chooses",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="only mark done the pending erasures whose revocations have all happened",
        )
        parser.add_argument(
            "--delete-account", action="store_true", help="delete the Django user too"
        )
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    def handle(self, *args, user=None, delete_account=False, yes=False, check=False, **options):
        if check:
            done = check_erasures()
            pending = ErasureRecord.objects.filter(status=ErasureRecord.Status.PENDING).count()
            self.stdout.write(f"erasures done now: {done}, still pending: {pending}")
            return
        if not user:
            raise CommandError("name the user (username, email address or id), or --check")
        try:
            subject = find_user(user)
        except UserLookupError as exc:
            raise CommandError(str(exc)) from exc
        if not yes:
            what = "erase the data and delete the account" if delete_account else "erase the data"
            answer = input(f"{what} of user {subject.pk}? This cannot be undone. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("nothing done")
        record = erase_user(subject, delete_account=delete_account)
        counts = ", ".join(
            f"{key.replace('_', ' ')}: {value}" for key, value in record.counts.items()
        )
        self.stdout.write(f"erasure {record.pk} ({record.pseudonym}): {counts}")
        self.stdout.write(
            "done"
            if record.status == record.Status.DONE
            else "pending: grants wait for their revocation at the provider "
            "(retried by mailgov.retry_revocations; manage.py mailgov_retry_revocations)"
        )
