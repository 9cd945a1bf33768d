"""Queueing speed: `bulksend campaign start` of a campaign whose list has N members.

    .venv/bin/python bench/start_bench.py [--rows 1000000] [--postgres]

Imports a generated list (see import_bench), creates a campaign, then times `campaign start`
(all launch gates plus the set-based queueing statement) as a separate process and prints
its wall time and peak RSS. Target (issue 3): 1M members on SQLite in <= 20 s, <= 200 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from import_bench import BULKSEND, Postgres, generate, run_with_rss

HTML = ('<html><body><p>Hello {{ name }} from {{ city }} ({{ plan }})</p>'
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>')


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", action="store_true", help="also on PostgreSQL")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bulksend-start-bench-"))
    try:
        csv_path = tmp / "list.csv"
        generate(csv_path, args.rows)
        (tmp / "n.html").write_text(HTML, encoding="utf-8")
        targets = [("SQLite", f"sqlite:///{tmp / 'sqlite.db'}")]
        pg = Postgres() if args.postgres else None
        if pg is not None:
            targets.append(("PostgreSQL", pg.start()))
        try:
            for label, url in targets:
                work = tmp / label
                work.mkdir()
                (work / "bulksend.toml").write_text(
                    f'database = "{url}"\n[sender]\nfrom = "News <news@example.com>"\n'
                    'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
                    'unsubscribe_url = "https://example.com/u"\n', encoding="utf-8")
                cli = [*BULKSEND, "--config", str(work / "bulksend.toml")]
                env = {**os.environ, "BULKSEND_SECRET": "bench-secret-0123456789abcdef"}
                for step in (["db", "upgrade"],
                             ["import", str(csv_path), "--list", "news"],
                             ["campaign", "create", "c", "--list", "news", "--subject", "Hi {{ name }}",
                              "--html", str(tmp / "n.html")]):
                    subprocess.run([*cli, *step], check=True, capture_output=True, env=env)
                seconds, rss, out = run_with_rss([*cli, "campaign", "start", "c", "--no-dkim", "--json"],
                                                 work, env=env)
                print(f"{label}: campaign start of {args.rows:,} members: {seconds:.1f} s, "
                      f"peak RSS {rss / 2**20:.0f} MiB (target <= 20 s, <= 200 MB)")
                print(f"  {out.strip()}")
        finally:
            if pg is not None:
                pg.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
