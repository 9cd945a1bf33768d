"""A stopped sender cannot be held by a stuck server: after DRAIN_SECONDS its connections are
cut, the message whose dot got no reply is `unknown`, the rest goes back to the queue; on
SQLite and PostgreSQL against a real loopback server that never answers the dot."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from bulksend import models, sender, smtp
from bulksend.config import DeliveryConfig
from tests.test_send import SECRET, SENDER, account, prepare, servers
from tests.test_send_guards import WallClock


def test_stop_cuts_a_transaction_stuck_after_the_dot(engine: sa.Engine, tmp_path: Path,
                                                      smtp_server: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender, "DRAIN_SECONDS", 0.5)
    box = servers(smtp_server, ["stuck"])["stuck"]
    box.set_rules([{"stage": "dot", "after": 2, "action": "silence"}])  # the 3rd dot: no reply
    prepare(engine, tmp_path, 20)
    settings = sender.Settings((account(box, "stuck"),), DeliveryConfig(), SENDER, SECRET, (),
                               ZoneInfo("UTC"))
    # Deadlines far beyond the test: only the drain can end the stuck transaction.
    timeouts = smtp.Timeouts(command=600, transaction=900)
    worker = sender.Sender(engine, settings,
                           lambda acc: smtp.open_session(acc, f"secret-{acc.name}", timeouts),
                           clock=WallClock(), sleep=WallClock().sleep)
    reports: list[sender.Report] = []
    thread = threading.Thread(target=lambda: reports.append(worker.run(once=True)), daemon=True)
    thread.start()
    box.wait_for(lambda journal: len(journal) >= 3, timeout=30)  # the 3rd message arrived
    worker.stop.set()
    thread.join(60)
    assert not thread.is_alive(), "a stuck server held the stopped sender"
    report = reports[0]
    assert (report.sent, report.unknown, report.stopped_because) == (2, 1, "stopped by signal")
    with engine.connect() as connection:
        states = Counter(connection.execute(sa.select(models.deliveries.c.state)).scalars())
    assert states == Counter({"sent": 2, "unknown": 1, "queued": 17})



def test_one_cpu_pins_the_calling_thread_and_undoes_it() -> None:
    before = os.sched_getaffinity(0)
    undo = sender._one_cpu()
    try:
        pinned = os.sched_getaffinity(0)
        # One CPU allowed already: nothing to pin, nothing changes.
        assert len(pinned) == 1 and pinned <= before
        seen: list[set[int]] = []
        thread = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        thread.start()
        thread.join()
        assert seen == [pinned]  # the loop's threads inherit it
    finally:
        undo()
    assert os.sched_getaffinity(0) == before
