"""Running the real CLI in-process against a workspace whose config points at the test store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import cli, models


@dataclass(frozen=True)
class Result:
    """What one `bulksend ...` invocation did."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout parsed as the single JSON object `--json` promises."""
        return json.loads(self.stdout)


class Bulksend:
    """Calls `bulksend --config WORKSPACE/bulksend.toml ARGS...` and captures its output."""

    def __init__(self, config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config_path = config_path
        self._capsys = capsys

    def __call__(self, *args: str | Path) -> Result:
        """Run one command; returns its exit code and output."""
        self._capsys.readouterr()
        code = cli.run(["--config", str(self.config_path), *map(str, args)])
        captured = self._capsys.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def workspace(tmp_path: Path, store_url: str) -> Path:
    """A directory with a bulksend.toml whose database is the test's fresh store."""
    directory = tmp_path / "workspace"
    directory.mkdir()
    (directory / "bulksend.toml").write_text(f'database = "{store_url}"\n', encoding="utf-8")
    return directory


@pytest.fixture
def bulksend(workspace: Path, capsys: pytest.CaptureFixture[str]) -> Bulksend:
    """The CLI bound to the test workspace (runs on SQLite and PostgreSQL)."""
    return Bulksend(workspace / "bulksend.toml", capsys)


def row_counts(engine: sa.Engine) -> dict[str, int]:
    """Rows in every table: equal snapshots mean nothing was written."""
    with engine.connect() as connection:
        return {
            table.name: connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in models.metadata.sorted_tables
        }
