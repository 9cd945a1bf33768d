"""The import's batch fast path (`_Converter._plain`) must convert exactly as the row-by-row
path (`_Converter._each`) does, on every batch it accepts: random batches mixing plain rows
with every kind of cell that needs cleaning or a full address check."""

from __future__ import annotations

import random

import pytest

from bulksend.file_layout import Options, build_layout
from bulksend.importer import _Converter

PLAIN_LOCAL = ["anna", "Boris.K", "c_d+news", "x", "o'neil", "UPPER"]
ODD_LOCAL = ["", "a..b", ".lead", '"quoted"', "ünï", "a" * 65, "sp ace"]
PLAIN_DOMAIN = ["example.com", "Mail.RU", "sub.example.org", "gmail.com"]
ODD_DOMAIN = ["bücher.de", "xn--bcher-kva.de", "localhost", "exa_mple.com", "-bad.com",
              "a" * 64 + ".com", "example.com.", "EXAMPLE.invalid"]
PLAIN_CELL = ["", "Anna Ivanova", "Иван", "free", "pro team", "Zoë", "x" * 40]
ODD_CELL = [" lead", "trail ", "two  spaces", "tab\there", "new\nline", "nul\0", 'q"uote',
            "back\\slash", "bidi\u202e", "pipe|cell", "pipe| space", "y" * 600, "\u2028"]


def cell(rng: random.Random) -> str:
    return rng.choice(ODD_CELL) if rng.random() < 0.03 else rng.choice(PLAIN_CELL)


def address(rng: random.Random) -> str:
    local = rng.choice(ODD_LOCAL) if rng.random() < 0.03 else rng.choice(PLAIN_LOCAL)
    domain = rng.choice(ODD_DOMAIN) if rng.random() < 0.03 else rng.choice(PLAIN_DOMAIN)
    text = f"{local}@{domain}"
    return f" {text}" if rng.random() < 0.01 else text


def batch(rng: random.Random, size: int, width: int) -> list[list[str]]:
    rows = []
    for _ in range(size):
        row = [address(rng)] + [cell(rng) for _ in range(width - 1)]
        if rng.random() < 0.005:
            row = row[:-1]  # a short row
        rows.append(row)
    return rows


@pytest.mark.parametrize("header", [["email", "name", "city", "plan"], ["email", "name"],
                                    ["e-mail", "city"], ["email", "first name", "last name"]])
def test_the_batch_fast_path_agrees_with_the_row_path(header: list[str]) -> None:
    rng = random.Random(f"fastpath-{header}")
    layout = build_layout(header, "utf-8", ",", Options(), "test.csv")
    accepted = 0
    for round_ in range(400):
        size = rng.choice([1, 2, 3, 17, 64])
        rows = batch(rng, size, len(header))
        lines = list(range(2 + round_ * 100, 2 + round_ * 100 + size))
        fast = _Converter(layout, 1.0)._plain(rows, lines)
        slow = _Converter(layout, 1.0)._each(rows, lines, True, lambda: 0)
        if fast is None:
            continue
        accepted += 1
        assert slow.invalid == 0 and not slow.rejected, (rows, slow.rejected)
        assert fast == slow.rows, rows
    # The fast path is taken for most batches without an odd row (else it proves nothing).
    assert accepted >= 40 or layout.first_last is not None, accepted
