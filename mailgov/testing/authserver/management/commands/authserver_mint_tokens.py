"""Issue many real token pairs at once, for benchmarks: ``authserver_mint_tokens --count N``.

Each pair is an access token and its refresh token, stored exactly as the
token endpoint stores them (hashed at rest, a refresh token family of its
own), for a user of this server and a client, so that the token endpoint
refreshes them like any it issued through the authorization-code flow.
Going through that flow costs a sign-in and a consent per pair; a benchmark
needing thousands of grants cannot afford it.

With ``--users-prefix P``, the pairs belong to ``count`` users of their
own, ``P-0`` to ``P-<count-1>`` with the addresses ``P-<n>@bench.test``
(created if missing), one pair each, in that order: senders that an SMTP
server checking the token's address lets send as themselves.

Prints one JSON object: ``{"expires_in": ..., "scope": ..., "tokens":
[[access, refresh], ...]}``. The tokens are secrets: this is a test peer's
command, never run against a server that holds real accounts.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.utils import timezone
from oauth2_provider.models import (
    get_access_token_model,
    get_application_model,
    get_refresh_token_model,
    set_token_value,
)

#: Rows per INSERT: well under SQLite's limit of bound parameters.
CHUNK = 500


class Command(BaseCommand):
    help = "Issue N access/refresh token pairs for a user and client; print them as JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, required=True)
        parser.add_argument("--username", default="alice")
        parser.add_argument(
            "--users-prefix", help="one pair for each of COUNT users PREFIX-<n> (created)"
        )
        parser.add_argument(
            "--client-id", default=os.environ.get("MAILGOV_DEMO_CLIENT_ID") or "mailgov-demo"
        )
        parser.add_argument("--scope", default="openid email profile mail.send")

    def handle(self, *args: Any, **options: Any) -> None:
        count = options["count"]
        if count < 1:
            raise CommandError("--count must be at least 1.")
        User = get_user_model()
        try:
            application = get_application_model().objects.get(client_id=options["client_id"])
            if options["users_prefix"]:
                prefix = options["users_prefix"]
                users = []
                for n in range(count):
                    user, _ = User.objects.get_or_create(
                        username=f"{prefix}-{n}", defaults={"email": f"{prefix}-{n}@bench.test"}
                    )
                    users.append(user)
            else:
                users = [User.objects.get(username=options["username"])] * count
        except (User.DoesNotExist, get_application_model().DoesNotExist) as exc:
            raise CommandError(str(exc)) from None
        AccessToken, RefreshToken = get_access_token_model(), get_refresh_token_model()
        seconds = settings.OAUTH2_PROVIDER["ACCESS_TOKEN_EXPIRE_SECONDS"]
        expires = timezone.now() + timedelta(seconds=seconds)
        pairs: list[list[str]] = []
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            chunk = [[secrets.token_urlsafe(30), secrets.token_urlsafe(30)] for _ in range(size)]
            with transaction.atomic():
                accesses = []
                for user, (access, _) in zip(users[start : start + size], chunk, strict=True):
                    row = AccessToken(
                        user=user, application=application, expires=expires, scope=options["scope"]
                    )
                    set_token_value(row, access)  # the checksum is computed on insert
                    accesses.append(row)
                accesses = AccessToken.objects.bulk_create(accesses)
                refreshes = []
                for row, (_, refresh) in zip(accesses, chunk, strict=True):
                    token = RefreshToken(
                        user=row.user,
                        application=application,
                        access_token=row,
                        token_family=uuid.uuid4(),
                    )
                    set_token_value(token, refresh)
                    refreshes.append(token)
                RefreshToken.objects.bulk_create(refreshes)
            pairs.extend(chunk)
        self.stdout.write(
            json.dumps({"expires_in": seconds, "scope": options["scope"], "tokens": pairs})
        )
