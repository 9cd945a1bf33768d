"""The `bulksend` command line: setup, lists, subscribers, suppression, exit codes and --json.

Tests that need a store use the `bulksend` fixture (the CLI in-process against a fresh
migrated store, on SQLite and on PostgreSQL); the others call `cli.run` with a config in
a temporary directory.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import cli, db
from tests.support.cli import Bulksend, Result, row_counts


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    """`bulksend ARGS...` without a prepared workspace."""
    capsys.readouterr()
    code = cli.run([str(arg) for arg in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def import_file(bulksend: Bulksend, tmp_path: Path, name: str, data: bytes, list_name: str
                ) -> dict[str, Any]:
    """Write `data` as tmp_path/name and import it into `list_name`; returns the report."""
    path = tmp_path / name
    path.write_bytes(data)
    result = bulksend("import", path, "--list", list_name, "--json")
    assert result.code == 0, result.stderr
    report: dict[str, Any] = result.json()
    return report


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """Exit 1, nothing on stdout, one `bulksend: ...` line on stderr containing `fragments`."""
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("bulksend: ")
    assert result.stderr.count("\n") == 1
    for fragment in fragments:
        assert fragment in result.stderr


# --- init and db ------------------------------------------------------------------------------


def test_init_writes_config_and_a_migrated_database_into_an_empty_dir(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "new"
    target.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the database goes next to the config, not into the cwd

    assert run(capsys, "init", target).code == 0
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [
        "bulksend.db", "bulksend.toml"]
    assert list(elsewhere.iterdir()) == []
    listed = run(capsys, "--config", target / "bulksend.toml", "lists", "--json")
    assert (listed.code, listed.json()) == (0, {"lists": []})


def test_second_init_never_overwrites_a_modified_config(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "init", tmp_path).code == 0
    config = tmp_path / "bulksend.toml"
    modified = config.read_text(encoding="utf-8") + "# my own note\n"
    config.write_text(modified, encoding="utf-8")

    again = run(capsys, "init", tmp_path)
    assert again.code == 0
    assert f"{config} exists; left as it is" in again.stdout
    assert config.read_text(encoding="utf-8") == modified


def test_db_current_reports_an_empty_database_until_db_upgrade(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "bulksend.toml"
    config.write_text('database = "sqlite:///fresh.db"\n', encoding="utf-8")
    head = db.head_revision()

    before = run(capsys, "--config", config, "db", "current", "--json")
    assert (before.code, before.json()) == (0, {"current": None, "head": head, "up_to_date": False})
    assert run(capsys, "--config", config, "db", "upgrade").code == 0
    after = run(capsys, "--config", config, "db", "current", "--json")
    assert (after.code, after.json()) == (0, {"current": head, "head": head, "up_to_date": True})


def test_store_commands_on_an_unmigrated_database_say_to_run_db_upgrade(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "bulksend.toml"
    config.write_text('database = "sqlite:///fresh.db"\n', encoding="utf-8")

    assert_one_line_error(run(capsys, "--config", config, "lists"),
                          "fresh.db", "run `bulksend db upgrade`")


def test_missing_config_file_names_the_path_and_says_to_run_init(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "bulksend.toml"

    assert_one_line_error(run(capsys, "--config", missing, "lists"), str(missing), "bulksend init")


def test_default_config_is_bulksend_toml_in_the_current_directory(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BULKSEND_CONFIG", raising=False)

    assert_one_line_error(run(capsys, "lists"), "bulksend.toml: not found", "bulksend init")


# --- usage errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["import"],
    ["import", "subscribers.csv"],
    ["import", "subscribers.csv", "--list", "news", "--on-existing", "merge"],
    ["subscribers", "show"],
    ["subscribers", "export"],
    ["suppress", "add"],
    ["suppress", "remove"],
    ["lists", "--no-such-option"],
    ["no-such-command"],
], ids=lambda args: " ".join(args))
def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             args: list[str]) -> None:
    result = run(capsys, "--config", tmp_path / "bulksend.toml", *args)

    assert result.code == 2
    assert result.stdout == ""
    assert "Error" in result.stderr


# --- lists and subscribers --------------------------------------------------------------------


def test_lists_json_partitions_members_into_subscribed_unsubscribed_suppressed(
        bulksend: Bulksend, tmp_path: Path) -> None:
    assert bulksend("suppress", "add", "ann@example.com", "@blocked.org").code == 0
    import_file(bulksend, tmp_path, "news.csv",
                b"email\r\nann@example.com\r\nbob@example.com\r\ncy@blocked.org\r\n", "news")
    import_file(bulksend, tmp_path, "broken.csv", b"email\r\nnot-an-address\r\n", "empty")
    # Lifting a suppression does not resubscribe: ann stays unsubscribed from the list.
    assert bulksend("suppress", "remove", "ann@example.com").code == 0

    result = bulksend("lists", "--json")
    assert result.code == 0
    assert result.json() == {"lists": [
        {"name": "empty", "subscribed": 0, "unsubscribed": 0, "suppressed": 0},
        {"name": "news", "subscribed": 1, "unsubscribed": 1, "suppressed": 1},
    ]}


def test_show_unknown_subscriber_exits_1_naming_the_address(bulksend: Bulksend) -> None:
    assert_one_line_error(bulksend("subscribers", "show", "nobody@example.com"),
                          "nobody@example.com")


def test_show_invalid_address_exits_1_naming_it(bulksend: Bulksend) -> None:
    assert_one_line_error(bulksend("subscribers", "show", "bob@@example.com"),
                          "invalid address 'bob@@example.com'")


def test_show_prints_name_attributes_lists_and_suppression(bulksend: Bulksend,
                                                           tmp_path: Path) -> None:
    import_file(bulksend, tmp_path, "a.csv", b"email,name,city\r\nAnn@Example.com,Ann,Oslo\r\n",
                "news")
    assert bulksend("suppress", "add", "ann@example.com", "--reason", "complaint").code == 0

    result = bulksend("subscribers", "show", "ANN@example.com", "--json")
    assert result.code == 0
    shown = result.json()
    assert {key: shown[key] for key in ("email", "email_key", "name", "attributes", "lists",
                                        "suppressed")} == {
        "email": "Ann@Example.com", "email_key": "ann@example.com", "name": "Ann",
        "attributes": {"city": "Oslo"}, "lists": {"news": "subscribed"},
        "suppressed": "complaint"}


EXPORT_SOURCE = (
    b'email,name,plus,minus,at\r\n'
    b'ann@example.com,"=HYPERLINK(""http://evil.example"",""click"")",+1,-2,@SUM(A1:A2)\r\n'
    b'bob@example.com,Bob,3,4,5\r\n'
    b'later@example.com,Later,6,7,8\r\n'
    b'early@example.com,Early,9,10,11\r\n'
    b'anyone@blocked.org,Blocked,12,13,14\r\n'
)
EXPORTED = [
    {"email": "ann@example.com", "name": "'=HYPERLINK(\"http://evil.example\",\"click\")",
     "plus": "'+1", "minus": "'-2", "at": "'@SUM(A1:A2)"},
    {"email": "bob@example.com", "name": "Bob", "plus": "3", "minus": "4", "at": "5"},
]


@pytest.fixture
def export_list(bulksend: Bulksend, tmp_path: Path) -> None:
    """List `news`: two mailable members and three suppressed (before, after, by domain)."""
    assert bulksend("suppress", "add", "early@example.com", "@blocked.org").code == 0
    report = import_file(bulksend, tmp_path, "export-source.csv", EXPORT_SOURCE, "news")
    assert (report["imported"], report["suppressed"]) == (3, 2)
    assert bulksend("suppress", "add", "later@example.com").code == 0


def parse_export(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The exported CSV's header and rows."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), list(reader)


@pytest.mark.usefixtures("export_list")
def test_export_to_stdout_neutralises_formulas_and_leaves_out_suppressed(
        bulksend: Bulksend) -> None:
    result = bulksend("subscribers", "export", "--list", "news")

    assert result.code == 0
    header, rows = parse_export(result.stdout)
    assert header[:2] == ["email", "name"]
    assert sorted(header[2:]) == ["at", "minus", "plus"]
    assert rows == EXPORTED
    assert "exported 2 subscribers of 'news'" in result.stderr


@pytest.mark.usefixtures("export_list")
def test_export_to_an_output_file_writes_the_same_csv(bulksend: Bulksend, tmp_path: Path) -> None:
    output = tmp_path / "out" / "news.csv"
    output.parent.mkdir()

    result = bulksend("subscribers", "export", "--list", "news", "--output", output)
    assert (result.code, result.stdout) == (0, "")
    assert parse_export(output.read_text(encoding="utf-8"))[1] == EXPORTED
    assert [p.name for p in output.parent.iterdir()] == ["news.csv"]  # no temp file left


def test_export_of_an_unknown_list_exits_1_and_writes_no_file(bulksend: Bulksend,
                                                              tmp_path: Path) -> None:
    output = tmp_path / "nope.csv"

    assert_one_line_error(bulksend("subscribers", "export", "--list", "nope"), "'nope'")
    assert_one_line_error(bulksend("subscribers", "export", "--list", "nope", "--output", output),
                          "'nope'")
    assert list(tmp_path.glob("*nope.csv*")) == []


# --- suppression ------------------------------------------------------------------------------


def suppressions(bulksend: Bulksend) -> list[dict[str, Any]]:
    """`suppress list --json` entries without their timestamps."""
    result = bulksend("suppress", "list", "--json")
    assert result.code == 0
    return [{k: v for k, v in entry.items() if k != "created_at"}
            for entry in result.json()["suppressions"]]


def test_suppress_add_list_remove(bulksend: Bulksend) -> None:
    added = bulksend("suppress", "add", "Bob@Example.com", "@Spam.example.org",
                     "--reason", "hard_bounce")
    assert added.code == 0
    assert "suppressed 2 new, 0 already suppressed" in added.stdout
    assert sorted(suppressions(bulksend), key=str) == sorted([
        {"email": "bob@example.com", "domain": None, "reason": "hard_bounce", "source": "cli"},
        {"email": None, "domain": "spam.example.org", "reason": "hard_bounce", "source": "cli"},
    ], key=str)
    again = bulksend("suppress", "add", "bob@example.com")
    assert "suppressed 0 new, 1 already suppressed" in again.stdout

    assert bulksend("suppress", "remove", "BOB@example.com").code == 0
    assert bulksend("suppress", "remove", "@spam.example.org").code == 0
    assert suppressions(bulksend) == []


def test_suppress_add_with_one_invalid_address_writes_nothing(
        bulksend: Bulksend, engine: sa.Engine) -> None:
    before = row_counts(engine)

    assert_one_line_error(bulksend("suppress", "add", "good@example.com", "bob@@example.com"),
                          "invalid address 'bob@@example.com'")
    assert row_counts(engine) == before
    assert suppressions(bulksend) == []


def test_suppress_add_with_an_unknown_reason_writes_nothing(
        bulksend: Bulksend, engine: sa.Engine) -> None:
    before = row_counts(engine)

    assert_one_line_error(bulksend("suppress", "add", "good@example.com", "--reason", "annoyed"),
                          "'annoyed'")
    assert row_counts(engine) == before


def test_suppress_remove_of_an_address_not_suppressed_exits_1(bulksend: Bulksend) -> None:
    assert bulksend("suppress", "add", "other@example.com").code == 0

    assert_one_line_error(bulksend("suppress", "remove", "nobody@example.com"),
                          "nobody@example.com is not on the suppression list")
    assert len(suppressions(bulksend)) == 1


# --- output contracts -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["import", "{file}", "--list", "news", "--json"],
    ["lists", "--json"],
    ["subscribers", "show", "ann@example.com", "--json"],
    ["suppress", "list", "--json"],
    ["db", "current", "--json"],
], ids=lambda command: " ".join(command[:2]))
def test_json_output_is_exactly_one_object_on_stdout(bulksend: Bulksend, tmp_path: Path,
                                                     command: list[str]) -> None:
    path = tmp_path / "list.csv"
    path.write_bytes(b"email,name\r\nann@example.com,Ann\r\nbroken,X\r\nANN@example.com,Dup\r\n")
    assert bulksend("import", path, "--list", "news").code == 0
    assert bulksend("suppress", "add", "@blocked.org").code == 0

    result = bulksend(*(str(path) if arg == "{file}" else arg for arg in command))
    assert result.code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    assert isinstance(json.loads(result.stdout), dict)


def test_list_names_with_brackets_are_printed_literally(bulksend: Bulksend, tmp_path: Path) -> None:
    path = tmp_path / "vip.csv"
    path.write_bytes(b"email\r\nann@example.com\r\n")

    imported = bulksend("import", path, "--list", "[vip]")
    assert imported.code == 0
    assert "list '[vip]'" in imported.stdout
    assert "[vip]" in bulksend("lists").stdout
