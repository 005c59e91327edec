"""The demo's allauth account adapter."""

from __future__ import annotations

from allauth.account.adapter import DefaultAccountAdapter
from django.urls import reverse


class DemoAccountAdapter(DefaultAccountAdapter):
    def is_open_for_signup(self, request) -> bool:
        # No local sign-up: with sign-in by email address on and no email
        # verification in the demo, a local account registered with someone
        # else's address would receive that person's provider sign-in.
        # Accounts come from the identity provider's automatic sign-up (or
        # the admin); the sign-up forms, where an address can be typed in,
        # are closed. mailgov's adapter also signs in by email only to
        # addresses verified here (demo_seed verifies alice's and bob's).
        closed = (reverse("account_signup"), reverse("socialaccount_signup"))
        return not request.path.startswith(closed)
