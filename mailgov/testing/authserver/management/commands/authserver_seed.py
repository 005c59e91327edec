"""Create or update the demo users and OAuth clients of the authorization server.

Idempotent: a second run updates passwords, secrets and redirect URIs in place.
Every value comes from an option, else an environment variable, else a demo
default (this is a local demo server):

==============================  =================================  ======================
option                          environment                        default
==============================  =================================  ======================
``--alice-password``            ``MAILGOV_DEMO_ALICE_PASSWORD``    ``alice-demo-password``
``--bob-password``              ``MAILGOV_DEMO_BOB_PASSWORD``      ``bob-demo-password``
``--client-id``                 ``MAILGOV_DEMO_CLIENT_ID``         ``mailgov-demo``
``--client-secret``             ``MAILGOV_DEMO_CLIENT_SECRET``     ``mailgov-demo-secret``
``--redirect-uri`` (repeat)     ``MAILGOV_DEMO_REDIRECT_URIS``     the demo site's two callbacks
``--smtp-client-id``            ``MAILGOV_SMTP_CLIENT_ID``         ``mailgov-smtp``
``--smtp-client-secret``        ``MAILGOV_SMTP_CLIENT_SECRET``     ``mailgov-smtp-secret``
==============================  =================================  ======================

Options land in the process list; scripts pass secrets through the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from oauth2_provider.models import AbstractApplication, get_application_model

DEFAULT_REDIRECT_URIS = (
    "http://127.0.0.1:8000/accounts/oidc/demo/login/callback/",
    "http://127.0.0.1:8000/demo/oauth/callback/",
)


@dataclass(frozen=True)
class DemoUser:
    username: str
    email: str
    first_name: str
    last_name: str
    env: str
    default_password: str


DEMO_USERS = (
    DemoUser("alice", "alice@example.test", "Alice", "Example", "MAILGOV_DEMO_ALICE_PASSWORD",
             "alice-demo-password"),
    DemoUser("bob", "bob@example.test", "Bob", "Example", "MAILGOV_DEMO_BOB_PASSWORD",
             "bob-demo-password"),
)  # fmt: skip


class Command(BaseCommand):
    help = "Create or update the demo users (alice, bob) and OAuth clients (site, SMTP server)."

    def add_arguments(self, parser: CommandParser) -> None:
        for user in DEMO_USERS:
            parser.add_argument(f"--{user.username}-password", help=f"default: ${user.env}")
        parser.add_argument("--client-id", help="default: $MAILGOV_DEMO_CLIENT_ID")
        parser.add_argument("--client-secret", help="default: $MAILGOV_DEMO_CLIENT_SECRET")
        parser.add_argument(
            "--redirect-uri",
            action="append",
            dest="redirect_uris",
            help="repeatable; default: $MAILGOV_DEMO_REDIRECT_URIS (space-separated)",
        )
        parser.add_argument("--smtp-client-id", help="default: $MAILGOV_SMTP_CLIENT_ID")
        parser.add_argument("--smtp-client-secret", help="default: $MAILGOV_SMTP_CLIENT_SECRET")

    @transaction.atomic
    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        for demo in DEMO_USERS:
            password = _pick(options[f"{demo.username}_password"], demo.env, demo.default_password)
            user, created = User.objects.get_or_create(username=demo.username)
            user.email = demo.email
            user.first_name = demo.first_name
            user.last_name = demo.last_name
            user.is_active = True
            user.set_password(password)
            user.save()
            self.stdout.write(
                f"{'created' if created else 'updated'} user {demo.username} <{demo.email}> "
                f"password: {password}"
            )

        env_uris = os.environ.get("MAILGOV_DEMO_REDIRECT_URIS", "").split()
        redirect_uris = options["redirect_uris"] or env_uris or list(DEFAULT_REDIRECT_URIS)
        self._client(
            client_id=_pick(options["client_id"], "MAILGOV_DEMO_CLIENT_ID", "mailgov-demo"),
            secret=options["client_secret"],
            secret_env="MAILGOV_DEMO_CLIENT_SECRET",
            default_secret="mailgov-demo-secret",
            name="mailgov demo site",
            grant_type=AbstractApplication.GRANT_AUTHORIZATION_CODE,
            redirect_uris=" ".join(redirect_uris),
            algorithm=AbstractApplication.RS256_ALGORITHM,
        )
        self._client(
            client_id=_pick(options["smtp_client_id"], "MAILGOV_SMTP_CLIENT_ID", "mailgov-smtp"),
            secret=options["smtp_client_secret"],
            secret_env="MAILGOV_SMTP_CLIENT_SECRET",
            default_secret="mailgov-smtp-secret",
            name="mailgov SMTP server (token introspection)",
            grant_type=AbstractApplication.GRANT_CLIENT_CREDENTIALS,
            redirect_uris="",
            algorithm=AbstractApplication.NO_ALGORITHM,
        )

    def _client(
        self,
        *,
        client_id: str,
        secret: str | None,
        secret_env: str,
        default_secret: str,
        name: str,
        grant_type: str,
        redirect_uris: str,
        algorithm: str,
    ) -> None:
        Application = get_application_model()
        secret = _pick(secret, secret_env, default_secret)
        app = Application.objects.filter(client_id=client_id).first()
        created = app is None
        if app is None:
            app = Application(client_id=client_id)
        app.name = name
        app.client_type = AbstractApplication.CLIENT_CONFIDENTIAL
        app.authorization_grant_type = grant_type
        app.redirect_uris = redirect_uris
        app.algorithm = algorithm
        app.skip_authorization = False
        # DOT hashes the secret when the row is saved: give it the plaintext.
        app.hash_client_secret = True
        app.client_secret = secret
        # Checks the redirect URIs (scheme, no fragment) and the algorithm/key pair.
        app.full_clean(exclude=["user"])
        app.save()
        shown = secret if secret == default_secret else "(from the environment, not shown)"
        self.stdout.write(
            f"{'created' if created else 'updated'} client {client_id!r} ({name}), "
            f"secret: {shown}" + (f", redirect URIs: {redirect_uris}" if redirect_uris else "")
        )


def _pick(option: str | None, env: str, default: str) -> str:
    """Option, else a non-empty environment variable, else the default."""
    return option or os.environ.get(env) or default
