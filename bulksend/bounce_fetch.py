"""The bounce processor: read → parse → apply and commit → delete.

`process` drives any `mailbox.Source` (IMAP, POP3, local files). For each message:

1. a message that could not be read (over the size bound, a download cut off), that fails to
   parse (malformed MIME, a wrong charset, anything `bounces.parse` cannot make sense of) or
   takes longer than `parse_seconds` to parse is quarantined and counted as such;
2. otherwise its report is applied (`suppression.apply_reports`, for the batch below) and
   the source records it (POP3: its UIDL) in the same transaction, so a message is
   processed once;
3. only after the commit is it deleted from the source (or set aside, if quarantined).

Results are committed in small batches (at most `batch_size` messages or `batch_seconds`):
one fsync per message would cap a run at the disk's commit rate, and a batch still commits
before anything of it is deleted.

One message never stops the rest. The run stops taking new messages after `max_time`
seconds (the rest wait for the next cron run). `fetch` and `import_files` are the two
entry points of `bulksend bounces fetch` and `bounces import`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from bulksend import bounces, db, mailbox, mailfiles, suppression
from bulksend.config import BouncesConfig

__all__ = ["MAX_TIME", "PARSE_SECONDS", "Result", "fetch", "import_files", "process"]

PARSE_SECONDS = 10.0  # a well-formed bounce parses in about a millisecond
MAX_TIME = 480.0  # under the 10-minute cron interval of `bounces fetch`
# Results are committed a few messages at a time (one fsync each), the write lock held briefly.
BATCH_SIZE = 100
BATCH_SECONDS = 0.5

Parse = Callable[..., bounces.Report]


@dataclass(frozen=True)
class _Done:
    """A parsed message waiting for its batch's commit (the bytes are not kept)."""

    message: mailbox.Message  # without raw
    report: bounces.Report | None  # None: to quarantine
    source_key: str = ""


@dataclass
class Result:
    """What a run did: the counts of DESIGN §9 and every message set aside, with why."""

    counts: suppression.Counts = field(default_factory=suppression.Counts)
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (message key, reason)
    stopped_early: bool = False  # max_time ran out with messages left


class Overtime(Exception):
    """Parsing one message took longer than allowed."""


def fetch(engine: Engine, config: BouncesConfig, password: str, *, secret: bytes | None,
          clock: Callable[[], float] = time.time, max_bytes: int = mailbox.MAX_BYTES,
          **options: Any) -> Result:
    """Process the [bounces] mailbox (IMAP or POP3)."""
    source = mailbox.open_mailbox(config, password, engine, max_bytes=max_bytes)
    policy = suppression.BouncePolicy.from_config(config)
    return process(engine, source, secret=secret, policy=policy, clock=clock, max_bytes=max_bytes,
                   **options)


def import_files(engine: Engine, paths: Sequence[Path], *, secret: bytes | None,
                 policy: suppression.BouncePolicy, clock: Callable[[], float] = time.time,
                 max_bytes: int = mailbox.MAX_BYTES, **options: Any) -> Result:
    """Process bounce mail saved as files (mbox, maildir, directories of .eml/.txt, single files)."""
    source = mailfiles.LocalFiles(paths, max_bytes=max_bytes)
    return process(engine, source, secret=secret, policy=policy, clock=clock,
                   max_bytes=max_bytes, **options)


def process(engine: Engine, source: mailbox.Source, *, secret: bytes | None,
            policy: suppression.BouncePolicy, clock: Callable[[], float] = time.time,
            monotonic: Callable[[], float] = time.monotonic, max_time: float = MAX_TIME,
            max_bytes: int = mailbox.MAX_BYTES, parse_seconds: float | None = PARSE_SECONDS,
            parse: Parse = bounces.parse, batch_size: int = BATCH_SIZE,
            batch_seconds: float = BATCH_SECONDS) -> Result:
    """Process every message of `source`, then close it (deletions happen there)."""
    result = Result()
    started = monotonic()
    batch: list[_Done] = []
    batch_started = started
    try:
        for message in source.messages():
            if monotonic() - started > max_time:
                result.stopped_early = True
                break
            done, reason = _parse(message, secret, max_bytes, parse_seconds, parse)
            if done.report is None:
                result.quarantined.append((message.key, reason))
            if not batch:
                batch_started = monotonic()
            batch.append(done)
            if len(batch) >= batch_size or monotonic() - batch_started >= batch_seconds:
                result.counts.add(_commit(engine, source, batch, policy, clock()))
                batch = []
        if batch:
            result.counts.add(_commit(engine, source, batch, policy, clock()))
    except BaseException:
        _close_quietly(source)
        raise
    source.close()
    return result


def _parse(message: mailbox.Message, secret: bytes | None, max_bytes: int,
           parse_seconds: float | None, parse: Parse) -> tuple[_Done, str]:
    """The message's report and source key, or no report and why it goes to quarantine."""
    slim = mailbox.Message(message.key, None)
    if message.raw is None:
        return _Done(slim, None), message.problem or "not readable"
    try:
        with _time_limit(parse_seconds):
            report = parse(message.raw, secret=secret, max_bytes=max_bytes)
    except bounces.Unparseable as exc:
        return _Done(slim, None), f"unparseable: {exc}"
    except Overtime:
        return _Done(slim, None), f"parsing took over {parse_seconds:g} s"
    except Exception as exc:  # noqa: BLE001 - one message must never stop the rest
        return _Done(slim, None), f"unparseable: {type(exc).__name__}: {exc}"
    return _Done(slim, report, bounces.source_key(message.raw, report)), ""


def _commit(engine: Engine, source: mailbox.Source, batch: list[_Done],
            policy: suppression.BouncePolicy, now: float) -> suppression.Counts:
    """Apply and record a few messages in one transaction; only then delete or set them aside."""
    reports = [(done.report, done.source_key) for done in batch if done.report is not None]
    set_aside = len(batch) - len(reports)
    with db.transaction(engine) as connection:
        counts = suppression.apply_reports(connection, reports, now=now, policy=policy)
        for done in batch:
            source.remember(connection, done.message, kept=done.report is None, now=now)
    counts.add(suppression.Counts(messages=set_aside, quarantined=set_aside))
    for done in batch:
        if done.report is None:
            source.quarantine(done.message)
        else:
            source.processed(done.message)
    return counts


def _close_quietly(source: mailbox.Source) -> None:
    """Close after a failure: expunge what was committed if the connection still works."""
    try:
        source.close()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise Overtime in the block after `seconds` (main thread only: it uses SIGALRM)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(*_: object) -> None:
        raise Overtime()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
