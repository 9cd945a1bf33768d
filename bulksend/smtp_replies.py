"""SMTP replies → what bulksend does about them (DESIGN §6), as pure functions and values.

`classify(stage, code, enhanced, text)` turns one reply (or the lack of one) into an
`Outcome`; `bulksend.smtp` attaches it to every `SendResult` and `AccountError`, and the
sender maps outcomes to delivery, account and suppression changes:

    outcome            delivery                        account            address
    SENT               sent                            —                  —
    ACCOUNT_RETRY      queued, no attempt counted      cooldown           —
    ACCOUNT_DISABLED   queued, rerouted                disabled           —
    ACCOUNT_EXHAUSTED  queued, rerouted                exhausted          —
    HARD_BOUNCE        failed                          —                  suppressed hard_bounce
    POLICY_BLOCK       failed                          block rate +1      —
    DEFERRED           deferred (backoff)              —                  —
    FAILED             failed                          —                  —
    REQUEUE            queued, attempt counted         cooldown if repeated
    UNKNOWN            unknown (RFC 1047: maybe delivered; never resent automatically)
    LEASE_LOST         nothing: the row belongs to the worker holding the lease now

Where §6 is silent this module decides, and says so here so DESIGN can follow:
- Rate and quota wording wins over everything but mailbox-full and message-size replies,
  so Gmail's "421 4.7.28 ... unusual rate" is ACCOUNT_EXHAUSTED, not a 421 cooldown.
- A 5xx to MAIL FROM (other than quota or size) refuses our envelope sender or our
  login, so it happens to every message: ACCOUNT_DISABLED, never a failed delivery.
- At RCPT and after the dot, an explicit "no such user" wins over a 5.7.x code, because
  Yandex answers "550 5.7.1 No such user!"; other 5.7.x replies are POLICY_BLOCK.
- 5.2.2 and mailbox-full wording are DEFERRED even as 5xx (§6); other 5.2.x are FAILED.
- A 5xx at RCPT or later that refuses our envelope sender (X.1.7, X.1.8, "Sender address
  rejected: ... User unknown") is never HARD_BOUNCE: the recipient may well exist.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

from bulksend.errors import BulksendError

__all__ = [
    "AccountError", "ErrorKind", "Outcome", "SendResult", "SendStage", "Stage", "classify",
    "parse_enhanced", "reply_text",
]

# Where a reply came from. `greeting` … `auth` happen while a session opens; "connection"
# means no usable reply at all (refused, reset, timed out, deadline passed).
Stage = Literal["greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot", "connection"]
SendStage = Literal["mail", "rcpt", "data", "dot", "connection"]  # the stages of a SendResult
ErrorKind = Literal["connect", "timeout", "tls", "certificate", "greeting", "ehlo", "starttls", "insecure", "auth"]

_SESSION_STAGES = frozenset({"greeting", "ehlo", "starttls", "auth", "connection"})
_RECIPIENT_STAGES = frozenset({"rcpt", "data", "dot"})


class Outcome(enum.StrEnum):
    """What one SMTP exchange means for the delivery, the account and the address."""

    SENT = "sent"  # 2xx after the final dot
    ACCOUNT_RETRY = "account_retry"  # connect/TLS failure, timeout, 421 anywhere
    ACCOUNT_DISABLED = "account_disabled"  # 554 greeting, AUTH refused, untrusted certificate
    ACCOUNT_EXHAUSTED = "account_exhausted"  # rate or quota reply
    HARD_BOUNCE = "hard_bounce"  # the recipient does not exist
    POLICY_BLOCK = "policy_block"  # 5.7.x policy or spam refusal of this message
    DEFERRED = "deferred"  # 4xx for this recipient, mailbox full, 4xx after the dot
    FAILED = "failed"  # any other permanent refusal of this recipient or message
    REQUEUE = "requeue"  # connection lost before the dot: the server cannot have it
    UNKNOWN = "unknown"  # the dot went out and no reply came back
    LEASE_LOST = "lease_lost"  # before_dot() said no: dot withheld, connection dropped


@dataclass(frozen=True)
class SendResult:
    """How one `Session.send` ended.

    `dot_sent` is the RFC 1047 line: before it the server cannot have accepted the message,
    after it a missing reply means it may have. `reached_mail` says whether MAIL FROM was
    written; only when it is False may the sender release the quota reservation.
    """

    stage: SendStage
    code: int | None
    enhanced: str | None  # "5.1.1"
    text: str  # the reply without its code, or what went wrong; never credentials
    outcome: Outcome
    dot_sent: bool
    reached_mail: bool

    def __str__(self) -> str:
        reply = f"{self.code} {self.text}" if self.code is not None else self.text
        return f"{self.outcome} at {self.stage}: {reply}"


class AccountError(BulksendError):
    """An SMTP session could not be opened; `outcome` is ACCOUNT_RETRY or ACCOUNT_DISABLED.

    The message reads `account yandex-1 (smtp.yandex.ru:465): 535 5.7.8 authentication
    failed`; `kind` says which step failed, for logs and `accounts check`.
    """

    def __init__(
        self, account: str, address: str, reason: str, *, kind: ErrorKind, outcome: Outcome,
        code: int | None = None, enhanced: str | None = None,
    ) -> None:
        super().__init__(f"account {account} ({address}): {reason}")
        self.account = account
        self.address = address
        self.reason = reason
        self.kind = kind
        self.outcome = outcome
        self.code = code
        self.enhanced = enhanced


# -- reading a reply -----------------------------------------------------------------------

# RFC 3463 class.subject.detail; the class must agree with the reply code's first digit.
_LEADING_STATUS = re.compile(r"\s*#?([245]\.\d{1,3}\.\d{1,3})(?!\d|\.\d)")
# Some servers put it later: "550 cuda_nsu 5.1.1 <x>", qmail's "(#5.7.1)".
_INNER_STATUS = re.compile(r"(?<![\w.])#?([245]\.\d{1,3}\.\d{1,3})(?!\d|\.\d)")
_MAX_TEXT = 500


def parse_enhanced(code: int | None, text: str) -> str | None:
    """The enhanced status code in a reply's text ("5.1.1"), or None."""
    if code is None:
        return None
    for pattern in (_LEADING_STATUS.match(text), *_INNER_STATUS.finditer(text)):
        if pattern is not None and pattern.group(1)[0] == str(code)[0]:
            return pattern.group(1)
    return None


def reply_text(message: bytes | str) -> str:
    """smtplib's reply text as one readable line: continuation lines joined, their repeated
    enhanced code dropped ("5.4.5 Daily user sending limit exceeded. 5.4.5 For more…")."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    first = _LEADING_STATUS.match(lines[0])
    if first is not None:
        prefix = first.group(1)
        lines[1:] = [line.removeprefix(prefix).strip() for line in lines[1:]]
    text = " ".join(line for line in lines if line)
    # Unprintable bytes from a hostile server must not reach a log line or a terminal.
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


# -- the rules -----------------------------------------------------------------------------

_HARD_CODES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.10"})
_MAILBOX_FULL_CODES = frozenset({"4.2.2", "5.2.2"})
_EXHAUSTED_CODES = frozenset({"5.4.5", "5.1.90", "5.7.705", "5.7.708"})
_SIZE_CODES = frozenset({"5.3.4", "4.3.4"})
_SENDER_CODES = frozenset({"5.1.7", "5.1.8"})  # bad sender's mailbox / system address

# The recipient's side is busy or full: try this recipient again later.
_RECIPIENT_BUSY = re.compile(
    r"mailbox\b[^.;]{0,40}\bfull|\bover ?quota\b|mailbox[^.;]{0,40}quota|quota[^.;]{0,40}mailbox"
    r"|receiving mail at a rate|recipient[^.;]{0,20}exceeded|they can receive"
)
# The account sent too much: Gmail, Yandex, Mail.ru, Outlook, Zoho, Postfix policy servers, …
_EXHAUSTED = re.compile(
    r"\brate[ -]?limit|\b(unusual|sending|send|high|message|mail|connection) rate\b|\brate (exceeded|too high)"
    r"|too many (messages|e?mails|recipients)|too much mail"
    r"|quota[^.;]{0,30}exceed|exceed[^.;]{0,30}quota|sending quota|submission ?quota"
    r"|(daily|hourly|sending|send|outgoing|message|recipient|rcpt)s? limit"
    r"|limit[^.;]{0,30}(exceeded|reached)|(exceeded|reached)[^.;]{0,40}\blimits?\b"
    r"|limit of \d+|\b\d+ (messages|e?mails|rcpts|recipients) per\b|exceeded[^.;]{0,20}threshold"
)
# Too many connections at once is a reason to back off a while, not a used-up quota.
_CONNECTIONS = re.compile(r"concurrent|too many (connections|sessions)|connections? (limit|per)")
_SIZE = re.compile(r"\bsize\b|too (big|large)")
_UNKNOWN_USER = re.compile(
    r"user unknown|unknown (user|recipient|mailbox)|addressee unknown|no such (user|mailbox|recipient|account)"
    r"|(user|mailbox|account|address|recipient)[^.;]{0,40}(does not|doesn't|did not) exist"
    r"|does not exist|user not found|recipient not found|mailbox not found|recipnotfound"
    r"|invalid[ -](mailbox|recipient|address)|not our customer|mailbox unallocated"
    r"|doesn't have an? [^;]{0,40}account|is no longer valid|no mailbox here"
)
# Our envelope sender refused (Postfix reject_unverified_sender, Exim sender verification).
_SENDER_REFUSED = re.compile(
    r"\bsender\b[^.;]{0,40}\b(rejected|refused|unknown|invalid|not found|does not exist|doesn't exist)"
    r"|sender verif|verify sender"
)
# RFC 5321's stock 550 text; servers also use it for refusals, hence only for 550 and
# only when no policy wording is present.
_MAILBOX_UNAVAILABLE = re.compile(r"mailbox (is )?unavailable")
_POLICY = re.compile(
    r"spam|\bblock|blacklist|blocklist|black list|denylist|spamhaus|policy|reputation|dmarc|\bspf\b"
    r"|dkim|abuse|denied|not allowed|banned|virus|malware|phish|unsolicited|suspicious|prohibited|complaint"
    r"|relay|\brbl\b|\bdnsbl\b"
)


def classify(stage: Stage, code: int | None, enhanced: str | None, text: str) -> Outcome:
    """The outcome of one reply (`code` None: no reply) at `stage`, per DESIGN §6.

    A 2xx after the dot is SENT; any other positive reply is not an outcome (ValueError).
    """
    if code is None:
        return _no_reply(stage)
    if code < 400:
        if stage == "dot" and 200 <= code < 300:
            return Outcome.SENT
        raise ValueError(f"reply {code} at {stage} is not the end of an exchange")
    lowered = text.lower()
    if stage in _SESSION_STAGES:
        return _session_refusal(code, enhanced, lowered)
    if stage in _RECIPIENT_STAGES and (enhanced in _MAILBOX_FULL_CODES or _RECIPIENT_BUSY.search(lowered)):
        return Outcome.DEFERRED
    if enhanced in _SIZE_CODES or (code == 552 and _SIZE.search(lowered)):
        return Outcome.FAILED if code >= 500 else Outcome.DEFERRED
    if _CONNECTIONS.search(lowered):
        return Outcome.ACCOUNT_RETRY
    if enhanced in _EXHAUSTED_CODES or _EXHAUSTED.search(lowered):
        return Outcome.ACCOUNT_EXHAUSTED
    if code == 421:
        return Outcome.ACCOUNT_RETRY
    if code < 500:
        return Outcome.DEFERRED
    if stage == "mail":
        return Outcome.ACCOUNT_DISABLED  # our sender or login refused: every message would be
    return _recipient_refusal(code, enhanced, lowered)


def _no_reply(stage: Stage) -> Outcome:
    if stage == "dot":
        return Outcome.UNKNOWN
    if stage in ("mail", "rcpt", "data"):
        return Outcome.REQUEUE
    return Outcome.ACCOUNT_RETRY


def _session_refusal(code: int, enhanced: str | None, lowered: str) -> Outcome:
    """Greeting, EHLO, STARTTLS or AUTH refused: the account, not a message, is at fault."""
    if _CONNECTIONS.search(lowered):
        return Outcome.ACCOUNT_RETRY
    if enhanced in _EXHAUSTED_CODES or _EXHAUSTED.search(lowered):
        return Outcome.ACCOUNT_EXHAUSTED
    # 4xx (421 busy, 454 "too many login attempts") passes; 5xx (554 greeting, 535/534/530
    # AUTH) needs a person: retrying a refused password gets accounts locked.
    return Outcome.ACCOUNT_RETRY if code < 500 else Outcome.ACCOUNT_DISABLED


def _recipient_refusal(code: int, enhanced: str | None, lowered: str) -> Outcome:
    """A 5xx for this recipient or this message, at RCPT, DATA or after the dot."""
    policy = _POLICY.search(lowered) is not None
    # Servers that check the envelope sender at RCPT time ("Sender address rejected: ... User
    # unknown") say nothing about the recipient: never suppress it for that.
    about_sender = enhanced in _SENDER_CODES or _SENDER_REFUSED.search(lowered) is not None
    if not about_sender and (enhanced in _HARD_CODES or (not policy and _UNKNOWN_USER.search(lowered))):
        return Outcome.HARD_BOUNCE
    if policy or (enhanced is not None and enhanced.startswith("5.7.")):
        return Outcome.POLICY_BLOCK
    if (not about_sender and code == 550 and enhanced in (None, "5.0.0", "5.5.0")
            and _MAILBOX_UNAVAILABLE.search(lowered)):
        return Outcome.HARD_BOUNCE
    return Outcome.FAILED
