"""Rotation: exact weighted shares, no account twice in a row, no catch-up bursts, stable state."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Collection, Sequence

import pytest

from bulksend.rotation import Slot, cycle, pick, picks


def accounts(*weights: int) -> list[Slot]:
    return [Slot(f"a{i + 1}", weight) for i, weight in enumerate(weights)]


def stored(slots: Sequence[Slot], positions: dict[str, float]) -> list[Slot]:
    """The slots as the store would hand them back after saving `positions`."""
    return [Slot(s.name, s.weight, positions.get(s.name, s.position)) for s in slots]


def run(slots: Sequence[Slot], count: int, eligible: Collection[str] | None = None
        ) -> tuple[list[str], list[Slot]]:
    """`count` single picks, each persisting every position as a float, like the sender does."""
    names = []
    for _ in range(count):
        name, positions = pick(slots, {s.name for s in slots} if eligible is None else eligible)
        assert name is not None
        names.append(name)
        slots = stored(slots, positions)
    return names, slots


def windows(sequence: list[str], size: int) -> list[Counter[str]]:
    return [Counter(sequence[i:i + size]) for i in range(len(sequence) - size + 1)]


def repeats(sequence: list[str]) -> set[str]:
    return {a for a, b in zip(sequence, sequence[1:]) if a == b}


@pytest.mark.parametrize("count", range(1, 9))
@pytest.mark.parametrize("weight", [1, 3])
def test_equal_weights_go_one_two_three_in_config_order(count: int, weight: int) -> None:
    slots = accounts(*[weight] * count)
    names, _ = run(slots, 5 * count)
    assert names == [s.name for s in slots] * 5


def test_weights_1_1_1_2_go_1_2_4_3_4() -> None:
    names, _ = run(accounts(1, 1, 1, 2), 1000)
    assert names[:10] == ["a1", "a2", "a4", "a3", "a4"] * 2
    assert all(w == {"a1": 1, "a2": 1, "a3": 1, "a4": 2} for w in windows(names, 5))
    assert repeats(names) == set()
    assert Counter(names) == {"a1": 200, "a2": 200, "a3": 200, "a4": 400}


def test_nginx_counterexample_weights_3_1_1_1_alternate() -> None:
    # plain stride with the same spread would pick a1 twice in a row here
    assert cycle([3, 1, 1, 1]) == [0, 1, 0, 2, 0, 3]
    names, _ = run(accounts(3, 1, 1, 1), 60)
    assert repeats(names) == set()


def check_properties(weights: Sequence[int], names: list[str]) -> None:
    total = sum(weights)
    shares = {f"a{i + 1}": w for i, w in enumerate(weights)}
    # every run of W consecutive picks, wherever it starts, holds each account exactly its weight
    assert all(w == {a: k for a, k in shares.items()} for w in windows(names, total)), weights
    kept_apart = {a for a, w in shares.items() if 2 * w <= total}
    assert repeats(names) & kept_apart == set(), weights


@pytest.mark.parametrize("weights", [ws for n in range(2, 5)
                                     for ws in itertools.product(range(1, 6), repeat=n)])
def test_every_small_weight_vector_keeps_shares_and_spacing(weights: tuple[int, ...]) -> None:
    names, _ = picks(accounts(*weights), {f"a{i + 1}" for i in range(len(weights))}, 3 * sum(weights))
    check_properties(weights, names)


@pytest.mark.parametrize("seed", range(300))
def test_random_weight_vectors_keep_shares_and_spacing(seed: int) -> None:
    rng = random.Random(seed)
    weights = [rng.randint(1, rng.choice([5, 5, 8])) for _ in range(rng.randint(2, 8))]
    slots = accounts(*weights)
    names, _ = run(slots, 2 * sum(weights) + 7)
    check_properties(weights, names)
    assert picks(slots, {s.name for s in slots}, len(names))[0] == names


def test_one_account_takes_every_message() -> None:
    assert run(accounts(4), 5)[0] == ["a1"] * 5


@pytest.mark.parametrize("weights,away", [((1, 1, 1, 2), "a4"), ((1, 1, 1, 2), "a1"),
                                          ((3, 1, 1, 1), "a1"), ((2, 5, 1, 3), "a2")])
def test_an_account_back_from_100_skipped_picks_gets_no_burst(weights: tuple[int, ...], away: str) -> None:
    slots = accounts(*weights)
    total, share = sum(weights), dict(zip((s.name for s in slots), weights))
    names, slots = run(slots, 13)
    others = {s.name for s in slots} - {away}
    skipped, slots = run(slots, 100, others)
    assert away not in skipped
    # meanwhile the others share its turns in proportion to their weights
    rest = Counter({n: w for n, w in share.items() if n != away})
    assert all(w == rest for w in windows(skipped, rest.total()))
    back, _ = run(slots, 10 * total)
    # from its return on, every run of W picks holds it exactly its weight: never more
    assert all(w[away] == share[away] for w in windows(back, total))
    assert all(w == Counter(share) for w in windows(back, total))


def test_skipped_accounts_share_the_turns_among_the_rest() -> None:
    slots = accounts(1, 1, 1, 2)
    names, _ = run(slots, 40, {"a1", "a2", "a3"})
    assert names == ["a1", "a2", "a3"] * 13 + ["a1"]
    names, _ = run(slots, 30, {"a2", "a4"})
    assert Counter(names) == {"a2": 10, "a4": 20}


def test_room_caps_an_account_within_a_batch() -> None:
    slots = accounts(1, 1, 1, 2)
    names, positions = picks(slots, {"a1", "a2", "a3", "a4"}, 10, room={"a4": 1, "a2": 0})
    assert names == ["a1", "a4", "a3", "a1", "a3", "a1", "a3", "a1", "a3", "a1"]
    # the capped accounts rejoin afterwards without catching up
    after, _ = run(stored(slots, positions), 10)
    assert all(w == {"a1": 1, "a2": 1, "a3": 1, "a4": 2} for w in windows(after, 5))
    assert picks(slots, {"a1"}, 5, room={"a1": 2})[0] == ["a1", "a1"]


def test_nobody_eligible() -> None:
    slots = accounts(1, 2)
    name, positions = pick(slots, set())
    assert name is None
    assert set(positions) == {"a1", "a2"}  # initial positions, ready to persist
    assert pick(slots, {"someone-else"})[0] is None
    assert picks(slots, set(), 5)[0] == []
    assert pick([], {"a1"}) == (None, {})


def test_picks_equals_successive_single_picks() -> None:
    rng = random.Random(5)
    for _ in range(50):
        slots = accounts(*[rng.randint(1, 6) for _ in range(rng.randint(1, 7))])
        _, slots = run(slots, rng.randint(0, 20))
        eligible = {s.name for s in slots if rng.random() < 0.7} or {slots[0].name}
        count = rng.randint(0, 60)
        batch, positions = picks(slots, eligible, count)
        one_by_one, after = run(slots, count, eligible)
        assert batch == one_by_one
        assert positions == {s.name: s.position for s in after}


def test_whole_cycles_added_to_positions_change_nothing() -> None:
    _, slots = run(accounts(2, 3, 1, 1), 11)
    for cycles in (1, 1000, 10**9):
        moved = [Slot(s.name, s.weight, s.position + cycles) for s in slots]
        assert run(moved, 50)[0] == run(slots, 50)[0]
        assert picks(moved, {"a1", "a2", "a4"}, 7) == picks(slots, {"a1", "a2", "a4"}, 7)


def test_positions_stay_small_after_a_million_picks() -> None:
    slots = accounts(1, 1, 1, 2)
    names, positions = picks(slots, {s.name for s in slots}, 1_000_000)
    assert Counter(names) == {"a1": 200_000, "a2": 200_000, "a3": 200_000, "a4": 400_000}
    assert all(0 <= p < 3 for p in positions.values())
    assert run(stored(slots, positions), 10)[0] == ["a1", "a2", "a4", "a3", "a4"] * 2


def test_positions_of_long_disabled_accounts_stay_small_too() -> None:
    slots = accounts(1, 1, 1)
    names, positions = picks(slots, {"a1", "a2"}, 100_001)
    assert names[-1] == "a1"
    assert all(0 <= p < 3 for p in positions.values())
    # a3 rejoins at its next turn after a1's, as if it had never been away
    assert run(stored(slots, positions), 6)[0] == ["a2", "a3", "a1"] * 2


def test_removed_account_leaves_the_rest_in_step() -> None:
    _, slots = run(accounts(1, 1, 1, 2), 7)
    remaining = [s for s in slots if s.name != "a3"]
    names, _ = run(remaining, 40)
    assert repeats(names) == set()
    assert all(w == {"a1": 1, "a2": 1, "a4": 2} for w in windows(names, 4))


def test_added_account_joins_without_a_burst() -> None:
    _, slots = run(accounts(1, 1, 2), 1001)
    grown = [*slots, Slot("a4", 2, None)]
    names, _ = run(grown, 60)
    assert names.count("a4") == 20
    assert all(w == {"a1": 1, "a2": 1, "a3": 2, "a4": 2} for w in windows(names, 6))


def test_changed_weight_takes_effect() -> None:
    _, slots = run(accounts(1, 1, 1, 2), 9)
    reweighted = [Slot(s.name, 3 if s.name == "a1" else s.weight, s.position) for s in slots]
    names, _ = run(reweighted, 70)
    assert repeats(names) == set()
    assert all(w == {"a1": 3, "a2": 1, "a3": 1, "a4": 2} for w in windows(names, 7))


@pytest.mark.parametrize("slots,message", [
    ([Slot("a", 1), Slot("a", 2)], "unique"),
    ([Slot("a", 0)], "weight"),
    ([Slot("a", -1)], "weight"),
])
def test_bad_slots_are_refused(slots: list[Slot], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pick(slots, {"a"})
