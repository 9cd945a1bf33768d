"""The send loop: claim deliveries for accounts, send them over SMTP, record what happened.

    claim (one serialised transaction)          send (lanes: one per session, no transaction held)
    ├─ recover dead workers' leases             ├─ re-check suppression before RCPT
    ├─ accounts' state and quota ledger         ├─ render + sign the message
    ├─ due deliveries of running campaigns      ├─ MAIL, RCPT, DATA, body
    ├─ rotation picks an account each           ├─ commit `sending` if the lease holds ◄─┐
    └─ lease + reservation per delivery         ├─ final dot (else: drop, no dot)        │
                                                 └─ queue the result (DESIGN §6) ────────┤
                                                    the recorder's writer thread commits ┘
                                                    what all lanes queued, one transaction
                                                    per round (`bulksend.recorder`)

Right before each message a lane re-checks, for the next SUPPRESSION_CHUNK messages at once
(read again when that read is older than SUPPRESSION_MAX_AGE seconds), the suppression list
and whether the claim still stands: an address suppressed, or a campaign paused or
cancelled, more than that long before the message's turn is not sent; a claim given up
that way goes back to the queue. (The lease-conditioned `sending` commit before the dot
still fences off any claim lost later.)

Side effects come in as parameters: the SMTP session factory, the clock and `sleep`, so the
loop runs against fakes in unit tests and real loopback servers in integration tests.
"""

from __future__ import annotations

import gc
import os
import threading
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import tenacity
from sqlalchemy.engine import Engine

from bulksend import db, limits, messages, rotation, store_campaigns, store_deliveries, store_sending
from bulksend.campaigns import campaign_signer
from bulksend.config import AccountConfig, DeliveryConfig, DkimKey, SenderConfig
from bulksend.outcomes import Action, plan_for
from bulksend.recorder import Recorder, Result
from bulksend.smtp import AccountError

Clock = Callable[[], float]
IDLE_POLL = 5.0  # a daemon with nothing to do looks again this often
MAX_RETRY_WAIT = 4000.0  # DESIGN §4: retry_after doubles up to this
BATCH_PER_LANE = 200  # a claim takes up to this many deliveries per session that can work at once
LANE_RATE = 10  # messages per second a lane surely manages: a batch fits well within its lease
SUPPRESSION_CHUNK = 64  # addresses a lane checks against the suppression list in one read
SUPPRESSION_MAX_AGE = 1.0  # seconds a lane trusts that read
DRAIN_SECONDS = 20.0  # after `stop`, in-flight transactions get this long before their
# connections are cut (a message whose dot went out becomes `unknown`), so that a SIGTERM'd
# worker exits within 30 s whatever its servers do


class Session(Protocol):
    """One open SMTP session to one account (see `bulksend.smtp`)."""

    @property
    def alive(self) -> bool: ...  # noqa: D102

    @property
    def sent(self) -> int: ...  # noqa: D102 - transactions started on this connection

    @property
    def eight_bit(self) -> bool: ...  # noqa: D102 - the server offers 8BITMIME

    def send(self, envelope_from: str, recipient: str, data: bytes,
             before_dot: Callable[[], bool]) -> Any: ...

    def close(self) -> None: ...

    def interrupt(self) -> None: ...  # noqa: D102 - cut it from another thread


SessionFactory = Callable[[AccountConfig], Session]


@dataclass(frozen=True)
class Settings:
    """What the loop needs from the configuration (read at the edge)."""

    accounts: tuple[AccountConfig, ...]
    delivery: DeliveryConfig
    sender: SenderConfig
    secret: bytes
    dkim_keys: tuple[DkimKey, ...]
    timezone: ZoneInfo


@dataclass
class Report:
    """What one `send` run did (`send --json`)."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    unknown: int = 0
    suppressed: int = 0
    by_account: Counter[str] = field(default_factory=Counter)
    stopped_because: str = ""

    def as_json(self) -> dict[str, Any]:
        """The DESIGN §9 object."""
        return {"sent": self.sent, "failed": self.failed, "deferred": self.deferred,
                "unknown": self.unknown, "suppressed": self.suppressed,
                "by_account": dict(sorted(self.by_account.items())),
                "stopped_because": self.stopped_because}


class CrashPoints:
    """Named places where a test can make the process die hard (`BULKSEND_CRASH_AT`)."""

    def __init__(self, spec: str | None) -> None:
        self._armed: dict[str, int] = {}
        for item in filter(None, (spec or "").split(",")):
            name, _, count = item.partition(":")
            self._armed[name.strip()] = int(count or 1)
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hit(self, name: str) -> None:
        """Exit at once (no cleanup, like kill -9) on the armed occurrence of `name`."""
        if name not in self._armed:
            return
        with self._lock:
            self._seen[name] += 1
            if self._seen[name] == self._armed[name]:
                os._exit(137)


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker holds, with its account and what its message needs."""

    id: int
    campaign_id: int
    email: str
    email_key: str
    account: str
    lease_expires_at: float
    attempt_id: int  # its reservation in the quota ledger
    attempts: int
    created_at: float
    name: str
    attributes: dict[str, Any]


class Sender:
    """One worker: claims, sends and records until told to stop."""

    def __init__(self, engine: Engine, settings: Settings, sessions: SessionFactory, *,
                 clock: Clock, sleep: Callable[[float], None], crash: CrashPoints | None = None,
                 batch: int | None = None, campaign: str | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.sleep = sleep
        self.crash = crash or CrashPoints(None)
        # Big batches: every claim is a serialised transaction and every batch ends waiting
        # for its slowest lane. Small enough to be sent well within the lease.
        lanes = sum(account.connections for account in settings.accounts)
        per_lane = min(BATCH_PER_LANE, int(settings.delivery.lease * LANE_RATE))
        self.batch = batch or max(100, per_lane * lanes)
        self.campaign_name = campaign
        self.owner = f"{os.uname().nodename}:{os.getpid()}"
        self.token = uuid.uuid4().hex  # the lease token of everything this worker claims
        self.report = Report()
        self.stop = threading.Event()
        self._accounts = {account.name: account for account in settings.accounts}
        self._pools: dict[str, list[Session]] = {name: [] for name in self._accounts}
        self._factories: dict[tuple[int, bool], messages.MessageFactory] = {}
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[Session] = weakref.WeakSet()  # what a drain may cut
        self._campaign_id: int | None = None
        self._recorder: Recorder | None = None

    # --- the loop --------------------------------------------------------------------------

    def run(self, *, once: bool, max_time: float | None = None) -> Report:
        """Send until the queue is empty, nothing can go now (`once`), time is up or `stop`."""
        started = self.clock()
        # Before any thread of the loop starts: they inherit it.
        unpin = _one_cpu() if self.settings.delivery.one_cpu else (lambda: None)
        try:
            self._prepare()
        except BaseException:
            unpin()
            raise
        # What exists by now (modules, configuration, the store's metadata) lives as long
        # as the loop: spare the cyclic collector walking it on every full collection.
        gc.freeze()
        finished = threading.Event()
        threading.Thread(target=self._drain_watch, args=(finished,), daemon=True,
                         name="bulksend-drain").start()
        try:
            while not self.stop.is_set():
                if max_time is not None and self.clock() - started >= max_time:
                    self.report.stopped_because = "max-time reached"
                    break
                claimed, why_not = self._claim()
                if claimed:
                    self._send_all(claimed)
                    continue
                wait = self._idle(why_not, once)
                if wait is None:
                    break
                self.sleep(wait)
            else:
                self.report.stopped_because = "stopped by signal"
        finally:
            try:
                self._shutdown()
            finally:
                finished.set()
                gc.unfreeze()
                unpin()
        return self.report

    def _drain_watch(self, finished: threading.Event) -> None:
        """Once `stop` is set, give in-flight transactions DRAIN_SECONDS (wall clock), then
        cut every connection still open: a stuck server cannot hold the shutdown."""
        while not self.stop.wait(1.0):
            if finished.is_set():
                return
        if finished.wait(DRAIN_SECONDS):
            return
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            session.interrupt()

    def _prepare(self) -> None:
        self._recorder = Recorder(self.engine, self.token, self.settings.delivery.lease,
                                  self.clock, self._recorded)
        with db.transaction(self.engine) as connection:
            store_deliveries.ensure_accounts(connection, list(self._accounts), self.clock())
            if self.campaign_name is not None:
                self._campaign_id = store_campaigns.campaign(connection, self.campaign_name).id

    def _idle(self, why_not: str, once: bool) -> float | None:
        """Record why nothing was claimed; None stops (`--once`), else how long to wait."""
        self.report.stopped_because = why_not
        return None if once else IDLE_POLL

    def _shutdown(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
        with db.transaction(self.engine) as connection:
            store_deliveries.release_claims(connection, self.token, self.clock())
        for pool in self._pools.values():
            for session in pool:
                session.close()
            pool.clear()

    # --- claiming ----------------------------------------------------------------------------

    def _claim(self) -> tuple[list[Claimed], str]:
        now = self.clock()
        names = list(self._accounts)
        with db.transaction(self.engine) as connection:
            store_deliveries.recover_expired(connection, now)
            store_deliveries.start_due_campaigns(connection, now)
            rows = store_deliveries.accounts(connection, names, lock=True)
            capacity = self._capacities(connection, rows, now)
            due = store_deliveries.due_deliveries(connection, now, self.batch, self._campaign_id)
            if not due:
                return [], self._nothing_due(connection, now)
            if not capacity:
                return [], "all accounts unavailable"
            slots = [rotation.Slot(name, self._accounts[name].weight, rows[name].position)
                     for name in names]
            room = {name: left for name, left in capacity.items() if left is not None}
            chosen, positions = rotation.picks(slots, list(capacity), len(due), room=room)
            expires = now + self.settings.delivery.lease
            store_deliveries.save_positions(connection, positions, now)
            reserved = store_deliveries.claim(connection, [(item.id, name) for item, name
                                                           in zip(due, chosen)],
                                              self.owner, self.token, now,
                                              self.settings.delivery.lease)
            assigned = [Claimed(item.id, item.campaign_id, item.email, item.email_key, name,
                                expires, reserved[item.id], item.attempts, item.created_at,
                                item.name, item.attributes)
                        for item, name in zip(due, chosen)]
        self.crash.hit("after_claim")
        return assigned, ""

    def _capacities(self, connection: Any, rows: dict[str, store_deliveries.AccountRow],
                    now: float) -> dict[str, int | None]:
        """Accounts that may take messages now, with how many (None: no limit)."""
        ready = {}
        for name, account in self._accounts.items():
            row = rows[name]
            if row.state == "disabled":
                continue
            if row.state in ("cooldown", "exhausted"):
                if row.until is not None and row.until > now:
                    continue
                store_deliveries.set_account(connection, name, now, state="active", until=None)
            ready[name] = account
        since = now - max((limits.lookback(a.limits) for a in ready.values()), default=0)
        ledger = store_deliveries.reservations(connection, list(ready), since)
        capacity: dict[str, int | None] = {}
        for name, account in ready.items():
            room = limits.capacity(account.limits, account.window, ledger[name], now,
                                   self.settings.timezone)
            if room is None or room > 0:
                capacity[name] = room
        return capacity

    def _nothing_due(self, connection: Any, now: float) -> str:
        if store_deliveries.in_flight(connection, self._campaign_id):
            return "other workers hold the remaining deliveries"
        upcoming = store_deliveries.next_due(connection, self._campaign_id)
        return "queue empty" if upcoming is None else "only future retries remain"

    # --- sending -----------------------------------------------------------------------------

    def _send_all(self, claimed: list[Claimed]) -> None:
        """Send a batch: each account over up to `connections` sessions at once."""
        by_account: dict[str, list[Claimed]] = {}
        for item in claimed:
            by_account.setdefault(item.account, []).append(item)
        lanes = [(name, items[i::self._accounts[name].connections])
                 for name, items in by_account.items()
                 for i in range(min(self._accounts[name].connections, len(items)))]
        try:
            if len(lanes) == 1:
                self._lane(*lanes[0])
            else:
                with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
                    for future in [pool.submit(self._lane, name, items) for name, items in lanes]:
                        future.result()
        finally:
            assert self._recorder is not None
            self._recorder.flush()  # the next claim sees every result of this batch

    def _lane(self, account: str, items: list[Claimed]) -> None:
        """Send one account's share of a batch over one session, in order."""
        assert self._recorder is not None
        recorder = self._recorder
        session: Session | None = None
        recheck = _Recheck(self.engine, self.clock, items, self.token)
        try:
            for index, item in enumerate(items):
                if self.stop.is_set():
                    break
                if self.clock() >= item.lease_expires_at:
                    # Past the lease (a slow batch, or this process was stopped): the dot
                    # would be fenced off anyway, so do not start the transaction at all.
                    recorder.requeue([item.id])
                    continue
                verdict = recheck(index)
                if verdict == "suppressed":
                    self._finish(item, plan_for("suppressed"), None)
                    continue
                if verdict == "given up":  # paused, cancelled or unsubscribed meanwhile
                    recorder.requeue([item.id])
                    continue
                if session is None or not session.alive:
                    session = self._session(account, items[index:])
                    if session is None:
                        return
                if self._send_one(session, item):
                    # The provider told us to stop (cooldown, quota, disabled): the rest of
                    # this lane goes back to the queue for the other accounts.
                    recorder.requeue([i.id for i in items[index + 1:]])
                    session.close()
                    session = None
                    return
                if session.sent >= self._accounts[account].messages_per_connection:
                    session.close()
                    session = None
        finally:
            if session is not None and session.alive:
                with self._lock:
                    self._pools[account].append(session)

    def _session(self, account: str, waiting: list[Claimed]) -> Session | None:
        """An open session (reused when possible); on failure the account's claims go back."""
        with self._lock:
            while self._pools[account]:
                session = self._pools[account].pop()
                if session.alive:
                    return session
        try:
            session = self.sessions(self._accounts[account])
        except AccountError as exc:
            self._account_failed(account, exc, waiting)
            return None
        with self._lock:
            self._open.add(session)
        return session

    def _factory(self, campaign_id: int, eight_bit: bool) -> messages.MessageFactory:
        key = (campaign_id, eight_bit)
        with self._lock:
            factory = self._factories.get(key)
        if factory is None:
            with db.reading(self.engine) as connection:
                campaign = store_campaigns.campaign_by_id(connection, campaign_id)
            signer = campaign_signer(campaign, self.settings.sender, self.settings.dkim_keys)
            factory = messages.MessageFactory(campaign, self.settings.sender, self.settings.secret,
                                              signer, eight_bit=eight_bit)
            with self._lock:
                self._factories[key] = factory
        return factory

    def _send_one(self, session: Session, item: Claimed) -> bool:
        """Send one claimed delivery; True when its account must now rest."""
        outgoing = self._factory(item.campaign_id, session.eight_bit).build(
            item.id, item.email, item.name, item.attributes, self.clock())
        assert self._recorder is not None
        recorder = self._recorder

        def before_dot() -> bool:
            holding = recorder.mark_sending(item.id)  # waits for the commit that carries it
            self.crash.hit("before_dot")
            return holding

        result = session.send(outgoing.envelope_from, outgoing.recipient, outgoing.data, before_dot)
        self.crash.hit("after_dot")
        return self._finish(item, plan_for(result.outcome), result)

    # --- results -----------------------------------------------------------------------------

    def _finish(self, item: Claimed, action: Action, result: Any) -> bool:
        """Queue one result (DESIGN §6) for the recorder; True when the account now rests.

        Only a result that may make the account rest is waited for: the lane must know
        before its next message.
        """
        if action.state == "lease_lost":
            return False
        now = self.clock()
        text = getattr(result, "text", None)
        state, next_at = action.state, None
        if state == "deferred":
            next_at, state = self._retry_at(item.attempts + 1, item.created_at, now)
        unreached = action.release_if_no_mail and not (result is not None and result.reached_mail)
        outcome = store_sending.Outcome(
            item.id, item.attempt_id, state, count_attempt=action.count_attempt and not unreached,
            release_reservation=unreached, next_attempt_at=next_at,
            code=getattr(result, "code", None), enhanced=getattr(result, "enhanced", None),
            text=text)
        settings = self.settings

        def apply(connection: Any, when: float) -> bool:
            return action.apply(connection, item, settings, when, text or "")

        assert self._recorder is not None
        queued = self._recorder.record(Result(outcome, item.account, item.campaign_id,
                                              None if action.state == "sent" else apply))
        return action.account is not None and bool(queued.wait())

    def _recorded(self, result: Result) -> None:
        """A result is committed (called by the recorder's writer)."""
        self.crash.hit("after_result")
        state = result.outcome.state
        with self._lock:
            if state == "sent":
                self.report.sent += 1
                self.report.by_account[result.account] += 1
            elif state in ("failed", "deferred", "unknown", "suppressed"):
                setattr(self.report, state, getattr(self.report, state) + 1)
            elif state == "expired":
                self.report.failed += 1

    def _retry_at(self, attempt: int, queued_at: float, now: float) -> tuple[float | None, str]:
        """When a deferred delivery is tried again, or `expired` if it has waited too long."""
        delivery = self.settings.delivery
        if attempt >= delivery.max_attempts or now - queued_at >= delivery.give_up_after:
            return None, "expired"
        return now + retry_delay(delivery, attempt), "deferred"

    def _account_failed(self, account: str, error: Any, waiting: list[Claimed]) -> None:
        """The session could not be opened: the account's claims go back; the account rests."""
        now = self.clock()
        with db.transaction(self.engine) as connection:
            store_deliveries.requeue(connection, [item.id for item in waiting], self.token, now)
            plan_for(error.outcome).apply(connection, waiting[0], self.settings, now, str(error))


class _Recheck:
    """A lane's look, right before each message, at the suppression list and at whether its
    claim still stands: one read for the next SUPPRESSION_CHUNK messages, trusted for
    SUPPRESSION_MAX_AGE seconds."""

    def __init__(self, engine: Engine, clock: Clock, items: list[Claimed], token: str) -> None:
        self.engine = engine
        self.clock = clock
        self.items = items
        self.token = token
        self.until = 0  # the items before this index were looked up at `read_at`
        self.read_at = 0.0
        self.suppressed: set[str] = set()
        self.held: set[int] = set()

    def __call__(self, index: int) -> str:
        """"send", "suppressed", or "given up" (the claim no longer stands) for items[index]."""
        now = self.clock()
        if index >= self.until or now - self.read_at > SUPPRESSION_MAX_AGE:
            chunk = self.items[index:index + SUPPRESSION_CHUNK]
            with db.reading(self.engine) as connection:
                self.suppressed = store_sending.suppressed_keys(
                    connection, [i.email_key for i in chunk])
                self.held = store_sending.still_to_send(connection, [i.id for i in chunk],
                                                        self.token)
            self.until, self.read_at = index + len(chunk), now
        item = self.items[index]
        if item.id not in self.held:
            return "given up"
        return "suppressed" if item.email_key in self.suppressed else "send"


def _one_cpu() -> Callable[[], None]:
    """Keep the loop's threads on one CPU; returns what undoes it (for this thread).

    The loop is bound by the GIL, and its twenty-odd threads hand it over at every socket
    call: spread over several CPUs, each hand-over wakes a thread on another core (about 25
    thread switches per message on an idle 2-CPU machine against 5 on one CPU, and some 40 %
    more CPU per message). Workers on one machine spread over its CPUs by process id
    (`[delivery] one_cpu = false` turns this off).
    """
    try:
        allowed = os.sched_getaffinity(0)
        if len(allowed) < 2:
            return lambda: None
        os.sched_setaffinity(0, {sorted(allowed)[os.getpid() % len(allowed)]})
    except (AttributeError, OSError):  # not Linux, or not allowed: run as we are
        return lambda: None
    return lambda: os.sched_setaffinity(0, allowed)


def retry_delay(delivery: DeliveryConfig, attempt: int) -> float:
    """The wait before retry number `attempt`: retry_after, doubling, at most 4000 s."""
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return float(backoff_policy(delivery)(state))


def backoff_policy(delivery: DeliveryConfig) -> tenacity.wait.wait_base:
    """The one retry policy for deferred deliveries, built from `[delivery]`."""
    return tenacity.wait_exponential(multiplier=delivery.retry_after, max=MAX_RETRY_WAIT)
