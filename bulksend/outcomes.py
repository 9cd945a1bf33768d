"""DESIGN §6 as data: what each SMTP outcome does to the delivery, the account and the address.

| outcome            | delivery                           | account                         | address            |
|--------------------|------------------------------------|---------------------------------|--------------------|
| SENT               | sent                               | failures reset                  | —                  |
| ACCOUNT_RETRY      | queued, no attempt, rerouted       | cooldown 60 s doubling to 1 h   | —                  |
| ACCOUNT_DISABLED   | queued, no attempt, rerouted       | disabled until `accounts enable`| —                  |
| ACCOUNT_EXHAUSTED  | queued, no attempt, rerouted       | exhausted until its window frees| —                  |
| HARD_BOUNCE        | failed                             | —                               | suppressed (hard)  |
| POLICY_BLOCK       | failed                             | counts toward its block rate    | —                  |
| DEFERRED           | deferred, retried with backoff     | —                               | —                  |
| FAILED             | failed                             | —                               | —                  |
| REQUEUE            | queued, attempt counted            | cooldown when it repeats        | —                  |
| UNKNOWN            | unknown (never resent by itself)   | —                               | —                  |
| LEASE_LOST         | untouched: another worker owns it  | —                               | —                  |

An attempt that never reached MAIL FROM (a pooled connection the server had closed, an
account that failed before the envelope) is not counted and gives its quota back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from bulksend import limits, store, store_deliveries
from bulksend.config import AccountConfig
from bulksend.durations import Limit
from bulksend.smtp import Outcome

COOLDOWN_FIRST = 60.0
COOLDOWN_MAX = 3600.0
EXHAUSTED_FALLBACK = 3600.0  # no configured limit tells when the provider's window frees


@dataclass(frozen=True)
class Action:
    """What one outcome does; `apply` writes the account and address effects."""

    state: str
    count_attempt: bool = True
    release_if_no_mail: bool = False  # give the quota back if MAIL FROM was never sent
    account: str | None = None  # cooldown | disabled | exhausted | requeue
    suppress: str | None = None
    blocked: bool = False

    def apply(self, connection: Any, item: Any, settings: Any, now: float, text: str) -> bool:
        """Update the account's state and counters and the suppression list; True when the
        account now rests (cooldown, disabled, exhausted) and must take no more messages."""
        name = item.account
        if self.state == "sent":
            store_deliveries.bump_counters(connection, name, now, sent=1)
            store_deliveries.set_account(connection, name, now, failures=0)
        elif self.state == "failed":
            store_deliveries.bump_counters(connection, name, now, failed=1, blocked=int(self.blocked))
        if self.suppress is not None:
            store.add_suppressions(connection, [{
                "email_key": item.email_key, "reason": self.suppress, "created_at": now,
                "source": f"smtp {text}"[:500], "campaign_id": item.campaign_id,
            }])
        return self.account is not None and _rest(connection, self.account, name, settings, now, text)


def _rest(connection: Any, kind: str, name: str, settings: Any, now: float, text: str) -> bool:
    """Put the account to rest as `kind` says; True when it rests now."""
    row = store_deliveries.accounts(connection, [name])[name]
    reason = text[:500]
    resting = row.state in ("cooldown", "exhausted") and row.until is not None and row.until > now
    if kind != "disabled" and (row.state == "disabled" or (resting and kind != "exhausted")):
        # A session opened before the account began to rest failed as well: the same trouble,
        # not a new one. It neither doubles a cooldown nor revives a disabled account in 60 s.
        store_deliveries.set_account(connection, name, now, last_error=reason)
        return True
    if kind == "requeue" and row.failures < 1:
        store_deliveries.set_account(connection, name, now, failures=row.failures + 1,
                                     last_error=reason)
        return False
    if kind in ("cooldown", "requeue"):
        # The first lost connection of a streak was forgiven: it does not count in the doubling.
        doublings = row.failures - 1 if kind == "requeue" else row.failures
        pause = min(COOLDOWN_FIRST * 2 ** doublings, COOLDOWN_MAX)
        store_deliveries.set_account(connection, name, now, state="cooldown", until=now + pause,
                                     failures=row.failures + 1, reason=reason, last_error=reason)
    elif kind == "disabled":
        store_deliveries.set_account(connection, name, now, state="disabled", until=None,
                                     reason=reason, last_error=reason)
    elif kind == "exhausted":
        account = next(a for a in settings.accounts if a.name == name)
        since = now - limits.lookback(account.limits)
        ledger = store_deliveries.reservations(connection, [name], since)[name]
        until = exhausted_until(account, ledger, now, settings.timezone, text)
        if resting:
            until = max(until, row.until)
        store_deliveries.set_account(connection, name, now, state="exhausted", until=until,
                                     reason=reason, last_error=reason)
    return True


_UNIT_WORDS = {"minute": re.compile(r"minute|\bmin\b"), "hour": re.compile(r"hour"),
               "day": re.compile(r"\bday|daily|24 ?h")}


def exhausted_until(account: AccountConfig, ledger: Sequence[float], now: float, tz: ZoneInfo,
                    text: str) -> float:
    """When an account whose provider says it is out of quota may send again.

    A window bulksend counts as full frees when `limits` says. When none is, mail went out
    through the account from elsewhere: the window the reply names ("daily quota"), or else
    the first of them to free, is taken as full, and the account rests until the oldest
    message in it leaves (rolling) or the window resets (calendar). With no limits the
    provider's window is unknown: EXHAUSTED_FALLBACK.
    """
    full = limits.next_free(limits.usage(account.limits, account.window, ledger, now, tz))
    if full is not None:
        return full
    lowered = text.lower()
    named = [limit for limit in account.limits
             if limit.unit is not None and _UNIT_WORDS[limit.unit].search(lowered)]
    frees = [_frees_when_full(limit, account.window, ledger, now, tz)
             for limit in named or account.limits]
    return min(frees, default=now + EXHAUSTED_FALLBACK)


def _frees_when_full(limit: Limit, window: str, ledger: Sequence[float], now: float,
                     tz: ZoneInfo) -> float:
    end = limits.window_end(limit, window, now, tz)
    if end is not None:
        return end
    inside = [t for t in ledger if t > now - limit.seconds]
    return min(inside, default=now) + limit.seconds


PLANS: dict[Any, Action] = {
    Outcome.SENT: Action("sent", account=None),
    Outcome.ACCOUNT_RETRY: Action("queued", count_attempt=False, release_if_no_mail=True,
                                  account="cooldown"),
    Outcome.ACCOUNT_DISABLED: Action("queued", count_attempt=False, release_if_no_mail=True,
                                     account="disabled"),
    Outcome.ACCOUNT_EXHAUSTED: Action("queued", count_attempt=False, release_if_no_mail=True,
                                      account="exhausted"),
    Outcome.HARD_BOUNCE: Action("failed", suppress="hard_bounce"),
    Outcome.POLICY_BLOCK: Action("failed", blocked=True),
    Outcome.DEFERRED: Action("deferred"),
    Outcome.FAILED: Action("failed"),
    Outcome.REQUEUE: Action("queued", release_if_no_mail=True, account="requeue"),
    Outcome.UNKNOWN: Action("unknown"),
    # before_dot found the lease gone: the row is another worker's now; touch nothing.
    Outcome.LEASE_LOST: Action("lease_lost", count_attempt=False),
    "suppressed": Action("suppressed", count_attempt=False, release_if_no_mail=True),
}


def plan_for(outcome: Any) -> Action:
    """The action of DESIGN §6 for an SMTP outcome (or "suppressed" before RCPT)."""
    return PLANS[outcome]
