"""What one message of the bounce mailbox reports, without side effects (DESIGN §8).

`parse` reads the raw bytes and answers a `Report`; `bulksend.suppression` acts on it.

    multipart/report DSN (RFC 3464, also RFC 6533 message/global-delivery-status)
                         → one Event per failed or delayed recipient ("dsn"); a delay
                           warning is a "delayed" Event (recorded, never suppresses)
    ARF (RFC 5965)       → a "complaint" Event ("arf"); auth-failure and not-spam reports ignored
    mail to unsub+TOKEN@ → an "unsubscribe" Event ("mailto"), TOKEN an UNSUBSCRIBE token
    auto-replies         → ignored "autoreply" (Auto-Submitted, X-Autoreply, vacation subjects)
    other bounces        → flufl.bounce's permanent failures as "hard" Events ("dsn"), its
                           temporary ones as "delayed" Events
    anything else        → ignored "not a bounce"; oversized or broken mail → Unparseable

A DSN is classified by its enhanced status code (`classify`): 5.1.x, 5.4.4 hard; 4.x.x,
5.2.2 soft; 5.7.x block; other 5.x.x hard; `Action: delayed` is "delayed" whatever its code.
Without a code, the Diagnostic-Code's reply code decides, then the Action. Each event (a
delay warning too) is tied to its delivery by a BOUNCE token in a VERP address
(`bounces+TOKEN@`) of the bounce's envelope header fields, else by the X-Bulksend-Delivery
field of the returned original (a message/rfc822 or text/rfc822-headers part, or quoted as
text); otherwise `delivery_id` is None and the policy goes by the address.

The common case, a DSN to a VERP address, is read straight from the bytes (`_fast_dsn`)
without building the MIME tree; anything unusual takes the full path. Every regex here is
linear, and flufl.bounce (whose heuristics can backtrack) only sees a trimmed copy with
short lines, so no input makes `parse` hang.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from functools import cached_property

from flufl.bounce import all_failures

from bulksend import tokens
from bulksend.mailparts import (
    blocks, decoded_payload, field_lines, header, headers, message_id, one_line, part_text,
    recipient, subject, walk,
)

__all__ = ["Event", "Report", "Unparseable", "classify", "parse", "source_key"]

MAX_BYTES = 10 * 2**20
_MAX_PARTS = 500  # more than any bounce has; the part walk stops there
_FLUFL_BYTES = 64 * 1024  # the notice flufl reads is at the top of a bounce
_FLUFL_LINE = 998
_INLINE_BYTES = 256 * 1024
_RECIPIENT_FIELDS = ("to", "cc", "delivered-to", "x-original-to", "envelope-to", "x-envelope-to")
_ENVELOPE = _RECIPIENT_FIELDS[:1] + _RECIPIENT_FIELDS[2:] + ("return-path",)  # where VERP shows
_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
_ORIGINAL_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers",
                   "message/global-headers")
_PER_RECIPIENT = {"original-recipient", "final-recipient", "action", "status"}
_NOT_COMPLAINTS = ("auth-failure", "not-spam")

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_BASIC = re.compile(r"(?<![\d.])([245]\d\d)(?![\d.])")
_PLUS_TOKEN = re.compile(r"\+([A-Za-z2-7]{21,34})@")
_INLINE_DELIVERY = re.compile(r"X-Bulksend-Delivery:[ \t]*([A-Za-z2-7]{21,34})", re.IGNORECASE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_VACATION = re.compile(
    r"out of (the )?office|auto[- ]?(reply|response|answer|matic reply)|^auto:|vacation"
    r"|abwesen|absence|r[ée]ponse automatique|автоответ|отпуск", re.IGNORECASE)
_DAEMON = re.compile(r"mailer-daemon|postmaster|mail delivery|delivery subsystem|mail system",
                     re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|deliver(y|ed)? (status|fail|notif|problem)|returned mail|failure notice"
    r"|not (be )?delivered|non[- ]?delivery|rejected|bounce", re.IGNORECASE)


# flufl.bounce logs a traceback for every detector that trips over odd mail; `_flufl` takes
# that as "no verdict", so it is not news for the bounce processor's stderr.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False


class Unparseable(Exception):
    """The message is too big, broken or names nobody: the caller quarantines it."""


@dataclass(frozen=True)
class Event:
    """One thing a message reports about one recipient."""

    kind: str  # models.BOUNCE_KINDS: hard|soft|block|delayed (DSN), complaint, unsubscribe
    source: str  # "dsn" | "arf" | "mailto"
    email: str | None
    status: str | None
    diagnostic: str | None
    delivery_id: int | None


@dataclass(frozen=True)
class Report:
    """Everything one incoming message reports; no events when it is to be ignored."""

    message_id: str | None
    events: tuple[Event, ...]
    ignored: str | None  # "autoreply" | "delayed" (naming nobody) | "not a bounce"


def parse(raw: bytes, *, secret: bytes | None, max_bytes: int = MAX_BYTES) -> Report:
    """The Report for one raw message; raises Unparseable and nothing else."""
    if len(raw) > max_bytes:
        raise Unparseable(f"message of {len(raw):,} bytes is over the {max_bytes:,} byte limit")
    try:
        fast = _fast_dsn(raw, secret)
    except Exception:  # noqa: BLE001 - the shortcut only ever declines; the full path decides
        fast = None
    try:
        return fast or _parse(raw, secret)
    except Unparseable:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug on hostile input must quarantine, not crash
        raise Unparseable(f"message cannot be parsed: {type(exc).__name__}: {exc}"[:300]) from exc


def source_key(raw: bytes, report: Report) -> str:
    """What makes re-processing this message record nothing twice: its Message-ID or digest."""
    return report.message_id or "sha256:" + hashlib.sha256(raw).hexdigest()


def classify(status: str) -> str | None:
    """The event kind for an enhanced status code such as "5.1.1"; None for success (2.x.x)."""
    klass, subject_, detail = status.split(".")
    if klass == "4" or (klass, subject_, detail) == ("5", "2", "2"):  # 5.2.2: mailbox full
        return "soft"
    if klass != "5":
        return None
    return "block" if subject_ == "7" else "hard"


# --- the two paths ------------------------------------------------------------------------

_Found = tuple[tuple[Event, ...], str | None]  # a Report without message_id
_UNRESOLVED: _Found = ((), "unresolved")  # failures reported, but of nobody we can name


def _fast_dsn(raw: bytes, secret: bytes | None) -> Report | None:
    """A plain DSN straight from the bytes, or None for anything the full path must read."""
    end = _HEADER_END.search(raw)
    if end is None:
        return None
    top = BytesParser(policy=compat32).parsebytes(raw[:end.start()], headersonly=True)
    boundary = top.get_boundary()
    if top.get_content_type() != "multipart/report" or not boundary or not boundary.isascii() \
            or str(top.get_param("report-type", "")).lower() not in ("", "delivery-status"):
        return None
    delivery_id = None if secret is None else _verp(headers(top, _ENVELOPE), secret)
    if secret is not None and delivery_id is None:
        return None  # the tie is in the returned original
    status = None
    for chunk in (b"\n" + raw[end.end():]).split(b"\n--" + boundary.encode("ascii"))[1:]:
        split = _HEADER_END.search(chunk)
        fields = dict(field_lines(chunk[:split.start() if split else len(chunk)].decode(
            "ascii", "replace")))
        kind = fields.get("content-type", "text/plain").partition(";")[0].strip().lower()
        if kind.startswith("message/") and kind != "message/rfc822":
            if status is not None or kind != "message/delivery-status" or split is None \
                    or fields.get("content-transfer-encoding", "7bit").lower() \
                    not in ("7bit", "8bit", "binary"):
                return None
            status = chunk[split.end():].decode("utf-8", "replace")
    found = _status_events(_recipient_blocks([status or ""]), lambda: delivery_id)
    return None if found is None or found is _UNRESOLVED else Report(message_id(top), *found)


def _parse(raw: bytes, secret: bytes | None) -> Report:
    try:
        msg = BytesParser(policy=compat32).parsebytes(raw)
    except RecursionError:  # the stdlib parser recurses once per nested message
        raise Unparseable("message nests MIME parts too deeply") from None
    if not msg.keys():
        raise Unparseable("message has no header fields")
    parts = walk(msg, _MAX_PARTS)
    if len(parts) > _MAX_PARTS:
        raise Unparseable(f"message has more than {_MAX_PARTS} MIME parts")
    ties = _Ties(msg, parts, secret)
    found = _arf(parts, ties) or _dsn(parts, ties)
    if found is _UNRESOLVED:
        found = _flufl(raw, msg, ties)
        if found is None:
            raise Unparseable("delivery status report names no recipient and no delivery")
    if found is None:
        automatic = _auto_submitted(msg) or bool(_VACATION.search(subject(msg)))
        if automatic and not _looks_like_bounce(msg):
            found = (), "autoreply"
        elif not automatic and (event := _mailto(msg, secret)) is not None:
            found = (event,), None
        else:
            found = _flufl(raw, msg, ties) or ((), "autoreply" if automatic else "not a bounce")
    return Report(message_id(msg), *found)


# --- the report formats -------------------------------------------------------------------

def _dsn(parts: list[Message], ties: _Ties) -> _Found | None:
    """Events of a delivery status report, or None if the message has no recipient blocks."""
    texts = [part_text(part) for part in parts if part.get_content_type() in _STATUS_TYPES]
    return _status_events(_recipient_blocks(texts), lambda: ties.delivery_id)


def _recipient_blocks(texts: list[str]) -> list[dict[str, str]]:
    return [fields for text in texts for fields in blocks(text) if _PER_RECIPIENT & fields.keys()]


def _status_events(recipients: list[dict[str, str]],
                   delivery: Callable[[], int | None]) -> _Found | None:
    """One event per failed or delayed recipient block; None without blocks.

    Failures of nobody the report names or ties → _UNRESOLVED (the fallback reads the notice);
    delay warnings of nobody → ignored "delayed".
    """
    if not recipients:
        return None
    events: dict[tuple[str | None, str], Event] = {}
    failed = delayed = False
    for fields in recipients:
        address = recipient(fields.get("original-recipient")) \
            or recipient(fields.get("final-recipient"))
        kind, status = _recipient_kind(fields)
        if kind is None:
            continue
        failed |= kind != "delayed"
        delayed |= kind == "delayed"
        if address or delivery() is not None:
            diagnostic = fields.get("diagnostic-code")
            events.setdefault((address and address.lower(), kind), Event(
                kind, "dsn", address, status, one_line(diagnostic and (
                    diagnostic.partition(";")[2] or diagnostic)), delivery()))
    if failed and all(event.kind == "delayed" for event in events.values()):
        return _UNRESOLVED
    if events:
        return tuple(events.values()), None
    return (), "delayed" if delayed else "not a bounce"


def _recipient_kind(fields: dict[str, str]) -> tuple[str | None, str | None]:
    """("hard"|"soft"|"block"|"delayed"|None, enhanced status) for one recipient block."""
    action = fields.get("action", "").strip().lower()
    if action.startswith(("delivered", "relayed", "expanded")):
        return None, None
    diagnostic = fields.get("diagnostic-code", "")
    status = _enhanced(fields.get("status", ""))
    from_text = _enhanced(diagnostic)
    if status is None or (status.endswith(".0.0") and from_text and from_text[0] == status[0]):
        status = from_text or status  # "5.0.0" says less than "550 5.1.1 user unknown"
    if action.startswith("delayed"):
        return "delayed", status
    if status is not None:
        return classify(status), status
    basic = _BASIC.search(f"{fields.get('status', '')} {diagnostic}")
    if basic is not None:
        code = basic.group(1)
        return ("soft" if code[0] == "4" or code == "552" else
                "hard" if code[0] == "5" else None), None
    return ("hard" if action.startswith(("fail", "error")) else None), None


def _arf(parts: list[Message], ties: _Ties) -> _Found | None:
    """A complaint from an ARF feedback report, or None if the message is not one."""
    reports = [part for part in parts if part.get_content_type() == "message/feedback-report"]
    if not reports:
        return None
    text = part_text(reports[0])
    fields = (blocks(text) or [{}])[0]
    feedback_type = fields.get("feedback-type", "abuse").strip().lower()
    if feedback_type in _NOT_COMPLAINTS:
        return (), "not a bounce"
    addresses = [recipient(value) for name, value in field_lines(text)
                 if name == "original-rcpt-to"]
    addresses = [address for address in addresses if address]
    if not addresses and ties.original is not None:
        addresses = [address for _, address in email.utils.getaddresses(
            [header(ties.original, "to") or ""]) if "@" in address][:1]
    delivery_id = ties.delivery_id
    if delivery_id is None and ties.secret is not None:
        delivery_id = _verp([fields.get("original-mail-from", "")], ties.secret)
    if not addresses and delivery_id is None:
        raise Unparseable("feedback report names no recipient and no delivery")
    diagnostic = one_line(f"Feedback-Type: {feedback_type}")
    events = {(address or "").lower(): Event("complaint", "arf", address, None, diagnostic,
                                             delivery_id) for address in addresses or [None]}
    return tuple(events.values()), None


def _mailto(msg: Message, secret: bytes | None) -> Event | None:
    """An unsubscribe request mailed to unsub+TOKEN@..., or None."""
    if secret is None:
        return None
    for token in _plus_tokens(headers(msg, _RECIPIENT_FIELDS)):
        delivery_id = tokens.read_token(secret, tokens.UNSUBSCRIBE, token)
        if delivery_id is not None:
            sender = email.utils.parseaddr(header(msg, "from") or "")[1] or None
            return Event("unsubscribe", "mailto", sender, None, None, delivery_id)
    return None


def _flufl(raw: bytes, msg: Message, ties: _Ties) -> _Found | None:
    """flufl.bounce's verdict on a non-standard bounce, or None if it finds no recipient."""
    delivery_id = ties.delivery_id  # before the trimming below changes the parts
    trimmed = msg if len(raw) <= _FLUFL_BYTES else BytesParser(policy=compat32).parsebytes(
        raw[:_FLUFL_BYTES])
    _shorten_lines(trimmed)
    try:
        temporary, permanent = all_failures(trimmed)
    except Exception:  # noqa: BLE001 - heuristics on hostile input: no verdict, not a crash
        return None
    failed = sorted(address.decode("ascii", "replace") for address in permanent)
    if failed:
        kind, status = _notice_status(trimmed)
        return tuple(Event(kind, "dsn", address, status, None, delivery_id)
                     for address in failed), None
    if temporary:  # a delay warning without a DSN
        return tuple(Event("delayed", "dsn", address, None, None, delivery_id) for address in
                     sorted(a.decode("ascii", "replace") for a in temporary)), None
    return None


def _shorten_lines(msg: Message) -> None:
    """Cut every decoded body line to 998 characters so flufl's regexes stay cheap."""
    for part in walk(msg, _MAX_PARTS, into_messages=True):
        if isinstance(part.get_payload(), str) and part.get_payload():
            text = decoded_payload(part)
            part.set_payload("\n".join(line[:_FLUFL_LINE] for line in text.splitlines())
                             .encode("utf-8").decode("ascii", "surrogateescape"))
            if "content-transfer-encoding" in part:
                part.replace_header("content-transfer-encoding", "8bit")


def _notice_status(msg: Message) -> tuple[str, str | None]:
    """("hard", None) unless the bounce notice gives one enhanced status code that says more."""
    notice = next((part for part in walk(msg, _MAX_PARTS)
                   if part.get_content_type() == "text/plain"), None)
    text = decoded_payload(notice, _FLUFL_BYTES) if notice is not None else ""
    codes = {_normal(match) for match in _ENHANCED.finditer(text)}
    if len(codes) == 1:
        (status,) = codes
        kind = classify(status)
        if kind is not None:
            return kind, status
    return "hard", None


def _auto_submitted(msg: Message) -> bool:
    """Whether the header says a program wrote this (RFC 3834 and the usual vendor fields)."""
    auto = (header(msg, "auto-submitted") or "no").partition(";")[0].strip().lower()
    precedence = (header(msg, "precedence") or "").strip().lower()
    return (auto not in ("", "no") or precedence in ("auto_reply", "auto-reply")
            or bool(headers(msg, ("x-autoreply", "x-autorespond", "x-autoresponder"))))


def _looks_like_bounce(msg: Message) -> bool:
    """Whether a mailer daemon seems to have written this (auto-replies do not look so)."""
    return bool(_DAEMON.search(header(msg, "from") or "") or _BOUNCE_SUBJECT.search(subject(msg)))


# --- tying events to deliveries ------------------------------------------------------------

class _Ties:
    """The delivery a bounce is about: VERP token first, then the returned original's header."""

    def __init__(self, msg: Message, parts: list[Message], secret: bytes | None) -> None:
        self._msg = msg
        self._parts = parts
        self.secret = secret

    @cached_property
    def original(self) -> Message | None:
        """The returned original's header as a Message, if the bounce carries it."""
        for part in self._parts:
            if part.get_content_type() in _ORIGINAL_TYPES:
                payload = part.get_payload()
                if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                    return payload[0]
                if isinstance(payload, str):
                    return HeaderParser(policy=compat32).parsestr(decoded_payload(part))
        return None

    @cached_property
    def delivery_id(self) -> int | None:
        """The delivery of the VERP address the bounce came to, else of the original."""
        if self.secret is None:
            return None
        return _verp(headers(self._msg, _ENVELOPE), self.secret) \
            or self._from_original(self.secret)

    def _from_original(self, secret: bytes) -> int | None:
        if self.original is not None:
            for value in headers(self.original, ("x-bulksend-delivery",)):
                if (found := tokens.read_token(secret, tokens.BOUNCE, value.strip())) is not None:
                    return found
            if (found := _verp(headers(self.original, ("return-path",)), secret)) is not None:
                return found
        for part in self._parts:  # last resort: the original's header quoted as text
            if part.get_content_maintype() == "text":
                text = decoded_payload(part, _INLINE_BYTES)
                for match in _INLINE_DELIVERY.finditer(text):
                    found = tokens.read_token(secret, tokens.BOUNCE, match.group(1).lower())
                    if found is not None:
                        return found
        return None


def _verp(values: list[str], secret: bytes) -> int | None:
    """The delivery of the first BOUNCE token in a "local+TOKEN@domain" of `values`."""
    for token in _plus_tokens(values):
        if (found := tokens.read_token(secret, tokens.BOUNCE, token)) is not None:
            return found
    return None


def _plus_tokens(values: list[str]) -> list[str]:
    return [match.group(1).lower() for value in values for match in _PLUS_TOKEN.finditer(value)]


def _enhanced(text: str) -> str | None:
    match = _ENHANCED.search(text)
    return None if match is None else _normal(match)


def _normal(match: re.Match[str]) -> str:
    return ".".join(str(int(group)) for group in match.groups())
