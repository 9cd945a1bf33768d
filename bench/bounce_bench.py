"""Bounce processing speed: `bulksend bounces import` of a maildir of mixed bounces, then one-click.

    .venv/bin/python bench/bounce_bench.py [--messages 10000] [--postgres] [--no-oneclick]

Sets up a throwaway workspace (SQLite; with --postgres also a throwaway PostgreSQL cluster):
N subscribers, a started campaign, its deliveries marked sent. Writes a maildir of N bounce
messages, one per delivery, tied to it by tokens made with the workspace's secret, mixed as
a bounce mailbox really is:

    35 % hard DSN 5.1.1   15 % soft DSN 4.2.2   15 % delay warnings   10 % ARF complaints
    15 % vacation replies 10 % mailto unsubscribes

and times `bulksend bounces import MAILDIR --json` as a child process (start to exit, peak
RSS, CPU via wait4): every message parsed, applied and committed (in batches of up to 100
messages, as `bounces fetch` commits). The counts it prints must match the mix exactly, and
the store must hold one event per message of each kind (delay warnings too). For scale,
the same files are read and parsed by the stdlib `email` parser alone in another child
process (the floor any parser stands on); the ratio is what stays comparable on this
shared machine. Target (issue 5):
>= 1,000 messages/s. Then bench/oneclick.py's `run(workdir)` measures one-click POSTs/s
against `bulksend serve` (target >= 500/s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from import_bench import BULKSEND, ROOT, Postgres, run_measured

sys.path.insert(0, str(ROOT))  # the message builders are shared with the tests

from bulksend import tokens  # noqa: E402
from tests.support import bounce_mail  # noqa: E402

SECRET = "bench-secret-0123456789abcdef"
HTML = '<p>Hello {{ name }}</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
MIX = (("hard", 35), ("soft", 15), ("delayed", 15), ("complaint", 10), ("vacation", 15),
       ("unsubscribe", 10))
STDLIB_PARSE = """
import email, os, sys, time
from email.policy import compat32
root = sys.argv[1]
count = 0
for sub in ("new", "cur"):
    for name in sorted(os.listdir(os.path.join(root, sub))):
        with open(os.path.join(root, sub, name), "rb") as file:
            message = email.message_from_bytes(file.read(), policy=compat32)
        for part in message.walk():
            part.get_payload(decode=True)
        count += 1
print(count)
"""


def bench_env() -> dict[str, str]:
    """The environment of every bulksend child: the token secret."""
    return {**os.environ, "BULKSEND_SECRET": SECRET}


def cli(workdir: Path, *args: str | Path) -> str:
    """Run one setup command of bulksend in the workspace; its stdout."""
    done = subprocess.run([*BULKSEND, "--config", str(workdir / "bulksend.toml"), *map(str, args)],
                          cwd=workdir, env=bench_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bulksend {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return done.stdout


def prepare(workdir: Path, database: str, count: int) -> list[tuple[int, str]]:
    """A workspace with `count` sent deliveries; returns (delivery id, address) of each."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bulksend.toml").write_text(
        f'database = "{database}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        'unsubscribe_url = "https://example.com/u"\nunsubscribe_mailto = "unsubscribe@example.com"\n',
        encoding="utf-8")
    (workdir / "list.csv").write_text(
        "email\n" + "".join(f"user{i:06d}@example.org\n" for i in range(count)), encoding="utf-8")
    (workdir / "n.html").write_text(HTML, encoding="utf-8")
    cli(workdir, "db", "upgrade")
    cli(workdir, "import", workdir / "list.csv", "--list", "bench")
    cli(workdir, "campaign", "create", "bench", "--list", "bench", "--subject", "News",
        "--html", workdir / "n.html")
    cli(workdir, "campaign", "start", "bench", "--no-dkim")
    return mark_sent(database)


def mark_sent(database: str) -> list[tuple[int, str]]:
    """As if the campaign had gone out: every delivery `sent` (setup, not measured)."""
    import sqlalchemy as sa

    from bulksend import db, models

    engine = db.create_engine(database)
    try:
        with engine.begin() as connection:
            connection.execute(sa.update(models.deliveries).values(state="sent", sent_at=0.0,
                                                                   account="bench"))
            return [(row.id, row.email) for row in connection.execute(
                sa.select(models.deliveries.c.id, models.deliveries.c.email)
                .order_by(models.deliveries.c.id))]
    finally:
        engine.dispose()


def message_for(kind: str, delivery_id: int, email: str) -> bytes:
    """One bounce of `kind` answering the delivery."""
    secret = SECRET.encode()
    bounce = tokens.make_token(secret, tokens.BOUNCE, delivery_id)
    verp = tokens.verp_address("bounces@example.com", bounce)
    if kind in ("hard", "soft", "delayed"):
        status = {"hard": "5.1.1", "soft": "4.2.2", "delayed": "4.4.7"}[kind]
        return bounce_mail.dsn(to=verp, recipient=email, status=status, delivery_token=bounce,
                               action="delayed" if kind == "delayed" else "failed")
    if kind == "complaint":
        return bounce_mail.arf(to="fbl@example.com", recipient=email, delivery_token=bounce)
    if kind == "vacation":
        return bounce_mail.vacation(sender=email, to=verp)
    unsubscribe = tokens.make_token(secret, tokens.UNSUBSCRIBE, delivery_id)
    return bounce_mail.mailto_unsubscribe(
        sender=email, to=tokens.verp_address("unsubscribe@example.com", unsubscribe))


def write_maildir(root: Path, deliveries: list[tuple[int, str]]) -> dict[str, int]:
    """One message per delivery into root/new, kinds shuffled by MIX; how many of each."""
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    kinds = [kind for kind, share in MIX for _ in range(share)]
    rng = random.Random(2026)
    written: dict[str, int] = dict.fromkeys((kind for kind, _ in MIX), 0)
    for number, (delivery_id, email) in enumerate(deliveries):
        kind = rng.choice(kinds)
        written[kind] += 1
        (root / "new" / f"{1764300000 + number}.M{number}P1.bench").write_bytes(
            message_for(kind, delivery_id, email))
    return written


def expected_counts(written: dict[str, int]) -> dict[str, int]:
    """What `bounces import` must report for the mix (every message answers a distinct delivery)."""
    return {"messages": sum(written.values()), "hard": written["hard"], "soft": written["soft"],
            "complaints": written["complaint"], "unsubscribes": written["unsubscribe"],
            "ignored": written["delayed"] + written["vacation"], "quarantined": 0,
            "suppressed": written["hard"] + written["complaint"]}


def measure(workdir: Path, database: str, maildir: Path, written: dict[str, int]
            ) -> dict[str, Any]:
    """Time `bounces import` in a child process; check its counts and the recorded events."""
    seconds, rss, cpu, out = run_measured(
        [*BULKSEND, "--config", str(workdir / "bulksend.toml"), "bounces", "import", str(maildir),
         "--json"], workdir, bench_env())
    counts = json.loads(out)
    if counts != expected_counts(written):
        raise SystemExit(f"counts differ from the mix: got {counts}, expected {expected_counts(written)}")
    recorded, expected = recorded_events(database), expected_events(written)
    if recorded != expected:
        raise SystemExit(f"recorded events differ from the mix: got {recorded}, "
                         f"expected {expected}")
    return {"seconds": seconds, "rss": rss, "cpu": cpu, "counts": counts}


def expected_events(written: dict[str, int]) -> dict[str, int]:
    """Events per kind the mix must leave in bounce_events (vacation replies record nothing)."""
    return {kind: written[kind] for kind in ("hard", "soft", "delayed", "complaint", "unsubscribe")}


def recorded_events(database: str) -> dict[str, int]:
    """Events per kind in the store, each tied to a delivery."""
    import sqlalchemy as sa

    from bulksend import db, models

    table = models.bounce_events
    engine = db.create_engine(database)
    try:
        with engine.connect() as connection:
            return dict(connection.execute(
                sa.select(table.c.kind, sa.func.count()).where(table.c.delivery_id.is_not(None))
                .group_by(table.c.kind)).all())
    finally:
        engine.dispose()


def stdlib_floor(maildir: Path) -> float:
    """Seconds for the stdlib parser alone to read and decode every file (a child process)."""
    seconds, _, _, _ = run_measured([sys.executable, "-c", STDLIB_PARSE, str(maildir)], maildir)
    return seconds


def sqlite_commit_floor(path: Path, count: int) -> float:
    """Seconds for `count` one-row commits into SQLite, WAL + synchronous=FULL."""
    import time

    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    start = time.perf_counter()
    for i in range(count):
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("INSERT INTO t (v) VALUES (?)", (str(i),))
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - start
    connection.close()
    return elapsed


def report(label: str, figures: dict[str, Any], count: int, floor_s: float) -> None:
    rate = count / figures["seconds"]
    print(f"bulksend bounces import, {label}: {rate:8,.0f} messages/s ({figures['seconds']:.1f} s, "
          f"CPU {figures['cpu']:.1f} s = {figures['cpu'] / count * 1000:.2f} ms/message, "
          f"peak RSS {figures['rss'] / 2**20:.0f} MiB; target >= 1,000/s)")
    print(f"  ratio to the stdlib parse floor: {rate / (count / floor_s):.2f}")
    print(f"  report: {json.dumps(figures['counts'])}")


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--no-oneclick", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bulksend-bounce-bench-"))
    try:
        work = tmp / "sqlite"
        deliveries = prepare(work, f"sqlite:///{work / 'b.db'}", args.messages)
        maildir = tmp / "Maildir"
        written = write_maildir(maildir, deliveries)
        size_mb = sum(f.stat().st_size for f in (maildir / "new").iterdir()) / 1e6
        print(f"input: maildir of {args.messages:,} bounces, {size_mb:.1f} MB: "
              + ", ".join(f"{kind} {n}" for kind, n in written.items()))
        floor_s = stdlib_floor(maildir)
        commit_s = sqlite_commit_floor(tmp / "floor.db", args.messages)
        print(f"stdlib email parse alone:  {args.messages / floor_s:8,.0f} messages/s; raw sqlite3 "
              f"one-row commits: {args.messages / commit_s:8,.0f}/s")
        report("SQLite", measure(work, f"sqlite:///{work / 'b.db'}", maildir, written),
               args.messages, floor_s)
        if args.postgres:
            pg = Postgres()
            try:
                url = pg.start()
                pg_work = tmp / "pg"
                pg_deliveries = prepare(pg_work, url, args.messages)
                pg_maildir = tmp / "Maildir-pg"
                report("PostgreSQL", measure(pg_work, url, pg_maildir,
                                             write_maildir(pg_maildir, pg_deliveries)),
                       args.messages, floor_s)
            finally:
                pg.stop()
        if not args.no_oneclick:
            oneclick()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def oneclick() -> None:
    """bench/oneclick.py's one-click POSTs/s against `bulksend serve`, if it is there."""
    try:
        import oneclick as one_click
    except ImportError:
        print("one-click: bench/oneclick.py not found; skipped")
        return
    directory = Path(tempfile.mkdtemp(prefix="bulksend-oneclick-bench-"))
    try:
        figures = one_click.run(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("one-click, " + one_click.describe(figures))


if __name__ == "__main__":
    main()
