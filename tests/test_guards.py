"""Guards (DESIGN §8) on SQLite and PostgreSQL: complaint and hard-bounce rates pause a
campaign, a 5.7.x block rate disables an account, each with its reason; only `campaign
resume` / `accounts enable` bring them back, and a resumed one is judged on a fresh sample.

The deliveries (1,000 or 2,000 sent, 200 handed over, 100 through an account) are written
straight into the store; complaints and bounces arrive as reports through
`suppression.apply_report`, or as recorded events for the pure rate tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulksend import (accounts, campaigns, db, guards, models, store_deliveries,
                      suppression)
from bulksend.config import AccountConfig
from bulksend.guards import Threshold
from bulksend.suppression import BouncePolicy
from tests.test_bounce_policy import DAY, NOW, World, apply, campaign_status, event, report


@pytest.fixture
def world(engine: sa.Engine) -> World:
    return World(engine)


def record(engine: sa.Engine, kind: str, delivery_ids: list[int], now: float = NOW) -> None:
    """Events of `kind` for these deliveries, written as the policy writes them."""
    d = models.deliveries
    with db.transaction(engine) as connection:
        rows = connection.execute(sa.select(d.c.id, d.c.email_key, d.c.campaign_id)
                                  .where(d.c.id.in_(delivery_ids))).all()
        connection.execute(sa.insert(models.bounce_events), [
            {"kind": kind, "source": "dsn", "source_key": f"<{kind}-{row.id}-{now}@mx>",
             "email_key": row.email_key, "delivery_id": row.id, "campaign_id": row.campaign_id,
             "created_at": now} for row in rows])


def check(engine: sa.Engine, campaign_ids: Sequence[int] = (), account_names: Sequence[str] = (),
          now: float = NOW) -> list[guards.Trip]:
    with db.transaction(engine) as connection:
        return guards.check(connection, list(campaign_ids), list(account_names), now)


def hard_suppress(engine: sa.Engine, emails: list[str]) -> None:
    """What the sender does on an SMTP-time hard bounce besides failing the delivery."""
    with db.transaction(engine) as connection:
        connection.execute(sa.insert(models.suppressions), [
            {"email_key": email, "reason": "hard_bounce", "source": "smtp 550 5.1.1",
             "created_at": NOW} for email in emails])


def ensure_account(engine: sa.Engine, name: str) -> None:
    with db.transaction(engine) as connection:
        store_deliveries.ensure_accounts(connection, [name], NOW)


def account_state(engine: sa.Engine, name: str) -> tuple[str, str | None]:
    with db.reading(engine) as connection:
        row = store_deliveries.accounts(connection, [name])[name]
    return row.state, row.reason


def emails_of(engine: sa.Engine, delivery_ids: list[int]) -> list[str]:
    d = models.deliveries
    with engine.connect() as connection:
        found = dict(connection.execute(sa.select(d.c.id, d.c.email_key)
                                        .where(d.c.id.in_(delivery_ids))).all())
    return [found[i] for i in delivery_ids]


# --- the rate arithmetic ------------------------------------------------------------------------------


def test_thresholds_reach_or_pass_their_rate_only_over_the_minimum_sample() -> None:
    complaints = guards.LIMITS.complaints
    assert complaints.trips(3, 1000) and not complaints.trips(2, 1000)
    assert not complaints.trips(3, 999)  # 0.3003 %, but too few deliveries to judge
    blocks = guards.LIMITS.blocks
    assert not blocks.trips(2, 100) and blocks.trips(3, 100)  # must pass 2 %, not just reach it
    assert not Threshold("x", Fraction(1, 2), 0).trips(0, 0)


@pytest.mark.parametrize("threshold", [guards.LIMITS.complaints, guards.LIMITS.hard_bounces,
                                       guards.LIMITS.blocks])
def test_counting_may_stop_past_the_largest_total_that_still_trips(threshold: Threshold) -> None:
    for count in range(3, 40):
        largest = threshold.largest_total(count)
        assert threshold.trips(count, largest) or largest < threshold.minimum
        assert not any(threshold.trips(count, total) for total in range(largest + 1, largest + 50))


def test_reasons_read_like_the_design() -> None:
    limits = guards.LIMITS
    assert limits.complaints.reason(7, 2000, "deliveries") == \
        "complaints 0.35% over 2,000 deliveries (limit 0.3%)"
    assert limits.hard_bounces.reason(10, 200, "deliveries") == \
        "hard bounces 5% over 200 deliveries (limit 5%)"
    assert limits.blocks.reason(3, 120, "messages") == "5.7.x blocks 2.5% over 120 messages (limit 2%)"


# --- complaints -------------------------------------------------------------------------------------------


def test_complaints_at_0_35_percent_of_2000_deliveries_pause_the_campaign_with_its_reason(
        engine: sa.Engine, world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 2000, "u")
    record(engine, "complaint", sent[:7])

    trips = check(engine, [c])

    reason = "complaints 0.35% over 2,000 deliveries (limit 0.3%)"
    assert trips == [guards.Trip("campaign", "c", reason)]
    assert campaign_status(engine, c) == ("paused", reason)
    assert campaigns.show(engine, "c")["pause_reason"] == reason


def test_complaints_at_0_25_percent_leave_the_campaign_running(engine: sa.Engine,
                                                                world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 2000, "u")
    record(engine, "complaint", sent[:5])

    assert check(engine, [c]) == []
    assert campaign_status(engine, c) == ("running", None)


def test_the_complaint_that_reaches_0_3_percent_of_1000_pauses_the_campaign(
        engine: sa.Engine, world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 1000, "u")
    world.crowd(c, 500, "q", state="queued")  # not sent yet: not in the sample

    for i in range(2):
        apply(engine, report(event("complaint", delivery_id=sent[i])), f"<arf-{i}@fbl>")
    assert campaign_status(engine, c) == ("running", None)
    apply(engine, report(event("complaint", delivery_id=sent[2])), "<arf-2@fbl>")

    assert campaign_status(engine, c) == ("paused", "complaints 0.3% over 1,000 deliveries (limit 0.3%)")


def test_complaints_over_fewer_than_1000_deliveries_never_pause(engine: sa.Engine,
                                                               world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 999, "u")
    world.crowd(c, 300, "f", state="failed")  # handed over, but not delivered
    record(engine, "complaint", sent[:9])

    assert check(engine, [c]) == []


# --- hard bounces -----------------------------------------------------------------------------------------


def test_hard_bounces_at_5_percent_of_200_pause_the_campaign(engine: sa.Engine,
                                                             world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 190, "u")
    refused = world.crowd(c, 10, "r", state="failed", enhanced="5.1.1", code=550)
    hard_suppress(engine, emails_of(engine, refused[:4]))  # 6 others failed for other reasons
    record(engine, "hard", sent[:6])
    record(engine, "hard", sent[:1], now=NOW + 1)  # a second DSN for the same message

    trips = check(engine, [c])

    assert [t.reason for t in trips] == ["hard bounces 5% over 200 deliveries (limit 5%)"]
    assert campaign_status(engine, c)[0] == "paused"


def test_hard_bounces_under_5_percent_or_200_deliveries_do_not_pause(engine: sa.Engine,
                                                                     world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 200, "u")
    record(engine, "hard", sent[:9])
    assert check(engine, [c]) == []
    small = world.campaign("small")
    few = world.crowd(small, 199, "s")
    record(engine, "hard", few[:20])
    assert check(engine, [small]) == []


def test_a_hard_bounce_report_can_pause_the_campaign(engine: sa.Engine, world: World) -> None:
    c = world.campaign("c")
    sent = world.crowd(c, 200, "u")
    record(engine, "hard", sent[:9])

    apply(engine, report(event("hard", delivery_id=sent[9])), "<dsn-9@mx>")

    assert campaign_status(engine, c) == ("paused", "hard bounces 5% over 200 deliveries (limit 5%)")


# --- which campaigns the guard touches ----------------------------------------------------------------------


@pytest.mark.parametrize("status, reason", [("paused", "paused by user"), ("finished", None),
                                            ("cancelled", None), ("draft", None)])
def test_campaigns_that_are_not_running_keep_their_status(engine: sa.Engine, world: World,
                                                          status: str, reason: str | None) -> None:
    c = world.campaign("c", status=status)
    with db.transaction(engine) as connection:
        connection.execute(sa.update(models.campaigns).values(pause_reason=reason))
    sent = world.crowd(c, 1000, "u")
    record(engine, "complaint", sent[:50])

    assert check(engine, [c]) == []
    assert campaign_status(engine, c) == (status, reason)


def test_scheduled_campaign_is_paused_too(engine: sa.Engine, world: World) -> None:
    c = world.campaign("c", status="scheduled")
    sent = world.crowd(c, 1000, "u")
    record(engine, "complaint", sent[:3])

    assert len(check(engine, [c])) == 1
    assert campaign_status(engine, c)[0] == "paused"


# --- resuming ---------------------------------------------------------------------------------------------------


def test_resumed_campaign_is_judged_on_mail_sent_after_the_pause(engine: sa.Engine,
                                                                 world: World) -> None:
    c = world.campaign("c")
    old = world.crowd(c, 1000, "u")
    record(engine, "complaint", old[:3])
    check(engine, [c], now=NOW + 10)
    assert campaign_status(engine, c)[0] == "paused"

    resumed = campaigns.resume(engine, "c", NOW + 20)
    assert (resumed.status, resumed.pause_reason) == ("running", None)
    # A late complaint about the mail the operator has seen does not pause it again ...
    apply(engine, report(event("complaint", delivery_id=old[3])), "<late@fbl>", now=NOW + 30)
    assert campaign_status(engine, c) == ("running", None)
    assert campaigns.show(engine, "c")["complaints"] == 4

    # ... nor does a complaint about new mail before a full new sample exists ...
    new = world.crowd(c, 1000, "n", at=NOW + 40)
    apply(engine, report(event("complaint", delivery_id=new[0])), "<n0@fbl>", now=NOW + 50)
    apply(engine, report(event("complaint", delivery_id=new[1])), "<n1@fbl>", now=NOW + 50)
    assert campaign_status(engine, c)[0] == "running"
    # ... but the new mail reaching the limit on its own does.
    apply(engine, report(event("complaint", delivery_id=new[2])), "<n2@fbl>", now=NOW + 60)
    assert campaign_status(engine, c) == ("paused", "complaints 0.3% over 1,000 deliveries (limit 0.3%)")


# --- accounts ---------------------------------------------------------------------------------------------------


def account_config(name: str) -> AccountConfig:
    return AccountConfig(name=name, host="127.0.0.1", port=2525, security="starttls",
                         ca_file=Path("/dev/null"), username=name, password_env=f"PW_{name}")


def test_account_whose_5_7_x_rate_passes_2_percent_of_100_is_disabled(engine: sa.Engine,
                                                                       world: World) -> None:
    ensure_account(engine, "a1")
    c = world.campaign("c")
    sent = world.crowd(c, 98, "u")
    world.crowd(c, 2, "b", state="failed", enhanced="5.7.1", code=554)  # refused at SMTP time
    record(engine, "block", sent[:1])  # accepted, then returned by a DSN

    trips = check(engine, account_names=["a1"])

    reason = "5.7.x blocks 3% over 100 messages (limit 2%)"
    assert trips == [guards.Trip("account", "a1", reason)]
    assert account_state(engine, "a1") == ("disabled", reason)


def test_account_at_2_percent_or_under_100_messages_stays_active(engine: sa.Engine,
                                                                 world: World) -> None:
    ensure_account(engine, "a1")
    ensure_account(engine, "a2")
    c = world.campaign("c")
    world.crowd(c, 98, "u")
    world.crowd(c, 2, "b", state="failed", enhanced="5.7.1", code=554)
    world.crowd(c, 96, "v", account="a2")
    world.crowd(c, 3, "w", account="a2", state="failed", enhanced="5.7.1", code=554)

    assert check(engine, account_names=["a1", "a2"]) == []
    assert account_state(engine, "a1")[0] == account_state(engine, "a2")[0] == "active"


def test_blocks_that_are_not_the_accounts_or_not_policy_do_not_count(engine: sa.Engine,
                                                                    world: World) -> None:
    ensure_account(engine, "a1")
    c = world.campaign("c")
    world.crowd(c, 97, "u")
    world.crowd(c, 5, "b", account="a2", state="failed", enhanced="5.7.1", code=554)
    # Yandex's "550 5.7.1 No such user!" is a hard bounce: the sender suppressed the address.
    nouser = world.crowd(c, 3, "y", state="failed", enhanced="5.7.1", code=550)
    hard_suppress(engine, emails_of(engine, nouser))
    # Blocks more than a week old are past.
    world.crowd(c, 5, "o", state="failed", enhanced="5.7.1", code=554, at=NOW - 8 * DAY)

    assert check(engine, account_names=["a1"]) == []


def test_block_reports_can_disable_the_account(engine: sa.Engine, world: World) -> None:
    ensure_account(engine, "a1")
    c = world.campaign("c")
    sent = world.crowd(c, 100, "u")
    for i in range(3):
        apply(engine, report(event("block", delivery_id=sent[i])), f"<blk-{i}@mx>")

    assert account_state(engine, "a1")[0] == "disabled"
    assert campaign_status(engine, c) == ("running", None)  # blocks are the account's problem


def test_a_batch_of_reports_runs_the_guards_once_on_everything_it_recorded(
        engine: sa.Engine, world: World) -> None:
    ensure_account(engine, "a1")
    c = world.campaign("c")
    sent = world.crowd(c, 1000, "u")
    batch = [(report(event("complaint", delivery_id=sent[i])), f"<arf-{i}@fbl>")
             for i in range(4)]
    batch += [(report(event("block", delivery_id=sent[10 + i])), f"<blk-{i}@mx>")
              for i in range(21)]
    batch += [(report(event("soft", delivery_id=sent[50])), "<soft@mx>")]

    with db.transaction(engine) as connection:
        counts = suppression.apply_reports(connection, batch, now=NOW, policy=BouncePolicy())

    assert (counts.messages, counts.complaints, counts.soft, counts.suppressed) == (26, 4, 1, 4)
    # Judged on the whole batch: four complaints, not the third that crossed the line.
    assert campaign_status(engine, c) == (
        "paused", "complaints 0.4% over 1,000 deliveries (limit 0.3%)")
    assert account_state(engine, "a1") == (
        "disabled", "5.7.x blocks 2.1% over 1,000 messages (limit 2%)")


def test_enabled_account_is_judged_on_mail_sent_after_it_was_disabled(engine: sa.Engine,
                                                                      world: World) -> None:
    ensure_account(engine, "a1")
    c = world.campaign("c")
    sent = world.crowd(c, 100, "u")
    record(engine, "block", sent[:3])
    check(engine, account_names=["a1"], now=NOW + 10)
    assert account_state(engine, "a1")[0] == "disabled"

    assert accounts.enable(engine, (account_config("a1"),), "a1", NOW + 20) == "disabled"
    apply(engine, report(event("block", delivery_id=sent[3])), "<late@mx>", now=NOW + 30)
    assert account_state(engine, "a1") == ("active", None)

    new = world.crowd(c, 100, "n", at=NOW + 40)
    for i in range(3):
        apply(engine, report(event("block", delivery_id=new[i])), f"<n{i}@mx>", now=NOW + 50)
    assert account_state(engine, "a1") == ("disabled", "5.7.x blocks 3% over 100 messages (limit 2%)")
