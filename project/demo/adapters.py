"""The demo's allauth account adapter."""

from __future__ import annotations

from allauth.account.adapter import DefaultAccountAdapter
from django.urls import reverse


class DemoAccountAdapter(DefaultAccountAdapter):
    def is_open_for_signup(self, request) -> bool:
        # No local sign-up: with sign-in by email address on and no email
        # verification in the demo, a local account registered with someone
        # else's address would receive that person's provider sign-in.
        # Accounts come from the identity provider (or the admin).
        return not request.path.startswith(reverse("account_signup"))
