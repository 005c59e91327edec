"""``mailgov_alerts``: the signed-in user's mailboxes that need their attention
(for a banner on every page); evaluated only when a template uses it.
``mailgov_base_template``: the template mailgov's pages extend
(``MAILGOV_BASE_TEMPLATE``), for a host template that renders one of them
or includes it."""

from __future__ import annotations

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from mailgov.conf import mailgov_settings
from mailgov.models import Mailbox


def mailbox_alerts(request: HttpRequest) -> dict:
    def alerts() -> list[Mailbox]:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return []
        return list(
            Mailbox.objects.filter(
                owner=user,
                status__in=[Mailbox.Status.NEEDS_RECONSENT, Mailbox.Status.SUSPENDED],
            ).only("id", "address", "provider", "revocation_reason", "status")
        )

    return {
        "mailgov_alerts": SimpleLazyObject(alerts),
        "mailgov_base_template": mailgov_settings.BASE_TEMPLATE,
    }
