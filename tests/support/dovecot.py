# Install what this fixture needs on a fresh Debian 12 machine (as root), without starting
# the system Dovecot service (policy-rc.d answering 101 makes invoke-rc.d skip the start):
#
#   printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
#   apt-get update
#   DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dovecot-imapd dovecot-pop3d
#   rm -f /usr/sbin/policy-rc.d
#
# dovecot-imapd and dovecot-pop3d pull in dovecot-core (dovecot, doveadm). Nothing from
# /etc/dovecot is used: the fixture writes its own configuration, and a running system
# instance would not conflict either (the private one listens on free ports only).
"""A private Dovecot (IMAP, IMAPS, POP3, POP3S) with maildir mailboxes for the bounce reader tests.

One instance per test session (a graceful stop takes ~2.4 s). `dovecot_server` starts it on
free loopback ports with the session's test certificate; `mailbox` empties every user's
maildir before each test and lets the test deliver messages straight into the maildir and
look at what the IMAP/POP3 reader left behind.
"""

from __future__ import annotations

import email.message
import email.policy
import grp
import itertools
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from tests.support.certs import TlsFiles
from tests.support.real import unavailable

Protocol = Literal["imap", "pop3"]
Security = Literal["plain", "starttls", "tls"]

HOST = "127.0.0.1"
PRIMARY_USER = "bounces"
PRIMARY_PASSWORD = "bounces-secret"
SECOND_USER = "postmaster"
SECOND_PASSWORD = "postmaster-secret"
QUARANTINE_FOLDER = "bulksend-quarantine"
# Dovecot's default hierarchy separator for the Maildir++ layout: folder "a.b" is the
# directory ".a.b" next to INBOX's cur/new/tmp.
SEPARATOR = "."

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3  # free ports are picked before Dovecot binds them, so retry on a race


@dataclass(frozen=True)
class MailUser:
    """A passwd-file user of the test Dovecot and where its mail lives."""

    name: str
    password: str
    home: Path

    @property
    def maildir(self) -> Path:
        """The user's maildir root, which is also INBOX."""
        return self.home / "Maildir"


@dataclass(frozen=True)
class StoredMessage:
    """One message file found in a maildir folder."""

    path: Path
    name: str  # maildir base name: the file name without the ":2,FLAGS" info part
    flags: str  # maildir flag letters: S seen, T deleted (not yet expunged), R answered, F flagged, D draft
    uid: int | None  # Dovecot's IMAP UID, None until a Dovecot session has seen the file
    raw: bytes


@dataclass
class DovecotServer:
    """A running private Dovecot: where to connect, who may log in, where its files are."""

    host: str
    imap_port: int
    imaps_port: int
    pop3_port: int
    pop3s_port: int
    users: dict[str, MailUser]
    ca_file: Path
    base_dir: Path
    config_file: Path
    log_path: Path
    mail_uid: int
    mail_gid: int
    process: subprocess.Popen[bytes]
    separator: str = SEPARATOR
    user: str = PRIMARY_USER
    password: str = PRIMARY_PASSWORD

    def port(self, protocol: Protocol, security: Security) -> int:
        """The port for a protocol and TLS mode (STARTTLS/STLS use the plain port)."""
        if protocol == "imap":
            return self.imaps_port if security == "tls" else self.imap_port
        return self.pop3s_port if security == "tls" else self.pop3_port

    def client_context(self) -> ssl.SSLContext:
        """A verifying client TLS context that trusts only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def mailbox(self, user: str | None = None) -> Mailbox:
        """Maildir helpers for `user` (default: the primary user); does not reset anything."""
        return Mailbox(self, self.users[user or self.user])

    def log_text(self) -> str:
        """Everything Dovecot has logged so far (handy in assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run doveadm against this instance (not the system one)."""
        return subprocess.run(
            [_doveadm_binary(), "-c", str(self.config_file), *args],
            capture_output=True, text=True, timeout=10, check=False,
        )

    def disconnect_all(self) -> None:
        """Kick every logged-in session, so a client leaked by a test cannot touch the next one."""
        if self.doveadm("kick", "*").returncode != 0:
            return  # 68 = nobody was logged in: the usual, cheap case (~10 ms)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            sessions = self.doveadm("who", "-1").stdout.splitlines()[1:]  # first line: header
            if not any(line.strip() for line in sessions):
                return
            time.sleep(0.02)

    def assert_running(self) -> None:
        """Fail loudly if Dovecot died during the session."""
        if self.process.poll() is not None:
            pytest.fail(f"Dovecot exited with {self.process.returncode}:\n{_tail(self.log_text())}")


@dataclass
class Mailbox:
    """One user's maildir on the test Dovecot, plus the connection details for that user."""

    server: DovecotServer
    account: MailUser

    @property
    def host(self) -> str:
        """Where the server listens."""
        return self.server.host

    @property
    def user(self) -> str:
        """The login name."""
        return self.account.name

    @property
    def password(self) -> str:
        """The login password."""
        return self.account.password

    @property
    def ca_file(self) -> Path:
        """The CA that signed the server certificate."""
        return self.server.ca_file

    def port(self, protocol: Protocol, security: Security) -> int:
        """The port for a protocol and TLS mode."""
        return self.server.port(protocol, security)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client TLS context that trusts only the test CA."""
        return self.server.client_context()

    def folder_path(self, folder: str = "INBOX") -> Path:
        """The maildir directory holding `folder` (Maildir++ layout)."""
        if folder.upper() == "INBOX":
            return self.account.maildir
        return self.account.maildir / f".{folder}"

    def reset(self) -> None:
        """Empty INBOX and remove every other folder, Dovecot's indexes and subscriptions."""
        # Wiping the whole maildir also drops dovecot-uidlist, so UIDVALIDITY changes and
        # UIDs start again at 1: every test sees a brand-new mailbox.
        shutil.rmtree(self.account.maildir, ignore_errors=True)
        self._make_maildir(self.account.maildir, subfolder=False)

    def create_folder(self, folder: str) -> Path:
        """Create an (empty) folder on disk, as if a client had created it."""
        path = self.folder_path(folder)
        if folder.upper() != "INBOX" and not (path / "cur").is_dir():
            self._make_maildir(path, subfolder=True)
        return path

    def deliver(
        self,
        message: bytes | email.message.Message,
        folder: str = "INBOX",
        flags: str = "",
    ) -> Path:
        """Store a message verbatim into `folder` the way an MDA does; returns its file."""
        raw = message if isinstance(message, bytes) else message.as_bytes(policy=email.policy.SMTP)
        directory = self.create_folder(folder)
        name = _unique_maildir_name()
        tmp_file = directory / "tmp" / name
        with open(tmp_file, "xb") as handle:
            handle.write(raw)  # no fsync: durability does not matter in a throwaway mailbox
        self._own(tmp_file, 0o600)
        # A new message goes to new/ (IMAP \Recent); one with flags is an already seen one
        # and lives in cur/ with the flags in its name. rename() makes it appear atomically.
        if flags:
            target = directory / "cur" / f"{name}:2,{''.join(sorted(set(flags)))}"
        else:
            target = directory / "new" / name
        os.rename(tmp_file, target)
        return target

    def stored(self, folder: str = "INBOX") -> list[StoredMessage]:
        """The messages now in `folder` (including \\Deleted, not yet expunged ones), UID order."""
        directory = self.folder_path(folder)
        uids = _read_uidlist(directory / "dovecot-uidlist")
        found: dict[str, StoredMessage] = {}
        # new/ before cur/: a file Dovecot moves meanwhile is then seen at least once, and
        # keying by base name drops the second sighting.
        for subdir in ("new", "cur"):
            try:
                entries = list(os.scandir(directory / subdir))
            except FileNotFoundError:
                continue
            for entry in entries:
                name, _, info = entry.name.partition(":")
                try:
                    raw = Path(entry.path).read_bytes()
                except FileNotFoundError:
                    continue  # Dovecot moved it from new/ to cur/ while we listed
                flags = info[2:] if info.startswith("2,") else ""
                found[name] = StoredMessage(Path(entry.path), name, flags, uids.get(name), raw)
        # Files Dovecot has not seen yet have no UID; their names sort in delivery order.
        return sorted(
            found.values(), key=lambda m: (m.uid is None, m.uid or 0, _maildir_sort_key(m.name))
        )

    def messages(self, folder: str = "INBOX") -> list[bytes]:
        """The raw bytes of every message now in `folder`, in UID (delivery) order."""
        return [message.raw for message in self.stored(folder)]

    def folders(self) -> list[str]:
        """INBOX and every folder on disk, by IMAP name (Maildir++ names, "." separated)."""
        root = self.account.maildir
        if not root.is_dir():
            return ["INBOX"]
        names = [
            entry.name[1:]
            for entry in os.scandir(root)
            if entry.is_dir() and entry.name.startswith(".") and (root / entry.name / "cur").is_dir()
        ]
        return ["INBOX", *sorted(names)]

    def _make_maildir(self, path: Path, *, subfolder: bool) -> None:
        """Create cur/new/tmp owned by the mail user, as Dovecot would."""
        for directory in (path, path / "cur", path / "new", path / "tmp"):
            directory.mkdir(parents=True, exist_ok=True)
            self._own(directory, 0o700)
        if subfolder:
            marker = path / "maildirfolder"  # Maildir++ marks subfolders with this file
            marker.touch()
            self._own(marker, 0o600)

    def _own(self, path: Path, mode: int) -> None:
        """Hand a file to the mail uid: Dovecot's mail processes must read, rename and unlink it."""
        if os.geteuid() == 0:
            os.chown(path, self.server.mail_uid, self.server.mail_gid)
        path.chmod(mode)


_name_lock = threading.Lock()
_last_stamp = 0  # microseconds of the previous delivery
_name_counter = itertools.count()


def _unique_maildir_name() -> str:
    """A maildir base name, strictly increasing in time so Dovecot assigns UIDs in delivery order."""
    global _last_stamp
    with _name_lock:
        # Dovecot sorts new files by the seconds and microseconds in their names before
        # giving out UIDs, so two deliveries in the same microsecond must still differ.
        stamp = max(time.time_ns() // 1000, _last_stamp + 1)
        _last_stamp = stamp
        sequence = next(_name_counter)
    seconds, micros = divmod(stamp, 1_000_000)
    return f"{seconds}.M{micros:06d}P{os.getpid()}Q{sequence}.bulksend-test"


def _maildir_sort_key(name: str) -> tuple[int, int, str]:
    """Order maildir names by their seconds and microseconds, like Dovecot does."""
    seconds, _, rest = name.partition(".")
    micros = 0
    if rest.startswith("M"):
        digits = "".join(itertools.takewhile(str.isdigit, rest[1:]))
        micros = int(digits or 0)
    return (int(seconds) if seconds.isdigit() else 0, micros, name)


def _read_uidlist(path: Path) -> dict[str, int]:
    """Map maildir base names to UIDs from a dovecot-uidlist file (version 3 format)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
    uids: dict[str, int] = {}
    for line in lines[1:]:  # the first line is the header (version, UIDVALIDITY, next UID)
        head, separator, name = line.partition(" :")
        uid = head.split(" ", 1)[0]
        if separator and uid.isdigit():
            uids[name] = int(uid)
    return uids


def _tail(text: str, lines: int = 30) -> str:
    """The last lines of a log, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


def _binary(name: str) -> str | None:
    """Find a Dovecot executable; /usr/sbin is often not on a non-root PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/usr/bin")


def _doveadm_binary() -> str:
    """The doveadm executable (installed together with dovecot by dovecot-core)."""
    return _binary("doveadm") or "doveadm"


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once so they cannot repeat)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _free_id(start: int, taken: set[int]) -> int:
    """The first id from `start` that no system account uses."""
    candidate = start
    while candidate in taken:
        candidate += 1
    return candidate


def _mail_ids() -> tuple[int, int]:
    """The uid/gid that Dovecot's mail processes run as."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()  # rootless: everything runs as the current user
    # Mail as root does not work (with uid 0 in the passwd-file, even with
    # first_valid_uid = 0, auth answers "unknown user"), and the mail user should not be
    # one of Dovecot's internal users. A numeric uid without a passwd entry works with a
    # passwd-file userdb and leaves the system's accounts untouched.
    uid = _free_id(5000, {entry.pw_uid for entry in pwd.getpwall()})
    gid = _free_id(5000, {entry.gr_gid for entry in grp.getgrall()})
    return uid, gid


def _base_parent() -> str:
    """A temp directory every user can traverse (Dovecot's auth process runs as `nobody`)."""
    parent = Path(tempfile.gettempdir()).resolve()
    for directory in (parent, *parent.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return "/tmp"  # e.g. a 0700 TMPDIR: auth would hang and fail
    return str(parent)


def _internal_accounts() -> tuple[str, str]:
    """User and group for Dovecot's unprivileged internal and login processes."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    # nobody exists everywhere; Debian calls its group nogroup, others nobody.
    for group in ("nogroup", "nobody"):
        try:
            grp.getgrnam(group)
            return "nobody", group
        except KeyError:
            continue
    return "nobody", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name


def _config(
    base: Path, tls: TlsFiles, ports: list[int], passwd_file: Path, mail_uid: int, mail_gid: int
) -> str:
    """The complete dovecot.conf: nothing is read from /etc/dovecot."""
    internal_user, internal_group = _internal_accounts()
    # Rootless Dovecot cannot chroot its login processes or anvil.
    no_chroot = "  chroot =\n" if os.geteuid() != 0 else ""
    imap_port, imaps_port, pop3_port, pop3s_port = ports
    return f"""\
# Generated by tests/support/dovecot.py for one test session.
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
instance_name = bulksend-test-{os.getpid()}
protocols = imap pop3
listen = {HOST}
ssl = yes
ssl_cert = <{tls.cert_file}
ssl_key = <{tls.key_file}
# Plain logins on the plain ports must work too (readers configured without TLS).
disable_plaintext_auth = no
auth_mechanisms = plain login
# The default 2 s delay after a failed login would slow every wrong-password test.
auth_failure_delay = 0
auth_verbose = yes
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {internal_user}
first_valid_uid = {mail_uid}
last_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
last_valid_gid = {mail_gid}
# Tests may open several sessions at once from 127.0.0.1 (the default limit is 10).
mail_max_userip_connections = 100
mail_location = maildir:~/Maildir
login_greeting = bulksend test Dovecot ready.
namespace inbox {{
  inbox = yes
  separator = {SEPARATOR}
  # Advertised like a stock Debian setup (SPECIAL-USE), but not auto-created.
  mailbox Trash {{
    special_use = \\Trash
  }}
  mailbox Junk {{
    special_use = \\Junk
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {passwd_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%n {passwd_file}
}}
service anvil {{
{no_chroot}  # No growing per-IP penalty after a failed login: a wrong-password test would
  # otherwise delay every later login from 127.0.0.1 by 2-15 s.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
{no_chroot}  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
}}
service pop3-login {{
{no_chroot}  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = {pop3s_port}
  }}
}}
"""


def _probe(port: int, tls: ssl.SSLContext | None, greeting: bytes) -> bool:
    """True once the port answers with the protocol greeting (after the handshake for TLS)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as raw:
            sock = tls.wrap_socket(raw, server_hostname=HOST) if tls else raw
            try:
                return sock.recv(256).startswith(greeting)
            finally:
                if tls:
                    sock.close()
    except (OSError, ssl.SSLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait for the graceful stop (~2.4 s), then SIGKILL whatever is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    # Dovecot runs in its own session (process group = master pid): this also catches
    # children that outlived a killed master.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 2.0
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait()


def _start(binary: str, tls: TlsFiles) -> DovecotServer:
    """Write a configuration into a fresh directory and start Dovecot on free ports."""
    mail_uid, mail_gid = _mail_ids()
    base = Path(tempfile.mkdtemp(prefix="bulksend-dovecot-", dir=_base_parent()))
    base.chmod(0o755)  # auth (as nobody) reads the passwd file, login processes chroot here
    users: dict[str, MailUser] = {}
    for name, password in ((PRIMARY_USER, PRIMARY_PASSWORD), (SECOND_USER, SECOND_PASSWORD)):
        home = base / "home" / name
        home.mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(home, mail_uid, mail_gid)
        users[name] = MailUser(name, password, home)
    (base / "home").chmod(0o755)
    passwd_file = base / "passwd"
    passwd_file.write_text(
        "".join(
            f"{user.name}:{{PLAIN}}{user.password}:{mail_uid}:{mail_gid}::{user.home}::\n"
            for user in users.values()
        )
    )
    passwd_file.chmod(0o644)

    failure = ""
    for _ in range(_START_ATTEMPTS):
        ports = _free_ports(4)
        config_file = base / "dovecot.conf"
        config_file.write_text(_config(base, tls, ports, passwd_file, mail_uid, mail_gid))
        log_path = base / "dovecot.log"
        log_path.unlink(missing_ok=True)
        with open(base / "stderr.log", "wb") as stderr:
            process = subprocess.Popen(
                [binary, "-F", "-c", str(config_file)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
                start_new_session=True,  # lets _stop() signal the whole process tree
            )
        server = DovecotServer(
            HOST, ports[0], ports[1], ports[2], ports[3], users, tls.ca_file, base,
            config_file, log_path, mail_uid, mail_gid, process,
        )
        for user in users.values():
            server.mailbox(user.name).reset()
        context = server.client_context()
        checks: list[tuple[int, ssl.SSLContext | None, bytes]] = [
            (server.imap_port, None, b"* OK"),
            (server.imaps_port, context, b"* OK"),
            (server.pop3_port, None, b"+OK"),
            (server.pop3s_port, context, b"+OK"),
        ]
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while checks and process.poll() is None and time.monotonic() < deadline:
            if _probe(*checks[0]):
                checks.pop(0)
            else:
                time.sleep(0.02)
        if not checks:
            return server
        _stop(process)
        failure = (
            f"exit code {process.returncode}\n{(base / 'stderr.log').read_text(errors='replace')}"
            f"{_tail(server.log_text())}"
        )
        if "in use" not in failure:
            break  # only a lost port race is worth another attempt
    shutil.rmtree(base, ignore_errors=True)
    raise RuntimeError(failure)


@pytest.fixture(scope="session")
def dovecot_server(tls_files: TlsFiles) -> Iterator[DovecotServer]:
    """A private Dovecot for the whole session: IMAP(+STARTTLS), IMAPS, POP3(+STLS), POP3S."""
    binary = _binary("dovecot")
    if binary is None or _binary("doveadm") is None:
        unavailable("Dovecot", "dovecot/doveadm not found (apt-get install dovecot-imapd dovecot-pop3d)")
    assert binary is not None
    try:
        server = _start(binary, tls_files)
    except (RuntimeError, OSError) as error:
        unavailable("Dovecot", f"the test instance did not come up: {error}")
        raise  # unreachable: unavailable() skips or fails
    try:
        yield server
    finally:
        _stop(server.process)
        shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.fixture
def mailbox(dovecot_server: DovecotServer) -> Mailbox:
    """The primary user's mailbox, emptied (INBOX only, no folders) for this test; other users too."""
    dovecot_server.assert_running()
    dovecot_server.disconnect_all()
    for user in dovecot_server.users:
        dovecot_server.mailbox(user).reset()
    return dovecot_server.mailbox()
