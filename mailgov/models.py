"""Mailboxes, their encrypted credentials, and the send log."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from auditlog.models import LogEntry
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

    # -- lifecycle (mailgov.lifecycle): proactive refresh, dormancy, throttling.
    # Calendar days on which refreshing failed, counted once a day (a provider
    # outage of a few hours costs nobody a grant); reset by a success.
    refresh_failing_days = models.PositiveSmallIntegerField(_("refresh failing days"), default=0)
    refresh_failed_on = models.DateField(_("last refresh failure"), null=True, blank=True)
    # Failed refresh attempts in a row (the backoff's exponent) and when the
    # proactive refresh may try again.
    refresh_failures = models.PositiveIntegerField(_("refresh failures in a row"), default=0)
    refresh_retry_at = models.DateTimeField(_("refresh retry at"), null=True, blank=True)
    # The owner was told that refreshing keeps failing (told once; told again
    # once when it recovers).
    refresh_failing_notified = models.BooleanField(_("owner told refresh fails"), default=False)
    # The owner chose to keep a mailbox that was about to be revoked as dormant.
    kept_at = models.DateTimeField(_("kept by owner"), null=True, blank=True)
    dormant_warned_at = models.DateTimeField(_("dormancy warning sent"), null=True, blank=True)
    # A provider's throttling reply pauses the mailbox's sending until then.
    sending_paused_until = models.DateTimeField(_("sending paused until"), null=True, blank=True)
    sending_paused_reason = models.CharField(_("pause reason"), max_length=255, blank=True)
    # Provider-side revocation still to do (see services.revoke_at_provider):
    # attempts so far, the next one, and when mailgov gave up retrying.
    revocation_attempts = models.PositiveSmallIntegerField(_("revocation attempts"), default=0)
    revocation_retry_at = models.DateTimeField(_("revocation retry at"), null=True, blank=True)
    revocation_given_up_at = models.DateTimeField(_("revocation given up"), null=True, blank=True)

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
        indexes = [
            models.Index(fields=["status"], name="mailgov_mailbox_status"),
            # The inventory's default order and its provider filter, at
            # 100,000 mailboxes.
            models.Index(fields=["address"], name="mailgov_mailbox_address"),
            models.Index(fields=["provider"], name="mailgov_mailbox_provider"),
        ]

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

    @property
    def refresh_failing(self) -> bool:
        """Refreshing has failed on ``MAILGOV_REFRESH_FAILING_DAYS`` days or more."""
        from mailgov.conf import mailgov_settings

        return self.refresh_failing_days >= mailgov_settings.REFRESH_FAILING_DAYS


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
    # SET_NULL: a receipt outlives its user's account (pseudonymised by the
    # erasure) for MAILGOV_RECEIPT_RETENTION_DAYS, as proof of consent.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="mailgov_receipts",
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
    # When the grant ended by its mailbox row's deletion (its own, or its
    # owner's account's): once ``mailbox`` is null, the retention period runs
    # from here, not from the receipt's date (mailgov.lifecycle.purge). A
    # revoked mailbox that still exists says when in ``revoked_at``.
    grant_ended_at = models.DateTimeField(_("grant ended"), null=True, blank=True)

    class Meta:
        verbose_name = _("consent receipt")
        verbose_name_plural = _("consent receipts")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} {self.capability} {self.address}"


class OutboxMessage(models.Model):
    """A message waiting to be sent, or the record of one that was.

    The database row is the source of truth: the broker only carries the
    hint "there is work for mailbox X". The envelope and the serialized
    message are one encrypted value (``payload``), bound to this row; it is
    deleted once the message is sent, and kept
    ``MAILGOV_OUTBOX_FAILED_RETENTION_DAYS`` after it failed or was held.
    See :mod:`mailgov.outbox` for the states and who moves a row between them.
    """

    class State(models.TextChoices):
        QUEUED = "queued", _("Queued")
        SENDING = "sending", _("Sending")
        SENT = "sent", _("Sent")
        FAILED = "failed", _("Failed")
        HELD = "held", _("Held")
        CANCELLED = "cancelled", _("Cancelled")

    class Kind(models.TextChoices):
        MAIL = "mail", _("Mail from a mailbox")
        NOTIFICATION = "notification", _("Notice to an owner")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices, default=Kind.MAIL)
    # The sending mailbox (mail), or the mailbox a notice is about.
    mailbox = models.ForeignKey(
        Mailbox,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="outbox",
        verbose_name=_("mailbox"),
    )
    # The owner a notice goes to (null for mail).
    recipient_user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="mailgov_notifications",
        verbose_name=_("notified user"),
    )
    event = models.CharField(_("event"), max_length=64, blank=True)
    message_id = models.CharField(_("Message-ID"), max_length=998)
    # Scoped to the mailbox (or "notify:") so that keys of different senders
    # never meet.
    idempotency_key = models.CharField(
        _("idempotency key"), max_length=300, null=True, blank=True, unique=True
    )
    payload = EncryptedTextField(null=True)
    recipient_count = models.PositiveIntegerField(_("recipients"), default=0)
    state = models.CharField(_("state"), max_length=12, choices=State.choices, default=State.QUEUED)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    # Attempts that ended in a retryable error (what MAILGOV_OUTBOX_MAX_ATTEMPTS
    # counts; quota deferrals and throttling pauses are not failures).
    failures = models.PositiveIntegerField(_("failed attempts"), default=0)
    next_attempt_at = models.DateTimeField(_("next attempt"), default=timezone.now)
    claim_id = models.UUIDField(null=True, blank=True, editable=False)
    claimed_by = models.CharField(_("worker"), max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(_("lease expires"), null=True, blank=True)
    # A short code ("smtp_550", "connection_lost", "needs_reconsent", ...),
    # never a server's reply text.
    error_code = models.CharField(_("error"), max_length=64, blank=True)
    reply_code = models.PositiveSmallIntegerField(_("SMTP reply code"), null=True, blank=True)
    held_reason = models.CharField(_("held because"), max_length=255, blank=True)
    created_at = models.DateTimeField(_("queued"), default=timezone.now)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)
    # When the row last reached sent, failed, held or cancelled (retention).
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)

    #: The encrypted columns, for rotation.
    ENCRYPTED_FIELDS = ("payload",)

    class Meta:
        verbose_name = _("outbox message")
        verbose_name_plural = _("outbox")
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["state", "next_attempt_at"], name="mailgov_outbox_due"),
            models.Index(fields=["mailbox", "state"], name="mailgov_outbox_mbox"),
            models.Index(fields=["claim_id"], name="mailgov_outbox_claim"),
            models.Index(fields=["state", "finished_at"], name="mailgov_outbox_done"),
        ]

    def __str__(self) -> str:
        return f"{self.state} {self.message_id}"

    def __repr__(self) -> str:
        return f"<OutboxMessage {self.pk} {self.state}>"


class OutboxAttempt(models.Model):
    """One attempt to send an outbox message: when, by which worker, how it ended."""

    class Outcome(models.TextChoices):
        STARTED = "started", _("Started")
        SENT = "sent", _("Sent")
        RETRY = "retry", _("Will be retried")
        DEFERRED = "deferred", _("Deferred (quota or throttling)")
        FAILED = "failed", _("Failed")
        HELD = "held", _("Held")
        CANCELLED = "cancelled", _("Cancelled")
        INTERRUPTED = "interrupted", _("Interrupted (worker lost)")

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(
        OutboxMessage, on_delete=models.CASCADE, related_name="attempt_rows"
    )
    claim_id = models.UUIDField(null=True, blank=True, editable=False)
    worker = models.CharField(_("worker"), max_length=200, blank=True)
    started_at = models.DateTimeField(_("started"), default=timezone.now)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    outcome = models.CharField(
        _("outcome"), max_length=12, choices=Outcome.choices, default=Outcome.STARTED
    )
    reply_code = models.PositiveSmallIntegerField(_("SMTP reply code"), null=True, blank=True)
    error_code = models.CharField(_("error"), max_length=64, blank=True)

    class Meta:
        verbose_name = _("outbox attempt")
        verbose_name_plural = _("outbox attempts")
        ordering = ["started_at"]
        indexes = [
            models.Index(fields=["started_at"], name="mailgov_attempt_started"),
            models.Index(fields=["claim_id"], name="mailgov_attempt_claim"),
        ]

    def __str__(self) -> str:
        return f"{self.outcome} {self.started_at:%Y-%m-%d %H:%M:%S}"


class SweepLock(models.Model):
    """One row per periodic sweep: a database lock, so that two beats (or a
    command run beside beat) on any number of hosts do a sweep's work once.
    See :mod:`mailgov.sweeps`."""

    name = models.CharField(max_length=64, primary_key=True)
    holder = models.CharField(max_length=200, blank=True)
    locked_until = models.DateTimeField(null=True, blank=True)
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)
    last_result = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = _("sweep")
        verbose_name_plural = _("sweeps")

    def __str__(self) -> str:
        return self.name


class KeptConnection(models.Model):
    """An authenticated SMTP connection a worker holds open for the mailbox,
    busy or idle (:class:`mailgov.delivery.ConnectionPool`): written before
    its first batch, refreshed after each, deleted when it is closed.

    It counts against the provider's connection limit
    (``Quota.concurrency``) once per holder, together with the holder's
    running claims (:func:`mailgov.claims.other_holders`): Microsoft refuses
    a fourth connection of a mailbox whether the other three send or idle. A
    row past ``expires_at`` counts for nothing (its connection was closed by
    then, or its worker died), and is deleted at the next keep."""

    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="+")
    #: ``host:pid:thread`` (:func:`mailgov.claims.worker_name`).
    holder = models.CharField(max_length=200)
    expires_at = models.DateTimeField()

    class Meta:
        verbose_name = _("kept SMTP connection")
        verbose_name_plural = _("kept SMTP connections")
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "holder"], name="mailgov_kept_once")
        ]
        indexes = [models.Index(fields=["mailbox", "expires_at"], name="mailgov_kept_live")]

    def __str__(self) -> str:
        return f"connection of mailbox {self.mailbox_id} kept by {self.holder}"


# -- governance: refresh history, pending revocations, incidents, jobs -----------------


class RefreshEvent(models.Model):
    """One token refresh of a mailbox and how it ended (the refresh history
    of the mailbox's admin page). Never the token; purged with the send log."""

    class Outcome(models.TextChoices):
        OK = "ok", _("Refreshed")
        UNAVAILABLE = "unavailable", _("Provider unavailable")
        REFUSED = "refused", _("Refused")
        REVOKED = "revoked", _("Grant ended (invalid_grant)")

    id = models.BigAutoField(primary_key=True)
    mailbox = models.ForeignKey(Mailbox, on_delete=models.CASCADE, related_name="refresh_events")
    at = models.DateTimeField(_("time"), default=timezone.now)
    outcome = models.CharField(_("outcome"), max_length=12, choices=Outcome.choices)
    # A short code (an OAuth error code or an HTTP status), never a body.
    error_code = models.CharField(_("error"), max_length=64, blank=True)

    class Meta:
        verbose_name = _("token refresh")
        verbose_name_plural = _("token refreshes")
        ordering = ["-at"]
        indexes = [models.Index(fields=["mailbox", "-at"], name="mailgov_refresh_mbox")]

    def __str__(self) -> str:
        return f"{self.outcome} {self.at:%Y-%m-%d %H:%M:%S}"


class PendingRevocation(models.Model):
    """The refresh token of a deleted mailbox, kept (encrypted, bound to this
    row) until its grant is revoked at the provider.

    Deleting a mailbox, or the user who owns it, must never orphan a live
    grant at Google or Microsoft: :mod:`mailgov.deletion` moves the token
    here before the mailbox row goes, and the revocation sweep retries it
    like any other (see :mod:`mailgov.revocation`). Holds no address.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    mailbox_id = models.UUIDField(_("deleted mailbox"))
    provider = models.CharField(_("provider"), max_length=64)
    provider_binding = models.TextField(_("provider identity at connect time"), blank=True)
    refresh_token = EncryptedTextField(null=True)
    created_at = models.DateTimeField(_("queued"), default=timezone.now)
    attempts = models.PositiveSmallIntegerField(_("attempts"), default=0)
    retry_at = models.DateTimeField(_("next attempt"), null=True, blank=True)
    given_up_at = models.DateTimeField(_("given up"), null=True, blank=True)

    #: The encrypted columns, for rotation.
    ENCRYPTED_FIELDS = ("refresh_token",)

    class Meta:
        verbose_name = _("pending revocation of a deleted mailbox")
        verbose_name_plural = _("pending revocations of deleted mailboxes")
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"revocation of deleted mailbox {self.mailbox_id}"

    def __repr__(self) -> str:
        return f"<PendingRevocation {self.pk} mailbox={self.mailbox_id}>"


class Incident(models.Model):
    """A security incident over some of the grants mailgov holds, with its
    playbook steps (freeze, contain, rotate, notify, resolve) written to
    :class:`IncidentEvent`. See :mod:`mailgov.incidents`."""

    class Severity(models.TextChoices):
        LOW = "low", _("Low")
        MEDIUM = "medium", _("Medium")
        HIGH = "high", _("High")
        CRITICAL = "critical", _("Critical")

    class Scope(models.TextChoices):
        ALL = "all", _("Every mailbox")
        PROVIDER = "provider", _("One provider")
        CAPABILITY = "capability", _("One capability")
        USERS = "users", _("Some users")
        MAILBOXES = "mailboxes", _("Some mailboxes")

    class State(models.TextChoices):
        OPEN = "open", _("Open")
        RESOLVED = "resolved", _("Resolved")

    id = models.BigAutoField(primary_key=True)
    title = models.CharField(_("title"), max_length=200)
    severity = models.CharField(
        _("severity"), max_length=10, choices=Severity.choices, default=Severity.HIGH
    )
    scope = models.CharField(_("scope"), max_length=12, choices=Scope.choices, default=Scope.ALL)
    # The provider id or capability id of a provider or capability scope.
    scope_value = models.CharField(_("provider or capability"), max_length=64, blank=True)
    # User ids (users scope) or mailbox ids (mailboxes scope), as strings.
    scope_ids = models.JSONField(_("users or mailboxes"), default=list, blank=True)
    state = models.CharField(_("state"), max_length=10, choices=State.choices, default=State.OPEN)
    declared_at = models.DateTimeField(_("declared"), default=timezone.now)
    declared_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("declared by"),
    )
    # The kill switch: while frozen_at is set and unfrozen_at is not, no
    # mailbox in the scope sends (checked at send time by every process).
    frozen_at = models.DateTimeField(_("frozen"), null=True, blank=True)
    unfrozen_at = models.DateTimeField(_("unfrozen"), null=True, blank=True)
    # Containment: from contained_at on, no token of a mailbox in the scope
    # connected before it is used by any process (checked like the freeze);
    # the rows are then revoked set-based, and containment_done_at set once
    # every one is (the check is then no longer needed).
    contained_at = models.DateTimeField(_("contained"), null=True, blank=True)
    containment_done_at = models.DateTimeField(_("containment done"), null=True, blank=True)
    notified_at = models.DateTimeField(_("owners notified"), null=True, blank=True)
    # The owners' notice: Django template text, with the defaults from
    # mailgov/email/incident_notice*.txt (translatable) until edited.
    notice_subject = models.CharField(_("notice subject"), max_length=200, blank=True)
    notice_body = models.TextField(_("notice text"), blank=True)
    resolved_at = models.DateTimeField(_("resolved"), null=True, blank=True)
    summary = models.TextField(_("summary"), blank=True)

    class Meta:
        verbose_name = _("incident")
        verbose_name_plural = _("incidents")
        ordering = ["-declared_at"]
        permissions = [
            ("manage_incident", _("Can declare incidents and run their playbook steps")),
        ]
        indexes = [
            models.Index(fields=["frozen_at", "unfrozen_at"], name="mailgov_incident_freeze")
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title}"

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None and self.unfrozen_at is None

    def covers(self, mailbox: Mailbox) -> bool:
        """Whether ``mailbox`` is in this incident's scope (see
        :func:`mailgov.scopes.scope_queryset` for the set-based twin)."""
        from mailgov.scopes import covers

        return covers(self, mailbox)


class IncidentEvent(models.Model):
    """One line of an incident's timeline: a step, who took it, when, and counts."""

    class Step(models.TextChoices):
        DECLARE = "declare", _("Declared")
        FREEZE = "freeze", _("Froze sending")
        UNFREEZE = "unfreeze", _("Lifted the freeze")
        CONTAIN = "contain", _("Contained (tokens made unusable)")
        REVOKE = "revoke", _("Revoked the contained grants")
        ROTATE = "rotate", _("Rotated the encryption key")
        NOTIFY = "notify", _("Notified owners")
        EXPORT = "export", _("Exported affected owners")
        RESOLVE = "resolve", _("Resolved")
        NOTE = "note", _("Note")

    id = models.BigAutoField(primary_key=True)
    incident = models.ForeignKey(Incident, on_delete=models.CASCADE, related_name="timeline")
    step = models.CharField(_("step"), max_length=10, choices=Step.choices)
    at = models.DateTimeField(_("time"), default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("actor"),
    )
    # Who, in words: the username, or "shell (os user)" for a command.
    actor_label = models.CharField(_("by"), max_length=200, blank=True)
    counts = models.JSONField(_("counts"), default=dict, blank=True)
    note = models.TextField(_("note"), blank=True)
    cid = models.CharField(_("correlation id"), max_length=255, blank=True)

    class Meta:
        verbose_name = _("incident timeline entry")
        verbose_name_plural = _("incident timeline")
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.step} {self.at:%Y-%m-%d %H:%M:%S}"


class AdminJob(models.Model):
    """A governance action over a selection (revoke, suspend, release, ...):
    who asked, what, how far it got and the outcome by result. Small
    selections run in the request, larger ones in a Celery worker; both are
    recorded here. See :mod:`mailgov.governance`."""

    class State(models.TextChoices):
        PENDING = "pending", _("Waiting for a worker")
        RUNNING = "running", _("Running")
        DONE = "done", _("Done")
        FAILED = "failed", _("Failed")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    action = models.CharField(_("action"), max_length=32)
    target_ids = models.JSONField(_("selection"), default=list)
    total = models.PositiveIntegerField(_("rows"), default=0)
    done = models.PositiveIntegerField(_("rows done"), default=0)
    counts = models.JSONField(_("outcome"), default=dict, blank=True)
    state = models.CharField(
        _("state"), max_length=10, choices=State.choices, default=State.PENDING
    )
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("requested by"),
    )
    cid = models.CharField(_("correlation id"), max_length=255, blank=True)
    created_at = models.DateTimeField(_("requested"), default=timezone.now)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    # Moved by every progress write: a running job not heard of for
    # JOB_LEASE lost its worker (a long job is never taken twice).
    heartbeat_at = models.DateTimeField(_("last heard of"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    error = models.CharField(_("error"), max_length=255, blank=True)

    class Meta:
        verbose_name = _("governance job")
        verbose_name_plural = _("governance jobs")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} ({self.total})"

    @property
    def percent(self) -> int:
        return 100 if not self.total else int(100 * self.done / self.total)


class Governance(Mailbox):
    """No table of its own (a proxy): the anchor of the portal's own
    permissions and of the dashboard's entry in the admin index."""

    class Meta:
        proxy = True
        default_permissions = ()
        verbose_name = _("dashboard")
        verbose_name_plural = _("dashboard")
        permissions = [
            ("view_dashboard", _("Can view the mail governance dashboard")),
            ("export_data", _("Can export inventories and audit trails as CSV")),
            ("govern_mailbox", _("Can revoke, suspend and resume mailboxes, require re-consent")),
            ("manage_outbox", _("Can retry, cancel and release outbox messages")),
        ]

    def __str__(self) -> str:
        return "mail governance"


class AuditEntry(LogEntry):
    """django-auditlog's entries, seen through the portal's audit view."""

    class Meta:
        proxy = True
        verbose_name = _("audit entry")
        verbose_name_plural = _("audit trail")


class ErasureRecord(models.Model):
    """The record of an erasure (a data-subject request): who asked, when,
    the subject's pseudonym, and counts of what was done. Never the erased
    data itself. ``pending`` until every grant of the subject is revoked at
    its provider (see :func:`mailgov.privacy.check_erasures`), then ``done``."""

    class Status(models.TextChoices):
        PENDING = "pending", _("Waiting for revocations at the providers")
        DONE = "done", _("Done")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Null once the account is deleted too (the pseudonym still names it).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("erased user"),
    )
    pseudonym = models.CharField(_("pseudonym"), max_length=64)
    # The subject's mailbox ids (no address): what the completion check watches.
    mailbox_ids = models.JSONField(_("mailboxes"), default=list, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("erased by"),
    )
    actor_label = models.CharField(_("by"), max_length=200, blank=True)
    counts = models.JSONField(_("counts"), default=dict, blank=True)
    account_deleted = models.BooleanField(_("account deleted"), default=False)
    status = models.CharField(
        _("status"), max_length=10, choices=Status.choices, default=Status.PENDING
    )
    created_at = models.DateTimeField(_("requested"), default=timezone.now)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)

    class Meta:
        verbose_name = _("erasure")
        verbose_name_plural = _("erasures")
        ordering = ["-created_at"]
        permissions = [
            ("erase_data", _("Can erase a user's data (data-subject requests)")),
        ]

    def __str__(self) -> str:
        return f"erasure of {self.pseudonym} ({self.status})"
