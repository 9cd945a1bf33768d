"""Import speed: `bulksend import` of a generated CSV against a raw sqlite3 load of the same rows.

    .venv/bin/python bench/import_bench.py [--rows 1000000] [--no-postgres]

Prints rows/s of both, their ratio and bulksend's peak RSS, then the same import into a
throwaway PostgreSQL cluster. The machine is shared, so only the ratio is comparable across
runs. Targets (issue 2): ratio >= 0.3 and peak RSS <= 200 MB on SQLite.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BULKSEND = [sys.executable, "-m", "bulksend"]
FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Irina", "Jonas",
         "Иван", "Мария", "Ольга", "Пётр", "José", "Zoë"]
LAST = ["Ivanova", "Petrov", "Müller", "Smirnova", "García", "Novak", "Кузнецов", "Соколова"]
CITIES = ["Moscow", "Berlin", "Kazan", "Madrid", "Paris", "Riga", "Москва", "Новосибирск"]


def generate(path: Path, rows: int) -> None:
    """A CSV like a real list: a few big providers, a long tail of company domains."""
    rng = random.Random(2026)
    big = ["gmail.com", "yandex.ru", "mail.ru", "outlook.com", "yahoo.com", "icloud.com"]
    tail = [f"company{i}.example.com" for i in range(20_000)]
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["email", "name", "city", "plan"])
        for i in range(rows):
            domain = rng.choice(big) if rng.random() < 0.6 else rng.choice(tail)
            first, last = rng.choice(FIRST), rng.choice(LAST)
            writer.writerow([f"user{i}.{rng.randrange(10**6)}@{domain}", f"{first} {last}",
                             rng.choice(CITIES), rng.choice(("free", "pro", "team"))])


def raw_sqlite(path: Path, db: Path) -> float:
    """Seconds for csv.reader → sqlite3.executemany into one table, WAL + synchronous=FULL."""
    start = time.perf_counter()
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE subscribers (email TEXT, name TEXT, city TEXT, plan TEXT)")
    connection.execute("BEGIN")
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.reader(file)
        next(reader)
        connection.executemany("INSERT INTO subscribers VALUES (?, ?, ?, ?)", reader)
    connection.execute("COMMIT")
    connection.close()
    return time.perf_counter() - start


def timed_raw(path: Path, db: Path) -> tuple[float, float]:
    """(seconds, CPU seconds) of `raw_sqlite`."""
    cpu = time.process_time()
    seconds = raw_sqlite(path, db)
    return seconds, time.process_time() - cpu


def run_measured(argv: list[str], cwd: Path, env: dict[str, str] | None = None
                 ) -> tuple[float, int, float, str]:
    """(seconds, peak RSS in bytes, CPU seconds, stdout) of a child process, via wait4."""
    out_file = tempfile.TemporaryFile(mode="w+")
    err_file = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=cwd, stdout=out_file, stderr=err_file, text=True, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    out_file.seek(0)
    err_file.seek(0)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): {err_file.read().strip()}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, out_file.read()


def run_with_rss(argv: list[str], cwd: Path, env: dict[str, str] | None = None
                 ) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of a child process."""
    elapsed, rss, _, out = run_measured(argv, cwd, env)
    return elapsed, rss, out


def bulksend_import(workdir: Path, database: str, csv_path: Path
                    ) -> tuple[float, int, float, str]:
    """Init a workspace on `database` and time `bulksend import` of the file into it.

    Returns (seconds, peak RSS, CPU seconds of the import and its parsing process, stdout).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bulksend.toml").write_text(f'database = "{database}"\n', encoding="utf-8")
    config = ["--config", str(workdir / "bulksend.toml")]
    subprocess.run([*BULKSEND, *config, "db", "upgrade"], cwd=workdir, check=True,
                   capture_output=True)
    return run_measured([*BULKSEND, *config, "import", str(csv_path), "--list", "bench",
                         "--json"], workdir)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL cluster on loopback (pg_ctl run as `postgres` when we are root)."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
        if not bins:
            raise RuntimeError("no PostgreSQL under /usr/lib/postgresql")
        self.bin = bins[-1]
        self.dir = Path(tempfile.mkdtemp(prefix="bulksend-bench-pg-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")

    def _pg(self, *argv: str) -> None:
        subprocess.run([*self.as_postgres, *argv], check=True, capture_output=True, cwd="/")

    def start(self) -> str:
        """Initialise and start the cluster; returns a URL of an empty database."""
        data = self.dir / "data"
        self._pg(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
        self._pg(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w",
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        self._pg(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", "postgres", "bench")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/bench"

    def stop(self) -> None:
        """Stop the cluster and delete its files."""
        subprocess.run([*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"),
                        "-m", "fast", "stop"], capture_output=True, cwd="/")
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bulksend-bench-"))
    try:
        csv_path = tmp / "subscribers.csv"
        generate(csv_path, args.rows)
        size_mb = csv_path.stat().st_size / 1e6
        print(f"input: {args.rows:,} rows, {size_mb:.1f} MB ({csv_path.name})")
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
              "(other work on the machine slows the two-process import more than the raw insert)")
        # The raw load runs before and after the import and the ratio uses their mean: on a
        # shared machine the load often changes while the import runs.
        raw_before, raw_cpu = timed_raw(csv_path, tmp / "raw1.db")
        ours_s, rss, ours_cpu, out = bulksend_import(
            tmp / "sqlite", f"sqlite:///{tmp / 'sqlite' / 'b.db'}", csv_path)
        raw_after, _ = timed_raw(csv_path, tmp / "raw2.db")
        raw_s = (raw_before + raw_after) / 2
        raw_rate, ours_rate = args.rows / raw_s, args.rows / ours_s
        print(f"raw sqlite3 executemany: {raw_rate:10,.0f} rows/s ({raw_before:.1f} s before, "
              f"{raw_after:.1f} s after the import; CPU {raw_cpu:.1f} s = "
              f"{raw_cpu / args.rows * 1e6:.1f} µs/row)")
        print(f"bulksend import, SQLite: {ours_rate:10,.0f} rows/s ({ours_s:.1f} s, CPU {ours_cpu:.1f} s = "
              f"{ours_cpu / args.rows * 1e6:.1f} µs/row in both processes, start-up included), "
              f"peak RSS {rss / 2**20:.0f} MiB")
        print(f"ratio bulksend/raw:      {ours_rate / raw_rate:10.2f}   (target >= 0.3; RSS <= 200 MB); "
              f"CPU ratio {raw_cpu / ours_cpu:.2f}")
        print(f"  report: {out.strip()}")
        if not args.no_postgres:
            pg = Postgres()
            try:
                url = pg.start()
                pg_s, pg_rss, _, pg_out = bulksend_import(tmp / "pg", url, csv_path)
                print(f"bulksend import, PostgreSQL: {args.rows / pg_s:10,.0f} rows/s ({pg_s:.1f} s), "
                      f"peak RSS {pg_rss / 2**20:.0f} MiB, ratio to raw sqlite3 "
                      f"{(args.rows / pg_s) / raw_rate:.2f}")
                print(f"  report: {pg_out.strip()}")
            finally:
                pg.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
