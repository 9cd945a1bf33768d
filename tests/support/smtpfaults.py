"""The fault script of the SMTP test server: declarative rules that bend its replies.

A rule is a JSON object (or a `Rule`); a script is a list of rules. At every SMTP event
the server walks the list in order and applies the first rule that matches the event and
is inside its window; with no such rule it behaves like a well-mannered server. Because a
script is plain JSON, the same one drives the in-process server and the subprocess.

Stages (the event a rule is consulted at):
    connect    the greeting, right after the connection (and implicit TLS) is up
    ehlo       EHLO or HELO
    starttls   STARTTLS
    auth       AUTH, before any credentials are exchanged
    mail       MAIL FROM            (`address` matches the envelope sender)
    rcpt       RCPT TO              (`address` matches the recipient)
    data       the DATA command     (its normal reply is 354)
    dot        the reply after the final dot, once the whole message has arrived
    rset       RSET
    quit       QUIT

Actions (`action`, default "reply"):
    reply      answer `reply` at once; the command itself has no effect
    delay      wait `seconds`, then give the normal reply (or `reply` when given)
    trickle    send the normal reply (or `reply`) one byte at a time, `seconds` apart
    drop       abort the connection without a reply; at `data` after the 354 and the
               first message line (mid-DATA), at `dot` after the whole message arrived
    silence    never answer again and hold the connection until the client gives up

Filters and window:
    address    exact envelope address, compared case-insensitively (mail, rcpt only)
    user       only sessions authenticated as this user (mail, rcpt, data, dot, rset, quit)
    after      skip the first `after` matching events (default 0)
    times      then apply to the next `times` events only (default: for ever)

Each rule counts the events that match its stage and filters across all connections,
from the moment the script was set: `set_rules` starts every count afresh. Any reply
starting with 421 closes the connection after it is sent, as real servers do; a refused
greeting such as 554 is followed by 503 to every command but QUIT (RFC 5321 section 3.1).
A transaction ended by drop or silence is journaled at once with reply None, so at `dot`
the journal shows a message that arrived but was never acknowledged.

Example: an unknown recipient, a rate limit on the first two messages, then a server
that swallows the next message it receives:

    [
        {"stage": "rcpt", "address": "nobody@example.test", "reply": "550 5.1.1 user unknown"},
        {"stage": "mail", "times": 2, "reply": "451 4.7.1 rate limited"},
        {"stage": "dot", "times": 1, "action": "silence"}
    ]
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal

Stage = Literal["connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot", "rset", "quit"]
Action = Literal["reply", "delay", "trickle", "drop", "silence"]

STAGES: tuple[str, ...] = (
    "connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot", "rset", "quit",
)
ACTIONS: tuple[str, ...] = ("reply", "delay", "trickle", "drop", "silence")
_ADDRESS_STAGES = frozenset({"mail", "rcpt"})
# Before AUTH has run there is no user to match on.
_USER_STAGES = frozenset({"mail", "rcpt", "data", "dot", "rset", "quit"})
_REPLY_LINE = re.compile(r"[2-5][0-9][0-9]( [\x20-\x7e]*)?")


@dataclass(frozen=True)
class Rule:
    """One fault: at `stage`, for matching events inside the window, do `action`."""

    stage: Stage
    action: Action = "reply"
    reply: str | None = None
    seconds: float = 0.0
    address: str | None = None
    user: str | None = None
    after: int = 0
    times: int | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(f"bad fault rule {self.to_dict()!r}: {problem}")

    def _problem(self) -> str | None:
        if self.stage not in STAGES:
            return f"stage must be one of {', '.join(STAGES)}"
        if self.action not in ACTIONS:
            return f"action must be one of {', '.join(ACTIONS)}"
        if self.action == "reply" and self.reply is None:
            return "action 'reply' needs a reply line"
        if self.action in ("delay", "trickle") and not self.seconds > 0:
            return f"action {self.action!r} needs seconds > 0"
        if self.action not in ("delay", "trickle") and self.seconds:
            return f"seconds means nothing to action {self.action!r}"
        if self.action in ("drop", "silence") and self.reply is not None:
            return f"action {self.action!r} sends no reply"
        if self.reply is not None and not _REPLY_LINE.fullmatch(self.reply):
            return "reply must be one ASCII line: a 2xx-5xx code, then a space and text"
        if self.address is not None and self.stage not in _ADDRESS_STAGES:
            return "address filters only the mail and rcpt stages"
        if self.user is not None and self.stage not in _USER_STAGES:
            return f"user filters only the stages {', '.join(sorted(_USER_STAGES))}"
        if self.after < 0 or (self.times is not None and self.times < 1):
            return "after must be >= 0 and times >= 1"
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        """A rule from its JSON object; unknown keys are errors, so typos do not pass silently."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"bad fault rule {dict(data)!r}: unknown keys {', '.join(unknown)}")
        if "stage" not in data:
            raise ValueError(f"bad fault rule {dict(data)!r}: stage is missing")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The rule as a JSON object, leaving out fields at their defaults."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.default is MISSING or getattr(self, f.name) != f.default
        }

    def matches(self, stage: str, address: str | None, user: str | None) -> bool:
        """Whether an event at `stage` with this envelope address and user passes the filters."""
        if stage != self.stage:
            return False
        if self.address is not None and (address is None or address.casefold() != self.address.casefold()):
            return False
        return self.user is None or user == self.user

    def in_window(self, count: int) -> bool:
        """Whether the `count`-th matching event (counting from 1) is one this rule applies to."""
        return count > self.after and (self.times is None or count <= self.after + self.times)


def parse_rules(rules: Iterable[Rule | Mapping[str, Any]]) -> tuple[Rule, ...]:
    """Rules from `Rule` objects or their JSON objects, validated."""
    return tuple(rule if isinstance(rule, Rule) else Rule.from_dict(rule) for rule in rules)


class FaultScript:
    """The rules in force and how many matching events each has seen; safe across threads."""

    def __init__(self, rules: Iterable[Rule | Mapping[str, Any]] = ()) -> None:
        self._lock = threading.Lock()
        self._rules: tuple[Rule, ...] = ()
        self._seen: list[int] = []
        self.set_rules(rules)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in force."""
        with self._lock:
            return self._rules

    def set_rules(self, rules: Iterable[Rule | Mapping[str, Any]]) -> None:
        """Replace the script; every rule's count of events starts again at zero."""
        parsed = parse_rules(rules)
        with self._lock:
            self._rules, self._seen = parsed, [0] * len(parsed)

    def match(self, stage: str, *, address: str | None = None, user: str | None = None) -> Rule | None:
        """Count this event for every rule it matches; the first rule inside its window wins."""
        chosen = None
        with self._lock:
            for index, rule in enumerate(self._rules):
                if rule.matches(stage, address, user):
                    # Counted even when an earlier rule wins, so `times` means events seen.
                    self._seen[index] += 1
                    if chosen is None and rule.in_window(self._seen[index]):
                        chosen = rule
        return chosen
