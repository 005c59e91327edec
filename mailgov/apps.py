from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class MailgovConfig(AppConfig):
    name = "mailgov"
    verbose_name = _("Mail governance")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from auditlog.registry import auditlog
        from django.db.models.signals import post_delete, pre_delete
        from django.test.signals import setting_changed

        from mailgov import checks, metrics, receivers, signals  # noqa: F401  (registers checks)
        from mailgov.models import ConsentReceipt, ErasureRecord, Incident, Mailbox, OutboxMessage

        setting_changed.connect(
            receivers.reset_keyring_on_setting_change, dispatch_uid="mailgov.reset_keyring"
        )
        # No sender: a proxy of Mailbox (Governance, a host's own) deletes
        # mailbox rows too; the receiver checks the concrete model.
        pre_delete.connect(
            receivers.keep_grant_for_revocation, dispatch_uid="mailgov.keep_grant_for_revocation"
        )
        # The database gauges, on prometheus-client's registry (once; not in
        # multiprocess mode, where /metrics builds its own registry).
        metrics.register()
        # Deleting a user through Django erases their data first (data-subject
        # requests: mailgov.privacy). No sender: Django names a proxy of the
        # user model as the sender when the deletion goes through one; the
        # receivers check the concrete model.
        pre_delete.connect(receivers.erase_deleted_user, dispatch_uid="mailgov.erase_deleted_user")
        post_delete.connect(receivers.scrub_deleted_user, dispatch_uid="mailgov.scrub_deleted_user")
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
