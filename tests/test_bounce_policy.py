"""The bounce policy (DESIGN §8) on SQLite and PostgreSQL: what each event does to the
suppression list, the lists and the deliveries; that nothing counts twice; unsubscribes and
the fencing of a worker that holds the claim; `campaign show` counts; migration 0002.

The store's state is built directly (lists, subscribers, campaigns, deliveries), and events
come as `bounces.Report` values: what the parser hands over.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from alembic import command

from bulksend import bounces, campaigns, db, models, sender, smtp, store_sending, suppression
from bulksend.config import BouncesConfig, DeliveryConfig
from bulksend.errors import NotFound
from bulksend.suppression import BouncePolicy, Counts
from tests.test_send import SECRET, SENDER, account
from tests.test_send_outcomes import PATIENT, accepted, address, begin, healthy

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc).timestamp()
DAY = 86400.0
POLICY = BouncePolicy()


# --- building the store's state -----------------------------------------------------------------


class World:
    """Lists, subscribers, campaigns and deliveries written straight into the store."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._tokens = itertools.count(1)

    def _write(self, statement: Any, rows: Any = None) -> Any:
        with db.transaction(self.engine) as connection:
            return connection.execute(statement, rows) if rows is not None else connection.execute(statement)

    def list(self, name: str) -> int:
        """The id of list `name`, created if needed."""
        with db.transaction(self.engine) as connection:
            found = connection.execute(sa.select(models.lists.c.id)
                                       .where(models.lists.c.name == name)).scalar()
            if found is not None:
                return int(found)
            return int(connection.execute(sa.insert(models.lists).values(name=name, created_at=NOW)
                                          .returning(models.lists.c.id)).scalar_one())

    def subscribers(self, emails: Sequence[str], lists: Sequence[str] = ("news",),
                    status: str = "subscribed") -> list[int]:
        """Subscribers (new) on `lists`; their ids in order."""
        list_ids = [self.list(name) for name in lists]
        with db.transaction(self.engine) as connection:
            connection.execute(sa.insert(models.subscribers), [
                {"email": email, "email_key": email.lower(), "attributes": {}, "created_at": NOW,
                 "updated_at": NOW} for email in emails])
            ids = dict(connection.execute(
                sa.select(models.subscribers.c.email_key, models.subscribers.c.id)
                .where(models.subscribers.c.email_key.in_([e.lower() for e in emails]))).all())
            if list_ids:
                connection.execute(sa.insert(models.list_members), [
                    {"list_id": list_id, "subscriber_id": ids[email.lower()], "status": status,
                     "created_at": NOW, "updated_at": NOW}
                    for email in emails for list_id in list_ids])
        return [ids[email.lower()] for email in emails]

    def subscriber(self, email: str, lists: Sequence[str] = ("news",)) -> int:
        return self.subscribers([email], lists)[0]

    def campaign(self, name: str, lists: Sequence[str] = ("news",), status: str = "running") -> int:
        """A started campaign on `lists`."""
        list_ids = [self.list(list_name) for list_name in lists]
        with db.transaction(self.engine) as connection:
            campaign_id = int(connection.execute(sa.insert(models.campaigns).values(
                name=name, subject="s", html_template="h", status=status, settings={},
                created_at=NOW, updated_at=NOW, started_at=NOW).returning(models.campaigns.c.id)
            ).scalar_one())
            connection.execute(sa.insert(models.campaign_lists), [
                {"campaign_id": campaign_id, "list_id": list_id} for list_id in list_ids])
        return campaign_id

    def deliveries(self, campaign_id: int, emails: Sequence[str], *, state: str = "sent",
                   account: str | None = "a1", at: float = NOW, enhanced: str | None = None,
                   code: int | None = None) -> list[int]:
        """Deliveries of existing subscribers, in `state`; a handed-over one has its attempt."""
        with db.transaction(self.engine) as connection:
            ids = dict(connection.execute(
                sa.select(models.subscribers.c.email_key, models.subscribers.c.id)
                .where(models.subscribers.c.email_key.in_([e.lower() for e in emails]))).all())
            leased = state in ("claimed", "sending")
            rows = [{
                "campaign_id": campaign_id, "subscriber_id": ids[email.lower()], "email": email,
                "email_key": email.lower(), "state": state, "account": account,
                "attempts": 1 if state in ("sent", "failed", "unknown") else 0,
                "next_attempt_at": at, "created_at": at, "updated_at": at,
                "sent_at": at if state == "sent" else None, "smtp_enhanced": enhanced,
                "smtp_code": code,
                "lease_owner": "worker" if leased else None,
                "lease_token": f"token-{next(self._tokens)}" if leased else None,
                "lease_expires_at": at + 600 if leased else None,
            } for email in emails]
            connection.execute(sa.insert(models.deliveries), rows)
            found = dict(connection.execute(
                sa.select(models.deliveries.c.email_key, models.deliveries.c.id)
                .where(models.deliveries.c.campaign_id == campaign_id,
                       models.deliveries.c.email_key.in_([e.lower() for e in emails]))).all())
            delivery_ids = [found[email.lower()] for email in emails]
            if account is not None and state in ("sent", "failed", "unknown", "claimed", "sending"):
                done = state in ("sent", "failed", "unknown")
                connection.execute(sa.insert(models.delivery_attempts), [
                    {"delivery_id": delivery_id, "account": account, "reserved_at": at,
                     "finished_at": at if done else None, "outcome": state if done else None,
                     "smtp_enhanced": enhanced, "smtp_code": code}
                    for delivery_id in delivery_ids])
        return delivery_ids

    def delivery(self, campaign_id: int, email: str, **options: Any) -> int:
        return self.deliveries(campaign_id, [email], **options)[0]

    def crowd(self, campaign_id: int, count: int, prefix: str, **options: Any) -> list[int]:
        """`count` new subscribers on "news", each with a delivery of the campaign."""
        emails = [f"{prefix}{i:05d}@example.org" for i in range(count)]
        self.subscribers(emails)
        return self.deliveries(campaign_id, emails, **options)


@pytest.fixture
def world(engine: sa.Engine) -> World:
    return World(engine)


# --- reports as the parser makes them -----------------------------------------------------------


def event(kind: str, *, email: str | None = None, delivery_id: int | None = None,
          source: str | None = None, status: str | None = None) -> bounces.Event:
    default_source = {"complaint": "arf", "unsubscribe": "mailto"}.get(kind, "dsn")
    default_status = {"hard": "5.1.1", "soft": "4.2.2", "block": "5.7.1"}.get(kind)
    return bounces.Event(kind=kind, source=source or default_source, email=email,
                         status=status or default_status, diagnostic=f"{kind} diagnostic",
                         delivery_id=delivery_id)


def report(*events: bounces.Event, ignored: str | None = None) -> bounces.Report:
    return bounces.Report(message_id=None, events=tuple(events), ignored=ignored)


def apply(engine: sa.Engine, rep: bounces.Report, key: str, now: float = NOW,
          policy: BouncePolicy = POLICY) -> dict[str, int]:
    return suppression.apply_report(engine, rep, source_key=key, now=now, policy=policy).to_json()


def counts(**values: int) -> dict[str, int]:
    return Counts(**values).to_json()


# --- reading the outcome ----------------------------------------------------------------------------


def suppressed(engine: sa.Engine) -> dict[str, tuple[str, int | None]]:
    """Suppressed address → (reason, campaign id)."""
    s = models.suppressions
    with engine.connect() as connection:
        rows = connection.execute(sa.select(s.c.email_key, s.c.reason, s.c.campaign_id))
        return {key: (reason, campaign) for key, reason, campaign in rows}


def events(engine: sa.Engine) -> list[tuple[str, str, str, int | None, int | None]]:
    """Recorded events: (kind, source, email_key, delivery id, campaign id), in order."""
    e = models.bounce_events
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            sa.select(e.c.kind, e.c.source, e.c.email_key, e.c.delivery_id, e.c.campaign_id)
            .order_by(e.c.id))]


def delivery_row(engine: sa.Engine, delivery_id: int) -> Any:
    with engine.connect() as connection:
        return connection.execute(sa.select(models.deliveries)
                                  .where(models.deliveries.c.id == delivery_id)).one()


def memberships(engine: sa.Engine, email: str) -> dict[str, str]:
    lists, members, subs = models.lists, models.list_members, models.subscribers
    with engine.connect() as connection:
        return dict(connection.execute(
            sa.select(lists.c.name, members.c.status)
            .join(members, members.c.list_id == lists.c.id)
            .join(subs, subs.c.id == members.c.subscriber_id)
            .where(subs.c.email_key == email.lower())).all())


def campaign_status(engine: sa.Engine, campaign_id: int) -> tuple[str, str | None]:
    c = models.campaigns
    with engine.connect() as connection:
        return tuple(connection.execute(sa.select(c.c.status, c.c.pause_reason)
                                        .where(c.c.id == campaign_id)).one())


# --- hard bounces and complaints ------------------------------------------------------------------


def test_hard_bounce_suppresses_the_address_at_once_and_only_once(engine: sa.Engine,
                                                                   world: World) -> None:
    world.subscriber("ann@example.org")
    c1 = world.campaign("c1")
    d = world.delivery(c1, "ann@example.org")

    first = apply(engine, report(event("hard", delivery_id=d)), "<dsn-1@mx>")
    again = apply(engine, report(event("hard", delivery_id=d)), "<dsn-1@mx>")

    assert first == counts(messages=1, hard=1, suppressed=1)
    assert again == counts(messages=1)
    assert suppressed(engine) == {"ann@example.org": ("hard_bounce", c1)}
    assert events(engine) == [("hard", "dsn", "ann@example.org", d, c1)]


def test_complaint_suppresses_the_address_at_once(engine: sa.Engine, world: World) -> None:
    world.subscriber("bob@example.org")
    c1 = world.campaign("c1")
    d = world.delivery(c1, "bob@example.org")

    assert apply(engine, report(event("complaint", delivery_id=d)), "<arf-1@fbl>") == counts(
        messages=1, complaints=1, suppressed=1)
    assert suppressed(engine) == {"bob@example.org": ("complaint", c1)}


def test_a_second_bounce_mail_for_a_suppressed_address_counts_but_suppresses_nothing_new(
        engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org")
    d = world.delivery(world.campaign("c1"), "ann@example.org")
    apply(engine, report(event("hard", delivery_id=d)), "<dsn-1@mx>")

    assert apply(engine, report(event("hard", delivery_id=d)), "<dsn-2@mx>") == counts(
        messages=1, hard=1)
    assert len(events(engine)) == 2


@pytest.mark.parametrize("kind", ["hard", "soft", "complaint", "block", "unsubscribe"])
def test_processing_the_same_mail_again_counts_and_changes_nothing(
        engine: sa.Engine, world: World, kind: str) -> None:
    world.subscriber("ann@example.org")
    c1 = world.campaign("c1")
    d = world.delivery(c1, "ann@example.org")
    world.subscriber("zed@example.org")
    pending = world.delivery(c1, "zed@example.org", state="queued")
    rep = report(event(kind, delivery_id=d), event("hard", delivery_id=pending))
    first = apply(engine, rep, "<same@mx>")
    state = (suppressed(engine), events(engine), memberships(engine, "ann@example.org"))

    again = apply(engine, rep, "<same@mx>")

    assert sum(first.values()) > 1
    assert again == counts(messages=1)
    assert (suppressed(engine), events(engine), memberships(engine, "ann@example.org")) == state


def test_block_is_recorded_and_never_suppresses(engine: sa.Engine, world: World) -> None:
    world.subscriber("cid@example.org")
    c1 = world.campaign("c1")
    d = world.delivery(c1, "cid@example.org")

    assert apply(engine, report(event("block", delivery_id=d)), "<blk@mx>") == counts(messages=1)

    assert suppressed(engine) == {}
    assert events(engine) == [("block", "dsn", "cid@example.org", d, c1)]
    assert memberships(engine, "cid@example.org") == {"news": "subscribed"}


def test_ignored_report_counts_as_ignored_and_records_nothing(engine: sa.Engine,
                                                              world: World) -> None:
    world.subscriber("ann@example.org")
    world.delivery(world.campaign("c1"), "ann@example.org")

    assert apply(engine, report(ignored="autoreply"), "<vacation@mx>") == counts(messages=1, ignored=1)
    assert apply(engine, report(ignored="delayed"), "<delay@mx>") == counts(messages=1, ignored=1)
    assert (events(engine), suppressed(engine)) == ([], {})


def test_delay_warnings_are_recorded_once_and_never_suppress_or_count_as_soft(
        engine: sa.Engine, world: World) -> None:
    world.subscribers(["ann@example.org", "bob@example.org"])
    c1 = world.campaign("c1")
    d = world.delivery(c1, "ann@example.org")
    policy = BouncePolicy(soft_bounce_limit=2)
    delay = report(event("delayed", delivery_id=d, status="4.4.7"),
                   event("delayed", email="Bob@Example.org", status="4.4.1"))

    for key in ("<d1@mx>", "<d2@mx>", "<d3@mx>"):
        assert apply(engine, delay, key, policy=policy) == counts(messages=1, ignored=1)
    assert apply(engine, delay, "<d1@mx>", policy=policy) == counts(messages=1, ignored=1)
    assert apply(engine, report(event("soft", delivery_id=d)), "<s1@mx>",
                 policy=policy) == counts(messages=1, soft=1)

    assert suppressed(engine) == {}
    assert events(engine) == [("delayed", "dsn", "ann@example.org", d, c1),
                              ("delayed", "dsn", "bob@example.org", None, None)] * 3 + [
        ("soft", "dsn", "ann@example.org", d, c1)]
    assert campaigns.show(engine, "c1")["bounced"] == 0


def test_a_delay_warning_beside_a_failure_is_recorded_and_the_mail_is_not_ignored(
        engine: sa.Engine, world: World) -> None:
    world.subscribers(["ann@example.org", "bob@example.org"])
    c1 = world.campaign("c1")
    ann, bob = world.deliveries(c1, ["ann@example.org", "bob@example.org"])

    assert apply(engine, report(event("hard", delivery_id=ann), event("delayed", delivery_id=bob)),
                 "<mixed@mx>") == counts(messages=1, hard=1, suppressed=1)
    assert [row[0] for row in events(engine)] == ["hard", "delayed"]
    assert set(suppressed(engine)) == {"ann@example.org"}


# --- a batch of reports -----------------------------------------------------------------------


def apply_batch(engine: sa.Engine, batch: Sequence[tuple[bounces.Report, str]], now: float = NOW,
                policy: BouncePolicy = POLICY) -> dict[str, int]:
    with db.transaction(engine) as connection:
        return suppression.apply_reports(connection, batch, now=now, policy=policy).to_json()


def test_a_batch_does_what_its_reports_do_one_by_one(engine: sa.Engine, world: World) -> None:
    emails = ["ann@example.org", "bob@example.org", "cid@example.org", "dan@example.org"]
    world.subscribers(emails)
    c1, c2 = world.campaign("c1"), world.campaign("c2")
    ann, bob, _, dan = world.deliveries(c1, emails)
    bob2 = world.delivery(c2, "bob@example.org")
    policy = BouncePolicy(soft_bounce_limit=2)
    batch = [
        (report(event("soft", delivery_id=bob)), "<s1@mx>"),
        (report(event("hard", delivery_id=ann)), "<h1@mx>"),
        (report(event("hard", delivery_id=ann)), "<h1@mx>"),  # the same mail twice
        (report(ignored="autoreply"), "<auto@mx>"),
        (report(event("soft", delivery_id=bob2)), "<s2@mx>"),  # the limit: suppressed for c2
        (report(event("soft", delivery_id=bob)), "<s3@mx>"),
        (report(event("complaint", email="Cid@Example.org")), "<arf@mx>"),  # the newest delivery
        (report(event("hard", email="stranger@example.org")), "<forged@mx>"),
        (report(event("unsubscribe", delivery_id=dan, source="mailto")), "<u@mx>"),
        (report(event("delayed", delivery_id=dan)), "<late@mx>"),
    ]

    assert apply_batch(engine, batch, policy=policy) == counts(
        messages=10, hard=2, soft=3, complaints=1, unsubscribes=1, ignored=2, suppressed=3)

    assert suppressed(engine) == {"ann@example.org": ("hard_bounce", c1),
                                  "bob@example.org": ("hard_bounce", c2),
                                  "cid@example.org": ("complaint", c1)}
    assert memberships(engine, "dan@example.org") == {"news": "unsubscribed"}
    assert sorted((kind, key) for kind, _, key, _, _ in events(engine)) == [
        ("complaint", "cid@example.org"), ("delayed", "dan@example.org"),
        ("hard", "ann@example.org"), ("hard", "stranger@example.org"),
        ("soft", "bob@example.org"), ("soft", "bob@example.org"), ("soft", "bob@example.org"),
        ("unsubscribe", "dan@example.org")]
    assert apply_batch(engine, batch, policy=policy) == counts(messages=10, ignored=2)


def test_soft_bounces_before_the_batch_count_toward_the_limit(engine: sa.Engine,
                                                              world: World) -> None:
    world.subscriber("ann@example.org")
    c1, c2, c3 = world.campaign("c1"), world.campaign("c2"), world.campaign("c3")
    d1 = world.delivery(c1, "ann@example.org")
    d2 = world.delivery(c2, "ann@example.org")
    d3 = world.delivery(c3, "ann@example.org")
    policy = BouncePolicy(soft_bounce_limit=2)
    apply(engine, report(event("soft", delivery_id=d1)), "<s1@mx>", policy=policy)

    assert apply_batch(engine, [(report(event("soft", delivery_id=d2)), "<s2@mx>"),
                                (report(event("soft", delivery_id=d3)), "<s3@mx>")],
                       policy=policy) == counts(messages=2, soft=2, suppressed=1)
    # The second soft bounce reached the limit: its campaign is the one on record.
    assert suppressed(engine) == {"ann@example.org": ("hard_bounce", c2)}


# --- soft bounces ---------------------------------------------------------------------------------------


def test_soft_bounces_suppress_at_the_limit_within_the_window(engine: sa.Engine,
                                                              world: World) -> None:
    world.subscriber("ann@example.org")
    d = world.delivery(world.campaign("c1"), "ann@example.org")
    soft = report(event("soft", delivery_id=d))

    assert apply(engine, soft, "<s1@mx>", NOW) == counts(messages=1, soft=1)
    assert apply(engine, soft, "<s2@mx>", NOW + 10 * DAY) == counts(messages=1, soft=1)
    assert suppressed(engine) == {}
    assert apply(engine, soft, "<s3@mx>", NOW + 29 * DAY) == counts(messages=1, soft=1, suppressed=1)
    assert suppressed(engine)["ann@example.org"][0] == "hard_bounce"


def test_soft_bounces_spread_wider_than_the_window_never_suppress(engine: sa.Engine,
                                                                   world: World) -> None:
    world.subscriber("ann@example.org")
    d = world.delivery(world.campaign("c1"), "ann@example.org")
    policy = BouncePolicy(soft_bounce_limit=2, soft_bounce_window=7 * DAY)

    for i in range(4):
        apply(engine, report(event("soft", delivery_id=d)), f"<s{i}@mx>", NOW + i * 8 * DAY, policy)

    assert suppressed(engine) == {}
    assert apply(engine, report(event("soft", delivery_id=d)), "<s9@mx>", NOW + 25 * DAY,
                 policy)["suppressed"] == 1


def test_policy_comes_from_the_bounces_section_or_the_defaults() -> None:
    config = BouncesConfig(protocol="imap", host="mx", port=993, security="tls", username="u",
                           password_env="P", soft_bounce_limit=5, soft_bounce_window=86400)

    assert BouncePolicy.from_config(None) == BouncePolicy(3, 30 * DAY)
    assert BouncePolicy.from_config(config) == BouncePolicy(5, DAY)


def test_counts_add_up_and_serialise_with_exactly_the_design_keys() -> None:
    total = Counts()
    total.add(Counts(messages=1, hard=1, suppressed=1))
    total.add(Counts(messages=2, quarantined=1, ignored=1))

    assert total.to_json() == {"messages": 3, "hard": 1, "soft": 0, "complaints": 0,
                               "unsubscribes": 0, "ignored": 1, "quarantined": 1, "suppressed": 1}


# --- tying events to deliveries ---------------------------------------------------------------------------


def test_token_wins_over_the_reported_address(engine: sa.Engine, world: World) -> None:
    world.subscriber("bob@example.org")
    c1 = world.campaign("c1")
    d = world.delivery(c1, "bob@example.org")

    apply(engine, report(event("hard", email="bob.alias@forwarder.example", delivery_id=d)), "<f@mx>")

    assert suppressed(engine) == {"bob@example.org": ("hard_bounce", c1)}
    assert events(engine) == [("hard", "dsn", "bob@example.org", d, c1)]


def test_address_without_token_ties_to_the_newest_delivery(engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org")
    c1, c2 = world.campaign("c1"), world.campaign("c2")
    world.delivery(c1, "ann@example.org", at=NOW - DAY)
    newest = world.delivery(c2, "ann@example.org")

    apply(engine, report(event("complaint", email="Ann@EXAMPLE.org")), "<arf@fbl>")

    assert events(engine) == [("complaint", "arf", "ann@example.org", newest, c2)]
    assert suppressed(engine) == {"ann@example.org": ("complaint", c2)}


def test_token_of_a_vanished_delivery_falls_back_to_the_address(engine: sa.Engine,
                                                               world: World) -> None:
    world.subscriber("ann@example.org")
    c1 = world.campaign("c1")
    d = world.delivery(c1, "ann@example.org")

    apply(engine, report(event("hard", email="ann@example.org", delivery_id=d + 1000)), "<x@mx>")

    assert events(engine) == [("hard", "dsn", "ann@example.org", d, c1)]


def test_subscriber_never_mailed_is_suppressed_by_address(engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org")

    assert apply(engine, report(event("hard", email="ann@example.org")), "<x@mx>")["suppressed"] == 1
    assert suppressed(engine) == {"ann@example.org": ("hard_bounce", None)}


def test_bounce_naming_a_stranger_is_recorded_and_suppresses_nothing(engine: sa.Engine,
                                                                     world: World) -> None:
    world.subscriber("ann@example.org")

    assert apply(engine, report(event("hard", email="stranger@example.net"),
                                event("complaint")), "<x@mx>") == counts(messages=1, hard=1,
                                                                          complaints=1)
    assert suppressed(engine) == {}
    assert events(engine) == [("hard", "dsn", "stranger@example.net", None, None),
                              ("complaint", "arf", "", None, None)]


# --- unsubscribes -------------------------------------------------------------------------------------------


def unsubscribe(engine: sa.Engine, delivery_id: int, scope: str, key: str = "web:1",
                now: float = NOW) -> bool:
    return suppression.unsubscribe(engine, delivery_id, scope=scope, source="web", now=now,
                                   source_key=key)


def test_unsubscribe_from_lists_leaves_other_lists_and_suppresses_nothing(
        engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org", lists=("news", "extra", "other"))
    c1 = world.campaign("c1", lists=("news", "extra"))
    d = world.delivery(c1, "ann@example.org")

    assert unsubscribe(engine, d, "lists") is True

    assert memberships(engine, "ann@example.org") == {
        "news": "unsubscribed", "extra": "unsubscribed", "other": "subscribed"}
    assert suppressed(engine) == {}
    assert events(engine) == [("unsubscribe", "web", "ann@example.org", d, c1)]


def test_unsubscribe_from_everything_also_suppresses_the_address(engine: sa.Engine,
                                                                 world: World) -> None:
    world.subscriber("ann@example.org", lists=("news", "other"))
    c1 = world.campaign("c1")
    d = world.delivery(c1, "ann@example.org")

    assert unsubscribe(engine, d, "all") is True

    assert suppressed(engine) == {"ann@example.org": ("unsubscribe", c1)}
    assert memberships(engine, "ann@example.org") == {"news": "unsubscribed", "other": "subscribed"}


def test_unsubscribe_twice_does_nothing_the_second_time(engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org")
    d = world.delivery(world.campaign("c1"), "ann@example.org")
    assert unsubscribe(engine, d, "all", key="web:a") is True
    before = (suppressed(engine), events(engine), memberships(engine, "ann@example.org"))

    assert unsubscribe(engine, d, "all", key="web:a") is False
    assert unsubscribe(engine, d, "lists", key="web:b") is False
    assert (suppressed(engine), events(engine), memberships(engine, "ann@example.org")) == before


def test_everything_after_lists_still_suppresses(engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org")
    d = world.delivery(world.campaign("c1"), "ann@example.org")
    unsubscribe(engine, d, "lists", key="web:1:lists")

    assert unsubscribe(engine, d, "all", key="web:1:all") is True
    assert suppressed(engine)["ann@example.org"][0] == "unsubscribe"
    assert len(events(engine)) == 2  # campaign show counts the address once anyway


def test_unsubscribe_stops_pending_deliveries_in_campaigns_the_address_may_no_longer_receive(
        engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org", lists=("news", "other"))
    clicked = world.delivery(world.campaign("c1"), "ann@example.org")
    queued = world.delivery(world.campaign("c2"), "ann@example.org", state="queued")
    deferred = world.delivery(world.campaign("c3"), "ann@example.org", state="deferred")
    claimed = world.delivery(world.campaign("c4"), "ann@example.org", state="claimed")
    sending = world.delivery(world.campaign("c5"), "ann@example.org", state="sending")
    on_other = world.delivery(world.campaign("c6", lists=("news", "other")), "ann@example.org",
                              state="queued")

    unsubscribe(engine, clicked, "lists")

    states = {d: delivery_row(engine, d).state for d in (clicked, queued, deferred, claimed,
                                                        sending, on_other)}
    assert states == {clicked: "sent", queued: "suppressed", deferred: "suppressed",
                      claimed: "suppressed", sending: "sending", on_other: "queued"}
    row = delivery_row(engine, claimed)
    assert (row.lease_owner, row.lease_token, row.lease_expires_at) == (None, None, None)

    unsubscribe(engine, clicked, "all", key="web:2")
    assert delivery_row(engine, on_other).state == "suppressed"
    assert delivery_row(engine, sending).state == "sending"  # past the point of no return


def test_worker_holding_the_claim_cannot_commit_sending_after_an_unsubscribe(
        engine: sa.Engine, world: World) -> None:
    world.subscriber("ann@example.org")
    d = world.delivery(world.campaign("c1"), "ann@example.org", state="claimed")
    token = delivery_row(engine, d).lease_token

    unsubscribe(engine, d, "lists")

    with db.transaction(engine) as connection:
        assert store_sending.mark_sending(connection, [d], token, NOW + 1, 600) == set()
    assert delivery_row(engine, d).state == "suppressed"


def test_unsubscribing_the_last_open_delivery_finishes_the_campaign(engine: sa.Engine,
                                                                    world: World) -> None:
    world.subscribers(["ann@example.org", "bob@example.org"])
    c1 = world.campaign("c1")
    world.delivery(c1, "ann@example.org")
    pending = world.delivery(c1, "bob@example.org", state="queued")

    unsubscribe(engine, pending, "lists")

    assert campaign_status(engine, c1) == ("finished", None)


def test_unsubscribe_of_an_unknown_delivery_is_not_found(engine: sa.Engine) -> None:
    with pytest.raises(NotFound, match="delivery 4242"):
        unsubscribe(engine, 4242, "lists")


def test_mailto_unsubscribe_event_unsubscribes_from_the_lists_once(engine: sa.Engine,
                                                                   world: World) -> None:
    world.subscriber("ann@example.org", lists=("news", "other"))
    c1 = world.campaign("c1")
    d = world.delivery(c1, "ann@example.org")
    mail = report(event("unsubscribe", email="ann@example.org", delivery_id=d))

    assert apply(engine, mail, "<u1@ann>") == counts(messages=1, unsubscribes=1)
    assert apply(engine, mail, "<u1@ann>") == counts(messages=1)
    assert apply(engine, mail, "<u2@ann>") == counts(messages=1)  # sent twice by the user

    assert memberships(engine, "ann@example.org") == {"news": "unsubscribed", "other": "subscribed"}
    assert suppressed(engine) == {}
    assert events(engine) == [("unsubscribe", "mailto", "ann@example.org", d, c1)]


# --- the sender is fenced off by an unsubscribe while it holds the claim ------------------------------


class UnsubscribingSession:
    """A real SMTP session; just before it sends to `victim`, the victim unsubscribes
    (a click while the worker holds the claim, before it commits `sending`)."""

    def __init__(self, session: smtp.Session, engine: sa.Engine, victim: str) -> None:
        self._session = session
        self._engine = engine
        self._victim = victim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def send(self, envelope_from: str, recipient: str, data: bytes, before_dot: Any) -> Any:
        if recipient == self._victim:
            d = models.deliveries
            with self._engine.connect() as connection:
                delivery_id = connection.execute(sa.select(d.c.id)
                                                 .where(d.c.email_key == recipient)).scalar_one()
            suppression.unsubscribe(self._engine, delivery_id, scope="lists", source="web",
                                    now=NOW, source_key="web:click")
        return self._session.send(envelope_from, recipient, data, before_dot)


def test_address_unsubscribed_while_its_claim_is_held_gets_no_message(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 3)
    server = healthy(smtp_server, "p")
    acc = account(server, "p")
    settings = sender.Settings((acc,), DeliveryConfig(), SENDER, SECRET, (), ZoneInfo("UTC"))

    def open_session(config: Any) -> Any:
        session = smtp.open_session(config, "secret-p", PATIENT)
        return UnsubscribingSession(session, engine, address(1))

    result = sender.Sender(engine, settings, open_session, clock=clock, sleep=clock.sleep).run(once=True)

    assert accepted(server) == [address(0), address(2)]
    assert result.sent == 2
    d = models.deliveries
    with engine.connect() as connection:
        state = connection.execute(sa.select(d.c.state).where(d.c.email_key == address(1))).scalar_one()
    assert state == "suppressed"
    assert memberships(engine, address(1)) == {"news": "unsubscribed"}
    assert campaigns.show(engine, "c")["status"] == "finished"


# --- campaign show -------------------------------------------------------------------------------------------


def test_campaign_show_counts_distinct_addresses_per_campaign(engine: sa.Engine,
                                                              world: World) -> None:
    world.subscribers(["ann@example.org", "bob@example.org", "cid@example.org", "dan@example.org"])
    c1, c2 = world.campaign("c1"), world.campaign("c2")
    ann, bob, cid, dan = world.deliveries(c1, ["ann@example.org", "bob@example.org",
                                               "cid@example.org", "dan@example.org"])
    other = world.delivery(c2, "dan@example.org")
    apply(engine, report(event("hard", delivery_id=ann)), "<h1@mx>")
    apply(engine, report(event("hard", delivery_id=ann)), "<h2@mx>")  # a second DSN for ann
    apply(engine, report(event("complaint", delivery_id=bob)), "<a1@fbl>")
    apply(engine, report(event("soft", delivery_id=cid)), "<s1@mx>")
    apply(engine, report(event("block", delivery_id=cid)), "<b1@mx>")
    unsubscribe(engine, dan, "lists", key="web:dan")
    apply(engine, report(event("complaint", delivery_id=other)), "<a2@fbl>")

    shown = campaigns.show(engine, "c1")
    assert (shown["bounced"], shown["complaints"], shown["unsubscribed"]) == (1, 1, 1)
    shown = campaigns.show(engine, "c2")
    assert (shown["bounced"], shown["complaints"], shown["unsubscribed"]) == (0, 1, 0)


# --- migration 0002 -------------------------------------------------------------------------------------------


def test_web_is_an_event_source_and_unknown_sources_are_refused(engine: sa.Engine) -> None:
    row = {"kind": "unsubscribe", "source_key": "web:1", "email_key": "a@example.org",
           "created_at": NOW}
    with db.transaction(engine) as connection:
        connection.execute(sa.insert(models.bounce_events).values(source="web", **row))
    with pytest.raises(sa.exc.IntegrityError), db.transaction(engine) as connection:
        connection.execute(sa.insert(models.bounce_events).values(source="carrier-pigeon",
                                                                  **{**row, "source_key": "x"}))


def test_upgrade_from_0001_keeps_recorded_events_and_their_checks(engine: sa.Engine) -> None:
    with db.transaction(engine) as connection:
        command.downgrade(db._alembic_config(connection), "0001")
        connection.execute(sa.text(
            "INSERT INTO bounce_events (kind, source, source_key, email_key, created_at) "
            "VALUES ('hard', 'dsn', '<old@mx>', 'ann@example.org', 1)"))
    with pytest.raises(sa.exc.IntegrityError), db.transaction(engine) as connection:
        connection.execute(sa.text(
            "INSERT INTO bounce_events (kind, source, source_key, email_key, created_at) "
            "VALUES ('unsubscribe', 'web', 'web:1', 'ann@example.org', 1)"))

    assert db.upgrade(engine) == "0002"

    assert events(engine) == [("hard", "dsn", "ann@example.org", None, None)]
    test_web_is_an_event_source_and_unknown_sources_are_refused(engine)
    with pytest.raises(sa.exc.IntegrityError), db.transaction(engine) as connection:
        connection.execute(sa.insert(models.bounce_events).values(
            kind="exploded", source="dsn", source_key="k", email_key="", created_at=NOW))


def test_delayed_is_an_event_kind_that_downgrading_to_0001_deletes(engine: sa.Engine) -> None:
    row = {"source": "dsn", "email_key": "ann@example.org", "created_at": NOW}
    with db.transaction(engine) as connection:
        connection.execute(sa.insert(models.bounce_events), [
            {"kind": "delayed", "source_key": "<late@mx>", **row},
            {"kind": "soft", "source_key": "<soft@mx>", **row}])
        command.downgrade(db._alembic_config(connection), "0001")
    with pytest.raises(sa.exc.IntegrityError), db.transaction(engine) as connection:
        connection.execute(sa.text(
            "INSERT INTO bounce_events (kind, source, source_key, email_key, created_at) "
            "VALUES ('delayed', 'dsn', '<late2@mx>', 'ann@example.org', 1)"))
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT kind FROM bounce_events")).scalars().all() \
            == ["soft"]

    assert db.upgrade(engine) == "0002"
    with db.transaction(engine) as connection:
        connection.execute(sa.insert(models.bounce_events).values(
            kind="delayed", source_key="<late@mx>", **row))
