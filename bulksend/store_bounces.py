"""SQL of the bounce policy and the guards: events, unsubscribes, rates, pausing.

Like `store`, every function takes the caller's open connection (the caller owns the
transaction) and returns plain values. Events are written with ON CONFLICT DO NOTHING on
their unique key (source_key, email_key, kind), so processing the same mail twice records,
and therefore counts, nothing the second time, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from bulksend.models import (
    account_state,
    bounce_events,
    campaign_lists,
    campaigns,
    deliveries,
    delivery_attempts,
    list_members,
    subscribers,
    suppressions,
)
from bulksend.store import _insert
from bulksend.store_sending import Prepared

PENDING = ("queued", "deferred", "claimed")  # not yet at the final dot: can still be stopped
HANDED_OVER = ("sent", "failed", "unknown")  # a server saw the message (or may have)


# --- resolving events to deliveries ----------------------------------------------------------


@dataclass(frozen=True)
class DeliveryRef:
    """The delivery an event is about."""

    id: int
    campaign_id: int
    subscriber_id: int
    email_key: str
    account: str | None


_REF = (deliveries.c.id, deliveries.c.campaign_id, deliveries.c.subscriber_id,
        deliveries.c.email_key, deliveries.c.account)
_DELIVERY = Prepared(sa.select(*_REF).where(deliveries.c.id == sa.bindparam("b_id")))


def delivery(connection: Connection, delivery_id: int) -> DeliveryRef | None:
    """The delivery with this id, if it (still) exists."""
    row = _DELIVERY.first(connection, {"b_id": delivery_id})
    return None if row is None else DeliveryRef(*row)


# Look-ups for a whole batch of events: one statement per CHUNK values, built once.
CHUNK = 500
_BY_IDS = sa.select(*_REF).where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)))
_NEWEST = sa.select(*_REF).where(deliveries.c.id.in_(
    sa.select(sa.func.max(deliveries.c.id))
    .where(deliveries.c.email_key.in_(sa.bindparam("keys", expanding=True)))
    .group_by(deliveries.c.email_key).scalar_subquery()))
_SUBSCRIBED = sa.select(subscribers.c.email_key).where(
    subscribers.c.email_key.in_(sa.bindparam("keys", expanding=True)))


def _chunks(values: Iterable[Any]) -> Iterator[list[Any]]:
    items = sorted(set(values))
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def deliveries_by_id(connection: Connection, delivery_ids: Iterable[int]) -> dict[int, DeliveryRef]:
    """Those of the deliveries that (still) exist, by id."""
    return {row.id: DeliveryRef(*row) for chunk in _chunks(delivery_ids)
            for row in connection.execute(_BY_IDS, {"ids": chunk})}


def newest_deliveries(connection: Connection, email_keys: Iterable[str]) -> dict[str, DeliveryRef]:
    """The latest delivery queued to each address that has one, by address key.

    What an untokened bounce most likely answers.
    """
    return {row.email_key: DeliveryRef(*row) for chunk in _chunks(email_keys)
            for row in connection.execute(_NEWEST, {"keys": chunk})}


def known_subscribers(connection: Connection, email_keys: Iterable[str]) -> set[str]:
    """Those of the addresses that are known subscribers."""
    return {key for chunk in _chunks(email_keys)
            for key in connection.execute(_SUBSCRIBED, {"keys": chunk}).scalars()}


# --- events -------------------------------------------------------------------------------------


def _insert_one(table: sa.Table, columns: Sequence[str], key: Sequence[str]
                ) -> dict[str, Prepared]:
    """Per dialect name: the INSERT of one row of `columns` that does nothing if `key` is taken."""
    inserts = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
    values = {column: sa.bindparam(column) for column in columns}
    return {name: Prepared(insert(table).values(values)
                           .on_conflict_do_nothing(index_elements=list(key)))
            for name, insert in inserts.items()}


_EVENT_KEY = ("source_key", "email_key", "kind")
_EVENT_COLUMNS = ("kind", "source", "source_key", "email_key", "delivery_id", "campaign_id",
                  "status", "diagnostic", "created_at")
_RECORD_ONE = _insert_one(bounce_events, _EVENT_COLUMNS, _EVENT_KEY)  # for `record_event`


def record_event(connection: Connection, *, kind: str, source: str, source_key: str,
                 email_key: str, delivery_id: int | None, campaign_id: int | None,
                 status: str | None, diagnostic: str | None, now: float) -> bool:
    """Record one event; False if this mail already recorded it (nothing is counted twice)."""
    return _RECORD_ONE[connection.dialect.name].run(connection, [{
        "kind": kind, "source": source, "source_key": source_key[:500], "email_key": email_key,
        "delivery_id": delivery_id, "campaign_id": campaign_id, "status": status,
        "diagnostic": diagnostic, "created_at": now,
    }]) == 1


_RECORD: dict[str, Any] = {}  # dialect name → the prebuilt INSERT of `record_events`


def record_events(connection: Connection, rows: Sequence[dict[str, Any]]
                  ) -> set[tuple[str, str, str]]:
    """Record events (the columns of `record_event`, source_key at most 500 characters).

    Returns the (source_key, email_key, kind) of those recorded now: a key already stored
    (or twice in `rows`) records nothing more, so the caller counts nothing twice.
    """
    if not rows:
        return set()
    name = connection.dialect.name
    if name not in _RECORD:
        _RECORD[name] = (_insert(connection, bounce_events)
                         .on_conflict_do_nothing(index_elements=list(_EVENT_KEY))
                         .returning(*(bounce_events.c[column] for column in _EVENT_KEY)))
    recorded: set[tuple[str, str, str]] = set()
    for start in range(0, len(rows), CHUNK):
        recorded.update(tuple(row) for row in connection.execute(_RECORD[name],
                                                                 list(rows[start:start + CHUNK])))
    return recorded


_SOFT_SINCE = (sa.select(bounce_events.c.email_key, sa.func.count())
               .where(bounce_events.c.email_key.in_(sa.bindparam("keys", expanding=True)),
                      bounce_events.c.kind == "soft",
                      bounce_events.c.created_at >= sa.bindparam("since"))
               .group_by(bounce_events.c.email_key))


def soft_bounce_counts(connection: Connection, email_keys: Iterable[str], since: float
                       ) -> dict[str, int]:
    """Soft bounces recorded for each address since `since` (each mail once; none: left out)."""
    return {key: count for chunk in _chunks(email_keys)
            for key, count in connection.execute(_SOFT_SINCE, {"keys": chunk, "since": since})}


_SUPPRESS: dict[str, Any] = {}  # dialect name → the prebuilt INSERT of `suppress_addresses`
_SUPPRESS_ONE = _insert_one(suppressions, ("email_key", "reason", "source", "created_at",
                                           "campaign_id"), ("email_key",))


def suppress_address(connection: Connection, entry: dict[str, Any]) -> bool:
    """Suppress one address (the keys of `suppress_addresses`); False if it already was."""
    return _SUPPRESS_ONE[connection.dialect.name].run(connection, [entry]) == 1


def suppress_addresses(connection: Connection, entries: Sequence[dict[str, Any]]) -> int:
    """Suppress addresses (email_key, reason, source, created_at, campaign_id); returns new ones.

    As `store.add_suppressions` for addresses, in one statement: an address already
    suppressed, or earlier in `entries`, keeps its first reason.
    """
    first: dict[str, dict[str, Any]] = {}
    for entry in entries:
        first.setdefault(entry["email_key"], entry)
    if not first:
        return 0
    name = connection.dialect.name
    if name not in _SUPPRESS:
        _SUPPRESS[name] = (_insert(connection, suppressions)
                           .on_conflict_do_nothing(index_elements=["email_key"])
                           .returning(suppressions.c.email_key))
    rows = list(first.values())
    return sum(len(connection.execute(_SUPPRESS[name], rows[start:start + CHUNK]).all())
               for start in range(0, len(rows), CHUNK))


# --- unsubscribes -------------------------------------------------------------------------------


_LISTS_OF_CAMPAIGN = (sa.select(campaign_lists.c.list_id)
                      .where(campaign_lists.c.campaign_id == sa.bindparam("b_campaign")))
_UNSUBSCRIBE = Prepared(
    sa.update(list_members)
    .where(list_members.c.subscriber_id == sa.bindparam("b_subscriber"),
           list_members.c.list_id.in_(_LISTS_OF_CAMPAIGN), list_members.c.status == "subscribed")
    .values(status="unsubscribed", updated_at=sa.bindparam("b_now"))
)


def unsubscribe_from_campaign_lists(connection: Connection, subscriber_id: int, campaign_id: int,
                                    now: float) -> int:
    """Set the subscriber's memberships of the campaign's lists to unsubscribed; returns changes."""
    return _UNSUBSCRIBE.run(connection, [{"b_subscriber": subscriber_id,
                                          "b_campaign": campaign_id, "b_now": now}])


def _pending_of_subscriber(everywhere: bool) -> list[sa.ColumnElement[bool]]:
    subscriber = sa.bindparam("b_subscriber")
    conditions = [
        # Every delivery carries its subscriber's address key, which never changes: the
        # key's index finds the subscriber's few rows (there is none on subscriber_id).
        deliveries.c.email_key == sa.bindparam("b_email_key"),
        deliveries.c.subscriber_id == subscriber,
        sa.or_(*(deliveries.c.state == state for state in PENDING)),  # no expanding IN
    ]
    if not everywhere:
        still_subscribed = sa.exists().where(
            campaign_lists.c.campaign_id == deliveries.c.campaign_id,
            list_members.c.list_id == campaign_lists.c.list_id,
            list_members.c.subscriber_id == subscriber,
            list_members.c.status == "subscribed",
        )
        conditions.append(sa.not_(still_subscribed))
    return conditions


# everywhere → the UPDATE that stops the pending deliveries, returning their campaigns
_PENDING = {
    everywhere: Prepared(
        sa.update(deliveries).where(*_pending_of_subscriber(everywhere))
        .values(state="suppressed", lease_owner=None, lease_token=None, lease_expires_at=None,
                updated_at=sa.bindparam("b_now"))
        .returning(deliveries.c.campaign_id)
    )
    for everywhere in (False, True)
}


def suppress_pending(connection: Connection, subscriber_id: int, email_key: str, now: float, *,
                     everywhere: bool) -> list[int]:
    """Stop the subscriber's deliveries that have not reached the final dot; returns campaigns.

    `email_key` is the subscriber's. `everywhere`: in every campaign (the address is
    suppressed); otherwise only in campaigns none of whose lists the subscriber is still
    subscribed to. A `claimed` row loses its lease too: the worker holding it cannot
    commit `sending`, so it never writes the dot.
    """
    rows = _PENDING[everywhere].all(connection, {"b_subscriber": subscriber_id,
                                                 "b_email_key": email_key, "b_now": now})
    return sorted({campaign_id for campaign_id, in rows})


# --- campaign guard -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveCampaign:
    """A campaign the guard may pause, and where its sample starts."""

    id: int
    name: str
    settings: dict[str, Any]

    @property
    def guard_since(self) -> float | None:
        """Only mail handed over since then counts (set by the guard's last pause)."""
        value = self.settings.get("guard_since")
        return None if value is None else float(value)


def live_campaigns(connection: Connection, campaign_ids: Sequence[int]) -> list[LiveCampaign]:
    """Those of the campaigns that are running or scheduled, by id."""
    if not campaign_ids:
        return []
    rows = connection.execute(
        sa.select(campaigns.c.id, campaigns.c.name, campaigns.c.settings)
        .where(campaigns.c.id.in_(sorted(set(campaign_ids))),
               campaigns.c.status.in_(("running", "scheduled")))
        .order_by(campaigns.c.id)
    )
    return [LiveCampaign(row.id, row.name, dict(row.settings)) for row in rows]


def _handed_over_since(since: float | None) -> sa.ColumnElement[bool]:
    """The delivery's result came at or after `since` (always true without one)."""
    if since is None:
        return sa.true()
    return sa.func.coalesce(deliveries.c.sent_at, deliveries.c.updated_at) >= since


def _hard_suppressed() -> sa.ColumnElement[bool]:
    """The delivery's address is suppressed as a hard bounce."""
    return sa.exists().where(suppressions.c.email_key == deliveries.c.email_key,
                             suppressions.c.reason == "hard_bounce")


def campaign_deliveries(connection: Connection, campaign_id: int, since: float | None,
                        states: Sequence[str], *, upto: int | None = None) -> int:
    """The campaign's deliveries in `states` whose result came since `since`.

    With `upto`, counting stops after upto + 1 rows: a guard only needs to know whether
    the total is small enough for its rate to trip, and a big campaign has a million rows.
    """
    rows = (sa.select(deliveries.c.id)
            .where(deliveries.c.campaign_id == campaign_id, deliveries.c.state.in_(states),
                   _handed_over_since(since)))
    if upto is not None:
        rows = rows.limit(upto + 1)
    return connection.execute(sa.select(sa.func.count()).select_from(rows.subquery())).scalar_one()


def _event_deliveries(campaign_id: int, kind: str, since: float | None) -> sa.Select[Any]:
    return (sa.select(bounce_events.c.delivery_id)
            .join(deliveries, deliveries.c.id == bounce_events.c.delivery_id)
            .where(bounce_events.c.campaign_id == campaign_id, bounce_events.c.kind == kind,
                   _handed_over_since(since)))


def campaign_complaints(connection: Connection, campaign_id: int, since: float | None) -> int:
    """Deliveries of the campaign (handed over since `since`) that drew a complaint."""
    found = _event_deliveries(campaign_id, "complaint", since).distinct().subquery()
    return connection.execute(sa.select(sa.func.count()).select_from(found)).scalar_one()


def campaign_hard_bounces(connection: Connection, campaign_id: int, since: float | None) -> int:
    """Deliveries of the campaign that bounced hard: by a DSN, or refused at SMTP time.

    The sender records an SMTP-time hard bounce as a `failed` delivery whose address it
    suppresses as `hard_bounce` (DESIGN §6); a DSN hard bounce is a `hard` event.
    """
    at_smtp = sa.select(deliveries.c.id).where(
        deliveries.c.campaign_id == campaign_id, deliveries.c.state == "failed",
        _hard_suppressed(), _handed_over_since(since))
    both = sa.union(_event_deliveries(campaign_id, "hard", since), at_smtp).subquery()
    return connection.execute(sa.select(sa.func.count()).select_from(both)).scalar_one()


def pause_campaign(connection: Connection, campaign: LiveCampaign, reason: str, now: float) -> bool:
    """Pause a running or scheduled campaign with `reason`; its next sample starts now."""
    settings = {**campaign.settings, "guard_since": now}
    return connection.execute(
        sa.update(campaigns)
        .where(campaigns.c.id == campaign.id, campaigns.c.status.in_(("running", "scheduled")))
        .values(status="paused", pause_reason=reason, settings=settings, updated_at=now)
    ).rowcount == 1


# --- account guard ------------------------------------------------------------------------------


def live_accounts(connection: Connection, names: Sequence[str]) -> dict[str, float | None]:
    """Those of the accounts that are not disabled: name → where their guard sample starts."""
    if not names:
        return {}
    rows = connection.execute(
        sa.select(account_state.c.name, account_state.c.guard_since)
        .where(account_state.c.name.in_(sorted(set(names))), account_state.c.state != "disabled")
        .order_by(account_state.c.name)
    )
    return {name: since for name, since in rows}


def _attempts_of(account: str, since: float) -> list[sa.ColumnElement[bool]]:
    return [delivery_attempts.c.account == account, delivery_attempts.c.reserved_at >= since]


def account_handed_over(connection: Connection, account: str, since: float) -> int:
    """Messages the account handed to its server (sent, failed or unknown) since `since`."""
    return connection.execute(
        sa.select(sa.func.count(sa.distinct(delivery_attempts.c.delivery_id)))
        .where(*_attempts_of(account, since), delivery_attempts.c.outcome.in_(HANDED_OVER))
    ).scalar_one()


def account_blocks(connection: Connection, account: str, since: float) -> int:
    """Messages of the account blocked by policy (5.7.x) since `since`.

    Either refused at SMTP time with a 5.7.x code (a `failed` attempt; Yandex's "5.7.1 No
    such user" is a hard bounce, told apart by the hard-bounce suppression the sender made),
    or accepted and then returned by a DSN the parser classified as a block.
    """
    smtp_block = sa.and_(
        delivery_attempts.c.outcome == "failed",
        delivery_attempts.c.smtp_enhanced.like("5.7.%"),
        sa.not_(_hard_suppressed()),
    )
    dsn_block = sa.and_(
        delivery_attempts.c.outcome == "sent",
        sa.exists().where(bounce_events.c.delivery_id == delivery_attempts.c.delivery_id,
                          bounce_events.c.kind == "block"),
    )
    return connection.execute(
        sa.select(sa.func.count(sa.distinct(delivery_attempts.c.delivery_id)))
        .select_from(delivery_attempts.join(deliveries,
                                            deliveries.c.id == delivery_attempts.c.delivery_id))
        .where(*_attempts_of(account, since), sa.or_(smtp_block, dsn_block))
    ).scalar_one()


def disable_account(connection: Connection, name: str, reason: str, now: float) -> bool:
    """Disable an account until `accounts enable`; its next sample starts now."""
    return connection.execute(
        sa.update(account_state)
        .where(account_state.c.name == name, account_state.c.state != "disabled")
        .values(state="disabled", until=None, reason=reason, last_error=reason,
                guard_since=now, updated_at=now)
    ).rowcount == 1
