"""The send loop: claim deliveries for accounts, send them over SMTP, record what happened.

    claim (one serialised transaction)          send (no transaction held)
    ├─ recover dead workers' leases             ├─ re-check suppression before RCPT
    ├─ accounts' state and quota ledger         ├─ render + sign the message
    ├─ due deliveries of running campaigns      ├─ MAIL, RCPT, DATA, body
    ├─ rotation picks an account each           ├─ commit `sending` if the lease holds
    └─ lease + reservation per delivery         ├─ final dot (else: drop, no dot)
                                                 └─ commit the result (DESIGN §6)

Side effects come in as parameters: the SMTP session factory, the clock and `sleep`, so the
loop runs against fakes in unit tests and real loopback servers in integration tests.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import tenacity
from sqlalchemy.engine import Engine

from bulksend import db, limits, messages, rotation, store_campaigns, store_deliveries
from bulksend.campaigns import campaign_signer
from bulksend.config import AccountConfig, DeliveryConfig, DkimKey, SenderConfig
from bulksend.outcomes import Action, plan_for
from bulksend.smtp import AccountError

Clock = Callable[[], float]
IDLE_POLL = 5.0
MAX_RETRY_WAIT = 4000.0  # DESIGN §4: retry_after doubles up to this  # a daemon with nothing to do looks again this often


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
    """A delivery this worker holds, with its account."""

    id: int
    campaign_id: int
    email: str
    email_key: str
    account: str
    lease_expires_at: float


class Sender:
    """One worker: claims, sends and records until told to stop."""

    def __init__(self, engine: Engine, settings: Settings, sessions: SessionFactory, *,
                 clock: Clock, sleep: Callable[[float], None], crash: CrashPoints | None = None,
                 batch: int = 100, campaign: str | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.sleep = sleep
        self.crash = crash or CrashPoints(None)
        self.batch = batch
        self.campaign_name = campaign
        self.owner = f"{os.uname().nodename}:{os.getpid()}"
        self.token = uuid.uuid4().hex  # the lease token of everything this worker claims
        self.report = Report()
        self.stop = threading.Event()
        self._accounts = {account.name: account for account in settings.accounts}
        self._pools: dict[str, list[Session]] = {name: [] for name in self._accounts}
        self._factories: dict[tuple[int, bool], messages.MessageFactory] = {}
        self._lock = threading.Lock()
        self._campaign_id: int | None = None

    # --- the loop --------------------------------------------------------------------------

    def run(self, *, once: bool, max_time: float | None = None) -> Report:
        """Send until the queue is empty, nothing can go now (`once`), time is up or `stop`."""
        started = self.clock()
        self._prepare()
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
            self._shutdown()
        return self.report

    def _prepare(self) -> None:
        with db.transaction(self.engine) as connection:
            store_deliveries.ensure_accounts(connection, list(self._accounts), self.clock())
            if self.campaign_name is not None:
                self._campaign_id = store_campaigns.campaign(connection, self.campaign_name).id

    def _idle(self, why_not: str, once: bool) -> float | None:
        """Record why nothing was claimed; None stops (`--once`), else how long to wait."""
        self.report.stopped_because = why_not
        return None if once else IDLE_POLL

    def _shutdown(self) -> None:
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
            assigned = [Claimed(item.id, item.campaign_id, item.email, item.email_key, name, expires)
                        for item, name in zip(due, chosen)]
            store_deliveries.save_positions(connection, positions, now)
            store_deliveries.claim(connection, [(c.id, c.account) for c in assigned], self.owner,
                                   self.token, now, self.settings.delivery.lease)
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
        if len(lanes) == 1:
            self._lane(*lanes[0])
            return
        with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
            for future in [pool.submit(self._lane, name, items) for name, items in lanes]:
                future.result()

    def _lane(self, account: str, items: list[Claimed]) -> None:
        """Send one account's share of a batch over one session, in order."""
        session: Session | None = None
        try:
            for index, item in enumerate(items):
                if self.stop.is_set():
                    break
                if self.clock() >= item.lease_expires_at:
                    # Past the lease (a slow batch, or this process was stopped): the dot
                    # would be fenced off anyway, so do not start the transaction at all.
                    with db.transaction(self.engine) as connection:
                        store_deliveries.requeue(connection, [item.id], self.token, self.clock())
                    continue
                if session is None or not session.alive:
                    session = self._session(account, items[index:])
                    if session is None:
                        return
                if self._send_one(session, item):
                    # The provider told us to stop (cooldown, quota, disabled): the rest of
                    # this lane goes back to the queue for the other accounts.
                    with db.transaction(self.engine) as connection:
                        store_deliveries.requeue(connection, [i.id for i in items[index + 1:]],
                                                 self.token, self.clock())
                    session.close()
                    session = None
                    return
                if session.alive and session.sent >= self._accounts[account].messages_per_connection:
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
            return self.sessions(self._accounts[account])
        except AccountError as exc:
            self._account_failed(account, exc, waiting)
            return None

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
        now = self.clock()
        with db.reading(self.engine) as connection:
            if store_deliveries.is_suppressed(connection, item.email_key):
                suppressed = True
            else:
                suppressed = False
                person = store_deliveries.recipient(connection, item.id)
        if suppressed:
            return self._record(item, plan_for("suppressed"), None)
        outgoing = self._factory(item.campaign_id, session.eight_bit).build(
            item.id, person.email, person.name, person.attributes, now)

        def before_dot() -> bool:
            with db.transaction(self.engine) as connection:
                holding = store_deliveries.mark_sending(connection, item.id, self.token,
                                                        self.clock(), self.settings.delivery.lease)
            self.crash.hit("before_dot")
            return holding

        result = session.send(outgoing.envelope_from, outgoing.recipient, outgoing.data, before_dot)
        self.crash.hit("after_dot")
        return self._record(item, plan_for(result.outcome), result)

    # --- results -----------------------------------------------------------------------------

    def _record(self, item: Claimed, action: Action, result: Any) -> bool:
        """Commit one result (DESIGN §6); True when the account now rests."""
        if action.state == "lease_lost":
            return False
        now = self.clock()
        code = getattr(result, "code", None)
        enhanced = getattr(result, "enhanced", None)
        text = getattr(result, "text", None)
        reached = result is not None and result.reached_mail
        with db.transaction(self.engine) as connection:
            state, next_at = action.state, None
            if state == "deferred":
                row = store_deliveries.recipient(connection, item.id)
                next_at, state = self._retry_at(row.attempts + 1, row.created_at, now)
            unreached = action.release_if_no_mail and not reached
            store_deliveries.finish(
                connection, item.id, self.token, now, state=state, next_attempt_at=next_at,
                count_attempt=action.count_attempt and not unreached, code=code,
                enhanced=enhanced, text=text, release_reservation=unreached,
            )
            if state in ("sent", "failed", "expired", "suppressed", "unknown"):
                store_deliveries.finish_campaigns(connection, [item.campaign_id], now)
            rests = action.apply(connection, item, self.settings, now, text or "")
        self.crash.hit("after_result")
        with self._lock:
            if state == "sent":
                self.report.sent += 1
                self.report.by_account[item.account] += 1
            elif state in ("failed", "deferred", "unknown", "suppressed"):
                setattr(self.report, state, getattr(self.report, state) + 1)
            elif state == "expired":
                self.report.failed += 1
        return rests

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


def retry_delay(delivery: DeliveryConfig, attempt: int) -> float:
    """The wait before retry number `attempt`: retry_after, doubling, at most 4000 s."""
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return float(backoff_policy(delivery)(state))


def backoff_policy(delivery: DeliveryConfig) -> tenacity.wait.wait_base:
    """The one retry policy for deferred deliveries, built from `[delivery]`."""
    return tenacity.wait_exponential(multiplier=delivery.retry_after, max=MAX_RETRY_WAIT)
