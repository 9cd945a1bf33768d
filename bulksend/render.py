"""A campaign's templates and one recipient → the exact bytes of that recipient's message.

`Renderer` is built once per campaign: it renders the header lines that never change, picks
the MIME boundary and remembers the layout of the HTML's fixed text. `render` then fills in
one recipient (DESIGN §7)::

    From, To, Subject, Date, Message-ID, [Reply-To], List-Id, List-Unsubscribe,
    List-Unsubscribe-Post, [Feedback-ID], X-Bulksend-Delivery, MIME-Version, Content-Type
    multipart/alternative: text/plain then text/html, both UTF-8

Bodies are quoted-printable, or 8bit/7bit when the server offers 8BITMIME and no line is
longer than 998 octets. Lines end in CRLF. Header values go through `headers`, which strips
control characters from everything merged, so no value can start a header of its own.

Templates live in `templating` (sandbox, checks) and the generated text part in `htmltext`;
their public names are re-exported here.
"""

from __future__ import annotations

import binascii
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from email.utils import parseaddr

from bulksend import headers, templating
from bulksend.errors import BulksendError
from bulksend.htmltext import TextPlan, html_to_text, marked_html, slot_values
from bulksend.templating import TemplateError, Templates, compile_templates, missing_unsubscribe

__all__ = [
    "MessageSettings", "Recipient", "Renderer", "TemplateError", "Templates",
    "compile_templates", "html_to_text", "missing_unsubscribe",
]

CORE_VARIABLES = frozenset({"email", "name", "unsubscribe_url", "campaign"})
MAX_SHAPES = 256  # HTML shapes remembered per campaign; past that, messages take the slow path
MAX_RECENT = 4096  # encoded values remembered per shape


@dataclass(frozen=True)
class MessageSettings:
    """What every message of a campaign shares."""

    from_header: str  # "Name <addr>" as configured
    reply_to: str | None
    list_id: str  # written as List-Id: <list_id>
    feedback_id: str | None
    eight_bit: bool  # the server offers 8BITMIME
    campaign: str  # the campaign's name: the {{ campaign }} variable


@dataclass(frozen=True)
class Recipient:
    """One delivery's recipient and the per-delivery values of its message."""

    email: str  # as stored; a Unicode domain is written as an A-label
    name: str
    attributes: Mapping[str, str]
    message_id: str  # the full "<...@...>" value
    unsubscribe_url: str
    unsubscribe_mailto: str | None  # full mailto address incl. token
    delivery_token: str  # X-Bulksend-Delivery
    date: float  # epoch seconds


class Renderer:
    """Builds every message of one campaign; construct once, call `render` per recipient."""

    def __init__(self, templates: Templates, settings: MessageSettings) -> None:
        self._templates = templates
        self._settings = settings
        self._attribute_keys = tuple(sorted(templates.known - CORE_VARIABLES))
        self._static = templating.static_ids(templates.html)
        self._shapes: dict[tuple[str | None, ...], _Shape] = {}  # by their static pieces
        # "=_" never occurs in quoted-printable text; 8-bit bodies are checked for it.
        self._boundary = f"=_bulksend_{secrets.token_hex(12)}"
        self._boundary_bytes = self._boundary.encode("ascii")
        self._from = _line(_address_field("From: ", settings.from_header))
        reply_to = settings.reply_to
        list_id = headers.clean(settings.list_id)
        if "<" in list_id:  # given as "Name <list.id>": keep the id
            list_id = list_id.rpartition("<")[2].partition(">")[0]
        list_id = "".join(list_id.split())
        self._middle = "".join((
            _line(_address_field("Reply-To: ", reply_to)) if reply_to else "",
            _line(f"List-Id: <{list_id}>"),
        ))
        self._post = "".join((
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            _line(headers.fold("Feedback-ID: " + headers.clean(settings.feedback_id)))
            if settings.feedback_id else "",
        ))
        self._mime = ("MIME-Version: 1.0\r\n"
                      f'Content-Type: multipart/alternative;\r\n boundary="{self._boundary}"\r\n'
                      "\r\n")
        self._part_head = {
            encoding: (f"--{self._boundary}\r\nContent-Type: text/{{}}; charset=utf-8\r\n"
                       f"Content-Transfer-Encoding: {encoding}\r\n\r\n")
            for encoding in ("quoted-printable", "8bit", "7bit")
        }
        self._qp_head = {subtype: self._part_head["quoted-printable"].format(subtype).encode()
                         for subtype in ("plain", "html")}
        self._end = f"--{self._boundary}--\r\n".encode("ascii")

    def variables(self, recipient: Recipient) -> dict[str, str]:
        """The template variables for `recipient`: every known attribute ("" when missing)."""
        attributes = recipient.attributes
        variables = {key: attributes.get(key, "") for key in self._attribute_keys}
        variables["email"] = recipient.email
        variables["name"] = recipient.name
        variables["unsubscribe_url"] = recipient.unsubscribe_url
        variables["campaign"] = self._settings.campaign
        return variables

    def render(self, recipient: Recipient) -> bytes:
        """The complete message for `recipient`; TemplateError if a template fails for it."""
        t = self._templates
        variables = self.variables(recipient)
        subject = templating.render_subject(t, variables)
        pieces = templating.render_pieces(t.html, t.html_name, variables)
        shape, values = self._shape(pieces)
        text_part = self._text_part(variables, pieces, shape, values)
        html_part = self._html_part(pieces, shape, values)
        head = self._head(recipient, subject).encode("utf-8", "replace")
        return b"".join((head, *text_part, *html_part, self._end))

    def _shape(self, pieces: list[str]) -> tuple[_Shape, list[str]]:
        """The precomputed shape of this HTML output, and the values merged into it."""
        key = tuple(map(self._static.get, map(id, pieces)))  # None where a value was merged
        values = [piece for piece, fixed in zip(pieces, key) if fixed is None]
        shape = self._shapes.get(key)
        if shape is None:
            shape = _NO_SHAPE
            if len(self._shapes) < MAX_SHAPES:
                needs_text = self._templates.text is None
                marked = marked_html(pieces, self._static) if needs_text else None
                text = TextPlan.build(marked, _qp) if marked is not None else None
                shape = self._shapes[key] = _Shape(text, _BodyPlan(pieces, self._static))
        return shape, values

    def _text_part(self, variables: dict[str, str], pieces: list[str], shape: _Shape,
                   values: list[str]) -> tuple[bytes, bytes]:
        t = self._templates
        if t.text is not None:
            return self._part("plain", templating.render(t.text, t.text_name, variables))
        texts = slot_values(values) if shape.text is not None else None
        if shape.text is None or texts is None:
            return self._part("plain", html_to_text("".join(pieces)))
        if self._settings.eight_bit:
            return self._part("plain", shape.text.render(texts))
        return self._qp_head["plain"], shape.text.render_encoded(texts, _qp) + b"\r\n"

    def _html_part(self, pieces: list[str], shape: _Shape,
                   values: list[str]) -> tuple[bytes, bytes]:
        if shape.body is None or self._settings.eight_bit:
            return self._part("html", "".join(pieces))
        return self._qp_head["html"], shape.body.encode(values) + b"\r\n"

    def _head(self, r: Recipient, subject: str) -> str:
        unsubscribe = f"<{headers.uri(r.unsubscribe_url)}>"
        if r.unsubscribe_mailto:
            unsubscribe += f", <{headers.mailto(r.unsubscribe_mailto)}>"
        return "".join((
            self._from,
            _line(headers.mailbox(r.name, r.email, "To: ")),
            _line(headers.unstructured("Subject", subject)),
            "Date: ", headers.date(r.date), "\r\n",
            _line("Message-ID: " + headers.msg_id(r.message_id)),
            self._middle,
            _line(headers.fold("List-Unsubscribe: " + unsubscribe)),
            self._post,
            _line(headers.fold("X-Bulksend-Delivery: " + headers.clean(r.delivery_token))),
            self._mime,
        ))

    def _part(self, subtype: str, content: str) -> tuple[bytes, bytes]:
        data = _crlf(content).encode("utf-8", "replace")  # "replace": a lone surrogate
        if self._fits_8bit(data):
            encoding = "7bit" if data.isascii() else "8bit"
        else:
            encoding = "quoted-printable"
            data = binascii.b2a_qp(data, istext=True)
        return self._part_head[encoding].format(subtype).encode("ascii"), data + b"\r\n"

    def _fits_8bit(self, data: bytes) -> bool:
        return (self._settings.eight_bit and b"\x00" not in data
                and (len(data) <= 998 or max(map(len, data.split(b"\r\n"))) <= 998)
                and self._boundary_bytes not in data)


class _BodyPlan:
    """One HTML shape's body, quoted-printable: static pieces encoded once, values per message.

    Each encoding starts at column 0 and ends in a soft line break (``=`` CRLF) where the
    line goes on in the next piece, so pieces are encoded independently; a decoder joins
    them back. A short plain value needs no encoding at all.
    """

    def __init__(self, pieces: list[str], static: Collection[int]) -> None:
        self.segments: list[bytes | None] = []  # None: the next value
        run: list[str] = []
        for piece in pieces:
            if id(piece) in static:
                run.append(piece)
            else:
                if run:
                    self.segments.append(_qp_piece("".join(run), soft=True))
                    run = []
                self.segments.append(None)
        if run:
            self.segments.append(_qp_piece("".join(run), soft=False))
        self.ends_with_value = self.segments[-1] is None if self.segments else False
        self._recent: dict[str, bytes] = {}  # encoded values: names and cities repeat

    def encode(self, values: list[str]) -> bytes:
        """The quoted-printable body with `values` in its slots."""
        out: list[bytes] = []
        k = 0
        last = len(values) if self.ends_with_value else -1
        for segment in self.segments:
            if segment is not None:
                out.append(segment)
                continue
            value = values[k]
            k += 1
            if not value and k != last:
                continue
            if k == last:
                out.append(_qp_piece(value, soft=False))
            elif len(value) < 70 and value.isascii() and value.isprintable() and "=" not in value:
                out.append(value.encode("ascii") + b"=\r\n")  # QP as it is
            else:
                data = self._recent.get(value)
                if data is None:
                    if len(self._recent) >= MAX_RECENT:
                        self._recent.clear()
                    data = self._recent[value] = _qp_piece(value, soft=True)
                out.append(data)
        return b"".join(out) or b"\r\n"


def _qp_piece(text: str, soft: bool) -> bytes:
    """`text` quoted-printable from column 0; with `soft`, a line it leaves open ends in "="."""
    qp = _qp(text)
    if not soft or text.endswith(("\n", "\r")):
        return qp
    body = qp[:-2]  # the CRLF _crlf added
    start = body.rfind(b"\r\n")
    start = 0 if start < 0 else start + 2
    last = body[start:]
    if len(last) < 76:
        return body + b"=\r\n"
    cut = 72  # the "=" would make the line 77 long: break it once more, not inside an =XX
    while b"=" in last[cut - 2:cut]:
        cut -= 1
    return body[:start] + last[:cut] + b"=\r\n" + last[cut:] + b"=\r\n"


@dataclass(frozen=True)
class _Shape:
    """What one shape of the HTML output lets us precompute (None: do it all per message)."""

    text: TextPlan | None
    body: _BodyPlan | None


_NO_SHAPE = _Shape(None, None)


def _qp(text: str) -> bytes:
    """`text` as quoted-printable lines (CRLF, UTF-8, final line break included)."""
    if text.isascii() and "=" not in text and "\r" not in text:
        lines = text.split("\n")
        if all(len(line) <= 76 and line.isprintable() and line[-1:] != " " for line in lines):
            return "\r\n".join(lines).encode("ascii") + b"\r\n"  # already QP as it is
    return binascii.b2a_qp(_crlf(text).encode("utf-8", "replace"), istext=True)


def _crlf(text: str) -> str:
    """`text` with CRLF line endings and a final line break (b2a_qp picks CRLF from it)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", "\r\n")


def _address_field(prefix: str, value: str) -> str:
    name, address = parseaddr(headers.clean(value))
    if "@" not in address:
        return headers.fold(prefix + headers.clean(value))
    return headers.mailbox(name, address, prefix)


def _line(field: str) -> str:
    """A header field with its CRLF, refused if a line would break RFC 5322's 998 limit."""
    if len(field) > headers.MAX_LINE and any(len(line) > headers.MAX_LINE
                                              for line in field.split("\r\n")):
        raise BulksendError(f"message header {field[:40]!r}...: a line is longer than "
                            f"{headers.MAX_LINE} characters")
    return field + "\r\n"
