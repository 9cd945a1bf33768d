"""Sending windows of one account: how many messages it has used, when it has room, and plans (DESIGN §5).

Pure: time is always a parameter (epoch seconds) and reservations are the times at which messages
were claimed for the account, as the store returns them (any order).

- `rolling` windows hold the last N seconds: a reservation at t counts while now < t + N, so a
  window "5/10s" full since t=0..4 gets room at exactly t=10.0.
- `calendar` windows reset at the start of the minute, hour or day in the config timezone. A day
  runs from one local midnight to the next: 23 h on a spring-forward day, 25 h on a fall-back day.
  Minute and hour windows are always 60 s / 3600 s of real time, aligned to :00 local under the
  UTC offset in force (Asia/Kolkata's hours start at :30 UTC; the repeated hour of a fall-back
  night is two windows). Where a zone shifts by a part of an hour (Australia/Lord_Howe) two
  successive hour windows overlap by the shift, which only ever counts more, never less.
- Reservations stamped later than `now` still count: another worker may have claimed a moment
  after this one read its clock, and skipping it would let the two pass the limit together.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from bulksend.durations import Limit

@dataclass(frozen=True)
class LimitUsage:
    """One window of an account now: messages counted in it, and when it has room again (None = now)."""

    limit: Limit
    used: int
    free_at: float | None


def window_start(limit: Limit, window: str, now: float, tz: ZoneInfo) -> float:
    """Start of the window of `limit` that contains `now` (rolling: now - seconds, exclusive)."""
    if _rolling(window):
        return now - limit.seconds
    return _calendar(limit, now, tz)[0]


def window_end(limit: Limit, window: str, now: float, tz: ZoneInfo) -> float | None:
    """When the calendar window containing `now` ends and the next begins; None for rolling ones."""
    if _rolling(window):
        return None
    return _calendar(limit, now, tz)[1]


def usage(limits: Sequence[Limit], window: str, reservations: Sequence[float], now: float,
          tz: ZoneInfo) -> list[LimitUsage]:
    """How full each window of an account is at `now`, given the times of its reservations."""
    times = sorted(reservations)
    result = []
    for limit in limits:
        end: float | None = None
        if _rolling(window):
            inside = times[bisect_right(times, now - limit.seconds):]
        else:
            start, end = _calendar(limit, now, tz)
            inside = times[bisect_left(times, start):bisect_left(times, end)]
        free_at = None
        if len(inside) >= limit.count:
            # Rolling: room comes back when the oldest used - count + 1 have left the window.
            free_at = end if end is not None else inside[len(inside) - limit.count] + limit.seconds
        result.append(LimitUsage(limit, len(inside), free_at))
    return result


def has_room(usages: Sequence[LimitUsage]) -> bool:
    """True when every window has room for one more message."""
    return all(u.free_at is None for u in usages)


def next_free(usages: Sequence[LimitUsage]) -> float | None:
    """When every window has room again (the latest free_at of the full ones); None = now."""
    return max((u.free_at for u in usages if u.free_at is not None), default=None)


def capacity(limits: Sequence[Limit], window: str, reservations: Sequence[float], now: float,
             tz: ZoneInfo) -> int | None:
    """How many more messages fit right now in every window; None when there are no limits."""
    if not limits:
        return None
    return max(0, min(u.limit.count - u.used for u in usage(limits, window, reservations, now, tz)))


def lookback(limits: Sequence[Limit]) -> float:
    """How far back the store must return reservations to cover every window of these limits."""
    # A calendar day can last 25 h (26 h in Antarctica/Troll): two days cover any of them. The
    # few extra rows this costs a rolling daily limit are filtered out by `usage`.
    return float(max((2 * lim.seconds if lim.unit == "day" else lim.seconds for lim in limits),
                     default=0))


def plan(limits: Sequence[Limit], window: str, reservations: Sequence[float], now: float, n: int,
         tz: ZoneInfo) -> float:
    """When the account has sent `n` more messages if it sends each one as soon as its limits allow."""
    if n <= 0 or not limits:
        return now
    return _run(limits, window, reservations, now, n, math.inf, tz)[0]


def capacity_until(limits: Sequence[Limit], window: str, reservations: Sequence[float],
                   now: float, until: float, tz: ZoneInfo) -> int | None:
    """How many messages the limits let the account send from `now` until before `until`; None = any."""
    if not limits:
        return None
    if until <= now:
        return 0
    return _run(limits, window, reservations, now, math.inf, until, tz)[1]


AccountLimits = tuple[Sequence[Limit], str, Sequence[float]]  # limits, window, reservations


def finish_time(accounts: Sequence[AccountLimits], now: float, n: int, tz: ZoneInfo) -> float | None:
    """When several accounts together have sent `n` more messages, each as fast as its limits allow.

    Exact when the second it falls in holds one batch of sends, else the last send of that second;
    None when there is no account to send with.
    """
    if not accounts:
        return None if n > 0 else now
    if n <= 0 or any(not limits for limits, _, _ in accounts):
        return now

    def sent_before(t: float) -> list[int]:
        return [capacity_until(lim, win, res, now, t, tz) or 0 for lim, win, res in accounts]

    # Whole seconds after now: fewer than n are sent before now+lo, n or more before now+hi.
    lo, hi = 0, math.ceil(min(plan(lim, win, res, now, n, tz) for lim, win, res in accounts) - now) + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(sent_before(now + mid)) >= n else (mid, hi)
    counts = sent_before(now + hi)
    return max(plan(lim, win, res, now, c, tz) for (lim, win, res), c in zip(accounts, counts) if c)


def _rolling(window: str) -> bool:
    if window not in ("rolling", "calendar"):
        raise ValueError(f'window must be "rolling" or "calendar", got {window!r}')
    return window == "rolling"


def _calendar(limit: Limit, now: float, tz: ZoneInfo) -> tuple[float, float]:
    """Start and end of the calendar minute, hour or day containing `now` in `tz`."""
    if limit.unit is None:
        raise ValueError(f'a calendar window needs a limit per minute, hour or day, got "{limit.text}"')
    # Boundaries and zone transitions fall on whole seconds; flooring keeps datetime's
    # microsecond rounding from carrying 23:59:59.9999996 into the next day.
    local = datetime.fromtimestamp(math.floor(now), tz)
    if limit.unit != "day":
        offset = local.utcoffset().total_seconds()  # type: ignore[union-attr]
        start = now - (now + offset) % limit.seconds
        return start, start + limit.seconds
    midnight = datetime.combine(local.date(), time())
    start = max(t for t in _day_begins(midnight, tz) if t <= now)
    end = min(t for t in _day_begins(midnight + timedelta(days=1), tz) if t > now)
    return start, end


@lru_cache(maxsize=4096)
def _day_begins(midnight: datetime, tz: ZoneInfo) -> tuple[float, ...]:
    """Instants at which the clock in `tz` passes from the day before into `midnight`'s date."""
    readings = {midnight.replace(tzinfo=tz, fold=fold).timestamp() for fold in (0, 1)}
    found = [t for t in readings if _wall(t, tz) == midnight]
    if not found:  # midnight falls in a gap: the clock jumped over it, find when (whole seconds)
        lo, hi = math.floor(min(readings)), math.ceil(max(readings))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _wall(mid, tz) >= midnight else (mid, hi)
        found = [float(hi)]
    # A midnight read twice (a fall-back at 01:00 → 00:00) begins the day only the first time.
    return tuple(sorted(t for t in found if _wall(t - 1, tz) < midnight))


def _wall(t: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(t, tz).replace(tzinfo=None)


def _run(limits: Sequence[Limit], window: str, reservations: Sequence[float], now: float,
         n: float, until: float, tz: ZoneInfo) -> tuple[float, int]:
    """(time of the last send, sends) of a greedy sender stopping after n sends or before `until`."""
    run = _rolling_run if _rolling(window) else _calendar_run
    return run(limits, reservations, now, n, until, tz)


def _rolling_run(limits: Sequence[Limit], reservations: Sequence[float], now: float, n: float,
                 until: float, tz: ZoneInfo) -> tuple[float, int]:
    # Times are relative to now: differences of epoch floats are exact, and so are the sums of
    # whole seconds built on them, which the cycle check below compares for equality.
    seconds = [lim.seconds for lim in limits]
    longest = seconds.index(max(seconds))
    queues: list[deque[tuple[float, int]]] = [deque() for _ in limits]
    # A reservation stamped after now (another worker's clock) is planned as if made now.
    for t in sorted(min(t, now) - now for t in reservations):
        for queue, span in zip(queues, seconds):
            if t + span > 0:
                queue.append((t, 1))
    used = [len(queue) for queue in queues]
    until -= now
    clock, sent, last = 0.0, 0, 0.0
    mark: tuple[tuple[tuple[float, int], ...], float, int] | None = None
    power, steps, looking = 1, 0, True
    while True:
        for i, (queue, span) in enumerate(zip(queues, seconds)):
            while queue and queue[0][0] + span <= clock:
                used[i] -= queue.popleft()[1]
        room = min(lim.count - u for lim, u in zip(limits, used))
        if room > 0:
            if clock >= until:
                break
            batch = int(min(room, n - sent))
            for i, queue in enumerate(queues):
                queue.append((clock, batch))
                used[i] += batch
            sent, last = sent + batch, clock
            if sent >= n:
                break
            if looking:
                # The windows' contents relative to the clock are the whole state of a greedy
                # sender, so once a state recurs the schedule repeats: skip whole cycles of it
                # (Brent's cycle finding: one remembered state, compared at every step).
                state = tuple((t - clock, k) for t, k in queues[longest])
                if mark is not None and mark[0] == state:
                    period, per_cycle = clock - mark[1], sent - mark[2]
                    # Leave the last cycle to step through (inf // x is nan, hence the guards).
                    by_count = (n - sent - 1) // per_cycle if n < math.inf else math.inf
                    by_time = (until - clock) // period - 1 if until < math.inf else math.inf
                    skip = int(min(by_count, by_time))
                    if skip > 0:
                        queues = [deque((t + skip * period, k) for t, k in q) for q in queues]
                        clock = last = clock + skip * period
                        sent += skip * per_cycle
                    looking = False
                elif steps == power:
                    mark, power, steps = (state, clock, sent), power * 2, 0
                steps += 1
        clock = max(_frees(q, u, lim) for q, u, lim in zip(queues, used, limits) if u >= lim.count)
    return now + last, sent


def _frees(queue: deque[tuple[float, int]], used: int, limit: Limit) -> float:
    """When enough of the oldest sends have left a full rolling window for one more to fit."""
    excess = used - limit.count
    return next(t + limit.seconds for t, k in queue if (excess := excess - k) < 0)


def _calendar_run(limits: Sequence[Limit], reservations: Sequence[float], now: float, n: float,
                  until: float, tz: ZoneInfo) -> tuple[float, int]:
    # Smaller windows nest in the longest one, so every longest window after the current one
    # starts empty and runs like any other of the same length and offset: simulate one of a
    # kind, then add up whole windows (days, for a daily limit) until the end is in sight.
    top = max(limits, key=lambda lim: lim.seconds)
    used = [u.used for u in usage(limits, "calendar", reservations, now, tz)]
    end = _calendar(top, now, tz)[1]
    batches = _calendar_batches(limits, used, now, end, tz)
    sent, last = 0, now
    seen: dict[tuple[float, object], tuple[list[tuple[float, int]], int]] = {}
    while True:
        for t, k in batches:
            if t >= until:
                return last, sent
            sent, last = sent + int(min(k, n - sent)), t
            if sent >= n:
                return last, sent
        start, end = end, _calendar(top, end, tz)[1]
        kind = (end - start, datetime.fromtimestamp(start, tz).utcoffset())
        if kind not in seen:
            fresh = _calendar_batches(limits, [0] * len(limits), start, end, tz)
            seen[kind] = ([(t - start, k) for t, k in fresh], sum(k for _, k in fresh))
        relative, total = seen[kind]
        if sent + total < n and start + relative[-1][0] < until:
            sent, last, batches = sent + total, start + relative[-1][0], []
        else:
            batches = [(start + t, k) for t, k in relative]


def _calendar_batches(limits: Sequence[Limit], used: list[int], clock: float, stop: float,
                      tz: ZoneInfo) -> list[tuple[float, int]]:
    """Greedy sends (time, count) from `clock` until `stop`, starting from the given window counts."""
    used = list(used)  # the caller's counts stay as they were
    ends, batches = [_calendar(lim, clock, tz)[1] for lim in limits], []
    while clock < stop:
        room = min(lim.count - u for lim, u in zip(limits, used))
        if room > 0:
            batches.append((clock, room))
            used = [u + room for u in used]
        clock = max(e for e, u, lim in zip(ends, used, limits) if u >= lim.count)
        for i, lim in enumerate(limits):
            if ends[i] <= clock:
                used[i], ends[i] = 0, _calendar(lim, clock, tz)[1]
    return batches
