"""Reading hostile incoming mail as text: MIME parts, header fields, report field blocks.

Messages come from the stdlib parser with `email.policy.compat32`, which keeps broken
header fields as raw text (8-bit bytes as surrogate escapes) instead of raising. Everything
here turns that into plain `str`, reads 8-bit text as UTF-8 (U+FFFD for what is not),
never raises on bad input, and uses only linear regexes.
"""

from __future__ import annotations

import binascii
import quopri
import re
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import Message

__all__ = [
    "blocks", "decoded_payload", "field_lines", "header", "headers", "message_id", "one_line",
    "part_text", "recipient", "subject", "walk",
]

_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_XTEXT = re.compile(r"\+(2B|3D)")  # RFC 3461 xtext for the two characters addresses use
_UNITEXT = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")  # RFC 6533 utf-8-addr-unitext
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")


def walk(msg: Message, limit: int, *, into_messages: bool = False) -> list[Message]:
    """The parts of the tree depth first, at most `limit` + 1, without recursion.

    Parts inside message/* parts (a returned original, report field blocks) are left out
    unless `into_messages`.
    """
    parts: list[Message] = []
    stack = [msg]
    while stack and len(parts) <= limit:
        part = stack.pop()
        parts.append(part)
        payload = part.get_payload()
        descend = into_messages or part.get_content_maintype() != "message"
        if isinstance(payload, list) and descend:
            stack.extend(reversed([sub for sub in payload if isinstance(sub, Message)]))
    return parts


def header(msg: Message, name: str) -> str | None:
    """The first `name` field (lower-case) as text: unfolded, 8-bit bytes read as UTF-8."""
    values = headers(msg, (name,))
    return values[0] if values else None


def headers(msg: Message, names: tuple[str, ...]) -> list[str]:
    """Every field named one of `names` (lower-case), in order, as `header` reads them."""
    return [_unescape(" ".join(value.split())) for key, value in msg.raw_items()
            if key.lower() in names and isinstance(value, str)]


def subject(msg: Message) -> str:
    """The Subject with RFC 2047 encoded-words decoded where they can be."""
    value = header(msg, "subject") or ""
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, ValueError, HeaderParseError):  # unknown charset, broken encoded-word
        return value


def message_id(msg: Message) -> str | None:
    """The Message-ID without <>, or None when absent or not one clean token."""
    value = one_line(header(msg, "message-id"))
    value = value and value.strip().removeprefix("<").removesuffix(">").strip()
    return value if value and len(value) <= 400 and " " not in value else None


def decoded_payload(part: Message, limit: int | None = None) -> str:
    """A leaf part's body as text: transfer encoding undone, read in its charset or UTF-8."""
    if part.is_multipart():
        return ""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    return _text(data[:limit], part.get_content_charset() or "utf-8")


def part_text(part: Message) -> str:
    """The text of a message/* report part; the parser splits such bodies into header blocks."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return decoded_payload(part)
    chunks = []
    for block in payload:
        chunks.append("".join(f"{key}: {value}\n" for key, value in block.raw_items())
                      .encode("utf-8", "surrogateescape"))
        body = block.get_payload(decode=True) if not block.is_multipart() else None
        chunks.append(b"\n" + body if isinstance(body, bytes) else b"\n")
    data = b"".join(chunks)
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if encoding == "base64":  # RFC 6533 allows it for global reports
        data = _base64(data)
    elif encoding == "quoted-printable":
        data = quopri.decodestring(data)
    return _text(data, "utf-8")


def field_lines(text: str) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of every "Name: value" line; a blank line → ("", "")."""
    fields: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            fields.append(("", ""))
        elif line[0] in " \t" and fields and fields[-1][0]:
            fields[-1] = (fields[-1][0], f"{fields[-1][1]} {line.strip()}")
        else:
            name, colon, value = line.partition(":")
            if colon and name.strip():
                fields.append((name.strip().lower(), value.strip()))
    return fields


def blocks(text: str) -> list[dict[str, str]]:
    """The blank-line separated field blocks of a status or feedback report (first value wins)."""
    found: list[dict[str, str]] = [{}]
    for name, value in field_lines(text):
        if not name:
            if found[-1]:
                found.append({})
        else:
            found[-1].setdefault(name, value)
    return [block for block in found if block]


def recipient(value: str | None) -> str | None:
    """The address in "rfc822; bob@example.com" (also utf-8 and xtext forms), or None."""
    if not value:
        return None
    kind, semicolon, address = value.partition(";")
    if not semicolon:
        kind, address = "rfc822", kind
    address = address.strip()
    if address.startswith("<"):
        address = address[1:].partition(">")[0]
    if address.startswith('"'):  # a quoted local part may hold spaces: "a b"@example.org
        local, quote, rest = address[1:].partition('"')
        words = rest.split()
        address = f'"{local}"{words[0].rstrip(",;>.")}' if quote and words else ""
    else:
        words = address.split()
        address = words[0].strip("<>.,;") if words else ""
    if kind.strip().lower() == "utf-8":
        address = _UNITEXT.sub(_unitext_char, address)
    else:
        address = _XTEXT.sub(lambda match: chr(int(match.group(1), 16)), address)
    return address if "@" in address and len(address) <= 320 else None


def one_line(text: str | None, limit: int = 500) -> str | None:
    """`text` with every run of whitespace and control characters one space, cut to `limit`."""
    text = _SPACE.sub(" ", text or "").strip()
    return text[:limit] or None


def _unescape(text: str) -> str:
    """Undo the parser's surrogateescape: raw 8-bit bytes become UTF-8 text (else U+FFFD)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _unitext_char(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(code) if 0x20 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"


def _base64(data: bytes) -> bytes:
    """Lenient base64: stray characters skipped, a broken tail dropped, never an error."""
    clean = _NOT_BASE64.sub(b"", data)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))


def _text(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, "replace")
    except LookupError:  # a charset Python does not know
        return data.decode("utf-8", "replace")
