"""Mailboxes, their encrypted credentials, and the send log."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from mailgov.exceptions import MailgovConfigurationError
from mailgov.fields import EncryptedTextField
from mailgov.providers import get_provider


def current_identity(provider_id: str) -> str:
    """The identity provider ``provider_id`` is configured as now; ``""`` if
    it is not configured (or not validly)."""
    try:
        return get_provider(provider_id).identity
    except MailgovConfigurationError:
        return ""


class Mailbox(models.Model):
    """A mailbox an application may send from, on its owner's behalf.

    Holds no secret: the tokens live in :class:`MailboxCredentials`, a separate
    table, so listing, counting or auditing mailboxes never loads ciphertext.
    """

    class Status(models.TextChoices):
        ACTIVE = "active", _("Active")
        NEEDS_RECONSENT = "needs_reconsent", _("Needs re-consent")
        SUSPENDED = "suspended", _("Suspended")
        REVOKED = "revoked", _("Revoked")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="mailgov_mailboxes",
        verbose_name=_("owner"),
    )
    provider = models.CharField(_("provider"), max_length=64)
    # The identity of the provider the mailbox was connected through
    # ("type|issuer|smtp host", see Provider.identity). Tokens are used only
    # while the configuration of ``provider`` still gives this identity.
    provider_binding = models.TextField(
        _("provider identity at connect time"), blank=True, editable=False
    )
    address = models.EmailField(_("sending address"), max_length=254)
    status = models.CharField(
        _("status"), max_length=20, choices=Status.choices, default=Status.ACTIVE
    )
    scopes = models.JSONField(_("granted scopes"), default=list, blank=True)
    connected_at = models.DateTimeField(_("connected"), default=timezone.now)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True)
    last_refreshed_at = models.DateTimeField(_("last refreshed"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)
    # A short machine-readable code ("invalid_grant", "smtp_auth_rejected", ...)
    # followed by plain words; never a provider's raw response body.
    revocation_reason = models.CharField(_("revocation reason"), max_length=255, blank=True)

    class Meta:
        verbose_name = _("mailbox")
        verbose_name_plural = _("mailboxes")
        ordering = ["address"]
        constraints = [
            # One active mailbox per sending address: the backend picks the
            # mailbox by the From address, which must not be ambiguous.
            models.UniqueConstraint(
                Lower("address"),
                condition=models.Q(status="active"),
                name="mailgov_one_active_mailbox_per_address",
            ),
        ]
        indexes = [models.Index(fields=["status"], name="mailgov_mailbox_status")]

    def __str__(self) -> str:
        return f"{self.address} ({self.provider})"

    def save(self, *args, **kwargs) -> None:
        if self._state.adding and not self.provider_binding:
            # A mailbox created without connect_mailbox() (the ORM, a fixture)
            # is bound to its provider as configured now, as at connect time.
            self.provider_binding = current_identity(self.provider)
        super().save(*args, **kwargs)

    def has_scopes(self, scopes: list[str] | tuple[str, ...]) -> bool:
        granted = set(self.scopes or ())
        return all(scope in granted for scope in scopes)


class MailboxCredentials(models.Model):
    """A mailbox's tokens, encrypted at rest and bound to the mailbox's UUID.

    The expiry is stored in clear on purpose: it is not secret, and refresh
    sweeps must be able to select the rows that need a refresh without
    decrypting anything.
    """

    mailbox = models.OneToOneField(
        Mailbox,
        on_delete=models.CASCADE,
        primary_key=True,
        related_name="credentials",
    )
    access_token = EncryptedTextField(null=True)
    refresh_token = EncryptedTextField(null=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    #: The encrypted columns, for rotation and wiping.
    ENCRYPTED_FIELDS = ("access_token", "refresh_token")

    class Meta:
        verbose_name = _("mailbox credentials")
        verbose_name_plural = _("mailbox credentials")

    def __str__(self) -> str:
        return f"credentials of mailbox {self.pk}"

    def __repr__(self) -> str:
        return f"<MailboxCredentials mailbox={self.pk}>"

    def access_token_valid(self, margin_seconds: int, now: datetime | None = None) -> bool:
        """Whether the access token is usable for at least ``margin_seconds`` more."""
        if not self.expires_at or self.__dict__.get("access_token") is None:
            return False
        now = now or timezone.now()
        return self.expires_at - timedelta(seconds=margin_seconds) > now

    def wipe(self) -> None:
        """Forget both tokens (the caller saves)."""
        self.access_token = None
        self.refresh_token = None
        self.expires_at = None


class SendLog(models.Model):
    """One row per message sent or failed.

    No bodies, no subjects and no recipient addresses (privacy): the
    Message-ID and the recipient count are enough to trace a message through
    the provider's own logs.
    """

    class Status(models.TextChoices):
        SENT = "sent", _("Sent")
        FAILED = "failed", _("Failed")

    id = models.BigAutoField(primary_key=True)
    mailbox = models.ForeignKey(
        Mailbox, on_delete=models.SET_NULL, null=True, related_name="send_logs"
    )
    message_id = models.CharField(_("Message-ID"), max_length=998, blank=True)
    recipient_count = models.PositiveIntegerField(_("recipients"), default=0)
    status = models.CharField(_("status"), max_length=10, choices=Status.choices)
    error_class = models.CharField(_("error"), max_length=200, blank=True)
    attempted_at = models.DateTimeField(_("attempted"), default=timezone.now)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)

    class Meta:
        verbose_name = _("send log entry")
        verbose_name_plural = _("send log")
        ordering = ["-attempted_at"]
        indexes = [models.Index(fields=["mailbox", "-attempted_at"], name="mailgov_sendlog_mbox")]

    def __str__(self) -> str:
        return f"{self.status} {self.message_id}"


class ConsentReceipt(models.Model):
    """A receipt for every grant, re-grant and withdrawal of a capability.

    Records what was asked, what was granted and which version of the
    explanation the user was shown. The IP address is truncated (the last
    octet of IPv4, the last 80 bits of IPv6) before it is stored.
    """

    class Action(models.TextChoices):
        GRANT = "grant", _("Granted")
        PARTIAL = "partial", _("Partly granted")
        WITHDRAW = "withdraw", _("Withdrawn")

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="mailgov_receipts"
    )
    mailbox = models.ForeignKey(
        Mailbox, on_delete=models.SET_NULL, null=True, blank=True, related_name="receipts"
    )
    provider = models.CharField(_("provider"), max_length=64)
    address = models.EmailField(_("address"), max_length=254, blank=True)
    capability = models.CharField(_("capability"), max_length=64)
    action = models.CharField(_("action"), max_length=10, choices=Action.choices)
    scopes_requested = models.JSONField(_("scopes asked"), default=list)
    scopes_granted = models.JSONField(_("scopes granted"), default=list)
    explanation_version = models.PositiveIntegerField(_("explanation version"))
    created_at = models.DateTimeField(_("time"), default=timezone.now)
    ip_address = models.CharField(_("IP address (truncated)"), max_length=64, blank=True)
    user_agent = models.CharField(_("browser"), max_length=300, blank=True)

    class Meta:
        verbose_name = _("consent receipt")
        verbose_name_plural = _("consent receipts")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} {self.capability} {self.address}"
