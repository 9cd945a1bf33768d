"""Email addresses as people type them → the dedupe key the store uses, or why not valid.

`strip_address` takes off what spreadsheets and mail clients wrap around an address;
`AddressValidator` checks the rest with email-validator, caching its verdict on each domain
(most rows of a real list are plain ASCII at a few thousand domains).
"""

from __future__ import annotations

import re
import unicodedata

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from bulksend.errors import AddressError

# Characters that must never reach a stored value: C0/C1 controls and the bidi overrides
# used to disguise text.
INVISIBLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*\Z")
# Addresses, one a line, that the fast path of AddressValidator.key() takes: a dot-atom
# local part of at most 64 characters, one "@", at most 254 characters in all.
ADDRESS_LINES = re.compile(
    rf"(?:(?=[^\n]{{1,254}}\n)(?=[^@\n]{{1,64}}@){_ATOM}(?:\.{_ATOM})*@[^@\n]+\n)*")
# Plain ASCII host names that email-validator accepts as they are (lower-cased); anything
# else (IDN, "--" labels, odd TLDs, special-use names) is left to email-validator itself.
_PLAIN_DOMAIN = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\Z")
_SPECIAL_USE = tuple(SPECIAL_USE_DOMAIN_NAMES)


class InvalidAddress(ValueError):
    """An email address that fails validation; the message says why."""


def strip_address(raw: str) -> str:
    """An address cell without spaces, invisible characters, `mailto:` or angle brackets."""
    if raw.isascii():  # ASCII controls inside an address make it invalid; no need to strip them
        value = raw.strip()
    else:
        value = INVISIBLE.sub("", unicodedata.normalize("NFC", raw)).strip().strip("\u00a0").strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


class AddressValidator:
    """Validates addresses with email-validator, caching the verdict on each domain.

    Most rows of a real list are plain ASCII local parts at a few thousand domains, so the
    domain is validated once and the local part by the RFC 5322 dot-atom rule; anything
    else (quoted or internationalised local parts) goes to email-validator whole.
    """

    def __init__(self, cache_size: int = 200_000) -> None:
        self.verdicts: dict[str, str | InvalidAddress] = {}  # domain as given -> verdict
        self._cache_size = cache_size

    def key(self, address: str) -> tuple[str, str]:
        """(email_key, ascii domain) for a valid address; raises InvalidAddress."""
        local, at, domain = address.rpartition("@")
        if at and len(local) <= 64 and len(address) <= 254 and DOT_ATOM_LOCAL.match(local):
            ascii_domain = self._domain(domain)
            if len(local) + 1 + len(ascii_domain) <= 254:
                return f"{local.lower()}@{ascii_domain}", ascii_domain
        return self._full(address)

    def verdict(self, domain: str) -> str | InvalidAddress:
        """The ASCII form of a domain, or why it is not valid (cached)."""
        verdict = self.verdicts.get(domain)
        if verdict is None:
            if len(self.verdicts) >= self._cache_size:
                self.verdicts.clear()
            verdict = self.verdicts[domain] = self._check_domain(domain)
        return verdict

    def _domain(self, domain: str) -> str:
        verdict = self.verdict(domain)
        if isinstance(verdict, InvalidAddress):
            raise verdict
        return verdict

    def _check_domain(self, domain: str) -> str | InvalidAddress:
        plain = domain.lower()
        if (len(plain) <= 253 and _PLAIN_DOMAIN.match(plain) and "--" not in plain
                and not self._special(plain)):
            return plain
        try:
            return validate_email(f"a@{domain}", check_deliverability=False).ascii_domain.lower()
        except EmailNotValidError as exc:
            return InvalidAddress(str(exc))

    @staticmethod
    def _special(domain: str) -> bool:
        return any(domain == name or domain.endswith("." + name) for name in _SPECIAL_USE)

    @staticmethod
    def _full(address: str) -> tuple[str, str]:
        try:
            valid = validate_email(address, check_deliverability=False)
        except EmailNotValidError as exc:
            raise InvalidAddress(str(exc)) from None
        domain = valid.ascii_domain.lower()
        return f"{valid.local_part.lower()}@{domain}", domain


def address_key(email: str) -> str:
    """The dedupe key of an address a user typed; AddressError if it is not valid."""
    try:
        return AddressValidator().key(strip_address(email))[0]
    except InvalidAddress as exc:
        raise AddressError(f"invalid address {email!r}: {exc}") from None
