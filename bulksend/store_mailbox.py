"""SQL for the POP3 reader's memory: which UIDLs of a maildrop were already dealt with.

POP3 has no flags, so `mailbox_seen` remembers every message the reader finished with. A
processed message is recorded under the maildrop's key (`user@host:port`) in the same
transaction as its result, and deleted from the server after the commit; one that could not
be processed stays on the server and is recorded under the key plus `KEPT_SUFFIX`, so it is
neither counted again nor deleted. Like `store`, every function takes the caller's open
connection and returns plain values.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.models import mailbox_seen
from bulksend.store import _insert

KEPT_SUFFIX = "#kept"


def seen(connection: Connection, mailbox: str) -> tuple[set[str], set[str]]:
    """(processed, kept) UIDLs recorded for `mailbox`."""
    rows = connection.execute(
        sa.select(mailbox_seen.c.mailbox, mailbox_seen.c.uid)
        .where(mailbox_seen.c.mailbox.in_((mailbox, mailbox + KEPT_SUFFIX)))
    )
    processed: set[str] = set()
    kept: set[str] = set()
    for key, uid in rows:
        (kept if key.endswith(KEPT_SUFFIX) else processed).add(uid)
    return processed, kept


def remember(connection: Connection, mailbox: str, uid: str, *, kept: bool, now: float) -> bool:
    """Record one UIDL as dealt with; False if it already was (another reader got there first)."""
    key = mailbox + KEPT_SUFFIX if kept else mailbox
    result = connection.execute(
        _insert(connection, mailbox_seen).values(mailbox=key, uid=uid, processed_at=now)
        .on_conflict_do_nothing(index_elements=["mailbox", "uid"])
    )
    return result.rowcount == 1


def forget_gone(connection: Connection, mailbox: str, present: Iterable[str]) -> int:
    """Drop the records of messages no longer on the server; returns how many."""
    keep = set(present)
    rows = connection.execute(
        sa.select(mailbox_seen.c.mailbox, mailbox_seen.c.uid)
        .where(mailbox_seen.c.mailbox.in_((mailbox, mailbox + KEPT_SUFFIX)))
    ).all()
    gone = [(key, uid) for key, uid in rows if uid not in keep]
    for key, uid in gone:
        connection.execute(sa.delete(mailbox_seen).where(
            mailbox_seen.c.mailbox == key, mailbox_seen.c.uid == uid))
    return len(gone)
