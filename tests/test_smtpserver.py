"""The fault-injecting SMTP test server, proven with real smtplib clients on loopback."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.support.smtpserver import Rule, ServerProcess, SmtpServer, read_journal

SENDER = "news@sender.test"
ALICE = "alice@example.test"
BOB = "bob@example.test"
# CRLF line ends and a line that starts with a dot: the journal must keep both exactly.
MESSAGE = (
    b"From: news@sender.test\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\n"
    b".a line with a leading dot\r\nbye\r\n"
)

StartServer = Callable[..., SmtpServer]
StartProcess = Callable[..., ServerProcess]


def connect(server: SmtpServer | ServerProcess, timeout: float = 5.0) -> smtplib.SMTP:
    """A smtplib client, over TLS verified with the test CA when the server speaks TLS."""
    if server.spec.mode == "tls":
        return smtplib.SMTP_SSL(server.host, server.port, timeout=timeout, context=server.client_context())
    client = smtplib.SMTP(server.host, server.port, timeout=timeout)
    if server.spec.mode == "starttls":
        client.starttls(context=server.client_context())
    return client


def read_reply(lines: BinaryIO) -> str:
    """The last line of one reply, or "" once the server has hung up."""
    while True:
        try:
            line = lines.readline()
        except OSError:
            return ""
        if not line:
            return ""
        if line[3:4] != b"-":
            return line.decode().rstrip("\r\n")


def dialogue(server: SmtpServer, *commands: str) -> list[str]:
    """Raw SMTP, to see what smtplib hides: the greeting, then each command's reply."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        lines = sock.makefile("rb")
        replies = [read_reply(lines)]
        for command in commands:
            try:
                sock.sendall(command.encode() + b"\r\n")
            except OSError:
                replies.append("")
                break
            replies.append(read_reply(lines))
        return replies


# -- a well-behaved server and its journal ------------------------------------------------


def test_journal_records_the_transaction_with_the_exact_bytes(smtp_server: StartServer) -> None:
    server = smtp_server()
    with connect(server) as client:
        client.ehlo("client.test")
        assert client.sendmail(SENDER, [ALICE, BOB], MESSAGE) == {}
    [txn] = server.journal
    assert txn.data == MESSAGE
    assert (txn.tls, txn.auth_user, txn.ehlo, txn.mail_from) == (False, None, "client.test", SENDER)
    assert txn.mail_options == (f"size={len(MESSAGE)}",)
    assert (txn.rcpt_to, txn.rcpt_rejected) == ((ALICE, BOB), ())
    assert (txn.reply, txn.end, txn.delivered) == ("250 2.0.0 OK", "replied", True)
    assert txn.peer.startswith("127.0.0.1:") and txn.started <= txn.finished
    assert server.delivered() == [txn]
    assert server.delivered_to(BOB) == 1


def test_journal_file_holds_the_same_records_as_json_lines(smtp_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    server = smtp_server(
        journal_path=str(path), rules=[{"stage": "rcpt", "address": BOB, "reply": "550 5.1.1 user unknown"}]
    )
    with connect(server) as client:
        client.sendmail(SENDER, [ALICE, BOB], MESSAGE)
        client.sendmail(SENDER, [ALICE], MESSAGE)
    assert read_journal(path) == server.journal
    first = json.loads(path.read_text().splitlines()[0])
    assert base64.b64decode(first["data_b64"]) == MESSAGE
    assert first["rcpt_rejected"] == [[BOB, "550 5.1.1 user unknown"]]


def test_client_vanishing_mid_transaction_is_journaled(smtp_server: StartServer) -> None:
    server = smtp_server()
    replies = dialogue(server, "EHLO client.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{ALICE}>")
    assert replies[-1] == "250 OK"
    [txn] = server.wait_for(lambda journal: len(journal) == 1)
    assert (txn.end, txn.rcpt_to, txn.data, txn.reply) == ("disconnected", (ALICE,), None, None)


def test_message_refused_by_the_server_itself_is_journaled(smtp_server: StartServer) -> None:
    server = smtp_server()
    with connect(server) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(SENDER, [ALICE], b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n")
    assert refused.value.smtp_code == 500
    [txn] = server.journal
    assert (txn.data, txn.delivered, txn.end) == (None, False, "replied")


def test_8bitmime_is_offered_by_default_and_can_be_withheld(smtp_server: StartServer) -> None:
    with connect(smtp_server()) as client:
        client.ehlo()
        assert client.has_extn("8bitmime") and not client.has_extn("smtputf8")
    with connect(smtp_server(eightbitmime=False)) as client:
        client.ehlo()
        assert not client.has_extn("8bitmime")
        assert client.mail(SENDER, ["BODY=8BITMIME"])[0] == 555
        assert client.mail(SENDER, ["BODY=7BIT"])[0] == 250


def test_smtputf8_addresses_are_accepted_when_offered(smtp_server: StartServer) -> None:
    server = smtp_server(smtputf8=True)
    with connect(server) as client:
        client.sendmail("zoë@sender.test", ["jürgen@example.test"], MESSAGE, mail_options=["SMTPUTF8"])
    [txn] = server.journal
    assert (txn.mail_from, txn.rcpt_to) == ("zoë@sender.test", ("jürgen@example.test",))
    assert "SMTPUTF8" in txn.mail_options


# -- TLS and AUTH -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "tls"])
@pytest.mark.parametrize(
    ("mechanism", "initial_response"), [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)]
)
def test_auth_succeeds_over_verified_tls(
    smtp_server: StartServer, mode: str, mechanism: str, initial_response: bool
) -> None:
    server = smtp_server(mode=mode, users={"ann": "s3cret"})
    with connect(server) as client:
        client.ehlo()
        client.user, client.password = "ann", "s3cret"
        authenticate = getattr(client, f"auth_{mechanism.lower()}")
        assert client.auth(mechanism, authenticate, initial_response_ok=initial_response)[0] == 235
        client.sendmail(SENDER, [ALICE], MESSAGE)
    [txn] = server.journal
    assert (txn.tls, txn.auth_user, txn.delivered) == (True, "ann", True)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_certificate_from_an_untrusted_ca_fails_verification(smtp_server: StartServer, mode: str) -> None:
    server = smtp_server(mode=mode)
    system_trust = ssl.create_default_context()  # verifies, but has never heard of the test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        if mode == "tls":
            smtplib.SMTP_SSL(server.host, server.port, timeout=5, context=system_trust)
        else:
            with smtplib.SMTP(server.host, server.port, timeout=5) as client:
                client.starttls(context=system_trust)
    with connect(server) as client:  # and the server goes on serving verified clients
        assert client.noop()[0] == 250


def test_starttls_server_offers_auth_only_after_tls(smtp_server: StartServer) -> None:
    server = smtp_server(mode="starttls", users={"ann": "s3cret"})
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=server.client_context())
        client.ehlo()
        assert client.has_extn("auth")


def test_require_starttls_refuses_mail_in_clear_text(smtp_server: StartServer) -> None:
    server = smtp_server(mode="starttls", require_starttls=True)
    with smtplib.SMTP(server.host, server.port, timeout=5) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 530


def test_wrong_password_gets_535_promptly(smtp_server: StartServer) -> None:
    server = smtp_server(mode="tls", users={"ann": "s3cret"})
    with connect(server, timeout=3) as client:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("ann", "wrong")  # smtplib tries PLAIN, then LOGIN
        assert time.monotonic() - started < 2.0
    assert refused.value.smtp_code == 535
    assert refused.value.smtp_error.startswith(b"5.7.8")


def test_required_auth_refuses_mail_with_530_until_login(smtp_server: StartServer) -> None:
    server = smtp_server(users={"ann": "s3cret"}, require_auth=True)
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, [ALICE], MESSAGE)
        assert refused.value.smtp_code == 530
        client.login("ann", "s3cret")
        client.sendmail(SENDER, [ALICE], MESSAGE)
    refused_txn, delivered_txn = server.journal
    assert refused_txn.end == "mail_refused" and refused_txn.mail_reply.startswith("530 5.7.0")
    assert delivered_txn.delivered and delivered_txn.auth_user == "ann"


# -- scripted faults ----------------------------------------------------------------------


def test_unknown_recipient_is_refused_while_the_others_are_accepted(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "rcpt", "address": "nobody@example.test", "reply": "550 5.1.1 user unknown"}])
    with connect(server) as client:
        refused = client.sendmail(SENDER, [ALICE, "Nobody@Example.test", BOB], MESSAGE)
    assert refused == {"Nobody@Example.test": (550, b"5.1.1 user unknown")}
    [txn] = server.journal
    assert txn.rcpt_to == (ALICE, BOB)
    assert txn.rcpt_rejected == (("Nobody@Example.test", "550 5.1.1 user unknown"),)
    assert (server.delivered_to(ALICE), server.delivered_to("Nobody@Example.test")) == (1, 0)


@pytest.mark.parametrize(
    ("stage", "reply", "error"),
    [
        ("mail", "451 4.7.1 rate limited", smtplib.SMTPSenderRefused),
        ("mail", "550 5.4.5 daily sending quota exceeded", smtplib.SMTPSenderRefused),
        ("rcpt", "452 4.2.2 mailbox full", smtplib.SMTPRecipientsRefused),
        ("data", "554 5.7.1 blocked", smtplib.SMTPDataError),
        ("dot", "554 5.7.1 blocked", smtplib.SMTPDataError),
        ("dot", "450 4.2.1 try later", smtplib.SMTPDataError),
    ],
)
def test_scripted_refusal_arrives_at_its_stage(
    smtp_server: StartServer, stage: str, reply: str, error: type[smtplib.SMTPException]
) -> None:
    server = smtp_server(rules=[{"stage": stage, "reply": reply}])
    with connect(server) as client, pytest.raises(error) as refused:
        client.sendmail(SENDER, [ALICE], MESSAGE)
    exc = refused.value
    code = exc.recipients[ALICE][0] if isinstance(exc, smtplib.SMTPRecipientsRefused) else exc.smtp_code  # type: ignore[attr-defined]
    assert code == int(reply[:3])
    [txn] = server.journal
    replies = {
        "mail": txn.mail_reply,
        "rcpt": txn.rcpt_rejected[0][1] if txn.rcpt_rejected else None,
        "data": txn.data_reply,
        "dot": txn.reply,
    }
    assert replies[stage] == reply
    assert txn.data == (MESSAGE if stage == "dot" else None)
    assert server.delivered() == []


def test_421_greeting_closes_the_connection(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "connect", "reply": "421 4.3.2 Service not available"}])
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(server.host, server.port, timeout=5)
    assert refused.value.smtp_code == 421
    assert dialogue(server, "EHLO client.test") == ["421 4.3.2 Service not available", ""]


def test_554_greeting_refuses_everything_but_quit(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "connect", "reply": "554 5.7.1 no service for you"}])
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(server.host, server.port, timeout=5)
    assert refused.value.smtp_code == 554
    assert dialogue(server, "EHLO client.test", f"MAIL FROM:<{SENDER}>", "QUIT") == [
        "554 5.7.1 no service for you", "503 5.5.1 Bad sequence of commands",
        "503 5.5.1 Bad sequence of commands", "221 Bye",
    ]


def test_421_at_mail_closes_the_connection(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "mail", "reply": "421 4.7.0 too many errors"}])
    replies = dialogue(server, "EHLO client.test", f"MAIL FROM:<{SENDER}>", "NOOP")
    assert replies[-2:] == ["421 4.7.0 too many errors", ""]
    [txn] = server.journal
    assert (txn.mail_reply, txn.end) == ("421 4.7.0 too many errors", "mail_refused")


def test_times_and_after_bound_a_rule_to_a_window_of_events(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[
        {"stage": "mail", "times": 2, "reply": "451 4.7.1 rate limited"},
        {"stage": "rcpt", "address": BOB, "after": 1, "times": 1, "reply": "450 4.2.1 try later"},
    ])
    codes = []
    with connect(server) as client:
        for _ in range(3):
            try:
                client.sendmail(SENDER, [ALICE], MESSAGE)
                codes.append(250)
            except smtplib.SMTPSenderRefused as refused:
                codes.append(refused.smtp_code)
        refusals = [client.sendmail(SENDER, [ALICE, BOB], MESSAGE) for _ in range(3)]
    assert codes == [451, 451, 250]
    assert refusals == [{}, {BOB: (450, b"4.2.1 try later")}, {}]


def test_rules_change_while_the_server_runs(smtp_server: StartServer) -> None:
    server = smtp_server()
    with connect(server) as client:
        client.sendmail(SENDER, [ALICE], MESSAGE)
        server.set_rules([{"stage": "mail", "reply": "451 4.7.1 rate limited"}])
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(SENDER, [ALICE], MESSAGE)
        server.clear_rules()
        client.sendmail(SENDER, [ALICE], MESSAGE)
    assert [txn.delivered for txn in server.journal] == [True, False, True]


def test_delay_holds_back_the_reply(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[
        {"stage": "ehlo", "action": "delay", "seconds": 0.2},
        {"stage": "mail", "action": "delay", "seconds": 0.1, "reply": "451 4.7.1 slow down"},
    ])
    with connect(server) as client:
        started = time.monotonic()
        assert client.ehlo()[0] == 250
        assert time.monotonic() - started >= 0.19
        started = time.monotonic()
        assert client.mail(SENDER) == (451, b"4.7.1 slow down")
        assert time.monotonic() - started >= 0.09


def test_trickled_reply_outlasts_the_client_read_timeout(smtp_server: StartServer) -> None:
    # smtplib's timeout bounds each read, not the reply: "250 OK\r\n" at 0.1 s a byte takes 0.7 s.
    server = smtp_server(rules=[{"stage": "mail", "action": "trickle", "seconds": 0.1}])
    with connect(server, timeout=0.5) as client:
        client.ehlo()
        started = time.monotonic()
        assert client.mail(SENDER) == (250, b"OK")
        assert time.monotonic() - started > 0.5


@pytest.mark.parametrize("stage", ["data", "dot"])
def test_drop_cuts_the_connection_before_the_message_is_acknowledged(smtp_server: StartServer, stage: str) -> None:
    server = smtp_server(rules=[{"stage": stage, "action": "drop"}])
    with connect(server) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail(SENDER, [ALICE], MESSAGE)
    [txn] = server.journal
    assert (txn.end, txn.reply, txn.delivered) == ("dropped", None, False)
    assert txn.data_reply is not None and txn.data_reply.startswith("354")
    assert txn.data == (MESSAGE if stage == "dot" else None)


def test_silence_after_the_dot_swallows_the_message(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "dot", "action": "silence"}])
    with connect(server, timeout=0.5) as client, pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        client.sendmail(SENDER, [ALICE], MESSAGE)
    [txn] = server.journal
    assert (txn.data, txn.reply, txn.end) == (MESSAGE, None, "silenced")
    assert server.delivered() == []


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"stage": "helo", "reply": "451 x"}, "stage must be one of"),
        ({"stage": "mail"}, "needs a reply line"),
        ({"stage": "mail", "action": "delay"}, "needs seconds > 0"),
        ({"stage": "mail", "reply": "hello"}, "reply must be one ASCII line"),
        ({"stage": "data", "address": ALICE, "reply": "451 x"}, "address filters only"),
        ({"stage": "mail", "reply": "451 x", "times": 0}, "times >= 1"),
        ({"stage": "mail", "reply": "451 x", "recipient": ALICE}, "unknown keys recipient"),
    ],
)
def test_malformed_rule_is_refused_with_the_reason(rule: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Rule.from_dict(rule)


def test_rules_survive_a_json_round_trip() -> None:
    rules = [
        Rule("rcpt", address=ALICE, reply="550 5.1.1 user unknown", after=1, times=2),
        Rule("dot", "trickle", seconds=0.1, user="ann"),
    ]
    assert [Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) for rule in rules] == rules


# -- the server as a separate process -----------------------------------------------------


def test_server_process_serves_reloads_rules_and_stops_on_sigterm(smtp_server_process: StartProcess) -> None:
    server = smtp_server_process(mode="starttls", users={"ann": "s3cret"})
    with connect(server) as client:
        client.login("ann", "s3cret")
        client.sendmail(SENDER, [ALICE], MESSAGE)
        server.set_rules([{"stage": "mail", "reply": "451 4.7.1 rate limited"}])
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail(SENDER, [ALICE], MESSAGE)
    # A client caught mid-transaction by SIGTERM: its transaction is journaled on the way out.
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        lines = sock.makefile("rb")
        read_reply(lines)
        server.clear_rules()
        for command in ("EHLO client.test", f"MAIL FROM:<{SENDER}>"):
            sock.sendall(command.encode() + b"\r\n")
            read_reply(lines)
        assert server.terminate() == 0
    delivered, refused, cut = server.journal
    assert (delivered.data, delivered.tls, delivered.auth_user) == (MESSAGE, True, "ann")
    assert refused.mail_reply == "451 4.7.1 rate limited"
    assert (cut.mail_from, cut.end) == (SENDER, "shutdown")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=1)


def test_killed_server_process_keeps_fsynced_records_and_restarts_on_its_port(
    smtp_server_process: StartProcess,
) -> None:
    server = smtp_server_process()
    client = connect(server)
    for _ in range(3):
        client.sendmail(SENDER, [ALICE], MESSAGE)
    first_pid, port = server.pid, server.port
    server.kill()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    client.close()
    assert len(server.delivered()) == 3
    server.start()
    assert (server.port, server.pid != first_pid) == (port, True)
    with connect(server) as client:
        client.sendmail(SENDER, [ALICE], MESSAGE)
    assert server.delivered_to(ALICE) == 4
    assert len({txn.session for txn in server.journal}) == 2
