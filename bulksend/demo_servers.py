"""Small local SMTP servers (aiosmtpd) that play the providers of `bulksend demo`.

Each `Provider` listens on a free port of 127.0.0.1 with implicit TLS (like port 465),
STARTTLS (587) or in plain (a VPS relay on 2525, no AUTH). The TLS ones offer AUTH
PLAIN/LOGIN and present a certificate from a throwaway CA (`make_tls_files`) that bulksend
trusts through `ca_file`, as for a private relay: nothing disables verification.
An `Outage` makes one fail "for a while", as an overloaded provider does: after `after`
accepted messages, 421 to its next `replies` connections or transactions, then it recovers.
Each counts what it accepted (per recipient; how many DKIM-signed): the demo's ground truth.
`DemoServers` runs them on one event loop in a thread and always stops them. Demo only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import ssl
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
REFUSAL = "421 4.3.2 try again later"
Mode = Literal["tls", "starttls", "plain"]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the throwaway CA (what clients trust) and the server's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a new CA and a server certificate for 127.0.0.1/localhost into `directory`."""
    now = dt.datetime.now(dt.UTC)

    def certificate(subject: str, issuer: str, public: Any, signer: Any,
                    ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a little clock skew
            .not_valid_after(now + dt.timedelta(days=1))  # it lives as long as one demo
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            # Key identifiers: Python 3.13's default verification (X509_STRICT) requires them.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                           critical=False)
        )
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                            critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())  # EC: generated in a millisecond
    ca_cert = certificate("bulksend demo CA", "bulksend demo CA", ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("localhost", "bulksend demo CA", key.public_key(), ca_key, False)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return files


@dataclass(frozen=True)
class Outage:
    """After `after` accepted messages, 421 to the next `replies` connections or transactions."""

    after: int = 0
    replies: int = 3


@dataclass(frozen=True)
class Provider:
    """One server to run: its name, TLS mode, AUTH users, an optional outage, its latency."""

    name: str
    mode: Mode
    users: Mapping[str, str] = field(default_factory=dict)
    outage: Outage | None = None
    latency: float = 0.0  # seconds before the reply to the final dot, like a real provider


class DemoServer:
    """A running provider: where it listens and what it has done so far."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.port = 0
        self.connections = 0
        self.accepted = 0
        self.refused = 0  # 421s given during the outage
        self.signed = 0  # accepted messages carrying a DKIM-Signature header
        self.recipients: Counter[str] = Counter()

    @property
    def address(self) -> str:
        """host:port, as bulksend.toml names it."""
        return f"{HOST}:{self.port}"

    def refuse_now(self) -> bool:
        """Whether the outage is on for this connection or transaction (and count it if so)."""
        outage = self.provider.outage
        if outage is None or self.accepted < outage.after or self.refused >= outage.replies:
            return False
        self.refused += 1
        return True

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        """aiosmtpd authenticator for PLAIN and LOGIN against the provider's users."""
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            if self.provider.users.get(login) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True)
        # handled=False: aiosmtpd answers 535 itself (handled=True would leave the client waiting).
        return AuthResult(success=False, handled=False)


class _Handler:
    """aiosmtpd hooks: the outage at MAIL FROM, latency and counting at the final dot."""

    def __init__(self, box: DemoServer) -> None:
        self.box = box

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.box.refuse_now():
            return REFUSAL
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.box.provider.latency)
        content = bytes(envelope.original_content or b"")
        self.box.accepted += 1
        self.box.signed += content.startswith(b"DKIM-Signature:") or b"\nDKIM-Signature:" in content
        self.box.recipients.update(envelope.rcpt_tos)
        return f"250 2.0.0 OK queued as {self.box.provider.name}-{self.box.accepted}"


class _Session(SMTP):
    """One SMTP connection: aiosmtpd's protocol plus the outage at connect and 421 hang-ups."""

    def __init__(self, box: DemoServer, live: set[_Session], tls: ssl.SSLContext | None) -> None:
        mode = box.provider.mode
        super().__init__(
            _Handler(box), hostname=f"{box.provider.name}.demo.invalid", ident="bulksend demo",
            tls_context=tls if mode == "starttls" else None,
            require_starttls=mode == "starttls",
            # aiosmtpd cannot see implicit TLS, so it must not insist on STARTTLS before AUTH.
            auth_require_tls=mode == "starttls",
            auth_required=bool(box.provider.users), authenticator=box.authenticate,
            loop=asyncio.get_running_loop(),
        )
        self._box, self._live = box, live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self not in self._live:  # aiosmtpd calls this again for the TLS layer of STARTTLS
            self._live.add(self)
            self._box.connections += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._live.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._box.refuse_now():
            await self.push(REFUSAL)  # as the greeting; push() hangs up after it
            return
        await super()._handle_client()

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if text.startswith("421 ") and self.transport is not None:
            self.transport.close()  # RFC 5321 4.2.2: 421 closes the transmission channel


class DemoServers:
    """Run `providers` on one event loop in a thread; use as `with DemoServers(...) as s:`."""

    def __init__(self, providers: Iterable[Provider], tls: TlsFiles) -> None:
        self.servers = {p.name: DemoServer(p) for p in providers}
        self._tls = tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._live: set[_Session] = set()
        self._log_level = logging.NOTSET

    def __enter__(self) -> DemoServers:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Listen on free ports; returns once every server accepts connections."""
        # aiosmtpd warns on every AUTH (a deprecated attribute it sets itself) and about
        # AUTH without STARTTLS on the implicit-TLS server: noise for a demo, hidden meanwhile.
        self._log_level = logging.getLogger("mail.log").level
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS", UserWarning,
                                "aiosmtpd.smtp")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, errors),
                                        name="bulksend-demo-smtp", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the demo SMTP servers did not start within {timeout} s")
        if errors:
            self.stop()
            raise errors[0]

    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        listening: list[asyncio.Server] = []
        try:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._tls.cert_file, self._tls.key_file)
            for box in self.servers.values():
                implicit = context if box.provider.mode == "tls" else None
                server = loop.run_until_complete(loop.create_server(
                    lambda box=box: _Session(box, self._live, context), HOST, 0, ssl=implicit))
                listening.append(server)
                box.port = server.sockets[0].getsockname()[1]
        except BaseException as error:  # handed to start(), which raises it in the caller
            errors.append(error)
        self._loop = loop
        ready.set()
        try:
            if not errors:
                loop.run_forever()
            loop.run_until_complete(self._shutdown(listening))
        finally:
            loop.close()

    async def _shutdown(self, listening: list[asyncio.Server]) -> None:
        """Stop listening, cut open sessions, and let every task end before the loop closes."""
        for server in listening:
            server.close()
        for session in list(self._live):
            if isinstance(session.transport, asyncio.Transport):
                session.transport.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while self._live and loop.time() < deadline:
            await asyncio.sleep(0.005)  # connection_lost runs a few loop turns after abort()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        for server in listening:
            await server.wait_closed()

    def stop(self) -> None:
        """Stop every server and the thread; safe to call twice or after a failed start."""
        thread, loop = self._thread, self._loop
        self._thread = None
        if thread is not None and loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed itself after a failed start
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        logging.getLogger("mail.log").setLevel(self._log_level)
