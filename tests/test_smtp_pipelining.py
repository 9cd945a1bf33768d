"""SMTP sessions that pipeline MAIL, RCPT and DATA (RFC 2920), against the real test server.

The fault-injecting test server reads commands one line at a time, so it takes a pipelined
group as any server offering PIPELINING does; it does not advertise the extension itself,
so those sessions are told the server offers it, as its EHLO reply would. The last test
has a minimal server that does advertise it and checks what arrives in one write.
"""

from __future__ import annotations

import dataclasses
import socket
import threading

import pytest

from bulksend import smtp
from bulksend.config import AccountConfig
from bulksend.smtp import Outcome
from tests.test_smtp import ALICE, BOB, FAST, MESSAGE, SENDER, StartServer, account


def pipelining(session: smtp.Session) -> smtp.Session:
    """The session, as if its server's EHLO had offered PIPELINING."""
    session.capabilities = dataclasses.replace(session.capabilities, pipelining=True)
    return session


def test_pipelined_messages_arrive_exactly_over_one_connection(smtp_server: StartServer) -> None:
    server = smtp_server()
    with pipelining(smtp.open_session(account(server), None, timeouts=FAST)) as session:
        first = session.send(SENDER, ALICE, MESSAGE)
        second = session.send(SENDER, BOB, MESSAGE)
    assert (first.outcome, second.outcome) == (Outcome.SENT, Outcome.SENT)
    assert [t.rcpt_to for t in server.delivered()] == [(ALICE,), (BOB,)]
    assert {t.data for t in server.delivered()} == {MESSAGE}
    assert server.connections == 1


def test_pipelined_send_still_withholds_the_dot_when_the_lease_is_lost(smtp_server: StartServer) -> None:
    server = smtp_server()
    with pipelining(smtp.open_session(account(server), None, timeouts=FAST)) as session:
        result = session.send(SENDER, ALICE, MESSAGE, before_dot=lambda: False)
        assert not session.alive
    assert (result.outcome, result.dot_sent) == (Outcome.LEASE_LOST, False)
    assert server.delivered() == []


def test_pipelined_unknown_recipient_hard_bounces_and_the_session_goes_on(
        smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "rcpt", "address": ALICE, "reply": "550 5.1.1 user unknown"}])
    with pipelining(smtp.open_session(account(server), None, timeouts=FAST)) as session:
        bounced = session.send(SENDER, ALICE, MESSAGE)
        assert session.alive
        sent = session.send(SENDER, BOB, MESSAGE)
    assert (bounced.outcome, bounced.stage, bounced.code, bounced.enhanced) == (
        Outcome.HARD_BOUNCE, "rcpt", 550, "5.1.1")
    assert (bounced.reached_mail, bounced.dot_sent) == (True, False)
    assert sent.outcome is Outcome.SENT
    assert [t.rcpt_to for t in server.delivered()] == [(BOB,)]
    assert server.connections == 1


@pytest.mark.parametrize(("rule", "outcome", "stage"), [
    ({"stage": "mail", "reply": "451 4.7.1 rate limited, try again later"}, Outcome.ACCOUNT_EXHAUSTED, "mail"),
    ({"stage": "rcpt", "reply": "452 4.2.2 mailbox full"}, Outcome.DEFERRED, "rcpt"),
    ({"stage": "data", "reply": "554 5.7.1 Message rejected under suspicion of SPAM"}, Outcome.POLICY_BLOCK, "data"),
    ({"stage": "dot", "reply": "451 4.3.0 try again later"}, Outcome.DEFERRED, "dot"),
])
def test_pipelined_refusal_is_classified_and_the_connection_stays_usable(
        smtp_server: StartServer, rule: dict[str, str], outcome: Outcome, stage: str) -> None:
    server = smtp_server(rules=[{**rule, "times": 1}])
    with pipelining(smtp.open_session(account(server), None, timeouts=FAST)) as session:
        result = session.send(SENDER, ALICE, MESSAGE)
        assert (result.outcome, result.stage, result.dot_sent) == (outcome, stage, stage == "dot")
        assert session.alive and session.send(SENDER, BOB, MESSAGE).outcome is Outcome.SENT
    assert [t.rcpt_to for t in server.delivered()] == [(BOB,)]
    assert server.connections == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
def test_pipelined_421_is_an_account_retry_and_ends_the_session(smtp_server: StartServer,
                                                               stage: str) -> None:
    server = smtp_server(rules=[{"stage": stage, "reply": "421 4.7.0 Try again later, closing connection"}])
    with pipelining(smtp.open_session(account(server), None, timeouts=FAST)) as session:
        result = session.send(SENDER, ALICE, MESSAGE)
        assert not session.alive
    assert (result.outcome, result.stage, result.dot_sent) == (Outcome.ACCOUNT_RETRY, stage, False)
    assert server.delivered() == []


def test_a_server_offering_pipelining_gets_mail_rcpt_and_data_in_one_write() -> None:
    # A minimal server on loopback that offers PIPELINING and answers the group only once
    # it has read all of it: a client waiting for the MAIL reply first would time out.
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, connection.makefile("rb") as lines:
            connection.sendall(b"220 test ESMTP\r\n")
            lines.readline()  # EHLO
            connection.sendall(b"250-test\r\n250 PIPELINING\r\n")
            group = b"".join(lines.readline() for _ in range(3))
            seen.append(group)
            connection.sendall(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
            while lines.readline() != b".\r\n":
                pass
            connection.sendall(b"250 2.0.0 queued\r\n")
            lines.readline()  # QUIT
            connection.sendall(b"221 bye\r\n")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    acct = AccountConfig(name="pipe", host="127.0.0.1", port=port, security="none",
                         allow_insecure=True, helo="client.bulksend.test")
    try:
        with smtp.open_session(acct, None, timeouts=FAST) as session:
            assert session.capabilities.pipelining
            result = session.send(SENDER, ALICE, MESSAGE)
    finally:
        server.join(5)
        listener.close()
    assert (result.outcome, result.code) == (Outcome.SENT, 250)
    assert seen == [f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n".encode()]
