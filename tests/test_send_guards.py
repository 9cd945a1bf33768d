"""A send stops when its campaign is paused (by hand or by a guard) or an account is disabled
by the 5.7.x guard, even with a large batch already claimed; on SQLite and PostgreSQL, the
loopback server's journal as the truth."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from bulksend import campaigns, db, models
from bulksend.sender import Report
from tests.test_send import account, delivered, make_sender, prepare, servers


class WallClock:
    """Real time: the pause and the lanes' re-check meet in wall-clock seconds."""

    def __call__(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def address(i: int) -> str:
    return f"user{i:05d}@example.org"


def states(engine: sa.Engine) -> Counter[str]:
    with engine.connect() as connection:
        return Counter(connection.execute(sa.select(models.deliveries.c.state)).scalars())


def interrupted_send(engine: sa.Engine, tmp_path: Path, smtp_server: Any,
                     interrupt: Callable[[], Any]) -> tuple[Any, Report]:
    """300 recipients through one slow session (20 ms a message), all claimed in one batch;
    `interrupt` runs once 10 have arrived. Returns the server and the run's report."""
    box = servers(smtp_server, ["slow"])["slow"]
    box.set_rules([{"stage": "dot", "action": "delay", "seconds": 0.02}])
    prepare(engine, tmp_path, 300)
    worker = make_sender(engine, [account(box, "slow")], clock=WallClock())
    reports: list[Report] = []
    thread = threading.Thread(target=lambda: reports.append(worker.run(once=True)))
    thread.start()
    box.wait_for(lambda journal: len(journal) >= 10, timeout=30)
    interrupt()
    thread.join(60)
    assert not thread.is_alive()
    # The lane claimed far more than were sent; after the interrupt at most the rest of its
    # re-check chunk (64) and a second's worth went out.
    assert len(box.delivered()) < 10 + 64 + 50, len(box.delivered())
    return box, reports[0]


def test_a_pause_stops_the_claimed_batch_and_resume_sends_the_rest_once(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    box, report = interrupted_send(engine, tmp_path, smtp_server,
                                   lambda: campaigns.pause(engine, "c", time.time()))
    sent_before = len(box.delivered())
    assert report.sent == sent_before
    # The claims not sent went back to the queue.
    assert states(engine) == Counter({"sent": sent_before, "queued": 300 - sent_before})

    campaigns.resume(engine, "c", time.time())
    report = make_sender(engine, [account(box, "slow")], clock=WallClock()).run(once=True)
    assert report.sent == 300 - sent_before
    counts = delivered({"slow": box})
    assert len(counts) == 300 and set(counts.values()) == {1}


def test_a_cancel_while_sending_cancels_the_claimed_batch_too(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    box, _ = interrupted_send(engine, tmp_path, smtp_server,
                              lambda: campaigns.cancel(engine, "c", time.time()))
    sent = len(box.delivered())
    # Nothing is left waiting in a cancelled campaign: what was not sent is cancelled.
    assert states(engine) == Counter({"sent": sent, "cancelled": 300 - sent})
    assert set(delivered({"slow": box}).values()) == {1}


def test_hard_bounces_at_rcpt_pause_the_campaign_while_it_sends(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    boxes = servers(smtp_server, ["isp"])
    box = boxes["isp"]
    # Every 10th recipient is unknown: 10 % hard bounces, over the 5 % guard.
    box.set_rules([{"stage": "rcpt", "address": address(i), "reply": "550 5.1.1 no such user"}
                   for i in range(0, 600, 10)])
    prepare(engine, tmp_path, 600)
    report = make_sender(engine, [account(box, "isp")], clock=WallClock()).run(once=True)
    with engine.connect() as connection:
        status, reason = connection.execute(
            sa.select(models.campaigns.c.status, models.campaigns.c.pause_reason)).one()
    assert status == "paused", (status, report)
    assert reason.startswith("hard bounces") and "limit 5%" in reason, reason
    handed = report.sent + report.failed
    assert 200 <= handed < 600 - 100, report  # it stopped soon after the 200-message sample
    after = states(engine)
    assert after["queued"] == 600 - handed and after["claimed"] == after["sending"] == 0
    assert set(delivered(boxes).values()) == {1}


def test_blocks_at_rcpt_disable_the_account(engine: sa.Engine, tmp_path: Path,
                                            smtp_server: Any) -> None:
    boxes = servers(smtp_server, ["relay"])
    box = boxes["relay"]
    # Every 20th recipient refused by policy: 5 % blocks, over the 2 % account guard.
    box.set_rules([{"stage": "rcpt", "address": address(i),
                    "reply": "550 5.7.1 message refused by policy"} for i in range(0, 600, 20)])
    prepare(engine, tmp_path, 600)
    report = make_sender(engine, [account(box, "relay")], clock=WallClock()).run(once=True)
    with engine.connect() as connection:
        state, reason = connection.execute(
            sa.select(models.account_state.c.state, models.account_state.c.reason)
            .where(models.account_state.c.name == "relay")).one()
    assert state == "disabled" and "5.7" in reason and "limit 2%" in reason, (state, reason)
    assert 100 <= report.sent + report.failed < 600 - 100, report
    with db.reading(engine) as connection:  # nothing of the blocked ones was suppressed
        assert connection.execute(sa.select(sa.func.count()).select_from(
            models.suppressions)).scalar_one() == 0
    assert set(delivered(boxes).values()) == {1}
