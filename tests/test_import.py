"""`bulksend import`: real-world subscriber files in, exact counts and clean records out.

Every test writes its input file byte by byte (the encoding, BOM, delimiter and line ends
are the point), runs the real CLI and checks what a user sees: the whole `--json` report,
the rejects file and the stored subscribers. The `bulksend` fixture runs each test on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import importer, subscribers
from tests.support.cli import Bulksend, row_counts


def write(path: Path, data: bytes) -> Path:
    """Write `data` to `path` exactly as given and return the path."""
    path.write_bytes(data)
    return path


def report(*, rows: int, imported: int = 0, updated: int = 0, skipped: int = 0,
           duplicates: int = 0, invalid: int = 0, suppressed: int = 0,
           still_unsubscribed: int = 0, rejects_file: str | None = None,
           encoding: str = "utf-8", delimiter: str = ",", dry_run: bool = False
           ) -> dict[str, Any]:
    """The whole `import --json` object we expect (unnamed counts are zero)."""
    return {
        "rows": rows, "imported": imported, "updated": updated, "skipped": skipped,
        "duplicates": duplicates, "invalid": invalid, "suppressed": suppressed,
        "rejects_file": rejects_file, "still_unsubscribed": still_unsubscribed,
        "encoding": encoding, "delimiter": delimiter, "dry_run": dry_run,
    }


def import_json(bulksend: Bulksend, path: Path, *args: str | Path) -> dict[str, Any]:
    """Run `import PATH ARGS --json`, require success, return the report."""
    result = bulksend("import", path, *args, "--json")
    assert (result.code, result.stderr) == (0, "")
    data: dict[str, Any] = result.json()
    return data


def show(bulksend: Bulksend, email: str) -> dict[str, Any]:
    """`subscribers show EMAIL --json`, required to succeed."""
    result = bulksend("subscribers", "show", email, "--json")
    assert result.code == 0, result.stderr
    data: dict[str, Any] = result.json()
    return data


def lists(bulksend: Bulksend) -> list[dict[str, Any]]:
    """`lists --json`'s list of lists."""
    result = bulksend("lists", "--json")
    assert result.code == 0, result.stderr
    data: list[dict[str, Any]] = result.json()["lists"]
    return data


def read_rejects(path: Path, delimiter: str = ",") -> list[list[str]]:
    """The rejects file as rows; it must be UTF-8 with a BOM so that Excel reads it right."""
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    return list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""), delimiter=delimiter))


def assert_refused_without_writing(bulksend: Bulksend, engine: sa.Engine, path: Path,
                                   message: str) -> None:
    """Importing `path` exits 1 with one stderr line naming it, and the store is untouched."""
    before, lists_before = row_counts(engine), lists(bulksend)
    result = bulksend("import", path, "--list", "fresh")
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"bulksend: {path}: ")
    assert result.stderr.count("\n") == 1
    assert message in result.stderr
    assert row_counts(engine) == before
    assert lists(bulksend) == lists_before


@pytest.fixture
def existing_list(bulksend: Bulksend, tmp_path: Path) -> None:
    """A store that already holds a list, so "nothing written" has something to keep."""
    path = write(tmp_path / "existing.csv", b"email,name\r\nold@example.com,Old\r\n")
    assert import_json(bulksend, path, "--list", "existing")["imported"] == 1


# --- encodings and delimiters -----------------------------------------------------------------


def test_excel_utf8_bom_semicolon_file_stores_names_and_city(bulksend: Bulksend,
                                                             tmp_path: Path) -> None:
    text = "\ufeff" + "\r\n".join([
        "Email;Name;City",
        "anna@example.com;Anna Schmidt;Berlin",
        "jose@example.es;José Núñez;Málaga",
        "li@example.cn;李雷;北京",
    ]) + "\r\n"
    path = write(tmp_path / "excel.csv", text.encode("utf-8"))

    assert import_json(bulksend, path, "--list", "news") == report(
        rows=3, imported=3, encoding="utf-8-sig", delimiter=";")
    jose = show(bulksend, "jose@example.es")
    assert (jose["email"], jose["name"], jose["attributes"]) == (
        "jose@example.es", "José Núñez", {"city": "Málaga"})
    assert show(bulksend, "li@example.cn")["attributes"] == {"city": "北京"}
    assert show(bulksend, "anna@example.com")["lists"] == {"news": "subscribed"}


def test_cp1251_file_with_russian_headers_keeps_cyrillic_names(bulksend: Bulksend,
                                                                tmp_path: Path) -> None:
    text = "\r\n".join([
        "Почта;Имя;Город",
        "ivan@example.ru;Иван Петров;Москва",
        "olga@example.ru;Ольга Смирнова;Санкт-Петербург",
        "petr@example.ru;Пётр Иванов;Новосибирск",
    ]) + "\r\n"
    path = write(tmp_path / "clients.csv", text.encode("cp1251"))

    assert import_json(bulksend, path, "--list", "клиенты") == report(
        rows=3, imported=3, encoding="cp1251", delimiter=";")
    ivan = show(bulksend, "ivan@example.ru")
    assert (ivan["name"], ivan["attributes"], ivan["lists"]) == (
        "Иван Петров", {"город": "Москва"}, {"клиенты": "subscribed"})
    assert show(bulksend, "petr@example.ru")["name"] == "Пётр Иванов"


def test_utf16_tab_separated_file_imports(bulksend: Bulksend, tmp_path: Path) -> None:
    # Excel's "Unicode text": UTF-16 with a BOM, tab-separated, CRLF.
    text = "\r\n".join([
        "Email\tName\tCompany",
        "ann@example.com\tÄnn Öberg\tACME, Inc.",
        "bo@example.com\tBo\tΩmega",
    ]) + "\r\n"
    path = write(tmp_path / "unicode.txt", text.encode("utf-16"))

    assert import_json(bulksend, path, "--list", "news") == report(
        rows=2, imported=2, encoding="utf-16", delimiter="\t")
    ann = show(bulksend, "ann@example.com")
    assert (ann["name"], ann["attributes"]) == ("Änn Öberg", {"company": "ACME, Inc."})


def test_encoding_override_reads_a_latin1_file(bulksend: Bulksend, tmp_path: Path) -> None:
    text = "email;name\r\nm@example.de;Müller\r\ns@example.de;Straße\r\n"
    path = write(tmp_path / "latin1.csv", text.encode("latin-1"))

    assert import_json(bulksend, path, "--list", "de", "--encoding", "latin-1") == report(
        rows=2, imported=2, encoding="iso8859-1", delimiter=";")
    assert show(bulksend, "m@example.de")["name"] == "Müller"
    assert show(bulksend, "s@example.de")["name"] == "Straße"


def test_delimiter_override_splits_where_the_user_says(bulksend: Bulksend,
                                                       tmp_path: Path) -> None:
    # Split at commas, this file also has two consistent columns; only ';' is right.
    text = 'email;"last, first"\r\nbob@example.com;Smith, Bob\r\nann@example.com;Lee, Ann\r\n'
    path = write(tmp_path / "ambiguous.csv", text.encode("utf-8"))

    assert import_json(bulksend, path, "--list", "news", "--delimiter", ";") == report(
        rows=2, imported=2, delimiter=";")
    assert show(bulksend, "bob@example.com")["attributes"] == {"last_first": "Smith, Bob"}


def test_delimiter_tab_may_be_spelled_as_a_word(bulksend: Bulksend, tmp_path: Path) -> None:
    path = write(tmp_path / "tabs.tsv", b"email\tname\r\nann@example.com\tAnn\r\n")

    assert import_json(bulksend, path, "--list", "news", "--delimiter", "tab") == report(
        rows=1, imported=1, delimiter="\t")


# --- rows, line numbers and rejects -----------------------------------------------------------


def test_quoted_newline_is_removed_from_name_and_later_lines_keep_file_numbers(
        bulksend: Bulksend, tmp_path: Path) -> None:
    data = (
        b'email,name\r\n'                       # line 1
        b'anna@example.com,"Anna\nMaria"\r\n'   # lines 2-3
        b'eve@example.com,"Eve\r\n\r\nAdams"\r\n'  # lines 4-6
        b'not-an-address,X\r\n'                 # line 7
        b'ANNA@example.com,Again\r\n'           # line 8
    )
    path = write(tmp_path / "multiline.csv", data)
    rejects = tmp_path / "rejects.csv"

    assert import_json(bulksend, path, "--list", "news", "--rejects", rejects) == report(
        rows=4, imported=2, duplicates=1, invalid=1, rejects_file=str(rejects))
    assert show(bulksend, "anna@example.com")["name"] == "Anna Maria"
    assert show(bulksend, "eve@example.com")["name"] == "Eve Adams"
    rows = read_rejects(rejects)
    assert rows[0] == ["line", "reason", "email", "name"]
    assert [(line, cells) for line, _, *cells in rows[1:]] == [
        ("7", ["not-an-address", "X"]), ("8", ["ANNA@example.com", "Again"])]
    assert rows[2][1] == "duplicate of line 2"


INVALID_ADDRESSES = {
    # line -> the address cell
    7: "bob.example.com",           # no @
    23: "bob@@example.com",         # double @
    41: "bo b@example.com",         # space inside
    60: "bob@example.com.",         # trailing dot in the domain
    88: "",                         # empty cell
    101: "bob@",                    # no domain
    120: "@example.com",            # no local part
    150: "bob@example",             # domain without a dot
    170: "bob..smith@example.com",  # consecutive dots
    199: "bob@exa_mple.com",        # underscore in the domain
}


def test_five_percent_invalid_addresses_are_rejected_with_line_and_reason(
        bulksend: Bulksend, tmp_path: Path) -> None:
    lines = ["email;name;note"]
    for line in range(2, 202):  # 200 data rows on lines 2..201
        if line in INVALID_ADDRESSES:
            lines.append(f"{INVALID_ADDRESSES[line]};Broken {line};=HYPERLINK(\"x\")")
        else:
            lines.append(f"user{line}@example.com;User {line};ok")
    path = write(tmp_path / "list.csv", ("\r\n".join(lines) + "\r\n").encode("utf-8"))
    rejects = tmp_path / "rejects.csv"

    assert import_json(bulksend, path, "--list", "news", "--rejects", rejects) == report(
        rows=200, imported=190, invalid=10, rejects_file=str(rejects), delimiter=";")
    rows = read_rejects(rejects, delimiter=";")
    assert rows[0] == ["line", "reason", "email", "name", "note"]
    assert [int(row[0]) for row in rows[1:]] == sorted(INVALID_ADDRESSES)
    for line_no, reason, email, name, note in rows[1:]:
        address = INVALID_ADDRESSES[int(line_no)]
        shown = "'" + address if address.startswith("@") else address  # never a formula
        assert (email, name) == (shown, f"Broken {line_no}")
        assert note == "'=HYPERLINK(\"x\")"  # a spreadsheet shows it, never runs it
        if address:
            assert reason.startswith(f"invalid address {address!r}: ")
        else:
            assert reason == "no email address"
    assert lists(bulksend) == [
        {"name": "news", "subscribed": 190, "unsubscribed": 0, "suppressed": 0}]


def test_case_duplicates_count_once_and_the_first_spelling_wins(bulksend: Bulksend,
                                                                tmp_path: Path) -> None:
    data = (b"email,name\r\n"
            b"Bob@Example.com,Bob\r\n"
            b"ann@example.com,Ann\r\n"
            b"bob@example.COM,Robert\r\n"
            b"BOB@EXAMPLE.COM,\r\n")
    path = write(tmp_path / "dups.csv", data)
    rejects = tmp_path / "rejects.csv"

    assert import_json(bulksend, path, "--list", "news", "--rejects", rejects) == report(
        rows=4, imported=2, duplicates=2, rejects_file=str(rejects))
    bob = show(bulksend, "bob@example.com")
    assert (bob["email"], bob["name"]) == ("Bob@Example.com", "Bob")
    assert read_rejects(rejects)[1:] == [
        ["4", "duplicate of line 2", "bob@example.COM", "Robert"],
        ["5", "duplicate of line 2", "BOB@EXAMPLE.COM", ""],
    ]


def test_blank_and_delimiter_only_lines_are_not_rows(bulksend: Bulksend, tmp_path: Path) -> None:
    data = (b"email;name;city\r\n"
            b";;\r\n"
            b"\r\n"
            b"ann@example.com;Ann;Oslo\r\n"
            b" ; ; \r\n"
            b";;;\r\n"
            b"bob@example.com;Bob;Rome\r\n"
            b"\r\n\r\n")
    path = write(tmp_path / "gaps.csv", data)

    assert import_json(bulksend, path, "--list", "news") == report(
        rows=2, imported=2, delimiter=";")
    assert lists(bulksend) == [
        {"name": "news", "subscribed": 2, "unsubscribed": 0, "suppressed": 0}]


# --- what reaches a stored value --------------------------------------------------------------


def test_header_injection_in_names_is_stored_without_line_breaks(bulksend: Bulksend,
                                                                 tmp_path: Path) -> None:
    data = (b'email,name\r\n'
            b'eve@example.com,"Eve\r\nBcc: x@y"\r\n'
            b'mallory@example.com,=?UTF-8?Q?x=0D=0ABcc:_x@y?=\r\n')
    path = write(tmp_path / "inject.csv", data)

    assert import_json(bulksend, path, "--list", "news") == report(rows=2, imported=2)
    eve, mallory = show(bulksend, "eve@example.com"), show(bulksend, "mallory@example.com")
    assert eve["name"] == "Eve Bcc: x@y"
    assert mallory["name"] == "=?UTF-8?Q?x=0D=0ABcc:_x@y?="  # stored as text, not decoded
    for name in (eve["name"], mallory["name"]):
        assert not {"\r", "\n", "\x00"} & set(name)


def test_control_characters_and_bidi_overrides_are_removed_from_attributes(
        bulksend: Bulksend, tmp_path: Path) -> None:
    data = ("email,name,note,code\r\n"
            "ctl@example.com,Ctl\x07\u202eEvil,a\x01b\x1bc\x7fd\u2066e,\x0bX\x0cY\x85\r\n"
            ).encode("utf-8")
    path = write(tmp_path / "controls.csv", data)

    assert import_json(bulksend, path, "--list", "news") == report(rows=1, imported=1)
    ctl = show(bulksend, "ctl@example.com")
    assert (ctl["name"], ctl["attributes"]) == ("CtlEvil", {"note": "abcde", "code": "X Y"})


def test_nul_inside_an_attribute_is_removed(bulksend: Bulksend, tmp_path: Path) -> None:
    # Past the sniffed first block too (the next test covers a NUL inside it).
    lines = [b"email,name,note"]
    while sum(len(line) + 2 for line in lines) <= importer.SAMPLE_BYTES:
        lines.append(b"pad%d@example.com,Pad,%s" % (len(lines), b"x" * 60))
    lines.append(b"nul@example.com,Nul\x00Name,a\x00b\x00c")
    path = write(tmp_path / "nul.csv", b"\r\n".join(lines) + b"\r\n")

    assert import_json(bulksend, path, "--list", "news") == report(
        rows=len(lines) - 1, imported=len(lines) - 1)
    nul = show(bulksend, "nul@example.com")
    assert (nul["name"], nul["attributes"]) == ("NulName", {"note": "abc"})


def test_nul_in_an_attribute_near_the_top_of_the_file_is_removed(bulksend: Bulksend,
                                                                 tmp_path: Path) -> None:
    path = write(tmp_path / "nul.csv",
                 b"email,name,note\r\nnul@example.com,Nul,a\x00b\r\nok@example.com,Ok,c\r\n")

    assert import_json(bulksend, path, "--list", "news") == report(rows=2, imported=2)
    assert show(bulksend, "nul@example.com")["attributes"] == {"note": "ab"}


# --- files that are refused whole -------------------------------------------------------------


@pytest.mark.usefixtures("existing_list")
def test_file_without_an_email_column_is_refused_and_nothing_written(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "no-email.csv", b"name,city\r\nBob,Berlin\r\nAnn,Paris\r\n")

    assert_refused_without_writing(bulksend, engine, path, "no email column found")


def _random_bytes_with_nuls() -> bytes:
    return b"\x00\x01\x02\x03" + random.Random(7).randbytes(4096)


def _fake_xlsx() -> bytes:
    return b"PK\x03\x04\x14\x00\x06\x00" + random.Random(8).randbytes(4096)


@pytest.mark.usefixtures("existing_list")
@pytest.mark.parametrize(("name", "content", "message"), [
    ("random.bin", _random_bytes_with_nuls(), "not a text file"),
    ("subscribers.xlsx", _fake_xlsx(), "not a text file: a ZIP archive"),
], ids=["random-bytes-with-nuls", "fake-xlsx"])
def test_binary_file_is_refused_and_nothing_written(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path, name: str, content: bytes,
        message: str) -> None:
    path = write(tmp_path / name, content)

    assert_refused_without_writing(bulksend, engine, path, message)


# --- merging into a list ----------------------------------------------------------------------


THREE = (b"email,name,city\r\n"
         b"ann@example.com,Ann,Oslo\r\nbob@example.com,Bob,Rome\r\ncy@example.com,Cy,Nice\r\n")


def test_reimporting_the_same_file_updates_every_row_and_adds_nobody(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "three.csv", THREE)
    assert import_json(bulksend, path, "--list", "news") == report(rows=3, imported=3)
    after_first = row_counts(engine)

    assert import_json(bulksend, path, "--list", "news") == report(rows=3, updated=3)
    assert row_counts(engine) == after_first
    assert after_first["subscribers"] == after_first["list_members"] == 3


def test_reimporting_with_on_existing_skip_skips_every_row(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "three.csv", THREE)
    import_json(bulksend, path, "--list", "news")
    after_first = row_counts(engine)
    changed = write(tmp_path / "changed.csv",
                    THREE.replace(b"Ann,Oslo", b"Annie,Bergen"))

    assert import_json(bulksend, changed, "--list", "news", "--on-existing", "skip") == report(
        rows=3, skipped=3)
    assert row_counts(engine) == after_first
    ann = show(bulksend, "ann@example.com")
    assert (ann["name"], ann["attributes"]) == ("Ann", {"city": "Oslo"})


def test_update_merges_attributes_and_keeps_a_known_name_over_an_empty_cell(
        bulksend: Bulksend, tmp_path: Path) -> None:
    first = write(tmp_path / "first.csv", b"email,name,city\r\nann@example.com,Ann,Oslo\r\n")
    second = write(tmp_path / "second.csv",
                   b"email,name,plan\r\nann@example.com,,pro\r\nbob@example.com,Bob,free\r\n")
    import_json(bulksend, first, "--list", "news")

    assert import_json(bulksend, second, "--list", "news") == report(
        rows=2, imported=1, updated=1)
    ann = show(bulksend, "ann@example.com")
    assert (ann["name"], ann["attributes"]) == ("Ann", {"city": "Oslo", "plan": "pro"})


def test_update_keeps_a_known_attribute_over_an_empty_cell(bulksend: Bulksend,
                                                           tmp_path: Path) -> None:
    first = write(tmp_path / "first.csv", b"email,name,city\r\nann@example.com,Ann,Oslo\r\n")
    second = write(tmp_path / "second.csv", b"email,name,city\r\nann@example.com,Ann,\r\n")
    import_json(bulksend, first, "--list", "news")
    import_json(bulksend, second, "--list", "news")

    assert show(bulksend, "ann@example.com")["attributes"] == {"city": "Oslo"}


def test_suppressed_address_and_domain_are_stored_but_never_subscribed(
        bulksend: Bulksend, tmp_path: Path) -> None:
    assert bulksend("suppress", "add", "sup@example.com", "@blocked.org").code == 0
    data = (b"email,name\r\n"
            b"ok1@example.com,One\r\n"
            b"Sup@Example.com,Sup\r\n"
            b"anyone@Blocked.org,Any\r\n"
            b"ok2@example.com,Two\r\n")
    path = write(tmp_path / "with-suppressed.csv", data)

    assert import_json(bulksend, path, "--list", "news") == report(
        rows=4, imported=2, suppressed=2)
    assert lists(bulksend) == [
        {"name": "news", "subscribed": 2, "unsubscribed": 0, "suppressed": 2}]
    sup = show(bulksend, "sup@example.com")
    assert (sup["email"], sup["lists"], sup["suppressed"]) == (
        "Sup@Example.com", {"news": "unsubscribed"}, "manual")
    assert show(bulksend, "anyone@blocked.org")["lists"] == {"news": "unsubscribed"}


def test_dry_run_reports_the_real_counts_and_writes_nothing(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    import_json(bulksend, write(tmp_path / "old.csv", b"email\r\nann@example.com\r\n"),
                "--list", "news")
    path = write(tmp_path / "new.csv",
                 b"email,name\r\nann@example.com,Ann\r\nbob@example.com,Bob\r\n"
                 b"BOB@example.com,Bob2\r\nbroken,X\r\ncy@example.com,Cy\r\n")
    before, lists_before = row_counts(engine), lists(bulksend)
    expected = report(rows=5, imported=2, updated=1, duplicates=1, invalid=1)

    assert import_json(bulksend, path, "--list", "news", "--dry-run") == {
        **expected, "dry_run": True}
    assert import_json(bulksend, path, "--list", "other", "--dry-run")["imported"] == 3
    assert row_counts(engine) == before
    assert lists(bulksend) == lists_before
    assert import_json(bulksend, path, "--list", "news") == expected


def test_large_file_with_repeats_across_batches_counts_every_row_once(
        bulksend: Bulksend, tmp_path: Path) -> None:
    import_json(bulksend, write(tmp_path / "old.csv", b"email,name\r\nold1@example.com,Old\r\n"),
                "--list", "news")
    import_json(bulksend, write(tmp_path / "other.csv", b"email\r\nold2@example.com\r\n"),
                "--list", "other")
    assert bulksend("suppress", "add", "sup@example.com").code == 0
    count = 3 * subscribers.BATCH  # several batches, and parsed in a second process
    rows = ["email,name,city", *(f"user{i}@example.com,User {i},C{i}" for i in range(count))]
    specials = ["OLD1@example.com,Old One,Oslo", "old2@example.com,Two,",
                "USER5@EXAMPLE.COM,Again,X", "old1@example.com,Later,Y", "sup@example.com,Sup,Z",
                "broken,X,Y"]
    for position, special in zip((6000, 7000, 11000, 12000, 13000, 14000), specials):
        rows.insert(position, special)
    path = write(tmp_path / "big.csv", ("\r\n".join(rows) + "\r\n").encode())
    assert path.stat().st_size > importer.SAMPLE_BYTES
    line = {special: rows.index(special) + 1 for special in specials}
    rejects = tmp_path / "rejects.csv"

    assert import_json(bulksend, path, "--list", "news", "--rejects", rejects) == report(
        rows=count + 6, imported=count + 1, updated=1, duplicates=2, suppressed=1, invalid=1,
        rejects_file=str(rejects))
    assert [row[:2] for row in read_rejects(rejects)[1:]] == [
        [str(line["USER5@EXAMPLE.COM,Again,X"]), "duplicate of line 7"],
        [str(line["old1@example.com,Later,Y"]), f"duplicate of line {line[specials[0]]}"],
        [str(line["broken,X,Y"]), "invalid address 'broken': An email address must have an @-sign."],
    ]
    old1 = show(bulksend, "old1@example.com")
    assert (old1["name"], old1["attributes"], old1["lists"]) == (
        "Old One", {"city": "Oslo"}, {"news": "subscribed"})
    assert show(bulksend, "old2@example.com")["lists"] == {"news": "subscribed", "other": "subscribed"}
    assert show(bulksend, "user5@example.com")["name"] == "User 5"
    assert show(bulksend, "sup@example.com")["lists"] == {"news": "unsubscribed"}
    assert lists(bulksend)[0] == {"name": "news", "subscribed": count + 2, "unsubscribed": 0,
                                  "suppressed": 1}


def test_interrupted_import_leaves_the_store_as_it_was(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    import_json(bulksend, write(tmp_path / "old.csv", b"email\r\nuser7@example.com\r\n"),
                "--list", "big")
    rows = 12_000  # more than two batches
    assert rows > 2 * subscribers.BATCH
    text = "email,name\r\n" + "".join(f"user{i}@example.com,User {i}\r\n" for i in range(rows))
    path = write(tmp_path / "big.csv", text.encode("utf-8"))
    before, lists_before = row_counts(engine), lists(bulksend)
    calls: list[int] = []

    def interrupt_on_second_batch(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        subscribers.import_file(engine, path, "big", now=1e9, progress=interrupt_on_second_batch)
    assert len(calls) == 2
    assert row_counts(engine) == before
    assert lists(bulksend) == lists_before
    # Nothing of the aborted import lingers on a pooled connection to spoil the next one.
    again = subscribers.import_file(engine, path, "big", now=1e9)
    assert (again.rows, again.imported, again.updated) == (rows, rows - 1, 1)


# --- finding the address column ---------------------------------------------------------------


def test_email_column_by_header_name(bulksend: Bulksend, tmp_path: Path) -> None:
    path = write(tmp_path / "contacts.csv",
                 b"Name,Contact,Phone\r\nAnn,ann@example.com,123\r\nBob,bob@example.com,456\r\n")

    assert import_json(bulksend, path, "--list", "news", "--email-column", "contact") == report(
        rows=2, imported=2)
    ann = show(bulksend, "ann@example.com")
    assert (ann["name"], ann["attributes"]) == ("Ann", {"phone": "123"})


def test_email_column_by_number_overrides_the_email_header(bulksend: Bulksend,
                                                           tmp_path: Path) -> None:
    path = write(tmp_path / "billing.csv",
                 b"email,name,billing\r\nann@home.example,Ann,ann@work.example\r\n")

    assert import_json(bulksend, path, "--list", "news", "--email-column", "3") == report(
        rows=1, imported=1)
    ann = show(bulksend, "ann@work.example")
    assert (ann["name"], ann["attributes"]) == ("Ann", {"email": "ann@home.example"})
    assert bulksend("subscribers", "show", "ann@home.example").code == 1


def test_unknown_email_column_is_refused_naming_the_columns(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "contacts.csv", b"email,name\r\nann@example.com,Ann\r\n")
    before = row_counts(engine)

    result = bulksend("import", path, "--list", "news", "--email-column", "mail2")
    assert result.code == 1
    assert result.stderr == f"bulksend: {path}: no column 'mail2' (columns: email, name)\n"
    assert row_counts(engine) == before


def test_headerless_file_of_bare_addresses_imports_every_line(bulksend: Bulksend,
                                                              tmp_path: Path) -> None:
    path = write(tmp_path / "bare.txt",
                 b"ann@example.com\r\nbob@example.com\r\nnot-an-address\r\ncy@example.com\r\n")
    rejects = tmp_path / "rejects.csv"

    assert import_json(bulksend, path, "--list", "news", "--rejects", rejects) == report(
        rows=4, imported=3, invalid=1, rejects_file=str(rejects))
    assert show(bulksend, "ann@example.com")["lists"] == {"news": "subscribed"}
    assert [row[:1] + row[2:] for row in read_rejects(rejects)] == [
        ["line"], ["3", "not-an-address"]]


def test_headerless_file_whose_first_address_contains_email_imports_it(
        bulksend: Bulksend, tmp_path: Path) -> None:
    path = write(tmp_path / "bare.txt", b"myemail@example.com\r\nbob@example.com\r\n")

    assert import_json(bulksend, path, "--list", "news") == report(rows=2, imported=2)


def test_email_column_by_number_on_a_headerless_file_imports_the_first_row(
        bulksend: Bulksend, tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.csv", b"Ann,ann@example.com\r\nBob,bob@example.com\r\n")

    assert import_json(bulksend, path, "--list", "news", "--email-column", "2") == report(
        rows=2, imported=2)


def test_idn_address_is_stored_as_given_and_found_by_its_a_label(bulksend: Bulksend,
                                                                 tmp_path: Path) -> None:
    path = write(tmp_path / "idn.csv", "email,name\r\nuser@пример.рф,Юзер\r\n".encode())

    assert import_json(bulksend, path, "--list", "news") == report(rows=1, imported=1)
    by_a_label = show(bulksend, "user@xn--e1afmkfd.xn--p1ai")
    assert (by_a_label["email"], by_a_label["email_key"], by_a_label["name"]) == (
        "user@пример.рф", "user@xn--e1afmkfd.xn--p1ai", "Юзер")
    assert show(bulksend, "USER@ПРИМЕР.РФ")["email"] == "user@пример.рф"


# --- the rejects file -------------------------------------------------------------------------


def test_rejects_in_a_missing_directory_fails_before_anything_is_written(
        bulksend: Bulksend, engine: sa.Engine, tmp_path: Path) -> None:
    path = write(tmp_path / "list.csv", b"email\r\nann@example.com\r\nbroken\r\n")
    rejects = tmp_path / "no-such-dir" / "rejects.csv"
    before = row_counts(engine)

    result = bulksend("import", path, "--list", "news", "--rejects", rejects)
    assert result.code == 1
    assert str(rejects) in result.stderr
    assert row_counts(engine) == before
