"""`bulksend demo` end to end (issue 4, acceptance 8): exit code, summary, nothing left behind.

The demo runs in a subprocess the way a user runs it, from an empty directory with its
own TMPDIR, so the test can see that the process finishes, leaves no temporary workspace
and no listening server, and prints a summary whose numbers agree with each other: every
valid subscriber of the sample list sent once, per-account counts that add up and match
what each server accepted, the failing provider routed around, the 40/minute account
stopped at its limit. One more run in-process keeps its workspace (`workdir`), which
the real CLI must then be able to read.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from bulksend import cli, demo

# The one place that says how the demo is started (it becomes `bulksend demo` in the CLI).
DEMO_COMMAND = [sys.executable, "-m", "bulksend", "demo"]  # what the README's first command runs
ACCOUNTS = ("mailbox", "isp", "vps-relay")
VALID_SUBSCRIBERS = 201  # bulksend/data/sample_subscribers.csv: 204 rows, 1 duplicate, 2 invalid
TIME_LIMIT = 60.0  # the promise: under a minute


@dataclass(frozen=True)
class DemoRun:
    """One finished run: the process, how long it took, its cwd and its TMPDIR."""

    done: subprocess.CompletedProcess[str]
    seconds: float
    cwd: Path
    tmpdir: Path

    @property
    def out(self) -> str:
        """Its stdout."""
        return self.done.stdout


def run_demo(tmp_path: Path) -> DemoRun:
    """Run the demo as a user would, in an empty cwd with a private TMPDIR."""
    cwd, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(TMPDIR=str(tmpdir), COLUMNS="80", NO_COLOR="1")  # a plain 80-column log
    started = time.monotonic()
    done = subprocess.run(DEMO_COMMAND, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIME_LIMIT + 30)
    return DemoRun(done, time.monotonic() - started, cwd, tmpdir)


def section(output: str, number: int) -> list[str]:
    """The non-empty lines of step `number` ("6. Accounts ..." up to the next step)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{number}. "))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\d+\. ", lines[i])
                or lines[i].startswith("Done in")), len(lines))
    return [line for line in lines[start + 1:end] if line.strip()]


def table(lines: list[str]) -> dict[str, list[str]]:
    """The rows of a borderless table, one per account, as {account: the other cells}."""
    rows = {cells[0]: cells[1:] for cells in map(str.split, lines)
            if cells and cells[0] in ACCOUNTS}
    assert set(rows) == set(ACCOUNTS), lines  # one line per row: nothing wrapped at 80 columns
    return rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """One subprocess run shared by the checks below (it takes a few seconds)."""
    return run_demo(tmp_path_factory.mktemp("demo"))


def test_demo_exits_0_quickly_and_quietly(demo_run: DemoRun) -> None:
    assert demo_run.done.returncode == 0, demo_run.out + demo_run.done.stderr
    assert demo_run.done.stderr == ""  # no warning, no log noise from the servers
    assert demo_run.seconds < TIME_LIMIT
    assert "\x1b[" not in demo_run.out  # not a terminal: plain lines, no escape codes
    assert re.search(r"^Done in \d+\.\d s: servers stopped, workspace removed\.$",
                     demo_run.out, re.M)


def test_every_valid_subscriber_is_sent_exactly_once(demo_run: DemoRun) -> None:
    out, n = demo_run.out, VALID_SUBSCRIBERS
    assert f"imported {n}, updated 0, skipped 0, duplicates 1, invalid 2" in out
    assert f"campaign 'newsletter' running: {n} queued, 0 suppressed, signed d=example.com" in out
    assert f"sent {n} of {n}, failed 0, deferred 0, unknown 0; stopped: queue empty" in out
    campaign = section(out, 7)
    assert campaign[0] == "campaign newsletter: finished, list news"
    assert campaign[1] == f"deliveries: total {VALID_SUBSCRIBERS}, sent {VALID_SUBSCRIBERS}"
    assert (f"{VALID_SUBSCRIBERS} messages for {VALID_SUBSCRIBERS} different recipients, "
            f"{VALID_SUBSCRIBERS} DKIM-signed: everyone got exactly one.") in out


def test_per_account_counts_add_up_and_match_the_servers(demo_run: DemoRun) -> None:
    out = demo_run.out
    by_account = {m[1]: int(m[2]) for m in re.finditer(r"^  (\S+): (\d+) sent$", out, re.M)}
    assert set(by_account) == set(ACCOUNTS)
    assert sum(by_account.values()) == VALID_SUBSCRIBERS
    accounts = table(section(out, 6))  # account, state..., limits..., sent, failed
    assert {name: int(cells[-2]) for name, cells in accounts.items()} == by_account
    servers = table(section(out, 8))  # server, connections, accepted, DKIM-signed, 421 replies
    assert {name: int(cells[1]) for name, cells in servers.items()} == by_account
    assert all(cells[1] == cells[2] for cells in servers.values())  # every message signed


def test_the_failing_provider_is_routed_around_and_limits_hold(demo_run: DemoRun) -> None:
    out = demo_run.out
    accounts = table(section(out, 6))
    servers = table(section(out, 8))
    assert accounts["isp"][0] == "cooldown"  # "cooldown 118 s"
    assert int(servers["isp"][3]) > 0  # it did answer 421
    assert "421 4.3.2 try again later" in out  # its last error is shown
    sent = {name: int(cells[-2]) for name, cells in accounts.items()}
    assert sent["isp"] < sent["mailbox"] < sent["vps-relay"]  # the others took its share
    assert "40 of 40/minute" in " ".join(accounts["mailbox"])  # at its limit, not past it
    assert sent["mailbox"] == 40


def test_nothing_is_left_behind(demo_run: DemoRun) -> None:
    assert list(demo_run.tmpdir.iterdir()) == []  # the temporary workspace is gone
    assert list(demo_run.cwd.iterdir()) == []  # and nothing was written where the user stood
    servers = "\n".join(section(demo_run.out, 1))
    ports = [int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", servers)]
    assert len(ports) == 3
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_in_process_with_a_kept_workdir_that_the_cli_can_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buffer, errors = io.StringIO(), io.StringIO()
    before = set(threading.enumerate())
    code = demo.run(Console(file=buffer, soft_wrap=True), Console(file=errors, soft_wrap=True),
                    workdir=tmp_path / "ws")
    assert code == 0, buffer.getvalue() + errors.getvalue()
    assert f"workspace kept in {tmp_path / 'ws'}" in buffer.getvalue()
    # The servers' loop, the sender and its lanes have ended (smtp's watchdog is per process).
    assert {t.name for t in set(threading.enumerate()) - before} <= {"bulksend-smtp-watchdog"}
    config_path = tmp_path / "ws" / "bulksend.toml"
    assert (tmp_path / "ws" / "bulksend.db").exists()
    capsys.readouterr()
    assert cli.run(["--config", str(config_path), "campaign", "show", "newsletter", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "finished"
    assert shown["total"] == shown["sent"] == VALID_SUBSCRIBERS
    assert sum(shown["by_account"].values()) == VALID_SUBSCRIBERS


def test_a_workdir_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "bulksend.toml").write_text("# someone's real workspace\n", encoding="utf-8")
    buffer, errors = io.StringIO(), io.StringIO()
    code = demo.run(Console(file=buffer, soft_wrap=True), Console(file=errors, soft_wrap=True),
                    workdir=tmp_path)
    assert code == 1
    assert errors.getvalue() == (f"bulksend demo: {tmp_path}: not empty; "
                                 "the demo needs a new directory\n")
    assert buffer.getvalue() == "" and [p.name for p in tmp_path.iterdir()] == ["bulksend.toml"]
