"""The skip-or-fail rule for tests that need a real component, and that CI turns it to fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import real

ROOT = Path(__file__).resolve().parent.parent


def test_a_missing_component_fails_when_servers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(real.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="Dovecot unavailable: not installed"):
        real.unavailable("Dovecot", "not installed")


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_a_missing_component_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch,
                                                          value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(real.REQUIRE_ENV, raising=False)
    else:
        monkeypatch.setenv(real.REQUIRE_ENV, value)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL unavailable"):
        real.unavailable("PostgreSQL", "no pg_ctl")


def test_ci_requires_the_servers_before_it_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    export = re.search(rf"^export {real.REQUIRE_ENV}=1$", script, re.MULTILINE)
    command = script.find("scripts/setup --test && .venv/bin/python -m pytest")
    assert export is not None and 0 <= export.start() < command
    assert "scripts/setup --test && .venv/bin/python -m pytest" in (ROOT / "README.md").read_text(
        encoding="utf-8")
