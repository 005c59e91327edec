from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from mailgov import outbox
from mailgov.exceptions import OutboxStateError
from mailgov.management.sweeplock import command_lock
from mailgov.models import Mailbox


class Command(BaseCommand):
    help = (
        "The outbox, for operators: `status` (counts by state, due, oldest queued), "
        "`retry <id>` (a failed or held message; refused for a sent one), `cancel <id>`, "
        "`release <mailbox id>` (its held messages), `dispatch` (the beat sweep, once)."
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("status", help="Counts by state, due now, age of the oldest queued.")
        retry = sub.add_parser("retry", help="Queue a failed or held message again.")
        retry.add_argument("message_id", help="The outbox message's id (UUID).")
        cancel = sub.add_parser("cancel", help="Cancel a queued, held or failed message.")
        cancel.add_argument("message_id")
        release = sub.add_parser("release", help="Queue again a mailbox's held messages.")
        release.add_argument("mailbox_id", help="The mailbox's id (UUID).")
        sub.add_parser("dispatch", help="Recover interrupted sends and publish due work now.")

    def handle(self, *args, action: str, **options):
        actor = "manage.py mailgov_outbox"
        try:
            if action == "status":
                self._status()
            elif action == "retry":
                row = outbox.retry_message(options["message_id"], actor=actor)
                self.stdout.write(f"Outbox message {row.pk} queued again.")
            elif action == "cancel":
                row = outbox.cancel_message(options["message_id"], actor=actor)
                self.stdout.write(f"Outbox message {row.pk} cancelled.")
            elif action == "release":
                mailbox = Mailbox.objects.filter(pk=options["mailbox_id"]).first()
                if mailbox is None:
                    raise CommandError(f"No mailbox {options['mailbox_id']}.")
                count = outbox.release_held(mailbox, actor=actor)
                self.stdout.write(f"{count} held message(s) of mailbox {mailbox.pk} released.")
            elif action == "dispatch":
                # The beat sweep's lock: never beside a running sweep.
                with command_lock("mailgov.dispatch_outbox") as run:
                    counts = run.result = outbox.dispatch()
                self.stdout.write(", ".join(f"{key}: {value}" for key, value in counts.items()))
        except (OutboxStateError, ValueError) as exc:
            raise CommandError(str(exc)) from None

    def _status(self) -> None:
        status = outbox.outbox_status()
        for state, count in status["states"].items():
            self.stdout.write(f"{state}: {count}")
        self.stdout.write(f"due now: {status['due']}")
        self.stdout.write(f"oldest queued: {status['oldest_queued_seconds']:.0f} s")
