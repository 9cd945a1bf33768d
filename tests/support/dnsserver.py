"""A tiny authoritative DNS server on 127.0.0.1 (UDP and TCP) serving a declarative test zone.

The zone maps a name to its records, or to a fault for the whole name::

    dns_server({
        "example.com": {"MX": [(10, "mx.example.com.")]},
        "mx.example.com": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "a-only.example": {"A": ["192.0.2.1"]},        # MX query -> NOERROR, no answer (NODATA)
        "nullmx.example": {"MX": [(0, ".")]},          # RFC 7505 null MX
        "mxfail.example": {"MX": "SERVFAIL", "A": ["192.0.2.2"]},  # a fault for one type only
        "broken.example": "SERVFAIL",                  # any RCODE name: SERVFAIL, REFUSED, ...
        "slow.example": "TIMEOUT",                     # the query is received, never answered
    })

Any name not in the zone answers NXDOMAIN. Names are matched case-insensitively, without the
trailing dot; a U-label key ("пример.рф") is stored as its A-label ("xn--e1afmkfd.xn--p1ai").
Record types: A, AAAA, MX ((preference, exchange) pairs) and TXT (strings).
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeAlias

import pytest
from dnslib import AAAA, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord, RD

RecordSpec: TypeAlias = Mapping[str, Sequence[Any] | str]
Zone: TypeAlias = Mapping[str, RecordSpec | str]

TIMEOUT = "TIMEOUT"
_BUILDERS: dict[str, Callable[[Any], RD]] = {
    "A": A,
    "AAAA": AAAA,
    "MX": lambda pair: MX(pair[1], int(pair[0])),
    "TXT": TXT,
}
_UDP_LIMIT = 512  # classic DNS payload limit, raised only by a client's EDNS OPT record
_TCP_READ_TIMEOUT = 1.0  # a TCP client that stalls mid-query cannot wedge the server for long

# Internal form of one zone entry: a fault string, or per-type records (or a per-type fault).
_Entry: TypeAlias = str | dict[str, list[RD] | str]


def _key(name: str) -> str:
    """Normalise a domain name to the zone's key form: lower-case A-labels, no trailing dot."""
    name = name.rstrip(".").lower()
    return name if name.isascii() else name.encode("idna").decode("ascii")


_FAULTS = (TIMEOUT, "SERVFAIL", "NXDOMAIN", "REFUSED", "NOTIMP", "FORMERR")


def _check_fault(fault: str) -> str:
    """Return fault if it is one of _FAULTS, else raise: a misspelt fault must not pass silently."""
    if fault not in _FAULTS:
        raise ValueError(f"unknown DNS fault {fault!r}: use one of {', '.join(_FAULTS)}")
    return fault


def _compile(zone: Zone) -> dict[str, _Entry]:
    """Validate a zone and pre-build its rdata, so a typo fails in the test, not mid-query."""
    compiled: dict[str, _Entry] = {}
    for name, spec in zone.items():
        if isinstance(spec, str):
            compiled[_key(name)] = _check_fault(spec)
            continue
        entry: dict[str, list[RD] | str] = {}
        for rtype, values in spec.items():
            rtype = rtype.upper()
            if rtype not in _BUILDERS:
                raise ValueError(f"{name}: unsupported record type {rtype!r}")
            if isinstance(values, str):
                entry[rtype] = _check_fault(values)
            else:
                entry[rtype] = [_BUILDERS[rtype](value) for value in values]
        compiled[_key(name)] = entry
    return compiled


class DNSTestServer:
    """An authoritative DNS server for a test zone, on 127.0.0.1 UDP+TCP at one free port."""

    host = "127.0.0.1"

    def __init__(self, zone: Zone | None = None, *, ttl: int = 300) -> None:
        """Bind both sockets and start serving in a thread; queries are accepted on return."""
        self.ttl = ttl
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._zone = _compile(zone or {})
        self._queries: Counter[tuple[str, str]] = Counter()
        self._conns: list[socket.socket] = []  # TCP connections not yet closed
        self._udp, self._tcp = self._bind_pair()
        self.port: int = self._udp.getsockname()[1]
        # A socketpair wakes the selector at stop(): instant, unlike a polling shutdown flag.
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.port}", daemon=True)
        # Sockets are bound (and listening) before the thread runs, so the kernel queues any early
        # query: no readiness probe is needed.
        self._thread.start()

    @property
    def nameserver(self) -> str:
        """The server as bulksend's `[dns] nameservers` config spells it: "127.0.0.1:PORT"."""
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> Counter[tuple[str, str]]:
        """A snapshot of queries received per (name, type), e.g. [("example.com", "MX")]."""
        with self._lock:
            return Counter(self._queries)

    def clear_queries(self) -> None:
        """Forget the query counts (e.g. after a warm-up lookup)."""
        with self._lock:
            self._queries.clear()

    def update(self, zone: Zone) -> None:
        """Add or replace the given names while running; other names are kept."""
        compiled = _compile(zone)
        with self._lock:
            self._zone.update(compiled)

    def remove(self, *names: str) -> None:
        """Delete names from the zone while running, so they answer NXDOMAIN."""
        with self._lock:
            for name in names:
                self._zone.pop(_key(name), None)

    def stop(self) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        if self._wake_w.fileno() != -1:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w, *self._conns):
            sock.close()
        self._conns.clear()

    def __enter__(self) -> DNSTestServer:
        """Use as a context manager outside pytest."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop on leaving the block."""
        self.stop()

    @staticmethod
    def _bind_pair() -> tuple[socket.socket, socket.socket]:
        """Bind UDP to a free port, then TCP to the same one (retrying if TCP's is taken)."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            return udp, tcp
        raise RuntimeError("no free port for both UDP and TCP on 127.0.0.1")

    def _serve(self) -> None:
        """Answer queries one at a time until woken by stop()."""
        with selectors.DefaultSelector() as selector:
            for sock in (self._udp, self._tcp, self._wake_r):
                selector.register(sock, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        if key.fileobj is self._udp:
                            self._serve_udp()
                        else:
                            self._serve_tcp()
                    except Exception as exc:  # a server bug fails the test; never a fake timeout
                        self.errors.append(exc)

    def _serve_udp(self) -> None:
        """Answer one datagram, truncating (TC) when the reply exceeds the client's payload size."""
        data, client = self._udp.recvfrom(65535)
        request = self._parse(data)
        reply = None if request is None else self._answer(request)
        if request is None or reply is None:
            return  # garbage, or a TIMEOUT name: stay silent
        wire = reply.pack()
        if len(wire) > max(_UDP_LIMIT, self._edns_payload(request)):
            reply = request.reply(ra=0)
            reply.header.tc = 1  # the client must retry over TCP
            wire = reply.pack()
        self._udp.sendto(wire, client)

    def _serve_tcp(self) -> None:
        """Answer one length-prefixed query on a new connection, then close it."""
        conn, _ = self._tcp.accept()
        self._conns.append(conn)  # closed by stop() at the latest, even if answering fails
        conn.settimeout(_TCP_READ_TIMEOUT)
        try:
            (length,) = struct.unpack("!H", self._recv_exact(conn, 2))
            request = self._parse(self._recv_exact(conn, length))
            reply = None if request is None else self._answer(request)
            if reply is None:
                return  # garbage, or a TIMEOUT name: an open, silent connection, not an EOF
            wire = reply.pack()
            conn.sendall(struct.pack("!H", len(wire)) + wire)
        except (OSError, EOFError):
            pass  # a client that stalls or hangs up only loses its own answer
        self._conns.remove(conn)
        conn.close()

    @staticmethod
    def _recv_exact(conn: socket.socket, size: int) -> bytes:
        """Read exactly size bytes from a TCP connection."""
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError("client closed the connection mid-query")
            data += chunk
        return data

    @staticmethod
    def _edns_payload(request: DNSRecord) -> int:
        """The UDP payload size the client advertised in an EDNS OPT record (0 if none)."""
        return max((rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT), default=0)

    @staticmethod
    def _parse(data: bytes) -> DNSRecord | None:
        """Decode a wire-format query; None for garbage, which is the client's problem, not ours."""
        try:
            return DNSRecord.parse(data)
        except DNSError:
            return None

    def _answer(self, request: DNSRecord) -> DNSRecord | None:
        """Build the reply to a query; None means drop it (TIMEOUT)."""
        name, rtype = _key(str(request.q.qname)), QTYPE.get(request.q.qtype)
        with self._lock:
            self._queries[name, rtype] += 1
            entry = self._zone.get(name)
        if entry is None:
            found: list[RD] | str = "NXDOMAIN"
        elif isinstance(entry, str):
            found = entry
        else:
            found = entry.get(rtype, [])  # a name without the asked type is NODATA, not NXDOMAIN
        if found == TIMEOUT:
            return None
        reply = request.reply(ra=0)  # authoritative (aa=1), not recursive
        if isinstance(found, str):
            reply.header.rcode = getattr(RCODE, found)
        else:
            for rdata in found:
                reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=self.ttl))
        if not reply.rr and reply.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
            # A negative answer carries an SOA so resolvers may cache it; the server poses as
            # the root zone, the one ancestor of every name.
            soa = SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, self.ttl))
            reply.add_auth(RR(".", QTYPE.SOA, rdata=soa, ttl=self.ttl))
        return reply


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DNSTestServer]]:
    """Factory fixture: dns_server(zone, ttl=300) starts a DNSTestServer, stopped at teardown."""
    servers: list[DNSTestServer] = []

    def start(zone: Zone | None = None, *, ttl: int = 300) -> DNSTestServer:
        """Start one server for zone."""
        server = DNSTestServer(zone, ttl=ttl)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    errors = [error for server in servers for error in server.errors]
    if errors:
        raise RuntimeError(f"the DNS test server failed while answering: {errors!r}") from errors[0]
