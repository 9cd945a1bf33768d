"""Bounce mail saved as local files, for `bounces import PATH...`.

A PATH is an mbox file (it starts with a "From " line), a maildir (a directory with cur/ or
new/), a directory of `.eml`/`.txt` files, or a single message file. Files are only read:
a message that cannot be processed is reported as quarantined and left where it is, and
importing the same files again counts nothing twice (the processor keys results by the
message's source key). Like the mailbox readers, nothing over `max_bytes` is held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy.engine import Connection

from bulksend.mailbox import MAX_BYTES, MailboxError, Message

MESSAGE_SUFFIXES = (".eml", ".txt", ".msg")
_CHUNK = 1 << 16


class LocalFiles:
    """A `Source` over files: mbox, maildir, a directory of messages, or one message."""

    def __init__(self, paths: Sequence[Path], *, max_bytes: int = MAX_BYTES) -> None:
        for path in paths:
            if not path.exists():
                raise MailboxError(f"{path}: no such file or directory")
        self.name = ", ".join(str(path) for path in paths)
        self._paths = list(paths)
        self._max_bytes = max_bytes

    def messages(self) -> Iterator[Message]:
        """Every message in every path, in the order given (files of a directory by name)."""
        for path in self._paths:
            if path.is_dir():
                for file in _directory_files(path):
                    yield self._single(file)
            elif _is_mbox(path):
                yield from self._mbox(path)
            else:
                yield self._single(path)

    def _single(self, path: Path) -> Message:
        try:
            size = path.stat().st_size
            if size > self._max_bytes:
                return Message(str(path), None, f"{size} bytes, over the {self._max_bytes}-byte limit")
            return Message(str(path), path.read_bytes())
        except OSError as exc:
            return Message(str(path), None, f"cannot read: {exc.strerror}")

    def _mbox(self, path: Path) -> Iterator[Message]:
        number = 0
        try:
            with open(path, "rb") as file:
                for chunks, oversize in _mbox_messages(file, self._max_bytes):
                    number += 1
                    key = f"{path}#{number}"
                    if oversize:
                        yield Message(key, None, f"over the {self._max_bytes}-byte limit")
                    else:
                        yield Message(key, _unescape(b"".join(chunks)))
        except OSError as exc:
            raise MailboxError(f"{path}: cannot read: {exc.strerror}") from None

    def remember(self, connection: Connection, message: Message, *, kept: bool, now: float) -> None:
        """Nothing to record: results are keyed by the message itself."""

    def processed(self, message: Message) -> None:
        """Files are left as they are."""

    def quarantine(self, message: Message) -> None:
        """Files are left as they are (the caller reports the message)."""

    def close(self) -> None:
        """Nothing is held open between messages."""


def _directory_files(path: Path) -> list[Path]:
    """A maildir's messages (new/ then cur/), or a directory's message files, by name."""
    if (path / "cur").is_dir() or (path / "new").is_dir():
        return [file for sub in ("new", "cur") if (path / sub).is_dir()
                for file in sorted((path / sub).iterdir()) if file.is_file()]
    return [file for file in sorted(path.iterdir())
            if file.is_file() and file.suffix.lower() in MESSAGE_SUFFIXES]


def _is_mbox(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(5) == b"From "
    except OSError:
        return False


def _mbox_messages(file: object, max_bytes: int) -> Iterator[tuple[list[bytes], bool]]:
    """(chunks, oversize) per message: split at "From " lines that start a line after a blank one."""
    chunks: list[bytes] = []
    size = 0
    started = False
    line_start = True  # the next chunk begins a line
    previous_blank = True
    while True:
        chunk = file.readline(_CHUNK)  # type: ignore[attr-defined]
        if not chunk:
            break
        if line_start and previous_blank and chunk.startswith(b"From "):
            if started:
                yield _strip_separator(chunks), size > max_bytes
            chunks, size, started = [], 0, True
        else:
            size += len(chunk)
            if size <= max_bytes:
                chunks.append(chunk)
        if line_start:
            previous_blank = chunk in (b"\n", b"\r\n")
        line_start = chunk.endswith(b"\n")
    if started:
        yield _strip_separator(chunks), size > max_bytes


def _strip_separator(chunks: list[bytes]) -> list[bytes]:
    """Drop the blank line mbox puts before the next "From " line."""
    if chunks and chunks[-1] in (b"\n", b"\r\n"):
        return chunks[:-1]
    return chunks


def _unescape(raw: bytes) -> bytes:
    """mboxrd: ">From " at a line start lost one ">" when it was stored."""
    if b">From " not in raw:
        return raw
    lines = raw.split(b"\n")
    return b"\n".join(line[1:] if line.lstrip(b">").startswith(b"From ") and line.startswith(b">")
                      else line for line in lines)
