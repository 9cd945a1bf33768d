"""SQL for `bulksend serve`: what the unsubscribe page shows about a delivery, and a ping.

Like `store`, every function takes the caller's open connection and returns plain values.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.models import campaign_lists, deliveries, list_members, lists
from bulksend.store_bounces import DeliveryRef
from bulksend.store_sending import Prepared


@dataclass(frozen=True)
class PageView:
    """What the unsubscribe page of one delivery shows, and the delivery itself."""

    email: str  # the address the message went to
    list_names: tuple[str, ...]  # the campaign's lists this address is a member of
    delivery: DeliveryRef  # what a POST unsubscribes


_PAGE_VIEW = Prepared(  # built and compiled once: the server runs it for every request
    sa.select(deliveries.c.id, deliveries.c.campaign_id, deliveries.c.subscriber_id,
              deliveries.c.email_key, deliveries.c.account, deliveries.c.email, lists.c.name)
    .select_from(
        deliveries
        .outerjoin(campaign_lists, campaign_lists.c.campaign_id == deliveries.c.campaign_id)
        .outerjoin(list_members,
                   sa.and_(list_members.c.list_id == campaign_lists.c.list_id,
                           list_members.c.subscriber_id == deliveries.c.subscriber_id))
        .outerjoin(lists, lists.c.id == list_members.c.list_id)
    )
    .where(deliveries.c.id == sa.bindparam("delivery_id"))
    .order_by(lists.c.name)
)


def page_view(connection: Connection, delivery_id: int) -> PageView | None:
    """The page of delivery `delivery_id`, or None if there is no such delivery.

    One statement whether or not the delivery exists, so an id that finds nothing costs what
    an id that finds a row does.
    """
    rows = _PAGE_VIEW.all(connection, {"delivery_id": delivery_id})
    if not rows:
        return None
    first = rows[0]
    return PageView(first[5], tuple(row[6] for row in rows if row[6] is not None),
                    DeliveryRef(*first[:5]))


def ping(connection: Connection) -> None:
    """One round trip to the database (the health check); raises if it does not answer."""
    connection.execute(sa.select(sa.literal(1))).scalar_one()
