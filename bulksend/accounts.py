"""The SMTP accounts as the operator sees them: state, usage of every limit, totals; enable."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Engine

from bulksend import db, limits, store_deliveries
from bulksend.config import AccountConfig
from bulksend.errors import NotFound, StateError


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
