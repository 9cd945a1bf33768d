"""A fault-injecting SMTP server on 127.0.0.1 for bulksend's tests, in-process or as a process.

Built on aiosmtpd. It speaks plain SMTP, STARTTLS or implicit TLS with the session's test
certificate (fixture `tls_files`), offers AUTH PLAIN and LOGIN for a dict of accounts,
follows a fault script that can change while it runs (the rule language is documented in
tests.support.smtpfaults) and journals every mail transaction as the tests' ground truth
(tests.support.smtpjournal). Sessions live in tests.support.smtpprotocol.

The fixtures are factories; whatever they start is stopped (or killed) at teardown:

    def test_unknown_recipient_is_refused(smtp_server):
        server = smtp_server(mode="starttls", users={"u": "p"}, rules=[
            {"stage": "rcpt", "address": "nobody@example.test", "reply": "550 5.1.1 user unknown"},
            {"stage": "mail", "times": 2, "reply": "451 4.7.1 rate limited"},
        ])
        with smtplib.SMTP(server.host, server.port, timeout=5) as client:
            client.starttls(context=server.client_context())
            client.login("u", "p")
            ...
        assert server.delivered_to("b@example.test") == 1
        server.set_rules([])  # healthy again; counts start afresh on every set_rules

`smtp_server_process(...)` takes the same arguments (those of `ServerSpec`) and runs
`python -m tests.support.smtpserver --spec spec.json` from the repository root: a server
that stays up while a sender is killed, that can itself be killed with SIGKILL and started
again on the same port, whose journal is read back from its fsynced file, and that stops
cleanly on SIGTERM. SIGHUP makes it reread the rules in its spec file (`set_rules`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import TlsFiles
from tests.support.smtpfaults import FaultScript, Rule, parse_rules
from tests.support.smtpjournal import JournalQueries, Transaction, read_journal
from tests.support.smtpprotocol import HOST, ServerSpec, ServerState, listen, shutdown

__all__ = [
    "FaultScript", "Rule", "ServerProcess", "ServerSpec", "SmtpServer", "Transaction",
    "main", "parse_rules", "read_journal", "smtp_server", "smtp_server_process",
]

_REPO = Path(__file__).resolve().parents[2]
RulesArg = Iterable[Rule | Mapping[str, Any]]


class _Endpoint(JournalQueries):
    """Where a test server listens and how a client comes to trust it."""

    host = HOST

    def __init__(self, ca_file: Path | None) -> None:
        self.port = 0
        self.ca_file = ca_file

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only the test CA."""
        if self.ca_file is None:
            raise RuntimeError("this server was built without a CA file")
        return ssl.create_default_context(cafile=str(self.ca_file))


class SmtpServer(_Endpoint):
    """The test server on an event loop in a thread of this process; journal in memory."""

    def __init__(self, spec: ServerSpec, ca_file: Path | None = None) -> None:
        super().__init__(ca_file)
        self.spec = spec
        self.state = ServerState(spec)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def journal(self) -> list[Transaction]:
        """Every transaction so far, oldest first."""
        return self.state.journal.records()

    @property
    def connections(self) -> int:
        """How many connections the server has accepted."""
        return self.state.connections

    def set_rules(self, rules: RulesArg) -> None:
        """Replace the fault script while the server runs; counts start afresh."""
        self.state.faults.set_rules(rules)

    def clear_rules(self) -> None:
        """Behave normally from now on."""
        self.set_rules(())

    def start(self, timeout: float = 5.0) -> SmtpServer:
        """Listen on 127.0.0.1 (port from the spec, 0 for any free one)."""
        if self._thread is not None:
            raise RuntimeError(f"SMTP test server already listening on port {self.port}")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, errors), name="smtp-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"SMTP test server did not listen within {timeout} s")
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        try:
            server = loop.run_until_complete(listen(self.state))
        except BaseException as error:  # handed to start(), which raises it in the test
            errors.append(error)
            ready.set()
            loop.close()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
            loop.run_until_complete(shutdown(server, self.state))
        finally:
            loop.close()

    def stop(self) -> None:
        """Cut every session (open transactions are journaled) and stop listening."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None


class ServerProcess(_Endpoint):
    """The test server in a child process; its journal is read back from the fsynced file."""

    def __init__(self, spec: ServerSpec, workdir: Path, ca_file: Path | None = None) -> None:
        super().__init__(ca_file)
        workdir.mkdir(parents=True, exist_ok=True)
        self.spec_path = workdir / "spec.json"
        self.log_path = workdir / "server.log"  # the child's stdout and stderr
        self.journal_path = Path(spec.journal_path) if spec.journal_path else workdir / "journal.jsonl"
        self.spec = replace(spec, journal_path=str(self.journal_path), port_file=str(workdir / "port"))
        self.process: subprocess.Popen[bytes] | None = None
        self._reloads = 0

    @property
    def journal(self) -> list[Transaction]:
        """Every transaction in the journal file, oldest first."""
        return read_journal(self.journal_path)

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 10.0) -> ServerProcess:
        """Start the child; after kill() or terminate() it comes back on the same port and journal."""
        if self.running:
            raise RuntimeError(f"SMTP test server already running as pid {self.pid}")
        port_file = Path(str(self.spec.port_file))
        port_file.unlink(missing_ok=True)
        _ack_path(self.spec_path).unlink(missing_ok=True)
        self._reloads = 0
        _write_atomically(self.spec_path, json.dumps(self.spec.to_json(), indent=2))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.smtpserver", "--spec", str(self.spec_path)],
                cwd=_REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        self.port = int(self._wait(lambda: port_file.read_text() if port_file.exists() else None, timeout))
        self.spec = replace(self.spec, port=self.port)  # a restart listens where clients expect it
        return self

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM: the server cuts its sessions, closes the journal and exits; its exit code."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, like a crash: only what was fsynced survives."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=5)

    def set_rules(self, rules: RulesArg, timeout: float = 5.0) -> None:
        """Replace the fault script of the running child (SIGHUP); returns once it is in force."""
        assert self.process is not None
        self.spec = self.spec.with_rules(rules)
        _write_atomically(self.spec_path, json.dumps(self.spec.to_json(), indent=2))
        self._reloads += 1
        self.process.send_signal(signal.SIGHUP)
        ack = _ack_path(self.spec_path)
        self._wait(lambda: ack.exists() and int(ack.read_text()) >= self._reloads or None, timeout)

    def clear_rules(self) -> None:
        """Behave normally from now on."""
        self.set_rules(())

    def _wait(self, probe: Callable[[], Any], timeout: float) -> Any:
        """Poll `probe` until it returns something, failing early if the child has died."""
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result:
                return result
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-3000:]
                self.kill()
                raise RuntimeError(f"SMTP test server (exit {self.process.returncode}) did not answer:\n{log}")
            time.sleep(0.005)


def _write_atomically(path: Path, text: str) -> None:
    """Write via a rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _ack_path(spec_path: Path) -> Path:
    """Where the child counts the SIGHUP reloads it has done."""
    return spec_path.with_name(spec_path.name + ".reloaded")


async def _serve(spec: ServerSpec, spec_path: Path) -> None:
    state = ServerState(spec)
    server = await listen(state)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloads = 0

    def reload_rules() -> None:
        nonlocal reloads
        state.faults.set_rules(ServerSpec.from_json(json.loads(spec_path.read_text())).rules)
        reloads += 1
        _write_atomically(_ack_path(spec_path), str(reloads))

    # Installed before the port file appears: SIGHUP's default action would kill us.
    loop.add_signal_handler(signal.SIGHUP, reload_rules)
    port = server.sockets[0].getsockname()[1]
    if spec.port_file:
        _write_atomically(Path(spec.port_file), str(port))
    print(f"listening on {HOST}:{port}", flush=True)
    await stop.wait()
    await shutdown(server, state)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a server from a spec file until SIGTERM or SIGINT; SIGHUP rereads its rules."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.smtpserver",
        description="Fault-injecting SMTP test server on 127.0.0.1.",
    )
    parser.add_argument("--spec", type=Path, required=True, help="JSON file with the fields of ServerSpec")
    args = parser.parse_args(argv)
    spec = ServerSpec.from_json(json.loads(args.spec.read_text()))
    asyncio.run(_serve(spec, args.spec))
    return 0


def _spec(tls_files: TlsFiles, options: dict[str, Any]) -> ServerSpec:
    return ServerSpec(**{"cert_file": str(tls_files.cert_file), "key_file": str(tls_files.key_file), **options})


@pytest.fixture
def smtp_server(tls_files: TlsFiles) -> Iterator[Callable[..., SmtpServer]]:
    """Factory of started in-process test servers: `smtp_server(mode=..., users=..., rules=...)`."""
    servers: list[SmtpServer] = []

    def start(**options: Any) -> SmtpServer:
        server = SmtpServer(_spec(tls_files, options), ca_file=tls_files.ca_file).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def smtp_server_process(tls_files: TlsFiles, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory of started test servers in child processes, same arguments as `smtp_server`."""
    processes: list[ServerProcess] = []

    def start(**options: Any) -> ServerProcess:
        workdir = tmp_path / f"smtp-server-{len(processes)}"
        process = ServerProcess(_spec(tls_files, options), workdir, ca_file=tls_files.ca_file)
        processes.append(process)  # before start(), so a half-started child is killed too
        return process.start()

    yield start
    for process in processes:
        process.kill()


if __name__ == "__main__":
    sys.exit(main())
