"""Checks of the allauth integration. Ids are stable."""

from __future__ import annotations

from typing import Any

from allauth.socialaccount.models import SocialApp
from django.conf import settings
from django.core import checks
from django.db import DatabaseError
from django.urls import NoReverseMatch, resolve, reverse

SECRET_IN_DATABASE = "mailgov.W010"
TOKENS_STORED = "mailgov.E030"
WRONG_ADAPTER = "mailgov.E031"
CALLBACK_NOT_OURS = "mailgov.E032"

ADAPTER = "mailgov.contrib.allauth.adapter.MailgovSocialAccountAdapter"


@checks.register()
def check_allauth_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    if getattr(settings, "SOCIALACCOUNT_STORE_TOKENS", False):
        messages.append(
            checks.Error(
                "SOCIALACCOUNT_STORE_TOKENS is on: allauth would store tokens in clear in "
                "SocialToken. mailgov keeps them in its encrypted vault.",
                hint="Set SOCIALACCOUNT_STORE_TOKENS = False.",
                id=TOKENS_STORED,
            )
        )
    if getattr(settings, "SOCIALACCOUNT_ADAPTER", None) != ADAPTER:
        messages.append(
            checks.Error(
                f"SOCIALACCOUNT_ADAPTER must be {ADAPTER!r} (or a subclass set here by name).",
                id=WRONG_ADAPTER,
            )
        )
    try:
        path = reverse("openid_connect_callback", kwargs={"provider_id": "any"})
        view = resolve(path).func
    except NoReverseMatch:
        view = None
    if view is not None and not getattr(view, "__module__", "").startswith("mailgov."):
        messages.append(
            checks.Error(
                "allauth's OAuth2 callbacks are not mailgov's: the granted scopes would be lost.",
                hint="Include mailgov.contrib.allauth.urls before allauth.urls.",
                id=CALLBACK_NOT_OURS,
            )
        )
    return messages


@checks.register(checks.Tags.database, checks.Tags.security)
def check_no_secret_in_database(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Client secrets belong in the environment or a secret file, not in SocialApp rows."""
    if not databases:
        return []
    try:
        rows = list(SocialApp.objects.exclude(secret="").values_list("provider", "name"))
    except DatabaseError:
        return []  # not migrated yet (this runs before migrate too)
    return [
        checks.Warning(
            f"The allauth SocialApp {name!r} ({provider}) holds a client secret in the database.",
            hint="Configure the app in SOCIALACCOUNT_PROVIDERS[...]['APPS'] from the environment "
            "or a secret file, and clear the database field.",
            id=SECRET_IN_DATABASE,
        )
        for provider, name in rows
    ]
