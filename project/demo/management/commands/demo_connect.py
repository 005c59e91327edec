"""Connect a demo user's mailbox through a real authorization-code flow with PKCE.

Until the consent pages exist, this is how a mailbox gets its tokens: the
demo authorization server authenticates the user and records consent, and
mailgov redeems the code itself. No token is ever written by hand.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.core.management.base import BaseCommand, CommandError

from mailgov.exceptions import MailgovError
from mailgov.pkce import make_pkce_pair
from mailgov.services import connect_mailbox_from_code
from mailgov.testing.oauth import authorize
from project.demo.users import DEMO_USERS

SCOPES = ["openid", "email", "profile", "mail.send"]


class Command(BaseCommand):
    help = "Connect a demo user's mailbox via the demo authorization server (and send a test)."

    def add_arguments(self, parser):
        parser.add_argument("username", choices=sorted(DEMO_USERS))
        parser.add_argument("--send-test", action="store_true", help="Then send a test message.")

    def handle(self, *args, username: str, send_test: bool = False, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No site user {username!r}: run manage.py demo_seed first.")
        provider = settings.MAILGOV_PROVIDERS["demo"]
        verifier, challenge = make_pkce_pair()
        state = secrets.token_urlsafe(16)
        result = authorize(
            settings.AUTHSERVER_URL,
            client_id=provider["client_id"],
            redirect_uri=settings.DEMO_REDIRECT_URI,
            scopes=SCOPES,
            username=username,
            password=DEMO_USERS[username][1],
            code_challenge=challenge,
            state=state,
        )
        if not result.code:
            raise CommandError(f"The authorization server refused: {result.error}")
        try:
            mailbox = connect_mailbox_from_code(
                owner=user,
                provider_id="demo",
                code=result.code,
                code_verifier=verifier,
                redirect_uri=settings.DEMO_REDIRECT_URI,
                requested_scopes=SCOPES,
            )
        except MailgovError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Connected {mailbox.address} ({mailbox.status}).")
        if send_test:
            send_mail(
                "Hello from mailgov",
                "This message was sent with XOAUTH2 over verified TLS.",
                mailbox.address,
                [mailbox.address],
            )
            self.stdout.write("Sent a test message: see the demo inbox.")
