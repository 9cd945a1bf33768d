"""Subscriber files as Excel and other tools write them → validated subscriber records.

The pipeline: `file_layout` sniffs the encoding and the delimiter and finds the email and
name columns by their headers; then every row turns into a staged row (a `Subscriber`) or
a `Rejected` with its original line number and the reason. Nothing here touches the store;
`subscribers.import_file` feeds the records into it.
"""

from __future__ import annotations

import csv
import io
import json
import marshal
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any, BinaryIO, NamedTuple

from bulksend.addresses import (
    ADDRESS_LINES, DOT_ATOM_LOCAL, INVISIBLE, AddressValidator, InvalidAddress, address_key,
    strip_address,
)
from bulksend.errors import ImportFileError
from bulksend.file_layout import (
    SAMPLE_BYTES, Layout, Options, build_layout, check_encoding, detect_encoding,
    reject_binary_text, sniff_delimiter,
)

__all__ = [  # with what other modules use from file_layout and addresses through this one
    "MAX_NAME", "SAMPLE_BYTES", "AddressValidator", "Batch", "InvalidAddress", "Layout", "Options",
    "Rejected", "Subscriber", "address_key", "build_layout", "clean_text", "detect_encoding",
    "dump_batch", "load_batch", "open_batches", "open_rows", "read_records", "sniff_delimiter",
    "strip_address",
]

MAX_NAME = 500

# Characters that must never reach a stored value (with addresses.INVISIBLE): line and
# paragraph separators.
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]+")
_SPACES = re.compile(r" {2,}")
_NEEDS_CLEANING = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]|  |^\s|\s\Z"
)


class Subscriber(NamedTuple):
    """A valid row: the address as given, its dedupe key, name and attributes."""

    line: int
    email: str
    email_key: str
    domain: str
    name: str
    attributes: dict[str, str]


class Rejected(NamedTuple):
    """A row that was not imported, with its original line number and the reason."""

    line: int
    row: list[str]
    reason: str


# --- values ---------------------------------------------------------------------------


def clean_text(value: str) -> str:
    """A cell with every control character, line break and bidi override removed."""
    if not _NEEDS_CLEANING.search(value):
        return value  # the common case, checked by one scan
    value = _LINE_BREAKS.sub(" ", value)
    value = INVISIBLE.sub("", value)
    return _SPACES.sub(" ", value).strip()


# --- rows -----------------------------------------------------------------------------

# A valid row as the store takes it: line, email as given, email_key, ascii domain, name,
# attributes as a JSON object, and the caller's timestamp (stored as created/updated).
Staged = tuple[int, str, str, str, str, str, float]
_json_string = json.encoder.encode_basestring  # C; the same text json.dumps(ensure_ascii=False) writes


class Batch(NamedTuple):
    """Consecutive data rows of a file, converted."""

    rows: list[Staged]
    rejected: list[Rejected]  # empty unless the caller keeps them
    invalid: int
    position: int  # bytes of the file read so far


def dump_batch(batch: Batch) -> bytes:
    """A batch as bytes for another process: marshal is ~2x faster than pickle for these tuples."""
    return marshal.dumps((batch.rows, [tuple(item) for item in batch.rejected], batch.invalid,
                          batch.position))


def load_batch(data: bytes | memoryview) -> Batch:
    """The batch that `dump_batch` wrote."""
    rows, rejected, invalid, position = marshal.loads(data)
    return Batch(rows, [Rejected(*item) for item in rejected], invalid, position)


class _Converter:
    """Turns the data rows of one file into staged rows or rejections."""

    def __init__(self, layout: Layout, stamp: float) -> None:
        self.layout = layout
        self.stamp = stamp
        self.width = len(layout.header)
        self.validator = AddressValidator()
        # Keys are identifiers, so their JSON form is fixed: encode them once.
        self.attribute_json = tuple((index, _json_string(key) + ":") for index, key in layout.attributes)
        # The common case, every attribute present with nothing to escape, fills a template.
        self.template = "{" + ",".join(f'{key}"%s"' for _, key in self.attribute_json) + "}"
        indexes = [index for index, _ in layout.attributes]
        self.email = operator.itemgetter(layout.email_index)
        self.name = operator.itemgetter(layout.name_index) if layout.name_index is not None else None
        self.pick: Callable[[list[str]], tuple[str, ...]] = (
            operator.itemgetter(*indexes) if len(indexes) > 1  # type: ignore[assignment]
            else lambda row: tuple(row[index] for index in indexes))

    def row(self, line: int, row: list[str]) -> Staged | Rejected | None:
        """One row, every case handled; None for a blank row."""
        if not "".join(row).strip():  # a blank line or only delimiters is not a row
            return None
        layout, width = self.layout, self.width
        if len(row) > width and any(cell.strip() for cell in row[width:]):
            return Rejected(line, row, f"{len(row)} fields where the header has {width} "
                                       "(an unquoted delimiter?)")
        cells = row if len(row) >= width else row + [""] * (width - len(row))
        email = strip_address(cells[layout.email_index])
        if not email:
            return Rejected(line, row, "no email address")
        try:
            email_key, domain = self.validator.key(email)
        except InvalidAddress as exc:
            return Rejected(line, row, f"invalid address {email!r}: {exc}")
        if layout.name_index is not None:
            name = clean_text(cells[layout.name_index])
        elif layout.first_last is not None:
            name = clean_text(f"{cells[layout.first_last[0]]} {cells[layout.first_last[1]]}")
        else:
            name = ""
        if len(name) > MAX_NAME:
            return Rejected(line, row, f"name longer than {MAX_NAME} characters")
        # An empty cell is no value: it neither stores "" nor erases a value already known.
        attributes = ",".join([key + _json_string(value) for index, key in self.attribute_json
                               if (value := clean_text(cells[index]))])
        return (line, email, email_key, domain, name, "{" + attributes + "}", self.stamp)

    def batches(self, reader: Any, line: int, tell: Callable[[], int], size: int,
                keep_rejected: bool) -> Iterator[Batch]:
        """Batches of the next `size` data rows of `reader`, whose next row starts at `line`.

        A batch of plain rows (the common case) is converted at once by `_plain`; any
        other batch row by row by `_each`. After a batch that was not plain, the next
        1, 2, 4 ... 32 go straight to `_each`: a file with a bad row in every batch pays
        for `_plain` on few of them.
        """
        skip, backoff = 0, 1
        while True:
            rows, lines, line = _take(reader, line, size)
            staged = None
            if skip:
                skip -= 1
            else:
                staged = self._plain(rows, lines)
                skip, backoff = (0, 1) if staged is not None else (backoff, min(2 * backoff, 32))
            if staged is not None:
                yield Batch(staged, [], 0, tell())
            else:
                yield self._each(rows, lines, keep_rejected, tell)
            if len(rows) < size:
                return

    def _plain(self, rows: list[list[str]], lines: Sequence[int]) -> list[Staged] | None:
        """The rows converted, if each takes the fast path of `_each`; None otherwise.

        The same checks as `_each` makes on each row, made on all the rows joined into one
        string: at a million rows, a check per row in Python costs more than the parsing.
        """
        if self.layout.first_last is not None or {*map(len, rows)} != {self.width}:
            return None
        cells = "|".join(map("|".join, rows))
        if (not cells or not cells.isprintable() or "  " in cells or " |" in cells
                or "| " in cells or cells[0] == " " or cells[-1] == " "):
            return None
        emails = list(map(self.email, rows))
        text = "\n".join(emails) + "\n"
        if not text.isascii() or ADDRESS_LINES.fullmatch(text) is None:
            return None
        lowered = text.lower()
        keys = emails if lowered == text else lowered.split("\n")[:-1]
        domains = [key.rpartition("@")[2] for key in keys]
        verdicts = self.validator.verdicts
        # The key is the address lower-cased where the domain's ASCII form is itself.
        if list(map(verdicts.get, domains)) != domains:
            for domain in set(domains).difference(verdicts):  # domains not seen before
                self.validator.verdict(domain)
            if list(map(verdicts.get, domains)) != domains:
                return None
        names = list(map(self.name, rows)) if self.name is not None else [""] * len(rows)
        if max(map(len, names)) > MAX_NAME:
            return None
        values = list(map(self.pick, rows))
        if '"' in cells or "\\" in cells or "" in chain.from_iterable(values):
            attributes = list(map(self._attributes, rows))
        else:
            attributes = list(map(self.template.__mod__, values))
        return list(zip(lines, emails, keys, domains, names, attributes, repeat(self.stamp)))

    def _attributes(self, row: list[str]) -> str:
        """The attributes of a row whose cells need no cleaning, as a JSON object."""
        return "{" + ",".join([key + _json_string(row[index]) for index, key in self.attribute_json
                               if row[index]]) + "}"

    def _each(self, rows: list[list[str]], lines: Sequence[int], keep_rejected: bool,
              tell: Callable[[], int]) -> Batch:
        """The rows converted one by one.

        Most rows take the fast path: the address cell is plain ASCII at a domain seen
        before and no cell needs cleaning, which makes every step of `row()` an identity.
        Any other row goes through `row()`.
        """
        staged: list[Staged] = []
        rejected: list[Rejected] = []
        invalid = 0
        width, email_index, name_index = self.width, self.layout.email_index, self.layout.name_index
        fast = self.layout.first_last is None
        verdicts, dot_atom = self.validator.verdicts, DOT_ATOM_LOCAL.match
        stamp, template, pick = self.stamp, self.template, self.pick
        for this, row in zip(lines, rows):
            if fast and len(row) == width:
                email = row[email_index]
                local, _, domain = email.rpartition("@")
                ascii_domain = verdicts.get(domain)
                joined = "|".join(row)
                # What AddressValidator.key() accepts without email-validator, at a domain it
                # already found valid; and cells that clean_text() and strip_address() leave
                # as they are: printable, no doubled, leading or trailing space in any cell.
                if (ascii_domain.__class__ is str and email.isascii() and dot_atom(local)
                        and len(local) <= 64 and len(email) <= 254
                        and len(local) + len(ascii_domain) <= 253
                        and joined.isprintable() and "  " not in joined and " |" not in joined
                        and "| " not in joined and joined[0] != " " and joined[-1] != " "):
                    name = row[name_index] if name_index is not None else ""
                    if len(name) <= MAX_NAME:
                        values = pick(row)
                        if "" not in values and '"' not in joined and "\\" not in joined:
                            attributes = template % values
                        else:
                            attributes = self._attributes(row)
                        key = f"{local.lower()}@{ascii_domain}"
                        if key == email:
                            key = email  # one object: it crosses to the writing process once
                        staged.append((this, email, key, ascii_domain, name, attributes, stamp))
                        continue
            item = self.row(this, row)
            if item is None:
                continue
            if item.__class__ is Rejected:
                invalid += 1
                if keep_rejected:
                    rejected.append(item)  # type: ignore[arg-type]
                continue
            staged.append(item)  # type: ignore[arg-type]
        return Batch(staged, rejected, invalid, tell())


def _take(reader: Any, line: int, size: int) -> tuple[list[list[str]], Sequence[int], int]:
    """The next `size` rows of `reader` (fewer at the end), their first lines, the next line."""
    rows: list[list[str]] = []
    ends: list[int] = []  # the last line of each row
    for row in reader:
        rows.append(row)
        ends.append(reader.line_num)
        if len(rows) == size:
            break
    if not ends:
        return rows, (), line
    if ends[-1] - line + 1 == len(rows):  # one line per row, the common case
        return rows, range(line, line + len(rows)), ends[-1] + 1
    return rows, [line, *(end + 1 for end in ends[:-1])], ends[-1] + 1


def _records(text: io.TextIOWrapper, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(text, delimiter=delimiter)
    line = 1
    for row in reader:
        yield line, row
        line = reader.line_num + 1


def open_batches(stream: BinaryIO, source: str, options: Options = Options(), *,
                 size: int = 5_000, keep_rejected: bool = True, stamp: float = 0.0
                 ) -> tuple[Layout, Iterator[Batch]]:
    """Detect the layout of `stream` and return it with an iterator over its data rows in batches.

    Layout problems (not text, no email column) raise ImportFileError before any row is
    read, so callers can refuse a file before writing anything.
    """
    sample = stream.read(SAMPLE_BYTES)
    stream.seek(0)
    if not sample.strip():
        raise ImportFileError(f"{source}: the file is empty")
    encoding = check_encoding(options.encoding or detect_encoding(sample, source), source)
    text = io.TextIOWrapper(stream, encoding=encoding, errors="strict", newline="")
    try:
        head = text.read(SAMPLE_BYTES)
    except UnicodeDecodeError as exc:
        text.detach()
        raise ImportFileError(f"{source}: not valid {encoding}: {exc.reason} (use --encoding)") from None
    try:
        reject_binary_text(head, source)
        lines = head.splitlines(keepends=True)[:50]
        delimiter = options.delimiter or sniff_delimiter(lines[:-1] if len(lines) > 1 else lines)
        if len(delimiter) != 1:
            raise ImportFileError(f"{source}: the delimiter must be one character, got {delimiter!r}")
        text.seek(0)
        reader = csv.reader(text, delimiter=delimiter)
        first, line = None, 1
        for row in reader:
            first, line = (line, row), reader.line_num + 1
            if any(cell.strip() for cell in row):
                break
        else:
            raise ImportFileError(f"{source}: the file has no rows")
        layout = build_layout(first[1], encoding, delimiter, options, source)
    except BaseException:
        text.detach()  # the caller owns (and closes) the byte stream underneath
        raise
    converter = _Converter(layout, stamp)
    return layout, _batches(converter, first, reader, line, text, source, size, keep_rejected)


def _batches(converter: _Converter, first: tuple[int, list[str]], reader: Any, line: int,
             text: io.TextIOWrapper, source: str, size: int, keep_rejected: bool) -> Iterator[Batch]:
    tell = text.buffer.tell
    try:
        if not converter.layout.has_header:
            item = converter.row(*first)
            if item is not None:
                is_rejected = item.__class__ is Rejected
                yield Batch([] if is_rejected else [item], [item] if is_rejected and keep_rejected else [],  # type: ignore[list-item]
                            int(is_rejected), tell())
        yield from converter.batches(reader, line, tell, size, keep_rejected)
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{source}: not valid {converter.layout.encoding} after line "
                              f"{reader.line_num}: {exc.reason} (use --encoding)") from None
    except csv.Error as exc:
        raise ImportFileError(f"{source}: line {reader.line_num}: {exc}") from None
    finally:
        if not text.buffer.closed:
            text.detach()  # the caller owns (and closes) the byte stream underneath


def open_rows(stream: BinaryIO, source: str, options: Options = Options()
              ) -> tuple[Layout, Iterator[Subscriber | Rejected]]:
    """Like `open_batches`, one `Subscriber` or `Rejected` at a time, in file order."""
    layout, batches = open_batches(stream, source, options)

    def records() -> Iterator[Subscriber | Rejected]:
        for batch in batches:
            subscribers = [Subscriber(line, email, key, domain, name, json.loads(attributes))
                           for line, email, key, domain, name, attributes, _ in batch.rows]
            yield from sorted([*subscribers, *batch.rejected], key=lambda record: record.line)

    return layout, records()


def read_records(stream: BinaryIO, layout: Layout) -> Iterator[tuple[int, list[str]]]:
    """Every (line number, raw row) of a file whose layout is known, blank rows included."""
    stream.seek(0)
    text = io.TextIOWrapper(stream, encoding=layout.encoding, errors="replace", newline="")
    try:
        yield from _records(text, layout.delimiter)
    finally:
        if not text.buffer.closed:
            text.detach()
