"""Which account takes the next message: smooth weighted round-robin over the eligible ones (DESIGN §5).

The cycle. Weights are divided by their common divisor; a cycle is W = sum(weights) turns, of
which account i (0-based, in config order, n accounts) holds weights[i]. The turns are laid out
by stride scheduling: the k-th turn of account i is due at ((i + 1/2) / n + k) / w_i, and turns
go in order of due time, ties by config order. Spreading the first turns by config position
makes equal weights go 1, 2, 3, 1, 2, 3, … and weights 1, 1, 1, 2 go 1, 2, 4, 3, 4, 1, 2, 4, 3, 4.
While the cycle is laid out, a turn passes to the next account due when the first would
otherwise come twice in a row, or leave no way to avoid that later in the cycle, wrap-around
included: so an account holding at most half the total weight is never picked twice in a row
(exhaustively checked for every weight vector of 2-7 accounts with weights 1-5). Each account
still gets exactly its weight in every W consecutive picks.

Why not nginx's smooth weighted round-robin: started from zero it gives 4, 1, 2, 3, 4, 4, 1, 2,
3, 4 for weights 1, 1, 1, 2 (account 4 twice at every cycle boundary), and its running "current
weight" per account has no good answer for an account that was skipped for a while.

State. One float per account, its position: the virtual time of its next turn, counted in
cycles, (cycle * W + turn + 1/2) / W. A pick takes the eligible account with the lowest
position and moves it to its following turn. The virtual time V of the latest pick is the
latest of every account's previous turn, so it needs no storage of its own. An account that was
ineligible (at a limit, cooling down, disabled), is new (position None), or whose position came
from another config is moved up to its first turn at or after V: it rejoins the cycle where it
would have been had it never left, with no burst of catch-up picks. Positions are returned
relative to the cycle V is in, so they stay below 3 however many picks have been made.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache


@dataclass(frozen=True)
class Slot:
    """An account in the rotation: its name, weight and stored position (None = never used)."""

    name: str
    weight: int
    position: float | None = None


def pick(slots: Sequence[Slot], eligible: Collection[str]) -> tuple[str | None, dict[str, float]]:
    """The account for the next message (None if none is eligible) and every slot's new position."""
    chosen, positions = picks(slots, eligible, 1)
    return (chosen[0] if chosen else None), positions


def picks(slots: Sequence[Slot], eligible: Collection[str], n: int,
          room: Mapping[str, int] | None = None) -> tuple[list[str], dict[str, float]]:
    """The accounts for the next n messages, as n calls of pick() would choose them.

    `room` caps how many of them an account may take (e.g. its capacity under its limits): it
    drops out of the batch once it has taken that many. Fewer than n come back when every
    eligible account has run out of room; none when nobody is eligible.
    """
    if not slots:
        return [], {}
    turns, total = _turns(slots)
    ticks = [_at_or_after(own, total, 0 if slot.position is None else math.floor(slot.position * total))
             for slot, own in zip(slots, turns)]
    latest = max(_before(own, total, tick) for own, tick in zip(turns, ticks))
    left = [n if room is None else room.get(slot.name, n) for slot in slots]
    ready = [i for i, slot in enumerate(slots) if slot.name in eligible and left[i] > 0]
    for i in ready:  # skipped accounts rejoin at their first turn after the latest pick
        ticks[i] = _at_or_after(turns[i], total, max(ticks[i], latest))
    # From here on every ready account's next turn is after the latest pick, so a pick is
    # the earliest next turn: a heap (turns are distinct: there are no ties).
    due = [(ticks[i], i) for i in ready]
    heapq.heapify(due)
    chosen: list[str] = []
    while due and len(chosen) < n:
        latest, i = due[0]
        ticks[i] = _at_or_after(turns[i], total, latest + 1)
        chosen.append(slots[i].name)
        left[i] -= 1
        if left[i] > 0:
            heapq.heapreplace(due, (ticks[i], i))
        else:
            heapq.heappop(due)
    ticks = [_at_or_after(own, total, max(tick, latest)) for own, tick in zip(turns, ticks)]
    # Whole cycles can go: every position moves by the same number of turns, order unchanged.
    shift = max(0, latest // total) * total
    return chosen, {slot.name: (tick - shift + 0.5) / total for slot, tick in zip(slots, ticks)}


def cycle(weights: Sequence[int]) -> list[int]:
    """One cycle of the rotation as 0-based config positions, e.g. [0, 1, 3, 2, 3] for 1, 1, 1, 2."""
    turns = _schedule(tuple(weights))
    order = sorted((turn, i) for i, own in enumerate(turns) for turn in own)
    return [i for _, i in order]


def _turns(slots: Sequence[Slot]) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Each slot's turns in one cycle, and the cycle's length; refuses bad weights and names."""
    names = [slot.name for slot in slots]
    if len(set(names)) != len(names):
        raise ValueError(f"account names in a rotation must be unique, got {names}")
    for slot in slots:
        if not isinstance(slot.weight, int) or slot.weight < 1:
            raise ValueError(f"account {slot.name}: weight must be an integer >= 1, got {slot.weight!r}")
    turns = _schedule(tuple(slot.weight for slot in slots))
    return turns, sum(len(own) for own in turns)


def _at_or_after(own: tuple[int, ...], total: int, tick: int) -> int:
    """The account's first turn at or after `tick` (ticks count turns from the first cycle)."""
    base, turn = divmod(tick, total)
    index = bisect_left(own, turn)
    return base * total + own[index] if index < len(own) else (base + 1) * total + own[0]


def _before(own: tuple[int, ...], total: int, tick: int) -> int:
    """The account's last turn before `tick`."""
    base, turn = divmod(tick, total)
    index = bisect_left(own, turn) - 1
    return base * total + own[index] if index >= 0 else (base - 1) * total + own[-1]


@lru_cache(maxsize=64)
def _schedule(weights: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Each account's turns (0 .. W-1) in one cycle, laid out as the module docstring says."""
    divisor = math.gcd(*weights)
    weights = tuple(w // divisor for w in weights)
    count, total = len(weights), sum(weights)
    left = list(weights)
    due = [Fraction(2 * i + 1, 2 * count * w) for i, w in enumerate(weights)]
    order: list[int] = []
    for _ in range(total):
        waiting = sorted((i for i in range(count) if left[i]), key=lambda i: (due[i], i))
        i = next((i for i in waiting if _keeps_apart(order, left, weights, i)), waiting[0])
        order.append(i)
        left[i] -= 1
        due[i] += Fraction(1, weights[i])
    return tuple(tuple(t for t, j in enumerate(order) if j == i) for i in range(count))


def _keeps_apart(order: list[int], left: list[int], weights: tuple[int, ...], i: int) -> bool:
    """Whether `i` can take the next turn and still leave no account that may be kept apart from
    itself (at most half the total weight) twice in a row, counting the cycle's wrap-around."""
    total = sum(weights)
    apart = [2 * w <= total for w in weights]
    if order and order[-1] == i and apart[i]:
        return False
    first = order[0] if order else i
    rest = total - len(order) - 1  # turns still to lay out after this one
    if rest == 0:
        return not (apart[i] and i == first and total > 1)
    for j, w in enumerate(weights):
        if not apart[j]:
            continue
        # j's remaining turns need gaps between them within `rest` places; the first place is
        # barred to j if j goes now, and the last if j opens the cycle (it wraps around to it).
        places = rest - (j == i) - (j == first)
        if left[j] - (j == i) > (places + 1) // 2:
            return False
    return True
