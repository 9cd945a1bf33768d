"""Header fields written by hand (RFC 5322, RFC 2047), safe for any merged value.

The stdlib `email` package is not used to produce bytes: Python 3.11 turns an encoded-word
carrying CR/LF into a real header when it refolds, writes encoded-words inside addresses and
lets lines grow past 998 octets. Here every value first loses its control characters
(`clean`), so nothing merged can end a line; text that is not plain ASCII, or that holds
"=?" (which a decoder would take for an encoded-word), is written as base64 encoded-words
whose decoded form is exactly the text; and lines are folded only at existing spaces.
"""

from __future__ import annotations

import binascii
import re
import time
from functools import lru_cache
from urllib.parse import quote

import idna

LINE = 78  # folding target (RFC 5322 §2.1.1)
ENCODED_LINE = 76  # a line holding encoded-words (RFC 2047 §2)
MAX_LINE = 998

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]+")  # + lone surrogates
_SEGMENT = re.compile(r" *[^ ]+")
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"  # RFC 6532 adds UTF-8 to atext
_PHRASE_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_SIMPLE_ADDRESS = re.compile(r"[A-Za-z0-9._%+=-]+@[A-Za-z0-9.-]+")  # nothing to do for these
_URI_SAFE = "!#$%&'()*+,-./:;=?@[]_~"
_PLAIN_URI = re.compile(r"[A-Za-z0-9!#$%&'()*+,\-./:;=?@\[\]_~]*")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clean(value: str) -> str:
    """`value` with every control character and line break (CR, LF, NUL, ...) made a space."""
    if not value.isprintable():
        value = _CONTROLS.sub(" ", value)
    return value.strip()


def needs_encoding(text: str) -> bool:
    """Whether `text` must be written as encoded-words (non-ASCII, "=?", unfoldable runs)."""
    return (not text.isascii() or "=?" in text
            or (len(text) > LINE - 10
                and any(len(segment) > LINE - 10 for segment in _SEGMENT.findall(text))))


@lru_cache(maxsize=4096)  # subjects repeat whenever the names merged into them do
def unstructured(name: str, value: str) -> str:
    """A whole header field (no final CRLF) for free text such as Subject."""
    text = clean(value)
    if needs_encoding(text):
        return _encoded_field(f"{name}: ", text)
    return fold(f"{name}: {text}")


def fold(line: str) -> str:
    """`line` folded before spaces so that lines stay within 78 columns where possible."""
    if len(line) <= LINE:
        return line
    segments = _SEGMENT.findall(line)
    lines: list[str] = []
    current = segments[0]
    for segment in segments[1:]:
        if len(current) + len(segment) > LINE and current.strip():
            lines.append(current)
            current = segment
        else:
            current += segment
    lines.append(current)
    return "\r\n".join(lines)


def encoded_words(text: str, first_room: int) -> list[str]:
    """`text` as base64 encoded-words, the first at most `first_room` long, the rest 75."""
    data = text.encode("utf-8")
    words: list[str] = []
    room = first_room
    while data:
        cut = min(len(data), (room - 12) // 4 * 3)  # "=?UTF-8?B?" + "?=" is 12 characters
        if cut < len(data):
            # Cut after a space if there is one: decoders that (against RFC 2047 §6.2, like
            # Python 3.11's address parser) keep the whitespace between two encoded-words
            # then show a double space rather than a word split in two.
            space = data.rfind(b" ", 1, cut)
            cut = space + 1 if space > 0 else cut
        while cut < len(data) and cut > 0 and data[cut] & 0xC0 == 0x80:
            cut -= 1  # never split a UTF-8 sequence between two words (RFC 2047 §5)
        words.append("=?UTF-8?B?" + binascii.b2a_base64(data[:cut], newline=False).decode() + "?=")
        data = data[cut:]
        room = ENCODED_LINE - 1
    return words


def _encoded_field(prefix: str, text: str) -> str:
    words = encoded_words(text, ENCODED_LINE - len(prefix))
    return prefix + "\r\n ".join(words)


def mailbox(name: str, address: str, prefix: str) -> str:
    """A header field `prefix` + "Display Name <addr>" (or just addr), encoded and folded."""
    addr = address_for_header(address)
    display = clean(name)
    if not display:
        return fold(prefix + addr)
    if needs_encoding(display) or len(display) > LINE - 20:
        lines = list(_encoded_lines(display, prefix))
        if len(lines[-1]) + len(addr) + 3 <= ENCODED_LINE:
            lines[-1] += f" <{addr}>"
        else:
            lines.append(f" <{addr}>")
        return "\r\n".join(lines)
    phrase = display if _PHRASE_ATOMS.fullmatch(display) else _quoted(display)
    field = f"{prefix}{phrase} <{addr}>"
    return field if len(field) <= LINE else f"{prefix}{phrase}\r\n <{addr}>"


@lru_cache(maxsize=4096)  # names repeat
def _encoded_lines(display: str, prefix: str) -> tuple[str, ...]:
    words = encoded_words(display, ENCODED_LINE - len(prefix))
    return (prefix + words[0], *(" " + word for word in words[1:]))


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def address_for_header(address: str) -> str:
    """An addr-spec with the domain as an IDNA A-label; a local part needing it is quoted.

    A non-ASCII local part stays UTF-8 (RFC 6532): such mail needs SMTPUTF8, which the
    sender decides on; the header cannot express it any other way.
    """
    if _SIMPLE_ADDRESS.fullmatch(address):
        return address
    local, at, domain = clean(address).rpartition("@")
    domain = "".join(domain.split())
    if not at:
        return domain
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        local = _quoted(local)
    return f"{local}@{ascii_domain(domain)}"


@lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """`domain` as a lower-case IDNA 2008 (UTS #46) A-label; unchanged if not convertible."""
    domain = domain.rstrip(".")
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except idna.IDNAError:
        try:
            return domain.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return domain.lower()


def uri(value: str) -> str:
    """A URI for <...> in a header: no spaces or controls; other unsafe bytes %-encoded."""
    value = "".join(clean(value).split())
    return value if _PLAIN_URI.fullmatch(value) else quote(value, safe=_URI_SAFE)


def mailto(address: str) -> str:
    """A mailto: URI for `address` (or a given mailto: URI) with an A-label domain."""
    if _SIMPLE_ADDRESS.fullmatch(address):
        return "mailto:" + address
    address = clean(address)
    if address.lower().startswith("mailto:"):
        return uri(address)
    return uri("mailto:" + address_for_header(address))


def msg_id(value: str) -> str:
    """A Message-ID value in angle brackets, without spaces or controls."""
    value = "".join(clean(value).split()).strip("<>")
    return f"<{value}>"


def date(epoch: float) -> str:
    """An RFC 5322 date in UTC, with English names whatever the locale."""
    return _date(int(epoch))


@lru_cache(maxsize=16)  # messages rendered in the same second share their Date
def _date(epoch: int) -> str:
    t = time.gmtime(epoch)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
