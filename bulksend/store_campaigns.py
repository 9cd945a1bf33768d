"""SQL for campaigns: creating them, queueing their deliveries, moving their status, counting.

Like `store`, every function takes the caller's open connection (the caller owns the
transaction) and returns plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.errors import NotFound
from bulksend.models import (
    bounce_events,
    campaign_lists,
    campaigns,
    deliveries,
    list_members,
    lists,
    subscribers,
)
from bulksend.store import suppressed_condition


@dataclass(frozen=True)
class CampaignRow:
    """A campaign as stored."""

    id: int
    name: str
    subject: str
    html_template: str
    text_template: str | None
    from_address: str | None
    status: str
    send_at: float | None
    pause_reason: str | None
    no_dkim: bool
    settings: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    lists: tuple[str, ...]


_COLUMNS = (
    campaigns.c.id, campaigns.c.name, campaigns.c.subject, campaigns.c.html_template,
    campaigns.c.text_template, campaigns.c.from_address, campaigns.c.status,
    campaigns.c.send_at, campaigns.c.pause_reason, campaigns.c.no_dkim, campaigns.c.settings,
    campaigns.c.created_at, campaigns.c.started_at, campaigns.c.finished_at,
)


def _list_names(connection: Connection, campaign_id: int) -> tuple[str, ...]:
    rows = connection.execute(
        sa.select(lists.c.name).join(campaign_lists, campaign_lists.c.list_id == lists.c.id)
        .where(campaign_lists.c.campaign_id == campaign_id).order_by(lists.c.name)
    )
    return tuple(rows.scalars())


def campaign(connection: Connection, name: str, *, lock: bool = False) -> CampaignRow:
    """The campaign called `name`; NotFound otherwise. `lock` holds its row until commit."""
    query = sa.select(*_COLUMNS).where(campaigns.c.name == name)
    if lock and connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).first()
    if row is None:
        raise NotFound(f"campaign {name!r} does not exist")
    return CampaignRow(*row, lists=_list_names(connection, row.id))


def campaign_by_id(connection: Connection, campaign_id: int) -> CampaignRow:
    """The campaign with this id (the sender knows deliveries by campaign id)."""
    row = connection.execute(sa.select(*_COLUMNS).where(campaigns.c.id == campaign_id)).one()
    return CampaignRow(*row, lists=_list_names(connection, row.id))


def all_campaigns(connection: Connection) -> list[CampaignRow]:
    """Every campaign, newest first."""
    rows = connection.execute(sa.select(*_COLUMNS).order_by(campaigns.c.created_at.desc(),
                                                            campaigns.c.id.desc()))
    return [CampaignRow(*row, lists=_list_names(connection, row.id)) for row in rows]


def campaign_exists(connection: Connection, name: str) -> bool:
    """True if a campaign is called `name`."""
    found = connection.execute(sa.select(campaigns.c.id).where(campaigns.c.name == name)).first()
    return found is not None


def insert_campaign(connection: Connection, values: dict[str, Any], list_ids: Sequence[int]) -> int:
    """Store a new campaign and its lists; returns its id."""
    campaign_id = int(connection.execute(
        sa.insert(campaigns).values(**values).returning(campaigns.c.id)
    ).scalar_one())
    connection.execute(sa.insert(campaign_lists),
                       [{"campaign_id": campaign_id, "list_id": list_id} for list_id in list_ids])
    return campaign_id


def update_campaign(connection: Connection, campaign_id: int, **values: Any) -> None:
    """Set columns of one campaign."""
    connection.execute(sa.update(campaigns).where(campaigns.c.id == campaign_id).values(**values))


def attribute_keys(connection: Connection, list_ids: Sequence[int]) -> set[str]:
    """Every attribute name used by a member of these lists."""
    members = sa.select(list_members.c.subscriber_id).where(list_members.c.list_id.in_(list_ids))
    if connection.dialect.name == "postgresql":
        query = (sa.select(sa.func.json_object_keys(subscribers.c.attributes))
                 .where(subscribers.c.id.in_(members)).distinct())
    else:
        each = sa.func.json_each(subscribers.c.attributes).table_valued("key")
        query = (sa.select(each.c.key).select_from(subscribers).join(each, sa.true())
                 .where(subscribers.c.id.in_(members)).distinct())
    return set(connection.execute(query).scalars())


def audience(list_ids: Sequence[int]) -> sa.Select[Any]:
    """Subscribers on any of the lists with status subscribed, each address once."""
    members = (sa.select(list_members.c.subscriber_id)
               .where(list_members.c.list_id.in_(list_ids), list_members.c.status == "subscribed"))
    return (sa.select(subscribers.c.id, subscribers.c.email, subscribers.c.email_key)
            .where(subscribers.c.id.in_(members)))


def queue_deliveries(connection: Connection, campaign_id: int, list_ids: Sequence[int],
                     due: float, now: float) -> tuple[int, int]:
    """Queue one delivery per audience member in one statement; returns (queued, suppressed).

    A suppressed address gets a row in state `suppressed`, so the campaign's counts show
    who was left out and why.
    """
    people = audience(list_ids).subquery()
    state = sa.case((suppressed_condition(people.c.email_key), "suppressed"), else_="queued")
    connection.execute(deliveries.insert().from_select(
        ["campaign_id", "subscriber_id", "email", "email_key", "state", "next_attempt_at",
         "created_at", "updated_at"],
        sa.select(sa.literal(campaign_id), people.c.id, people.c.email, people.c.email_key,
                  state, sa.literal(due), sa.literal(now), sa.literal(now))
        .order_by(people.c.id),
    ))
    counts = state_counts(connection, campaign_id)
    return counts.get("queued", 0), counts.get("suppressed", 0)


def state_counts(connection: Connection, campaign_id: int) -> dict[str, int]:
    """Deliveries of a campaign per state."""
    rows = connection.execute(
        sa.select(deliveries.c.state, sa.func.count())
        .where(deliveries.c.campaign_id == campaign_id).group_by(deliveries.c.state)
    )
    return {state: count for state, count in rows}


def waiting_count(connection: Connection, campaign: str | None = None) -> int:
    """Deliveries not yet attempted to the end (queued, deferred, claimed) of live campaigns.

    What a `send` run has in front of it: the total of its progress bar.
    """
    live = sa.select(campaigns.c.id).where(campaigns.c.status.in_(("running", "scheduled")))
    if campaign is not None:
        live = live.where(campaigns.c.name == campaign)
    return connection.execute(
        sa.select(sa.func.count()).select_from(deliveries)
        .where(deliveries.c.state.in_(("queued", "deferred", "claimed")),
               deliveries.c.campaign_id.in_(live))
    ).scalar_one()


def sent_by_account(connection: Connection, campaign_id: int) -> dict[str, int]:
    """Messages of a campaign delivered through each account."""
    rows = connection.execute(
        sa.select(deliveries.c.account, sa.func.count())
        .where(deliveries.c.campaign_id == campaign_id, deliveries.c.state == "sent")
        .group_by(deliveries.c.account).order_by(deliveries.c.account)
    )
    return {account: count for account, count in rows if account is not None}


def event_counts(connection: Connection, campaign_id: int) -> dict[str, int]:
    """Distinct addresses per bounce-event kind (hard, complaint, unsubscribe, ...)."""
    rows = connection.execute(
        sa.select(bounce_events.c.kind, sa.func.count(sa.distinct(bounce_events.c.email_key)))
        .where(bounce_events.c.campaign_id == campaign_id).group_by(bounce_events.c.kind)
    )
    return {kind: count for kind, count in rows}


def cancel_pending(connection: Connection, campaign_id: int, now: float) -> int:
    """Cancel deliveries not yet handed to a server (queued, deferred, or claimed by a worker
    that has not committed `sending`: its lease goes, so it withholds the dot); returns how
    many."""
    result = connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.campaign_id == campaign_id,
               deliveries.c.state.in_(("queued", "deferred", "claimed")))
        .values(state="cancelled", lease_owner=None, lease_token=None, lease_expires_at=None,
                updated_at=now)
    )
    return result.rowcount


def delivery_for(connection: Connection, campaign_id: int, email_key: str) -> sa.Row[Any] | None:
    """The delivery of a campaign to one address (id and state), if it was queued."""
    return connection.execute(
        sa.select(deliveries.c.id, deliveries.c.state)
        .where(deliveries.c.campaign_id == campaign_id, deliveries.c.email_key == email_key)
    ).first()


def first_recipient(connection: Connection, list_ids: Sequence[int]) -> str | None:
    """The email key of the audience's first member (what preview shows by default)."""
    people = audience(list_ids).order_by(subscribers.c.id).limit(1)
    row = connection.execute(people).first()
    return None if row is None else row.email_key


def requeue(connection: Connection, campaign_id: int, states: Sequence[str], now: float) -> int:
    """Queue a campaign's deliveries in `states` again, due now; returns how many."""
    result = connection.execute(
        sa.update(deliveries)
        .where(deliveries.c.campaign_id == campaign_id, deliveries.c.state.in_(states))
        .values(state="queued", next_attempt_at=now, account=None, updated_at=now)
    )
    return result.rowcount
