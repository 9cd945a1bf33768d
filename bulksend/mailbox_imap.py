"""[bounces] protocol = "imap": a folder read by UID; deletions only after the commit.

Messages are fetched with BODY.PEEK[] (nothing marked \\Seen) after an RFC822.SIZE check.
A processed message is flagged \\Deleted right after its batch is committed and expunged
when the reader closes (UID EXPUNGE of exactly those with UIDPLUS), so a crash in between
loses nothing and the next run skips it. Quarantined ones are moved (UID MOVE, or COPY +
\\Deleted without MOVE) to `quarantine_folder`, created on first use.
"""

from __future__ import annotations

import base64
import imaplib
import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Connection

from bulksend.config import BouncesConfig
from bulksend.mailbox import (
    MAX_BYTES, MESSAGE_SECONDS, PROTOCOL_ERRORS, TIMEOUT, MailboxError, Message, drop,
    failure, label, tls_context, watchdog,
)


def _quote(name: str) -> str:
    """A folder name as an IMAP quoted string in modified UTF-7 (imaplib sends it as it is)."""
    encoded = _modified_utf7(name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _modified_utf7(name: str) -> str:
    """RFC 3501 5.1.3: "&" is "&-", runs of non-ASCII are "&" + base64 of UTF-16BE + "-"."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            data = base64.b64encode("".join(run).encode("utf-16-be")).decode("ascii")
            out.append("&" + data.rstrip("=").replace("/", ",") + "-")
            run.clear()

    for char in name:
        if " " <= char <= "~":
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


_UID = re.compile(rb"UID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


class ImapMailbox:
    """[bounces] protocol = "imap": reads a folder by UID, deletes only what was committed."""

    def __init__(self, config: BouncesConfig, password: str, *, timeout: float = TIMEOUT,
                 max_bytes: int = MAX_BYTES, message_seconds: float = MESSAGE_SECONDS,
                 move: bool | None = None) -> None:
        self.name = label(config)
        self._config = config
        self._password = password
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._message_seconds = message_seconds
        self._move = move  # None: use MOVE when the server offers it
        self._quarantine_ready = False
        self._deleted: list[str] = []
        self._client = self._connect()

    def _fail(self, what: str, exc: BaseException | str) -> MailboxError:
        return failure(f"{self.name} (IMAP)", what, exc)

    def _connect(self) -> imaplib.IMAP4:
        config = self._config
        try:
            if config.security == "tls":
                client: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    config.host, config.port, ssl_context=tls_context(config), timeout=self._timeout)
            else:
                client = imaplib.IMAP4(config.host, config.port, timeout=self._timeout)
                if config.security == "starttls":
                    client.starttls(ssl_context=tls_context(config))
        except PROTOCOL_ERRORS as exc:
            raise self._fail("cannot connect", exc) from None
        try:
            client.login(config.username, self._password)
        except PROTOCOL_ERRORS as exc:
            drop(client)
            raise self._fail("login failed", exc) from None
        try:
            status, data = client.capability()  # the list grows after login (MOVE, UIDPLUS)
            self._capabilities = set(data[0].upper().split()) if status == "OK" and data[0] else set()
            status, data = client.select(_quote(config.folder))
        except PROTOCOL_ERRORS as exc:
            drop(client)
            raise self._fail(f"open folder {config.folder!r}", exc) from None
        if status != "OK":
            drop(client)
            raise self._fail(f"open folder {config.folder!r}", _text(data))
        return client

    def _command(self, what: str, *args: str) -> list[Any]:
        try:
            status, data = self._client.uid(*args)
        except PROTOCOL_ERRORS as exc:
            raise self._fail(what, exc) from None
        if status != "OK":
            raise self._fail(what, _text(data))
        return data

    def messages(self) -> Iterator[Message]:
        """Every message not flagged \\Deleted, by UID; oversize ones without their bytes."""
        uids = self._command("search", "SEARCH", "UNDELETED")[0].split()
        if not uids:
            return
        sizes: dict[bytes, int] = {}
        # 1:* rather than the list: a long UID list could pass the server's line length limit.
        for item in self._command("fetch sizes", "FETCH", "1:*", "(RFC822.SIZE)"):
            line = item[0] if isinstance(item, tuple) else item
            uid, size = _UID.search(line or b""), _SIZE.search(line or b"")
            if uid and size:
                sizes[uid.group(1)] = int(size.group(1))
        for uid in uids:
            size = sizes.get(uid)
            if size is None:
                continue  # expunged meanwhile by another client
            key = uid.decode()
            if size > self._max_bytes:
                yield Message(key, None, f"{size} bytes, over the {self._max_bytes}-byte limit")
                continue
            message = self._fetch(key)
            if message is not None:
                yield message

    def _fetch(self, uid: str) -> Message | None:
        with watchdog(self._client.sock, self._message_seconds) as guard:
            try:
                status, data = self._client.uid("FETCH", uid, "(BODY.PEEK[])")
            except PROTOCOL_ERRORS as exc:
                if not guard.expired:
                    raise self._fail(f"fetch UID {uid}", exc) from None
                status, data = "", []
        if guard.expired:
            drop(self._client)
            self._client = self._connect()
            return Message(uid, None, f"download took over {self._message_seconds:g} s")
        if status != "OK":
            raise self._fail(f"fetch UID {uid}", _text(data))
        for item in data:
            found = _UID.search(item[0]) if isinstance(item, tuple) else None
            if found and found.group(1).decode() == uid:
                return Message(uid, item[1])
        return None  # expunged meanwhile

    def remember(self, connection: Connection, message: Message, *, kept: bool, now: float) -> None:
        """Nothing to record: IMAP itself removes what is done."""

    def processed(self, message: Message) -> None:
        """Flag the message \\Deleted (expunged on close, so a crash before that loses nothing)."""
        self._command(f"delete UID {message.key}", "STORE", message.key, "+FLAGS.SILENT", r"(\Deleted)")
        self._deleted.append(message.key)

    def quarantine(self, message: Message) -> None:
        """Move the message to the quarantine folder, creating the folder if needed."""
        folder = _quote(self._config.quarantine_folder)
        if not self._quarantine_ready:
            self._ensure_folder(folder)
        move = self._move if self._move is not None else b"MOVE" in self._capabilities
        what = f"move UID {message.key} to {self._config.quarantine_folder!r}"
        if move:
            self._command(what, "MOVE", message.key, folder)
            return
        self._command(what, "COPY", message.key, folder)
        self.processed(message)

    def _ensure_folder(self, folder: str) -> None:
        try:
            status, data = self._client.create(folder)
        except PROTOCOL_ERRORS as exc:
            raise self._fail(f"create folder {self._config.quarantine_folder!r}", exc) from None
        if status != "OK" and b"ALREADYEXISTS" not in _text(data).encode().upper():
            status, listing = self._client.list('""', folder)
            if status != "OK" or not any(listing):
                raise self._fail(f"create folder {self._config.quarantine_folder!r}", _text(data))
        self._quarantine_ready = True

    def close(self) -> None:
        """Expunge what was processed (only those, with UIDPLUS) and log out."""
        try:
            if self._deleted:
                if b"UIDPLUS" in self._capabilities:
                    for uid_set in _uid_sets(self._deleted):
                        self._command("expunge", "EXPUNGE", uid_set)
                else:
                    self._client.expunge()
                self._deleted.clear()
            self._client.logout()
        except PROTOCOL_ERRORS as exc:
            raise self._fail("expunge", exc) from None
        finally:
            drop(self._client)


def _uid_sets(uids: list[str], per_command: int = 500) -> Iterator[str]:
    """UIDs as IMAP sequence sets ("3:7,9"), a bounded number of ranges per command."""
    numbers = sorted({int(uid) for uid in uids})
    ranges: list[str] = []
    start = previous = numbers[0]
    for number in [*numbers[1:], None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        ranges.append(str(start) if start == previous else f"{start}:{previous}")
        if number is not None:
            start = previous = number
    for first in range(0, len(ranges), per_command):
        yield ",".join(ranges[first:first + per_command])


def _text(data: list[Any]) -> str:
    """The text of a server's NO/BAD response."""
    first = data[0] if data else b""
    return (first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)).strip()
