"""Sending windows: counts, room, free times and plans on a fake clock, across DST and odd offsets."""

from __future__ import annotations

import math
import random
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from bulksend.durations import Limit, parse_limit
from bulksend.limits import (
    LimitUsage, capacity, capacity_until, finish_time, has_room, lookback, next_free, plan, usage,
    window_end, window_start,
)

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
T0 = 1_700_000_000.0  # an arbitrary epoch second for rolling windows


def limits(*texts: str) -> list[Limit]:
    return [parse_limit(text) for text in texts]


def at(text: str) -> float:
    """Epoch seconds of an ISO time with its offset, e.g. "2024-10-27T02:30+01:00"."""
    return datetime.fromisoformat(text).timestamp()


def slow_sends(lims: list[Limit], window: str, reservations: list[float], now: float, n: int,
               tz: ZoneInfo) -> list[float]:
    """Message by message: send whenever usage() has room, else wait for next_free()."""
    booked, sends, clock = list(reservations), [], now
    while len(sends) < n:
        usages = usage(lims, window, booked, clock, tz)
        if has_room(usages):
            booked.append(clock)
            sends.append(clock)
        else:
            clock = next_free(usages)
    return sends


# --- rolling windows -------------------------------------------------------------------------

@pytest.mark.parametrize("now,used,free_at", [
    (4.0, 5, 10.0),
    (4.5, 5, 10.0),
    (9.999, 5, 10.0),
    (10.0, 4, None),   # the reservation at 0 leaves at exactly 10.0
    (12.5, 2, None),
    (14.0, 0, None),
    (-0.5, 5, 10.0),   # reservations stamped after now (another worker) still count
])
def test_rolling_five_per_ten_seconds_frees_one_at_ten(now: float, used: int,
                                                       free_at: float | None) -> None:
    [result] = usage(limits("5/10s"), "rolling", [T0 + t for t in (3, 0, 4, 1, 2)], T0 + now, UTC)
    assert result.used == used
    assert result.free_at == (None if free_at is None else T0 + free_at)
    assert has_room([result]) is (free_at is None)


def test_rolling_over_limit_waits_for_enough_to_leave() -> None:
    # 7 held by a window that now allows 5 (the limit was lowered): 3 must leave for room.
    [result] = usage(limits("5/10s"), "rolling", [T0 + t for t in range(7)], T0 + 6.5, UTC)
    assert (result.used, result.free_at) == (7, T0 + 12.0)
    assert capacity(limits("5/10s"), "rolling", [T0 + t for t in range(7)], T0 + 6.5, UTC) == 0


TIERS = ("20/minute", "100/hour", "500/day")


@pytest.mark.parametrize("history,binding,free_in", [
    # 20 in the last minute: only the minute window is full.
    ([-50 + i for i in range(20)], "20/minute", 10.0),
    # 100 spread over the last hour, none in the last minute: the hour binds.
    ([-3590 + 30 * i for i in range(100)], "100/hour", 10.0),
    # 500 over the last day, but under 100 in the hour: the day binds.
    ([-86000 + 170 * i for i in range(500)], "500/day", 400.0),
    # nothing full
    ([-10.0, -5000.0], None, None),
])
def test_only_the_tightest_window_binds(history: list[float], binding: str | None,
                                        free_in: float | None) -> None:
    usages = usage(limits(*TIERS), "rolling", [T0 + t for t in history], T0, UTC)
    assert [u.limit.text for u in usages if u.free_at is not None] == ([binding] if binding else [])
    assert next_free(usages) == (None if free_in is None else T0 + free_in)
    assert has_room(usages) is (binding is None)


def test_next_free_is_when_every_full_window_has_room() -> None:
    usages = [LimitUsage(parse_limit("1/minute"), 1, 100.0),
              LimitUsage(parse_limit("5/hour"), 5, 250.0),
              LimitUsage(parse_limit("9/day"), 3, None)]
    assert next_free(usages) == 250.0
    assert not has_room(usages)
    assert next_free(usages[2:]) is None and has_room(usages[2:])


@pytest.mark.parametrize("history,expected", [
    ([], 20), ([-1.0] * 7, 13), ([-1.0] * 25, 0), ([-120.0 - i for i in range(95)], 5),
])
def test_capacity_is_the_least_room_of_any_window(history: list[float], expected: int) -> None:
    assert capacity(limits(*TIERS), "rolling", [T0 + t for t in history], T0, UTC) == expected


def test_no_limits_means_unlimited() -> None:
    assert capacity([], "rolling", [T0] * 1000, T0, UTC) is None
    assert usage([], "calendar", [T0], T0, UTC) == []
    assert has_room([]) and next_free([]) is None
    assert plan([], "rolling", [], T0, 1_000_000, UTC) == T0
    assert capacity_until([], "rolling", [], T0, T0 + 60, UTC) is None
    assert lookback([]) == 0.0


def test_lookback_covers_the_longest_window() -> None:
    assert lookback(limits("5/10s", "50/5m")) == 300.0
    assert lookback(limits("20/minute", "100/hour")) == 3600.0
    assert lookback(limits("20/minute", "500/day")) == 2 * 86400.0  # a calendar day may last 25 h


def test_bad_window_or_calendar_period_is_refused() -> None:
    with pytest.raises(ValueError, match="rolling"):
        usage(limits("5/10s"), "sliding", [], T0, UTC)
    with pytest.raises(ValueError, match="50/5m"):
        window_start(parse_limit("50/5m"), "calendar", T0, UTC)


# --- calendar windows ------------------------------------------------------------------------

@pytest.mark.parametrize("zone,now,limit,start,end", [
    ("UTC", "2024-05-05T10:20:30.5+00:00", "9/minute", "2024-05-05T10:20+00:00", "2024-05-05T10:21+00:00"),
    ("UTC", "2024-05-05T10:20:30+00:00", "9/hour", "2024-05-05T10:00+00:00", "2024-05-05T11:00+00:00"),
    ("UTC", "2024-05-05T10:20:30+00:00", "9/day", "2024-05-05T00:00+00:00", "2024-05-06T00:00+00:00"),
    ("UTC", "2024-05-05T00:00:00+00:00", "9/day", "2024-05-05T00:00+00:00", "2024-05-06T00:00+00:00"),
    # Moscow: UTC+3 all year, its day starts at 21:00 UTC.
    ("Europe/Moscow", "2024-03-31T01:30+03:00", "9/day", "2024-03-31T00:00+03:00", "2024-04-01T00:00+03:00"),
    ("Europe/Moscow", "2024-10-27T23:59+03:00", "9/day", "2024-10-27T00:00+03:00", "2024-10-28T00:00+03:00"),
    # Kolkata, UTC+5:30: hours start at :00 local, :30 UTC.
    ("Asia/Kolkata", "2024-06-01T10:45+05:30", "9/hour", "2024-06-01T10:00+05:30", "2024-06-01T11:00+05:30"),
    ("Asia/Kolkata", "2024-06-01T10:45+05:30", "9/day", "2024-06-01T00:00+05:30", "2024-06-02T00:00+05:30"),
    # Berlin spring forward (02:00 CET → 03:00 CEST): a 23 h day, hours of one real hour.
    ("Europe/Berlin", "2024-03-31T12:00+02:00", "9/day", "2024-03-31T00:00+01:00", "2024-04-01T00:00+02:00"),
    ("Europe/Berlin", "2024-03-31T01:59:59+01:00", "9/hour", "2024-03-31T01:00+01:00", "2024-03-31T03:00+02:00"),
    ("Europe/Berlin", "2024-03-31T03:00+02:00", "9/hour", "2024-03-31T03:00+02:00", "2024-03-31T04:00+02:00"),
    # Berlin fall back (03:00 CEST → 02:00 CET): a 25 h day; the repeated hour is two windows.
    ("Europe/Berlin", "2024-10-27T12:00+01:00", "9/day", "2024-10-27T00:00+02:00", "2024-10-28T00:00+01:00"),
    ("Europe/Berlin", "2024-10-27T02:30+02:00", "9/hour", "2024-10-27T02:00+02:00", "2024-10-27T02:00+01:00"),
    ("Europe/Berlin", "2024-10-27T02:30+01:00", "9/hour", "2024-10-27T02:00+01:00", "2024-10-27T03:00+01:00"),
    ("Europe/Berlin", "2024-10-27T02:30+01:00", "9/minute", "2024-10-27T02:30+01:00", "2024-10-27T02:31+01:00"),
    # New York, both transitions (at 02:00 local; the repeated hour is 01:00-02:00).
    ("America/New_York", "2024-03-10T18:00-04:00", "9/day", "2024-03-10T00:00-05:00", "2024-03-11T00:00-04:00"),
    ("America/New_York", "2024-03-10T03:10-04:00", "9/hour", "2024-03-10T03:00-04:00", "2024-03-10T04:00-04:00"),
    ("America/New_York", "2024-11-03T18:00-05:00", "9/day", "2024-11-03T00:00-04:00", "2024-11-04T00:00-05:00"),
    ("America/New_York", "2024-11-03T01:15-04:00", "9/hour", "2024-11-03T01:00-04:00", "2024-11-03T01:00-05:00"),
    ("America/New_York", "2024-11-03T01:15-05:00", "9/hour", "2024-11-03T01:00-05:00", "2024-11-03T02:00-05:00"),
    # Santiago skips midnight (24:00 → 01:00): the day starts when the clock jumps.
    ("America/Santiago", "2024-09-08T12:00-03:00", "9/day", "2024-09-08T01:00-03:00", "2024-09-09T00:00-03:00"),
    ("America/Santiago", "2024-09-07T23:59:59-04:00", "9/day", "2024-09-07T00:00-04:00", "2024-09-08T01:00-03:00"),
    # Havana reads midnight twice (01:00 → 00:00): the day starts at the first, lasts 25 h.
    ("America/Havana", "2024-11-03T00:30-05:00", "9/day", "2024-11-03T00:00-04:00", "2024-11-04T00:00-05:00"),
    ("America/Havana", "2024-11-02T23:30-04:00", "9/day", "2024-11-02T00:00-04:00", "2024-11-03T00:00-04:00"),
])
def test_calendar_window_bounds(zone: str, now: str, limit: str, start: str, end: str) -> None:
    tz, lim = ZoneInfo(zone), parse_limit(limit)
    assert window_start(lim, "calendar", at(now), tz) == at(start)
    assert window_end(lim, "calendar", at(now), tz) == at(end)


@pytest.mark.parametrize("zone,day,hours", [
    ("UTC", "2024-03-31", 24), ("Europe/Moscow", "2024-03-31", 24), ("Europe/Moscow", "2024-10-27", 24),
    ("Europe/Berlin", "2024-03-31", 23), ("Europe/Berlin", "2024-10-27", 25),
    ("America/New_York", "2024-03-10", 23), ("America/New_York", "2024-11-03", 25),
    ("Asia/Kolkata", "2024-03-31", 24),
])
def test_calendar_day_lengths_and_hours_of_one_real_hour(zone: str, day: str, hours: int) -> None:
    tz, per_day, per_hour = ZoneInfo(zone), parse_limit("9/day"), parse_limit("9/hour")
    noon = datetime.fromisoformat(f"{day}T12:00").replace(tzinfo=tz).timestamp()
    start = window_start(per_day, "calendar", noon, tz)
    end = window_end(per_day, "calendar", noon, tz)
    assert end - start == hours * 3600
    bounds = [start]
    while bounds[-1] < end:
        bounds.append(window_end(per_hour, "calendar", bounds[-1], tz))
    assert bounds[-1] == end and len(bounds) == hours + 1
    assert {b - a for a, b in zip(bounds, bounds[1:])} == {3600}


@pytest.mark.parametrize("limit", ["9/minute", "9/hour", "9/day"])
@pytest.mark.parametrize("midnight", ["2024-05-06T00:00+00:00", "2024-05-06T00:00+02:00"])
def test_the_last_instant_of_a_day_is_not_rounded_into_the_next(limit: str, midnight: str) -> None:
    tz = UTC if midnight.endswith("+00:00") else BERLIN
    just_before = math.nextafter(at(midnight), 0)  # datetime rounds it up to 00:00:00.000000
    assert window_end(parse_limit(limit), "calendar", just_before, tz) == at(midnight)


def test_rolling_window_has_no_end() -> None:
    lim = parse_limit("5/10s")
    assert window_start(lim, "rolling", T0, UTC) == T0 - 10
    assert window_end(lim, "rolling", T0, UTC) is None


@pytest.mark.parametrize("zone,booked,now,used,free_at", [
    # yesterday's sends do not count; today's fill the day until the next local midnight
    ("UTC", ["2024-05-04T23:59:59+00:00"] + ["2024-05-05T08:00+00:00"] * 3, "2024-05-05T09:00+00:00",
     3, "2024-05-06T00:00+00:00"),
    # a send at 00:30 on Berlin's 25 h day still counts 24 real hours later, at 23:30
    ("Europe/Berlin", ["2024-10-27T00:30+02:00"] * 3, "2024-10-27T23:30+01:00", 3, "2024-10-28T00:00+01:00"),
    ("Europe/Berlin", ["2024-10-26T23:30+02:00"] * 3, "2024-10-27T00:30+02:00", 0, None),
    ("Europe/Moscow", ["2024-05-05T00:10+03:00"] * 3, "2024-05-05T23:50+03:00", 3, "2024-05-06T00:00+03:00"),
    ("Europe/Moscow", ["2024-05-04T23:50+03:00"] * 3, "2024-05-05T00:10+03:00", 0, None),
])
def test_calendar_day_usage(zone: str, booked: list[str], now: str, used: int, free_at: str | None) -> None:
    [result] = usage(limits("3/day"), "calendar", [at(b) for b in booked], at(now), ZoneInfo(zone))
    assert result.used == used
    assert result.free_at == (None if free_at is None else at(free_at))


@pytest.mark.parametrize("booked,now,used,free_at", [
    # first pass of the repeated hour (CEST) does not count in the second (CET)
    (["2024-10-27T02:10+02:00"] * 2, "2024-10-27T02:20+01:00", 0, None),
    (["2024-10-27T02:10+02:00"] * 2, "2024-10-27T02:20+02:00", 2, "2024-10-27T02:00+01:00"),
    (["2024-10-27T02:10+01:00"] * 2, "2024-10-27T02:50+01:00", 2, "2024-10-27T03:00+01:00"),
    # spring forward: 01:xx CET and 03:xx CEST are adjacent hours
    (["2024-03-31T01:59+01:00"] * 2, "2024-03-31T03:00+02:00", 0, None),
])
def test_calendar_hour_usage_around_dst(booked: list[str], now: str, used: int, free_at: str | None) -> None:
    [result] = usage(limits("2/hour"), "calendar", [at(b) for b in booked], at(now), BERLIN)
    assert result.used == used
    assert result.free_at == (None if free_at is None else at(free_at))


def test_calendar_hour_in_kolkata_resets_at_half_past_utc() -> None:
    kolkata, lim = ZoneInfo("Asia/Kolkata"), limits("2/hour")
    booked = [at("2024-06-01T10:05+05:30"), at("2024-06-01T10:40+05:30")]
    [full] = usage(lim, "calendar", booked, at("2024-06-01T10:50+05:30"), kolkata)
    assert (full.used, full.free_at) == (2, at("2024-06-01T05:30+00:00"))
    [fresh] = usage(lim, "calendar", booked, at("2024-06-01T05:30+00:00"), kolkata)
    assert (fresh.used, fresh.free_at) == (0, None)


# --- plans -----------------------------------------------------------------------------------

@pytest.mark.parametrize("texts,window,n,after", [
    (("5/10s",), "rolling", 1, 0), (("5/10s",), "rolling", 5, 0), (("5/10s",), "rolling", 6, 10),
    (("5/10s",), "rolling", 18, 30), (("5/10s",), "rolling", 0, 0),
    (TIERS, "rolling", 100, 240), (TIERS, "rolling", 101, 3600), (TIERS, "rolling", 500, 4 * 3600 + 240),
    (TIERS, "rolling", 501, 86400),
    # calendar from midnight UTC: five minutes of 20 at the top of each of five hours
    (TIERS, "calendar", 21, 60), (TIERS, "calendar", 101, 3600), (TIERS, "calendar", 500, 4 * 3600 + 240),
    (TIERS, "calendar", 501, 86400), (("500/day",), "calendar", 1_000_000, 1999 * 86400),
    (("500/day",), "rolling", 1_000_000, 1999 * 86400),
    (TIERS, "calendar", 1_000_000, 1999 * 86400 + 4 * 3600 + 240),
    (TIERS, "rolling", 1_000_000, 1999 * 86400 + 4 * 3600 + 240),
])
def test_plan_from_an_empty_account(texts: tuple[str, ...], window: str, n: int, after: float) -> None:
    midnight = at("2024-01-01T00:00+00:00")
    started = time.perf_counter()
    assert plan(limits(*texts), window, [], midnight, n, UTC) == midnight + after
    assert time.perf_counter() - started < 2.0  # whole windows are skipped, not stepped


def test_plan_for_a_million_at_500_a_day_from_mid_day_with_history() -> None:
    now = at("2024-03-30T15:00+01:00")
    booked = [now - 3600 * h + 0.25 for h in range(1, 15) for _ in range(20)]  # 280 sent today
    started = time.perf_counter()
    # calendar: 220 more today, then 500 at each local midnight; the millionth on day 2000
    calendar = plan(limits("500/day"), "calendar", booked, now, 1_000_000, BERLIN)
    assert datetime.fromtimestamp(calendar, BERLIN).isoformat() == "2029-09-20T00:00:00+02:00"
    # rolling: 220 now, then each old batch of 20 is replaced a day after it was sent, so every
    # day repeats; the millionth is the last batch of day 1999, 23 h (and a quarter second) in
    rolling = plan(limits("500/day"), "rolling", booked, now, 1_000_000, BERLIN)
    assert rolling == now + 1999 * 86400 + 23 * 3600 + 0.25
    # 500 sends at distinct times in the last day: each day repeats their spacing (ten million
    # one-message steps, unless whole days are skipped)
    spread = [now - 86400 + 172.8 * j + 0.1 for j in range(500)]
    assert plan(limits("500/day"), "rolling", spread, now, 10_000_000, BERLIN) == spread[-1] + 20_000 * 86400
    assert time.perf_counter() - started < 2.0


def test_capacity_until_end_of_today_and_across_dst() -> None:
    day = limits("500/day")
    now = at("2024-05-05T09:00+00:00")
    booked = [at("2024-05-05T08:00+00:00")] * 120
    assert capacity_until(day, "calendar", booked, now, at("2024-05-06T00:00+00:00"), UTC) == 380
    assert capacity_until(day, "calendar", booked, now, at("2024-05-06T00:00:01+00:00"), UTC) == 880
    assert capacity_until(day, "calendar", booked, now, now, UTC) == 0
    hourly = limits("10/hour")
    for date, hours in (("2024-03-31", 23), ("2024-10-27", 25), ("2024-06-01", 24)):
        start = datetime.fromisoformat(f"{date}T00:00").replace(tzinfo=BERLIN).timestamp()
        end = window_end(parse_limit("1/day"), "calendar", start, BERLIN)
        assert capacity_until(hourly, "calendar", [], start, end, BERLIN) == 10 * hours


def test_capacity_until_is_exclusive_of_until() -> None:
    assert capacity_until(limits("5/10s"), "rolling", [], T0, T0 + 20, UTC) == 10
    assert capacity_until(limits("5/10s"), "rolling", [], T0, T0 + 20.001, UTC) == 15


CASES = [
    ("rolling", ("3/10s",), UTC, "2024-01-01T00:00+00:00"),
    ("rolling", ("2/3s", "5/10s"), UTC, "2024-01-01T00:00+00:00"),
    ("rolling", ("4/1m", "10/1h"), UTC, "2024-01-01T00:00+00:00"),
    ("rolling", ("3/2s", "5/3s", "7/7s"), UTC, "2024-01-01T00:00+00:00"),
    ("rolling", ("20/minute", "100/hour", "500/day"), UTC, "2024-01-01T00:00+00:00"),
    ("calendar", ("2/minute", "5/hour", "40/day"), BERLIN, "2024-10-26T18:00+02:00"),
    ("calendar", ("3/minute", "7/hour"), BERLIN, "2024-03-31T00:30+01:00"),
    ("calendar", ("4/hour", "60/day"), ZoneInfo("America/New_York"), "2024-11-02T20:00-04:00"),
    ("calendar", ("2/minute", "9/hour", "50/day"), ZoneInfo("Asia/Kolkata"), "2024-06-01T21:10+05:30"),
    ("calendar", ("5/day",), ZoneInfo("America/Havana"), "2024-11-01T12:00-04:00"),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window,texts,tz,start", CASES)
def test_plan_and_capacity_until_match_sending_one_by_one(window: str, texts: tuple[str, ...],
                                                          tz: ZoneInfo, start: str, seed: int) -> None:
    rng, lims = random.Random(seed), limits(*texts)
    now = at(start) + rng.choice([0.0, 0.375, 17.5, 1234.0])
    span = lookback(lims)
    booked = sorted(now - rng.uniform(0, span) for _ in range(rng.randint(0, 2 * lims[-1].count)))
    sends = slow_sends(lims, window, booked, now, 300, tz)
    for n in [1, 2, 3, 7, 50, 151, 299, 300]:
        assert plan(lims, window, booked, now, n, tz) == sends[n - 1], n
    # `sends` stops at 300, so probe only up to its last time (until is exclusive)
    for until in sorted({sends[0], sends[1], min(sends[50] + 0.001, sends[-1]), sends[150], sends[-1]}):
        expected = sum(1 for t in sends if t < until)
        assert capacity_until(lims, window, booked, now, until, tz) == expected


def test_finish_time_of_several_accounts() -> None:
    now = at("2024-01-01T00:00+00:00")
    a = (limits("500/day"), "calendar", [])
    b = (limits("300/day"), "calendar", [now] * 300)        # spent for today
    c = (limits("5/10s"), "rolling", [now - 1.5] * 5)
    assert finish_time([a], now, 500, UTC) == now
    assert finish_time([a, b], now, 500, UTC) == now
    assert finish_time([a, b], now, 501, UTC) == now + 86400
    assert finish_time([a, b], now, 1300, UTC) == now + 86400
    assert finish_time([a, b], now, 1301, UTC) == now + 2 * 86400
    assert finish_time([c], now, 6, UTC) == now + 18.5
    assert finish_time([a, c], now, 505, UTC) == now + 8.5
    assert finish_time([a, (limits(), "rolling", [])], now, 10**9, UTC) == now
    assert finish_time([], now, 10, UTC) is None
    assert finish_time([a], now, 0, UTC) == now
