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
import operator
import re
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from bulksend.errors import AddressError, ImportFileError
from bulksend.file_layout import (
    SAMPLE_BYTES, Layout, Options, build_layout, check_encoding, detect_encoding,
    reject_binary_text, sniff_delimiter,
)

MAX_NAME = 500

# Characters that must never reach a stored value: C0/C1 controls, line and paragraph
# separators, and the bidi overrides used to disguise text.
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]+")
_INVISIBLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_SPACES = re.compile(r" {2,}")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
# Plain ASCII host names that email-validator accepts as they are (lower-cased); anything
# else (IDN, "--" labels, odd TLDs, special-use names) is left to email-validator itself.
_PLAIN_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\Z")
_SPECIAL_USE = tuple(SPECIAL_USE_DOMAIN_NAMES)
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


class InvalidAddress(ValueError):
    """An email address that fails validation; the message says why."""


# --- values ---------------------------------------------------------------------------


def clean_text(value: str) -> str:
    """A cell with every control character, line break and bidi override removed."""
    if not _NEEDS_CLEANING.search(value):
        return value  # the common case, checked by one scan
    value = _LINE_BREAKS.sub(" ", value)
    value = _INVISIBLE.sub("", value)
    return _SPACES.sub(" ", value).strip()


def strip_address(raw: str) -> str:
    """An address cell without spaces, invisible characters, `mailto:` or angle brackets."""
    if raw.isascii():  # ASCII controls inside an address make it invalid; no need to strip them
        value = raw.strip()
    else:
        value = _INVISIBLE.sub("", unicodedata.normalize("NFC", raw)).strip().strip("\u00a0").strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


class AddressValidator:
    """Validates addresses with email-validator, caching the verdict on each domain.

    Most rows of a real list are plain ASCII local parts at a few thousand domains, so the
    domain is validated once and the local part by the RFC 5322 dot-atom rule; anything
    else (quoted or internationalised local parts) goes to email-validator whole.
    """

    def __init__(self, cache_size: int = 200_000) -> None:
        self.verdicts: dict[str, str | InvalidAddress] = {}  # domain as given -> verdict
        self._cache_size = cache_size

    def key(self, address: str) -> tuple[str, str]:
        """(email_key, ascii domain) for a valid address; raises InvalidAddress."""
        local, at, domain = address.rpartition("@")
        if at and len(local) <= 64 and len(address) <= 254 and _DOT_ATOM_LOCAL.match(local):
            ascii_domain = self._domain(domain)
            if len(local) + 1 + len(ascii_domain) <= 254:
                return f"{local.lower()}@{ascii_domain}", ascii_domain
        return self._full(address)

    def _domain(self, domain: str) -> str:
        verdict = self.verdicts.get(domain)
        if verdict is None:
            if len(self.verdicts) >= self._cache_size:
                self.verdicts.clear()
            verdict = self.verdicts[domain] = self._check_domain(domain)
        if isinstance(verdict, InvalidAddress):
            raise verdict
        return verdict

    def _check_domain(self, domain: str) -> str | InvalidAddress:
        plain = domain.lower()
        if (len(plain) <= 253 and _PLAIN_DOMAIN.match(plain) and "--" not in plain
                and not self._special(plain)):
            return plain
        try:
            return validate_email(f"a@{domain}", check_deliverability=False).ascii_domain.lower()
        except EmailNotValidError as exc:
            return InvalidAddress(str(exc))

    @staticmethod
    def _special(domain: str) -> bool:
        return any(domain == name or domain.endswith("." + name) for name in _SPECIAL_USE)

    @staticmethod
    def _full(address: str) -> tuple[str, str]:
        try:
            valid = validate_email(address, check_deliverability=False)
        except EmailNotValidError as exc:
            raise InvalidAddress(str(exc)) from None
        domain = valid.ascii_domain.lower()
        return f"{valid.local_part.lower()}@{domain}", domain


def address_key(email: str) -> str:
    """The dedupe key of an address a user typed; AddressError if it is not valid."""
    try:
        return AddressValidator().key(strip_address(email))[0]
    except InvalidAddress as exc:
        raise AddressError(f"invalid address {email!r}: {exc}") from None


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
        """Batches of `size` valid rows from `reader`, whose next row starts at `line`.

        Most rows take the fast path: the address cell is plain ASCII at a domain seen
        before and no cell needs cleaning, which makes every step of `row()` an identity.
        Any other row goes through `row()`. The loop is one function on purpose: at a
        million rows, each call or attribute lookup per row costs a visible fraction.
        """
        rows: list[Staged] = []
        rejected: list[Rejected] = []
        invalid = 0
        width, email_index, name_index = self.width, self.layout.email_index, self.layout.name_index
        fast = self.layout.first_last is None
        verdicts, dot_atom, attribute_json = self.validator.verdicts, _DOT_ATOM_LOCAL.match, self.attribute_json
        stamp, template, pick = self.stamp, self.template, self.pick
        for row in reader:
            this, line = line, reader.line_num + 1
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
                            attributes = "{" + ",".join([key + _json_string(row[index]) for index, key
                                                         in attribute_json if row[index]]) + "}"
                        key = f"{local.lower()}@{ascii_domain}"
                        if key == email:
                            key = email  # one object: it pickles (to a parsing process) once
                        rows.append((this, email, key, ascii_domain, name, attributes, stamp))
                        if len(rows) >= size:
                            yield Batch(rows, rejected, invalid, tell())
                            rows, rejected, invalid = [], [], 0
                        continue
            item = self.row(this, row)
            if item is None:
                continue
            if item.__class__ is Rejected:
                invalid += 1
                if keep_rejected:
                    rejected.append(item)  # type: ignore[arg-type]
                continue
            rows.append(item)  # type: ignore[arg-type]
            if len(rows) >= size:
                yield Batch(rows, rejected, invalid, tell())
                rows, rejected, invalid = [], [], 0
        yield Batch(rows, rejected, invalid, tell())


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
