"""``make bench`` part 7: the governance portal at scale, on SQLite and on
PostgreSQL (each in a process of its own, like the rotation benchmark).

- Containment over 100,000 mailboxes (``--rows``), every one with
  encrypted tokens and some with queued mail: the time until every token
  is unusable (:func:`mailgov.incidents.contain`'s switch; target under
  1 s), then the time the set-based revocation of every row takes
  (:func:`mailgov.incidents.finish_containment`), also as a ratio against
  a bare ``UPDATE`` of the same rows' status run in the same process.
- The mailbox list: the admin changelist's server time (Django's test
  client, a superuser) at 100,000 mailboxes against the same page at 100,
  and its query count at both (the same).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

#: Mailboxes of the small list the large one is compared with.
SMALL_LIST = 100


def _seed(rows: int, owners: int = 1000) -> list[Any]:
    from django.contrib.auth import get_user_model

    from mailgov.models import Mailbox, MailboxCredentials, OutboxMessage

    User = get_user_model()
    MailboxCredentials.objects.all().delete()
    OutboxMessage.objects.all().delete()
    Mailbox.objects.all().delete()
    # The owners of an earlier seed are kept, not deleted: deleting a user
    # erases their data (mailgov.privacy), one search of the audit trail each,
    # which is not what this part measures.
    names = [f"gov-{n}" for n in range(owners)]
    existing = set(User.objects.filter(username__in=names).values_list("username", flat=True))
    User.objects.bulk_create(
        User(username=name, email=f"{name}@example.test") for name in names if name not in existing
    )
    by_name = {user.username: user for user in User.objects.filter(username__in=names)}
    users = [by_name[name] for name in names]
    for start in range(0, rows, 5000):
        boxes = Mailbox.objects.bulk_create(
            Mailbox(
                owner=users[n % owners],
                provider="demo",
                address=f"box{n}@example.test",
                status="active",
                scopes=["openid", "email", "mail.send"],
                provider_binding="x",
            )
            for n in range(start, min(rows, start + 5000))
        )
        MailboxCredentials.objects.bulk_create(
            MailboxCredentials(
                mailbox=box, access_token=f"access-{box.pk}", refresh_token=f"refresh-{box.pk}"
            )
            for box in boxes
        )
        OutboxMessage.objects.bulk_create(
            OutboxMessage(mailbox=box, message_id=f"<{box.pk}@x>", recipient_count=1)
            for box in boxes[:50]
        )
    return users


def bench_contain(rows: int) -> None:
    from django.db import connection, transaction

    from mailgov import incidents
    from mailgov.exceptions import MailboxContainedError
    from mailgov.freeze import check_not_blocked
    from mailgov.models import Mailbox, MailboxCredentials
    from mailgov.revocation import PENDING

    vendor = connection.vendor
    _seed(rows)
    # The baseline: one bare UPDATE of the same rows' status, rolled back.
    floor = []
    for _round in range(3):
        with transaction.atomic():
            start = time.perf_counter()
            Mailbox.objects.exclude(status="revoked").update(status="revoked")
            floor.append(time.perf_counter() - start)
            transaction.set_rollback(True)
    bare = statistics.median(floor)
    incident = incidents.declare(title="bench", scope="all")
    # Revocations are published on commit: not part of containment's time,
    # and no broker here (the sweep finds the same rows).
    from mailgov import revocation

    revocation.queue_revocations = lambda ids: 0
    start = time.perf_counter()
    incidents.contain(incident, finish=False)
    switched = time.perf_counter() - start
    # Every token in the scope is unusable from here on: check one.
    last = Mailbox.objects.order_by("-connected_at").first()
    try:
        check_not_blocked(last, sending=False)  # what get_access_token checks
    except MailboxContainedError:
        pass
    else:
        raise SystemExit("a contained mailbox's token was handed out")
    start = time.perf_counter()
    counts = incidents.finish_containment(incident)
    revoked = time.perf_counter() - start
    if counts["revoked"] != rows or Mailbox.objects.exclude(status="revoked").exists():
        raise SystemExit(f"containment left mailboxes active: {counts}")
    if MailboxCredentials.objects.filter(access_token__isnull=False).exists():
        raise SystemExit("containment left an access token")
    pending = MailboxCredentials.objects.filter(PENDING, refresh_token__isnull=False).count()
    print(
        f"contain {rows} mailboxes ({vendor}): {switched:.3f} s until every token is unusable "
        f"(target under 1 s); every row revoked, set-based, {revoked:.2f} s later; "
        f"{counts['held']} queued messages held, {pending} provider revocations queued"
    )
    print(
        f"contain ratio rows revoked/bare UPDATE ({vendor}): {revoked / bare:.2f} "
        f"(bare UPDATE of the status {bare:.2f} s)"
    )


def _settle() -> None:
    """PostgreSQL: vacuum and analyze after a bulk load or delete, so that
    both sizes are timed on a table with fresh statistics and no dead rows."""
    from django.db import connection

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for table in ("mailgov_mailbox", "mailgov_mailboxcredentials", "mailgov_outboxmessage"):
                cursor.execute(f"VACUUM ANALYZE {table}")


def _list_time(client: Any, rounds: int = 5) -> tuple[float, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get("/admin/mailgov/mailbox/")  # warm: templates, caches, connections
    times = []
    for _round in range(rounds):
        start = time.perf_counter()
        response = client.get("/admin/mailgov/mailbox/")
        times.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise SystemExit(f"mailbox list answered {response.status_code}")
    with CaptureQueriesContext(connection) as queries:
        client.get("/admin/mailgov/mailbox/")
    return statistics.median(times), len(queries)


def bench_mailbox_list(rows: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client

    vendor = connection.vendor
    admin, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client(SERVER_NAME="localhost")  # an allowed host of the settings
    client.force_login(admin)
    _seed(SMALL_LIST, owners=10)
    _settle()
    small, small_queries = _list_time(client)
    _seed(rows)
    _settle()
    large, large_queries = _list_time(client)
    print(
        f"mailbox list server time at {rows} mailboxes ({vendor}): {large * 1000:.0f} ms, "
        f"{large_queries} queries (at {SMALL_LIST}: {small * 1000:.0f} ms, {small_queries} queries)"
    )
    print(f"mailbox list ratio {rows}/{SMALL_LIST} ({vendor}): {large / small:.2f}")


def bench_governance(rows: int) -> None:
    bench_contain(rows)
    bench_mailbox_list(rows)
