"""``get_access_token()``: a valid access token, refreshed exactly once when needed.

Single flight: the refresh happens inside a transaction holding the
mailbox's row lock (``select_for_update(no_key=True)`` on PostgreSQL; on SQLite the
``IMMEDIATE`` transaction mode takes the database write lock at ``BEGIN``),
and the token is read again after the lock is taken, so of many threads and
processes that find the token expired, one refreshes and the others use its
result. The lock is held across the HTTP call on purpose; that call has a
timeout, and the database's lock timeout must be longer than it.

Secrets never leave through here: no token is logged, and exceptions carry
OAuth error codes and HTTP statuses, not response bodies.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from mailgov.conf import mailgov_settings
from mailgov.exceptions import GrantRevokedError, MailboxUnavailableError, ProviderError
from mailgov.freeze import any_block, check_not_blocked
from mailgov.metrics import count_refresh
from mailgov.models import Mailbox, MailboxCredentials, RefreshEvent
from mailgov.providers import Provider, get_mailbox_provider
from mailgov.services import (
    apply_token_response,
    mark_needs_reconsent_locked,
    notify_needs_reconsent,
    warn_inside_transaction,
)
from mailgov.signals import token_refreshed

logger = logging.getLogger("mailgov.tokens")


@sensitive_variables()
def get_access_token(
    mailbox: Mailbox,
    *,
    force_refresh: bool = False,
    rejected_token: str | None = None,
    margin_seconds: int | None = None,
) -> str:
    """Return an access token for ``mailbox`` valid for at least the refresh margin.

    ``force_refresh`` asks for a new token even if the stored one looks valid
    (the SMTP server refused it); pass the refused token as ``rejected_token``
    so that a token another worker has refreshed meanwhile is used instead of
    refreshing again.

    ``margin_seconds`` (default ``MAILGOV_TOKEN_REFRESH_MARGIN_SECONDS``) is
    how long the returned token must stay valid: the proactive refresh
    (:func:`mailgov.lifecycle.refresh_expiring`) asks for
    ``MAILGOV_REFRESH_AHEAD_SECONDS``, so that a token expiring within that
    window is renewed once, single flight, like any other refresh.

    Raises :class:`MailboxUnavailableError` (mailbox not active or not
    connected), :class:`ProviderChangedError` (its provider id is now
    configured as another provider: nothing is refreshed or returned),
    :class:`GrantRevokedError` (``invalid_grant``: the mailbox is now
    ``needs_reconsent``, its tokens wiped, the signal sent),
    :class:`TokenRefreshUnavailableError` (5xx/timeout: retry later; tokens
    kept), :class:`TokenRefreshError` (other refusals; tokens kept).
    """
    margin = (
        mailgov_settings.TOKEN_REFRESH_MARGIN_SECONDS if margin_seconds is None else margin_seconds
    )
    # Neither handed out nor refreshed for a provider id now configured as
    # another provider than the one that issued the tokens.
    provider = get_mailbox_provider(mailbox)
    if not force_refresh:
        # Only an active mailbox's token is handed out: a suspended or
        # revoked mailbox falls through to the checks below and is refused.
        # The row decides, not the caller's copy: still active, and still
        # bound to the provider as configured in this process.
        credentials = (
            MailboxCredentials.objects.filter(
                pk=mailbox.pk,
                mailbox__status=Mailbox.Status.ACTIVE,
                mailbox__provider_binding=provider.identity,
            )
            # An incident's containment (mailgov.freeze), in the same query.
            .annotate(any_block=any_block())
            .first()
        )
        if credentials is not None and credentials.any_block:
            check_not_blocked(mailbox, sending=False)
        if credentials is not None and credentials.access_token_valid(margin):
            return credentials.access_token
    return _refresh(
        mailbox, provider, margin, force_refresh=force_refresh, rejected_token=rejected_token
    )


def _refresh(
    mailbox: Mailbox,
    provider: Provider,
    margin: int,
    *,
    force_refresh: bool,
    rejected_token: str | None,
) -> str:
    # Resolve the endpoint (an OIDC discovery fetch) before taking the lock,
    # so that the lock is held for one HTTP call only.
    _ = provider.token_endpoint
    warn_inside_transaction("refreshes a token")
    try:
        return _refresh_locked(
            mailbox, provider, margin, force_refresh=force_refresh, rejected_token=rejected_token
        )
    except ProviderError as exc:
        if not isinstance(exc, GrantRevokedError):
            # The refresh's transaction rolled back: the history is written after.
            event = RefreshEvent.objects.create(
                mailbox_id=mailbox.pk,
                outcome=RefreshEvent.Outcome.UNAVAILABLE
                if exc.retryable
                else RefreshEvent.Outcome.REFUSED,
                error_code=(exc.error or (str(exc.status) if exc.status else ""))[:64],
            )
            count_refresh(mailbox.provider, event.outcome)
        raise


@sensitive_variables()
def _refresh_locked(
    mailbox: Mailbox,
    provider: Provider,
    margin: int,
    *,
    force_refresh: bool,
    rejected_token: str | None,
) -> str:
    revoked: GrantRevokedError | None = None
    with transaction.atomic():
        # FOR NO KEY UPDATE: holds off other refreshes of this mailbox, but not
        # the foreign-key checks of send-log inserts that reference it.
        locked = Mailbox.objects.select_for_update(no_key=True).get(pk=mailbox.pk)
        credentials = (
            MailboxCredentials.objects.select_for_update(no_key=True).filter(pk=mailbox.pk).first()
        )
        if locked.status != Mailbox.Status.ACTIVE:
            raise MailboxUnavailableError(
                f"Mailbox {locked.pk} is {locked.status}; it cannot be used to send."
            )
        # Never refreshed once an incident contained it (its grant is being
        # revoked at the provider).
        check_not_blocked(locked, sending=False)
        if locked.provider_binding != provider.identity:
            # Rebound or reconnected meanwhile: the fresh row decides.
            get_mailbox_provider(locked)
        if credentials is None or not credentials.refresh_token:
            raise MailboxUnavailableError(f"Mailbox {locked.pk} holds no refresh token.")
        # Re-check under the lock: another thread or process may have
        # refreshed while this one waited.
        if credentials.access_token_valid(margin) and (
            not force_refresh
            or (rejected_token is not None and credentials.access_token != rejected_token)
        ):
            return credentials.access_token
        try:
            response = provider.refresh(credentials.refresh_token)
        except GrantRevokedError as exc:
            # Record the fall in this same transaction (the lock is still
            # held); the exception is raised once it has committed.
            revoked = exc
            RefreshEvent.objects.create(
                mailbox_id=locked.pk,
                outcome=RefreshEvent.Outcome.REVOKED,
                error_code="invalid_grant",
            )
            count_refresh(locked.provider, RefreshEvent.Outcome.REVOKED)
            if mark_needs_reconsent_locked(locked, credentials, "invalid_grant"):
                notify_needs_reconsent(locked, "invalid_grant")
        else:
            now = timezone.now()
            # A rotated refresh token is saved in the same transaction as
            # the access token it came with.
            apply_token_response(credentials, response, now=now)
            credentials.save()
            fields = {"last_refreshed_at": now}
            if response.scopes is not None and sorted(set(response.scopes)) != sorted(
                locked.scopes or []
            ):
                locked.scopes = sorted(set(response.scopes))
                locked.save(update_fields=["scopes"])
            Mailbox.objects.filter(pk=locked.pk).update(**fields)
            RefreshEvent.objects.create(
                mailbox_id=locked.pk, at=now, outcome=RefreshEvent.Outcome.OK
            )
            count_refresh(locked.provider, RefreshEvent.Outcome.OK)
            mailbox.last_refreshed_at = now
            token = credentials.access_token
    if revoked is not None:
        mailbox.status = locked.status
        logger.warning("mailbox %s: refresh refused with invalid_grant", mailbox.pk)
        raise revoked
    logger.info("mailbox %s: access token refreshed", mailbox.pk)
    token_refreshed.send(sender=Mailbox, mailbox=mailbox)
    return token
