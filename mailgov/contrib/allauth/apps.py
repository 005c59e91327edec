from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class MailgovAllauthConfig(AppConfig):
    name = "mailgov.contrib.allauth"
    label = "mailgov_allauth"
    verbose_name = _("Mail governance: consent")

    def ready(self) -> None:
        from mailgov.contrib.allauth import checks, receivers  # noqa: F401  (registers checks)
        from mailgov.signals import mailbox_needs_reconsent

        mailbox_needs_reconsent.connect(
            receivers.notify_owner, dispatch_uid="mailgov.contrib.allauth.notify_owner"
        )
