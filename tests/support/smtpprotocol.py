"""The SMTP test server's sessions: aiosmtpd's protocol plus the fault script and the journal.

`ServerSpec` says what a server is (JSON-serialisable, so a subprocess can be given the
same one); `ServerState` is what its sessions share; `FaultySMTP` is one session. Every
command goes through `FaultySMTP._run_command`, which consults the fault script before
aiosmtpd handles it, and every reply goes through `push`, which keeps the journal up to
date before the reply leaves, then sends it whole or trickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.smtpfaults import FaultScript, Rule, parse_rules
from tests.support.smtpjournal import Journal, Transaction

HOST = "127.0.0.1"
Mode = Literal["plain", "starttls", "tls"]
MODES: tuple[str, ...] = ("plain", "starttls", "tls")

_COMMAND_STAGES = {
    "EHLO": "ehlo", "HELO": "ehlo", "STARTTLS": "starttls", "AUTH": "auth", "MAIL": "mail",
    "RCPT": "rcpt", "DATA": "data", "RSET": "rset", "QUIT": "quit",
}
# Commands after which aiosmtpd has forgotten the envelope (STARTTLS: RFC 3207 section 4.2).
_ENDS_TRANSACTION = {"RSET": "rset", "QUIT": "quit", "EHLO": "ehlo", "HELO": "ehlo", "STARTTLS": "starttls"}
_NEEDS_AUTH = frozenset({"MAIL", "RCPT", "DATA"})
_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
_ACCEPTED = "250 2.0.0 OK"

# aiosmtpd 1.4 logs this on every successful AUTH, burying real failures in test output.
logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())


@dataclass(frozen=True)
class ServerSpec:
    """What a test server is; JSON-serialisable so a subprocess can run the same server."""

    mode: Mode = "plain"  # "tls" is implicit TLS, as on port 465
    users: Mapping[str, str] = field(default_factory=dict)  # AUTH PLAIN / LOGIN accounts
    require_auth: bool = False  # 530 to MAIL, RCPT and DATA before AUTH
    require_starttls: bool = False  # 530 to all but EHLO, STARTTLS, NOOP, QUIT before TLS
    rules: tuple[Rule, ...] = ()  # the fault script, see tests.support.smtpfaults
    smtputf8: bool = False  # advertise SMTPUTF8
    eightbitmime: bool = True  # advertise 8BITMIME (when False, BODY=8BITMIME gets 555)
    size_limit: int = 32 * 1024 * 1024  # advertised SIZE; larger messages get 552
    hostname: str = "mx.bulksend.test"  # named in the greeting; never looked up in DNS
    idle_timeout: float = 300.0  # seconds of client silence before the server hangs up
    port: int = 0  # 0: any free port
    journal_path: str | None = None  # JSON-lines journal file, fsynced per record
    port_file: str | None = None  # the subprocess writes its port here once listening
    cert_file: str | None = None  # PEM server certificate, for the TLS modes
    key_file: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", dict(self.users))
        object.__setattr__(self, "rules", parse_rules(self.rules))
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: must be one of {', '.join(MODES)}")
        if self.mode != "plain" and not (self.cert_file and self.key_file):
            raise ValueError(f"mode {self.mode!r} needs cert_file and key_file")
        if self.require_auth and not self.users:
            raise ValueError("require_auth needs users")
        if self.require_starttls and self.mode != "starttls":
            raise ValueError("require_starttls needs mode 'starttls'")

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON object."""
        spec = asdict(self)
        spec["rules"] = [rule.to_dict() for rule in self.rules]
        return spec

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> ServerSpec:
        """A spec from its JSON object (rules as JSON objects)."""
        return cls(**spec)

    def with_rules(self, rules: Iterable[Rule | Mapping[str, Any]]) -> ServerSpec:
        """The same spec with another fault script."""
        return replace(self, rules=parse_rules(rules))


class ServerState:
    """What all sessions of one server share: spec, fault script, journal, live sessions."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.faults = FaultScript(spec.rules)
        self.journal = Journal(Path(spec.journal_path) if spec.journal_path else None)
        self.live: set[FaultySMTP] = set()
        self.connections = 0
        self.stopping = False
        self.tls_context: ssl.SSLContext | None = None
        if spec.mode != "plain":
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(str(spec.cert_file), str(spec.key_file))

    def next_session_id(self) -> str:
        """A session id unique across restarts of a server process (the pid changes)."""
        self.connections += 1
        return f"{os.getpid()}-{self.connections}"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd authenticator checking the spec's users (PLAIN and LOGIN alike)."""
        assert isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode("utf-8", "replace")
        if login in self.spec.users and self.spec.users[login] == auth_data.password.decode("utf-8", "replace"):
            return AuthResult(success=True, auth_data=login)
        # handled=False makes aiosmtpd send 535 itself; handled=True would leave the client hanging.
        return AuthResult(success=False, handled=False)


@dataclass
class _Draft:
    """A transaction still in progress."""

    started: float
    tls: bool
    auth_user: str | None
    ehlo: str | None
    mail_from: str
    mail_options: tuple[str, ...]
    mail_reply: str
    rcpt_to: list[str] = field(default_factory=list)
    rcpt_rejected: list[tuple[str, str]] = field(default_factory=list)
    data_reply: str | None = None
    data: bytes | None = None
    reply: str | None = None


class _Hooks:
    """aiosmtpd handler hooks, handed back to the session they are called for."""

    async def handle_EHLO(
        self, server: FaultySMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        return server.ehlo_lines(hostname, responses)

    async def handle_DATA(self, server: FaultySMTP, session: Session, envelope: Envelope) -> str:
        return await server.message_received(envelope)


_HOOKS = _Hooks()


def _is_final(line: str) -> bool:
    """Whether a reply line is the last of its reply ("250 x", not "250-x")."""
    return line[3:4] != "-"


class FaultySMTP(SMTP):
    """One SMTP session that consults the fault script and journals its transactions."""

    def __init__(self, state: ServerState) -> None:
        spec = state.spec
        super().__init__(
            _HOOKS,
            hostname=spec.hostname,
            ident="ESMTP bulksend test server",
            data_size_limit=spec.size_limit,
            enable_SMTPUTF8=spec.smtputf8,
            tls_context=state.tls_context if spec.mode == "starttls" else None,
            require_starttls=spec.require_starttls,
            # aiosmtpd cannot see implicit TLS, and plain mode may offer AUTH in clear text.
            auth_require_tls=spec.mode == "starttls",
            authenticator=state.authenticate,
            timeout=spec.idle_timeout,
            loop=asyncio.get_running_loop(),
        )
        self._state = state
        self._session_id = state.next_session_id()
        self._peer = ""
        self._greeting: str | None = None  # a fault's replacement for the greeting
        self._greeted = False
        self._refusing = False  # after a refused greeting, only QUIT is served
        self._gap = 0.0  # seconds between reply bytes while a trickle is in force
        self._command: str | None = None
        self._arg: str | None = None
        self._final_replies = 0  # within the current command
        self._draft: _Draft | None = None
        self._smtp_methods = {name: self._faulted(name, method) for name, method in self._smtp_methods.items()}

    # -- connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._peer:  # aiosmtpd calls this again for the TLS layer after STARTTLS
            host, port = transport.get_extra_info("peername")[:2]
            self._peer = f"{host}:{port}"
            self._state.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._end("shutdown" if self._state.stopping else "disconnected")
        self._state.live.discard(self)
        super().connection_lost(error)

    def abort_connection(self) -> None:
        """Drop the connection at once (server shutdown)."""
        if self.transport is not None:
            self.transport.abort()

    async def _handle_client(self) -> None:
        rule = self._state.faults.match("connect")
        if rule is not None:
            await self._prelude(rule, "connect")
            self._greeting = rule.reply
        await super()._handle_client()

    # -- commands --------------------------------------------------------------------

    def _faulted(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            self._command, self._arg, self._final_replies = name, arg, 0
            try:
                await self._run_command(name, method, arg)
            finally:
                self._command, self._gap = None, 0.0

        return run

    async def _run_command(self, name: str, method: Callable[[str | None], Awaitable[None]], arg: str | None) -> None:
        refusal = self._refusal(name, arg)
        if refusal is not None:
            await self.push(refusal)
            return
        stage = _COMMAND_STAGES.get(name)
        rule = None if stage is None else self._state.faults.match(
            stage, address=self._address(name, arg), user=self._user()
        )
        if stage is not None and rule is not None:
            await self._prelude(rule, stage)
            if rule.reply is not None:
                await self.push(rule.reply)  # instead of the command, which has no effect
                return
        await method(arg)

    def _refusal(self, name: str, arg: str | None) -> str | None:
        spec = self._state.spec
        if self._refusing and name != "QUIT":
            return "503 5.5.1 Bad sequence of commands"
        if name in _NEEDS_AUTH and spec.require_auth and not (self.session and self.session.authenticated):
            return "530 5.7.0 Authentication required"
        if name == "MAIL" and not spec.eightbitmime and "BODY=8BITMIME" in (arg or "").upper():
            return "555 5.5.4 BODY=8BITMIME is not offered here"
        return None

    async def _prelude(self, rule: Rule, stage: str) -> None:
        """Apply a rule's timing; drop and silence end the session and never return."""
        if rule.action == "delay":
            await asyncio.sleep(rule.seconds)
        elif rule.action == "trickle":
            self._gap = rule.seconds
        elif rule.action == "drop":
            if stage == "data":  # let the client start sending, so the drop is mid-DATA
                await self.push(_GO_AHEAD)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    await asyncio.wait_for(self._reader.readuntil(b"\r\n"), timeout=1.0)
            self._end("dropped")
            self.abort_connection()
            await self.loop.create_future()  # cancelled by aiosmtpd once the loss is noticed
        elif rule.action == "silence":
            self._end("silenced")
            await self.loop.create_future()  # cancelled when the client goes away

    def ehlo_lines(self, hostname: str, responses: list[str]) -> list[str]:
        """The EHLO reply without the extensions this server is told not to offer."""
        assert self.session is not None
        self.session.host_name = hostname  # aiosmtpd leaves this to an EHLO hook
        hidden = set()
        if not self._state.spec.eightbitmime:
            hidden.add("8BITMIME")
        if not self._state.spec.users:
            hidden.add("AUTH")
        return [line for line in responses if line[4:].split(" ")[0] not in hidden]

    async def message_received(self, envelope: Envelope) -> str:
        """Journal a complete message and give the reply after the final dot (stage `dot`)."""
        draft = self._draft
        assert draft is not None, "aiosmtpd accepted DATA outside a journaled transaction"
        draft.data = bytes(envelope.original_content or b"")
        self._gap = 0.0  # a trickle at the `data` stage slows the 354 only
        rule = self._state.faults.match("dot", user=self._user())
        if rule is not None:
            await self._prelude(rule, "dot")
        draft.reply = rule.reply if rule is not None and rule.reply is not None else _ACCEPTED
        self._end("replied")
        return draft.reply

    # -- replies and the journal -----------------------------------------------------

    async def push(self, status: str | bytes) -> None:  # type: ignore[override]
        line = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        gap = self._gap
        if not self._greeted:
            self._greeted = True
            line = self._greeting or line
            self._refusing = not line.startswith("2")
            self._gap = 0.0  # a trickled greeting does not slow what follows
        if _is_final(line):
            self._note_reply(line)  # before sending: a client that saw the reply finds the record
        if gap:
            await self._trickle(line, gap)
        else:
            await super().push(line)
        if line.startswith("421") and _is_final(line) and self.transport is not None:
            self.transport.close()

    async def _trickle(self, line: str, gap: float) -> None:
        data = line.encode("utf-8") + b"\r\n"
        for index in range(len(data)):
            if index:
                await asyncio.sleep(gap)
            self._writer.write(data[index:index + 1])
            await self._writer.drain()

    def _note_reply(self, line: str) -> None:
        """Bring the open transaction up to date with the final line of a reply."""
        command, draft = self._command, self._draft
        self._final_replies += 1
        if command == "MAIL" and draft is None:
            address, options = self._path(self._arg, "FROM:")
            self._draft = _Draft(time.time(), self._tls(), self._user(), self._ehlo(), address, options, line)
            if not line.startswith("2"):
                self._end("mail_refused")
        elif draft is None:
            return
        elif command == "RCPT":
            address = self._path(self._arg, "TO:")[0]
            if line.startswith("2"):
                draft.rcpt_to.append(address)
            else:
                draft.rcpt_rejected.append((address, line))
        elif command == "DATA" and self._final_replies == 1:
            draft.data_reply = line
        elif command == "DATA":  # aiosmtpd refused the message itself (line too long, too big)
            draft.reply = line
            self._end("replied")
        elif command in _ENDS_TRANSACTION:
            self._end(_ENDS_TRANSACTION[command])
        if line.startswith("421"):
            self._end("server_closed")

    def _end(self, end: str) -> None:
        draft, self._draft = self._draft, None
        if draft is None:
            return
        self._state.journal.append(
            Transaction(
                session=self._session_id, peer=self._peer, tls=draft.tls, auth_user=draft.auth_user,
                ehlo=draft.ehlo, mail_from=draft.mail_from, mail_options=draft.mail_options,
                mail_reply=draft.mail_reply, rcpt_to=tuple(draft.rcpt_to),
                rcpt_rejected=tuple(draft.rcpt_rejected), data_reply=draft.data_reply, data=draft.data,
                reply=draft.reply, end=end, started=draft.started, finished=time.time(),
            )
        )

    def _path(self, arg: str | None, keyword: str) -> tuple[str, tuple[str, ...]]:
        """The address and parameters of MAIL FROM / RCPT TO, as sent (the raw text if unparsable)."""
        text = self._strip_command_keyword(keyword, arg or "")
        if text is None:
            return arg or "", ()
        address, params = self._getaddr(text)
        if address is None:
            return text, ()
        return address, tuple((params or "").split())

    def _address(self, command: str, arg: str | None) -> str | None:
        if command == "MAIL":
            return self._path(arg, "FROM:")[0]
        if command == "RCPT":
            return self._path(arg, "TO:")[0]
        return None

    def _user(self) -> str | None:
        if self.session is None or not self.session.authenticated:
            return None
        return str(self.session.auth_data)

    def _ehlo(self) -> str | None:
        return self.session.host_name if self.session is not None else None

    def _tls(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None


async def listen(state: ServerState) -> asyncio.Server:
    """Start listening on 127.0.0.1 (implicit TLS in mode "tls")."""
    implicit_tls = state.tls_context if state.spec.mode == "tls" else None
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: FaultySMTP(state), HOST, state.spec.port, ssl=implicit_tls)


async def shutdown(server: asyncio.Server, state: ServerState) -> None:
    """Stop listening, cut every session (journaling open transactions) and close the journal."""
    state.stopping = True
    server.close()
    for session in list(state.live):
        session.abort_connection()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while state.live and loop.time() < deadline:
        await asyncio.sleep(0.002)  # connection_lost runs a few loop turns after abort()
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await server.wait_closed()
    state.journal.close()
