"""The pure importer: encodings, delimiters, headers, address keys and cleaning."""

from __future__ import annotations

import io
import random
import string

import pytest
from email_validator import EmailNotValidError, validate_email

from bulksend import importer
from bulksend.errors import ImportFileError


@pytest.mark.parametrize(("data", "encoding"), [
    ("\ufeffemail;name\r\n".encode(), "utf-8-sig"),
    ("email\tname\r\n".encode("utf-16"), "utf-16"),
    ("email;name\r\nann@example.com;Ann\r\n".encode(), "utf-8"),
    ("email;name\r\nivan@example.com;Иван Петров\r\n".encode("utf-8"), "utf-8"),
    (("Почта;Имя;Город\r\n" + "ivan@example.com;Иван Петров;Москва\r\n" * 20).encode("cp1251"), "cp1251"),
])
def test_encoding_is_detected(data: bytes, encoding: str) -> None:
    assert importer.detect_encoding(data, "f.csv") == encoding


@pytest.mark.parametrize(("data", "message"), [
    (b"PK\x03\x04rest-of-zip", "Excel .xlsx"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1", "old Excel .xls"),
    (b"%PDF-1.7\n", "PDF"),
    (b"\x7fELF\x02\x01\x01" + b"\x00" * 9 + b"\x02\x00>\x00" * 40, "NUL bytes"),
])
def test_binary_files_are_refused_with_what_they_look_like(data: bytes, message: str) -> None:
    with pytest.raises(ImportFileError, match=f"f.csv: not a text file.*{message}"):
        importer.detect_encoding(data, "f.csv")


@pytest.mark.parametrize(("text", "delimiter"), [
    ("email,name,city\r\na@x.com,A,B\r\n", ","),
    ("email;name;city\r\na@x.com;A, Jr.;B\r\n", ";"),
    ("email\tname\r\na@x.com\tA;B\r\n", "\t"),
    ("email|name\r\na@x.com|A\r\n", "|"),
    ('email;name\r\na@x.com;"Smith, John"\r\n', ";"),
    ("email\r\na@x.com\r\n", ","),  # one column: nothing to split
])
def test_delimiter_is_sniffed(text: str, delimiter: str) -> None:
    assert importer.sniff_delimiter(text.splitlines(keepends=True)) == delimiter


@pytest.mark.parametrize(("header", "email", "name"), [
    (["Email", "Name"], 0, 1),
    (["Name", "E-Mail"], 1, 0),
    (["ФИО", "Эл. почта"], 1, 0),
    (["Имя", "Адрес"], 1, 0),
    (["Full name", "Work email", "Phone"], 1, 0),
    (["mail", "nom"], 0, 1),
])
def test_email_and_name_columns_are_found_by_header(header: list[str], email: int, name: int) -> None:
    layout = importer.build_layout(header, "utf-8", ",", importer.Options(), "f.csv")
    assert (layout.email_index, layout.name_index, layout.has_header) == (email, name, True)


def test_first_and_last_name_columns_make_the_name() -> None:
    layout = importer.build_layout(["email", "First Name", "Last Name"], "utf-8", ",",
                                   importer.Options(), "f.csv")
    assert layout.first_last == (1, 2)
    assert dict(layout.attributes) == {1: "first_name", 2: "last_name"}


def test_headerless_file_of_addresses_uses_the_address_column() -> None:
    layout = importer.build_layout(["Ann", "ann@example.com"], "utf-8", ",", importer.Options(), "f.csv")
    assert (layout.has_header, layout.email_index) == (False, 1)


def test_no_email_column_names_the_file_and_the_fix() -> None:
    with pytest.raises(ImportFileError, match="f.csv: no email column found.*--email-column"):
        importer.build_layout(["name", "city"], "utf-8", ",", importer.Options(), "f.csv")


def test_attribute_keys_are_identifiers_and_unique() -> None:
    layout = importer.build_layout(["email", "City", "city", "Дата рождения", "2nd", ""],
                                   "utf-8", ",", importer.Options(), "f.csv")
    assert [key for _, key in layout.attributes] == ["city", "city_2", "дата_рождения", "c_2nd", "col6"]


@pytest.mark.parametrize(("raw", "clean"), [
    ("Ann\r\nBcc: x@y", "Ann Bcc: x@y"),
    ("a\rb\nc\x00d", "a b cd"),
    ("  spaced   out  ", "spaced out"),
    ("tab\there", "tab here"),
    ("left\u202eright\u2066", "leftright"),
    ("line\u2028sep\x85", "line sep"),
    ("=?UTF-8?Q?x=0D=0ABcc:_x@y?=", "=?UTF-8?Q?x=0D=0ABcc:_x@y?="),  # no control character in it
    ("plain", "plain"),
])
def test_clean_text_removes_every_control_character(raw: str, clean: str) -> None:
    assert importer.clean_text(raw) == clean


@pytest.mark.parametrize(("address", "key"), [
    ("Bob@Example.COM", "bob@example.com"),
    ("  <bob@example.com> ", "bob@example.com"),
    ("mailto:bob@example.com", "bob@example.com"),
    ("bob@пример.рф", "bob@xn--e1afmkfd.xn--p1ai"),
    ("Вася@почта.рф", "вася@xn--80a1acny.xn--p1ai"),
    ("bob@xn--e1afmkfd.xn--p1ai", "bob@xn--e1afmkfd.xn--p1ai"),
    ("o'neil+tag@example.com", "o'neil+tag@example.com"),
    ("\u00a0bob@example.com\u200b", "bob@example.com"),
])
def test_address_key_is_lower_case_with_an_idna_domain(address: str, key: str) -> None:
    assert importer.AddressValidator().key(importer.strip_address(address))[0] == key


@pytest.mark.parametrize("address", [
    "bob@@example.com", "bob", "bob@", "@example.com", "bob@example", "bob@exa mple.com",
    "bob@example.com.", "bob@localhost", "bob@x.test", "a..b@example.com", ".a@example.com",
    "bob@" + "a" * 64 + ".com", "bob@ab--cd.com",
])
def test_invalid_addresses_are_refused(address: str) -> None:
    with pytest.raises(importer.InvalidAddress):
        importer.AddressValidator().key(address)


def test_domain_fast_path_agrees_with_email_validator() -> None:
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-."
    domains = ["a.test", "x.local", "EXAMPLE.COM", "a.co1", "1.2.3.4", "xn--e1afmkfd.xn--p1ai"]
    domains += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20_000)]
    validator = importer.AddressValidator()
    for domain in domains:
        fast = validator._check_domain(domain)  # noqa: SLF001 - the function under test
        try:
            slow: str | None = validate_email(f"a@{domain}", check_deliverability=False).ascii_domain.lower()
        except EmailNotValidError:
            slow = None
        assert (fast if isinstance(fast, str) else None) == slow, domain


def test_rows_keep_original_line_numbers_across_quoted_newlines() -> None:
    data = 'email,name\r\na@example.com,"Anna\r\nMaria"\r\n\r\nbad,X\r\nb@example.com,B\r\n'.encode()
    _, rows = importer.open_rows(io.BytesIO(data), "f.csv")
    got = [(r.line, type(r).__name__) for r in rows]
    assert got == [(2, "Subscriber"), (5, "Rejected"), (6, "Subscriber")]


def test_extra_non_empty_fields_reject_the_row() -> None:
    data = b"email,name\r\na@example.com,Ann,extra\r\nb@example.com,Bob,,\r\n"
    _, rows = importer.open_rows(io.BytesIO(data), "f.csv")
    result = list(rows)
    assert isinstance(result[0], importer.Rejected) and "3 fields" in result[0].reason
    assert isinstance(result[1], importer.Subscriber)


def test_invalid_utf8_after_the_sample_names_the_line() -> None:
    data = b"email\r\n" + b"a@example.com\r\n" * 10_000 + b"b\xff@example.com\r\n"
    _, rows = importer.open_rows(io.BytesIO(data), "f.csv")
    with pytest.raises(ImportFileError, match="f.csv: not valid utf-8 after line"):
        list(rows)
