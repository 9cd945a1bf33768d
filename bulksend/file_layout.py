"""Subscriber files as Excel and other tools write them: encoding, delimiter, columns.

Everything here is decided from the first block of a file, before any row is read: the
encoding (BOM, UTF-8, then cp1251/latin-1 by statistics), the delimiter, and which column
holds the address, the name and each attribute. `importer` then reads the rows.
"""

from __future__ import annotations

import codecs
import csv
import re
from dataclasses import dataclass

import charset_normalizer

from bulksend.errors import ImportFileError

SAMPLE_BYTES = 64 * 1024
DELIMITERS = (",", ";", "\t", "|")
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
_EMAILISH = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+\Z")


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


def check_encoding(encoding: str, source: str) -> str:
    """The canonical name of `encoding`; ImportFileError if Python does not know it."""
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


def reject_binary_text(head: str, source: str) -> None:
    """ImportFileError if the decoded first block holds too many control characters."""
    controls = sum(1 for ch in head if ch < " " and ch not in "\t\r\n")
    if controls > max(8, len(head) // 100):
        raise ImportFileError(f"{source}: not a text file ({controls} control characters "
                              "in the first block)")
