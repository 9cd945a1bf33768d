"""Header fields written by hand: encoded-words, folding, addresses, URIs."""

from __future__ import annotations

import email.header
import re

import pytest

from bulksend import headers

ENCODED_WORD = re.compile(r"=\?UTF-8\?B\?[A-Za-z0-9+/=]*\?=")


@pytest.mark.parametrize("text", [
    "Привет", "ы" * 200, "a" * 300, "😀" * 50, "mixed ascii и кириллица " * 10, "x", "",
])
def test_encoded_words_are_short_whole_characters_and_decode_back(text: str) -> None:
    words = headers.encoded_words(text, 60)
    assert all(ENCODED_WORD.fullmatch(word) for word in words)
    assert len(words[0]) <= 60 if words else text == ""
    assert all(len(word) <= 75 for word in words)
    # Each word decodes on its own: no UTF-8 sequence is split between two words.
    decoded = [email.header.decode_header(word)[0][0].decode("utf-8") for word in words]
    assert "".join(decoded) == text


@pytest.mark.parametrize(("value", "cleaned"), [
    ("a\r\nb", "a b"), ("a\rb\nc\x00d", "a b c d"), ("\t a \t", "a"), ("a\u2028b\x85c", "a b c"),
    ("a\ud800b", "a b"), ("plain", "plain"), ("Иван", "Иван"),
])
def test_clean_turns_every_control_character_into_a_space(value: str, cleaned: str) -> None:
    assert headers.clean(value) == cleaned


@pytest.mark.parametrize(("text", "encoded"), [
    ("Hello", False), ("Привет", True), ("has =?utf-8?q?x?= inside", True),
    ("a" * 80, True), ("short words " * 20, False),
])
def test_needs_encoding(text: str, encoded: bool) -> None:
    assert headers.needs_encoding(text) is encoded


def test_long_plain_subject_folds_at_spaces_and_unfolds_to_the_same_text() -> None:
    text = "The  quick brown fox " * 12
    field = headers.unstructured("Subject", text)
    lines = field.split("\r\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(" ") and line.strip() for line in lines[1:])
    assert field.replace("\r\n", "") == "Subject: " + text.strip()


@pytest.mark.parametrize(("address", "written"), [
    ("ann@example.com", "ann@example.com"),
    ("Ann@Example.COM", "Ann@Example.COM"),
    ("user@пример.рф", "user@xn--e1afmkfd.xn--p1ai"),
    ("user@Bücher.example", "user@xn--bcher-kva.example"),
    ("иван@пример.рф", "иван@xn--e1afmkfd.xn--p1ai"),
    ('"john doe"@example.com', '"john doe"@example.com'),
    ("a\r\nb@example.com", '"a b"@example.com'),
    ('a"b@exa mple.com', '"a\\"b"@example.com'),
])
def test_addresses_get_a_label_domains(address: str, written: str) -> None:
    assert headers.address_for_header(address) == written


@pytest.mark.parametrize(("value", "uri"), [
    ("https://example.com/u/ABC_def-123", "https://example.com/u/ABC_def-123"),
    ("https://example.com/u/a b>c\r\n", "https://example.com/u/ab%3Ec"),
    ("https://example.com/u/é", "https://example.com/u/%C3%A9"),
])
def test_uris_cannot_break_out_of_angle_brackets(value: str, uri: str) -> None:
    assert headers.uri(value) == uri


@pytest.mark.parametrize(("value", "uri"), [
    ("unsubscribe+TOKEN@example.com", "mailto:unsubscribe+TOKEN@example.com"),
    ("unsubscribe+TOKEN@пример.рф", "mailto:unsubscribe+TOKEN@xn--e1afmkfd.xn--p1ai"),
    ("mailto:u@example.com?subject=unsubscribe", "mailto:u@example.com?subject=unsubscribe"),
])
def test_mailto(value: str, uri: str) -> None:
    assert headers.mailto(value) == uri


@pytest.mark.parametrize(("value", "written"), [
    ("<a.b@example.com>", "<a.b@example.com>"), ("a.b@example.com", "<a.b@example.com>"),
    ("<a\r\n.b@example.com>", "<a.b@example.com>"),
])
def test_message_ids_keep_their_brackets_and_lose_whitespace(value: str, written: str) -> None:
    assert headers.msg_id(value) == written


def test_date_is_rfc5322_in_utc_with_english_names() -> None:
    assert headers.date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert headers.date(1_700_000_000.9) == "Tue, 14 Nov 2023 22:13:20 +0000"
