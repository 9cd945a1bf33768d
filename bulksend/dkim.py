"""DKIM signing (RFC 6376): relaxed/relaxed, rsa-sha256 and ed25519-sha256 (RFC 8463).

The signature is made with `cryptography`, not dkimpy, whose RSA is pure Python and about 20
times slower (bench/dkim_bench.py); dkimpy is only needed by the tests, to verify what we sign.
`sign` is the last step before sending (DESIGN §7): it prepends one ``DKIM-Signature`` whose
``h=`` lists every present header of `SIGNED_HEADERS` once more than it occurs (oversigning,
RFC 6376 §5.4.2 and §8.15), so a second From, Subject or List-Unsubscribe added on the way
breaks the signature instead of riding on it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import (
    RSAPrivateKey, RSAPublicKey, generate_private_key,
)

from bulksend import config_values
from bulksend.config import DkimKey
from bulksend.errors import BulksendError, ConfigError

__all__ = [
    "MIN_RSA_BITS", "SIGNED_HEADERS", "Signer", "keygen", "load_signer", "public_txt",
    "relaxed_body", "relaxed_header", "sign",
]

SIGNED_HEADERS = (
    "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type", "List-Id",
    "List-Unsubscribe", "List-Unsubscribe-Post", "Reply-To", "Feedback-ID",
)
MIN_RSA_BITS = 2048
Algorithm = Literal["rsa", "ed25519"]
PrivateKey = RSAPrivateKey | Ed25519PrivateKey

_SIGNED = tuple(name.lower().encode("ascii") for name in SIGNED_HEADERS)
_FIELD_START = re.compile(rb"\r\n(?![ \t])")  # a CRLF not followed by WSP ends a header field
_LINE = 78
_BH_SLOT = "#" * 44  # where the body hash goes: base64 of a SHA-256 digest is 44 long
_HASH_PIECE = 2047  # hashlib releases the GIL for updates of 2048 bytes or more
_CACHE_SIZE = 4096  # canonical forms remembered per kind: a campaign's fixed lines and fields
_LINE_CACHE: dict[bytes, bytes] = {}
_HEADER_CACHE: dict[bytes, bytes] = {}
# (key, layout) of the last DKIM-Signature folded: one tuple, replaced whole, so a thread
# reading it never sees one message's key with another's layout
_LAST_FOLD: list[tuple[tuple[object, ...], tuple[str, str, int]] | None] = [None]
_KEY_WANTED = "an RSA key of at least 2048 bits or an Ed25519 key, PEM (PKCS#1 or PKCS#8)"


@dataclass(frozen=True)
class Signer:
    """One signing domain's loaded key and the signature tags that never change for it."""

    domain: str  # A-label, as written in d=
    selector: str
    algorithm: Algorithm
    private_key: PrivateKey = field(repr=False)
    fixed_tags: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        a = "rsa-sha256" if self.algorithm == "rsa" else "ed25519-sha256"
        tags = ("v=1;", f"a={a};", "c=relaxed/relaxed;", f"d={self.domain};", f"s={self.selector};")
        object.__setattr__(self, "fixed_tags", tags)


def load_signer(key: DkimKey) -> Signer:
    """Load `key`'s PEM file; ConfigError naming the file unless RSA ≥ 2048 bits or Ed25519."""
    path = key.private_key_file
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"DKIM key {path}: cannot read: {exc.strerror}") from None
    except TypeError:  # cryptography's way of saying "needs a password"
        raise ConfigError(f"DKIM key {path}: encrypted; expected an unencrypted key "
                          "(protect it with file permissions)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"DKIM key {path}: not {_KEY_WANTED}") from None
    # The key itself decides the algorithm: the file may have been replaced since the config
    # was checked, and a signature must match what DNS publishes for that key.
    domain, selector = _a_label(key.domain), _a_label(key.selector)
    if isinstance(private, Ed25519PrivateKey):
        return Signer(domain, selector, "ed25519", private)
    if isinstance(private, RSAPrivateKey) and private.key_size >= MIN_RSA_BITS:
        return Signer(domain, selector, "rsa", private)
    found = (f"a {private.key_size}-bit RSA key" if isinstance(private, RSAPrivateKey)
             else f"a key of an unsupported type ({type(private).__name__})")
    raise ConfigError(f"DKIM key {path}: {found}; expected {_KEY_WANTED}")


def sign(message: bytes, signer: Signer, timestamp: int | None = None) -> bytes:
    """`message` (CRLF line endings) with a DKIM-Signature header prepended."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        # What we hash must be what SMTP carries, and SMTP turns bare LFs into CRLFs.
        raise ValueError("DKIM: message has a bare CR or LF; sign CRLF-terminated lines only")
    head, _, body = message.partition(b"\r\n\r\n")
    names, hashed = _signed_fields(head)
    body_hash = base64.b64encode(_sha256(relaxed_body(body))).decode("ascii")
    before, after, width = _unsigned(signer.fixed_tags, timestamp, tuple(names))
    unsigned = before + body_hash + after
    # The signature header is hashed last, with b= empty and without its CRLF (§3.7).
    data = b"".join(hashed) + relaxed_header(unsigned.encode("ascii"))[:-2]
    b = base64.b64encode(_signature(signer.private_key, data)).decode("ascii")
    room = max(0, _LINE - width)
    rest = [b[i:i + _LINE - 1] for i in range(room, len(b), _LINE - 1)]
    return "\r\n ".join([unsigned + b[:room], *rest]).encode("ascii") + b"\r\n" + message


def _unsigned(fixed_tags: tuple[str, ...], timestamp: int | None, names: tuple[str, ...]
              ) -> tuple[str, str, int]:
    """The folded DKIM-Signature up to "b=", split where the body hash goes, and the last
    line's width. The same for every message of a second (a bh= value is always 44 long)."""
    key = (fixed_tags, timestamp, names)
    last = _LAST_FOLD[0]
    if last is not None and last[0] == key:
        return last[1]
    tags = [*fixed_tags, *([f"t={timestamp};"] if timestamp is not None else [])]
    h = [name + ":" for name in names[:-1]] + [names[-1] + ";"]
    atoms = [(" ", tag) for tag in tags] + [(" ", "h=" + h[0])] + [("", part) for part in h[1:]]
    atoms += [(" ", f"bh={_BH_SLOT};"), (" ", "b=")]
    folded, width = _fold(atoms)
    before, _, after = folded.partition(_BH_SLOT)
    _LAST_FOLD[0] = (key, (before, after, width))
    return before, after, width


def relaxed_header(raw: bytes) -> bytes:
    """One header field, as found in the message, in relaxed canonical form (RFC 6376 §3.4.2)."""
    found = _HEADER_CACHE.get(raw)
    if found is not None:
        return found
    name, colon, value = raw.partition(b":")
    if not colon:
        raise ValueError(f"DKIM: header line without a colon: {raw[:60]!r}")
    value = _squeeze(value.replace(b"\r\n", b"")).strip(b" ")
    return _remember(_HEADER_CACHE, raw, name.rstrip(b" \t").lower() + b":" + value + b"\r\n")


def relaxed_body(body: bytes) -> bytes:
    """The body in relaxed canonical form (RFC 6376 §3.4.4, errata 1376 and 1384)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # SMTP ends the last line anyway; its trailing WSP then goes too
    if b"  " in body or b"\t" in body or b" \r\n" in body:
        # Line by line, each line looked up first: most lines of a campaign's messages are
        # the same template text, and a dict lookup costs far less than squeezing it again.
        get = _LINE_CACHE.get
        body = b"\r\n".join([canonical if (canonical := get(line)) is not None
                              else _relaxed_line(line) for line in body.split(b"\r\n")])
    end = len(body)
    while body.endswith(b"\r\n", 0, end):  # empty lines at the end are ignored...
        end -= 2
    return body[:end] + b"\r\n" if end else b""  # ...and an empty body hashes as nothing


def _relaxed_line(line: bytes) -> bytes:
    """One body line without its CRLF: WSP runs as one SP, none at the end."""
    return _remember(_LINE_CACHE, line, _squeeze(line).rstrip(b" "))


def _remember(cache: dict[bytes, bytes], key: bytes, value: bytes) -> bytes:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()  # merged text never repeats: start over rather than grow
    cache[key] = value
    return value


def public_txt(signer: Signer) -> str:
    """The DNS TXT record value for `signer`'s key: "v=DKIM1; k=...; p=..."."""
    public = signer.private_key.public_key()
    if isinstance(public, RSAPublicKey):
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"  # RFC 8463 §4.2


def keygen(domain: str, selector: str, directory: Path,
           ed25519: bool = False) -> tuple[Path, str]:
    """Write a new key to directory/DOMAIN.SELECTOR.pem (0600); return it and its DNS record."""
    for what, value, check in (("domain", domain, config_values.domain),
                               ("selector", selector, config_values.dns_labels)):
        try:
            check(value)
        except ValueError as exc:  # also keeps "/" and ".." out of the file name
            raise BulksendError(f"dkim keygen: {what} {value!r}: {exc}") from None
    private: PrivateKey = (Ed25519PrivateKey.generate() if ed25519
                           else generate_private_key(public_exponent=65537, key_size=2048))
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path = directory / f"{domain}.{selector}.pem"
    _write_new(path, pem)
    signer = Signer(_a_label(domain), _a_label(selector), "ed25519" if ed25519 else "rsa", private)
    text = public_txt(signer)
    strings = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))  # TXT limit
    return path, f"{signer.selector}._domainkey.{signer.domain}. IN TXT {strings}"


def _write_new(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 holding `data`; never replace an existing file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BulksendError(f"{path}: already exists; refusing to overwrite a DKIM key "
                            "(choose another selector or remove the file)") from None
    except OSError as exc:
        raise BulksendError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask could only narrow it, but be explicit
            file.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)  # a truncated key would fail later and more confusingly
        raise BulksendError(f"{path}: cannot write: {exc.strerror}") from None


def _squeeze(data: bytes) -> bytes:
    """Every run of spaces and tabs as one space."""
    # bytes.replace passes instead of a regex: 3-10x faster on a 10 KB body, and a run of
    # n spaces needs only log2(n) passes.
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def _signed_fields(head: bytes) -> tuple[list[str], list[bytes]]:
    """The h= names (oversigned) and the relaxed fields they select, in hashing order."""
    fields: dict[bytes, list[bytes]] = {}
    for raw in _FIELD_START.split(head.removesuffix(b"\r\n")):
        fields.setdefault(raw.partition(b":")[0].rstrip(b" \t").lower(), []).append(raw)
    names: list[str] = []
    hashed: list[bytes] = []
    for name in _SIGNED:
        found = fields.get(name, [])
        # Verifiers take instances bottom-up (RFC 6376 §5.4.2); the extra name matches
        # nothing now, and whatever instance is added later. A header the message lacks
        # (Reply-To, say) is listed once too, so nobody can add one to a signed message.
        names += [name.decode("ascii")] * (len(found) + 1)
        hashed += [relaxed_header(raw) for raw in reversed(found)]
    if b"from" not in fields:
        raise ValueError("DKIM: message has no From header, which must be signed")
    return names, hashed


def _sha256(data: bytes) -> bytes:
    """SHA-256 of `data`, fed in pieces under the size at which hashlib lets go of the GIL:
    with twenty lanes waiting for it, letting go for a few microseconds costs two thread
    switches."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), _HASH_PIECE):
        digest.update(view[start:start + _HASH_PIECE])
    return digest.digest()


def _signature(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, RSAPrivateKey):
        return key.sign(data, PKCS1v15(), hashes.SHA256())
    return key.sign(hashlib.sha256(data).digest())  # RFC 8463: Ed25519 signs the SHA-256 hash


def _fold(atoms: list[tuple[str, str]]) -> tuple[str, int]:
    """The unsigned header: atoms (glue, text) folded to 78 columns; and the last line's width."""
    parts = ["DKIM-Signature:"]
    width = len(parts[0])
    for glue, text in atoms:
        if width + len(glue) + len(text) > _LINE:
            parts.append("\r\n ")  # FWS is allowed after ";" and around ":" in h=
            width = 1
        else:
            parts.append(glue)
            width += len(glue)
        parts.append(text)
        width += len(text)
    return "".join(parts), width


def _a_label(name: str) -> str:
    # The stdlib codec (IDNA 2003), as config_values uses, so both spell a name alike.
    return name.encode("idna").decode("ascii").lower()
