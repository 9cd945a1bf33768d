"""The suppression list, and the policy that feeds it from bounces, complaints and unsubscribes.

The list is global: checked when a campaign is queued and again right before RCPT. An entry
is an address (`bob@example.com`) or a whole domain (`@example.com`).

`apply_report` turns one incoming mail's parsed report into changes (DESIGN §8), in one
transaction; `apply_reports` does the same for a batch of mails (what the bounce processor
commits at once), a few statements per batch rather than per event:

    hard, complaint   recorded; the address suppressed at once (hard_bounce, complaint)
    soft              recorded; `soft_bounce_limit` of them within `soft_bounce_window`
                      suppress the address (hard_bounce)
    block             recorded; never suppresses; counts toward the account's block rate
    delayed           recorded (a delay warning); never suppresses, not a soft bounce; a
                      mail of only delay warnings counts as ignored
    unsubscribe       `unsubscribe(scope="lists")`
    then              the guards, once, for the campaigns and accounts the events touched

Each event is tied to a delivery: the id its token carried if that delivery exists, else the
newest delivery to the reported address. An event tied to no delivery is still recorded;
it suppresses only an address that is a known subscriber (a forged bounce naming a stranger
changes nothing). Events are unique per (mail, address, kind): processing a mail again
records and counts nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine

from bulksend import db, guards, importer, store, store_bounces, store_deliveries
from bulksend.config import BouncesConfig
from bulksend.errors import AddressError, NotFound
from bulksend.models import SUPPRESSION_REASONS
from bulksend.store_bounces import DeliveryRef

if TYPE_CHECKING:
    from bulksend import bounces

UNSUBSCRIBE_SCOPES = ("lists", "all")
COUNTED = {"hard": "hard", "soft": "soft", "complaint": "complaints"}  # kind → Counts field


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


# --- the bounce policy -----------------------------------------------------------------------


@dataclass
class Counts:
    """What processing incoming mail did: the JSON of `bounces fetch|import` (DESIGN §9)."""

    messages: int = 0
    hard: int = 0
    soft: int = 0
    complaints: int = 0
    unsubscribes: int = 0
    ignored: int = 0
    quarantined: int = 0
    suppressed: int = 0

    def add(self, other: Counts) -> None:
        """Add another run's or message's counts to these."""
        for name in self.to_json():
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, int]:
        """Exactly the keys DESIGN §9 lists, in its order."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BouncePolicy:
    """When soft bounces suppress an address: `soft_bounce_limit` of them within the window."""

    soft_bounce_limit: int = 3
    soft_bounce_window: float = 30 * 86400

    @classmethod
    def from_config(cls, config: BouncesConfig | None) -> BouncePolicy:
        """The policy of [bounces]; the defaults when the section is absent."""
        if config is None:
            return cls()
        return cls(config.soft_bounce_limit, float(config.soft_bounce_window))


@dataclass
class _Touched:
    """What the events of a batch reached: who the guards look at, what may be finished."""

    campaigns: set[int] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)
    finishing: set[int] = field(default_factory=set)


@dataclass
class _Item:
    """One event of a batch, tied to its delivery and address, with what recording it did."""

    event: bounces.Event
    source_key: str
    ref: DeliveryRef | None
    email_key: str | None
    recorded: bool = False


@contextmanager
def _connection(target: Engine | Connection) -> Iterator[Connection]:
    """The caller's connection (its transaction), or a new transaction on an engine."""
    if isinstance(target, Connection):
        yield target
        return
    with db.transaction(target) as connection:
        yield connection


def apply_report(target: Engine | Connection, report: bounces.Report, *, source_key: str,
                 now: float, policy: BouncePolicy) -> Counts:
    """Apply one incoming mail's report: record, suppress, unsubscribe, then run the guards.

    `target` is an engine (a transaction is opened) or the caller's connection, so the
    caller can commit the mailbox's own bookkeeping in the same transaction.
    """
    return apply_reports(target, [(report, source_key)], now=now, policy=policy)


def apply_reports(target: Engine | Connection, reports: Sequence[tuple[bounces.Report, str]], *,
                  now: float, policy: BouncePolicy) -> Counts:
    """Apply a batch of mails' reports, each with its source key, in one transaction.

    The same as `apply_report` for each in turn, with the work done per batch: deliveries
    and subscribers looked up, events recorded and addresses suppressed a statement at a
    time for the whole batch, and the guards run once for everything the batch touched.
    A mail that carries only delay warnings counts as ignored; its warnings are recorded.
    """
    counts = Counts(messages=len(reports))
    pending: list[tuple[bounces.Event, str]] = []
    for report, source_key in reports:
        if report.ignored is not None or not report.events:
            counts.ignored += 1
            continue
        if all(event.kind == "delayed" for event in report.events):
            counts.ignored += 1  # a warning: recorded, but nothing is done about it
        pending.extend((event, source_key) for event in report.events)
    if not pending:
        return counts
    touched = _Touched()
    with _connection(target) as connection:
        items = _resolve(connection, pending)
        _record(connection, [item for item in items if item.event.kind != "unsubscribe"], now)
        for item in items:
            if item.event.kind == "unsubscribe" and item.ref is not None:
                changed, affected = _unsubscribe(connection, item.ref, "lists", item.event.source,
                                                 now, item.source_key)
                counts.unsubscribes += int(changed)
                touched.finishing.update(affected)
        _count_and_suppress(connection, items, now, policy, counts, touched)
        # Lock order as in the sender: deliveries (above), then campaigns, then accounts.
        store_deliveries.finish_campaigns(connection, touched.finishing, now)
        guards.check(connection, sorted(touched.campaigns), sorted(touched.accounts), now)
    return counts


def _resolve(connection: Connection, pending: list[tuple[bounces.Event, str]]) -> list[_Item]:
    """Tie each event to its delivery and address key, in two look-ups for the whole batch.

    The delivery its token names, if that delivery exists; else the newest delivery to the
    reported address. The address key is the delivery's, else the reported address's.
    """
    by_id = store_bounces.deliveries_by_id(
        connection, {event.delivery_id for event, _ in pending if event.delivery_id is not None})
    keys: dict[str, str | None] = {}
    items = []
    for event, source_key in pending:
        ref = by_id.get(event.delivery_id) if event.delivery_id is not None else None
        if ref is not None:
            items.append(_Item(event, source_key, ref, ref.email_key))
            continue
        if event.email and event.email not in keys:
            keys[event.email] = _address_key(event.email)
        items.append(_Item(event, source_key, None, keys.get(event.email) if event.email else None))
    newest = store_bounces.newest_deliveries(
        connection, {item.email_key for item in items if item.ref is None and item.email_key})
    for item in items:
        if item.ref is None and item.email_key is not None:
            item.ref = newest.get(item.email_key)
    return items


def _address_key(address: str) -> str | None:
    try:
        return importer.address_key(address)
    except AddressError:
        return None


def _record(connection: Connection, items: list[_Item], now: float) -> None:
    """Record the events; an item is `recorded` only the first time its mail is processed."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    first: dict[tuple[str, str, str], _Item] = {}
    for item in items:
        event, ref = item.event, item.ref
        key = (item.source_key[:500], item.email_key or "", event.kind)
        if key in rows:
            continue  # the same mail twice in one batch: the second records nothing
        first[key] = item
        rows[key] = {
            "kind": event.kind, "source": event.source, "source_key": key[0], "email_key": key[1],
            "delivery_id": ref.id if ref else None, "campaign_id": ref.campaign_id if ref else None,
            "status": event.status[:20] if event.status else None,
            "diagnostic": event.diagnostic, "created_at": now,
        }
    for key in store_bounces.record_events(connection, list(rows.values())):
        first[key].recorded = True


def _count_and_suppress(connection: Connection, items: list[_Item], now: float,
                        policy: BouncePolicy, counts: Counts, touched: _Touched) -> None:
    """Count the newly recorded events and suppress what they call for, in event order.

    hard, complaint suppress at once; soft once `soft_bounce_limit` of them (this batch's
    included, in order) fall within the window; block, delayed, unknown only feed the
    guards or are kept. An event tied to no delivery suppresses only a known subscriber.
    """
    fresh = [item for item in items if item.recorded]
    strangers = store_bounces.known_subscribers(connection, {
        item.email_key for item in fresh if item.ref is None and item.email_key is not None
        and item.event.kind in ("hard", "complaint", "soft")})
    softs = {item.email_key for item in fresh if item.event.kind == "soft" and item.email_key}
    since = now - policy.soft_bounce_window
    soft_before = store_bounces.soft_bounce_counts(connection, softs, since)
    for item in fresh:
        if item.event.kind == "soft" and item.email_key:
            soft_before[item.email_key] -= 1  # what was stored before this batch's ones
    entries = []
    for item in fresh:
        kind, email_key, ref = item.event.kind, item.email_key, item.ref
        if kind in COUNTED:
            setattr(counts, COUNTED[kind], getattr(counts, COUNTED[kind]) + 1)
        if kind == "soft" and email_key:
            soft_before[email_key] += 1  # the soft bounces stored up to this one
        known = ref is not None or email_key in strangers
        if email_key is not None and known:  # a forged bounce naming a stranger changes nothing
            entry = _suppression_for(item, soft_before.get(email_key, 0), now, policy)
            if entry is not None:
                entries.append(entry)
        if ref is not None and kind in ("hard", "complaint"):
            touched.campaigns.add(ref.campaign_id)
        if ref is not None and ref.account is not None and kind == "block":
            touched.accounts.add(ref.account)
    counts.suppressed += store_bounces.suppress_addresses(connection, entries)


def _suppression_for(item: _Item, soft_bounces: int, now: float,
                     policy: BouncePolicy) -> dict[str, Any] | None:
    """The suppression a newly recorded event calls for, or None.

    `soft_bounces`: the address's soft bounces within the window, up to this event.
    """
    event, email_key = item.event, item.email_key
    assert email_key is not None
    why = " ".join(part for part in (event.source, event.status, event.diagnostic) if part)
    if event.kind == "hard":
        return _entry(email_key, "hard_bounce", why, item.ref, now)
    if event.kind == "complaint":
        return _entry(email_key, "complaint", why, item.ref, now)
    if event.kind == "soft" and soft_bounces >= policy.soft_bounce_limit:
        why = (f"{policy.soft_bounce_limit} soft bounces within "
               f"{policy.soft_bounce_window / 86400:g} days")
        return _entry(email_key, "hard_bounce", why, item.ref, now)
    return None  # block, delayed, unknown: recorded only


def _entry(email_key: str, reason: str, why: str, ref: DeliveryRef | None,
           now: float) -> dict[str, Any]:
    """A suppression of an address (its first reason stays)."""
    return {"email_key": email_key, "reason": reason, "source": why[:500], "created_at": now,
            "campaign_id": ref.campaign_id if ref else None}


# --- unsubscribes -----------------------------------------------------------------------------


def unsubscribe(target: Engine | Connection, delivery_id: int, *, scope: str, source: str,
                now: float, source_key: str) -> bool:
    """Unsubscribe a delivery's recipient; False when there was nothing left to do.

    scope "lists": from the lists of the delivery's campaign. "all": also suppressed
    (reason unsubscribe), so no campaign mails the address again. Either way, every
    delivery to the subscriber not yet at its final dot (queued, deferred, claimed) in a
    campaign the address may no longer receive becomes `suppressed`, its lease cleared: a
    worker holding the claim then fails its lease-conditioned `sending` commit and drops
    the connection instead of writing the dot. One `unsubscribe` event is recorded when
    anything changed. NotFound if the delivery does not exist.
    """
    if scope not in UNSUBSCRIBE_SCOPES:
        raise ValueError(f"unsubscribe scope {scope!r}: expected lists or all")
    with _connection(target) as connection:
        ref = store_bounces.delivery(connection, delivery_id)
        if ref is None:
            raise NotFound(f"delivery {delivery_id} does not exist")
        return unsubscribe_delivery(connection, ref, scope=scope, source=source, now=now,
                                    source_key=source_key)


def unsubscribe_delivery(connection: Connection, ref: DeliveryRef, *, scope: str, source: str,
                         now: float, source_key: str) -> bool:
    """`unsubscribe` for a delivery the caller has just read in this transaction."""
    if scope not in UNSUBSCRIBE_SCOPES:
        raise ValueError(f"unsubscribe scope {scope!r}: expected lists or all")
    changed, affected = _unsubscribe(connection, ref, scope, source, now, source_key)
    store_deliveries.finish_campaigns(connection, affected, now)
    return changed


def _unsubscribe(connection: Connection, ref: DeliveryRef, scope: str, source: str, now: float,
                 source_key: str) -> tuple[bool, list[int]]:
    """Unsubscribe without finishing campaigns; (anything changed, campaigns whose rows changed)."""
    changed = store_bounces.unsubscribe_from_campaign_lists(
        connection, ref.subscriber_id, ref.campaign_id, now) > 0
    if scope == "all":
        changed |= store_bounces.suppress_address(
            connection, _entry(ref.email_key, "unsubscribe", f"{source} unsubscribe", ref, now))
    affected = store_bounces.suppress_pending(connection, ref.subscriber_id, ref.email_key, now,
                                              everywhere=scope == "all")
    changed |= bool(affected)
    if changed:
        store_bounces.record_event(
            connection, kind="unsubscribe", source=source, source_key=source_key,
            email_key=ref.email_key, delivery_id=ref.id, campaign_id=ref.campaign_id,
            status=None, diagnostic=f"scope {scope}", now=now)
    return changed, affected
