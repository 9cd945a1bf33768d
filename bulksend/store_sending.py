"""SQL of the send loop's hot path, run by the recorder's group commit (`bulksend.recorder`).

Each function handles many deliveries in a few statements. The statements are built once:
building and cache-keying a Core statement costs more than SQLite takes to run it; values
travel as bind parameters (executemany).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.models import account_state, campaigns, deliveries, delivery_attempts, suppressions


class Prepared:
    """A Core statement compiled once per dialect and run on the driver's cursor.

    For the statements of the send loop's hot path SQLAlchemy's per-execution work (cache
    key, parameter processing per row) costs several times what SQLite needs to run them.
    Parameters must be plain values needing no conversion (int, float, str, bool, None),
    and the statement must not have an expanding IN (write `or_` of equalities instead).
    """

    def __init__(self, statement: sa.Executable) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, str], tuple[str, dict[str, Any], _Order]] = {}

    def run(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """Execute for each parameter set (executemany); the number of rows affected."""
        sql, defaults, order = self._for(connection.dialect)
        merged = [{**defaults, **row} for row in rows]
        params: Any = merged if order is None else list(map(order, merged))
        with _cursor(connection, sql, params) as cursor:
            if len(params) == 1:
                cursor.execute(sql, params[0])
            else:
                cursor.executemany(sql, params)
            return cursor.rowcount

    def first(self, connection: Connection, row: dict[str, Any]) -> Any:
        """Execute once; the first result row (a tuple), or None."""
        sql, defaults, order = self._for(connection.dialect)
        merged = {**defaults, **row}
        params: Any = merged if order is None else order(merged)
        with _cursor(connection, sql, params) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()

    def all(self, connection: Connection, row: dict[str, Any]) -> list[Any]:
        """Execute once; every result row (tuples), e.g. of a SELECT or UPDATE ... RETURNING."""
        sql, defaults, order = self._for(connection.dialect)
        merged = {**defaults, **row}
        params: Any = merged if order is None else order(merged)
        with _cursor(connection, sql, params) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def _for(self, dialect: sa.Dialect) -> tuple[str, dict[str, Any], _Order]:
        key = (dialect.name, dialect.driver)
        found = self._compiled.get(key)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)  # type: ignore[union-attr]
            order = _positional(tuple(compiled.positiontup)) if compiled.positional else None
            found = (compiled.string, dict(compiled.params), order)
            self._compiled[key] = found
        return found


@contextmanager
def _cursor(connection: Connection, sql: str, params: Any) -> Iterator[Any]:
    """A driver cursor in the connection's transaction. Even exec_driver_sql costs several
    times what SQLite takes for these statements; driver errors come out as SQLAlchemy's
    (an OperationalError stays one), as they would from it."""
    dbapi = connection.dialect.loaded_dbapi
    cursor = connection.connection.cursor()
    try:
        yield cursor
    except dbapi.Error as error:
        raise sa.exc.DBAPIError.instance(sql, params, error, dbapi.Error,
                                         dialect=connection.dialect) from error
    finally:
        cursor.close()


_Order = Callable[[dict[str, Any]], tuple[Any, ...]] | None


def _positional(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A parameter dict → the tuple a positional driver wants (itemgetter: no Python loop)."""
    if len(names) <= 1:
        return lambda row: tuple(row[name] for name in names)
    return operator.itemgetter(*names)  # type: ignore[return-value]


def suppressed_keys(connection: Connection, email_keys: Sequence[str]) -> set[str]:
    """Which of these addresses are suppressed now, by address or by domain (one read)."""
    if not email_keys:
        return set()
    by_domain: dict[str, list[str]] = {}
    for key in email_keys:
        by_domain.setdefault(key.rpartition("@")[2], []).append(key)
    found = set()
    for entry in connection.execute(sa.union_all(
            sa.select(suppressions.c.email_key).where(suppressions.c.email_key.in_(email_keys)),
            sa.select(suppressions.c.domain).where(suppressions.c.domain.in_(list(by_domain))),
    )).scalars():
        # An address has an '@', a domain has none.
        found.update([entry] if "@" in entry else by_domain[entry])
    return found


def still_to_send(connection: Connection, delivery_ids: Sequence[int], token: str) -> set[int]:
    """Which of these claims this worker still holds for a running campaign (one read).

    A claim is given up under the worker's feet when its campaign is paused or cancelled, or
    the subscriber unsubscribed: the lane then skips it without opening an SMTP transaction.
    """
    if not delivery_ids:
        return set()
    running = sa.select(campaigns.c.id).where(campaigns.c.status == "running")
    return set(connection.execute(
        sa.select(deliveries.c.id).where(
            deliveries.c.id.in_(list(delivery_ids)), deliveries.c.state == "claimed",
            deliveries.c.lease_token == token, deliveries.c.campaign_id.in_(running))
    ).scalars())


_MARK_SENDING = Prepared(
    sa.update(deliveries)
    .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.state == "claimed",
           deliveries.c.lease_token == sa.bindparam("b_token"),
           deliveries.c.lease_expires_at > sa.bindparam("b_now"))
    .values(state="sending", lease_expires_at=sa.bindparam("b_expires"),
            updated_at=sa.bindparam("b_at"))
)
_SENDING_NOW = sa.select(deliveries.c.id).where(
    deliveries.c.id.in_(sa.bindparam("b_ids", expanding=True)), deliveries.c.state == "sending",
    deliveries.c.lease_token == sa.bindparam("b_token"))


def mark_sending(connection: Connection, delivery_ids: Sequence[int], token: str, now: float,
                 lease: float) -> set[int]:
    """Commit point before the final dot: the ids whose lease this worker still holds.

    Only a `claimed` row with this worker's token and an unexpired lease becomes `sending`;
    a row another worker recovered, or one set `suppressed` meanwhile, is left alone and its
    lane withholds the dot. The lease is renewed from `now`: the dot, its reply and the
    result get a whole lease, however long the claim waited in its batch; otherwise
    recovery could call a message `unknown` while its worker is reading the 250.
    """
    if not delivery_ids:
        return set()
    ids = list(delivery_ids)
    updated = _MARK_SENDING.run(connection, [
        {"b_id": i, "b_token": token, "b_now": now, "b_expires": now + lease, "b_at": now}
        for i in ids])
    if updated == len(ids):
        return set(ids)
    # Some lease was lost (rare). A row is asked for once per claim, so the rows of these
    # that are `sending` under this worker's token are exactly the ones just updated.
    return set(connection.execute(_SENDING_NOW, {"b_ids": ids, "b_token": token}).scalars())


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt, as `finish_many` records it."""

    delivery_id: int
    attempt_id: int  # the reservation the claim made
    state: str
    count_attempt: bool = True
    release_reservation: bool = False  # the session never reached MAIL FROM: quota given back
    next_attempt_at: float | None = None
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None


_LOST = sa.select(deliveries.c.id).where(
    deliveries.c.id.in_(sa.bindparam("b_ids", expanding=True)),
    sa.or_(deliveries.c.lease_token.is_(None), deliveries.c.lease_token != sa.bindparam("b_token"),
           deliveries.c.state.not_in(("claimed", "sending"))))


_FINISH = Prepared(
    sa.update(deliveries)
    .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.lease_token == sa.bindparam("b_token"),
           # not in_(): an expanding IN cannot run as executemany
           sa.or_(deliveries.c.state == "claimed", deliveries.c.state == "sending"))
    .values(state=sa.bindparam("b_state"), smtp_code=sa.bindparam("b_code"),
            smtp_enhanced=sa.bindparam("b_enhanced"), smtp_text=sa.bindparam("b_text"),
            lease_owner=None, lease_token=None, lease_expires_at=None,
            updated_at=sa.bindparam("b_now"),
            attempts=deliveries.c.attempts + sa.bindparam("b_count", type_=sa.Integer),
            next_attempt_at=sa.func.coalesce(sa.bindparam("b_next", type_=sa.Double),
                                             deliveries.c.next_attempt_at),
            sent_at=sa.func.coalesce(sa.bindparam("b_sent_at", type_=sa.Double),
                                     deliveries.c.sent_at),
            account=sa.case((sa.bindparam("b_unassign", type_=sa.Boolean), None),
                            else_=deliveries.c.account))
)
_ATTEMPT_DONE = Prepared(
    sa.update(delivery_attempts).where(delivery_attempts.c.id == sa.bindparam("b_id"))
    .values(finished_at=sa.bindparam("b_now"), outcome=sa.bindparam("b_state"),
            smtp_code=sa.bindparam("b_code"), smtp_enhanced=sa.bindparam("b_enhanced"),
            smtp_text=sa.bindparam("b_text"))
)
_ATTEMPT_DROP = Prepared(
    sa.delete(delivery_attempts).where(delivery_attempts.c.id == sa.bindparam("b_id")))


def finish_many(connection: Connection, outcomes: Sequence[Outcome], token: str, now: float,
                *, careful: bool = False) -> set[int]:
    """Record the results of many attempts; returns the delivery ids whose lease still held.

    A row whose lease this worker lost (recovered as `unknown`, taken by another worker,
    suppressed meanwhile) is left alone, and so is its attempt row. Leases are rarely lost,
    so by default every row is updated at once, and LeaseRace is raised if one was lost:
    roll back and call again with `careful`, which first looks for the lost rows. (With
    `careful`, LeaseRace means a row was taken away in between, PostgreSQL only.)
    """
    if not outcomes:
        return set()
    lost: set[int] = set()
    if careful:
        ids = [o.delivery_id for o in outcomes]
        lost = set(connection.execute(_LOST, {"b_ids": ids, "b_token": token}).scalars())
    kept = [o for o in outcomes if o.delivery_id not in lost]
    if not kept:
        return set()
    updated = _FINISH.run(connection, [
        {"b_id": o.delivery_id, "b_token": token, "b_state": o.state, "b_code": o.code,
         "b_enhanced": o.enhanced, "b_text": o.text, "b_now": now, "b_count": int(o.count_attempt),
         "b_next": o.next_attempt_at, "b_sent_at": now if o.state == "sent" else None,
         "b_unassign": o.release_reservation and o.state in ("queued", "deferred")}
        for o in kept
    ])
    if updated != len(kept):
        raise LeaseRace(f"{len(kept) - updated} leases were lost while their results were written")
    done = [o for o in kept if not o.release_reservation]
    if done:
        _ATTEMPT_DONE.run(connection, [
            {"b_id": o.attempt_id, "b_now": now, "b_state": o.state, "b_code": o.code,
             "b_enhanced": o.enhanced, "b_text": o.text} for o in done])
    dropped = [{"b_id": o.attempt_id} for o in kept if o.release_reservation]
    if dropped:
        _ATTEMPT_DROP.run(connection, dropped)
    return {o.delivery_id for o in kept}


class LeaseRace(Exception):
    """A row's lease was lost while `finish_many` wrote its result (roll back, be careful)."""


_COUNT_SENT = Prepared(sa.update(account_state).where(account_state.c.name == sa.bindparam("b_name"))
               .values(sent=account_state.c.sent + sa.bindparam("b_sent", type_=sa.Integer),
                       failures=0, updated_at=sa.bindparam("b_now")))


def lock_in_order(connection: Connection, campaign_ids: Iterable[int],
                  account_names: Iterable[str]) -> None:
    """Lock the campaigns, then the accounts, a round of results will write, each in key
    order (PostgreSQL; SQLite transactions are serial already).

    Without it two workers' rounds take the same rows in the order their results came in,
    and deadlock: one holds account a1 and wants a2, the other holds a2 and wants a1.
    """
    if connection.dialect.name != "postgresql":
        return
    ids, names = sorted(set(campaign_ids)), sorted(set(account_names))
    if ids:
        connection.execute(sa.select(campaigns.c.id).where(campaigns.c.id.in_(ids))
                           .order_by(campaigns.c.id).with_for_update()).all()
    if names:
        connection.execute(sa.select(account_state.c.name).where(account_state.c.name.in_(names))
                           .order_by(account_state.c.name).with_for_update()).all()


def count_sent(connection: Connection, sent: dict[str, int], now: float) -> None:
    """Add messages sent to the accounts' counters; a success ends a failure streak."""
    if sent:
        _COUNT_SENT.run(connection, [{"b_name": name, "b_sent": count, "b_now": now}
                                         for name, count in sorted(sent.items())])
