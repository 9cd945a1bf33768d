"""Subscriber files as Excel and other tools write them → validated subscriber records.

The pipeline: sniff the encoding (BOM, UTF-8, then cp1251/latin-1 by statistics), sniff the
delimiter, find the email and name columns by their headers, then turn every row into a
`Subscriber` or a `Rejected` with its original line number and the reason. Nothing here
touches the store; `subscribers.import_file` feeds the records into it.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import charset_normalizer
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from bulksend.errors import AddressError, ImportFileError

SAMPLE_BYTES = 64 * 1024
DELIMITERS = (",", ";", "\t", "|")
MAX_NAME = 500
csv.field_size_limit(1 << 20)  # a long attribute is data; the stdlib default is 128 KiB

# Headers are compared after `_header_key`: lower case, letters and digits only.
EMAIL_HEADERS = frozenset({
    "email", "mail", "emailaddress", "mailaddress", "emails", "email1", "primaryemail",
    "почта", "элпочта", "электроннаяпочта", "адрес", "адресэлектроннойпочты", "адреспочты",
    "емейл", "емэйл", "имейл", "мейл", "emailадрес", "ящик", "courriel", "correo",
    "correoelectronico", "adresseemail", "epost", "posta",
})
NAME_HEADERS = frozenset({
    "name", "fullname", "displayname", "contactname", "subscribername", "имя", "фио",
    "имяфамилия", "полноеимя", "nom", "nombre", "nomcomplet",
})
FIRST_NAME_HEADERS = frozenset({"firstname", "first", "givenname", "forename", "имяотчество"})
LAST_NAME_HEADERS = frozenset({"lastname", "last", "surname", "familyname", "фамилия"})

# Signatures of files people pick by mistake, for a message that says what to do instead.
BINARY_SIGNATURES = {
    b"PK\x03\x04": "a ZIP archive (an Excel .xlsx workbook?); save it as CSV",
    b"\xd0\xcf\x11\xe0": "an old Excel .xls workbook; save it as CSV",
    b"%PDF": "a PDF document",
}

# Characters that must never reach a stored value: C0/C1 controls, line and paragraph
# separators, and the bidi overrides used to disguise text.
_LINE_BREAKS = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]+")
_INVISIBLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_SPACES = re.compile(r" {2,}")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
_EMAILISH = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+\Z")
# Plain ASCII host names that email-validator accepts as they are (lower-cased); anything
# else (IDN, "--" labels, odd TLDs, special-use names) is left to email-validator itself.
_PLAIN_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\Z")
_SPECIAL_USE = tuple(SPECIAL_USE_DOMAIN_NAMES)
_NEEDS_CLEANING = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]|  |^\s|\s\Z"
)


@dataclass(frozen=True)
class Options:
    """How to read a file; None means detect."""

    encoding: str | None = None
    delimiter: str | None = None
    email_column: str | None = None


@dataclass(frozen=True)
class Layout:
    """What was detected about a file: encoding, delimiter and the meaning of each column."""

    encoding: str
    delimiter: str
    has_header: bool
    header: tuple[str, ...]
    email_index: int
    name_index: int | None
    first_last: tuple[int, int] | None  # name built from first + last name columns
    attributes: tuple[tuple[int, str], ...]  # (column index, attribute key)


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


# --- encoding -------------------------------------------------------------------------


def detect_encoding(sample: bytes, source: str) -> str:
    """The encoding of a file from its first bytes; raises ImportFileError if it is not text."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if sample.startswith(bom):
            return encoding
    for signature, what in BINARY_SIGNATURES.items():
        if sample.startswith(signature):
            raise ImportFileError(f"{source}: not a text file: {what}")
    nuls = sample.count(b"\x00")
    if nuls > max(2, len(sample) // 1000):  # a stray NUL in a cell is data; many mean binary
        offset = sample.index(b"\x00")
        raise ImportFileError(f"{source}: not a text file ({nuls} NUL bytes, the first at "
                              f"offset {offset})")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    best = charset_normalizer.from_bytes(
        sample, cp_isolation=["cp1251", "cp1252", "latin_1", "koi8_r"]
    ).best()
    if best is None:
        raise ImportFileError(f"{source}: not a text file, or an unknown encoding (use --encoding)")
    return best.encoding


def _check_encoding(encoding: str, source: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ImportFileError(f"{source}: unknown encoding {encoding!r}") from None


# --- layout ---------------------------------------------------------------------------


def _header_key(value: str) -> str:
    return "".join(ch for ch in value.lower() if ch.isalnum())


def _attribute_key(value: str, index: int, taken: set[str]) -> str:
    key = re.sub(r"\W+", "_", value.strip().lower()).strip("_")
    if not key or not key.isidentifier():
        key = f"col{index + 1}" if not key else f"c_{key}"
    base, n = key, 2
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def sniff_delimiter(lines: list[str]) -> str:
    """The delimiter that splits the sample into the most consistent number of fields."""
    best, best_score = ",", (0.0, 0)
    for delimiter in DELIMITERS:
        rows = [row for row in csv.reader(lines, delimiter=delimiter) if row]
        if not rows or len(rows[0]) < 2:
            continue
        width = len(rows[0])
        consistent = sum(1 for row in rows if len(row) == width) / len(rows)
        if (consistent, width) > best_score:
            best, best_score = delimiter, (consistent, width)
    return best


def _find_column(header: list[str], names: frozenset[str]) -> int | None:
    keys = [_header_key(cell) for cell in header]
    for index, key in enumerate(keys):
        if key in names:
            return index
    return None


def _email_column(header: list[str], wanted: str | None, source: str) -> int | None:
    if wanted is not None:
        if wanted.isdigit() and 1 <= int(wanted) <= len(header):
            return int(wanted) - 1
        for index, cell in enumerate(header):
            if cell.strip().lower() == wanted.strip().lower():
                return index
        raise ImportFileError(
            f"{source}: no column {wanted!r} (columns: {', '.join(header) or 'none'})"
        )
    found = _find_column(header, EMAIL_HEADERS)
    if found is None:  # "Work email", "E-mail (primary)": one header that mentions mail
        loose = [i for i, cell in enumerate(header)
                 if any(part in _header_key(cell) for part in ("email", "почт"))]
        found = loose[0] if len(loose) == 1 else None
    return found


def build_layout(first_row: list[str], encoding: str, delimiter: str, options: Options,
                 source: str) -> Layout:
    """Decide which column holds the address, the name and each attribute."""
    header = [cell.strip() for cell in first_row]
    addresses = [i for i, cell in enumerate(header) if _EMAILISH.match(cell)]
    has_header = not addresses  # a first row holding an address is data, not a header
    if has_header:
        email_index = _email_column(header, options.email_column, source)
    else:
        header = [f"col{i + 1}" for i in range(len(header))]
        email_index = (addresses[0] if options.email_column is None
                       else _email_column(header, options.email_column, source))
    if email_index is None:
        shown = ", ".join(repr(cell) for cell in header[:8]) or "an empty first row"
        raise ImportFileError(
            f"{source}: no email column found (first row: {shown}); "
            "name it 'email' or pass --email-column"
        )
    name_index = _find_column(header, NAME_HEADERS) if has_header else None
    first_last = None
    if name_index is None and has_header:
        first, last = _find_column(header, FIRST_NAME_HEADERS), _find_column(header, LAST_NAME_HEADERS)
        if first is not None and last is not None:
            first_last = (first, last)
    taken: set[str] = set()
    attributes = tuple(
        (index, _attribute_key(cell, index, taken))
        for index, cell in enumerate(header)
        if index not in (email_index, name_index)
    )
    return Layout(encoding, delimiter, has_header, tuple(header), email_index, name_index,
                  first_last, attributes)


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
        self._domains: dict[str, str | InvalidAddress] = {}
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
        verdict = self._domains.get(domain)
        if verdict is None:
            if len(self._domains) >= self._cache_size:
                self._domains.clear()
            verdict = self._domains[domain] = self._check_domain(domain)
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


def _subscriber(line: int, row: list[str], layout: Layout, validator: AddressValidator
                ) -> Subscriber | Rejected:
    width = len(layout.header)
    if len(row) > width and any(cell.strip() for cell in row[width:]):
        return Rejected(line, row, f"{len(row)} fields where the header has {width} "
                                   "(an unquoted delimiter?)")
    cells = row if len(row) >= width else row + [""] * (width - len(row))
    email = strip_address(cells[layout.email_index])
    if not email:
        return Rejected(line, row, "no email address")
    try:
        email_key, domain = validator.key(email)
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
    attributes = {key: value for index, key in layout.attributes if (value := clean_text(cells[index]))}
    return Subscriber(line, email, email_key, domain, name, attributes)


def _records(text: io.TextIOWrapper, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(text, delimiter=delimiter)
    line = 1
    try:
        for row in reader:
            yield line, row
            line = reader.line_num + 1
    finally:
        if not text.buffer.closed:
            text.detach()  # the caller owns (and closes) the byte stream underneath


def open_rows(stream: BinaryIO, source: str, options: Options = Options()
              ) -> tuple[Layout, Iterator[Subscriber | Rejected]]:
    """Detect the layout of `stream` and return it with an iterator over its data rows.

    Layout problems (not text, no email column) raise ImportFileError before any row is
    read, so callers can refuse a file before writing anything.
    """
    sample = stream.read(SAMPLE_BYTES)
    stream.seek(0)
    if not sample.strip():
        raise ImportFileError(f"{source}: the file is empty")
    encoding = _check_encoding(options.encoding or detect_encoding(sample, source), source)
    text = io.TextIOWrapper(stream, encoding=encoding, errors="strict", newline="")
    try:
        head = text.read(SAMPLE_BYTES)
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{source}: not valid {encoding}: {exc.reason} (use --encoding)") from None
    _reject_binary_text(head, source)
    lines = head.splitlines(keepends=True)[:50]
    delimiter = options.delimiter or sniff_delimiter(lines[:-1] if len(lines) > 1 else lines)
    if len(delimiter) != 1:
        raise ImportFileError(f"{source}: the delimiter must be one character, got {delimiter!r}")
    text.seek(0)
    records = _records(text, delimiter)
    first = next(((n, row) for n, row in records if any(cell.strip() for cell in row)), None)
    if first is None:
        raise ImportFileError(f"{source}: the file has no rows")
    layout = build_layout(first[1], encoding, delimiter, options, source)
    return layout, _rows(first, records, layout, source)


def _reject_binary_text(head: str, source: str) -> None:
    controls = sum(1 for ch in head if ch < " " and ch not in "\t\r\n")
    if controls > max(8, len(head) // 100):
        raise ImportFileError(f"{source}: not a text file ({controls} control characters "
                              "in the first block)")


def _rows(first: tuple[int, list[str]], records: Iterator[tuple[int, list[str]]],
          layout: Layout, source: str) -> Iterator[Subscriber | Rejected]:
    validator = AddressValidator()
    if not layout.has_header:
        yield _subscriber(first[0], first[1], layout, validator)
    try:
        for line, row in records:
            if "".join(row).strip():  # a blank line or only delimiters is not a row
                yield _subscriber(line, row, layout, validator)
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{source}: not valid {layout.encoding} after line {line}: "
                              f"{exc.reason} (use --encoding)") from None
    except csv.Error as exc:
        raise ImportFileError(f"{source}: line {line}: {exc}") from None


def read_records(stream: BinaryIO, layout: Layout) -> Iterator[tuple[int, list[str]]]:
    """Every (line number, raw row) of a file whose layout is known, blank rows included."""
    stream.seek(0)
    text = io.TextIOWrapper(stream, encoding=layout.encoding, errors="replace", newline="")
    return _records(text, layout.delimiter)
