"""Run a CPU-bound iterator in a forked child process, so that it overlaps with the caller.

The import parses and validates a file (pure Python, one core) while the caller writes the
previous batch into the store: the GIL would serialise the two in threads, so the parsing
runs in a child forked from this process. The child inherits the iterator as it is (open
file, read position, decoded buffers), serialises each item into a pipe (with pickle, or
the caller's faster codec) and exits with `os._exit`: it never touches anything else it
inherited, such as database connections.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import multiprocessing
import pickle
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import TypeVar

T = TypeVar("T")
_ITEM, _DONE, _ERROR = b"i", b"d", b"e"  # the first byte of each message
PIPE_BYTES = 1 << 20  # Linux's default limit for an unprivileged process (fs.pipe-max-size)


@contextmanager
def in_child(items: Iterator[T], dumps: Callable[[T], bytes] = pickle.dumps,
             loads: Callable[[memoryview], T] = pickle.loads) -> Iterator[Iterator[T]]:
    """`items`, iterated in a forked child; the child is stopped when the block ends.

    Each item crosses as `dumps(item)` and is rebuilt by `loads`. An exception raised by
    `items` in the child is raised here, by the iterator, in its place. Without `fork`
    (not Linux), `items` is returned as it is.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        yield items
        return
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    with contextlib.suppress(OSError):  # a bigger pipe lets the child run further ahead
        fcntl.fcntl(sender.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    child = context.Process(target=_produce, args=(items, dumps, sender), daemon=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child would write out a copy of what is buffered
    child.start()
    sender.close()
    try:
        yield _receive(receiver, loads)
    finally:
        receiver.close()
        if child.is_alive():
            child.terminate()  # the caller stopped early: nobody reads what it makes
        child.join()


def _receive(receiver: Connection, loads: Callable[[memoryview], T]) -> Iterator[T]:
    while True:
        try:
            message = memoryview(receiver.recv_bytes())
        except EOFError:
            raise RuntimeError("the import's reader process died") from None
        kind, payload = message[:1], message[1:]
        if kind == _ITEM:
            yield loads(payload)
        elif kind == _DONE:
            return
        else:
            raise pickle.loads(payload)


def _produce(items: Iterator[T], dumps: Callable[[T], bytes], sender: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    gc.disable()  # it allocates many tuples and no cycles, and exits when done (~6% faster)
    try:
        for item in items:
            sender.send_bytes(_ITEM + dumps(item))
        sender.send_bytes(_DONE)
    except BrokenPipeError:
        pass  # the parent is gone or stopped reading
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            sender.send_bytes(_ERROR + pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - e.g. an exception that does not pickle
            sender.send_bytes(_ERROR + pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}")))
