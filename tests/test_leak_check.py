"""The ``leak_check`` fixture itself: it must see what a test's fixtures log or
print while they are set up, not only what the test body does (a refresh in a
fixture that logged its token would otherwise pass every leak test)."""

from __future__ import annotations

import logging

import pytest

SECRET = "ya29.a0-leaked-during-fixture-setup"


@pytest.fixture
def logs_a_secret():
    logging.getLogger("mailgov.tokens").info("mailbox x: token %s", SECRET)


@pytest.fixture
def prints_a_secret():
    print("token", SECRET)


def test_leak_check_sees_what_a_fixture_logged(leak_check, logs_a_secret):
    with pytest.raises(AssertionError, match="a secret reached"):
        leak_check([SECRET])


def test_leak_check_sees_what_a_fixture_printed(leak_check, prints_a_secret):
    with pytest.raises(AssertionError, match="a secret reached"):
        leak_check([SECRET])


def test_leak_check_sees_what_the_test_logged(leak_check):
    logging.getLogger("mailgov").debug("token %s", SECRET)
    with pytest.raises(AssertionError, match="a secret reached"):
        leak_check([SECRET])


def test_leak_check_passes_when_nothing_leaked(leak_check, caplog):
    logging.getLogger("mailgov").info("mailbox x refreshed")
    leak_check([SECRET])
