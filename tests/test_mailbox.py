"""The bounce readers against the real test Dovecot (IMAP, POP3) and real files, no mocks.

What each reader hands out, what it deletes or sets aside and when, and how it fails; then
the processor's loop over a real mailbox with an injected parser that crashes or hangs.
Counts and suppressions end to end are in test_bounces_cli.py.
"""

from __future__ import annotations

import dataclasses
import mailbox as stdlib_mailbox
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import bounce_fetch, bounces, db, mailbox, models, store_mailbox, suppression
from bulksend.config import BouncesConfig
from bulksend.mailbox_imap import ImapMailbox
from bulksend.mailfiles import LocalFiles
from tests.support import bounce_mail
from tests.support.dovecot import QUARANTINE_FOLDER, Mailbox

MODES = {"imap": ("starttls", "tls"), "pop3": ("starttls", "tls")}


def message(number: int, body: str = "Delivery failed.") -> bytes:
    return (f"From: MAILER-DAEMON@mx.remote.example\r\nTo: bounces@example.com\r\n"
            f"Subject: bounce {number}\r\nMessage-ID: <m{number}@mx.remote.example>\r\n\r\n"
            f"{body}\r\n").encode()


def settings(box: Mailbox, protocol: str, security: str, *, password_env: str = "PW",
             ca_file: Path | None | str = "test", folder: str = "INBOX") -> BouncesConfig:
    """[bounces] for the test Dovecot; ca_file "test" = the test CA, None = the system store."""
    return BouncesConfig(
        protocol=protocol,  # type: ignore[arg-type]
        host=box.host, port=box.port(protocol, security),  # type: ignore[arg-type]
        security=security, username=box.user, password_env=password_env,  # type: ignore[arg-type]
        ca_file=box.ca_file if ca_file == "test" else ca_file,  # type: ignore[arg-type]
        folder=folder, quarantine_folder=QUARANTINE_FOLDER,
    )


def read_all(source: mailbox.Source) -> list[mailbox.Message]:
    return list(source.messages())


# --- IMAP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("security", MODES["imap"])
def test_imap_hands_out_exact_bytes_and_deletes_only_processed(mailbox_: Mailbox, security: str) -> None:
    sent = [message(n) for n in range(3)]
    for raw in sent:
        mailbox_.deliver(raw)
    reader = ImapMailbox(settings(mailbox_, "imap", security), mailbox_.password)
    got = read_all(reader)
    assert [m.raw for m in got] == sent
    reader.processed(got[0])
    reader.quarantine(got[2])
    # Nothing is expunged before close: a crash now leaves the first one flagged, still there.
    assert [(m.raw, m.flags) for m in mailbox_.stored()] == [(sent[0], "T"), (sent[1], "")]
    reader.close()
    assert mailbox_.messages() == [sent[1]]  # untouched: not told anything about it
    assert mailbox_.messages(QUARANTINE_FOLDER) == [sent[2]]
    assert QUARANTINE_FOLDER in mailbox_.folders()


def test_imap_reader_skips_messages_flagged_deleted(mailbox_: Mailbox) -> None:
    """A run that crashed after flagging (before EXPUNGE) does not hand the message out again."""
    mailbox_.deliver(message(1), flags="T")
    mailbox_.deliver(message(2))
    reader = ImapMailbox(settings(mailbox_, "imap", "tls"), mailbox_.password)
    assert [m.raw for m in read_all(reader)] == [message(2)]
    reader.close()


def test_imap_copy_fallback_and_existing_quarantine_folder(mailbox_: Mailbox) -> None:
    """Without MOVE: COPY + \\Deleted + EXPUNGE; a quarantine folder that exists is reused."""
    mailbox_.deliver(message(9), folder=QUARANTINE_FOLDER)
    mailbox_.deliver(message(1))
    reader = ImapMailbox(settings(mailbox_, "imap", "starttls"), mailbox_.password,
                                 move=False)
    (got,) = read_all(reader)
    reader.quarantine(got)
    reader.close()
    assert mailbox_.messages() == []
    assert sorted(mailbox_.messages(QUARANTINE_FOLDER)) == [message(1), message(9)]


def test_imap_quarantine_folder_with_a_non_ascii_name(mailbox_: Mailbox) -> None:
    """Folder names go out in modified UTF-7 (RFC 3501 5.1.3), as Dovecot stores them."""
    mailbox_.deliver(message(1))
    config = dataclasses.replace(settings(mailbox_, "imap", "tls"), quarantine_folder="Карантин & co")
    reader = ImapMailbox(config, mailbox_.password)
    (got,) = read_all(reader)
    reader.quarantine(got)
    reader.close()
    assert mailbox_.folders() == ["INBOX", "&BBoEMARABDAEPQRCBDgEPQ- &- co"]
    assert mailbox_.messages("&BBoEMARABDAEPQRCBDgEPQ- &- co") == [message(1)]


def test_imap_oversize_message_is_not_downloaded(mailbox_: Mailbox) -> None:
    big = message(2, body="x" * 5000)
    mailbox_.deliver(message(1))
    mailbox_.deliver(big)
    reader = ImapMailbox(settings(mailbox_, "imap", "tls"), mailbox_.password,
                                 max_bytes=1000)
    small, large = read_all(reader)
    assert small.raw == message(1)
    assert large.raw is None and f"{len(big)} bytes" in (large.problem or "")
    reader.quarantine(large)
    reader.close()
    assert mailbox_.messages(QUARANTINE_FOLDER) == [big]


def test_imap_wrong_password_names_the_mailbox_not_the_password(mailbox_: Mailbox) -> None:
    config = settings(mailbox_, "imap", "starttls")
    with pytest.raises(mailbox.MailboxError) as caught:
        ImapMailbox(config, "wrong-password-xyz")
    text = str(caught.value)
    assert f"{mailbox_.user}@{mailbox_.host}:{config.port}" in text and "login failed" in text
    assert "wrong-password-xyz" not in text


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_certificate_is_verified(mailbox_: Mailbox, protocol: str, engine: sa.Engine) -> None:
    """Without the test CA (system store) the server's certificate is refused."""
    config = settings(mailbox_, protocol, "tls", ca_file=None)
    with pytest.raises(mailbox.MailboxError, match="cannot connect.*certificate verify failed"):
        mailbox.open_mailbox(config, mailbox_.password, engine)


def test_imap_missing_folder_is_an_error(mailbox_: Mailbox) -> None:
    with pytest.raises(mailbox.MailboxError, match="open folder 'Bounces'"):
        ImapMailbox(settings(mailbox_, "imap", "tls", folder="Bounces"), mailbox_.password)


# --- POP3 -----------------------------------------------------------------------------------


def seen_rows(engine: sa.Engine) -> set[tuple[str, str]]:
    with engine.connect() as connection:
        return {(row.mailbox, row.uid) for row in connection.execute(sa.select(models.mailbox_seen))}


def finish(engine: sa.Engine, reader: mailbox.Source, message_: mailbox.Message, *, kept: bool) -> None:
    """What the processor does: remember in a transaction, then act."""
    with db.transaction(engine) as connection:
        reader.remember(connection, message_, kept=kept, now=1.0)
    (reader.quarantine if kept else reader.processed)(message_)


@pytest.mark.parametrize("security", MODES["pop3"])
def test_pop3_processes_each_message_once(mailbox_: Mailbox, security: str, engine: sa.Engine) -> None:
    sent = [message(n, body=f"{'z' * 3000} long line") for n in range(3)]  # lines over poplib's 2,048
    for raw in sent:
        mailbox_.deliver(raw)
    config = settings(mailbox_, "pop3", security)
    reader = mailbox.open_mailbox(config, mailbox_.password, engine)
    first, second, third = read_all(reader)
    assert [first.raw, second.raw, third.raw] == sent
    finish(engine, reader, first, kept=False)
    finish(engine, reader, third, kept=True)
    assert mailbox_.messages() == sent  # DELE takes effect at QUIT only
    reader.close()
    assert mailbox_.messages() == [sent[1], sent[2]]  # the kept one stays on the server
    name = mailbox.label(config)
    assert seen_rows(engine) == {(name, first.key), (name + store_mailbox.KEPT_SUFFIX, third.key)}

    again = mailbox.open_mailbox(config, mailbox_.password, engine)
    assert [m.raw for m in read_all(again)] == [sent[1]]  # neither the deleted nor the kept one
    again.close()
    assert seen_rows(engine) == {(name + store_mailbox.KEPT_SUFFIX, third.key)}  # gone: forgotten


def test_pop3_session_lost_before_quit_deletes_next_time_without_handing_out(
        mailbox_: Mailbox, engine: sa.Engine) -> None:
    mailbox_.deliver(message(1))
    config = settings(mailbox_, "pop3", "tls")
    reader = mailbox.open_mailbox(config, mailbox_.password, engine)
    (got,) = read_all(reader)
    finish(engine, reader, got, kept=False)
    reader._client.close()  # type: ignore[attr-defined]  # the connection drops before QUIT
    assert mailbox_.messages() == [message(1)]
    again = mailbox.open_mailbox(config, mailbox_.password, engine)
    assert read_all(again) == []  # already processed: not handed out again
    again.close()
    assert mailbox_.messages() == []  # but deleted now


def test_pop3_oversize_message_is_not_downloaded(mailbox_: Mailbox, engine: sa.Engine) -> None:
    mailbox_.deliver(message(1, body="y" * 4000))
    reader = mailbox.open_mailbox(settings(mailbox_, "pop3", "starttls"), mailbox_.password,
                                  engine, max_bytes=1000)
    (got,) = read_all(reader)
    assert got.raw is None and "over the 1000-byte limit" in (got.problem or "")
    reader.close()


def test_pop3_wrong_password_names_the_mailbox(mailbox_: Mailbox, engine: sa.Engine) -> None:
    config = settings(mailbox_, "pop3", "tls")
    with pytest.raises(mailbox.MailboxError, match=rf"{mailbox_.user}@.*:{config.port} \(POP3\): login failed"):
        mailbox.open_mailbox(config, "not-the-password", engine)


# --- local files ----------------------------------------------------------------------------


def test_mbox_splits_messages_and_unescapes_from_lines(tmp_path: Path) -> None:
    path = tmp_path / "bounces.mbox"
    box = stdlib_mailbox.mbox(str(path))
    bodies = ["first\nFrom the start\n", "second\n", "third\n\nFrom here on\n"]
    for number, body in enumerate(bodies):
        box.add(f"From: a@example.net\nSubject: s{number}\n\n{body}".encode())
    box.close()
    got = read_all(LocalFiles([path]))
    assert [m.key for m in got] == [f"{path}#1", f"{path}#2", f"{path}#3"]
    # stdlib mbox writes ">From " inside bodies; reading gives back what was stored.
    expected = [m.as_bytes() for m in stdlib_mailbox.mbox(str(path))]
    assert [m.raw for m in got] == [e.replace(b"\n>From ", b"\nFrom ") for e in expected]
    assert b"\nFrom here on\n" in got[2].raw  # type: ignore[operator]


def test_maildir_directory_and_single_files(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1.a").write_bytes(message(1))
    (maildir / "cur" / "2.b:2,S").write_bytes(message(2))
    (maildir / "tmp" / "3.c").write_bytes(message(3))  # still being written: not a message
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.eml").write_bytes(message(4))
    (corpus / "b.TXT").write_bytes(message(5))
    (corpus / "labels.json").write_text("{}")
    single = tmp_path / "one.eml"
    single.write_bytes(message(6))
    got = read_all(LocalFiles([maildir, corpus, single]))
    assert [m.raw for m in got] == [message(n) for n in (1, 2, 4, 5, 6)]


def test_oversize_file_is_not_read_and_missing_path_is_an_error(tmp_path: Path) -> None:
    big = tmp_path / "big.eml"
    big.write_bytes(message(1, body="q" * 2000))
    (got,) = read_all(LocalFiles([big], max_bytes=1000))
    assert got.raw is None and "over the 1000-byte limit" in (got.problem or "")
    mbox = tmp_path / "two.mbox"
    mbox.write_bytes(b"From a Sat Nov 28 03:00:00 2026\n" + message(2, body="w\n" * 800)
                     + b"\nFrom b Sat Nov 28 03:00:01 2026\n" + message(3))
    first, second = read_all(LocalFiles([mbox], max_bytes=1000))
    assert first.raw is None and (first.key, second.key) == (f"{mbox}#1", f"{mbox}#2")
    assert second.raw == message(3)
    with pytest.raises(mailbox.MailboxError, match="nope.mbox: no such file"):
        LocalFiles([big, tmp_path / "nope.mbox"])


@pytest.fixture
def mailbox_(mailbox: Mailbox) -> Mailbox:
    """The Dovecot mailbox fixture under a name that does not shadow bulksend.mailbox."""
    return mailbox


# --- the processor's loop over a real mailbox -----------------------------------------------


def vacations(count: int) -> list[bytes]:
    return [bounce_mail.vacation(sender=f"v{n}@example.org", to="bounces@example.com",
                                 message_id=f"<v{n}@example.org>") for n in range(count)]


def run(engine: sa.Engine, box: Mailbox, parse: Any = bounces.parse, **options: Any
        ) -> bounce_fetch.Result:
    reader = ImapMailbox(settings(box, "imap", "tls"), box.password)
    return bounce_fetch.process(engine, reader, secret=None, policy=suppression.BouncePolicy(),
                                parse=parse, **options)


def test_a_parser_crash_or_hang_quarantines_only_that_message(mailbox_: Mailbox,
                                                              engine: sa.Engine) -> None:
    sent = vacations(4)
    for raw in sent:
        mailbox_.deliver(raw)

    def parse(raw: bytes, **kwargs: Any) -> bounces.Report:
        if raw == sent[1]:
            raise RuntimeError("a bug on hostile input")
        if raw == sent[2]:
            time.sleep(30)  # cut off by the parse time limit
        return bounces.parse(raw, **kwargs)

    result = run(engine, mailbox_, parse, parse_seconds=0.3)
    assert result.counts.to_json() == {"messages": 4, "hard": 0, "soft": 0, "complaints": 0,
                                       "unsubscribes": 0, "ignored": 2, "quarantined": 2,
                                       "suppressed": 0}
    assert [why.split(":")[0] for _, why in result.quarantined] == [
        "unparseable", "parsing took over 0.3 s"]
    assert mailbox_.messages() == []
    assert sorted(mailbox_.messages(QUARANTINE_FOLDER)) == sorted([sent[1], sent[2]])


def test_time_limit_leaves_the_rest_for_the_next_run(mailbox_: Mailbox, engine: sa.Engine) -> None:
    sent = vacations(5)
    for raw in sent:
        mailbox_.deliver(raw)
    ticks = iter(range(1000))
    result = run(engine, mailbox_, monotonic=lambda: float(next(ticks)), max_time=4.5)
    assert result.stopped_early and result.counts.messages == 2
    assert mailbox_.messages() == sent[2:]
    assert run(engine, mailbox_).counts.messages == 3
    assert mailbox_.messages() == []


def test_nothing_is_deleted_before_its_batch_is_committed(mailbox_: Mailbox,
                                                          engine: sa.Engine) -> None:
    """An interrupt in the middle of a batch: the committed batch is gone, the rest stays."""
    sent = vacations(5)
    for raw in sent:
        mailbox_.deliver(raw)

    def parse(raw: bytes, **kwargs: Any) -> bounces.Report:
        if raw == sent[3]:
            raise KeyboardInterrupt
        return bounces.parse(raw, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run(engine, mailbox_, parse, batch_size=2)
    assert mailbox_.messages() == sent[2:]  # the first batch committed and expunged
    assert run(engine, mailbox_).counts.messages == 3


# --- a server that trickles: the per-message watchdog -----------------------------------------


class TricklingImap:
    """A loopback IMAP server whose UID 1 download sends one byte every 0.1 s, forever."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.commands: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(connection,), daemon=True).start()

    def _session(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as lines:
            try:
                connection.sendall(b"* OK ready\r\n")
                for line in lines:
                    tag, _, command = line.decode().rstrip("\r\n").partition(" ")
                    self.commands.append(command)
                    if command == "UID FETCH 1 (BODY.PEEK[])":
                        self._trickle(connection)
                        return
                    connection.sendall(self._answer(tag, command))
            except OSError:
                return  # the reader's watchdog shut the connection down

    def _trickle(self, connection: socket.socket) -> None:
        connection.sendall(f"* 1 FETCH (UID 1 BODY[] {{{len(self.message)}}}\r\n".encode())
        while True:  # one byte at a time: no socket timeout ever fires
            connection.sendall(b"x")
            time.sleep(0.1)

    def _answer(self, tag: str, command: str) -> bytes:
        done = f"{tag} OK done\r\n".encode()
        size = len(self.message)
        if command == "CAPABILITY":
            return b"* CAPABILITY IMAP4rev1 MOVE UIDPLUS\r\n" + done
        if command.startswith("SELECT"):
            return b"* 2 EXISTS\r\n" + done
        if command == "UID SEARCH UNDELETED":
            return b"* SEARCH 1 2\r\n" + done
        if command.endswith("(RFC822.SIZE)"):
            return (f"* 1 FETCH (UID 1 RFC822.SIZE {size})\r\n"
                    f"* 2 FETCH (UID 2 RFC822.SIZE {size})\r\n").encode() + done
        if command == "UID FETCH 2 (BODY.PEEK[])":
            return f"* 2 FETCH (UID 2 BODY[] {{{size}}}\r\n".encode() + self.message + b")\r\n" + done
        if command == "LOGOUT":
            return b"* BYE\r\n" + done
        return done

    def close(self) -> None:
        self.listener.close()


def test_a_download_that_trickles_is_cut_off_and_quarantined(engine: sa.Engine) -> None:
    server = TricklingImap(vacations(1)[0])
    config = BouncesConfig(protocol="imap", host="127.0.0.1", port=server.port, security="none",
                           username="u", password_env="PW", allow_insecure=True,
                           quarantine_folder=QUARANTINE_FOLDER)
    try:
        reader = ImapMailbox(config, "p", message_seconds=0.5)
        result = bounce_fetch.process(engine, reader, secret=None, policy=suppression.BouncePolicy())
    finally:
        server.close()
    assert result.counts.messages == 2 and result.counts.quarantined == 1
    assert result.counts.ignored == 1  # the second message was processed all the same
    assert result.quarantined == [("1", "download took over 0.5 s")]
    assert f'UID MOVE 1 "{QUARANTINE_FOLDER}"' in server.commands
    assert "UID STORE 2 +FLAGS.SILENT (\\Deleted)" in server.commands
    assert server.commands.count('LOGIN u "p"') == 2  # a new session after the cut-off
