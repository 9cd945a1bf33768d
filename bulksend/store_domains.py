"""SQL for dead-domain checks: the distinct domains a campaign is about to reach.

Like `store`, every function takes the caller's open connection and returns plain values.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.models import suppressions
from bulksend.store import domain_of
from bulksend.store_campaigns import audience


def _not_suppressed(domain: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
    # A domain suppressed already (for any reason) needs no lookup.
    return sa.not_(sa.exists().where(suppressions.c.domain == domain))


def audience_domains(connection: Connection, list_ids: Sequence[int]) -> list[str]:
    """Distinct domains of a campaign's audience that are not suppressed as a whole."""
    people = audience(list_ids).subquery()
    domain = domain_of(people.c.email_key).label("domain")
    query = sa.select(domain).where(_not_suppressed(domain)).distinct().order_by(domain)
    return list(connection.execute(query).scalars())

