"""Real `bulksend send` processes: concurrency, kill -9, fencing and SIGTERM (issue 4, items 3-5, 7).

Every test runs `python -m bulksend send --once --json` as child processes against a config
whose database is the test's store (SQLite and PostgreSQL) and whose accounts are STARTTLS
test servers with AUTH. The servers run in their own processes with fsynced journals, so
what they accepted, the ground truth, survives every kill of a sender.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import campaigns, db, models, store_deliveries
from tests.test_send import SECRET, delivered, prepare

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Account:
    """One `[[accounts]]` entry of the config, on a test server."""

    name: str
    server: Any
    limits: tuple[str, ...] = ()
    connections: int = 2


class Workers:
    """A bulksend.toml on the test store and its accounts; `send --once` processes run on it."""

    def __init__(self, directory: Path, store_url: str, accounts: list[Account],
                 lease: str = "2s") -> None:
        self.accounts = accounts
        self.config = directory / "bulksend.toml"
        self.directory = directory
        self.started: list[subprocess.Popen[str]] = []
        lines = [f'database = "{store_url}"',
                 "[sender]", 'from = "News <news@example.com>"', 'list_id = "news.example.com"',
                 'return_path = "bounces@example.com"', 'unsubscribe_url = "https://example.com/u"',
                 "[delivery]", f'lease = "{lease}"']
        for account in accounts:
            lines += ["[[accounts]]", f'name = "{account.name}"',
                      f'host = "{account.server.host}"', f"port = {account.server.port}",
                      'security = "starttls"', f'ca_file = "{account.server.ca_file}"',
                      f'username = "{account.name}"', f'password_env = "{password_env(account.name)}"',
                      f"limits = {json.dumps(list(account.limits))}",
                      f"connections = {account.connections}", "messages_per_connection = 1000"]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.env = dict(os.environ, BULKSEND_SECRET=SECRET.decode())
        self.env.pop("BULKSEND_CRASH_AT", None)
        for account in accounts:
            self.env[password_env(account.name)] = f"secret-{account.name}"

    def start(self, crash_at: str | None = None) -> subprocess.Popen[str]:
        """`bulksend send --once --json` in a child process (stdout piped, stderr to a file)."""
        env = dict(self.env)
        if crash_at is not None:
            env["BULKSEND_CRASH_AT"] = crash_at
        with self._stderr(len(self.started)).open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "bulksend", "--config", str(self.config),
                 "send", "--once", "--json"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                text=True,
            )
        self.started.append(process)
        return process

    def finish(self, process: subprocess.Popen[str], timeout: float = 60.0) -> dict[str, Any]:
        """Wait for a run that must succeed; its JSON report."""
        out, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, (process.returncode, out, self.stderr(process))
        return json.loads(out)

    def stderr(self, process: subprocess.Popen[str]) -> str:
        """What a run wrote to stderr, for failure messages."""
        return self._stderr(self.started.index(process)).read_text(errors="replace")[-3000:]

    def kill_leftovers(self) -> None:
        """Kill the runs a failed test left behind (stopped ones are continued first)."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.communicate()

    def _stderr(self, index: int) -> Path:
        return self.directory / f"send-{index + 1}.stderr"


MakeWorkers = Callable[..., Workers]


@pytest.fixture
def workers(store_url: str, tmp_path: Path) -> Iterator[MakeWorkers]:
    """Factory of `Workers` on the test store: `workers(accounts, lease="2s")`."""
    made: list[Workers] = []

    def make(accounts: list[Account], lease: str = "2s") -> Workers:
        made.append(Workers(tmp_path, store_url, accounts, lease))
        return made[-1]

    yield make
    for each in made:
        each.kill_leftovers()


def password_env(name: str) -> str:
    return f"PW_{name.upper()}"


def start_servers(smtp_server_process: Any, names: list[str], **options: Any) -> dict[str, Any]:
    """One STARTTLS server process per account, each knowing that account's password."""
    return {name: smtp_server_process(mode="starttls", users={name: f"secret-{name}"},
                                      require_auth=True, **options)
            for name in names}


def states(engine: sa.Engine) -> dict[str, str]:
    """Recipient → delivery state."""
    with engine.connect() as connection:
        return dict(connection.execute(
            sa.select(models.deliveries.c.email_key, models.deliveries.c.state)).all())


def campaign_status(engine: sa.Engine) -> str:
    return campaigns.show(engine, "c")["status"]


def per_account(servers: dict[str, Any]) -> dict[str, int]:
    """Account → how many messages its server accepted."""
    return {name: len(server.delivered()) for name, server in servers.items()}


def in_flight(engine: sa.Engine) -> dict[str, set[str]]:
    """Recipients whose delivery is `claimed` or `sending` right now."""
    found: dict[str, set[str]] = {"claimed": set(), "sending": set()}
    for email_key, state in states(engine).items():
        if state in found:
            found[state].add(email_key)
    return found


def wait_for_leases(engine: sa.Engine) -> None:
    """Sleep until every lease in the store has expired, so recovery may take the rows back."""
    with engine.connect() as connection:
        deadline = connection.execute(sa.select(sa.func.max(models.deliveries.c.lease_expires_at))).scalar()
    if deadline is not None:
        time.sleep(max(0.0, deadline - time.time()) + 0.05)


def ledger(engine: sa.Engine) -> Counter[str]:
    """Account → quota reservations in the store (all of them are within the last hour)."""
    with engine.connect() as connection:
        return Counter(dict(connection.execute(
            sa.select(models.delivery_attempts.c.account, sa.func.count())
            .group_by(models.delivery_attempts.c.account)).all()))


def wait_until(probe: Any, timeout: float = 30.0) -> Any:
    """Poll `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
    return result


def holds_leases(engine: sa.Engine, pid: int) -> bool:
    """Whether the worker with this process id holds leases now (it is sending)."""
    owner = f"{os.uname().nodename}:{pid}"
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).where(
            models.deliveries.c.lease_owner == owner)).scalar_one() > 0


def all_terminal(engine: sa.Engine) -> bool:
    return set(states(engine).values()) <= set(models.TERMINAL_DELIVERY_STATES)


# --- 3. concurrency -------------------------------------------------------------------------


def test_four_workers_at_once_fill_binding_limits_exactly(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    limits = {"c7": "7/1h", "c5": "5/1h", "c4": "4/1h"}
    servers = start_servers(smtp_server_process, list(limits))
    prepare(engine, tmp_path, 100)
    run = workers([Account(n, servers[n], (limit,)) for n, limit in limits.items()])
    processes = [run.start() for _ in range(4)]
    reports = [run.finish(process) for process in processes]
    assert sum(report["sent"] for report in reports) == 16
    assert {report["stopped_because"] for report in reports} == {"all accounts unavailable"}
    assert per_account(servers) == {"c7": 7, "c5": 5, "c4": 4}
    counts = delivered(servers)
    assert len(counts) == 16 and set(counts.values()) == {1}
    assert ledger(engine) == {"c7": 7, "c5": 5, "c4": 4}
    assert Counter(states(engine).values()) == {"sent": 16, "queued": 84}


def test_four_workers_at_once_send_everyone_exactly_once(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    servers = start_servers(smtp_server_process, ["n1", "n2", "n3"])
    prepare(engine, tmp_path, 300)
    run = workers([Account(n, server) for n, server in servers.items()])
    processes = [run.start() for _ in range(4)]
    reports = [run.finish(process) for process in processes]
    assert sum(report["sent"] for report in reports) == 300
    counts = delivered(servers)
    assert len(counts) == 300 and set(counts.values()) == {1}
    assert set(states(engine).values()) == {"sent"}
    assert campaign_status(engine) == "finished"


def test_the_last_two_results_committed_at_once_finish_the_campaign(
        engine: sa.Engine, tmp_path: Path) -> None:
    # Two lanes record the campaign's last two results at the same moment. On PostgreSQL
    # both transactions write before either counts what is left (the barrier); SQLite runs
    # write transactions one at a time, so there each simply goes through.
    prepare(engine, tmp_path, 2)
    with db.transaction(engine) as connection:
        connection.execute(sa.update(models.deliveries).values(state="sending", lease_token="t"))
        campaign_id = connection.execute(sa.select(models.campaigns.c.id)).scalar_one()
    together = threading.Barrier(2 if engine.dialect.name == "postgresql" else 1)

    def record(delivery_id: int) -> None:
        with db.transaction(engine) as connection:
            assert store_deliveries.finish(connection, delivery_id, "t", time.time(), state="sent")
            together.wait(timeout=10)
            store_deliveries.finish_campaigns(connection, [campaign_id], time.time())

    lanes = [threading.Thread(target=record, args=(delivery_id,)) for delivery_id in (1, 2)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    assert set(states(engine).values()) == {"sent"}
    assert campaign_status(engine) == "finished"


# --- 4. crash ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """What a killed worker held: its claims and the messages it had committed `sending`."""

    how: str
    claimed: frozenset[str]  # recovery puts these back in the queue
    sending: frozenset[str]  # recovery makes these `unknown`: the dot may have gone out


def left_behind(engine: sa.Engine, how: str, earlier: list[Kill]) -> Kill:
    """What the worker killed just now held; no other worker runs, so every lease is its.

    Nobody waits for the leases: the next worker starts at once and recovers them when they
    expire. Until then an earlier victim's `sending` rows are still there: not this kill's.
    """
    time.sleep(0.2)  # PostgreSQL finishes a commit the killed client had already sent
    held = in_flight(engine)
    status = campaign_status(engine)
    assert (status == "finished") == all_terminal(engine), status
    before = set().union(*(kill.sending for kill in earlier))
    return Kill(how, frozenset(held["claimed"]), frozenset(held["sending"] - before))


CRASH_POINTS = ("after_claim:3", "before_dot:5", "after_dot:7", "after_result:9")


def test_kill_9_and_crash_points_lose_nobody_and_send_nobody_twice(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    limits = {"k1": ("300/1h",), "k2": ("5000/1h",), "k3": (), "k4": ()}
    # 20 ms a message per session: the send outlasts the five random kills below.
    servers = start_servers(smtp_server_process, list(limits),
                            rules=[{"stage": "dot", "action": "delay", "seconds": 0.02}])
    prepare(engine, tmp_path, 2000)
    run = workers([Account(n, servers[n], limits[n]) for n in limits])
    lanes = sum(account.connections for account in run.accounts)  # transactions at once, at most
    kills: list[Kill] = []
    for point in CRASH_POINTS:
        worker = run.start(crash_at=point)
        worker.communicate(timeout=60)
        assert worker.returncode == 137, run.stderr(worker)
        kills.append(left_behind(engine, point, kills))
    rng = random.Random(20260404)
    for _ in range(5):
        worker = run.start()
        wait_until(lambda: holds_leases(engine, worker.pid))  # it is sending now
        time.sleep(rng.uniform(0.0, 0.6))
        assert worker.poll() is None, "the worker finished before it could be killed"
        worker.kill()
        worker.communicate()
        kills.append(left_behind(engine, "kill -9", kills))
    for _ in range(5):
        report = run.finish(run.start())
        if report["stopped_because"] == "queue empty":
            break
        wait_for_leases(engine)
    else:
        pytest.fail(f"the campaign did not finish: {report}")

    counts = delivered(servers)
    final = states(engine)
    assert max(counts.values()) == 1
    by_state: dict[str, set[str]] = {}
    for email_key, state in final.items():
        by_state.setdefault(state, set()).add(email_key)
    assert set(by_state) <= {"sent", "unknown"}, Counter(final.values())
    assert by_state["sent"] <= set(counts)
    never = set(final) - set(counts)
    assert {final[email_key] for email_key in never} <= {"unknown", "failed", "suppressed"}
    assert not {email_key for email_key in counts if final[email_key] in ("failed", "suppressed")}
    # `unknown` is exactly what was between `sending` and its result at the kills.
    unknown = by_state.get("unknown", set())
    assert unknown == set().union(*(kill.sending for kill in kills))
    assert all(len(kill.sending) <= lanes for kill in kills), [(k.how, len(k.sending)) for k in kills]
    assert len(unknown) <= len(kills) * lanes
    claim, before, after, result = kills[:4]
    assert claim.sending == set() and len(claim.claimed) > 0
    # Requeued, then delivered once (unless a later crash caught them in `sending`).
    later = set().union(*(kill.sending for kill in kills[1:]))
    assert claim.claimed - later <= by_state["sent"] and claim.claimed & by_state["sent"]
    assert before.sending - set(counts), "a dot withheld by the crash: unknown, never delivered"
    assert after.sending & set(counts), "a reply lost to the crash: unknown, yet delivered"
    assert len(result.sending) <= lanes - 1
    assert campaign_status(engine) == "finished" and all_terminal(engine)
    reserved = ledger(engine)
    assert per_account(servers)["k1"] <= reserved["k1"] <= 300
    assert per_account(servers)["k2"] <= reserved["k2"] <= 5000


def test_a_campaign_whose_last_delivery_is_recovered_as_unknown_finishes(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    servers = start_servers(smtp_server_process, ["u1"])
    prepare(engine, tmp_path, 3)
    run = workers([Account("u1", servers["u1"], connections=1)])
    worker = run.start(crash_at="before_dot:3")
    worker.communicate(timeout=60)
    assert worker.returncode == 137, run.stderr(worker)
    assert in_flight(engine)["sending"] == {"user00002@example.org"}
    wait_for_leases(engine)
    report = run.finish(run.start())
    assert (report["sent"], report["stopped_because"]) == (0, "queue empty")
    assert states(engine) == {"user00000@example.org": "sent", "user00001@example.org": "sent",
                              "user00002@example.org": "unknown"}
    assert delivered(servers) == {"user00000@example.org": 1, "user00001@example.org": 1}
    assert campaign_status(engine) == "finished"


# --- 5. fencing -------------------------------------------------------------------------------


def stop_past_the_lease(engine: sa.Engine, run: Workers, ready: Any, meanwhile: Any = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """SIGSTOP a worker once `ready()`, call `meanwhile()`, run a second worker once the
    first one's leases have expired, then SIGCONT the first; both reports (second, first)."""
    first = run.start()
    wait_until(lambda: len(in_flight(engine)["claimed"]) == 5)
    wait_until(ready)
    first.send_signal(signal.SIGSTOP)
    try:
        assert in_flight(engine)["claimed"] | in_flight(engine)["sending"], "stopped too late"
        if meanwhile is not None:
            meanwhile()
        wait_for_leases(engine)
        second = run.finish(run.start())
    finally:
        first.send_signal(signal.SIGCONT)
    return second, run.finish(first)


def claimed_at(engine: sa.Engine) -> float:
    """When the earliest `claimed` delivery was claimed (its row's last change)."""
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.min(models.deliveries.c.updated_at))
                                  .where(models.deliveries.c.state == "claimed")).scalar_one()


def test_a_worker_stopped_before_its_dot_past_its_lease_withholds_the_dot(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    server = smtp_server_process(mode="starttls", users={"f1": "secret-f1"}, require_auth=True,
                                 rules=[{"stage": "rcpt", "action": "delay", "seconds": 3, "times": 1}])
    prepare(engine, tmp_path, 5)
    run = workers([Account("f1", server, connections=1)])
    # The server holds the first RCPT reply back for 3 s; the session is open long before
    # 1.2 s have passed since the claim, so the worker is stopped while it waits for it.
    second, late = stop_past_the_lease(engine, run, lambda: time.time() >= claimed_at(engine) + 1.2)
    assert (second["sent"], second["stopped_because"]) == (5, "queue empty")
    assert (late["sent"], late["stopped_because"]) == (0, "queue empty")
    counts = delivered({"f1": server})
    assert len(counts) == 5 and set(counts.values()) == {1}
    # The stopped worker's own transaction reached the end of the message, then was reset
    # without the dot; the rest of its claims it never started (their lease was gone).
    fenced = [t for t in server.journal if not t.delivered]
    assert [t.rcpt_to for t in fenced] == [("user00000@example.org",)]
    assert fenced[0].reply is None and fenced[0].end == "disconnected"
    assert fenced[0].started == min(t.started for t in server.journal)
    assert set(states(engine).values()) == {"sent"}
    assert campaign_status(engine) == "finished"


def test_a_worker_stopped_after_its_dot_past_its_lease_cannot_overwrite_unknown(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    server = smtp_server_process(mode="starttls", users={"f2": "secret-f2"}, require_auth=True, rules=[
        {"stage": "data", "action": "delay", "seconds": 1.5, "times": 1},
        {"stage": "dot", "action": "delay", "seconds": 3, "times": 1},
    ])
    prepare(engine, tmp_path, 5)
    run = workers([Account("f2", server, connections=1)])

    def recover_when_the_claims_expire() -> None:
        # Committing `sending` 1.5 s into a 2 s lease renewed it: a recovery past the
        # claim's lease takes back the four untouched claims but not the message whose
        # dot is out and whose worker may yet read the reply.
        wait_until(lambda: time.time() > claimed_at(engine) + 2.05)
        with db.transaction(engine) as connection:
            assert store_deliveries.recover_expired(connection, time.time()) == (4, 0)
        assert in_flight(engine)["sending"] == {"user00000@example.org"}

    # `sending` is committed right before the dot, whose reply the server holds back for 3 s.
    second, late = stop_past_the_lease(engine, run, lambda: in_flight(engine)["sending"],
                                       recover_when_the_claims_expire)
    assert (second["sent"], second["stopped_because"]) == (4, "queue empty")
    assert late["stopped_because"] == "queue empty"
    counts = delivered({"f2": server})
    assert len(counts) == 5 and set(counts.values()) == {1}
    assert len(server.journal) == 5  # the stopped worker started nothing after it resumed
    final = states(engine)
    assert final.pop("user00000@example.org") == "unknown"  # recovered; the late 250 changed nothing
    assert set(final.values()) == {"sent"}
    with engine.connect() as connection:
        code = connection.execute(sa.select(models.deliveries.c.smtp_code).where(
            models.deliveries.c.email_key == "user00000@example.org")).scalar_one()
    assert code is None
    assert campaign_status(engine) == "finished"


# --- 7. SIGTERM ------------------------------------------------------------------------------


def test_sigterm_drains_releases_its_claims_and_a_restart_finishes(
        engine: sa.Engine, workers: MakeWorkers, tmp_path: Path, smtp_server_process: Any) -> None:
    servers = start_servers(smtp_server_process, ["t1", "t2"],
                            rules=[{"stage": "rcpt", "action": "delay", "seconds": 0.2}])
    prepare(engine, tmp_path, 200)
    run = workers([Account(n, s, connections=1) for n, s in servers.items()], lease="5m")
    worker = run.start()
    wait_until(lambda: sum(per_account(servers).values()) >= 4)
    worker.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    report = run.finish(worker, timeout=30)
    assert time.monotonic() - signalled < 30
    assert report["stopped_because"] == "stopped by signal"
    assert sum(per_account(servers).values()) == report["sent"]
    assert Counter(states(engine).values()) == {"sent": report["sent"], "queued": 200 - report["sent"]}
    assert sum(ledger(engine).values()) == report["sent"]  # released claims gave their quota back
    for server in servers.values():
        server.clear_rules()
    rest = run.finish(run.start())
    assert (rest["sent"], rest["stopped_because"]) == (200 - report["sent"], "queue empty")
    counts = delivered(servers)
    assert len(counts) == 200 and set(counts.values()) == {1}
    assert campaign_status(engine) == "finished"
