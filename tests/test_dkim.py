"""DKIM signing: what `sign` writes verifies with dkimpy; tampering or an added header breaks it."""

from __future__ import annotations

import base64
import email.header
import hashlib
import re
import stat
from collections.abc import Callable
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bulksend.config import DkimKey
from bulksend.dkim import (
    SIGNED_HEADERS, Signer, keygen, load_signer, public_txt, relaxed_body, relaxed_header, sign,
)
from bulksend.errors import BulksendError, ConfigError

SUBJECT = "Новости недели: скидки до 20 % на всё — только до пятницы!"
EMPTY_BODY_SHA256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  # RFC 4871 erratum 1376


def realistic_message() -> bytes:
    """A one-recipient campaign message as render will build it: CRLF, MIME, folded headers."""
    subject = email.header.Header(SUBJECT, "utf-8").encode(maxlinelen=76).replace("\n", "\r\n")
    assert "\r\n " in subject  # the test needs a folded RFC 2047 subject
    head = [
        "From: Example News <news@example.com>",
        "To: Anna Ivanova <anna@example.org>",
        f"Subject: {subject}",
        "Date: Tue, 03 Mar 2026 10:00:00 +0300",
        "Message-ID: <k4tgu3mvb2wxq7pzne5a3lrvcy@example.com>",
        "MIME-Version: 1.0",
        'Content-Type: multipart/alternative;\r\n\tboundary="===============b0undary=="',
        "List-Id: Example News <news.example.com>",
        "List-Unsubscribe: <https://example.com/u/k4tgu3mvb2wxq7pzne5a3lrvcy>,\r\n"
        " <mailto:unsubscribe@example.com?subject=k4tgu3mvb2wxq7pzne5a3lrvcy>",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        "Feedback-ID: 17:campaign:bulksend",
        "X-Bulksend-Delivery: 3vb2wxq7pzne5a3lrvcyk4tgu",
    ]
    body = [
        "--===============b0undary==",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        "Hello  Anna,\t",
        "=D0=9F=D1=80=D0=B8=D0=B2=D0=B5=D1=82 \t =D0=BC=D0=B8=D1=80   ",
        "Unsubscribe: https://example.com/u/k4tgu3mvb2wxq7pzne5a3lrvcy",
        "",
        "--===============b0undary==",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        "",
        "<p>Hello&nbsp;Anna,</p>   <p><a",
        " href=3D\"https://example.com/u/k4tgu3mvb2wxq7pzne5a3lrvcy\">",
        "Unsubscribe</a></p>",
        "--===============b0undary==--",
        "", "", "",  # trailing empty lines: relaxed canonicalization ignores them
    ]
    return "\r\n".join(head + [""] + body).encode("ascii")


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def signer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Signer:
    """A signer for example.com with a freshly generated RSA-2048 or Ed25519 key."""
    directory = tmp_path_factory.mktemp("dkim")
    path, _ = keygen("example.com", "s2026", directory, ed25519=request.param == "ed25519")
    return load_signer(DkimKey("example.com", "s2026", path, request.param))


def dns_for(signer: Signer) -> Callable[..., bytes]:
    """A dkimpy dnsfunc answering the signer's selector record, and nothing else."""
    def txt(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{signer.selector}._domainkey.{signer.domain}.".encode()
        return public_txt(signer).encode("ascii")
    return txt


def verifies(message: bytes, signer: Signer) -> bool:
    return bool(dkimpy.verify(message, dnsfunc=dns_for(signer)))


def tags(signed: bytes) -> dict[str, str]:
    """The tag=value pairs of the first DKIM-Signature header, unfolded."""
    header = re.match(rb"DKIM-Signature:(.*?)\r\n(?![ \t])", signed, re.S)
    assert header is not None
    value = re.sub(r"\s+", "", header[1].decode("ascii"))
    return dict(part.split("=", 1) for part in value.split(";") if part)


# ---- signatures verify, tampering breaks them ----------------------------------------------

def test_signed_message_verifies_with_dkimpy(signer: Signer) -> None:
    signed = sign(realistic_message(), signer, timestamp=1_772_521_200)
    assert signed.endswith(realistic_message())
    assert verifies(signed, signer)


def test_signature_without_timestamp_verifies_and_has_no_t_tag(signer: Signer) -> None:
    signed = sign(realistic_message(), signer)
    assert "t" not in tags(signed)
    assert verifies(signed, signer)


def test_tags_name_algorithm_canonicalization_domain_and_selector(signer: Signer) -> None:
    found = tags(sign(realistic_message(), signer, timestamp=1_772_521_200))
    algorithm = "rsa-sha256" if signer.algorithm == "rsa" else "ed25519-sha256"
    assert {k: found[k] for k in "v a c d s t".split()} == {
        "v": "1", "a": algorithm, "c": "relaxed/relaxed", "d": "example.com", "s": "s2026",
        "t": "1772521200"}
    assert list(found)[-1] == "b"


@pytest.mark.parametrize("old,new", [
    (b"Subject: =?utf-8?b?0J3", b"Subject: =?utf-8?b?0J4"),
    (b"anna@example.org", b"anne@example.org"),
    (b"news@example.com>\r\nTo", b"newz@example.com>\r\nTo"),
    (b"<https://example.com/u/k", b"<https://example.com/v/k"),
    (b"One-Click", b"One-Clock"),
    (b"10:00:00", b"10:00:01"),
    (b"17:campaign", b"18:campaign"),
])
def test_changing_one_byte_of_a_signed_header_fails(signer: Signer, old: bytes,
                                                     new: bytes) -> None:
    signed = sign(realistic_message(), signer)
    assert signed.count(old) == 1
    assert not verifies(signed.replace(old, new), signer)


@pytest.mark.parametrize("old,new", [(b"Hello  Anna", b"Hello  Anne"), (b"Unsubscribe</a>",
                                                                        b"Unsubscribe</b>")])
def test_changing_one_byte_of_the_body_fails(signer: Signer, old: bytes, new: bytes) -> None:
    signed = sign(realistic_message(), signer)
    assert not verifies(signed.replace(old, new), signer)


def test_whitespace_changes_are_tolerated_by_relaxed_canonicalization(signer: Signer) -> None:
    signed = sign(realistic_message(), signer)
    respaced = (signed.replace(b"Hello  Anna,\t", b"Hello Anna,")
                .replace(b"List-Unsubscribe-Post: ", b"List-Unsubscribe-Post:\t  ")
                .replace(b"--==\r\n\r\n\r\n", b"--==\r\n"))
    assert respaced != signed
    assert verifies(respaced, signer)


@pytest.mark.parametrize("header", [
    b"From: Mallory <mallory@example.net>", b"Subject: Your account is locked",
    b"List-Unsubscribe: <https://evil.example.net/u>", b"List-Unsubscribe-Post: x=y",
])
@pytest.mark.parametrize("where", ["top", "bottom"])
def test_adding_a_second_instance_of_a_signed_header_fails(signer: Signer, header: bytes,
                                                           where: str) -> None:
    signed = sign(realistic_message(), signer)
    if where == "top":
        tampered = header + b"\r\n" + signed
    else:
        tampered = signed.replace(b"\r\nX-Bulksend-Delivery:", b"\r\n" + header
                                  + b"\r\nX-Bulksend-Delivery:", 1)
    assert not verifies(tampered, signer)


def test_adding_an_unsigned_header_keeps_the_signature_valid(signer: Signer) -> None:
    signed = sign(realistic_message(), signer)
    relayed = b"Received: from relay.example.net by mx.example.org; Tue, 3 Mar 2026\r\n" + signed
    assert verifies(relayed, signer)


def test_h_lists_each_header_once_more_than_it_occurs(signer: Signer) -> None:
    message = b"Received: x\r\nTo: a@example.org\r\nTo: b@example.org\r\n" + realistic_message()
    h = tags(sign(message, signer))["h"].split(":")
    present = ["from", "to", "subject", "date", "message-id", "mime-version", "content-type",
               "list-id", "list-unsubscribe", "list-unsubscribe-post", "feedback-id"]
    assert {name: h.count(name) for name in set(h)} == {
        **{name: 2 for name in present}, "to": 4,
        "reply-to": 1}  # absent, listed once so none can be added; no Received or X- headers
    assert "list-unsubscribe" in h and "list-unsubscribe-post" in h
    assert [name.lower() for name in SIGNED_HEADERS] == list(dict.fromkeys(h))  # in order


def test_adding_a_header_the_message_lacked_breaks_the_signature(signer: Signer) -> None:
    signed = sign(realistic_message(), signer)
    assert b"\r\nReply-To:" not in signed
    assert not verifies(b"Reply-To: attacker@example.net\r\n" + signed, signer)


def test_signature_header_is_folded_to_78_columns_with_crlf(signer: Signer) -> None:
    signed = sign(realistic_message(), signer, timestamp=1_772_521_200)
    header = signed[:len(signed) - len(realistic_message())]
    assert header.startswith(b"DKIM-Signature: v=1;") and header.endswith(b"\r\n")
    lines = header.split(b"\r\n")[:-1]
    assert len(lines) > 2
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert b"\n" not in header.replace(b"\r\n", b"")


def test_message_without_from_or_with_bare_lf_is_refused(signer: Signer) -> None:
    with pytest.raises(ValueError, match="From"):
        sign(b"To: a@example.org\r\nSubject: x\r\n\r\nbody\r\n", signer)
    with pytest.raises(ValueError, match="bare"):
        sign(b"From: a@example.com\nSubject: x\n\nbody\n", signer)


def test_signer_uses_the_a_label_of_an_idn_domain(tmp_path: Path) -> None:
    path, record = keygen("пример.рф", "s1", tmp_path, ed25519=True)
    signer = load_signer(DkimKey("пример.рф", "s1", path, "ed25519"))
    assert signer.domain == "xn--e1afmkfd.xn--p1ai"
    assert record.startswith("s1._domainkey.xn--e1afmkfd.xn--p1ai. IN TXT ")
    assert verifies(sign(realistic_message(), signer), signer)


# ---- canonicalization -----------------------------------------------------------------------

RFC_EXAMPLE = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"  # RFC 6376 §3.4.5


def test_rfc6376_example_headers_in_relaxed_form() -> None:
    assert relaxed_header(b"A: X") == b"a:X\r\n"
    assert relaxed_header(b"B : Y\t\r\n\tZ  ") == b"b:Y Z\r\n"
    assert relaxed_header(b"SUBJect: AbC") == b"subject:AbC\r\n"  # §3.4.2 step 1


def test_rfc6376_example_body_in_relaxed_form() -> None:
    assert relaxed_body(RFC_EXAMPLE.split(b"\r\n\r\n", 1)[1]) == b" C\r\nD E\r\n"


@pytest.mark.parametrize("body,canonical", [
    (b"", b""), (b"\r\n", b""), (b"\r\n\r\n \t\r\n", b""),
    (b"last line without CRLF  ", b"last line without CRLF\r\n"),
    (b"a\r\n\r\nb\r\n\r\n", b"a\r\n\r\nb\r\n"),
    (b"\t\tindented\r\n", b" indented\r\n"),
])
def test_relaxed_body_edge_cases(body: bytes, canonical: bytes) -> None:
    assert relaxed_body(body) == canonical


def test_empty_body_hashes_to_the_errata_value() -> None:
    digest = base64.b64encode(hashlib.sha256(relaxed_body(b"\r\n\r\n")).digest()).decode()
    assert digest == EMPTY_BODY_SHA256


@pytest.mark.parametrize("body", [
    None, b"", b"\r\n\r\n", b"one line\r\n", b" lead \t and trail \t\r\n\r\n \r\n",
])
def test_body_hash_matches_dkimpy(signer: Signer, body: bytes | None) -> None:
    message = realistic_message() if body is None else b"From: a@example.com\r\n\r\n" + body
    pem = signer.private_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()) \
        if signer.algorithm == "rsa" else None
    if pem is None:  # dkimpy wants an Ed25519 key as base64 of the raw 32-byte seed
        pem = base64.b64encode(signer.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))
    algorithm = b"rsa-sha256" if signer.algorithm == "rsa" else b"ed25519-sha256"
    theirs = dkimpy.sign(message, b"s2026", b"example.com", pem, signature_algorithm=algorithm,
                         canonicalize=(b"relaxed", b"relaxed"), include_headers=[b"from"])
    assert tags(theirs)["bh"] == tags(sign(message, signer))["bh"]
    assert verifies(theirs + message, signer)  # the same key and record, so dkimpy agrees


# ---- keys -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ed25519", [False, True])
def test_keygen_writes_a_private_0600_key_that_load_signer_accepts(tmp_path: Path,
                                                                   ed25519: bool) -> None:
    path, record = keygen("example.com", "s2026", tmp_path / "dkim", ed25519=ed25519)
    assert path == tmp_path / "dkim" / "example.com.s2026.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    signer = load_signer(DkimKey("example.com", "s2026", path, "ed25519" if ed25519 else "rsa"))
    assert signer.algorithm == ("ed25519" if ed25519 else "rsa")
    if not ed25519:
        assert isinstance(signer.private_key, rsa.RSAPrivateKey)
        assert signer.private_key.key_size == 2048


@pytest.mark.parametrize("ed25519", [False, True])
def test_keygen_record_publishes_the_public_key(tmp_path: Path, ed25519: bool) -> None:
    path, record = keygen("example.com", "s2026", tmp_path, ed25519=ed25519)
    name, _, strings = record.partition(" IN TXT ")
    assert name == "s2026._domainkey.example.com."
    parts = re.findall(r'"([^"]*)"', strings)
    assert all(len(part) <= 255 for part in parts)
    assert " ".join(f'"{part}"' for part in parts) == strings
    text = "".join(parts)
    signer = load_signer(DkimKey("example.com", "s2026", path, "rsa"))
    assert text == public_txt(signer)
    key = dict(tag.strip().split("=", 1) for tag in text.split(";"))
    public = signer.private_key.public_key()
    if ed25519:
        assert key["k"] == "ed25519"
        assert base64.b64decode(key["p"]) == public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        assert key["k"] == "rsa" and len(parts) == 2
        published = serialization.load_der_public_key(base64.b64decode(key["p"]))
        assert published.public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_keygen_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    path, _ = keygen("example.com", "s2026", tmp_path, ed25519=True)
    before = path.read_bytes()
    with pytest.raises(BulksendError, match=re.escape(str(path))):
        keygen("example.com", "s2026", tmp_path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("domain,selector", [("../etc", "s1"), ("example.com", "../../x"),
                                             ("localhost", "s1"), ("example.com", "a/b")])
def test_keygen_refuses_names_that_are_not_dns_names(tmp_path: Path, domain: str,
                                                     selector: str) -> None:
    with pytest.raises(BulksendError, match="dkim keygen"):
        keygen(domain, selector, tmp_path)
    assert list(tmp_path.iterdir()) == []


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
         encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption or serialization.NoEncryption())


@pytest.mark.parametrize("content,message", [
    (lambda: _pem(rsa.generate_private_key(65537, 1024)), "1024-bit RSA key"),
    (lambda: _pem(ec.generate_private_key(ec.SECP256R1())), "unsupported type"),
    (lambda: _pem(ec.generate_private_key(ec.SECP256R1()),
                  serialization.BestAvailableEncryption(b"pw")), "encrypted"),
    (lambda: b"not a key\n", "not an RSA key"),
    (None, "cannot read"),
], ids=["rsa-1024", "ec", "encrypted", "garbage", "missing"])
def test_load_signer_refuses_weak_or_unusable_keys(tmp_path: Path,
                                                   content: Callable[[], bytes] | None,
                                                   message: str) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content())
    with pytest.raises(ConfigError, match=message) as error:
        load_signer(DkimKey("example.com", "s1", path, "rsa"))
    assert str(path) in str(error.value)
