"""Guards: a campaign or an account that is hurting the sender's reputation stops itself.

    campaign  complaints     reach 0.3 %  of ≥ 1,000 deliveries sent          → paused
    campaign  hard bounces   reach 5 %    of ≥ 200 deliveries handed over      → paused
    account   5.7.x blocks   pass 2 %     of ≥ 100 messages handed over in the
                                          last 7 days                          → disabled

"Handed over": sent, failed or unknown; a hard bounce is a DSN `hard` event or a refusal at
SMTP time that suppressed the address; a block is a DSN `block` event or a 5.7.x refusal
at SMTP time (DESIGN §6, §8). The trip's reason is recorded as the campaign's
`pause_reason` or the account's `reason`, e.g.
"complaints 0.35% over 2,000 deliveries (limit 0.3%)".

Only a person brings them back: `campaign resume`, `accounts enable`. A trip also records
where the next sample starts (the campaign's `settings["guard_since"]`, the account's
`guard_since`): after a resume the guard judges only mail handed over since the trip. It
trips again when a full new sample (1,000 / 200 / 100 messages) reaches the limit again,
not at the next complaint about mail the operator has already seen and chose to resume
after; such late events are still recorded and counted by `campaign show`.

Only running or scheduled campaigns are paused: a finished one has nothing left to stop and
one paused by hand keeps its own reason. `check` runs inside the caller's transaction,
after the events or results it should see are written: `suppression.apply_reports` calls
it once per committed batch of bounce mail, and so can the sender after recording results.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass
from fractions import Fraction

from sqlalchemy.engine import Connection

from bulksend import store_bounces


@dataclass(frozen=True)
class Threshold:
    """A rate limit over a minimum sample: trips at `rate`, or only above it when `strict`."""

    what: str  # names the count in the reason: "complaints"
    rate: Fraction
    minimum: int
    strict: bool = False

    def trips(self, count: int, total: int) -> bool:
        """True when `count` of `total` is at (or past) the limit over a large enough sample."""
        if total < max(self.minimum, 1):
            return False
        ratio = Fraction(count, total)
        return ratio > self.rate if self.strict else ratio >= self.rate

    def could_trip(self, count: int) -> bool:
        """False when `count` is too few for any sample: the total need not be counted."""
        return self.trips(count, self.minimum)

    def largest_total(self, count: int) -> int:
        """The largest total over which `count` still trips: counting stops past it."""
        bound = Fraction(count) / self.rate
        return math.ceil(bound) - 1 if self.strict else math.floor(bound)

    def reason(self, count: int, total: int, unit: str) -> str:
        """"complaints 0.35% over 2,000 deliveries (limit 0.3%)"."""
        return (f"{self.what} {_percent(Fraction(count, total))} over {total:,} {unit} "
                f"(limit {_percent(self.rate)})")


def _percent(value: Fraction) -> str:
    # Three decimals: 401 of 20,000 reads 2.005%, not a "2%" that seems not to pass 2 %.
    return f"{float(value * 100):.3f}".rstrip("0").rstrip(".") + "%"


@dataclass(frozen=True)
class GuardLimits:
    """The limits of DESIGN §8, as values a test or a future config can replace."""

    complaints: Threshold = Threshold("complaints", Fraction(3, 1000), 1000)
    hard_bounces: Threshold = Threshold("hard bounces", Fraction(5, 100), 200)
    blocks: Threshold = Threshold("5.7.x blocks", Fraction(2, 100), 100, strict=True)
    block_window: float = 7 * 86400  # the account's recent mail, not its whole life


LIMITS = GuardLimits()


@dataclass(frozen=True)
class Trip:
    """A guard that fired: what it stopped and why."""

    kind: str  # "campaign" (paused) | "account" (disabled)
    name: str
    reason: str


def check(connection: Connection, campaign_ids: Sequence[int], account_names: Sequence[str],
          now: float, *, limits: GuardLimits = LIMITS) -> list[Trip]:
    """Pause the campaigns and disable the accounts whose rates reached their limits."""
    trips: list[Trip] = []
    if not campaign_ids and not account_names:
        return trips  # the common case of a bounce run: soft bounces, unsubscribes
    for campaign in store_bounces.live_campaigns(connection, campaign_ids):
        reason = campaign_reason(connection, campaign, limits)
        if reason is not None and store_bounces.pause_campaign(connection, campaign, reason, now):
            trips.append(Trip("campaign", campaign.name, reason))
    for name, since in store_bounces.live_accounts(connection, account_names).items():
        start = now - limits.block_window if since is None else max(since, now - limits.block_window)
        reason = account_reason(connection, name, start, limits)
        if reason is not None and store_bounces.disable_account(connection, name, reason, now):
            trips.append(Trip("account", name, reason))
    return trips


def campaign_reason(connection: Connection, campaign: store_bounces.LiveCampaign,
                    limits: GuardLimits = LIMITS) -> str | None:
    """Why the campaign must pause now, or None. Totals are counted only when needed."""
    since = campaign.guard_since
    complaints = store_bounces.campaign_complaints(connection, campaign.id, since)
    if limits.complaints.could_trip(complaints):
        sent = store_bounces.campaign_deliveries(connection, campaign.id, since, ("sent",),
                                                 upto=limits.complaints.largest_total(complaints))
        if limits.complaints.trips(complaints, sent):
            return limits.complaints.reason(complaints, sent, "deliveries")
    hard = store_bounces.campaign_hard_bounces(connection, campaign.id, since)
    if limits.hard_bounces.could_trip(hard):
        handed = store_bounces.campaign_deliveries(connection, campaign.id, since,
                                                   store_bounces.HANDED_OVER,
                                                   upto=limits.hard_bounces.largest_total(hard))
        if limits.hard_bounces.trips(hard, handed):
            return limits.hard_bounces.reason(hard, handed, "deliveries")
    return None


def account_reason(connection: Connection, name: str, since: float,
                   limits: GuardLimits = LIMITS) -> str | None:
    """Why the account must be disabled now (its mail since `since`), or None."""
    blocks = store_bounces.account_blocks(connection, name, since)
    if not limits.blocks.could_trip(blocks):
        return None
    handed = store_bounces.account_handed_over(connection, name, since)  # at most ~1,000 a day
    if limits.blocks.trips(blocks, handed):
        return limits.blocks.reason(blocks, handed, "messages")
    return None
