"""``manage.py demo_seed``: the demo site's accounts, and its seeded estate.

Accounts (every run, idempotent): the administrator, alice and bob (who also
exist on the demo authorization server), an officer in "Mail security
officers" and an auditor in "Mail auditors" (the groups of mailgov's
migration). Passwords: see :mod:`project.demo.users`.

The estate (once, unless ``--mailboxes 0``): a few hundred mailboxes with a
history, so that the governance portal has data; see
:mod:`project.demo.estate`, which also says why the demo's own sweeps leave
it alone. Its grants are minted by the demo authorization server, which
must be running (``make demo`` starts it first).
"""

from __future__ import annotations

from pathlib import Path

from allauth.account.models import EmailAddress
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from project.demo import estate
from project.demo.users import DEMO_USERS, STAFF_USERS, staff_password


class Command(BaseCommand):
    help = "Create the demo site's users (idempotent) and, once, its seeded estate of mailboxes."

    def add_arguments(self, parser):
        parser.add_argument(
            "--mailboxes",
            type=int,
            default=300,
            help="Mailboxes in the seeded estate (default 300; 0: accounts only).",
        )
        parser.add_argument(
            "--authserver-dir",
            type=Path,
            default=None,
            help="The demo authorization server's data directory (default: var/authserver).",
        )

    def handle(self, *args, mailboxes: int, authserver_dir: Path | None, **options):
        User = get_user_model()
        staff = {}
        for username, (email, _, _, group) in STAFF_USERS.items():
            user, _ = User.objects.get_or_create(username=username, defaults={"email": email})
            user.is_staff = True
            user.is_superuser = group is None
            user.set_password(staff_password(username))
            user.save()
            if group is not None:
                try:
                    user.groups.set([Group.objects.get(name=group)])
                except Group.DoesNotExist:
                    raise CommandError(f"No group {group!r}: run manage.py migrate.") from None
            staff[username] = user
        for username, (email, password) in DEMO_USERS.items():
            user, _ = User.objects.get_or_create(username=username, defaults={"email": email})
            user.email = email
            user.is_staff = True  # may use the admin login page and the inbox
            user.set_password(password)
            user.save()
            # Verified here, so that signing in with the demo identity
            # provider reaches this account (mailgov signs in by email only
            # to verified addresses).
            EmailAddress.objects.update_or_create(
                user=user, email=email, defaults={"verified": True, "primary": True}
            )
        names = ", ".join([*STAFF_USERS, *DEMO_USERS])
        self.stdout.write(f"Demo site users: {names} (see the README for passwords).")
        if mailboxes <= 0:
            return
        if estate.seeded():
            self.stdout.write("The demo estate is already seeded.")
            return
        directory = authserver_dir or Path(settings.VAR_DIR) / "authserver"
        try:
            counts = estate.seed_estate(mailboxes, directory, officer=staff["officer"])
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Seeded the demo estate: {counts.pop('mailboxes')} mailboxes of {estate.DOMAIN} "
            f"({', '.join(f'{kind} {n}' for kind, n in sorted(counts.items()))})."
        )
