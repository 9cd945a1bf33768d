"""The built wheel works on its own: migrations and data ship inside it."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_in_a_fresh_virtualenv_inits_imports_and_lists(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(dist.glob("bulksend-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    subprocess.run([env_dir / "bin" / "python", "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True)
    site = subprocess.run([env_dir / "bin" / "python", "-c", "import bulksend; print(bulksend.__file__)"],
                          check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(env_dir) in site  # the installed copy, not this checkout

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    (empty / "list.csv").write_text("E-mail;Name\r\nann@example.com;Ann\r\nbob@example.org;Bob\r\n"
                                    "ANN@example.com;Dup\r\nbroken;X\r\n", encoding="utf-8-sig")
    bulksend = env_dir / "bin" / "bulksend"

    def run(*args: str) -> str:
        done = subprocess.run([bulksend, *args], cwd=empty, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("init")
    assert (empty / "bulksend.toml").exists() and (empty / "bulksend.db").exists()
    report = json.loads(run("import", "list.csv", "--list", "news", "--json"))
    assert (report["rows"], report["imported"], report["duplicates"], report["invalid"]) == (4, 2, 1, 1)
    assert json.loads(run("lists", "--json")) == {
        "lists": [{"name": "news", "subscribed": 2, "unsubscribed": 0, "suppressed": 0}]
    }
