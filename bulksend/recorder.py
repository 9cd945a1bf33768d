"""Group commit for the send loop: one writer thread records what every lane asks for.

    lane ── mark_sending(id) ──┐
    lane ── record(result) ────┼──► queue ──► writer thread: one transaction per round
    lane ── requeue(ids) ──────┘              (`sending` rows, results, counters,
                                               suppressions, account rests, campaigns)

Twenty lanes committing twice per message each would queue on SQLite's write lock (and pay
a transaction apiece on PostgreSQL); the writer turns what piled up while it was committing
into one transaction.

Fencing stays what DESIGN §3 says: a lane waits for the commit that carries its `sending`
row (conditional on the lease token, the state `claimed` and an unexpired lease) before it
writes the final dot; when that row could not be updated the lane gets False and withholds
the dot. Results are not waited for (except when the account may have to rest): a crash
loses only results not yet committed, of messages whose dot went out; their rows are still
`sending` and recovery makes them `unknown`, never resent.

Within a transaction a lane has at most one request: its next `sending` is committed
after its previous result, never with it, so a lane never has more than one row in
`sending` at any commit, and a crash right after a result's commit finds that lane's row
finished. Requests of one lane are committed in the order the lane made them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Engine

from bulksend import db, guards, store_deliveries, store_sending
from bulksend.errors import StoreError
from bulksend.models import TERMINAL_DELIVERY_STATES

Clock = Callable[[], float]
GATHER = 0.002  # seconds the writer waits for results about to come (see Recorder._gather)


class _Request:
    """One lane's request; `wait()` returns the writer's answer once committed."""

    __slots__ = ("lane", "_done", "_value", "_error")

    def __init__(self) -> None:
        self.lane = threading.get_ident()
        self._done = threading.Lock()  # held until settled: lighter than an Event
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._done.release()

    def wait(self) -> Any:
        """The answer, after the transaction carrying this request committed; or its error.

        Called at most once, by the lane that made the request.
        """
        self._done.acquire()
        if self._error is not None:
            raise self._error
        return self._value


class _Sending(_Request):
    __slots__ = ("delivery_id",)

    def __init__(self, delivery_id: int) -> None:
        super().__init__()
        self.delivery_id = delivery_id


class Result(_Request):
    """What one attempt led to. `apply` writes its account and address effects (DESIGN §6)
    and returns True when the account must now rest; None when there are none besides a
    `sent` row's counters, which the writer adds up per account."""

    __slots__ = ("outcome", "account", "campaign_id", "apply")

    def __init__(self, outcome: store_sending.Outcome, account: str, campaign_id: int,
                 apply: Callable[[Connection, float], bool] | None = None) -> None:
        super().__init__()
        self.outcome = outcome
        self.account = account
        self.campaign_id = campaign_id
        self.apply = apply


class _Requeue(_Request):
    __slots__ = ("delivery_ids",)

    def __init__(self, delivery_ids: Sequence[int]) -> None:
        super().__init__()
        self.delivery_ids = list(delivery_ids)


class Recorder:
    """The writer thread of one Sender; every method but `close` may be called from any lane."""

    def __init__(self, engine: Engine, token: str, lease: float, clock: Clock,
                 recorded: Callable[[Result], None]) -> None:
        self.engine = engine
        self.token = token
        self.lease = lease
        self.clock = clock
        self.recorded = recorded  # called for each result that was committed, after the commit
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the writer waits here for work
        self._idle = threading.Condition(lock)  # flush() waits here for pending == 0
        self._queue: deque[_Request] = deque()
        self._pending = 0  # submitted, not yet settled
        self._expecting = 0  # dots let go whose results have not been queued yet
        self._gathering = False  # the writer waits in _gather: only the last result wakes it
        self._closing = False
        self._error: BaseException | None = None  # once a commit failed, nothing else is tried
        self._thread = threading.Thread(target=self._run, name="bulksend-recorder", daemon=True)
        self._thread.start()

    # --- what lanes ask ------------------------------------------------------------------------

    def mark_sending(self, delivery_id: int) -> bool:
        """Commit `sending` for this delivery; True only if this worker still holds its lease."""
        return bool(self._submit(_Sending(delivery_id)).wait())

    def record(self, result: Result) -> Result:
        """Queue a result; `result.wait()` tells, after its commit, whether the account rests."""
        return self._submit(result)

    def requeue(self, delivery_ids: Sequence[int]) -> None:
        """Give claims that never reached MAIL FROM back to the queue (not waited for)."""
        if delivery_ids:
            self._submit(_Requeue(delivery_ids))

    def flush(self) -> None:
        """Wait until everything submitted so far is committed; raises a failed commit's error."""
        with self._idle:
            while self._pending:
                self._idle.wait()
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _submit(self, request: Any) -> Any:
        with self._cond:
            if self._error is not None:
                raise self._error
            self._queue.append(request)
            self._pending += 1
            if isinstance(request, Result):
                self._expecting = max(0, self._expecting - 1)
            if not self._gathering or not self._expecting:
                self._cond.notify()  # (a wake-up per result would cost a thread switch each)
        return request

    # --- the writer ----------------------------------------------------------------------------

    def _run(self) -> None:
        connection = None
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return
                    self._gather()
                    batch = self._take()
                if connection is None and self._error is None:
                    # One connection for the writer's life: no pool round trip per commit.
                    connection = self._connect()
                self._commit(connection, batch)
                with self._cond:
                    self._pending -= len(batch)
                    if not self._pending:
                        self._idle.notify_all()
        finally:
            if connection is not None:
                connection.close()

    def _gather(self) -> None:
        """Wait briefly for the results of the dots the last commit let go.

        Those lanes are reading the reply to their dot and queue the result within a
        fraction of a millisecond; taking them into this round, rather than the next one,
        lets their next `sending` ride the round after, so a message costs a lane two
        rounds instead of three. Bounded by GATHER: a slow reply does not hold the rest.
        """
        deadline = time.monotonic() + GATHER
        self._gathering = True
        try:
            while self._expecting > 0 and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        finally:
            self._gathering = False

    def _connect(self) -> Connection | None:
        try:
            return db.connect_writer(self.engine)
        except Exception as error:  # noqa: BLE001 - reported to every lane by _commit
            self._error = error
            return None

    def _take(self) -> list[_Request]:
        """The oldest request of each lane (a lane's later ones wait for the next round)."""
        batch, lanes, later = [], set(), deque()
        while self._queue:
            request = self._queue.popleft()
            if request.lane in lanes:
                later.append(request)
            else:
                lanes.add(request.lane)
                batch.append(request)
        self._queue = later
        return batch

    def _commit(self, connection: Connection | None, batch: list[_Request]) -> None:
        if self._error is not None or connection is None:
            for request in batch:
                request.settle(error=self._error)
            return
        try:
            for attempt in range(3):
                try:
                    with db.transaction_on(connection):
                        answers = self._write(connection, batch, careful=attempt > 0)
                    break
                except store_sending.LeaseRace:
                    continue  # rolled back: the next try first looks for the lost leases
            else:
                raise StoreError("leases kept changing while results were written")
        except BaseException as error:  # noqa: BLE001 - handed to every waiting lane
            self._error = error
            for request in batch:
                request.settle(error=error)
            return
        with self._cond:
            self._expecting += sum(1 for request, answer in zip(batch, answers)
                                   if isinstance(request, _Sending) and answer)
        for request, answer in zip(batch, answers):
            request.settle(answer)
            if isinstance(request, Result) and answer is not None:
                self.recorded(request)

    def _write(self, connection: Connection, batch: list[_Request], careful: bool) -> list[Any]:
        """Every request of one round in one transaction; the answers in batch order.

        Lock order as everywhere: deliveries (this worker's own), then campaigns, then
        account_state, each in key order (`store_sending.lock_in_order`).
        """
        now = self.clock()
        sendings = [r.delivery_id for r in batch if isinstance(r, _Sending)]
        holding = store_sending.mark_sending(connection, sendings, self.token, now, self.lease)
        results = [r for r in batch if isinstance(r, Result)]
        held = store_sending.finish_many(connection, [r.outcome for r in results], self.token, now,
                                         careful=careful)
        for request in batch:
            if isinstance(request, _Requeue):
                store_deliveries.requeue(connection, request.delivery_ids, self.token, now)
        answers: dict[int, Any] = {}
        sent: dict[str, int] = {}
        finished = set()
        for result in results:
            if result.outcome.delivery_id not in held:
                answers[id(result)] = None  # the lease was lost: another worker's row now
                continue
            if result.outcome.state in TERMINAL_DELIVERY_STATES:
                finished.add(result.campaign_id)
            if result.apply is None:
                if result.outcome.state == "sent":
                    sent[result.account] = sent.get(result.account, 0) + 1
                answers[id(result)] = False
        live = [r for r in results if r.outcome.delivery_id in held]
        if any(r.apply is not None or r.outcome.state == "failed" for r in live):
            # The account actions and the guards below write rows in the order the results
            # came in: take them all in key order first. Without them the writes are in key
            # order already (finish_campaigns, then count_sent, each sorted).
            store_sending.lock_in_order(connection, [r.campaign_id for r in live],
                                        [r.account for r in live])
        store_deliveries.finish_campaigns(connection, finished, now)
        store_sending.count_sent(connection, sent, now)
        for result in results:
            if result.apply is not None and result.outcome.delivery_id in held:
                answers[id(result)] = result.apply(connection, now)
        _run_guards(connection, live, now)
        return [r.delivery_id in holding if isinstance(r, _Sending) else answers.get(id(r))
                for r in batch]


def _run_guards(connection: Connection, results: Sequence[Result], now: float) -> None:
    """Refusals at SMTP time count toward the guards (DESIGN §8): a campaign whose hard
    bounces, or an account whose 5.7.x blocks, passed the limit stops in this transaction."""
    failing = sorted({r.campaign_id for r in results if r.outcome.state == "failed"})
    blocked = sorted({r.account for r in results
                      if r.outcome.state == "failed" and (r.outcome.enhanced or "").startswith("5.7.")})
    if failing or blocked:
        guards.check(connection, failing, blocked, now)
