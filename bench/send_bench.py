"""Sending speed: `bulksend send --once` into Postfix's smtp-sink, against smtp-source and smtplib.

    .venv/bin/python bench/send_bench.py [--recipients 20000] [--smtplib-count 20000] [--postgres]

Unpacks Postfix's `smtp-sink` and `smtp-source` (`apt-get download postfix` + `dpkg -x`, cached
in ~/.cache/bulksend-bench/postfix; nothing installed, no service started), starts one sink on
loopback and measures, in the same run, messages per second of:

1. `smtp-source -s 10 -d` (10 sessions, connections reused), messages as long as bulksend's;
2. a bare smtplib loop: one connection, `sendmail` of one pre-rendered bulksend message;
3. `bulksend send --once --json` as a separate process (timed from start to exit, peak RSS by
   wait4): N recipients, a campaign of templates/newsletter.{html,txt}, 10 accounts ×
   `connections = 2` on the sink (security "none", no AUTH, no limits), `[delivery]`
   defaults, SQLite store;
4. the same with an Ed25519 DKIM key.

The import and `campaign start` are setup, not timed. With --postgres, 3 and 4 run again on
a throwaway PostgreSQL cluster. The machine is shared, so compare the ratios. Targets
(issue 4): bulksend/smtp-source >= 0.12 without DKIM, >= 0.08 with Ed25519; RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

from import_bench import BULKSEND, ROOT, Postgres, generate, run_measured
from postfix_tools import PostfixTools

ACCOUNTS = 10
CONNECTIONS = 2
SOURCE_SESSIONS = 10
SECRET = "bench-secret-0123456789abcdef"
TEMPLATES = ROOT / "templates"


def config_text(database: str, port: int, dkim_key: Path | None) -> str:
    """bulksend.toml: the sender, optionally one Ed25519 key, 10 accounts on the sink."""
    lines = [
        f'database = "{database}"',
        "[sender]",
        'from = "Example News <news@example.com>"',
        'list_id = "news.example.com"',
        'return_path = "bounces@example.com"',
        'unsubscribe_url = "https://example.com/u"',
    ]
    if dkim_key is not None:
        lines += ["[[dkim]]", 'domain = "example.com"', 'selector = "bench"',
                  f'private_key_file = "{dkim_key}"']
    for i in range(1, ACCOUNTS + 1):
        lines += ["[[accounts]]", f'name = "sink-{i}"', 'host = "127.0.0.1"', f"port = {port}",
                  'security = "none"', "allow_insecure = true", f"connections = {CONNECTIONS}",
                  'helo = "bench.example.com"']
    return "\n".join(lines) + "\n"


def prepare(work: Path, database: str, port: int, csv_path: Path, dkim_key: Path | None
            ) -> list[str]:
    """A workspace with the list imported and the campaign started; returns the CLI prefix."""
    work.mkdir(parents=True)
    (work / "bulksend.toml").write_text(config_text(database, port, dkim_key), encoding="utf-8")
    cli = [*BULKSEND, "--config", str(work / "bulksend.toml")]
    start = ["campaign", "start", "news", "--json"] + ([] if dkim_key else ["--no-dkim"])
    for step in (["db", "upgrade"],
                 ["import", str(csv_path), "--list", "subscribers"],
                 ["campaign", "create", "news", "--list", "subscribers",
                  "--subject", "{{ name or 'Hello' }}, what is new this month",
                  "--html", str(TEMPLATES / "newsletter.html"),
                  "--text", str(TEMPLATES / "newsletter.txt")],
                 start):
        done = subprocess.run([*cli, *step], cwd=work, env=bench_env(), capture_output=True)
        if done.returncode != 0:
            raise SystemExit(f"setup step {' '.join(step)} failed: {done.stderr.decode().strip()}")
    return cli


def bench_env() -> dict[str, str]:
    return {**os.environ, "BULKSEND_SECRET": SECRET}


def sample_message(cli: list[str], work: Path) -> tuple[bytes, str, str]:
    """The exact bytes of one queued delivery (`campaign preview`) and its envelope."""
    done = subprocess.run([*cli, "campaign", "preview", "news"], cwd=work, env=bench_env(),
                          capture_output=True, check=True)
    envelope = done.stderr.decode()
    sender = envelope.split("MAIL FROM:<", 1)[1].split(">", 1)[0]
    recipient = envelope.split("RCPT TO:<", 1)[1].split(">", 1)[0]
    return done.stdout, sender, recipient


def smtplib_loop(port: int, data: bytes, sender: str, recipient: str, count: int) -> float:
    """Seconds for `count` sendmail calls of `data` over one reused connection."""
    options = [] if data.isascii() else ["BODY=8BITMIME"]
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example.com") as client:
        client.ehlo()
        for _ in range(count):
            client.sendmail(sender, [recipient], data, mail_options=options)
    return time.perf_counter() - start


def bulksend_send(cli: list[str], work: Path, recipients: int
                  ) -> tuple[float, int, float, dict]:
    """Time `send --once --json` to exit; every recipient must have been sent."""
    seconds, rss, cpu, out = run_measured([*cli, "send", "--once", "--json"], work, bench_env())
    report = json.loads(out)
    if report["sent"] != recipients:
        raise SystemExit(f"bulksend sent {report['sent']} of {recipients}: {report}")
    return seconds, rss, cpu, report


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--smtplib-count", type=int, default=20_000,
                        help="messages in the bare smtplib loop")
    parser.add_argument("--source-count", type=int, default=20_000,
                        help="messages smtp-source sends")
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL")
    parser.add_argument("--no-dkim-run", action="store_true", help="skip the Ed25519 runs")
    args = parser.parse_args()
    tools = PostfixTools.fetch()
    tmp = Path(tempfile.mkdtemp(prefix="bulksend-send-bench-"))
    pg = None
    try:
        csv_path = tmp / "list.csv"
        generate(csv_path, args.recipients)
        subprocess.run([*BULKSEND, "dkim", "keygen", "example.com", "bench", "--ed25519",
                        "--dir", str(tmp / "dkim")], cwd=tmp, check=True, capture_output=True)
        key = tmp / "dkim" / "example.com.bench.pem"
        stores = [("SQLite", lambda name: f"sqlite:///{tmp / name / 'bulksend.db'}")]
        if args.postgres:
            pg = Postgres()
            base = pg.start()
            stores.append(("PostgreSQL", lambda name, base=base: base))
        with tools.sink() as port:
            print(f"smtp-sink on 127.0.0.1:{port} (Postfix {tools.version}); "
                  f"{os.cpu_count()} CPUs")
            # Setup of the first bulksend run also yields the message the baselines send.
            runs = [("no DKIM", None)] + ([] if args.no_dkim_run else [("Ed25519 DKIM", key)])
            work = tmp / "sqlite-plain"
            cli = prepare(work, stores[0][1]("sqlite-plain"), port, csv_path, None)
            data, sender, recipient = sample_message(cli, work)
            print(f"message: {len(data):,} bytes ({'8-bit' if not data.isascii() else '7-bit'}), "
                  f"templates/newsletter.html + .txt")

            # The machine is shared and smtp-source's figure jumps around: the median of three.
            source_s = sorted(tools.source(port, messages=args.source_count,
                                           sessions=SOURCE_SESSIONS, length=len(data))
                              for _ in range(3))[1]
            source_rate = args.source_count / source_s
            print(f"smtp-source -s {SOURCE_SESSIONS} -d -l {len(data)}: {source_rate:10,.0f} msg/s "
                  f"({args.source_count:,} in {source_s:.2f} s, median of 3)")
            smtplib_s = smtplib_loop(port, data, sender, recipient, args.smtplib_count)
            smtplib_rate = args.smtplib_count / smtplib_s
            print(f"smtplib, one connection:       {smtplib_rate:10,.0f} msg/s "
                  f"({args.smtplib_count:,} in {smtplib_s:.2f} s)")

            for store_label, url_for in stores:
                for label, dkim_key in runs:
                    name = f"{store_label.lower()}-{'dkim' if dkim_key else 'plain'}"
                    if name != "sqlite-plain":
                        if store_label == "PostgreSQL":
                            reset_postgres(pg)
                        work = tmp / name
                        cli = prepare(work, url_for(name), port, csv_path, dkim_key)
                    seconds, rss, cpu, report = bulksend_send(cli, work, args.recipients)
                    rate = args.recipients / seconds
                    target = 0.12 if dkim_key is None else 0.08
                    print(f"bulksend, {store_label}, {label}: {rate:10,.0f} msg/s "
                          f"({args.recipients:,} in {seconds:.1f} s, CPU {cpu:.1f} s = "
                          f"{cpu / args.recipients * 1e3:.2f} ms/msg), peak RSS {rss / 2**20:.0f} MiB")
                    print(f"  ratio bulksend/smtp-source: {rate / source_rate:6.3f}   "
                          f"(target >= {target}; RSS <= 150 MB)")
                    print(f"  ratio bulksend/smtplib:     {rate / smtplib_rate:6.3f}")
                    print(f"  report: {json.dumps({k: v for k, v in report.items() if k != 'by_account'})}"
                          f", accounts used {len(report['by_account'])}")
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def reset_postgres(pg: Postgres) -> None:
    """An empty `bench` database for the next run (drop and create)."""
    for tool in ("dropdb", "createdb"):
        subprocess.run([*pg.as_postgres, str(pg.bin / tool), "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", "postgres", "bench"], check=True, capture_output=True, cwd="/")


if __name__ == "__main__":
    main()
