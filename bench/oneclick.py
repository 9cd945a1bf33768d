"""One-click unsubscribes per second: RFC 8058 POSTs against a real `bulksend serve`, committed.

    .venv/bin/python bench/oneclick.py [--posts 5000] [--clients 8] [--postgres]

Sets up a workspace (N subscribers on one list, a started campaign: N queued deliveries),
starts `bulksend serve` as a child process on a free loopback port and sends one
`List-Unsubscribe=One-Click` POST (application/x-www-form-urlencoded) per delivery, each
with its own token, from `--clients` threads holding one keep-alive connection each. Every
answer must be 200, and afterwards every subscriber must be unsubscribed and every
unsubscribe recorded once: the figure counts committed unsubscribes only.

For scale, the same clients then fetch GET /healthz (one read, no commit) as many times:
the ratio POST/healthz shows how much of a POST is the unsubscribe itself, and stays
comparable on this shared machine where absolute rates drift. Target (issue 5): >= 500
POSTs/s. `run(workdir)` is what bench/bounce_bench.py calls.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from import_bench import BULKSEND, Postgres, free_port

from bulksend import models, tokens

SECRET = "bench-secret-0123456789abcdef"
HTML = '<p>Hello {{ name }}</p><p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
ONE_CLICK = b"List-Unsubscribe=One-Click"
TARGET = 500


def prepare(workdir: Path, database: str, port: int, posts: int) -> list[str]:
    """A workspace with `posts` queued deliveries; returns their unsubscribe URL paths."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "bulksend.toml"
    config.write_text(
        f'database = "{database}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        f'unsubscribe_url = "http://127.0.0.1:{port}/u"\n[server]\nlisten = "127.0.0.1:{port}"\n',
        encoding="utf-8")
    (workdir / "list.csv").write_text(
        "email\r\n" + "".join(f"user{i}@example.org\r\n" for i in range(posts)), encoding="utf-8")
    (workdir / "n.html").write_text(HTML, encoding="utf-8")
    cli = [*BULKSEND, "--config", str(config)]
    for step in (["db", "upgrade"], ["import", str(workdir / "list.csv"), "--list", "news"],
                 ["campaign", "create", "c", "--list", "news", "--subject", "Hi",
                  "--html", str(workdir / "n.html")],
                 ["campaign", "start", "c", "--no-dkim"]):
        subprocess.run([*cli, *step], check=True, capture_output=True, env=bench_env())
    engine = sa.create_engine(database)
    try:
        with engine.connect() as connection:
            ids = connection.execute(sa.select(models.deliveries.c.id)).scalars().all()
    finally:
        engine.dispose()
    return [f"/u/{tokens.make_token(SECRET.encode(), tokens.UNSUBSCRIBE, i)}" for i in ids]


def bench_env() -> dict[str, str]:
    """The environment of the bulksend child processes: the secret set."""
    return {**os.environ, "BULKSEND_SECRET": SECRET}


def start_server(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """`bulksend serve` on the workspace, once /healthz answers."""
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - the child keeps it
    server = subprocess.Popen([*BULKSEND, "--config", str(workdir / "bulksend.toml"), "serve"],
                              stdout=log, stderr=subprocess.STDOUT, env=bench_env())
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit(f"bulksend serve did not start: {(workdir / 'serve.log').read_text()}")


def hammer(port: int, requests: list[tuple[str, str, bytes]], clients: int) -> float:
    """Seconds for `clients` keep-alive connections to get through `requests`; all must be 200."""
    failures: list[str] = []

    def client(share: list[tuple[str, str, bytes]]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for method, path, body in share:
                headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
                connection.request(method, path, body=body or None, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"{method} {path}: {response.status}")
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(requests[i::clients],))
               for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[:3]}")
    return elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def committed(database: str) -> tuple[int, int]:
    """(unsubscribed memberships, unsubscribe events) in the store."""
    engine = sa.create_engine(database)
    try:
        with engine.connect() as connection:
            members = connection.execute(
                sa.select(sa.func.count()).select_from(models.list_members)
                .where(models.list_members.c.status == "unsubscribed")).scalar_one()
            events = connection.execute(
                sa.select(sa.func.count()).select_from(models.bounce_events)
                .where(models.bounce_events.c.kind == "unsubscribe",
                       models.bounce_events.c.source == "web")).scalar_one()
    finally:
        engine.dispose()
    return members, events


def run(workdir: Path, *, database: str | None = None, posts: int = 5000, clients: int = 8
        ) -> dict[str, Any]:
    """Measure committed one-click POSTs/s against `bulksend serve`; returns the figures."""
    database = database or f"sqlite:///{workdir / 'oneclick.db'}"
    port = free_port()
    paths = prepare(workdir, database, port, posts)
    server = start_server(workdir, port)
    try:
        cpu = cpu_seconds(server.pid)
        post_s = hammer(port, [("POST", path, ONE_CLICK) for path in paths], clients)
        post_cpu, cpu = cpu_seconds(server.pid) - cpu, cpu_seconds(server.pid)
        health_s = hammer(port, [("GET", "/healthz", b"")] * len(paths), clients)
        health_cpu = cpu_seconds(server.pid) - cpu
    finally:
        server.terminate()
        server.wait(timeout=30)
    members, events = committed(database)
    if members != len(paths) or events != len(paths):
        raise SystemExit(f"{len(paths)} POSTs answered 200 but {members} memberships are "
                         f"unsubscribed and {events} events recorded")
    backend = sa.make_url(database).get_backend_name()
    return {"backend": backend, "posts": len(paths), "clients": clients,
            "seconds": round(post_s, 3), "posts_per_s": round(len(paths) / post_s, 1),
            "healthz_per_s": round(len(paths) / health_s, 1),
            "ratio_to_healthz": round(health_s / post_s, 3), "target_posts_per_s": TARGET,
            "server_cpu_ms_per_post": round(1000 * post_cpu / len(paths), 3),
            "server_cpu_ms_per_healthz": round(1000 * health_cpu / len(paths), 3)}


def describe(figures: dict[str, Any]) -> str:
    """One line of figures."""
    return (f"{figures['backend']}: {figures['posts_per_s']:,.0f} one-click POSTs/s committed "
            f"({figures['posts']:,} in {figures['seconds']:.1f} s, {figures['clients']} clients; "
            f"GET /healthz {figures['healthz_per_s']:,.0f}/s, ratio "
            f"{figures['ratio_to_healthz']:.2f}; server CPU "
            f"{figures['server_cpu_ms_per_post']:.2f} ms "
            f"a POST, {figures['server_cpu_ms_per_healthz']:.2f} ms a GET /healthz; "
            f"target >= {figures['target_posts_per_s']}/s)")


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bulksend-oneclick-"))
    try:
        results = [run(tmp / "sqlite", posts=args.posts, clients=args.clients)]
        if args.postgres:
            pg = Postgres()
            try:
                results.append(run(tmp / "postgresql", database=pg.start(), posts=args.posts,
                                   clients=args.clients))
            finally:
                pg.stop()
        for figures in results:
            print(json.dumps(figures) if args.json else describe(figures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
