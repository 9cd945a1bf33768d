"""The SMTP test server's journal: one record per mail transaction, the tests' ground truth.

A transaction starts at MAIL FROM (accepted or refused) and ends at the reply after the
final dot, or when RSET, EHLO, STARTTLS, QUIT, a 421, a drop, a silence or a lost
connection cuts it short; `Transaction.end` says which. Records that conclude with a reply
are written before that reply is sent, so a client that saw "250" can rely on the record.

With a journal file each record is also appended as one JSON line and fsynced, so a test
can read it after the sender (or the server process) was killed with SIGKILL. The message
travels base64-encoded under "data_b64"; every other field keeps its name.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

End = str  # "replied", "mail_refused", "rset", "ehlo", "starttls", "quit", "server_closed",
# "dropped", "silenced", "disconnected" or "shutdown"


@dataclass(frozen=True)
class Transaction:
    """One mail transaction as the server saw it, from MAIL FROM to its end."""

    session: str  # "<server pid>-<connection number>", unique across server restarts
    peer: str  # "127.0.0.1:<client port>"
    tls: bool
    auth_user: str | None
    ehlo: str | None  # the EHLO / HELO name the client gave
    mail_from: str
    mail_options: tuple[str, ...]  # as sent, e.g. ("SIZE=120", "BODY=8BITMIME")
    mail_reply: str
    rcpt_to: tuple[str, ...]  # accepted recipients
    rcpt_rejected: tuple[tuple[str, str], ...]  # (recipient, reply) for refused ones
    data_reply: str | None  # the reply to the DATA command: 354 or a refusal
    data: bytes | None  # the message as received, CRLF kept, dot-unstuffed
    reply: str | None  # the reply after the final dot; None when none was sent
    end: End
    started: float  # Unix time of MAIL FROM
    finished: float  # Unix time the record was written

    @property
    def delivered(self) -> bool:
        """Whether the message got a 2xx reply after the final dot."""
        return self.reply is not None and self.reply.startswith("2")

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object, the message base64-encoded under "data_b64"."""
        record = asdict(self)
        data = record.pop("data")
        record["data_b64"] = None if data is None else base64.b64encode(data).decode("ascii")
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Transaction:
        """A record read back from its JSON object."""
        record = dict(record)
        data = record.pop("data_b64")
        record["data"] = None if data is None else base64.b64decode(data)
        record["mail_options"] = tuple(record["mail_options"])
        record["rcpt_to"] = tuple(record["rcpt_to"])
        record["rcpt_rejected"] = tuple(tuple(pair) for pair in record["rcpt_rejected"])
        return cls(**record)


class Journal:
    """The transactions of one server, mirrored to a JSON-lines file; safe across threads."""

    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._records: list[Transaction] = []
        self._file: BinaryIO | None = path.open("ab") if path is not None else None

    def append(self, transaction: Transaction) -> None:
        """Record a finished transaction; with a file it is on disk when this returns."""
        line = json.dumps(transaction.to_json(), sort_keys=True).encode("ascii") + b"\n"
        with self._lock:
            self._records.append(transaction)
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
                os.fsync(self._file.fileno())

    def records(self) -> list[Transaction]:
        """A snapshot of the records so far, oldest first."""
        with self._lock:
            return list(self._records)

    def close(self) -> None:
        """Close the file; later records are kept in memory only."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_journal(path: Path) -> list[Transaction]:
    """The records in a journal file; a torn last line (writer killed mid-write) is ignored."""
    if not path.exists():
        return []
    # Whatever follows the last newline is empty or a torn write: every record ends in one.
    lines = path.read_bytes().split(b"\n")[:-1]
    return [Transaction.from_json(json.loads(line)) for line in lines]


class JournalQueries:
    """Questions tests ask of a server's journal; subclasses provide `journal`."""

    @property
    def journal(self) -> list[Transaction]:
        """Every transaction so far, oldest first."""
        raise NotImplementedError

    def delivered(self) -> list[Transaction]:
        """The transactions whose message got a 2xx reply after the final dot."""
        return [transaction for transaction in self.journal if transaction.delivered]

    def delivered_to(self, address: str) -> int:
        """How many delivered messages had `address` among their accepted recipients."""
        return sum(address in transaction.rcpt_to for transaction in self.delivered())

    def wait_for(
        self, predicate: Callable[[list[Transaction]], bool], timeout: float = 5.0
    ) -> list[Transaction]:
        """Poll the journal until `predicate` holds (records of vanished clients come late)."""
        deadline = time.monotonic() + timeout
        while True:
            journal = self.journal
            if predicate(journal):
                return journal
            if time.monotonic() > deadline:
                raise AssertionError(f"journal condition not met within {timeout} s: {journal!r}")
            time.sleep(0.01)
