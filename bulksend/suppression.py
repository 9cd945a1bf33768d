"""The suppression list: addresses and domains that are never mailed again.

It is global: checked when a campaign is queued and again right before RCPT. An entry is
an address (`bob@example.com`) or a whole domain (`@example.com`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from bulksend import db, importer, store
from bulksend.errors import AddressError, NotFound
from bulksend.models import SUPPRESSION_REASONS


@dataclass(frozen=True)
class Target:
    """What an argument of `suppress add/remove` names: one address or one domain."""

    email_key: str | None
    domain: str | None

    @property
    def label(self) -> str:
        """The entry as the user writes it."""
        return self.email_key or f"@{self.domain}"


def parse_target(value: str) -> Target:
    """`bob@example.com` → an address; `@example.com` → a domain; AddressError otherwise."""
    validator = importer.AddressValidator()
    cleaned = importer.strip_address(value)
    try:
        if cleaned.startswith("@"):
            return Target(None, validator.key(f"postmaster{cleaned}")[1])
        return Target(validator.key(cleaned)[0], None)
    except importer.InvalidAddress as exc:
        raise AddressError(f"invalid address {value!r}: {exc}") from None


def add(engine: Engine, values: list[str], *, reason: str, source: str, now: float) -> int:
    """Suppress addresses or domains; returns how many were not suppressed before."""
    if reason not in SUPPRESSION_REASONS:
        raise AddressError(f"reason {reason!r}: expected one of {', '.join(SUPPRESSION_REASONS)}")
    targets = [parse_target(value) for value in values]  # all valid, or nothing written
    entries = [
        {"email_key": t.email_key, "domain": t.domain, "reason": reason, "source": source,
         "created_at": now}
        for t in targets
    ]
    with db.transaction(engine) as connection:
        return store.add_suppressions(connection, entries)


def remove(engine: Engine, value: str) -> None:
    """Lift the suppression of an address or domain; NotFound if it was not suppressed."""
    target = parse_target(value)
    with db.transaction(engine) as connection:
        if not store.remove_suppression(connection, target.email_key, target.domain):
            raise NotFound(f"{target.label} is not on the suppression list")


def entries(engine: Engine) -> list[store.Suppression]:
    """The suppression list, newest first."""
    with db.reading(engine) as connection:
        return store.list_suppressions(connection)
