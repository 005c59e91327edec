from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from mailgov.exceptions import MailgovConfigurationError
from mailgov.providers import describe_identity
from mailgov.services import bind_mailboxes, provider_bindings


class Command(BaseCommand):
    help = (
        "Which provider each mailbox was connected through, against the configuration now. "
        "'status' lists the bindings (mailgov refuses to use a mailbox whose provider id is "
        "now configured as another provider); 'bind PROVIDER_ID --yes' binds the mailboxes of "
        "PROVIDER_ID to its configuration now, for a change made on purpose."
    )

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("status", help="List the bindings per provider id.")
        bind = sub.add_parser(
            "bind",
            help="Bind the mailboxes of a provider id to its configuration now.",
        )
        bind.add_argument("provider_id")
        bind.add_argument(
            "--yes",
            action="store_true",
            help="Confirm: the new configuration is the provider that issued these grants.",
        )

    def handle(self, *args, **options):
        if options["action"] == "status":
            return self.status()
        return self.bind(options["provider_id"], confirmed=options["yes"])

    def status(self) -> None:
        rows = provider_bindings()
        if not rows:
            self.stdout.write("No mailboxes.")
            return
        refused = 0
        for row in rows:
            if row["matches"]:
                state = "ok"
            else:
                refused += row["count"]
                state = "REFUSED: not configured" if not row["configured"] else "REFUSED"
            self.stdout.write(
                f"{row['provider']}: {row['count']} mailbox(es) connected through "
                f"{describe_identity(row['binding'])}: {state}"
            )
            if row["configured"] and not row["matches"]:
                self.stdout.write(f"    configured now as {describe_identity(row['configured'])}")
        self.stdout.write(f"{refused} mailbox(es) refused.")

    def bind(self, provider_id: str, *, confirmed: bool) -> None:
        if not confirmed:
            raise CommandError(
                "Binding sends these grants' tokens to the provider as configured now. "
                "Check that it is the provider that issued them, then run again with --yes "
                "('mailgov_providers status' shows both identities)."
            )
        try:
            count = bind_mailboxes(provider_id, actor="manage.py mailgov_providers")
        except MailgovConfigurationError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{count} mailbox(es) of {provider_id!r} bound.")
