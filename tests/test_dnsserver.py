"""The loopback DNS test server, checked with dnspython (the client of the dead-domain check)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.dnsserver import DNSTestServer

StartServer = Callable[..., DNSTestServer]

ZONE = {
    "example.com": {"MX": [(10, "mx.example.com."), (20, "mx2.example.com.")]},
    "mx.example.com": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "a-only.example": {"A": ["192.0.2.1"]},
    "nullmx.example": {"MX": [(0, ".")]},
    "mxfail.example": {"MX": "SERVFAIL", "A": ["192.0.2.2"]},
    "broken.example": "SERVFAIL",
    "slow.example": "TIMEOUT",
}


def resolver_for(server: DNSTestServer, *, lifetime: float = 1.0) -> dns.resolver.Resolver:
    """A dnspython resolver that asks only the test server, never /etc/resolv.conf."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    return resolver


@pytest.fixture
def server(dns_server: StartServer) -> DNSTestServer:
    """A server for the shared ZONE."""
    return dns_server(ZONE)


def test_mx_answer_with_preferences(server: DNSTestServer) -> None:
    """MX records come back with their preferences and exchanges."""
    answer = resolver_for(server).resolve("example.com", "MX")
    assert sorted((mx.preference, mx.exchange.to_text()) for mx in answer) == [
        (10, "mx.example.com."),
        (20, "mx2.example.com."),
    ]
    assert answer.rrset is not None and answer.rrset.ttl == 300


def test_a_and_aaaa_answers(server: DNSTestServer) -> None:
    """Address records answer for both families."""
    resolver = resolver_for(server)
    assert [r.address for r in resolver.resolve("mx.example.com", "A")] == ["127.0.0.1"]
    assert [r.address for r in resolver.resolve("mx.example.com", "AAAA")] == ["::1"]


def test_a_only_name_is_nodata_for_mx_not_nxdomain(server: DNSTestServer) -> None:
    """A name without MX answers NOERROR with no answer, so callers fall back to A/AAAA."""
    resolver = resolver_for(server)
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("a-only.example", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("a-only.example", "AAAA")
    assert [r.address for r in resolver.resolve("a-only.example", "A")] == ["192.0.2.1"]


def test_null_mx_parses_as_preference_zero_root_exchange(server: DNSTestServer) -> None:
    """An RFC 7505 null MX is one record: preference 0, exchange "."."""
    answer = list(resolver_for(server).resolve("nullmx.example", "MX"))
    assert len(answer) == 1
    assert answer[0].preference == 0
    assert answer[0].exchange == dns.name.root


def test_unknown_name_is_nxdomain_with_soa(server: DNSTestServer) -> None:
    """A name outside the zone raises NXDOMAIN; the reply carries an SOA for negative caching."""
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver_for(server).resolve("nope.example", "MX")
    query = dns.message.make_query("nope.example", "MX")
    reply = dns.query.udp(query, server.host, port=server.port, timeout=1)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]


def test_servfail_rcode_and_dnspython_error(server: DNSTestServer) -> None:
    """SERVFAIL is rcode 2 on the wire; dnspython drops the server and raises NoNameservers."""
    query = dns.message.make_query("broken.example", "MX")
    reply = dns.query.udp(query, server.host, port=server.port, timeout=1)
    assert reply.rcode() == dns.rcode.SERVFAIL == 2
    with pytest.raises(dns.resolver.NoNameservers):
        resolver_for(server).resolve("broken.example", "A")


def test_fault_for_one_type_only(server: DNSTestServer) -> None:
    """A per-type fault fails that type while the name's other records still answer."""
    resolver = resolver_for(server)
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("mxfail.example", "MX")
    assert [r.address for r in resolver.resolve("mxfail.example", "A")] == ["192.0.2.2"]


def test_timeout_is_never_answered(server: DNSTestServer) -> None:
    """A TIMEOUT name is received but never answered: dnspython gives up at its lifetime."""
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver_for(server, lifetime=0.3).resolve("slow.example", "MX")
    assert 0.25 < time.monotonic() - started < 1.0
    assert server.queries["slow.example", "MX"] >= 1


def test_timeout_over_tcp_keeps_the_connection_silent(server: DNSTestServer) -> None:
    """Over TCP a TIMEOUT name holds the connection open rather than closing it (an EOF)."""
    query = dns.message.make_query("slow.example", "MX")
    with pytest.raises(dns.exception.Timeout):
        dns.query.tcp(query, server.host, port=server.port, timeout=0.2)


def test_tcp_answers(server: DNSTestServer) -> None:
    """The same zone answers over TCP on the same port."""
    query = dns.message.make_query("example.com", "MX")
    reply = dns.query.tcp(query, server.host, port=server.port, timeout=1)
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(reply.answer[0]) == 2


def test_large_answer_is_truncated_over_udp_and_retried_over_tcp(dns_server: StartServer) -> None:
    """A reply over 512 bytes sets TC; dnspython's resolver then retries over TCP."""
    server = dns_server({"big.example": {"TXT": [f"{i:02d}" + "x" * 100 for i in range(10)]}})
    answer = resolver_for(server).resolve("big.example", "TXT")
    assert len(answer) == 10
    assert server.queries["big.example", "TXT"] == 2  # once over UDP (truncated), once over TCP


def test_query_counts_prove_client_caching(server: DNSTestServer) -> None:
    """Counts per (name, type) show a caching client asks once, positive or negative."""
    resolver = resolver_for(server)
    resolver.cache = dns.resolver.Cache()
    for _ in range(3):
        resolver.resolve("example.com", "MX")
        with pytest.raises(dns.resolver.NXDOMAIN):
            resolver.resolve("gone.example", "MX")
    assert server.queries == {("example.com", "MX"): 1, ("gone.example", "MX"): 1}
    server.clear_queries()
    assert server.queries == {}


def test_names_are_case_insensitive(dns_server: StartServer) -> None:
    """Zone keys and queries match regardless of case and of a trailing dot."""
    server = dns_server({"Example.COM.": {"MX": [(5, "MX.Example.com.")]}})
    answer = resolver_for(server).resolve("eXaMpLe.cOm", "MX")
    assert [mx.preference for mx in answer] == [5]
    assert server.queries == {("example.com", "MX"): 1}


def test_idna_a_label_and_u_label(dns_server: StartServer) -> None:
    """A U-label zone key answers its A-label query; counts are kept under the A-label."""
    server = dns_server({"пример.рф": {"MX": [(10, "mx.xn--e1afmkfd.xn--p1ai.")]}})
    resolver = resolver_for(server)
    answer = resolver.resolve("xn--e1afmkfd.xn--p1ai", "MX")
    assert [mx.exchange.to_text() for mx in answer] == ["mx.xn--e1afmkfd.xn--p1ai."]
    resolver.resolve("пример.рф", "MX")  # dnspython encodes the U-label itself
    assert server.queries == {("xn--e1afmkfd.xn--p1ai", "MX"): 2}


def test_zone_changes_while_running(server: DNSTestServer) -> None:
    """update() adds or replaces names and remove() deletes them, without a restart."""
    resolver = resolver_for(server)
    server.update({"new.example": {"MX": [(0, ".")]}, "broken.example": {"A": ["192.0.2.9"]}})
    assert resolver.resolve("new.example", "MX")[0].exchange == dns.name.root
    assert [r.address for r in resolver.resolve("broken.example", "A")] == ["192.0.2.9"]
    server.remove("example.com.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("example.com", "MX")


def test_bad_zone_fails_fast(dns_server: StartServer) -> None:
    """A typo in a zone raises at once instead of surfacing as a strange answer mid-test."""
    with pytest.raises(ValueError, match="record type"):
        dns_server({"x.example": {"CNAME": ["y.example."]}})
    with pytest.raises(ValueError, match="fault"):
        dns_server({"x.example": "SERVFAILL"})


def test_nameserver_form_and_clean_stop(dns_server: StartServer) -> None:
    """nameserver is "127.0.0.1:PORT"; stop() joins the thread and closes every socket."""
    server = dns_server({})
    assert server.nameserver == f"127.0.0.1:{server.port}" and server.host == "127.0.0.1"
    server.stop()
    server.stop()  # idempotent: the fixture's teardown calls it again
    assert not server._thread.is_alive()
    assert all(sock.fileno() == -1 for sock in (server._udp, server._tcp, server._wake_r))


def test_garbage_is_ignored_but_server_bugs_are_recorded() -> None:
    """Undecodable packets are dropped quietly; an exception while answering lands in errors."""
    with DNSTestServer({"ok.example": {"A": ["192.0.2.1"]}}) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\x00\x01garbage", (server.host, server.port))
        assert [r.address for r in resolver_for(server).resolve("ok.example", "A")] == ["192.0.2.1"]
        assert server.errors == []
        server._zone["bug.example"] = {"A": [object()]}  # not rdata: answering it raises
        with pytest.raises(dns.exception.Timeout):
            query = dns.message.make_query("bug.example", "A")
            dns.query.udp(query, server.host, port=server.port, timeout=0.1)
    assert len(server.errors) == 1 and "RDATA" in str(server.errors[0])  # read after the join
