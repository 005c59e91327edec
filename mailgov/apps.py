from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class MailgovConfig(AppConfig):
    name = "mailgov"
    verbose_name = _("Mail governance")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from auditlog.registry import auditlog
        from django.apps import apps as django_apps
        from django.db.models.signals import class_prepared
        from django.test.signals import setting_changed

        from mailgov import checks, metrics, receivers, signals  # noqa: F401  (registers checks)
        from mailgov.models import ConsentReceipt, ErasureRecord, Incident, Mailbox, OutboxMessage

        setting_changed.connect(
            receivers.reset_keyring_on_setting_change, dispatch_uid="mailgov.reset_keyring"
        )
        # Deleting a mailbox row keeps its grant for revocation; deleting a
        # user through Django erases their data first (data-subject requests:
        # mailgov.privacy). Connected to the mailbox and user models and to
        # every proxy of them (Governance, a host's own), now and later.
        receivers.connect_deletion_receivers(django_apps.get_models())
        class_prepared.connect(receivers.connect_late_proxy, dispatch_uid="mailgov.late_proxy")
        # The database gauges, on prometheus-client's registry (once; not in
        # multiprocess mode, where /metrics builds its own registry).
        metrics.register()
        signals.mailbox_needs_reconsent.connect(
            receivers.log_needs_reconsent, dispatch_uid="mailgov.log_needs_reconsent"
        )
        signals.grant_revocation_ended.connect(
            receivers.note_revocation_for_erasures, dispatch_uid="mailgov.note_revocation"
        )
        # Status, scopes and revocation are audited; the timestamps that move
        # at every send or refresh are not, or the trail would drown in them.
        # Credentials are never registered: no token reaches an audit diff.
        auditlog.register(
            Mailbox,
            exclude_fields=[
                "last_used_at",
                "last_refreshed_at",
                "refresh_failed_on",
                "refresh_failures",
                "refresh_retry_at",
                "revocation_attempts",
                "revocation_retry_at",
            ],
        )
        # Outbox rows: their state only (never the payload, never the
        # envelope). Incidents and consent receipts hold no secret.
        auditlog.register(OutboxMessage, include_fields=["state"])
        auditlog.register(Incident)
        auditlog.register(ConsentReceipt)
        # An erasure is an action like any other: who, when, from where and
        # its counts (the record holds no erased data; see mailgov.privacy).
        auditlog.register(ErasureRecord)
