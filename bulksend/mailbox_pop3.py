"""[bounces] protocol = "pop3": UIDLs remembered in the store, DELE only after the commit.

POP3 has no flags or folders. The UIDL of every message dealt with is recorded in
`mailbox_seen` in the same transaction as its result (`store_mailbox`), so it is processed
once; a processed message is DELEd after the commit (the server deletes it at QUIT, and if
QUIT never comes the next run deletes it without counting it again). A quarantined message
stays on the server, remembered as kept so it is not counted again.
"""

from __future__ import annotations

import poplib
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Connection, Engine

from bulksend import db, store_mailbox
from bulksend.config import BouncesConfig
from bulksend.mailbox import (
    MAX_BYTES, MESSAGE_SECONDS, PROTOCOL_ERRORS, TIMEOUT, MailboxError, Message, drop,
    failure, label, tls_context, watchdog,
)


class _LongLines:
    """poplib refuses lines over 2,048 bytes; real mail has longer ones (bounded by max_bytes)."""

    file: Any
    max_line = MAX_BYTES

    def _getline(self) -> tuple[bytes, int]:
        line = self.file.readline(self.max_line + 1)
        if len(line) > self.max_line:
            raise poplib.error_proto("line too long")
        if not line:
            raise poplib.error_proto("-ERR EOF")
        if line.endswith(b"\r\n"):
            return line[:-2], len(line)
        return line.rstrip(b"\n"), len(line)


class _POP3(_LongLines, poplib.POP3):
    pass


class _POP3SSL(_LongLines, poplib.POP3_SSL):
    pass


class Pop3Mailbox:
    """[bounces] protocol = "pop3": UIDLs remembered in the store, DELE only after commit."""

    def __init__(self, config: BouncesConfig, password: str, engine: Engine, *,
                 timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES,
                 message_seconds: float = MESSAGE_SECONDS) -> None:
        self.name = label(config)
        self._config = config
        self._password = password
        self._engine = engine
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._message_seconds = message_seconds
        self._numbers: dict[str, int] = {}  # UIDL → message number in this session
        self._listing: set[str] = set()
        self._client = self._connect()

    def _fail(self, what: str, exc: BaseException | str) -> MailboxError:
        return failure(f"{self.name} (POP3)", what, exc)

    def _connect(self) -> poplib.POP3:
        config = self._config
        try:
            if config.security == "tls":
                client: poplib.POP3 = _POP3SSL(config.host, config.port,
                                               context=tls_context(config), timeout=self._timeout)
            else:
                client = _POP3(config.host, config.port, timeout=self._timeout)
                if config.security == "starttls":
                    client.stls(context=tls_context(config))
        except PROTOCOL_ERRORS as exc:
            raise self._fail("cannot connect", exc) from None
        client.max_line = self._max_bytes + 2  # type: ignore[attr-defined]
        try:
            client.user(config.username)
            client.pass_(self._password)
        except PROTOCOL_ERRORS as exc:
            drop(client)
            raise self._fail("login failed", exc) from None
        return client

    def _listings(self) -> list[tuple[int, str, int]]:
        """(number, UIDL, size) of every message in the maildrop."""
        try:
            uidls = dict(_pairs(self._client.uidl()[1]))
            sizes = dict(_pairs(self._client.list()[1]))
        except PROTOCOL_ERRORS as exc:
            raise self._fail("list messages", exc) from None
        return [(number, uidl, int(sizes.get(number, "0"))) for number, uidl in uidls.items()]

    def messages(self) -> Iterator[Message]:
        """Every message whose UIDL is not remembered; ones processed earlier but not yet
        deleted (a session that ended before QUIT) are deleted now, without counting them."""
        listing = self._listings()
        self._numbers = {uidl: number for number, uidl, _ in listing}
        self._listing = set(self._numbers)
        with db.reading(self._engine) as connection:
            processed, kept = store_mailbox.seen(connection, self.name)
        for number, uidl, size in listing:
            if uidl in kept:
                continue
            if uidl in processed:
                self._dele(uidl)
            elif size > self._max_bytes:
                yield Message(uidl, None, f"{size} bytes, over the {self._max_bytes}-byte limit")
            else:
                yield self._retrieve(number, uidl)

    def _retrieve(self, number: int, uidl: str) -> Message:
        with watchdog(self._client.sock, self._message_seconds) as guard:
            try:
                lines = self._client.retr(number)[1]
            except PROTOCOL_ERRORS as exc:
                if not guard.expired:
                    raise self._fail(f"retrieve message {uidl}", exc) from None
        if guard.expired:
            self._reconnect()
            return Message(uidl, None, f"download took over {self._message_seconds:g} s")
        return Message(uidl, b"".join(line + b"\r\n" for line in lines))

    def _reconnect(self) -> None:
        """A new session after a cut-off download (its DELEs are lost; the store redoes them)."""
        drop(self._client)
        self._client = self._connect()
        listing = self._listings()
        self._numbers = {uidl: number for number, uidl, _ in listing}

    def remember(self, connection: Connection, message: Message, *, kept: bool, now: float) -> None:
        """Record the UIDL in the result's transaction: it is never counted again."""
        store_mailbox.remember(connection, self.name, message.key, kept=kept, now=now)

    def processed(self, message: Message) -> None:
        """DELE (it takes effect at QUIT; if QUIT never comes, the next run deletes it)."""
        self._dele(message.key)

    def _dele(self, uidl: str) -> None:
        number = self._numbers.get(uidl)
        if number is None:
            return  # gone from this session's listing
        try:
            self._client.dele(number)
        except PROTOCOL_ERRORS as exc:
            raise self._fail(f"delete message {uidl}", exc) from None

    def quarantine(self, message: Message) -> None:
        """Kept on the server: POP3 has no folders (`remember` noted it as kept)."""

    def close(self) -> None:
        """QUIT (the server deletes the DELEd messages now), then forget UIDLs that are gone."""
        try:
            self._client.quit()
        except PROTOCOL_ERRORS as exc:
            drop(self._client)
            raise self._fail("quit", exc) from None
        with db.transaction(self._engine) as connection:
            store_mailbox.forget_gone(connection, self.name, self._listing)


def _pairs(lines: list[bytes]) -> Iterator[tuple[int, str]]:
    """b"1 abc" lines of UIDL/LIST → (1, "abc")."""
    for line in lines:
        number, _, value = line.decode("ascii", "replace").partition(" ")
        if number.isdigit():
            yield int(number), value.strip()
