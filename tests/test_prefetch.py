"""`prefetch.in_child`: an iterator run in a forked process, its items and errors handed back."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from bulksend import prefetch
from bulksend.errors import ImportFileError


def pids_and_numbers(count: int) -> Iterator[tuple[int, int]]:
    """(the pid of the process that makes each item, the item)."""
    for number in range(count):
        yield os.getpid(), number


def test_items_are_made_in_another_process_and_arrive_in_order() -> None:
    with prefetch.in_child(pids_and_numbers(1000)) as items:
        got = list(items)

    assert [number for _, number in got] == list(range(1000))
    assert {pid for pid, _ in got} - {os.getpid()} == {got[0][0]}


def failing_after(count: int) -> Iterator[int]:
    """`count` items, then the error a bad file raises."""
    yield from range(count)
    raise ImportFileError(f"f.csv: line {count + 1}: field larger than field limit")


def test_an_error_in_the_child_is_raised_here_after_the_items_before_it() -> None:
    got: list[int] = []
    with pytest.raises(ImportFileError, match=r"^f.csv: line 4: field larger"):
        with prefetch.in_child(failing_after(3)) as items:
            got.extend(items)
    assert got == [0, 1, 2]


def test_leaving_the_block_early_stops_an_endless_child() -> None:
    with prefetch.in_child(itertools.count()) as items:
        first = list(itertools.islice(items, 5))
    # Reaching this line at all means the child was stopped: it would never end by itself.
    assert first == [0, 1, 2, 3, 4]
