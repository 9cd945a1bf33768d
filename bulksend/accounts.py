"""The SMTP accounts as the operator sees them: state, usage of every limit, totals; enable."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Engine

from bulksend import db, limits, store_campaigns, store_deliveries
from bulksend.config import AccountConfig
from bulksend.durations import Limit
from bulksend.errors import BulksendError, NotFound, StateError
from bulksend.models import TERMINAL_DELIVERY_STATES

DAY = Limit(1, 86400, "1/day")  # for "the end of today" in the config's time zone


def status(engine: Engine, accounts: tuple[AccountConfig, ...], tz: ZoneInfo, now: float
           ) -> list[dict[str, Any]]:
    """The `accounts --json` rows: state, until, reason, per-limit usage, sent, failed."""
    names = [account.name for account in accounts]
    with db.transaction(engine) as connection:
        store_deliveries.ensure_accounts(connection, names, now)
        rows = store_deliveries.accounts(connection, names)
        since = now - max((limits.lookback(a.limits) for a in accounts), default=0)
        ledger = store_deliveries.reservations(connection, names, since)
    result = []
    for account in accounts:
        row = rows[account.name]
        usages = limits.usage(account.limits, account.window, ledger[account.name], now, tz)
        result.append({
            "name": account.name,
            "state": _effective_state(row, now),
            "until": row.until if row.state in ("cooldown", "exhausted") else None,
            "reason": row.reason,
            "limits": [{"limit": u.limit.text, "used": u.used, "free_at": u.free_at} for u in usages],
            "sent": row.sent,
            "failed": row.failed,
            "blocked": row.blocked,
            "last_error": row.last_error,
            "host": f"{account.host}:{account.port}",
            "security": account.security,
        })
    return result


def _effective_state(row: store_deliveries.AccountRow, now: float) -> str:
    """A cooldown or exhaustion that has run out shows as active."""
    if row.state in ("cooldown", "exhausted") and row.until is not None and row.until <= now:
        return "active"
    return row.state


def enable(engine: Engine, accounts: tuple[AccountConfig, ...], name: str, now: float) -> str:
    """Put a disabled (or resting) account back into rotation; returns its previous state."""
    if name not in {account.name for account in accounts}:
        known = ", ".join(account.name for account in accounts) or "none"
        raise NotFound(f"account {name!r} is not in the config (accounts: {known})")
    with db.transaction(engine) as connection:
        store_deliveries.ensure_accounts(connection, [name], now)
        row = store_deliveries.accounts(connection, [name], lock=True)[name]
        if row.state == "active":
            raise StateError(f"account {name!r} is already active")
        store_deliveries.set_account(connection, name, now, state="active", until=None,
                                     reason=None, failures=0)
    return row.state


def check(accounts: tuple[AccountConfig, ...], open_session: Callable[[AccountConfig], Any],
          name: str | None = None) -> list[dict[str, Any]]:
    """Connect, TLS, AUTH and capabilities of each account (or one); sends no mail."""
    chosen = [a for a in accounts if name is None or a.name == name]
    if name is not None and not chosen:
        raise NotFound(f"account {name!r} is not in the config")
    results = []
    for account in chosen:
        try:
            session = open_session(account)
        except BulksendError as exc:
            results.append({"name": account.name, "ok": False, "error": str(exc)})
            continue
        try:
            results.append({"name": account.name, "ok": True, "tls": session.tls,
                            "capabilities": {**dataclasses.asdict(session.capabilities),
                                             "auth": sorted(session.capabilities.auth)}})
        finally:
            session.close()
    return results


def plan(engine: Engine, campaign_name: str, accounts: tuple[AccountConfig, ...], tz: ZoneInfo,
         now: float) -> dict[str, Any]:
    """When a campaign finishes if every usable account sends as fast as its limits allow."""
    names = [account.name for account in accounts]
    with db.transaction(engine) as connection:
        campaign = store_campaigns.campaign(connection, campaign_name)
        states = store_campaigns.state_counts(connection, campaign.id)
        store_deliveries.ensure_accounts(connection, names, now)
        rows = store_deliveries.accounts(connection, names)
        since = now - max((limits.lookback(a.limits) for a in accounts), default=0)
        ledger = store_deliveries.reservations(connection, names, since)
    remaining = sum(count for state, count in states.items()
                    if state not in TERMINAL_DELIVERY_STATES)
    usable = [a for a in accounts if rows[a.name].state != "disabled"]
    end_of_day = limits.window_end(DAY, "calendar", now, tz)
    by_account = {
        a.name: limits.capacity_until(a.limits, a.window, ledger[a.name], now, end_of_day, tz)
        for a in usable
    }
    finishes = limits.finish_time([(a.limits, a.window, ledger[a.name]) for a in usable],
                                  now, remaining, tz)
    return {"remaining": remaining, "finishes_at": finishes, "by_account": by_account,
            "status": campaign.status, "disabled": [a.name for a in accounts if a not in usable]}
