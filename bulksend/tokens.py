"""HMAC tokens that tie a message, a bounce or an unsubscribe click back to its delivery.

A token is ``base32(varint(delivery_id) + mac)``, lower-case, without padding, where

- ``varint`` is the delivery id as unsigned LEB128 (7 bits a byte, low bits first, high bit
  set on every byte but the last): 1 byte up to 127, 5 bytes for ids up to 34 billion;
- ``mac`` is the first 12 bytes (96 bits) of
  ``HMAC-SHA256(secret, b"bulksend-token-v1\\0" + purpose + b"\\0" + id as 8 bytes big-endian)``,
  so a token for one purpose is worthless for another;
- base32 is the RFC 4648 alphabet lower-cased (``a-z2-7``): it survives as an email local
  part, as a URL path segment and when an MTA case-folds a VERP address.

Id 1 gives 21 characters, id 10**9 gives 28, the largest id (2**63 - 1) 34. Exactly one
string reads as a given (purpose, id): `read_token` rebuilds the token from the id it decodes
and compares the two in constant time, so altered padding bits, a non-minimal varint or a
changed MAC all read as None.

Where tokens go (DESIGN §7, §8): UNSUBSCRIBE in the unsubscribe URL path and mailto, BOUNCE in
the VERP return path ``bounces+TOKEN@domain`` and the ``X-Bulksend-Delivery`` header,
MESSAGE_ID in the Message-ID ``<TOKEN@domain>``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re

__all__ = [
    "BOUNCE", "MESSAGE_ID", "MIN_SECRET_BYTES", "UNSUBSCRIBE", "make_token", "read_token",
    "verp_address", "verp_token",
]

UNSUBSCRIBE = "unsubscribe"
BOUNCE = "bounce"
MESSAGE_ID = "message-id"

MIN_SECRET_BYTES = 16  # shorter secrets could be brute-forced offline from one token
MAX_DELIVERY_ID = 2**63 - 1  # a signed 64-bit database key
_MAC_BYTES = 12
_MAX_ID_BYTES = 9  # LEB128 of 2**63 - 1
_MAX_CHARS = -(-(_MAX_ID_BYTES + _MAC_BYTES) * 8 // 5)
_MIN_CHARS = -(-(1 + _MAC_BYTES) * 8 // 5)
_TOKEN = re.compile(rf"[a-z2-7]{{{_MIN_CHARS},{_MAX_CHARS}}}")
_CONTEXT = b"bulksend-token-v1\0"


def make_token(secret: bytes, purpose: str, delivery_id: int) -> str:
    """The token for `delivery_id` and `purpose`, unforgeable without `secret`."""
    _check_secret(secret)
    if isinstance(delivery_id, bool) or not isinstance(delivery_id, int) \
            or not 0 <= delivery_id <= MAX_DELIVERY_ID:
        raise ValueError(f"delivery id must be an int in 0..2**63-1, got {delivery_id!r}")
    raw = _varint(delivery_id) + _mac(secret, purpose, delivery_id)
    return base64.b32encode(raw).rstrip(b"=").lower().decode("ascii")


def read_token(secret: bytes, purpose: str, token: str) -> int | None:
    """The delivery id in `token`, or None if it was not made with `secret` for `purpose`."""
    _check_secret(secret)
    # isascii first: str.lower() maps e.g. KELVIN SIGN to "k", which would let a look-alike read.
    if not isinstance(token, str) or len(token) > _MAX_CHARS or not token.isascii():
        return None
    token = token.lower()
    if not _TOKEN.fullmatch(token):
        return None
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    except binascii.Error:  # a length no byte string encodes to
        return None
    delivery_id = _read_varint(raw[:-_MAC_BYTES])
    if delivery_id is None:
        return None
    expected = make_token(secret, purpose, delivery_id)
    return delivery_id if hmac.compare_digest(expected, token) else None


def verp_address(return_path: str, token: str) -> str:
    """"bounces@example.com" → "bounces+TOKEN@example.com", the domain as a lower-case A-label."""
    local, at, domain = return_path.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"return path {return_path!r} is not an address like bounces@example.com")
    return f"{local}+{token}@{_a_label(domain)}"


def verp_token(address: str, return_path_local: str) -> str | None:
    """The token in "LOCAL+TOKEN@domain" (any case, optionally in <>), or None if not one."""
    local = address.strip().removeprefix("<").removesuffix(">").rpartition("@")[0]
    prefix = return_path_local + "+"
    if not local.isascii() or not local.lower().startswith(prefix.lower()):
        return None
    token = local[len(prefix):].lower()
    return token if _TOKEN.fullmatch(token) else None


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"token secret must be at least {MIN_SECRET_BYTES} bytes")


def _mac(secret: bytes, purpose: str, delivery_id: int) -> bytes:
    # The id is fixed-width and last, so (purpose, id) pairs cannot collide through the NUL.
    mac = _keyed(secret, purpose).copy()
    mac.update(delivery_id.to_bytes(8, "big"))
    return mac.digest()[:_MAC_BYTES]


@functools.lru_cache(maxsize=16)
def _keyed(secret: bytes, purpose: str) -> hmac.HMAC:
    """The HMAC with the key set up and the context and purpose fed in: copied per token,
    which saves the key schedule and half the hashing of every token."""
    return hmac.new(secret, _CONTEXT + purpose.encode("utf-8") + b"\0", hashlib.sha256)


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _read_varint(raw: bytes) -> int | None:
    """The number `raw` encodes, or None unless it is exactly one varint."""
    if not raw or len(raw) > _MAX_ID_BYTES:
        return None
    number = 0
    for shift, byte in enumerate(raw):
        last = shift == len(raw) - 1
        if bool(byte & 0x80) == last:  # continuation bit on every byte but the last
            return None
        number |= (byte & 0x7F) << (7 * shift)
    return number if number <= MAX_DELIVERY_ID else None


def _a_label(domain: str) -> str:
    # The stdlib codec (IDNA 2003), as config_values uses, so both spell a domain alike.
    return domain.encode("idna").decode("ascii").lower()
