from __future__ import annotations

from django.apps import AppConfig


class AuthserverConfig(AppConfig):
    """Templates and the ``authserver_seed`` command of the demo authorization server."""

    name = "mailgov.testing.authserver"
    label = "mailgov_authserver"
    verbose_name = "mailgov demo authorization server"
