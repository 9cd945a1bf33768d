"""Dead domains: verdicts, cache, concurrency and time bounds, and `--check-domains` end to end."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest
import sqlalchemy as sa

from bulksend import domains, subscribers, suppression
from bulksend.config import DnsConfig
from tests.support.cli import Bulksend, row_counts
from tests.support.dnsserver import DNSTestServer

StartServer = Callable[..., DNSTestServer]

ZONE = {
    "mx.example": {"MX": [(10, "in.mx.example.")]},
    "in.mx.example": {"A": ["192.0.2.10"]},
    "a-only.example": {"A": ["192.0.2.1"]},
    "aaaa-only.example": {"AAAA": ["2001:db8::1"]},
    "nullmx.example": {"MX": [(0, ".")], "A": ["192.0.2.3"]},  # an A does not revive a null MX
    "nomail.example": {"TXT": ["v=spf1 -all"]},  # exists, but no MX, A or AAAA
    "mxfail.example": {"MX": "SERVFAIL", "A": ["192.0.2.2"]},
    "afail.example": {"A": "SERVFAIL"},
    "broken.example": "SERVFAIL",
    "refused.example": "REFUSED",
    "slow.example": "TIMEOUT",
    "slowa.example": {"A": "TIMEOUT"},
}
EXPECTED = {
    "mx.example": "alive", "a-only.example": "alive", "aaaa-only.example": "alive",
    "gone.example": "dead", "nullmx.example": "dead", "nomail.example": "dead",
    "mxfail.example": "doubt", "afail.example": "doubt", "broken.example": "doubt",
    "refused.example": "doubt", "slow.example": "doubt", "slowa.example": "doubt",
}


def mx(preference: int, exchange: str) -> Any:
    """One MX rdata, as dnspython returns it."""
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, f"{preference} {exchange}")


class FakeDNS:
    """An injected resolve(): answers from a table, counts calls, may block until released."""

    def __init__(self, table: dict[tuple[str, str], Sequence[Any] | BaseException]) -> None:
        self.table = table
        self.calls: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def __call__(self, domain: str, rdtype: str, lifetime: float) -> Sequence[Any]:
        with self.lock:
            self.calls[domain, rdtype] += 1
        found = self.table.get((domain, rdtype), dns.resolver.NXDOMAIN())
        if isinstance(found, BaseException):
            raise found
        return found


def states(report: domains.Report) -> dict[str, str]:
    return {verdict.domain: verdict.state for verdict in report.verdicts}


# --- verdicts, from an injected resolver --------------------------------------------------


def test_verdict_table_with_an_injected_resolver() -> None:
    fake = FakeDNS({
        ("mx.test1", "MX"): [mx(10, "in.mx.test1.")],
        ("a.test1", "MX"): [], ("a.test1", "A"): ["192.0.2.1"],
        ("six.test1", "MX"): [], ("six.test1", "A"): [], ("six.test1", "AAAA"): ["2001:db8::1"],
        ("null.test1", "MX"): [mx(0, ".")],
        ("none.test1", "MX"): [], ("none.test1", "A"): [], ("none.test1", "AAAA"): [],
        ("fail.test1", "MX"): dns.resolver.NoNameservers(),
        ("slow.test1", "MX"): dns.resolver.LifetimeTimeout(timeout=1.0, errors={}),
        ("net.test1", "MX"): ConnectionRefusedError("refused"),
        ("half.test1", "MX"): [], ("half.test1", "A"): dns.exception.Timeout(),
    })
    report = domains.Checker(fake)(["mx.test1", "a.test1", "six.test1", "null.test1",
                                     "gone.test1", "none.test1", "fail.test1", "slow.test1",
                                     "net.test1", "half.test1"])
    assert states(report) == {
        "mx.test1": "alive", "a.test1": "alive", "six.test1": "alive", "null.test1": "dead",
        "gone.test1": "dead", "none.test1": "dead", "fail.test1": "doubt", "slow.test1": "doubt",
        "net.test1": "doubt", "half.test1": "doubt",
    }
    assert report.dead == ["gone.test1", "none.test1", "null.test1"]
    assert (report.checked, report.in_doubt) == (10, 4)
    reasons = {v.domain: v.reason for v in report.verdicts}
    assert reasons["null.test1"] == "null MX (RFC 7505)" and reasons["gone.test1"] == "NXDOMAIN"
    assert reasons["slow.test1"] == "timeout"
    assert fake.calls[("a.test1", "AAAA")] == 0  # an A answer is enough


@pytest.mark.parametrize(("records", "null"), [
    ([mx(0, ".")], True),
    ([mx(10, ".")], False),  # RFC 7505 says preference 0: anything else is not a null MX
    ([mx(0, "."), mx(10, "in.example.")], False),  # broken, but someone may take the mail
    ([mx(0, "in.example.")], False),
])
def test_null_mx_is_exactly_one_record_at_preference_zero_to_the_root(records: list[Any],
                                                                       null: bool) -> None:
    assert domains.is_null_mx(records) is null


def test_each_distinct_domain_is_looked_up_once_per_run() -> None:
    fake = FakeDNS({("a.test1", "MX"): [mx(5, "mx.a.test1.")],
                    ("b.test1", "MX"): dns.resolver.NoNameservers()})
    checker = domains.Checker(fake)
    first = checker(["a.test1", "A.TEST1", "gone.test1", "b.test1", "a.test1.", "gone.test1"])
    again = checker(["gone.test1", "a.test1", "b.test1", "new.test1"])
    assert [v.domain for v in first.verdicts] == ["a.test1", "gone.test1", "b.test1"]
    assert states(again) == {"gone.test1": "dead", "a.test1": "alive", "b.test1": "doubt",
                             "new.test1": "dead"}
    assert fake.calls == {("a.test1", "MX"): 1, ("gone.test1", "MX"): 1, ("b.test1", "MX"): 1,
                          ("new.test1", "MX"): 1}


def test_lookups_run_concurrently_but_never_past_the_bound() -> None:
    bound, names = 4, [f"d{i}.test1" for i in range(24)]
    in_flight, peak = 0, 0
    changed = threading.Condition()
    released = threading.Event()

    def release() -> None:
        with changed:
            released.set()
            changed.notify_all()

    def resolve(domain: str, rdtype: str, lifetime: float) -> Sequence[Any]:
        nonlocal in_flight, peak
        with changed:
            in_flight += 1
            peak = max(peak, in_flight)
            changed.notify_all()
            if in_flight == bound and not released.is_set():
                # The first `bound` lookups hold on together; an unbounded pool gets a moment
                # to send more in (which would raise `peak`), then everyone goes on.
                threading.Timer(0.3, release).start()
            if not changed.wait_for(lambda: released.is_set() or in_flight > bound, timeout=5):
                released.set()  # never `bound` at once: the assert on `peak` fails below
            in_flight -= 1
        return [mx(10, f"mx.{domain}.")]

    report = domains.Checker(resolve, concurrency=bound)(names)
    assert peak == bound  # a serial checker stays at 1; an unbounded one goes past
    assert states(report) == dict.fromkeys(names, "alive")


def test_no_lookup_starts_after_the_deadline() -> None:
    now, step = [0.0], [60.0]
    fake = FakeDNS({("d0.test1", "MX"): [], ("d0.test1", "A"): [], ("d0.test1", "AAAA"): []})

    def resolve(domain: str, rdtype: str, lifetime: float) -> Sequence[Any]:
        now[0] += step[0]  # each lookup "takes" 60 s of the 100 s allowed
        return fake(domain, rdtype, lifetime)

    checker = domains.Checker(resolve, concurrency=1, total=100.0, clock=lambda: now[0])
    report = checker(["d0.test1"])
    # MX (done at 60 s), A (done at 120 s), then no time is left for AAAA: kept, not suppressed.
    assert states(report) == {"d0.test1": "doubt"}
    assert report.verdicts[0].reason == domains.NO_TIME
    assert fake.calls == {("d0.test1", "MX"): 1, ("d0.test1", "A"): 1}
    step[0] = 0.0
    assert states(checker(["d0.test1"])) == {"d0.test1": "dead"}  # not cached: asked again
    assert fake.calls[("d0.test1", "AAAA")] == 1


def test_a_lookup_that_never_returns_is_kept_when_the_total_runs_out() -> None:
    release = threading.Event()

    def resolve(domain: str, rdtype: str, lifetime: float) -> Sequence[Any]:
        if domain == "stuck.test1":
            release.wait(timeout=30)
        raise dns.resolver.NXDOMAIN()

    try:
        report = domains.Checker(resolve, concurrency=2, total=1.0)(["stuck.test1", "gone.test1"])
    finally:
        release.set()
    assert states(report) == {"stuck.test1": "doubt", "gone.test1": "dead"}
    assert report.dead == ["gone.test1"]


def test_a_bug_in_the_lookup_is_not_taken_for_a_dns_answer() -> None:
    def resolve(domain: str, rdtype: str, lifetime: float) -> Sequence[Any]:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        domains.Checker(resolve)(["x.test1"])


def test_suppression_rows_for_dead_domains_only() -> None:
    report = domains.Report((domains.Verdict("gone.test1", "dead", "NXDOMAIN"),
                             domains.Verdict("ok.test1", "alive", "MX"),
                             domains.Verdict("odd.test1", "doubt", "timeout")))
    assert domains.suppressions(report, 5.0, 7) == [
        {"email_key": None, "domain": "gone.test1", "reason": "dead_domain", "source": "dns",
         "campaign_id": 7, "created_at": 5.0}]
    assert domains.summary(report) == ("domains: 3 checked, 1 dead (gone.test1) suppressed, "
                                       "1 in doubt and kept")


# --- against the loopback DNS server, through dnspython ----------------------------------


def fixture_checker(server: DNSTestServer, *, lifetime: float = 5.0) -> domains.Checker:
    """A Checker that asks only the test server; one try per lookup, so counts are exact."""
    config = DnsConfig(nameservers=((server.host, server.port),))
    return domains.Checker(domains.resolver(config, timeout=lifetime), lifetime=lifetime)


def test_verdicts_against_the_dns_server(dns_server: StartServer) -> None:
    server = dns_server(ZONE)
    report = fixture_checker(server, lifetime=0.5)(list(EXPECTED))
    assert states(report) == EXPECTED
    assert report.dead == ["gone.example", "nomail.example", "nullmx.example"]
    reasons = {v.domain: v.reason for v in report.verdicts}
    assert reasons["broken.example"] == reasons["refused.example"] == (
        "no server gave an answer (SERVFAIL, REFUSED or unreachable)")
    assert reasons["slow.example"] == "timeout"
    assert reasons["a-only.example"] == "no MX, A (implicit MX)"


def test_the_dns_server_is_asked_once_per_domain_and_type(dns_server: StartServer) -> None:
    server = dns_server(ZONE)
    checker = fixture_checker(server)
    wanted = ["mx.example", "a-only.example", "nullmx.example", "gone.example", "nomail.example",
              "broken.example"]
    checker(wanted + [name.upper() for name in wanted])
    checker(wanted)
    assert server.queries == {
        ("mx.example", "MX"): 1, ("a-only.example", "MX"): 1, ("a-only.example", "A"): 1,
        ("nullmx.example", "MX"): 1, ("gone.example", "MX"): 1, ("nomail.example", "MX"): 1,
        ("nomail.example", "A"): 1, ("nomail.example", "AAAA"): 1, ("broken.example", "MX"): 1,
    }


def test_an_unreachable_nameserver_suppresses_nothing(dns_server: StartServer) -> None:
    server = dns_server({})
    checker = fixture_checker(server, lifetime=1.0)
    server.stop()  # the port is closed now: every query is refused by the network
    report = checker(["gone.example", "mx.example"])
    assert states(report) == {"gone.example": "doubt", "mx.example": "doubt"}
    assert report.dead == []


def test_idna_domains_are_asked_by_their_a_label(dns_server: StartServer) -> None:
    server = dns_server({"пример.рф": {"MX": [(0, ".")]}})
    report = fixture_checker(server)(["xn--e1afmkfd.xn--p1ai"])
    assert report.dead == ["xn--e1afmkfd.xn--p1ai"]


# --- the store: a long check never blocks on (or is broken by) other writers ---------------


def test_import_survives_a_commit_by_another_process_during_the_check(
        engine: sa.Engine, tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("email\r\nann@gone.example\r\nbob@ok.example\r\n", encoding="utf-8")

    def check(wanted: Any) -> domains.Report:
        # Another writer commits while DNS is being asked (a `send` or a second import).
        suppression.add(engine, ["other@ok.example"], reason="manual", source="cli", now=1.0)
        verdicts = [domains.Verdict(d, "dead" if d == "gone.example" else "alive", "test")
                    for d in wanted]
        return domains.Report(tuple(verdicts))

    report = subscribers.import_file(engine, path, "news", now=2.0, check_domains=check)
    assert (report.imported, report.suppressed, report.domain_check.checked) == (1, 1, 2)
    labels = [entry.domain or entry.email_key for entry in suppression.entries(engine)]
    assert sorted(labels) == ["gone.example", "other@ok.example"]


# --- the CLI on both stores ---------------------------------------------------------------

SECRET = "a-test-secret-of-enough-length-0123456789"
AUDIENCE = ("email,name\r\nann@mx.example,Ann\r\nbob@MX.example,Bob\r\ncid@a-only.example,Cid\r\n"
            "dan@gone.example,Dan\r\neve@gone.example,Eve\r\nfay@nullmx.example,Fay\r\n"
            "gus@broken.example,Gus\r\nhal@slow.example,Hal\r\nnot-an-address,X\r\n")


@pytest.fixture
def dns_ws(bulksend: Bulksend, workspace: Path, store_url: str, dns_server: StartServer,
           monkeypatch: pytest.MonkeyPatch) -> tuple[Bulksend, DNSTestServer]:
    """A workspace whose [dns] points at the test server, with [sender] and a template."""
    server = dns_server(ZONE)
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n'
        '[sender]\nfrom = "News <news@example.com>"\nlist_id = "news.example.com"\n'
        'return_path = "bounces@example.com"\nunsubscribe_url = "https://example.com/u"\n'
        f'[dns]\nnameservers = ["{server.nameserver}"]\n', encoding="utf-8")
    (workspace / "audience.csv").write_text(AUDIENCE, encoding="utf-8")
    (workspace / "n.html").write_text('<p>Hi</p><a href="{{ unsubscribe_url }}">unsubscribe</a>',
                                      encoding="utf-8")
    return bulksend, server


def suppressed_domains(bulksend: Bulksend) -> dict[str, tuple[str, str]]:
    entries = bulksend("suppress", "list", "--json").json()["suppressions"]
    return {row["domain"]: (row["reason"], row["source"]) for row in entries if row["domain"]}


def test_campaign_start_check_domains_suppresses_nxdomain_and_null_mx_only(
        dns_ws: tuple[Bulksend, DNSTestServer], workspace: Path) -> None:
    bulksend, server = dns_ws
    assert bulksend("import", workspace / "audience.csv", "--list", "news").code == 0
    assert server.queries == {}  # no lookups without --check-domains
    assert bulksend("campaign", "create", "c1", "--list", "news", "--subject", "s",
                    "--html", workspace / "n.html").code == 0
    started = bulksend("campaign", "start", "c1", "--no-dkim", "--check-domains", "--json")
    assert started.code == 0, started.stderr
    assert started.json() == {"name": "c1", "status": "running", "queued": 5, "suppressed": 3,
                              "send_at": None, "dkim_domain": None, "domains_checked": 6,
                              "dead_domains": 2}
    assert suppressed_domains(bulksend) == {"gone.example": ("dead_domain", "dns"),
                                            "nullmx.example": ("dead_domain", "dns")}
    shown = bulksend("campaign", "show", "c1", "--json").json()
    assert (shown["total"], shown["queued"], shown["suppressed"]) == (8, 5, 3)
    assert server.queries[("mx.example", "MX")] == 1


def test_campaign_start_plain_output_and_known_dead_domains_are_not_asked_again(
        dns_ws: tuple[Bulksend, DNSTestServer], workspace: Path) -> None:
    bulksend, server = dns_ws
    (workspace / "a.csv").write_text("email\r\nann@mx.example\r\ndan@gone.example\r\n"
                                     "fay@nullmx.example\r\n", encoding="utf-8")
    assert bulksend("import", workspace / "a.csv", "--list", "news").code == 0
    assert bulksend("suppress", "add", "@nullmx.example", "--reason", "manual").code == 0
    assert bulksend("campaign", "create", "c1", "--list", "news", "--subject", "s",
                    "--html", workspace / "n.html").code == 0
    started = bulksend("campaign", "start", "c1", "--no-dkim", "--check-domains")
    assert started.code == 0, started.stderr
    assert "1 queued, 2 suppressed" in started.stdout
    assert ("domains: 2 checked, 1 dead (gone.example) suppressed, 0 in doubt and kept"
            in started.stdout)
    assert ("nullmx.example", "MX") not in server.queries
    assert suppressed_domains(bulksend) == {"gone.example": ("dead_domain", "dns"),
                                            "nullmx.example": ("manual", "cli")}


def test_a_refused_start_asks_nothing_or_leaves_no_suppression(
        dns_ws: tuple[Bulksend, DNSTestServer], workspace: Path) -> None:
    bulksend, server = dns_ws
    assert bulksend("import", workspace / "audience.csv", "--list", "news").code == 0
    assert bulksend("campaign", "create", "c1", "--list", "news", "--subject", "s",
                    "--html", workspace / "n.html").code == 0
    refused = bulksend("campaign", "start", "c1", "--check-domains")  # no DKIM key, no --no-dkim
    assert refused.code == 1 and "no DKIM key" in refused.stderr
    assert server.queries == {}  # refused before any lookup
    (workspace / "dead.csv").write_text("email\r\ndan@gone.example\r\nfay@nullmx.example\r\n",
                                        encoding="utf-8")
    assert bulksend("import", workspace / "dead.csv", "--list", "dead").code == 0
    assert bulksend("campaign", "create", "c2", "--list", "dead", "--subject", "s",
                    "--html", workspace / "n.html").code == 0
    empty = bulksend("campaign", "start", "c2", "--no-dkim", "--check-domains")
    assert empty.code == 1 and "has no one to send to" in empty.stderr
    assert "(2 suppressed)" in empty.stderr
    assert server.queries[("gone.example", "MX")] == 1
    assert suppressed_domains(bulksend) == {}  # the refused start changed nothing
    assert bulksend("campaign", "show", "c1", "--json").json()["status"] == "draft"


def test_import_check_domains_counts_dead_addresses_as_suppressed(
        dns_ws: tuple[Bulksend, DNSTestServer], workspace: Path) -> None:
    bulksend, server = dns_ws
    server.update({"slow.example": {"MX": [(10, "in.mx.example.")]}})  # no 5 s wait here
    result = bulksend("import", workspace / "audience.csv", "--list", "news", "--check-domains",
                      "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert {key: data[key] for key in ("rows", "imported", "invalid", "suppressed",
                                       "domains_checked", "dead_domains")} == {
        "rows": 9, "imported": 5, "invalid": 1, "suppressed": 3, "domains_checked": 6,
        "dead_domains": 2}
    dead = bulksend("subscribers", "show", "dan@gone.example", "--json").json()
    assert (dead["lists"], dead["suppressed"]) == ({"news": "unsubscribed"}, "dead_domain")
    kept = bulksend("subscribers", "show", "gus@broken.example", "--json").json()
    assert (kept["lists"], kept["suppressed"]) == ({"news": "subscribed"}, None)
    assert bulksend("lists", "--json").json() == {"lists": [
        {"name": "news", "subscribed": 5, "unsubscribed": 0, "suppressed": 3}]}
    plain = bulksend("import", workspace / "audience.csv", "--list", "news", "--check-domains")
    assert "domains: 6 checked, 2 dead (gone.example, nullmx.example) suppressed" in plain.stdout
    assert server.queries[("gone.example", "MX")] == 2  # once per run: the cache is per run


def test_import_check_domains_dry_run_writes_nothing(
        dns_ws: tuple[Bulksend, DNSTestServer], workspace: Path, engine: sa.Engine) -> None:
    bulksend, server = dns_ws
    server.update({"slow.example": "NXDOMAIN"})
    before = row_counts(engine)
    result = bulksend("import", workspace / "audience.csv", "--list", "news", "--check-domains",
                      "--dry-run", "--json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert (data["imported"], data["suppressed"], data["dead_domains"]) == (4, 4, 3)
    assert row_counts(engine) == before
    without = bulksend("import", workspace / "audience.csv", "--list", "news", "--json").json()
    assert "domains_checked" not in without and without["suppressed"] == 0
