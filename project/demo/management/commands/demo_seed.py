from __future__ import annotations

import os

from allauth.account.models import EmailAddress
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from project.demo.users import DEMO_USERS


class Command(BaseCommand):
    help = "Create the demo site's users (idempotent): admin, alice, bob."

    def handle(self, *args, **options):
        User = get_user_model()
        admin_password = os.environ.get("MAILGOV_DEMO_ADMIN_PASSWORD", "admin-demo-password")
        admin, _ = User.objects.get_or_create(
            username="admin", defaults={"email": "admin@example.test"}
        )
        admin.is_staff = admin.is_superuser = True
        admin.set_password(admin_password)
        admin.save()
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
        self.stdout.write("Demo site users: admin, alice, bob (see the README for passwords).")
