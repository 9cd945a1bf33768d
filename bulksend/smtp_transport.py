"""The socket under an SMTP session: deadlines that bind a trickling server, and smtplib
on a socket bulksend controls.

smtplib's timeout bounds each socket read, so a server sending one byte every few seconds
holds a command for ever. `Guard.deadline()` arms the process's one watchdog thread, which
shuts the session's socket down when the deadline passes; the blocked read then returns at
once. `Client` is smtplib.SMTP connecting through the guard, with TCP_NODELAY and implicit
TLS done the same way as STARTTLS.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import select
import smtplib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Client", "Guard", "cut", "default_helo", "is_timeout", "peer_gone", "tls_context"]


# -- the watchdog --------------------------------------------------------------------------


class _Watchdog:
    """One daemon thread per process calling `fire` for each armed deadline that passes.

    Arming and disarming are a dict operation under a lock, cheap enough for every message;
    a thread per transaction (threading.Timer) would cost a thread start per message.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, Callable[[], None]]] = {}
        self._keys = itertools.count()
        self._wake = math.inf  # when the thread next looks; it is woken for anything sooner
        self._pid = 0  # the process whose thread is running (a fork has none)

    def arm(self, seconds: float, fire: Callable[[], None]) -> int:
        """Call `fire()` in `seconds` unless disarmed first; returns the key to disarm."""
        deadline = time.monotonic() + seconds
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="bulksend-smtp-watchdog", daemon=True).start()
            key = next(self._keys)
            self._armed[key] = (deadline, fire)
            if deadline < self._wake:
                self._cond.notify()
            return key

    def disarm(self, key: int) -> None:
        """Forget a deadline (it may have fired already)."""
        with self._cond:
            self._armed.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [key for key, (deadline, _) in self._armed.items() if deadline <= now]
                fires = [self._armed.pop(key)[1] for key in due]
                if not fires:
                    self._wake = min((deadline for deadline, _ in self._armed.values()), default=math.inf)
                    self._cond.wait(None if self._wake == math.inf else self._wake - now)
                    self._wake = math.inf
            for fire in fires:  # outside the lock: firing takes the session's own lock
                fire()


_WATCHDOG = _Watchdog()


class Guard:
    """The socket of one session and its transaction deadline; the watchdog cuts it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.expired = False

    def attach(self, sock: socket.socket) -> None:
        """From now on the deadline cuts `sock`; fails at once if it has already passed."""
        with self._lock:
            self.sock = sock
            if self.expired:
                cut(sock)
                raise TimeoutError("transaction deadline passed")

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Cut the socket if the block is still running after `seconds`."""
        self.expired = False
        key = _WATCHDOG.arm(seconds, self.expire)
        try:
            yield
        finally:
            _WATCHDOG.disarm(key)

    def expire(self) -> None:
        """Let the deadline pass now: the socket is cut, a blocked reader fails at once."""
        with self._lock:
            self.expired = True
            if self.sock is not None:
                cut(self.sock)

    def abort(self) -> None:
        """Reset the connection now (RST, unsent bytes discarded) and close the socket."""
        with self._lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()


def cut(sock: socket.socket) -> None:
    """Shut the connection down under a blocked reader. The plain socket method is used on
    purpose: ssl.SSLSocket.shutdown() would also drop the TLS object the reader is using."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


# -- smtplib with bulksend's socket --------------------------------------------------------


class Client(smtplib.SMTP):
    """smtplib.SMTP whose socket the guard can cut, with TCP_NODELAY and implicit TLS.

    TCP_NODELAY matters: the final dot is a small write after the message, and Nagle's
    algorithm would hold it until the server's delayed ACK, ~40 ms per message.
    """

    def __init__(self, guard: Guard, host: str, tls: ssl.SSLContext | None, timeout: float, helo: str) -> None:
        self._guard = guard
        self._server_name = host
        self._implicit_tls = tls
        super().__init__(timeout=timeout, local_hostname=helo)  # no host: connect() comes later

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        self._guard.attach(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._implicit_tls is not None:
            return self.wrap(sock, self._implicit_tls)
        return sock

    def wrap(self, sock: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
        """TLS over `sock`, attached to the guard before the handshake so it can be cut."""
        tls = context.wrap_socket(sock, server_hostname=self._server_name, do_handshake_on_connect=False)
        self._guard.attach(tls)
        tls.do_handshake()
        return tls

    def abort(self) -> None:
        """Reset the connection at once (RST), so not even a buffered byte leaves after this.

        The reader smtplib made with makefile() is closed first: while it is open,
        socket.close() leaves the descriptor, and so the connection, open.
        """
        reader, self.file = self.file, None
        if reader is not None:
            try:
                reader.close()
            except OSError:
                pass
        self._guard.abort()
        self.sock = None


@functools.lru_cache(maxsize=32)
def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context (loading the CA store takes milliseconds: built once)."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)


@functools.lru_cache(maxsize=1)
def default_helo() -> str:
    """The EHLO name smtplib would pick, looked up once (it can cost a DNS round trip)."""
    return socket.getfqdn()


def is_timeout(error: BaseException) -> bool:
    """Whether smtplib's error stands for a socket timeout (it wraps them)."""
    return isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError)


def peer_gone(sock: socket.socket | None) -> bool:
    """Whether the server hung up, reset or spoke out of turn: nothing may be pending now."""
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()  # not select(): it fails for descriptors above 1023
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True
