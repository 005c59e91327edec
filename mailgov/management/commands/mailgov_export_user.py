from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from mailgov.exceptions import UserLookupError
from mailgov.privacy import export_user, find_user


class Command(BaseCommand):
    help = (
        "Export everything mailgov holds about a user (a data-subject access request) as "
        "one JSON document: mailboxes, consent receipts, send-log and outbox metadata, "
        "notices, refresh history, audit entries. Never a token, a ciphertext or a body."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "user", help="username, email address or id; a prefix id:, username: or email: chooses"
        )
        parser.add_argument("--output", "-o", help="write to this file instead of stdout")

    def handle(self, *args, user, output=None, **options):
        try:
            subject = find_user(user)
        except UserLookupError as exc:
            raise CommandError(str(exc)) from exc
        text = json.dumps(export_user(subject), indent=2, ensure_ascii=False)
        if output:
            with open(output, "w", encoding="utf-8") as file:
                file.write(text + "\n")
            self.stderr.write(f"written to {output}")
        else:
            self.stdout.write(text)
