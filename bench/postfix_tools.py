"""Postfix's `smtp-sink` and `smtp-source` for benchmarks, unpacked from the Debian package.

    tools = PostfixTools.fetch()            # apt-get download postfix + dpkg -x, cached
    with tools.sink() as port:              # smtp-sink on 127.0.0.1:port, stopped on exit
        seconds = tools.source(port, messages=20_000, sessions=10, length=8_000)

Nothing is installed system-wide and no Postfix service is started: the two test programs
run straight from the unpacked tree with LD_LIBRARY_PATH pointing at its private libraries.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bulksend-bench" / "postfix"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostfixTools:
    """The unpacked package: paths to the binaries and the environment they need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sink_bin = root / "usr" / "sbin" / "smtp-sink"
        self.source_bin = root / "usr" / "sbin" / "smtp-source"
        self.env = {**os.environ, "LD_LIBRARY_PATH": str(root / "usr" / "lib" / "postfix")}

    @property
    def version(self) -> str:
        """The unpacked package's version, from its .deb's name."""
        debs = sorted(self.root.parent.glob("postfix_*.deb"))
        return debs[-1].name.split("_")[1] if debs else "unknown"

    @classmethod
    def fetch(cls, cache: Path = CACHE) -> PostfixTools:
        """Download (once) and unpack the postfix .deb under `cache`."""
        root = cache / "root"
        tools = cls(root)
        if tools.sink_bin.exists() and tools.source_bin.exists():
            return tools
        cache.mkdir(parents=True, exist_ok=True)
        debs = sorted(cache.glob("postfix_*.deb"))
        if not debs:
            if shutil.which("apt-get") is None:
                raise SystemExit("apt-get not found: smtp-sink/smtp-source come from Debian's postfix")
            download = ["apt-get", "download", "postfix"]
            if subprocess.run(download, cwd=cache, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update"], check=True, capture_output=True)
                subprocess.run(download, cwd=cache, check=True, capture_output=True)
            debs = sorted(cache.glob("postfix_*.deb"))
        staging = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
        try:
            subprocess.run(["dpkg", "-x", str(debs[-1]), str(staging)], check=True, capture_output=True)
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return tools

    @contextmanager
    def sink(self, port: int | None = None) -> Iterator[int]:
        """smtp-sink on 127.0.0.1 (many parallel sessions, no delays); yields its port."""
        port = port or _free_port()
        argv = [str(self.sink_bin)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # it refuses to run as root otherwise
        # -m: up to 1024 simultaneous sessions (default 256); no -w/-W/-H: replies at once.
        argv += ["-m", "1024", f"127.0.0.1:{port}", "1024"]
        log = tempfile.TemporaryFile()
        process = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 10
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"smtp-sink exited ({process.returncode}): "
                                     f"{log.read().decode(errors='replace').strip()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("smtp-sink did not start listening within 10 s") from None
                    time.sleep(0.02)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()

    def source(self, port: int, *, messages: int, sessions: int, length: int,
               sender: str = "a@example.com", recipient: str = "b@example.org") -> float:
        """Seconds for `smtp-source -d -s SESSIONS -m MESSAGES -l LENGTH` into the sink."""
        argv = [str(self.source_bin), "-d", "-s", str(sessions), "-m", str(messages),
                "-l", str(length), "-f", sender, "-t", recipient, f"127.0.0.1:{port}"]
        start = time.perf_counter()
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"smtp-source failed ({done.returncode}): {done.stderr.strip()}")
        return seconds
