"""SQL of the send loop: accounts' state, claims with leases, the quota ledger, results.

The claim runs in one serialised transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the
accounts' `account_state` rows locked `FOR UPDATE`, due deliveries `FOR UPDATE SKIP
LOCKED`), so quota counts, rotation positions and leases are decided by one worker at a
time, however many run. Sending itself happens outside any transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.models import (
    TERMINAL_DELIVERY_STATES,
    account_state,
    campaigns,
    deliveries,
    delivery_attempts,
    subscribers,
)
from bulksend.store import _insert
from bulksend.store_sending import Prepared


@dataclass(frozen=True)
class AccountRow:
    """The stored state of one account."""

    name: str
    state: str
    until: float | None
    reason: str | None
    failures: int
    position: float | None  # rotation position; None before the account's first pick
    sent: int
    failed: int
    blocked: int
    last_error: str | None


def ensure_accounts(connection: Connection, names: Sequence[str], now: float) -> None:
    """Create missing `account_state` rows (new accounts in the config start active)."""
    if not names:
        return
    connection.execute(
        _insert(connection, account_state)
        .values([{"name": name, "state": "active", "updated_at": now, "rr_current": -1.0}
                 for name in names])
        .on_conflict_do_nothing(index_elements=["name"])
    )


def accounts(connection: Connection, names: Sequence[str], *, lock: bool = False
             ) -> dict[str, AccountRow]:
    """The state of these accounts; `lock` holds their rows (PostgreSQL) until commit."""
    query = sa.select(
        account_state.c.name, account_state.c.state, account_state.c.until,
        account_state.c.reason, account_state.c.failures, account_state.c.rr_current,
        account_state.c.sent, account_state.c.failed, account_state.c.blocked,
        account_state.c.last_error,
    ).where(account_state.c.name.in_(names)).order_by(account_state.c.name)
    if lock and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    rows = {}
    for row in connection.execute(query):
        # -1 marks "never picked" (the column is NOT NULL); positions are never negative.
        position = None if row.rr_current < 0 else row.rr_current
        rows[row.name] = AccountRow(row.name, row.state, row.until, row.reason, row.failures,
                                    position, row.sent, row.failed, row.blocked, row.last_error)
    return rows


def set_account(connection: Connection, name: str, now: float, **values: Any) -> None:
    """Update one account's state row."""
    connection.execute(sa.update(account_state).where(account_state.c.name == name)
                       .values(updated_at=now, **values))


_SAVE_POSITION = Prepared(sa.update(account_state).where(account_state.c.name == sa.bindparam("b_name"))
                  .values(rr_current=sa.bindparam("b_position"), updated_at=sa.bindparam("b_now")))


def save_positions(connection: Connection, positions: dict[str, float], now: float) -> None:
    """Store the rotation position of every account (one executemany)."""
    if positions:
        _SAVE_POSITION.run(connection, [{"b_name": name, "b_position": position, "b_now": now}
                                            for name, position in positions.items()])


def reservations(connection: Connection, names: Sequence[str], since: float) -> dict[str, list[float]]:
    """Reservation times per account since `since` (the quota ledger)."""
    found: dict[str, list[float]] = {name: [] for name in names}
    rows = connection.execute(
        sa.select(delivery_attempts.c.account, delivery_attempts.c.reserved_at)
        .where(delivery_attempts.c.account.in_(names), delivery_attempts.c.reserved_at >= since)
    )
    for account, reserved_at in rows:
        found[account].append(reserved_at)
    return found


def recover_expired(connection: Connection, now: float) -> tuple[int, int]:
    """Deal with leases of dead workers; returns (requeued, unknown).

    A `claimed` row never got its final dot: back to `queued`. A `sending` row may have been
    delivered (the worker died around the dot): `unknown`, never resent automatically. As
    `unknown` is terminal, a campaign whose last open delivery this was is finished here.
    """
    expired = sa.and_(deliveries.c.lease_expires_at.is_not(None),
                      deliveries.c.lease_expires_at < now)
    clear = {"lease_owner": None, "lease_token": None, "lease_expires_at": None, "updated_at": now}
    requeued = connection.execute(
        sa.update(deliveries).where(deliveries.c.state == "claimed", expired)
        .values(state="queued", **clear)
    ).rowcount
    stranded = sa.and_(deliveries.c.state == "sending", expired)
    affected = list(connection.execute(
        sa.select(deliveries.c.campaign_id).where(stranded).distinct()).scalars())
    unknown = connection.execute(
        sa.update(deliveries).where(stranded)
        .values(state="unknown", smtp_text="the worker stopped after committing the final dot",
                **clear)
    ).rowcount
    finish_campaigns(connection, affected, now)
    return requeued, unknown


def start_due_campaigns(connection: Connection, now: float) -> None:
    """Scheduled campaigns whose time has come are running now."""
    connection.execute(
        sa.update(campaigns)
        .where(campaigns.c.status == "scheduled", campaigns.c.send_at <= now)
        .values(status="running", updated_at=now)
    )


@dataclass(frozen=True)
class Due:
    """A delivery ready to be claimed, with what its message and its retry need."""

    id: int
    campaign_id: int
    email: str
    email_key: str
    attempts: int
    created_at: float
    name: str
    attributes: dict[str, Any]


def due_deliveries(connection: Connection, now: float, limit: int,
                   campaign_id: int | None = None) -> list[Due]:
    """Queued or deferred deliveries of running campaigns whose time has come, oldest first."""
    running = sa.select(campaigns.c.id).where(campaigns.c.status == "running")
    if campaign_id is not None:
        running = running.where(campaigns.c.id == campaign_id)
    query = (
        sa.select(deliveries.c.id, deliveries.c.campaign_id, deliveries.c.email,
                  deliveries.c.email_key, deliveries.c.attempts, deliveries.c.created_at,
                  subscribers.c.name, subscribers.c.attributes)
        .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
        .where(deliveries.c.state.in_(("queued", "deferred")),
               deliveries.c.next_attempt_at <= now,
               deliveries.c.campaign_id.in_(running))
        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=deliveries)
    return [Due(*row) for row in connection.execute(query)]


def next_due(connection: Connection, campaign_id: int | None = None) -> float | None:
    """When the earliest waiting delivery of a running or scheduled campaign becomes due."""
    live = sa.select(campaigns.c.id).where(campaigns.c.status.in_(("running", "scheduled")))
    if campaign_id is not None:
        live = live.where(campaigns.c.id == campaign_id)
    return connection.execute(
        sa.select(sa.func.min(deliveries.c.next_attempt_at))
        .where(deliveries.c.state.in_(("queued", "deferred")),
               deliveries.c.campaign_id.in_(live))
    ).scalar()


def in_flight(connection: Connection, campaign_id: int | None = None) -> int:
    """Deliveries some worker holds a lease on (claimed or sending)."""
    query = sa.select(sa.func.count()).where(deliveries.c.state.in_(("claimed", "sending")))
    if campaign_id is not None:
        query = query.where(deliveries.c.campaign_id == campaign_id)
    return connection.execute(query).scalar_one()


# Built once (see store_sending): the claim runs for hundreds of rows at a time.
_CLAIM = Prepared(sa.update(deliveries).where(deliveries.c.id == sa.bindparam("b_id"))
          .values(state="claimed", account=sa.bindparam("b_account"),
                  lease_owner=sa.bindparam("b_owner"), lease_token=sa.bindparam("b_token"),
                  lease_expires_at=sa.bindparam("b_expires"), updated_at=sa.bindparam("b_now")))
_RESERVE = sa.insert(delivery_attempts).returning(
    delivery_attempts.c.delivery_id, delivery_attempts.c.id, sort_by_parameter_order=True)


def claim(connection: Connection, assignments: Iterable[tuple[int, str]], owner: str,
          token: str, now: float, lease: float) -> dict[int, int]:
    """Lease deliveries to this worker for their accounts and reserve quota on each.

    Returns delivery id → the id of its reservation (the attempt row this claim inserted).
    """
    assignments = list(assignments)
    if not assignments:
        return {}
    _CLAIM.run(connection, [
        {"b_id": delivery_id, "b_account": account, "b_owner": owner, "b_token": token,
         "b_expires": now + lease, "b_now": now}
        for delivery_id, account in assignments
    ])
    rows = connection.execute(_RESERVE, [
        {"delivery_id": delivery_id, "account": account, "reserved_at": now}
        for delivery_id, account in assignments
    ])
    return {delivery_id: attempt_id for delivery_id, attempt_id in rows}


def finish(connection: Connection, delivery_id: int, token: str, now: float, *, state: str,
           next_attempt_at: float | None = None, count_attempt: bool = True,
           code: int | None = None, enhanced: str | None = None, text: str | None = None,
           message_id: str | None = None, release_reservation: bool = False) -> bool:
    """Record the result of one attempt; False if the lease was lost meanwhile."""
    values: dict[str, Any] = {
        "state": state, "smtp_code": code, "smtp_enhanced": enhanced, "smtp_text": text,
        "lease_owner": None, "lease_token": None, "lease_expires_at": None, "updated_at": now,
    }
    if count_attempt:
        values["attempts"] = deliveries.c.attempts + 1
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    if state == "sent":
        values["sent_at"] = now
    if message_id is not None:
        values["message_id"] = message_id
    if state in ("queued", "deferred") and release_reservation:
        values["account"] = None
    result = connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.id == delivery_id, deliveries.c.lease_token == token,
               deliveries.c.state.in_(("claimed", "sending")))
        .values(**values)
    )
    if result.rowcount != 1:
        return False  # the lease is gone: the row, and its latest attempt, are not ours
    # Our lease held, so the delivery's latest attempt row is the one this worker reserved.
    attempt = (sa.select(sa.func.max(delivery_attempts.c.id))
               .where(delivery_attempts.c.delivery_id == delivery_id).scalar_subquery())
    if release_reservation:
        connection.execute(sa.delete(delivery_attempts).where(delivery_attempts.c.id == attempt))
    else:
        connection.execute(
            sa.update(delivery_attempts).where(delivery_attempts.c.id == attempt)
            .values(finished_at=now, outcome=state, smtp_code=code, smtp_enhanced=enhanced,
                    smtp_text=text)
        )
    return True


def release_claims(connection: Connection, token: str, now: float) -> int:
    """Give back deliveries this worker claimed but never started (shutdown, dead account)."""
    mine = sa.select(deliveries.c.id).where(deliveries.c.lease_token == token,
                                            deliveries.c.state == "claimed")
    return requeue(connection, list(connection.execute(mine).scalars()), token, now)


def requeue(connection: Connection, delivery_ids: Iterable[int], token: str, now: float) -> int:
    """Put claims that never reached MAIL FROM back in the queue, their quota released.

    Rows whose lease this worker lost are left alone; returns how many went back.
    """
    return sum(finish(connection, delivery_id, token, now, state="queued", count_attempt=False,
                      release_reservation=True)
               for delivery_id in delivery_ids)


_WAITING = Prepared(sa.select(deliveries.c.id)
            .where(deliveries.c.campaign_id == sa.bindparam("b_campaign"),
                   # not in_(): Prepared statements have no expanding IN
                   sa.or_(deliveries.c.state == "queued", deliveries.c.state == "deferred"))
            .limit(1))
_OPEN = Prepared(sa.select(deliveries.c.id)
         .where(deliveries.c.campaign_id == sa.bindparam("b_campaign"),
                *(deliveries.c.state != state for state in TERMINAL_DELIVERY_STATES))
         .limit(1))


def finish_campaigns(connection: Connection, campaign_ids: Iterable[int], now: float) -> list[int]:
    """Mark running campaigns whose every delivery is terminal as finished; returns them.

    Near the end the campaign's row is locked before its deliveries are counted
    (PostgreSQL; SQLite transactions are serial already): two workers committing the last
    two results at once would otherwise each still see the other's row open, and neither
    would finish it. Callers lock in the order deliveries, campaigns, account_state.
    """
    done = []
    for campaign_id in sorted(set(campaign_ids)):
        waiting = _WAITING.first(connection, {"b_campaign": campaign_id})
        if waiting is not None:
            continue  # not the end: the result of that delivery comes by here again
        connection.execute(sa.select(campaigns.c.id).where(campaigns.c.id == campaign_id)
                           .with_for_update())
        if _OPEN.first(connection, {"b_campaign": campaign_id}) is None:
            changed = connection.execute(
                sa.update(campaigns).where(campaigns.c.id == campaign_id,
                                           campaigns.c.status == "running")
                .values(status="finished", finished_at=now, updated_at=now)
            ).rowcount
            if changed:
                done.append(campaign_id)
    return done


def bump_counters(connection: Connection, account: str, now: float, *, sent: int = 0,
                  failed: int = 0, blocked: int = 0) -> None:
    """Add to an account's lifetime counters."""
    connection.execute(
        sa.update(account_state).where(account_state.c.name == account).values(
            sent=account_state.c.sent + sent, failed=account_state.c.failed + failed,
            blocked=account_state.c.blocked + blocked, updated_at=now)
    )
