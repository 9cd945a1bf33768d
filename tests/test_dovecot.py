"""The Dovecot fixture, exercised with the real stdlib IMAP and POP3 clients (no mocks)."""

from __future__ import annotations

import imaplib
import poplib
import re
import ssl
from email.message import EmailMessage

import pytest

from tests.support.dovecot import QUARANTINE_FOLDER, DovecotServer, Mailbox, Security

TIMEOUT = 10.0


def make_message(number: int) -> bytes:
    """A small CRLF message (what IMAP/POP3 serve), so fetched bytes can be compared exactly."""
    return (
        f"From: MAILER-DAEMON@example.net\r\n"
        f"To: bounces@example.com\r\n"
        f"Subject: Undelivered Mail Returned to Sender #{number}\r\n"
        f"Message-ID: <bounce-{number}@example.net>\r\n"
        f"\r\n"
        f"Delivery to recipient-{number}@example.org failed.\r\n"
        f".leading dot line to exercise POP3 dot-stuffing\r\n"
    ).encode()


def imap_login(mailbox: Mailbox, security: Security = "plain") -> imaplib.IMAP4:
    """A logged-in imaplib client in the given TLS mode, verifying the test CA."""
    port = mailbox.port("imap", security)
    client: imaplib.IMAP4
    if security == "tls":
        client = imaplib.IMAP4_SSL(mailbox.host, port, ssl_context=mailbox.client_context(), timeout=TIMEOUT)
    else:
        client = imaplib.IMAP4(mailbox.host, port, timeout=TIMEOUT)
        if security == "starttls":
            client.starttls(ssl_context=mailbox.client_context())
    client.login(mailbox.user, mailbox.password)
    return client


def pop3_login(mailbox: Mailbox, security: Security = "plain") -> poplib.POP3:
    """A logged-in poplib client in the given TLS mode, verifying the test CA."""
    port = mailbox.port("pop3", security)
    client: poplib.POP3
    if security == "tls":
        client = poplib.POP3_SSL(mailbox.host, port, context=mailbox.client_context(), timeout=TIMEOUT)
    else:
        client = poplib.POP3(mailbox.host, port, timeout=TIMEOUT)
        if security == "starttls":
            client.stls(context=mailbox.client_context())
    client.user(mailbox.user)
    client.pass_(mailbox.password)
    return client


def uids(client: imaplib.IMAP4) -> list[int]:
    """UIDs of the selected folder, ascending."""
    status, data = client.uid("SEARCH", "ALL")
    assert status == "OK"
    return [int(uid) for uid in data[0].split()]


def fetch_raw(client: imaplib.IMAP4, uid: int) -> bytes:
    """The exact message bytes of `uid`, without setting \\Seen."""
    status, data = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
    assert status == "OK"
    item = data[0]
    assert isinstance(item, tuple)
    return item[1]


def retr_raw(client: poplib.POP3, number: int) -> bytes:
    """Message `number` as bytes with CRLF line ends (poplib strips them and the dot-stuffing)."""
    _, lines, _ = client.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


# --- IMAP -------------------------------------------------------------------------------


def test_imap_plain_login_offers_starttls(mailbox: Mailbox) -> None:
    """A plain IMAP login works and the greeting offers STARTTLS."""
    client = imap_login(mailbox, "plain")
    try:
        assert "STARTTLS" in client.capabilities
        status, data = client.select("INBOX")
        assert (status, data) == ("OK", [b"0"])
        assert not isinstance(client.sock, ssl.SSLSocket)
    finally:
        client.logout()


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_imap_tls_modes_verify_the_test_ca(mailbox: Mailbox, security: Security) -> None:
    """STARTTLS and implicit TLS both verify against the test CA."""
    client = imap_login(mailbox, security)
    try:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.getpeercert() is not None  # verified against ca_file
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()


def test_imap_tls_rejected_without_the_test_ca(mailbox: Mailbox) -> None:
    """The certificate is not trusted by the system store, so the CA really matters."""
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(mailbox.host, mailbox.port("imap", "tls"), ssl_context=ssl.create_default_context(),
                          timeout=TIMEOUT)


def test_imap_wrong_password_rejected(mailbox: Mailbox) -> None:
    """A wrong IMAP password is refused."""
    client = imaplib.IMAP4(mailbox.host, mailbox.port("imap", "plain"), timeout=TIMEOUT)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(mailbox.user, "wrong-password")
    finally:
        client.shutdown()


def test_imap_fetch_move_to_quarantine_and_expunge(mailbox: Mailbox) -> None:
    """Delivered messages come back byte for byte; MOVE and \\Deleted+EXPUNGE show on disk."""
    first, second = make_message(1), make_message(2)
    mailbox.deliver(first)
    mailbox.deliver(second)
    client = imap_login(mailbox, "starttls")
    try:
        client.select("INBOX")
        first_uid, second_uid = uids(client)
        assert fetch_raw(client, first_uid) == first
        assert fetch_raw(client, second_uid) == second

        assert client.create(QUARANTINE_FOLDER)[0] == "OK"
        assert client.uid("MOVE", str(first_uid), QUARANTINE_FOLDER)[0] == "OK"
        assert client.uid("STORE", str(second_uid), "+FLAGS", r"(\Deleted)")[0] == "OK"
        # Flagged but not expunged: still on disk, with the maildir T flag.
        assert [(m.raw, m.flags) for m in mailbox.stored()] == [(second, "T")]
        assert client.expunge()[0] == "OK"
        assert uids(client) == []
    finally:
        client.logout()
    assert mailbox.messages() == []
    assert mailbox.messages(QUARANTINE_FOLDER) == [first]
    assert mailbox.folders() == ["INBOX", QUARANTINE_FOLDER]


def test_imap_copy_then_delete_fallback(mailbox: Mailbox) -> None:
    """COPY + \\Deleted + EXPUNGE (for servers without MOVE) works too."""
    first, second = make_message(1), make_message(2)
    mailbox.deliver(first)
    mailbox.deliver(second)
    client = imap_login(mailbox, "tls")
    try:
        client.create(QUARANTINE_FOLDER)
        client.select("INBOX")
        first_uid, second_uid = uids(client)
        assert client.uid("COPY", str(second_uid), QUARANTINE_FOLDER)[0] == "OK"
        client.uid("STORE", f"{first_uid},{second_uid}", "+FLAGS", r"(\Deleted)")
        client.expunge()
        client.select(QUARANTINE_FOLDER)
        (quarantined,) = uids(client)
        assert fetch_raw(client, quarantined) == second
    finally:
        client.logout()
    assert mailbox.messages() == []
    assert mailbox.messages(QUARANTINE_FOLDER) == [second]


def test_imap_uid_order_matches_delivery_order(mailbox: Mailbox) -> None:
    """UIDs follow delivery order, and messages() agrees before and after Dovecot saw them."""
    sent = [make_message(number) for number in range(6)]
    for raw in sent:
        mailbox.deliver(raw)
    assert mailbox.messages() == sent  # before Dovecot has seen them: by file name
    client = imap_login(mailbox)
    try:
        client.select("INBOX", readonly=True)
        assert [fetch_raw(client, uid) for uid in uids(client)] == sent
    finally:
        client.logout()
    stored = mailbox.stored()
    assert [m.raw for m in stored] == sent
    assert [m.uid for m in stored] == [1, 2, 3, 4, 5, 6]  # now from dovecot-uidlist


def test_imap_sees_delivery_during_a_session(mailbox: Mailbox) -> None:
    """A message delivered while a session is open appears after NOOP."""
    client = imap_login(mailbox)
    try:
        client.select("INBOX")
        assert uids(client) == []
        mailbox.deliver(make_message(7))
        client.noop()
        (uid,) = uids(client)
        assert fetch_raw(client, uid) == make_message(7)
    finally:
        client.logout()


def test_deliver_into_folder_with_flags_and_email_message(mailbox: Mailbox) -> None:
    """deliver() creates folders, sets flags and serialises EmailMessage with CRLF."""
    message = EmailMessage()
    message["From"] = "MAILER-DAEMON@example.net"
    message["Subject"] = "archived"
    message.set_content("body\n")
    path = mailbox.deliver(message, folder="Archive", flags="S")
    assert path.parent.name == "cur" and path.name.endswith(":2,S")
    assert b"\r\n" in path.read_bytes()  # serialised with CRLF, like a real MDA would store it
    client = imap_login(mailbox)
    try:
        status, listing = client.list()
        assert status == "OK"
        assert any(line.endswith(b" Archive") for line in listing if isinstance(line, bytes))
        client.select("Archive")
        status, data = client.uid("FETCH", "1:*", "(FLAGS)")
        assert status == "OK" and rb"\Seen" in data[0]
    finally:
        client.logout()
    assert mailbox.folders() == ["INBOX", "Archive"]


# --- POP3 -------------------------------------------------------------------------------


@pytest.mark.parametrize("security", ["plain", "starttls", "tls"])
def test_pop3_modes_retrieve_exact_bytes(mailbox: Mailbox, security: Security) -> None:
    """POP3 plain, STLS and POP3S return the exact bytes; RETR deletes nothing."""
    raw = make_message(3)
    mailbox.deliver(raw)
    client = pop3_login(mailbox, security)
    try:
        assert isinstance(client.sock, ssl.SSLSocket) == (security != "plain")
        assert client.stat() == (1, len(raw))
        assert retr_raw(client, 1) == raw
    finally:
        client.quit()
    assert mailbox.messages() == [raw]  # RETR alone deletes nothing


def test_pop3_plain_port_offers_stls(mailbox: Mailbox) -> None:
    """The plain POP3 port advertises STLS."""
    client = poplib.POP3(mailbox.host, mailbox.port("pop3", "plain"), timeout=TIMEOUT)
    try:
        assert "STLS" in client.capa()  # advertised before login only
    finally:
        client.quit()


def test_pop3_uidl_stable_and_dele_quit_removes(mailbox: Mailbox) -> None:
    """UIDLs survive sessions; DELE takes effect on QUIT only."""
    first, second = make_message(4), make_message(5)
    mailbox.deliver(first)
    mailbox.deliver(second)

    def listing() -> list[bytes]:
        client = pop3_login(mailbox)
        try:
            return client.uidl()[1]
        finally:
            client.quit()

    before = listing()
    assert len(before) == 2 and listing() == before  # same UIDLs in a new session

    client = pop3_login(mailbox)
    client.dele(1)
    client.close()  # no QUIT: the deletion must not happen
    assert mailbox.messages() == [first, second]

    client = pop3_login(mailbox, "tls")
    client.dele(1)
    client.quit()
    assert mailbox.messages() == [second]
    # The survivor keeps its UIDL (now as message 1).
    assert [line.split()[1] for line in listing()] == [before[1].split()[1]]


def test_pop3_wrong_password_rejected(mailbox: Mailbox) -> None:
    """A wrong POP3 password is refused."""
    client = poplib.POP3(mailbox.host, mailbox.port("pop3", "plain"), timeout=TIMEOUT)
    try:
        client.user(mailbox.user)
        with pytest.raises(poplib.error_proto, match="Authentication failed"):
            client.pass_("wrong-password")
    finally:
        client.close()


# --- the fixture itself -------------------------------------------------------------------

_leaked: list[imaplib.IMAP4] = []


def test_cleanup_part1_leaves_a_mess(mailbox: Mailbox) -> None:
    """Leave messages, a folder, another user's mail and an open session behind."""
    mailbox.deliver(make_message(8))
    mailbox.deliver(make_message(9), folder=QUARANTINE_FOLDER)
    mailbox.server.mailbox("postmaster").deliver(make_message(10))
    client = imap_login(mailbox)
    client.select("INBOX")
    _leaked.append(client)  # a session the test "forgot" to close


def test_cleanup_part2_sees_clean_mailboxes(mailbox: Mailbox, dovecot_server: DovecotServer) -> None:
    """The next test starts clean, and the leaked session was disconnected."""
    assert mailbox.messages() == []
    assert mailbox.folders() == ["INBOX"]
    assert dovecot_server.mailbox("postmaster").messages() == []
    client = imap_login(mailbox)
    try:
        assert client.select("INBOX") == ("OK", [b"0"])
        status, listing = client.list()
        assert listing == [b'(\\HasNoChildren) "." INBOX']
    finally:
        client.logout()
    for leaked in _leaked:  # the leaked session was disconnected by the fixture
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            leaked.noop()
            leaked.noop()
        leaked.shutdown()


def test_second_user_is_separate(mailbox: Mailbox, dovecot_server: DovecotServer) -> None:
    """The second user has its own mailbox."""
    other = dovecot_server.mailbox("postmaster")
    other.deliver(make_message(11))
    assert mailbox.messages() == []
    client = imap_login(other, "tls")
    try:
        client.select("INBOX")
        (uid,) = uids(client)
        assert fetch_raw(client, uid) == make_message(11)
    finally:
        client.logout()


def test_server_connection_details(dovecot_server: DovecotServer, mailbox: Mailbox) -> None:
    """The connection details are consistent and the log has no errors."""
    server = dovecot_server
    ports = {server.imap_port, server.imaps_port, server.pop3_port, server.pop3s_port}
    assert len(ports) == 4
    assert server.port("imap", "starttls") == server.port("imap", "plain") == server.imap_port
    assert server.port("pop3", "tls") == server.pop3s_port
    assert (mailbox.host, mailbox.user, mailbox.password) == ("127.0.0.1", server.user, server.password)
    assert mailbox.ca_file.is_file()
    log = server.log_text()
    assert re.search(r"Login: user=<bounces>", log)
    assert not re.search(r"(Error|Fatal|Panic):", log), log
