"""Checks of the allauth integration. Ids are stable."""

from __future__ import annotations

from typing import Any

from allauth.socialaccount.models import SocialApp
from django.conf import settings
from django.core import checks
from django.db import DatabaseError
from django.urls import NoReverseMatch, resolve, reverse
from django.utils.module_loading import import_string

from mailgov.contrib.allauth.adapter import MailgovSocialAccountAdapter

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
    try:
        adapter_ok = issubclass(
            import_string(getattr(settings, "SOCIALACCOUNT_ADAPTER", "")),
            MailgovSocialAccountAdapter,
        )
    except ImportError:
        adapter_ok = False
    if not adapter_ok:
        messages.append(
            checks.Error(
                f"SOCIALACCOUNT_ADAPTER must be {ADAPTER!r} or a subclass of it.",
                id=WRONG_ADAPTER,
            )
        )
    for name, kwargs in (
        ("openid_connect_callback", {"provider_id": "any"}),
        ("openid_connect_login", {"provider_id": "any"}),
        ("google_callback", {}),
        ("google_login", {}),
        ("microsoft_callback", {}),
        ("microsoft_login", {}),
    ):
        try:
            view = resolve(reverse(name, kwargs=kwargs)).func
        except NoReverseMatch:
            continue  # that provider is not installed
        if not getattr(view, "mailgov_route", False):
            messages.append(
                checks.Error(
                    f"allauth's {name!r} route is not mailgov's: granted scopes would be lost "
                    "and the query string could widen a request.",
                    hint="Include mailgov.contrib.allauth.oauth_urls before allauth.urls.",
                    id=CALLBACK_NOT_OURS,
                )
            )
            break
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
