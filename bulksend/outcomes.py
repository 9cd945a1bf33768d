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

from dataclasses import dataclass
from typing import Any

from bulksend import limits, store, store_deliveries
from bulksend.smtp import Outcome

COOLDOWN_FIRST = 60.0
COOLDOWN_MAX = 3600.0
EXHAUSTED_FALLBACK = 3600.0  # the provider's limit is tighter than the configured ones


@dataclass(frozen=True)
class Action:
    """What one outcome does; `apply` writes the account and address effects."""

    state: str
    count_attempt: bool = True
    release_if_no_mail: bool = False  # give the quota back if MAIL FROM was never sent
    account: str | None = None  # cooldown | disabled | exhausted | reset | requeue
    suppress: str | None = None
    blocked: bool = False

    def apply(self, connection: Any, item: Any, settings: Any, now: float, text: str) -> None:
        """Update the account's state and counters and the suppression list."""
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
        if self.account is not None:
            _rest(connection, self.account, name, settings, now, text)


def _rest(connection: Any, kind: str, name: str, settings: Any, now: float, text: str) -> None:
    row = store_deliveries.accounts(connection, [name])[name]
    if kind == "requeue" and row.failures < 1:
        store_deliveries.set_account(connection, name, now, failures=row.failures + 1)
        return
    if kind in ("cooldown", "requeue"):
        pause = min(COOLDOWN_FIRST * 2 ** row.failures, COOLDOWN_MAX)
        store_deliveries.set_account(connection, name, now, state="cooldown", until=now + pause,
                                     failures=row.failures + 1, reason=text[:500],
                                     last_error=text[:500])
    elif kind == "disabled":
        store_deliveries.set_account(connection, name, now, state="disabled", until=None,
                                     reason=text[:500], last_error=text[:500])
    elif kind == "exhausted":
        account = next(a for a in settings.accounts if a.name == name)
        since = now - limits.lookback(account.limits)
        ledger = store_deliveries.reservations(connection, [name], since)[name]
        usages = limits.usage(account.limits, account.window, ledger, now, settings.timezone)
        until = limits.next_free(usages) or now + EXHAUSTED_FALLBACK
        store_deliveries.set_account(connection, name, now, state="exhausted", until=until,
                                     reason=text[:500], last_error=text[:500])


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
