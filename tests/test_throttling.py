"""Provider quotas, what is left of them, and which SMTP replies are throttling.

The reply fixtures are the providers' own texts, as smtplib hands them over
(``SMTPResponseException.smtp_error``: the reply code stripped, every line
starting with the enhanced status code again, lines joined by ``\\n``):
Google's "Gmail SMTP errors and codes", Microsoft's "Message storage and
concurrent connection throttling for SMTP Authenticated Submission",
"Continuous error throttling for SMTP AUTH submissions" and its NDR reference.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailgov import throttling
from mailgov.checks import check_providers
from mailgov.exceptions import MailgovConfigurationError
from mailgov.models import Mailbox, SendLog
from mailgov.providers import get_provider
from mailgov.throttling import (
    DAY_SECONDS,
    Allowance,
    Quota,
    Throttle,
    allowance,
    classify_reply,
    quota_for,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

GOOGLE = {"client_id": "x", "client_secret": "y"}
MICROSOFT = {"client_id": "x", "client_secret": "y", "tenant": "common"}
OIDC = {
    "type": "oidc",
    "client_id": "x",
    "server_url": "https://idp.test",
    "send_scopes": ["mail.send"],
    "smtp_host": "smtp.idp.test",
}

# -- replies -------------------------------------------------------------------

GMAIL_DAILY = (
    b"5.4.5 Daily user sending limit exceeded. For more information on Gmail\n"
    b"5.4.5 sending limits go to\n"
    b"5.4.5  https://support.google.com/a/answer/166852 d2sm1234567wmd.1 - gsmtp"
)
THROTTLING = [
    # Gmail
    ("google", 550, GMAIL_DAILY, "gmail_daily_limit"),
    ("google", 550, "5.4.5 Daily sending quota exceeded. d2sm1234567wmd.1 - gsmtp",
     "gmail_daily_limit"),
    ("google", 421, "4.7.0 Try again later, closing connection. (EHLO) d2sm1234567wmd.1 - gsmtp",
     "try_later"),
    ("google", 454, "4.7.0 Too many login attempts, please try again later. For more\n"
     "4.7.0 information, go to https://support.google.com/mail/?p=... - gsmtp",
     "gmail_login_rate"),
    # Microsoft 365
    ("microsoft", 432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded "
     "[Hostname=AM0PR01MB1234.eurprd01.prod.exchangelabs.com]", "ms_concurrency"),
    ("microsoft", 432, "4.3.2 Concurrent connections limit exceeded.", "ms_concurrency"),
    ("microsoft", 554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; "
     "Failed to process message due to a permanent exception with message [BeginDiagnosticData]"
     "Cannot submit message. 0.35250:0A00B784 [EndDiagnosticData]", "ms_quota"),
    ("microsoft", 550, "5.2.251 Sender throttled due to continuous mailbox full errors.",
     "ms_throttled"),
    ("microsoft", 550, "5.2.252 Sender throttled due to continuous send as denied errors.",
     "ms_throttled"),
    ("microsoft", 550, "5.2.253 Sender throttled due to continuous invalid license errors.",
     "ms_throttled"),
    ("microsoft", 550, "5.2.254 Sender throttled due to continuous too many recipients errors.",
     "ms_throttled"),
    ("microsoft", 550, "5.2.255 Sender throttled due to continuous invalid recipients errors.",
     "ms_throttled"),
    # The default table serves every provider type.
    ("microsoft", 421, "4.7.0 Try again later, closing connection.", "try_later"),
    ("oidc", 421, "4.7.0 Try again later, closing connection.", "try_later"),
]  # fmt: skip

NOT_THROTTLING = [
    ("google", 451, "4.3.0 Mail server temporarily rejected message. d2sm1 - gsmtp"),
    ("google", 451, "Requested action aborted: local error in processing"),
    ("google", 550, "5.1.1 The email account that you tried to reach does not exist. Please try\n"
     "5.1.1 double-checking the recipient's email address for typos or\n"
     "5.1.1 unnecessary spaces. d2sm1 - gsmtp"),
    ("google", 452, "4.5.3 Your message has too many recipients. For more information regarding\n"
     "4.5.3 Google's sending limits, go to https://support.google.com/a/answer/166852 - gsmtp"),
    ("google", 421, "4.7.0 IP not in whitelist for RCPT domain, closing connection."),
    ("google", 454, "4.7.0 Cannot authenticate due to a temporary system problem."),
    ("microsoft", 451, "4.7.500 Server busy. Please try again later from [203.0.113.9]."),
    ("microsoft", 550, "5.1.1 RESOLVER.ADR.RecipNotFound; not found"),
    ("microsoft", 535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
     "disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."),
    # Other 554 5.2.0 replies keep their meaning: Send As denied is permanent.
    ("microsoft", 554, "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException."
     "MapiExceptionSendAsDenied; Failed to process message due to a permanent exception"),
    # The recipient's mailbox is busy, not ours.
    ("microsoft", 432, "4.3.2 STOREDRV.Deliver; recipient thread limit exceeded"),
    # One provider's quota reply means nothing coming from another.
    ("microsoft", 550, "5.4.5 Daily user sending limit exceeded."),
    ("google", 550, "5.2.251 Sender throttled due to continuous mailbox full errors."),
    ("oidc", 554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"),
    # Without an enhanced status code no row can match.
    ("google", 550, "Daily user sending limit exceeded."),
    ("google", 550, ""),
]  # fmt: skip


@pytest.mark.parametrize(("provider_type", "code", "text", "expected"), THROTTLING)
def test_throttling_replies(provider_type, code, text, expected):
    throttle = classify_reply(provider_type, code, text)
    assert isinstance(throttle, Throttle)
    assert throttle.code == expected


@pytest.mark.parametrize(("provider_type", "code", "text"), NOT_THROTTLING)
def test_replies_that_are_not_throttling(provider_type, code, text):
    assert classify_reply(provider_type, code, text) is None


@pytest.mark.parametrize(
    ("code", "pause"),
    [
        ("gmail_daily_limit", DAY_SECONDS),  # "can't send for up to 24 hours"
        ("gmail_login_rate", 600),
        ("try_later", 300),
        ("ms_concurrency", 60),
        ("ms_quota", 3600),
        ("ms_throttled", 6 * 3600),
    ],
)
def test_pause_lengths(code, pause):
    replies = {expected: (kind, reply, text) for kind, reply, text, expected in THROTTLING}
    assert classify_reply(*replies[code]) == Throttle(code, pause)


def test_the_reply_code_must_match_too():
    # 5.4.5 under any code is Gmail's quota; 5.2.251 only as Microsoft sends it.
    assert classify_reply("google", 452, "5.4.5 Daily user sending limit exceeded.")
    assert classify_reply("microsoft", 451, "5.2.251 Sender throttled.") is None


def test_whole_reply_lines_and_wrapped_phrases():
    # A caller passing the reply line with its code, and a phrase split over lines.
    assert classify_reply("google", 550, "550 5.4.5 Daily user sending limit exceeded.")
    wrapped = "4.7.0 Too many login\n4.7.0 attempts, please try again later."
    assert classify_reply("google", 454, wrapped).code == "gmail_login_rate"


def test_bytes_are_decoded_leniently():
    assert classify_reply("google", 550, GMAIL_DAILY).code == "gmail_daily_limit"
    broken = b"4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded \xff\xfe"
    assert classify_reply("microsoft", 432, broken).code == "ms_concurrency"
    assert classify_reply("microsoft", 432, b"\xff\xfe") is None


def test_reply_text_is_never_logged(caplog):
    caplog.set_level("DEBUG")
    classify_reply("google", 550, "5.4.5 Daily user sending limit exceeded. secret@x.test")
    classify_reply("google", 550, "5.1.1 No such user secret@x.test")
    assert "secret@x.test" not in caplog.text


# -- quotas --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_id", "config", "expected"),
    [
        ("google", GOOGLE, Quota(2000, DAY_SECONDS, 10_000, 3)),
        ("microsoft", MICROSOFT, Quota(30, 60, 10_000, 3)),
        ("demo", OIDC, Quota(None, DAY_SECONDS, None, 3)),
    ],
)
def test_default_quotas(settings, provider_id, config, expected):
    settings.MAILGOV_PROVIDERS = {provider_id: config}
    assert quota_for(get_provider(provider_id)) == expected


@pytest.mark.parametrize(
    ("provider_id", "config", "overrides", "expected"),
    [
        # A Workspace trial account: 500 a day.
        ("google", GOOGLE, {"messages": 500}, Quota(500, DAY_SECONDS, 10_000, 3)),
        ("google", GOOGLE, {"recipients_per_day": None, "concurrency": 1},
         Quota(2000, DAY_SECONDS, None, 1)),
        ("microsoft", MICROSOFT, {"messages": None}, Quota(None, 60, 10_000, 3)),
        ("demo", OIDC, {"messages": 100, "window_seconds": 3600, "recipients_per_day": 1000},
         Quota(100, 3600, 1000, 3)),
        ("demo", OIDC, {}, Quota(None, DAY_SECONDS, None, 3)),
    ],
)  # fmt: skip
def test_quota_overrides(settings, provider_id, config, overrides, expected):
    settings.MAILGOV_PROVIDERS = {provider_id: {**config, "quota": overrides}}
    assert quota_for(get_provider(provider_id)) == expected


INVALID_QUOTAS = [
    ("messages", -1),
    ("messages", 0),
    ("messages", "100"),
    ("messages", 1.5),
    ("messages", True),
    ("window_seconds", None),
    ("window_seconds", 0),
    ("recipients_per_day", -5),
    ("concurrency", 0),
    ("concurrency", None),
    ("recipients", 100),  # a typo must not silently keep the default
]


@pytest.mark.parametrize(("key", "value"), INVALID_QUOTAS)
def test_invalid_quota_overrides(settings, key, value):
    settings.MAILGOV_PROVIDERS = {"mygoogle": {**GOOGLE, "type": "google", "quota": {key: value}}}
    with pytest.raises(MailgovConfigurationError) as raised:
        quota_for(get_provider("mygoogle"))
    assert "'mygoogle'" in str(raised.value)
    assert repr(key) in str(raised.value)


def test_quota_must_be_a_dict(settings):
    settings.MAILGOV_PROVIDERS = {"google": {**GOOGLE, "quota": [("messages", 5)]}}
    with pytest.raises(MailgovConfigurationError, match=r"\['google'\]\['quota'\] must be a dict"):
        quota_for(get_provider("google"))


def test_system_check_reports_an_invalid_quota(settings):
    settings.MAILGOV_PROVIDERS = {
        "google": {**GOOGLE, "quota": {"concurrency": 0}},
        "microsoft": {**MICROSOFT, "quota": {"messages": 20}},
    }
    [error] = check_providers()
    assert (error.id, error.obj) == ("mailgov.E015", "google")
    assert "'concurrency'" in error.msg
    assert error.level >= 40


# -- allowance -----------------------------------------------------------------


@pytest.fixture
def mailbox(settings, django_user_model):
    settings.MAILGOV_PROVIDERS = {"google": GOOGLE}
    owner = django_user_model.objects.create_user(username="owner", password="pw")
    return Mailbox.objects.create(owner=owner, provider="google", address="a@x.test")


def sent(mailbox, ago, recipients=1, status=SendLog.Status.SENT):
    SendLog.objects.create(
        mailbox=mailbox, status=status, attempted_at=NOW - ago, recipient_count=recipients
    )


MESSAGES_ONLY = Quota(messages=3, window_seconds=60, recipients_per_day=None, concurrency=3)
RECIPIENTS_ONLY = Quota(messages=None, window_seconds=60, recipients_per_day=10, concurrency=3)


@pytest.mark.django_db
def test_message_window_edges(mailbox, settings, django_user_model):
    sent(mailbox, 60 * SECOND)  # exactly one window ago: no longer counted
    sent(mailbox, 59 * SECOND)
    sent(mailbox, 30 * SECOND)
    sent(mailbox, 10 * SECOND, status=SendLog.Status.FAILED)  # failures do not count
    other = Mailbox.objects.create(owner=mailbox.owner, provider="google", address="b@x.test")
    sent(other, 5 * SECOND)  # nor do other mailboxes' sends
    assert allowance(mailbox, MESSAGES_ONLY, NOW) == Allowance(1, None, None)

    sent(mailbox, 1 * SECOND)
    # Full: the oldest counted send (59 s ago) leaves the window 1 s from now.
    assert allowance(mailbox, MESSAGES_ONLY, NOW) == Allowance(0, None, NOW + SECOND)
    just_before = NOW + SECOND - timedelta(microseconds=1)
    assert allowance(mailbox, MESSAGES_ONLY, just_before).messages == 0
    assert allowance(mailbox, MESSAGES_ONLY, NOW + SECOND) == Allowance(1, None, None)


@pytest.mark.django_db
def test_over_the_limit_waits_for_the_right_send(mailbox):
    # Five sent against a limit of three (another client, or a lowered limit):
    # room for one more once the third oldest (sent - limit + 1) has expired.
    for seconds in (50, 40, 30, 20, 10):
        sent(mailbox, seconds * SECOND)
    assert allowance(mailbox, MESSAGES_ONLY, NOW) == Allowance(0, None, NOW + 30 * SECOND)
    assert allowance(mailbox, MESSAGES_ONLY, NOW + 29 * SECOND).messages == 0
    assert allowance(mailbox, MESSAGES_ONLY, NOW + 30 * SECOND).messages == 1


@pytest.mark.django_db
def test_sends_at_the_same_instant_expire_together(mailbox):
    quota = Quota(messages=2, window_seconds=60, recipients_per_day=None, concurrency=3)
    sent(mailbox, 40 * SECOND)
    sent(mailbox, 20 * SECOND)
    sent(mailbox, 20 * SECOND)
    assert allowance(mailbox, quota, NOW) == Allowance(0, None, NOW + 40 * SECOND)
    assert allowance(mailbox, quota, NOW + 20 * SECOND).messages == 0
    assert allowance(mailbox, quota, NOW + 40 * SECOND).messages == 2


@pytest.mark.django_db
def test_recipient_limit(mailbox):
    sent(mailbox, DAY, recipients=50)  # exactly a day ago: no longer counted
    sent(mailbox, 23 * HOUR, recipients=1)
    sent(mailbox, 22 * HOUR, recipients=1)
    sent(mailbox, 21 * HOUR, recipients=2)
    sent(mailbox, 2 * HOUR, recipients=5)
    assert allowance(mailbox, RECIPIENTS_ONLY, NOW) == Allowance(None, 1, None)

    sent(mailbox, 1 * HOUR, recipients=3)
    # 12 counted, limit 10: three must expire, which takes the sends of 23,
    # 22 and 21 hours ago (1 + 1 + 2 recipients).
    assert allowance(mailbox, RECIPIENTS_ONLY, NOW) == Allowance(None, 0, NOW + 3 * HOUR)
    assert allowance(mailbox, RECIPIENTS_ONLY, NOW + 2 * HOUR).recipients == 0
    assert allowance(mailbox, RECIPIENTS_ONLY, NOW + 3 * HOUR) == Allowance(None, 2, None)


@pytest.mark.django_db
def test_both_exhausted_waits_for_the_later(mailbox):
    quota = Quota(messages=2, window_seconds=3600, recipients_per_day=5, concurrency=3)
    sent(mailbox, 23 * HOUR, recipients=4)
    sent(mailbox, 50 * 60 * SECOND, recipients=1)
    sent(mailbox, 10 * 60 * SECOND, recipients=0)
    # Messages reopen in 10 minutes, recipients only in an hour.
    assert allowance(mailbox, quota, NOW) == Allowance(0, 0, NOW + HOUR)

    longer = Quota(messages=2, window_seconds=2 * DAY_SECONDS, recipients_per_day=5, concurrency=3)
    SendLog.objects.all().delete()
    sent(mailbox, 30 * HOUR, recipients=0)
    sent(mailbox, 23 * HOUR, recipients=5)
    # Recipients reopen in an hour, messages only in 18.
    assert allowance(mailbox, longer, NOW) == Allowance(0, 0, NOW + 18 * HOUR)


@pytest.mark.django_db
def test_one_limit_exhausted_the_other_not(mailbox):
    quota = Quota(messages=2, window_seconds=60, recipients_per_day=100, concurrency=3)
    # Out of the message window by its edge, still in the day's recipients.
    sent(mailbox, 60 * SECOND, recipients=5)
    sent(mailbox, 30 * SECOND, recipients=10)
    assert allowance(mailbox, quota, NOW) == Allowance(1, 85, None)
    sent(mailbox, 20 * SECOND, recipients=10)
    assert allowance(mailbox, quota, NOW) == Allowance(0, 75, NOW + 30 * SECOND)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("quota", "rows", "queries"),
    [
        (Quota(None, 60, None, 3), 5, 0),  # unlimited: nothing to count
        (MESSAGES_ONLY, 1, 1),
        (RECIPIENTS_ONLY, 1, 1),
        (Quota(3, 60, 10, 3), 1, 1),  # both limits, one aggregate
        (MESSAGES_ONLY, 3, 2),  # exhausted: one more to find opens_at
        (Quota(3, 60, 3, 3), 3, 3),  # both exhausted
    ],
)
def test_number_of_queries(mailbox, django_assert_num_queries, quota, rows, queries):
    for n in range(rows):
        sent(mailbox, (n + 1) * SECOND)
    with django_assert_num_queries(queries):
        allowance(mailbox, quota, NOW)


def test_a_status_ending_in_a_dot_is_a_prefix(monkeypatch):
    rule = throttling._rule(451, "4.4.", None, throttling.TRY_LATER)
    monkeypatch.setitem(throttling.REPLY_RULES, "oidc", (rule,))
    assert classify_reply("oidc", 451, "4.4.2 Timeout, closing connection.").code == "try_later"
    assert classify_reply("oidc", 451, "4.4 Timeout.") is None
    assert classify_reply("oidc", 451, "4.3.2 Service not available.") is None
