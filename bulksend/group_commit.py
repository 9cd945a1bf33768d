"""Group commit: many threads' small write transactions share one commit (one fsync).

`bulksend serve` commits one unsubscribe per POST. A commit waits for the disk (SQLite with
`synchronous=FULL` and PostgreSQL both flush their log), and SQLite has one writer at a
time, so one commit per request would cap the server at the disk's flush rate. Here the
work of every request that arrives while a commit is running waits in a queue; the next
commit then carries all of it. Each caller returns only after the transaction holding its
work has committed, with its own result or exception.

A leader thread (the caller that found nobody committing, or the one handed the role) runs
one batch, then hands the role to the first caller still waiting. If any work raises, the
batch is rolled back and each of its works runs again in a transaction of its own, so one
failure never undoes or blocks the others.

That is for SQLite. PostgreSQL runs many transactions at once and lets concurrent commits
share a WAL flush by itself, while one connection carrying everybody's work would pay a
network round trip per statement in turn: there each work runs in its own transaction, at
once (`batching=False`, the default for it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection, Engine

from bulksend import db

T = TypeVar("T")
MAX_BATCH = 64  # works per transaction: keeps each one short


class _Work(Generic[T]):
    """One caller's work and, once committed, its outcome."""

    __slots__ = ("function", "result", "error", "lead", "finished", "ready")

    def __init__(self, function: Callable[[Connection], T]) -> None:
        self.function = function
        self.result: T | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.finished = False
        self.ready = threading.Event()


class _Failed(Exception):
    """A work of the batch raised `error`: the batch's transaction is rolled back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class GroupCommit:
    """Runs `function(connection)` calls from many threads in shared write transactions."""

    def __init__(self, engine: Engine, max_batch: int = MAX_BATCH, *,
                 batching: bool | None = None) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.batching = engine.dialect.name == "sqlite" if batching is None else batching
        self._lock = threading.Lock()
        self._queue: list[_Work[Any]] = []
        self._busy = False
        self.commits = 0  # transactions committed (for tests and benchmarks)

    @property
    def waiting(self) -> int:
        """Works queued for the next transaction."""
        with self._lock:
            return len(self._queue)

    def run(self, function: Callable[[Connection], T]) -> T:
        """`function`'s result once the transaction it ran in has committed; or its exception."""
        work: _Work[T] = _Work(function)
        if not self.batching:
            self._alone(work)
            if work.error is not None:
                raise work.error
            return work.result  # type: ignore[return-value]
        with self._lock:
            self._queue.append(work)
            if not self._busy:
                self._busy = work.lead = True
        if not work.lead:
            work.ready.wait()  # set when our batch committed, or when we are made leader
        if not work.finished:
            self._run_batch()
        if work.error is not None:
            raise work.error
        return work.result  # type: ignore[return-value]

    def _run_batch(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        try:
            if not self._together(batch):
                for work in batch:
                    self._alone(work)
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].ready.set()
                else:
                    self._busy = False
            for work in batch:
                work.finished = True
                work.ready.set()

    def _together(self, batch: list[_Work[Any]]) -> bool:
        """Run the batch in one transaction; False (rolled back) if any work raised."""
        try:
            with db.transaction(self.engine) as connection:
                results = []
                for work in batch:
                    try:
                        results.append(work.function(connection))
                    except Exception as exc:
                        raise _Failed(exc) from exc
        except _Failed as failed:
            if len(batch) > 1:
                return False
            batch[0].error = failed.error  # alone already: no need to run it again
            return True
        except Exception as exc:  # the commit itself failed: nothing of the batch is stored
            for work in batch:
                work.error = exc
            return True
        self.commits += 1
        for work, result in zip(batch, results):
            work.result = result
        return True

    def _alone(self, work: _Work[Any]) -> None:
        try:
            with db.transaction(self.engine) as connection:
                work.result = work.function(connection)
            with self._lock:
                self.commits += 1
        except Exception as exc:
            work.result, work.error = None, exc
