"""Where bounce mail comes from: an IMAP folder or a POP3 maildrop ([bounces], DESIGN §8).

Both readers hand out `Message`s one at a time and are told afterwards what became of each:
`processed` (its result is committed: delete it) or `quarantine` (it could not be processed:
IMAP moves it to `quarantine_folder`, POP3 keeps it on the server). Neither deletes anything
before the caller has committed. A message over `max_bytes` is not downloaded at all, and a
download that takes longer than `message_seconds` is cut off by a watchdog (a socket timeout
alone lets a server that trickles a byte at a time hold the reader forever); both come back
as a `Message` without bytes and with the reason, to be quarantined. The readers live in
`bulksend.mailbox_imap` and `bulksend.mailbox_pop3`; local files for `bounces import` are
read by `bulksend.mailfiles`. This module holds what they share.

Every connection verifies the server's certificate (the system store, or [bounces] ca_file)
and has a socket timeout. Passwords are never part of a message.
"""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

from bulksend import smtp_transport
from bulksend.config import BouncesConfig
from bulksend.errors import BulksendError
from bulksend.smtp_transport import Guard


__all__ = [
    "MAX_BYTES", "MESSAGE_SECONDS", "PROTOCOL_ERRORS", "TIMEOUT", "MailboxError", "Message",
    "Source", "drop", "error_text", "failure", "label", "open_mailbox", "tls_context", "watchdog",
]

MAX_BYTES = 10 * 2**20  # a bounce with the original attached is rarely over 1 MiB
TIMEOUT = 30.0  # seconds for any single socket operation
MESSAGE_SECONDS = 120.0  # for downloading one message


class MailboxError(BulksendError):
    """The bounce mailbox cannot be reached, logged into or read (the message names it)."""


@dataclass(frozen=True)
class Message:
    """One message to process: `raw` is None when it was not read, `problem` says why."""

    key: str  # IMAP UID, POP3 UIDL, or a file path (with #N for the Nth message of an mbox)
    raw: bytes | None
    problem: str | None = None


class Source(Protocol):
    """What the bounce processor reads from (a mailbox, or local files)."""

    name: str  # names the source in messages: user@host:port or a path

    def messages(self) -> Iterator[Message]:
        """The messages not dealt with yet, oldest first."""
        ...

    def remember(self, connection: Connection, message: Message, *, kept: bool, now: float) -> None:
        """Record, inside the transaction holding the message's result, that it is dealt with."""
        ...

    def processed(self, message: Message) -> None:
        """The message's result is committed: remove it from the source."""
        ...

    def quarantine(self, message: Message) -> None:
        """The message could not be processed: set it aside for a human."""
        ...

    def close(self) -> None:
        """Finish: apply deletions and log out."""
        ...


def label(config: BouncesConfig) -> str:
    """user@host:port: names the mailbox in messages and keys its POP3 memory."""
    return f"{config.username}@{config.host}:{config.port}"


def open_mailbox(config: BouncesConfig, password: str, engine: Engine, **options: Any) -> Source:
    """A connected, logged-in reader for [bounces] (IMAP or POP3)."""
    if config.protocol == "imap":
        from bulksend.mailbox_imap import ImapMailbox

        return ImapMailbox(config, password, **options)
    from bulksend.mailbox_pop3 import Pop3Mailbox

    return Pop3Mailbox(config, password, engine, **options)


def tls_context(config: BouncesConfig) -> ssl.SSLContext:
    """A verifying client context: [bounces] ca_file if given, else the system store."""
    return smtp_transport.tls_context(config.ca_file)


@contextmanager
def watchdog(sock: socket.socket, seconds: float) -> Iterator[Guard]:
    """Cut `sock` if the block runs longer than `seconds`; the guard's `expired` says if it did.

    The SMTP sender's watchdog: a socket timeout alone bounds each read, not a download
    that a server trickles a byte at a time.
    """
    guard = Guard()
    guard.attach(sock)
    with guard.deadline(seconds):
        yield guard


def error_text(exc: BaseException) -> str:
    """A one-line reason from a library exception (imaplib/poplib messages may be bytes)."""
    text: object = exc
    if isinstance(exc, (imaplib.IMAP4.error, poplib.error_proto)) and exc.args:
        text = exc.args[0]
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def failure(mailbox: str, what: str, exc: BaseException | str) -> MailboxError:
    """The one-line error for a failed step on a mailbox: what was done, and the server's word."""
    return MailboxError(f"bounce mailbox {mailbox}: {what}: "
                        f"{exc if isinstance(exc, str) else error_text(exc)}")


PROTOCOL_ERRORS = (OSError, EOFError, ValueError, imaplib.IMAP4.error, poplib.error_proto)


def drop(client: imaplib.IMAP4 | poplib.POP3) -> None:
    """Close a connection without a polite goodbye (it may already be dead)."""
    try:
        if isinstance(client, imaplib.IMAP4):
            client.shutdown()
        else:
            client.close()
    except (OSError, ValueError):
        pass
