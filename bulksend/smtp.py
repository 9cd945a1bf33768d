"""SMTP sessions to one account: connect, TLS, EHLO, AUTH, then one message per `send`.

    session = open_session(account, password, timeouts=Timeouts(command=30, transaction=120))
    result = session.send(envelope_from, recipient, data, before_dot=commit_sending)
    session.close()

Built on smtplib, with the DATA phase done by hand so the final dot is a step of its own:

    MAIL FROM ─► RCPT TO ─► DATA (354) ─► message bytes, dot-stuffed, without the final
    "." line ─► connection still up? ─► before_dot() ─► connection still up? ─► ".\\r\\n"
    (dot_sent = True) ─► reply

When the server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one write and
their three replies are read in order: one round trip instead of three. A refused MAIL or
RCPT still has the later replies read (a DATA accepted all the same gets the connection
dropped: no dot) before the RSET.

When can the server have the message? Only once it has read the whole terminating
CRLF "." CRLF, which this module writes in one `sendall` after `before_dot()` returned
True. Until that call returns nothing can be accepted (`dot_sent` False: REQUEUE or
LEASE_LOST, the delivery is safe to hand out again); from then on a lost reply is the
RFC 1047 window (`dot_sent` True: UNKNOWN). A `before_dot()` that returns False or
raises gets no dot: the connection is reset mid-DATA, which no server may treat as a
complete message; RSET is impossible there (it would be message text).

Deadlines: smtplib's timeout bounds each socket read (`Timeouts.command`); a server that
trickles a byte at a time passes every such check. So each `open_session`/`send`/`close`
also arms a watchdog (one thread per process) that shuts the socket down when
`Timeouts.transaction` passes; the blocked read then fails at once. DNS lookups of the
host name are not covered: configure hosts the resolver answers quickly, or IPs.

Credentials: the password is held in a `_Secret` (its repr is stars) only inside
`open_session`; sessions never keep it, and server replies quoted in errors have it and
its base64 forms removed. A `Session` is used by one thread at a time.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bulksend.config import AccountConfig
from bulksend.errors import StateError
from bulksend.smtp_transport import Client, Guard, default_helo, is_timeout, peer_gone, tls_context
from bulksend.smtp_replies import (
    AccountError, ErrorKind, Outcome, SendResult, SendStage, classify, parse_enhanced, reply_text,
)

__all__ = [
    "AccountError", "Capabilities", "Outcome", "SendResult", "Session", "Timeouts", "classify",
    "open_session",
]

MECHANISMS = ("PLAIN", "LOGIN")
FRESH_LOOK = 0.005  # seconds during which what `alive` saw still stands for `send`
_STUFF = re.compile(rb"(?m)^\.")
_BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_OpenStage = Literal["greeting", "ehlo", "starttls", "auth"]


@dataclass(frozen=True)
class Timeouts:
    """Seconds: `command` bounds every socket read or write, `transaction` a whole
    open_session() or send() however the server dribbles its replies."""

    command: float = 30.0
    transaction: float = 120.0

    def __post_init__(self) -> None:
        if not (self.command > 0 and self.transaction > 0):
            raise ValueError(f"timeouts must be positive, got {self}")


@dataclass(frozen=True)
class Capabilities:
    """What the server offered in its last EHLO (after STARTTLS when there was one)."""

    eightbitmime: bool = False
    smtputf8: bool = False
    pipelining: bool = False
    size: int | None = None  # the advertised SIZE limit; None when none (or 0, unlimited)
    auth: frozenset[str] = frozenset()  # SASL mechanisms, upper case


class _Secret:
    """A password that does not show itself in reprs, tracebacks with locals, or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The password, for the one line of AUTH that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "'********'"


# -- opening a session ---------------------------------------------------------------------


def open_session(
    account: AccountConfig,
    password: str | None,
    timeouts: Timeouts = Timeouts(),
    local_hostname: str | None = None,
    *,
    mechanisms: tuple[str, ...] = MECHANISMS,
) -> Session:
    """Connect, TLS, EHLO and AUTH to `account`; raises AccountError (see its `outcome`).

    `mechanisms` is the order of preference among what the server offers (PLAIN, LOGIN).
    """
    secret = _Secret(password) if password is not None else None
    del password  # from here on only the redacting wrapper is in this frame's locals
    try:
        opener = _Opener(account, secret, timeouts, account.helo or local_hostname or default_helo())
    except (OSError, ssl.SSLError) as error:  # ca_file gone or not PEM since the config was read
        reason = f"cannot load ca_file {account.ca_file}: {error}"
        raise _account_error(account, "certificate", reason, Outcome.ACCOUNT_DISABLED) from None
    opener.refuse_insecure()
    with opener.guard.deadline(timeouts.transaction):
        try:
            capabilities, tls = opener.run(tuple(m.upper() for m in mechanisms))
        except AccountError:
            opener.abandon()
            raise
        except Exception as error:  # noqa: BLE001 - every failure is the account's, named below
            opener.abandon()
            failure = opener.failure(error)
        else:
            return Session(account, opener.client, opener.guard, timeouts, capabilities, tls)
    raise failure from None  # outside the except: no chained smtplib error in tracebacks


class _Opener:
    """The steps of open_session, each raising AccountError for a refusal."""

    def __init__(self, account: AccountConfig, secret: _Secret | None, timeouts: Timeouts, helo: str) -> None:
        self.account = account
        self.secret = secret
        self.guard = Guard()
        implicit = tls_context(account.ca_file) if account.security == "tls" else None
        self.client = Client(self.guard, account.host, implicit, timeouts.command, helo)
        self.stage: _OpenStage = "greeting"

    def refuse_insecure(self) -> None:
        """Refuse plaintext unless allowed, and AUTH over plaintext always (DESIGN §4)."""
        if self.account.security == "none" and not self.account.allow_insecure:
            raise self.error("insecure", 'security = "none" needs allow_insecure = true', Outcome.ACCOUNT_DISABLED)
        if self.account.security == "none" and self.account.username is not None:
            raise self.error("insecure", "refusing AUTH over a plaintext connection", Outcome.ACCOUNT_DISABLED)

    def run(self, mechanisms: tuple[str, ...]) -> tuple[Capabilities, bool]:
        """Every step; returns what the server offers and whether the connection is TLS."""
        self.stage = "greeting"
        self.expect("greeting", *self.client.connect(self.account.host, self.account.port), ok=(220,))
        self.ehlo()
        if self.account.security == "starttls":
            self.stage = "starttls"
            if not self.client.has_extn("starttls"):
                raise self.error("starttls", "the server does not offer STARTTLS; refusing to continue "
                                 "without TLS (a downgrade)", Outcome.ACCOUNT_DISABLED)
            self.expect("starttls", *self.client.docmd("STARTTLS"), ok=(220,))
            assert self.client.sock is not None  # connect() set it
            self.client.sock = self.client.wrap(self.client.sock, tls_context(self.account.ca_file))
            self.client.file = None  # RFC 3207: forget everything learnt before TLS
            self.client.ehlo_resp = self.client.helo_resp = None
            self.client.esmtp_features, self.client.does_esmtp = {}, False
            self.ehlo()
        features = self.client.esmtp_features
        size = features.get("size", "").strip()
        capabilities = Capabilities(
            eightbitmime="8bitmime" in features, smtputf8="smtputf8" in features,
            pipelining="pipelining" in features,
            size=int(size) if size.isdigit() and int(size) > 0 else None,
            auth=frozenset(features.get("auth", "").upper().split()),
        )
        if self.account.username is not None:
            self.login(capabilities, mechanisms)
        return capabilities, self.account.security != "none"

    def ehlo(self) -> None:
        self.stage = "ehlo"
        self.expect("ehlo", *self.client.ehlo(), ok=(250,))

    def login(self, capabilities: Capabilities, mechanisms: tuple[str, ...]) -> None:
        self.stage = "auth"
        username = self.account.username or ""
        if not isinstance(self.client.sock, ssl.SSLSocket):
            raise self.error("insecure", "refusing AUTH over a plaintext connection", Outcome.ACCOUNT_DISABLED)
        offered = [m for m in mechanisms if m in capabilities.auth]
        if not offered:
            have = " ".join(sorted(capabilities.auth)) or "none"
            raise self.error("auth", f"the server offers no usable AUTH mechanism (offered: {have})",
                             Outcome.ACCOUNT_DISABLED)
        password = self.secret.reveal() if self.secret is not None else ""
        if offered[0] == "PLAIN":
            code, reply = self.client.docmd("AUTH", "PLAIN " + _b64(f"\0{username}\0{password}"))
        else:
            code, reply = self.client.docmd("AUTH", "LOGIN")
            if code == 334:
                code, reply = self.client.docmd(_b64(username))
            if code == 334:
                code, reply = self.client.docmd(_b64(password))
        self.expect("auth", code, reply, ok=(235,))

    def expect(self, stage: _OpenStage, code: int, reply: bytes, *, ok: tuple[int, ...]) -> None:
        """Go on if `code` is one of `ok`, else raise the AccountError the reply means."""
        if code in ok:
            return
        if code < 0:  # smtplib's -1: the reply line was not SMTP
            raise self.error("connect", f"unreadable {stage} reply", Outcome.ACCOUNT_RETRY)
        text = self.redact(reply_text(reply))
        enhanced = parse_enhanced(code, text)
        raise self.error(stage, f"{code} {text}".strip(), classify(stage, code, enhanced, text), code, enhanced)

    def failure(self, error: Exception) -> AccountError:
        """The AccountError for an exception raised while opening (not for a reply)."""
        if isinstance(error, ssl.SSLCertVerificationError):
            return self.error("certificate", f"TLS certificate not trusted: {error.verify_message}",
                              Outcome.ACCOUNT_DISABLED)
        if self.guard.expired or is_timeout(error):
            return self.error("timeout", f"timed out during {self.stage}", Outcome.ACCOUNT_RETRY)
        if isinstance(error, ssl.SSLError):
            return self.error("tls", f"TLS handshake failed: {error.reason or error}", Outcome.ACCOUNT_RETRY)
        if isinstance(error, ConnectionRefusedError):
            return self.error("connect", "connection refused", Outcome.ACCOUNT_RETRY)
        if isinstance(error, (OSError, smtplib.SMTPException)):
            what = str(error) or type(error).__name__
            return self.error("connect", f"connection failed during {self.stage}: {self.redact(what)}",
                              Outcome.ACCOUNT_RETRY)
        raise error  # a bug, not the account's fault

    def error(self, kind: ErrorKind, reason: str, outcome: Outcome,
              code: int | None = None, enhanced: str | None = None) -> AccountError:
        return _account_error(self.account, kind, reason, outcome, code, enhanced)

    def redact(self, text: str) -> str:
        """`text` without the password in any form the AUTH exchange could echo back."""
        if self.secret is None or not self.secret.reveal():
            return text
        password, username = self.secret.reveal(), self.account.username or ""
        for form in (_b64(f"\0{username}\0{password}"), _b64(password), password):
            text = text.replace(form, "********")
        return text

    def abandon(self) -> None:
        """Drop a half-opened connection without ceremony (QUIT could hang as well)."""
        self.client.abort()


def _account_error(account: AccountConfig, kind: ErrorKind, reason: str, outcome: Outcome,
                   code: int | None = None, enhanced: str | None = None) -> AccountError:
    address = f"{account.host}:{account.port}"
    return AccountError(account.name, address, reason, kind=kind, outcome=outcome, code=code, enhanced=enhanced)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# -- a session -----------------------------------------------------------------------------


class Session:
    """An open, authenticated connection to one account; `send` one message at a time."""

    def __init__(self, account: AccountConfig, client: Client, guard: Guard, timeouts: Timeouts,
                 capabilities: Capabilities, tls: bool) -> None:
        self.account = account
        self.capabilities = capabilities
        self.tls = tls
        self.sent = 0  # messages this connection carried (every MAIL FROM), for messages_per_connection
        self._client = client
        self._guard = guard
        self._timeouts = timeouts
        self._alive = True
        self._looked_at = -1.0  # when `alive` last found the connection up (monotonic)

    @property
    def alive(self) -> bool:
        """Whether the connection can carry another message: False after a connection
        problem, a 421, a lease loss, close(), or once the server has hung up on an idle
        connection (checked without blocking). When False, open a new session."""
        if self._alive:
            if peer_gone(self._client.sock):
                self._kill()
            else:
                self._looked_at = time.monotonic()
        return self._alive

    @property
    def eight_bit(self) -> bool:
        """Whether the server takes 8-bit bodies (8BITMIME); render 7-bit when False."""
        return self.capabilities.eightbitmime

    def __repr__(self) -> str:
        state = "open" if self._alive else "closed"
        return f"<Session {self.account.name} {self.account.host}:{self.account.port} {state} sent={self.sent}>"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, envelope_from: str, recipient: str, data: bytes,
             before_dot: Callable[[], bool] | None = None) -> SendResult:
        """Send `data` (CRLF lines, sent unchanged) to exactly `recipient`; see the module doc.

        Raises ValueError for 8-bit data the server cannot take (render 7-bit when
        `capabilities.eightbitmime` is False), bare CR/LF, or an address with controls or
        angle brackets: all caller bugs, found before anything is sent. Raises StateError
        on a dead session. Whatever `before_dot` raises propagates, with no dot sent.
        """
        if not self._alive:
            raise StateError(f"account {self.account.name}: the SMTP session is closed")
        for address in (envelope_from, recipient):
            if _BAD_ADDRESS.search(address):
                raise ValueError(f"envelope address {address!r} has control characters or angle brackets")
        eight_bit = not data.isascii()
        if eight_bit and not self.capabilities.eightbitmime:
            raise ValueError(f"account {self.account.name}: the server does not offer 8BITMIME; "
                             "render the message 7-bit")
        lines = data.count(b"\n")
        if lines != data.count(b"\r") or lines != data.count(b"\r\n"):  # fast; a regex costs 0.1 ms
            bare = _BARE_EOL.search(data)
            assert bare is not None
            raise ValueError(f"message has a bare CR or LF at byte {bare.start()}: lines must end in CRLF")
        utf8 = not (envelope_from.isascii() and recipient.isascii())
        if utf8 and not self.capabilities.smtputf8:
            return SendResult("mail", None, None, "the address needs SMTPUTF8, which the server does not offer",
                              Outcome.FAILED, dot_sent=False, reached_mail=False)
        options = "".join([
            f" SIZE={len(data)}" if self.capabilities.size is not None else "",
            " BODY=8BITMIME" if eight_bit else "",
            " SMTPUTF8" if utf8 else "",
        ])
        self._client.command_encoding = "utf-8" if utf8 else "ascii"
        with self._guard.deadline(self._timeouts.transaction):
            return self._transaction(envelope_from, recipient, data, options, before_dot)

    def _transaction(self, envelope_from: str, recipient: str, data: bytes, options: str,
                     before_dot: Callable[[], bool] | None) -> SendResult:
        stage: SendStage = "mail"
        reached = dot_sent = asking = False
        client = self._client
        try:
            # e.g. closed while idle between messages; not polled again when `alive` just
            # looked (the sender asks it before each message): a poll is a system call and,
            # with twenty lanes, a GIL hand-over
            if time.monotonic() - self._looked_at > FRESH_LOOK and peer_gone(client.sock):
                return self._lost("mail", reached=False, why="the server closed the idle connection")
            pipelined = self.capabilities.pipelining
            if pipelined:
                client.send(f"MAIL FROM:<{envelope_from}>{options}\r\nRCPT TO:<{recipient}>\r\nDATA\r\n")
            else:
                client.putcmd("MAIL", f"FROM:<{envelope_from}>{options}")
            reached = True
            self.sent += 1
            code, reply = client.getreply()
            if code != 250:
                return self._refused("mail", code, reply, unread=2 if pipelined else 0)
            stage = "rcpt"
            if not pipelined:
                client.putcmd("RCPT", f"TO:<{recipient}>")
            code, reply = client.getreply()
            if code not in (250, 251):
                return self._refused("rcpt", code, reply, unread=1 if pipelined else 0)
            stage = "data"
            if not pipelined:
                client.putcmd("DATA")
            code, reply = client.getreply()
            if code != 354:
                return self._refused("data", code, reply)
            client.send(_body(data))
            if peer_gone(client.sock):
                return self._lost("data", reached=True, why="the server hung up during DATA")
            asking = True  # what before_dot raises is the caller's, not a connection problem
            if before_dot is not None and not self._ask(before_dot):
                return SendResult("dot", None, None, "lease lost: final dot withheld, connection reset",
                                  Outcome.LEASE_LOST, dot_sent=False, reached_mail=True)
            asking = False
            if peer_gone(client.sock):
                return self._lost("data", reached=True, why="the server hung up before the final dot")
            stage = "dot"
            client.send(b".\r\n")
            dot_sent = True
            code, reply = client.getreply()
            if not 200 <= code < 300:
                return self._refused("dot", code, reply)
            text = reply_text(reply)
            return SendResult("dot", code, parse_enhanced(code, text), text, Outcome.SENT, True, True)
        except (OSError, smtplib.SMTPException) as error:
            if asking:
                raise
            why = f"no reply after the final dot ({error})" if dot_sent else str(error) or type(error).__name__
            return self._lost(stage, reached=reached, why=why, timeout=is_timeout(error), dot_sent=dot_sent)

    def _ask(self, before_dot: Callable[[], bool]) -> bool:
        """before_dot(); on False or an exception the connection is reset without the dot."""
        try:
            go_on = before_dot()
        except BaseException:
            self._kill()
            raise
        if not go_on:
            self._kill()
        return bool(go_on)

    def _refused(self, stage: SendStage, code: int, reply: bytes, unread: int = 0) -> SendResult:
        """A 4xx/5xx (or nonsense) reply: classify it and get the session ready for the next one.

        `unread`: replies to pipelined commands after the refused one, still to be read.
        """
        self._drain(unread)
        text = reply_text(reply)
        dot_sent = stage == "dot"  # any reply there answers a dot that went out
        if code < 400:  # 2xx/3xx where it makes no sense, or smtplib's -1: the dialogue is lost
            self._kill()
            return SendResult(stage, code if code > 0 else None, None, f"unexpected reply {text!r}",
                              classify(stage, None, None, ""), dot_sent=dot_sent, reached_mail=True)
        enhanced = parse_enhanced(code, text)
        outcome = classify(stage, code, enhanced, text)
        if code == 421:
            self._kill()  # the server closes after a 421
        elif stage != "dot" and self._alive:  # after the dot the transaction is over already
            self._reset()
        return SendResult(stage, code, enhanced, text, outcome, dot_sent=dot_sent, reached_mail=True)

    def _drain(self, unread: int) -> None:
        """Read the replies to pipelined commands after a refused one; they change nothing.

        A DATA accepted after all (354) leaves the server waiting for a message, which only
        dropping the connection ends without one."""
        try:
            for _ in range(unread):
                code, _ = self._client.getreply()
                if code == 354:
                    self._kill()
                    return
        except (OSError, smtplib.SMTPException):
            self._kill()

    def _lost(self, stage: SendStage, *, reached: bool, why: str, timeout: bool = False,
              dot_sent: bool = False) -> SendResult:
        """No usable reply: the session is dead; the outcome depends on where it happened."""
        timeout = timeout or self._guard.expired
        self._kill()
        if timeout and not dot_sent:
            limit = "transaction deadline passed" if self._guard.expired else "timed out"
            stage_name = stage.upper() if stage != "dot" else "the dot"
            return SendResult("connection", None, None, f"{limit} during {stage_name}",
                              Outcome.ACCOUNT_RETRY, dot_sent=False, reached_mail=reached)
        return SendResult(stage, None, None, why, classify(stage, None, None, why),
                          dot_sent=dot_sent, reached_mail=reached)

    def _reset(self) -> None:
        """RSET after a refused transaction so the connection can carry the next message."""
        try:
            code, _ = self._client.docmd("RSET")
        except (OSError, smtplib.SMTPException):
            code = -1
        if code != 250:
            self._kill()

    def interrupt(self) -> None:
        """Cut the connection from another thread, as if the transaction deadline had passed:
        a blocked read fails at once (after the dot the message is `unknown`). For a
        shutdown that cannot wait for a stuck server."""
        self._guard.expire()

    def _kill(self) -> None:
        """Reset the connection (RST): after a lease loss the server must see no more bytes."""
        self._alive = False
        self._client.abort()

    def close(self) -> None:
        """QUIT (bounded by the command timeout) and close; never raises."""
        if not self._alive:
            self._kill()
            return
        try:
            with self._guard.deadline(self._timeouts.command):
                self._client.docmd("QUIT")
            self._alive = False
            self._guard.sock = None
            self._client.close()  # an orderly FIN after 221
        except Exception:  # noqa: BLE001 - closing must not fail the caller
            pass
        self._kill()


def _body(data: bytes) -> bytes:
    """The DATA payload without the final "." line: dot-stuffed, ending in CRLF."""
    # Most messages have no line starting with a dot: a substring test is 4x cheaper than sub.
    stuffed = _STUFF.sub(b"..", data) if data.startswith(b".") or b"\n." in data else data
    return stuffed if stuffed.endswith(b"\r\n") else stuffed + b"\r\n"
