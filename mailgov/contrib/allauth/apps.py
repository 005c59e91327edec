from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class MailgovAllauthConfig(AppConfig):
    name = "mailgov.contrib.allauth"
    label = "mailgov_allauth"
    verbose_name = _("Mail governance: consent")

    def ready(self) -> None:
        from mailgov.contrib.allauth import checks  # noqa: F401  (registers checks)
