"""Dead domains: does a domain accept mail at all? Asked once per domain, never on a guess.

Each distinct domain gets one MX lookup, then A and AAAA when it has no MX:

    NXDOMAIN                                   → dead  (the name does not exist)
    one MX, preference 0, exchange "."         → dead  (RFC 7505 null MX: "I take no mail")
    no MX, no A, no AAAA (NOERROR, no data)    → dead  (RFC 5321 §5.1: without an MX the A/AAAA
                                                         is the implicit MX; with neither, no
                                                         host can receive its mail)
    an MX, or no MX but an A or AAAA           → alive
    SERVFAIL, REFUSED, a timeout, a network
    error, or no time left for the lookup      → doubt: kept, never suppressed

Lookups run in a bounded thread pool; every query has a lifetime and the whole check a
deadline. Verdicts are cached per `Checker`, so a domain is asked once per run. Dead domains
become domain suppressions (`@domain`, reason `dead_domain`) before anything is queued.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from bulksend.config import DnsConfig
from bulksend.errors import ConfigError

CONCURRENCY = 16
LIFETIME = 5.0  # seconds for one lookup, retries included
TOTAL = 120.0  # seconds for the whole check; domains not reached by then are kept
SOURCE = "dns"
NO_TIME = "not checked: the check ran out of time"

State = Literal["dead", "alive", "doubt"]
# (domain, record type, lifetime) → the answer's records ([] for NOERROR without data);
# raises dns.resolver.NXDOMAIN, or any other dns.exception.DNSException / OSError on doubt.
Resolve = Callable[[str, str, float], Sequence[Any]]


@dataclass(frozen=True)
class Verdict:
    """What DNS said about one domain, and why."""

    domain: str
    state: State
    reason: str

    @property
    def dead(self) -> bool:
        """True when the domain certainly takes no mail."""
        return self.state == "dead"


@dataclass(frozen=True)
class Report:
    """The verdicts of one check, one per distinct domain asked about."""

    verdicts: tuple[Verdict, ...]

    @property
    def checked(self) -> int:
        """How many distinct domains were checked."""
        return len(self.verdicts)

    @property
    def dead(self) -> list[str]:
        """The dead domains, sorted."""
        return sorted(v.domain for v in self.verdicts if v.dead)

    @property
    def in_doubt(self) -> int:
        """Domains kept because DNS did not give a clear answer."""
        return sum(v.state == "doubt" for v in self.verdicts)


Check = Callable[[Iterable[str]], Report]  # what campaigns.start and import_file are given


class Checker:
    """Checks domains with bounded concurrency and a per-run cache of verdicts."""

    def __init__(self, resolve: Resolve, *, concurrency: int = CONCURRENCY,
                 lifetime: float = LIFETIME, total: float = TOTAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`resolve` does the lookups; `clock` (monotonic seconds) enforces the deadline."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._resolve = resolve
        self._concurrency = concurrency
        self._lifetime = lifetime
        self._total = total
        self._clock = clock
        self._cache: dict[str, Verdict] = {}

    def __call__(self, domains: Iterable[str]) -> Report:
        """Verdicts for the distinct domains given; each is looked up at most once per Checker."""
        wanted = list(dict.fromkeys(d.rstrip(".").lower() for d in domains if d))
        fresh = {v.domain: v for v in self._lookup_all([d for d in wanted if d not in self._cache])}
        # A domain left out for lack of time is not cached: a later call may have time for it.
        self._cache.update({d: v for d, v in fresh.items() if v.reason != NO_TIME})
        return Report(tuple(self._cache.get(d) or fresh[d] for d in wanted))

    def _lookup_all(self, todo: list[str]) -> list[Verdict]:
        if not todo:
            return []
        deadline = self._clock() + self._total
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(self._concurrency, len(todo)), thread_name_prefix="bulksend-dns")
        try:
            futures = {pool.submit(self._verdict, domain, deadline): domain for domain in todo}
            done, _ = concurrent.futures.wait(futures, timeout=self._total)
            return [future.result() if future in done
                    else Verdict(domain, "doubt", NO_TIME)
                    for future, domain in futures.items()]
        finally:
            # Running lookups end within their own lifetime; queued ones are dropped.
            pool.shutdown(wait=False, cancel_futures=True)

    def _verdict(self, domain: str, deadline: float) -> Verdict:
        """Look up one domain: MX, then A and AAAA when it has none."""
        try:
            mx = self._ask(domain, "MX", deadline)
            if mx:
                if is_null_mx(mx):
                    return Verdict(domain, "dead", "null MX (RFC 7505)")
                return Verdict(domain, "alive", "MX")
            for rdtype in ("A", "AAAA"):
                if self._ask(domain, rdtype, deadline):
                    return Verdict(domain, "alive", f"no MX, {rdtype} (implicit MX)")
        except dns.resolver.NXDOMAIN:
            return Verdict(domain, "dead", "NXDOMAIN")
        except _OutOfTime:
            return Verdict(domain, "doubt", NO_TIME)
        except (dns.exception.DNSException, OSError) as exc:
            return Verdict(domain, "doubt", _describe(exc))
        return Verdict(domain, "dead", "no MX, A or AAAA record")

    def _ask(self, domain: str, rdtype: str, deadline: float) -> Sequence[Any]:
        left = deadline - self._clock()
        if left <= 0:
            raise _OutOfTime
        return self._resolve(domain, rdtype, min(self._lifetime, left))


class _OutOfTime(Exception):
    """The check's deadline passed before this lookup could start."""


def is_null_mx(records: Sequence[Any]) -> bool:
    """True for an RFC 7505 null MX: exactly one MX, preference 0, exchange the root "."."""
    if len(records) != 1:
        return False
    (record,) = records
    return int(record.preference) == 0 and record.exchange == dns.name.root


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no server gave an answer (SERVFAIL, REFUSED or unreachable)"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def resolver(config: DnsConfig, *, timeout: float = 2.0) -> Resolve:
    """A dnspython lookup through `[dns] nameservers`, else the system's resolvers.

    `timeout` bounds one try at one server; the lifetime passed per call bounds all tries.
    """
    if config.nameservers:
        client = dns.resolver.Resolver(configure=False)
        client.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                              for host, port in config.nameservers]
    else:
        try:
            client = dns.resolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            raise ConfigError(f"DNS: no system resolver ({exc}): set [dns] nameservers "
                              "in bulksend.toml") from None
    client.timeout = timeout
    client.cache = None  # the Checker caches verdicts; an answer cache would hide nothing more

    def resolve(domain: str, rdtype: str, lifetime: float) -> Sequence[Any]:
        answer = client.resolve(dns.name.from_text(domain), rdtype, lifetime=lifetime,
                                raise_on_no_answer=False, search=False)
        return list(answer.rrset) if answer.rrset is not None else []

    return resolve


def checker(config: DnsConfig, **options: Any) -> Checker:
    """A Checker over the configured resolvers (options as for Checker)."""
    return Checker(resolver(config), **options)


def suppressions(report: Report, now: float, campaign_id: int | None = None
                 ) -> list[dict[str, Any]]:
    """Suppression rows (for store.add_suppressions) for the report's dead domains."""
    return [{"email_key": None, "domain": domain, "reason": "dead_domain", "source": SOURCE,
             "campaign_id": campaign_id, "created_at": now}
            for domain in report.dead]


def summary(report: Report) -> str:
    """One line for the CLI: how many domains were checked, dead and in doubt."""
    dead = report.dead
    listed = f" ({', '.join(dead[:5])}{', …' if len(dead) > 5 else ''})" if dead else ""
    return (f"domains: {report.checked} checked, {len(dead)} dead{listed} suppressed, "
            f"{report.in_doubt} in doubt and kept")
