"""The send loop's group commit (`bulksend.recorder`) against a real store, both backends.

Fencing through the writer: a `sending` commit only for a row still `claimed` under this
worker's unexpired lease; results only for rows whose lease held; every result committed
when `flush` returns.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulksend import db, models, store_deliveries, store_sending
from bulksend.errors import StoreError
from bulksend.recorder import Recorder, Result
from tests.test_send import prepare

TOKEN = "recorder-test-token"
LEASE = 300.0


def claim_all(engine: sa.Engine, account: str = "acc") -> dict[int, int]:
    """Claim every queued delivery for this test's worker; delivery id → reservation id."""
    now = time.time()
    with db.transaction(engine) as connection:
        store_deliveries.ensure_accounts(connection, [account], now)
        due = store_deliveries.due_deliveries(connection, now, 1000)
        return store_deliveries.claim(connection, [(d.id, account) for d in due], "test:1", TOKEN,
                                      now, LEASE)


def rows(engine: sa.Engine) -> dict[int, tuple[str, str | None, int]]:
    """Delivery id → (state, lease token, attempts)."""
    d = models.deliveries
    with engine.connect() as connection:
        return {r.id: (r.state, r.lease_token, r.attempts) for r in connection.execute(
            sa.select(d.c.id, d.c.state, d.c.lease_token, d.c.attempts))}


def sent(delivery_id: int, attempt_id: int, campaign_id: int = 1) -> Result:
    """The result of a message the server accepted (the test's only campaign has id 1)."""
    return Result(store_sending.Outcome(delivery_id, attempt_id, "sent", code=250,
                                        enhanced="2.0.0", text="2.0.0 Ok"), "acc", campaign_id)


@pytest.fixture
def recorded() -> list[Result]:
    return []


@pytest.fixture
def recorder(engine: sa.Engine, recorded: list[Result]):
    writer = Recorder(engine, TOKEN, LEASE, time.time, recorded.append)
    yield writer
    writer.close()


def test_sending_then_result_are_committed_and_counted(engine: sa.Engine, tmp_path: Path,
                                                       recorder: Recorder,
                                                       recorded: list[Result]) -> None:
    prepare(engine, tmp_path, 3)
    reserved = claim_all(engine)
    for delivery_id, attempt_id in reserved.items():
        assert recorder.mark_sending(delivery_id)
        assert rows(engine)[delivery_id][0] == "sending"  # committed before the dot may go
        recorder.record(sent(delivery_id, attempt_id))
    recorder.flush()
    assert {state for state, _, _ in rows(engine).values()} == {"sent"}
    assert {token for _, token, _ in rows(engine).values()} == {None}
    assert len(recorded) == 3
    with engine.connect() as connection:
        status = connection.execute(sa.select(models.campaigns.c.status)).scalar_one()
        counters = connection.execute(sa.select(models.account_state.c.sent).where(
            models.account_state.c.name == "acc")).scalar()
        outcomes = connection.execute(sa.select(models.delivery_attempts.c.outcome)).scalars().all()
    assert status == "finished" and outcomes == ["sent"] * 3 and counters == 3


def test_a_row_suppressed_meanwhile_gets_no_sending_and_keeps_its_state(
        engine: sa.Engine, tmp_path: Path, recorder: Recorder, recorded: list[Result]) -> None:
    prepare(engine, tmp_path, 2)
    reserved = claim_all(engine)
    first, second = sorted(reserved)
    # What an unsubscribe does to a claimed delivery: suppressed, lease cleared.
    with db.transaction(engine) as connection:
        connection.execute(sa.update(models.deliveries).where(models.deliveries.c.id == first)
                           .values(state="suppressed", lease_token=None, lease_owner=None,
                                   lease_expires_at=None))
    assert recorder.mark_sending(first) is False
    assert recorder.mark_sending(second) is True
    # A result for the suppressed row changes nothing and is not reported.
    recorder.record(sent(first, reserved[first]))
    recorder.record(sent(second, reserved[second]))
    recorder.flush()
    assert rows(engine)[first] == ("suppressed", None, 0)
    assert rows(engine)[second][0] == "sent"
    assert [r.outcome.delivery_id for r in recorded] == [second]


def test_an_expired_lease_gets_no_sending(engine: sa.Engine, tmp_path: Path) -> None:
    prepare(engine, tmp_path, 1)
    (delivery_id,) = claim_all(engine)
    later = Recorder(engine, TOKEN, LEASE, lambda: time.time() + LEASE + 1, lambda r: None)
    try:
        assert later.mark_sending(delivery_id) is False
    finally:
        later.close()
    assert rows(engine)[delivery_id][0] == "claimed"


def test_another_workers_token_gets_no_sending(engine: sa.Engine, tmp_path: Path) -> None:
    prepare(engine, tmp_path, 1)
    (delivery_id,) = claim_all(engine)
    other = Recorder(engine, "someone-else", LEASE, time.time, lambda r: None)
    try:
        assert other.mark_sending(delivery_id) is False
    finally:
        other.close()
    assert rows(engine)[delivery_id] == ("claimed", TOKEN, 0)


def test_many_lanes_at_once_share_commits_and_lose_nothing(
        engine: sa.Engine, tmp_path: Path, recorder: Recorder, recorded: list[Result]) -> None:
    prepare(engine, tmp_path, 200)
    reserved = sorted(claim_all(engine).items())
    lanes = [reserved[i::20] for i in range(20)]
    refused: list[int] = []

    def lane(items: list[tuple[int, int]]) -> None:
        for delivery_id, attempt_id in items:
            if not recorder.mark_sending(delivery_id):
                refused.append(delivery_id)
            recorder.record(sent(delivery_id, attempt_id))

    threads = [threading.Thread(target=lane, args=(items,)) for items in lanes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.flush()
    assert refused == []
    assert {state for state, _, _ in rows(engine).values()} == {"sent"}
    assert sorted(r.outcome.delivery_id for r in recorded) == [d for d, _ in reserved]


def test_a_store_that_cannot_commit_fails_every_later_request(
        engine: sa.Engine, tmp_path: Path) -> None:
    prepare(engine, tmp_path, 1)
    (delivery_id,) = claim_all(engine)
    broken = Recorder(sa.create_engine("sqlite:////nonexistent-dir/x.db"), TOKEN, LEASE,
                      time.time, lambda r: None)
    try:
        with pytest.raises(StoreError):
            broken.mark_sending(delivery_id)  # no `sending`, so no dot
        with pytest.raises(StoreError):
            broken.flush()
    finally:
        broken.close()
    assert rows(engine)[delivery_id][0] == "claimed"
