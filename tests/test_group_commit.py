"""Group commit: concurrent write transactions share one commit, failures stay their own."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import models
from bulksend.group_commit import GroupCommit


def add_list(name: str, result: Any = None, fail: bool = False):  # noqa: ANN201
    """A work that inserts list `name`, then returns `result` or raises."""
    def work(connection: sa.Connection) -> Any:
        connection.execute(sa.insert(models.lists).values(name=name, created_at=0.0))
        if fail:
            raise ValueError(f"{name} failed")
        return result
    return work


def list_names(engine: sa.Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(sa.select(models.lists.c.name)).scalars())


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def run_concurrently(committer: GroupCommit, works: list[Any]) -> list[tuple[str, Any]]:
    """Run works[0] first; while it runs, queue the others; returns (outcome, value) of each."""
    outcomes: list[tuple[str, Any]] = [("", None)] * len(works)
    release = threading.Event()

    def first(connection: sa.Connection) -> Any:
        release.wait(30)  # hold the first transaction open until the rest are queued
        return works[0](connection)

    def call(index: int, work: Any) -> None:
        try:
            outcomes[index] = ("ok", committer.run(work))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcomes[index] = ("error", exc)

    threads = [threading.Thread(target=call, args=(0, first))]
    threads[0].start()
    wait_until(lambda: committer.commits == 0 and not committer.waiting and _leading(committer))
    threads += [threading.Thread(target=call, args=(i, work)) for i, work in enumerate(works) if i]
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: committer.waiting == len(works) - 1)
    release.set()
    for thread in threads:
        thread.join()
    return outcomes


def _leading(committer: GroupCommit) -> bool:
    return committer._busy  # noqa: SLF001 - the first work is running


def test_works_queued_during_a_commit_share_the_next_one(engine: sa.Engine) -> None:
    committer = GroupCommit(engine, batching=True)
    works = [add_list(f"l{i}", result=i) for i in range(12)]
    outcomes = run_concurrently(committer, works)
    assert outcomes == [("ok", i) for i in range(12)]
    assert list_names(engine) == {f"l{i}" for i in range(12)}
    assert committer.commits == 2  # the first alone, then the other eleven together


def test_a_failing_work_is_undone_alone_and_raises_to_its_caller(engine: sa.Engine) -> None:
    committer = GroupCommit(engine, batching=True)
    works = [add_list("first"), add_list("a", "A"), add_list("bad", fail=True), add_list("b", "B")]
    outcomes = run_concurrently(committer, works)
    assert outcomes[1] == ("ok", "A") and outcomes[3] == ("ok", "B")
    assert outcomes[2][0] == "error" and str(outcomes[2][1]) == "bad failed"
    assert list_names(engine) == {"first", "a", "b"}


def test_a_lone_failing_work_runs_once(engine: sa.Engine) -> None:
    committer = GroupCommit(engine, batching=True)
    calls = []

    def work(connection: sa.Connection) -> None:
        calls.append(1)
        add_list("x", fail=True)(connection)

    with pytest.raises(ValueError, match="x failed"):
        committer.run(work)
    assert calls == [1] and list_names(engine) == set() and committer.commits == 0
    assert committer.run(add_list("y", result=7)) == 7 and list_names(engine) == {"y"}


def test_batches_are_capped(engine: sa.Engine) -> None:
    committer = GroupCommit(engine, max_batch=4, batching=True)
    outcomes = run_concurrently(committer, [add_list(f"l{i}", result=i) for i in range(10)])
    assert [value for _, value in outcomes] == list(range(10))
    assert committer.commits == 4  # 1, then 4 + 4 + 1 of the nine queued


def test_only_sqlite_batches_by_default(engine: sa.Engine) -> None:
    assert GroupCommit(engine).batching == (engine.dialect.name == "sqlite")


# PostgreSQL only: SQLite has one writer at a time, so there works are always batched.
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_without_batching_works_run_at_once_in_their_own_transactions(engine: sa.Engine) -> None:
    assert engine.dialect.name == "postgresql"
    committer = GroupCommit(engine)
    release, outcome = threading.Event(), []

    def slow(connection: sa.Connection) -> str:
        add_list("slow")(connection)
        release.wait(30)
        return "slow"

    thread = threading.Thread(target=lambda: outcome.append(committer.run(slow)))
    thread.start()
    assert committer.run(add_list("fast", result="fast")) == "fast"  # not held up by "slow"
    assert list_names(engine) == {"fast"}
    release.set()
    thread.join()
    assert outcome == ["slow"] and list_names(engine) == {"fast", "slow"}
    assert committer.commits == 2
