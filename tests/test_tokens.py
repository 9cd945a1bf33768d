"""HMAC delivery tokens: they round-trip, and nothing forged, altered or malformed reads."""

from __future__ import annotations

import re

import pytest

from bulksend.tokens import (
    BOUNCE, MESSAGE_ID, UNSUBSCRIBE, make_token, read_token, verp_address, verp_token,
)

SECRET = b"s3cret-for-tests-only-0123456789"
OTHER_SECRET = b"another-secret-for-tests-987654"
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
IDS = [0, 1, 127, 128, 300, 16_383, 16_384, 1_000_000_000, 2**63 - 1]


@pytest.mark.parametrize("delivery_id", IDS)
@pytest.mark.parametrize("purpose", [UNSUBSCRIBE, BOUNCE, MESSAGE_ID])
def test_token_round_trips(purpose: str, delivery_id: int) -> None:
    token = make_token(SECRET, purpose, delivery_id)
    assert read_token(SECRET, purpose, token) == delivery_id


def test_token_is_lower_case_base32_fit_for_local_parts_and_urls() -> None:
    for delivery_id in IDS:
        assert re.fullmatch(r"[a-z2-7]+", make_token(SECRET, BOUNCE, delivery_id))


def test_tokens_are_short() -> None:
    assert len(make_token(SECRET, UNSUBSCRIBE, 1)) == 21
    assert len(make_token(SECRET, UNSUBSCRIBE, 1_000_000_000)) == 28
    assert len(make_token(SECRET, UNSUBSCRIBE, 2**63 - 1)) == 34


def test_token_depends_on_id_purpose_and_secret() -> None:
    tokens = {make_token(SECRET, UNSUBSCRIBE, 7), make_token(SECRET, BOUNCE, 7),
              make_token(SECRET, MESSAGE_ID, 7), make_token(SECRET, UNSUBSCRIBE, 8),
              make_token(OTHER_SECRET, UNSUBSCRIBE, 7)}
    assert len(tokens) == 5


def test_token_made_with_another_secret_does_not_read() -> None:
    assert read_token(SECRET, UNSUBSCRIBE, make_token(OTHER_SECRET, UNSUBSCRIBE, 42)) is None


@pytest.mark.parametrize("made_for,read_as", [(BOUNCE, UNSUBSCRIBE), (UNSUBSCRIBE, BOUNCE),
                                              (MESSAGE_ID, UNSUBSCRIBE), (BOUNCE, MESSAGE_ID)])
def test_token_for_one_purpose_does_not_read_for_another(made_for: str, read_as: str) -> None:
    assert read_token(SECRET, read_as, make_token(SECRET, made_for, 42)) is None


@pytest.mark.parametrize("delivery_id", [5, 1_000_000_000])
def test_every_single_character_alteration_is_rejected(delivery_id: int) -> None:
    token = make_token(SECRET, UNSUBSCRIBE, delivery_id)
    altered = [token[:position] + char + token[position + 1:]
               for position in range(len(token)) for char in ALPHABET if char != token[position]]
    assert len(altered) == 31 * len(token)
    assert [alt for alt in altered if read_token(SECRET, UNSUBSCRIBE, alt) is not None] == []


def test_upper_cased_token_still_reads() -> None:
    token = make_token(SECRET, BOUNCE, 123_456)
    assert read_token(SECRET, BOUNCE, token.upper()) == 123_456
    assert read_token(SECRET, BOUNCE, token[:5].upper() + token[5:]) == 123_456


def _hostile_inputs() -> list[object]:
    token = make_token(SECRET, UNSUBSCRIBE, 99)
    kelvin = token.replace("k", "\u212a") if "k" in token else "\u212a" + token[1:]
    return [
        "", " ", "=", token[:-1], token[:-4], token[1:], token + "a", token + "aa", token + "=",
        token + "====", " " + token, token + "\n", token[:10] + "-" + token[11:], "a" * 21,
        "2" * 34, "a" * 35, "a" * 10_000_000, "0" * 21, "1" * 21, "8" * 21, "é" * 21,
        token[:-1] + "é", kelvin, "../../etc/passwd", "%00" * 7, "\x00" * 21, None, 99,
        token.encode(), ["x"],
    ]


@pytest.mark.parametrize("hostile", _hostile_inputs(), ids=lambda v: repr(v)[:30])
def test_malformed_input_reads_as_none_without_raising(hostile: object) -> None:
    assert read_token(SECRET, UNSUBSCRIBE, hostile) is None  # type: ignore[arg-type]


def test_non_minimal_varint_for_the_same_id_is_rejected() -> None:
    # b"\x81\x00" decodes to 1 like b"\x01"; it must not be a second spelling of id 1.
    import base64

    token = make_token(SECRET, UNSUBSCRIBE, 1)
    raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    padded = b"\x81\x00" + raw[1:]
    forged = base64.b32encode(padded).decode().rstrip("=").lower()
    assert read_token(SECRET, UNSUBSCRIBE, forged) is None


@pytest.mark.parametrize("bad_id", [-1, 2**63, 1.0, True, "1"])
def test_make_token_refuses_ids_outside_the_database_range(bad_id: object) -> None:
    with pytest.raises(ValueError, match="delivery id"):
        make_token(SECRET, UNSUBSCRIBE, bad_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("secret", [b"", b"short", "a-str-secret-of-enough-length"])
def test_weak_or_non_bytes_secret_is_refused(secret: object) -> None:
    with pytest.raises(ValueError, match="secret"):
        make_token(secret, UNSUBSCRIBE, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="secret"):
        read_token(secret, UNSUBSCRIBE, "a" * 21)  # type: ignore[arg-type]


def test_verp_address_puts_the_token_after_a_plus() -> None:
    token = make_token(SECRET, BOUNCE, 42)
    assert verp_address("bounces@example.com", token) == f"bounces+{token}@example.com"


def test_verp_address_writes_the_domain_as_a_lower_case_a_label() -> None:
    assert verp_address("bounces@Пример.РФ", "tok") == "bounces+tok@xn--e1afmkfd.xn--p1ai"
    assert verp_address("bounces@News.Example.COM", "tok") == "bounces+tok@news.example.com"


@pytest.mark.parametrize("bad", ["bounces", "@example.com", "bounces@"])
def test_verp_address_refuses_a_return_path_that_is_not_an_address(bad: str) -> None:
    with pytest.raises(ValueError, match="return path"):
        verp_address(bad, "tok")


def test_verp_token_round_trips_through_verp_address_and_read_token() -> None:
    token = make_token(SECRET, BOUNCE, 1_000_000_000)
    address = verp_address("bounces@пример.рф", token)
    assert read_token(SECRET, BOUNCE, verp_token(address, "bounces") or "") == 1_000_000_000


def test_verp_token_survives_case_folding_and_angle_brackets() -> None:
    token = make_token(SECRET, BOUNCE, 77)
    for address in (f"BOUNCES+{token.upper()}@EXAMPLE.COM", f"<bounces+{token}@example.com>",
                    f" Bounces+{token}@example.com "):
        assert verp_token(address, "bounces") == token
        assert read_token(SECRET, BOUNCE, verp_token(address, "bounces") or "") == 77


@pytest.mark.parametrize("address", [
    "bounces@example.com", "bounces+@example.com", "other+abcdefghijklmnopqrstu@example.com",
    "bounces-abcdefghijklmnopqrstu@example.com", "bounces+abc!defghijklmnopqrstu@example.com",
    "bounces+abcdefghijklmnopqrstu", "", "bounces+ábcdefghijklmnopqrstu@example.com",
])
def test_verp_token_is_none_for_addresses_that_carry_no_token(address: str) -> None:
    assert verp_token(address, "bounces") is None
