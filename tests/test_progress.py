"""The live send view: plain lines in a log, bars on a terminal, the sender in its thread."""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Mapping

import pytest
from rich.console import Console

from bulksend import progress
from bulksend.config import AccountConfig
from bulksend.durations import parse_limit
from bulksend.progress import AccountLine, SendProgress, describe_state, run_with_progress
from bulksend.sender import Report

ACCOUNTS = [AccountLine("isp", 3, "3/minute"), AccountLine("relay", None, "")]


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120, markup=False), buffer


def report(sent_by: dict[str, int]) -> Report:
    by_account = Counter(sent_by)
    return Report(sent=sum(by_account.values()), by_account=by_account)


def test_account_line_ends_at_the_tightest_limit() -> None:
    account = AccountConfig.__new__(AccountConfig)
    object.__setattr__(account, "name", "isp")
    object.__setattr__(account, "limits", (parse_limit("100/hour"), parse_limit("5/minute")))
    assert AccountLine.of(account) == AccountLine("isp", 5, parse_limit("5/minute").text)
    object.__setattr__(account, "limits", ())
    assert AccountLine.of(account) == AccountLine("isp", None, "")


def test_describe_state_counts_down_and_forgets_an_expired_rest() -> None:
    assert describe_state("cooldown", 160.0, 100.0) == "cooldown 60 s"
    assert describe_state("exhausted", 90.0, 100.0) == "active"
    assert describe_state("disabled", None, 100.0) == "disabled"


def test_plain_view_prints_a_line_per_interval_only_when_something_moved() -> None:
    out, buffer = console(terminal=False)
    with SendProgress(out, 10, ACCOUNTS, plain_every=0.0, plain_final=False) as view:
        view.update(report({"isp": 3, "relay": 1}), {"isp": "active", "relay": "active"})
        view.update(report({"isp": 3, "relay": 1}), {"isp": "active", "relay": "active"})
        view.update(report({"isp": 3, "relay": 4}), {"isp": "cooldown 5 s"}, final=True)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "sent 4 of 10" in lines[0] and "isp 3 (at its limit)" in lines[0]
    assert "relay 1" in lines[0]
    assert "sent 7 of 10" in lines[1] and "isp 3 (cooldown 5 s)" in lines[1]
    assert "\x1b" not in buffer.getvalue()  # no escape codes in a log


def test_plain_view_waits_for_the_interval() -> None:
    out, buffer = console(terminal=False)
    with SendProgress(out, None, ACCOUNTS, plain_every=3600.0, plain_final=False) as view:
        view.update(report({"isp": 1}), {})
        view.update(report({"isp": 2}), {}, final=True)
    assert buffer.getvalue() == ""
    with SendProgress(out, None, ACCOUNTS, plain_every=3600.0) as view:
        view.update(report({"isp": 2}), {}, final=True)
    assert "sent 2," in buffer.getvalue() and " of " not in buffer.getvalue()


def test_terminal_view_draws_bars_and_grows_the_total() -> None:
    out, buffer = console(terminal=True)
    with SendProgress(out, 2, ACCOUNTS) as view:
        view.update(report({"isp": 3, "relay": 2}), {"isp": "active"})
        assert view.total == 5  # a campaign started meanwhile: the bar never overflows
    text = buffer.getvalue()
    assert "5 of 5" in text and "3 of 3/minute" in text and "2, no limit" in text


class FakeWorker:
    def __init__(self) -> None:
        self.report = Report()
        self.stop = threading.Event()


def test_run_with_progress_returns_the_report_and_keeps_updating() -> None:
    worker = FakeWorker()
    states_read = []

    def run() -> Report:
        for _ in range(3):
            worker.report.sent += 1
            worker.report.by_account["isp"] += 1
            time.sleep(0.15)
        return worker.report

    out, buffer = console(terminal=False)
    view = SendProgress(out, 3, ACCOUNTS, plain_every=0.0)
    result = run_with_progress(worker, view, run, lambda: states_read.append(1) or {})
    assert result.sent == 3 and worker.stop.is_set()
    assert states_read and "sent 3 of 3" in buffer.getvalue()


def test_run_with_progress_reraises_the_senders_error_in_the_caller() -> None:
    worker = FakeWorker()

    def run() -> Report:
        raise RuntimeError("store gone")

    out, _ = console(terminal=False)
    with pytest.raises(RuntimeError, match="store gone"):
        run_with_progress(worker, SendProgress(out, 1, ACCOUNTS), run, dict)
    assert worker.stop.is_set()


class CountingView(SendProgress):
    """A view that lets the sender finish only after `updates` loop passes."""

    def __init__(self, updates: int) -> None:
        out, _ = console(terminal=False)
        super().__init__(out, 1, ACCOUNTS)
        self.passes = 0
        self.enough = threading.Event()
        self.updates = updates

    def update(self, report: Report, states: Mapping[str, str], final: bool = False) -> None:
        if not final:
            self.passes += 1
            if self.passes >= self.updates:
                self.enough.set()


@pytest.mark.parametrize("step", [0.0, 0.5])
def test_states_are_read_at_most_every_half_second(monkeypatch: pytest.MonkeyPatch,
                                                   step: float) -> None:
    # At least ten passes of the view loop; the clock moves `step` seconds at each reading.
    monkeypatch.setattr(progress, "REFRESH", 0.001)
    worker, view, reads = FakeWorker(), CountingView(10), []
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    def run() -> Report:
        view.enough.wait(30)
        return Report()

    run_with_progress(worker, view, run, lambda: reads.append(1) or {}, clock)
    loop_reads = len(reads) - 1  # the last one is the final, unconditional read
    assert view.passes >= 10
    # A still clock: read once, never again; half a second a reading: read on every pass.
    assert loop_reads == (1 if step == 0.0 else view.passes)
