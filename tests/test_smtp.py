"""SMTP sessions against the real fault-injecting test server; its journal is the truth.

No smtplib is mocked: every test opens a real loopback connection (TLS with the test CA),
and the server's fault script produces the replies, drops, silences and trickles.
"""

from __future__ import annotations

import base64
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bulksend import smtp
from bulksend.config import AccountConfig
from bulksend.errors import StateError
from bulksend.smtp import AccountError, Outcome
from tests.support.smtpserver import SmtpServer

StartServer = Callable[..., SmtpServer]

PASSWORD = "s3cret-Pässwörd-42"  # non-ASCII on purpose: AUTH must carry it as UTF-8
USER = "news@sender.test"
SENDER = "bounces+t0k3n@sender.test"
ALICE = "alice@example.test"
BOB = "bob@example.test"
MESSAGE = (
    b"From: News <news@sender.test>\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\n"
    b".a line with a leading dot\r\n..and two\r\n.\r\nbye\r\n"
)
FAST = smtp.Timeouts(command=2, transaction=5)
_MODE_SECURITY = {"plain": "none", "starttls": "starttls", "tls": "tls"}


def account(server: SmtpServer, **overrides: Any) -> AccountConfig:
    """An account for `server` in its own TLS mode, trusting the test CA."""
    security = overrides.pop("security", _MODE_SECURITY[server.spec.mode])
    fields: dict[str, Any] = {
        "name": "acct-1", "host": server.host, "port": server.port, "security": security,
        "allow_insecure": security == "none", "ca_file": server.ca_file, "helo": "client.bulksend.test",
    }
    return AccountConfig(**{**fields, **overrides})


def authed(server: SmtpServer, **overrides: Any) -> AccountConfig:
    return account(server, username=USER, password_env="ACCT1_PASSWORD", **overrides)


def open_error(acct: AccountConfig, password: str | None = None, **options: Any) -> AccountError:
    with pytest.raises(AccountError) as caught:
        smtp.open_session(acct, password, **{"timeouts": FAST, **options})
    return caught.value


def wait_until_hung_up(server: SmtpServer, timeout: float = 5.0) -> None:
    """Until the server has no open session left (it dropped or timed out the client)."""
    deadline = time.monotonic() + timeout
    while server.state.live and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # asyncio closes the socket just after it reports the loss


def secret_forms() -> list[str]:
    """The password as it could leak: plain, base64, inside an AUTH PLAIN blob."""
    return [
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
    ]


# -- security modes ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_tls_modes_deliver_over_a_verified_connection_with_the_configured_helo(smtp_server: StartServer,
                                                                               mode: str) -> None:
    server = smtp_server(mode=mode, users={USER: PASSWORD}, require_auth=True)
    with smtp.open_session(authed(server), PASSWORD, timeouts=FAST) as session:
        assert session.tls and session.capabilities.auth >= {"PLAIN", "LOGIN"}
        result = session.send(SENDER, ALICE, MESSAGE, before_dot=lambda: True)
    assert (result.outcome, result.stage, result.code, result.dot_sent, result.reached_mail) == (
        Outcome.SENT, "dot", 250, True, True)
    [txn] = server.delivered()
    assert (txn.tls, txn.auth_user, txn.ehlo) == (True, USER, "client.bulksend.test")


def test_plaintext_account_works_only_with_allow_insecure(smtp_server: StartServer) -> None:
    server = smtp_server(mode="plain")
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        assert session.send(SENDER, ALICE, MESSAGE).outcome is Outcome.SENT
    assert not session.tls and server.delivered()[0].tls is False

    error = open_error(account(server, allow_insecure=False))
    assert (error.kind, error.outcome) == ("insecure", Outcome.ACCOUNT_DISABLED)
    assert server.connections == 1  # refused before connecting


def test_auth_over_plaintext_is_refused_before_connecting(smtp_server: StartServer) -> None:
    server = smtp_server(mode="plain", users={USER: PASSWORD})
    error = open_error(authed(server), PASSWORD)
    assert (error.kind, error.outcome) == ("insecure", Outcome.ACCOUNT_DISABLED)
    assert "plaintext" in str(error) and server.connections == 0


def test_starttls_account_refuses_a_server_that_does_not_offer_starttls(smtp_server: StartServer) -> None:
    server = smtp_server(mode="plain", users={USER: PASSWORD})
    error = open_error(authed(server, security="starttls"), PASSWORD)
    assert (error.kind, error.outcome) == ("starttls", Outcome.ACCOUNT_DISABLED)
    assert str(error).startswith(f"account acct-1 (127.0.0.1:{server.port}): the server does not offer STARTTLS")
    assert server.journal == []


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_untrusted_certificate_disables_the_account(smtp_server: StartServer, mode: str) -> None:
    server = smtp_server(mode=mode)
    error = open_error(account(server, ca_file=None))  # the system store does not know the test CA
    assert (error.kind, error.outcome) == ("certificate", Outcome.ACCOUNT_DISABLED)
    assert "certificate not trusted" in str(error)


def test_missing_ca_file_disables_the_account_without_connecting(smtp_server: StartServer, tmp_path: Path) -> None:
    server = smtp_server(mode="tls")
    error = open_error(account(server, ca_file=tmp_path / "gone.pem"))
    assert (error.kind, error.outcome) == ("certificate", Outcome.ACCOUNT_DISABLED)
    assert "gone.pem" in str(error) and server.connections == 0


def test_refused_connection_is_a_retry(smtp_server: StartServer) -> None:
    server = smtp_server()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = open_error(account(server, port=port))
    assert (error.kind, error.outcome) == ("connect", Outcome.ACCOUNT_RETRY)
    assert str(error) == f"account acct-1 (127.0.0.1:{port}): connection refused"


@pytest.mark.parametrize(("reply", "outcome"), [
    ("421 4.3.2 Service not available", Outcome.ACCOUNT_RETRY),
    ("554 5.7.1 No SMTP service here", Outcome.ACCOUNT_DISABLED),
])
def test_refused_greeting_names_account_and_reply(smtp_server: StartServer, reply: str, outcome: Outcome) -> None:
    server = smtp_server(rules=[{"stage": "connect", "reply": reply}])
    error = open_error(account(server))
    assert (error.kind, error.outcome, error.code) == ("greeting", outcome, int(reply[:3]))
    assert str(error) == f"account acct-1 (127.0.0.1:{server.port}): {reply}"


# -- AUTH and credentials ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_mechanism_logs_in_with_a_utf8_password(smtp_server: StartServer, mechanism: str) -> None:
    server = smtp_server(mode="tls", users={USER: PASSWORD}, require_auth=True)
    with smtp.open_session(authed(server), PASSWORD, timeouts=FAST, mechanisms=(mechanism,)) as session:
        assert session.send(SENDER, ALICE, MESSAGE).outcome is Outcome.SENT
    assert server.delivered()[0].auth_user == USER


def test_wrong_password_disables_the_account_and_never_shows_the_password(smtp_server: StartServer) -> None:
    server = smtp_server(mode="starttls", users={USER: "the-right-one"}, require_auth=True)
    try:
        smtp.open_session(authed(server), PASSWORD, timeouts=FAST)
    except AccountError as error:
        caught, printed = error, traceback.format_exc()
    else:
        pytest.fail("a wrong password was accepted")
    assert (caught.kind, caught.outcome, caught.code, caught.enhanced) == ("auth", Outcome.ACCOUNT_DISABLED, 535, "5.7.8")
    assert str(caught).startswith(f"account acct-1 (127.0.0.1:{server.port}): 535 5.7.8 ")
    shown = [str(caught), repr(caught), repr(caught.args), repr(vars(caught)), printed,
             repr(caught.__context__), repr(caught.__cause__)]
    for text in shown:
        for secret in secret_forms():
            assert secret not in text


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_password_is_not_kept_by_an_open_session(smtp_server: StartServer, mechanism: str) -> None:
    server = smtp_server(mode="tls", users={USER: PASSWORD})
    session = smtp.open_session(authed(server), PASSWORD, timeouts=FAST, mechanisms=(mechanism,))
    try:
        kept = [repr(session), str(session), repr(vars(session)), repr(vars(session._client))]
        for text in kept:
            for secret in secret_forms():
                assert secret not in text
    finally:
        session.close()


# -- replies per recipient -----------------------------------------------------------------


def test_unknown_recipient_hard_bounces_and_the_session_goes_on_after_rset(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "rcpt", "address": ALICE, "reply": "550 5.1.1 user unknown"}])
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        bounced = session.send(SENDER, ALICE, MESSAGE)
        assert session.alive
        sent = session.send(SENDER, BOB, MESSAGE)
    assert (bounced.outcome, bounced.stage, bounced.code, bounced.enhanced, bounced.text) == (
        Outcome.HARD_BOUNCE, "rcpt", 550, "5.1.1", "5.1.1 user unknown")
    assert (bounced.reached_mail, bounced.dot_sent) == (True, False)
    assert sent.outcome is Outcome.SENT
    refused, delivered = server.journal
    assert refused.end == "rset" and delivered.rcpt_to == (BOB,)
    assert refused.session == delivered.session


@pytest.mark.parametrize(("rule", "outcome", "stage"), [
    ({"stage": "rcpt", "reply": "452 4.2.2 mailbox full"}, Outcome.DEFERRED, "rcpt"),
    ({"stage": "mail", "reply": "451 4.7.1 rate limited, try again later"}, Outcome.ACCOUNT_EXHAUSTED, "mail"),
    ({"stage": "data", "reply": "554 5.7.1 Message rejected under suspicion of SPAM"}, Outcome.POLICY_BLOCK, "data"),
    ({"stage": "dot", "reply": "451 4.3.0 try again later"}, Outcome.DEFERRED, "dot"),
])
def test_refusal_is_classified_and_the_connection_stays_usable(smtp_server: StartServer, rule: dict[str, str],
                                                               outcome: Outcome, stage: str) -> None:
    server = smtp_server(rules=[{**rule, "times": 1}])
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        result = session.send(SENDER, ALICE, MESSAGE)
        assert (result.outcome, result.stage, result.dot_sent) == (outcome, stage, stage == "dot")
        assert session.alive and session.send(SENDER, BOB, MESSAGE).outcome is Outcome.SENT
    assert [t.rcpt_to for t in server.delivered()] == [(BOB,)]
    assert server.connections == 1


def test_421_mid_transaction_is_an_account_retry_and_ends_the_session(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "rcpt", "reply": "421 4.7.0 Try again later, closing connection"}])
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        result = session.send(SENDER, ALICE, MESSAGE)
        assert not session.alive
    assert (result.outcome, result.code, result.reached_mail) == (Outcome.ACCOUNT_RETRY, 421, True)


# -- the dot and what can go wrong around it -----------------------------------------------


def test_drop_mid_data_requeues_and_says_the_dot_never_went_out(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "data", "action": "drop"}])

    def commit_sending() -> bool:  # the sender's commit takes a moment; the server hangs up meanwhile
        server.wait_for(lambda journal: any(t.end == "dropped" for t in journal))
        wait_until_hung_up(server)
        return True

    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        result = session.send(SENDER, ALICE, MESSAGE, before_dot=commit_sending)
        assert not session.alive
    assert (result.outcome, result.stage, result.code, result.dot_sent, result.reached_mail) == (
        Outcome.REQUEUE, "data", None, False, True)
    assert server.delivered() == []


def test_silence_after_the_dot_is_unknown_with_the_dot_sent(smtp_server: StartServer) -> None:
    server = smtp_server(rules=[{"stage": "dot", "action": "silence"}])
    with smtp.open_session(account(server), None, timeouts=smtp.Timeouts(command=0.5, transaction=5)) as session:
        started = time.monotonic()
        result = session.send(SENDER, ALICE, MESSAGE)
        assert time.monotonic() - started < 3 and not session.alive
    assert (result.outcome, result.stage, result.dot_sent) == (Outcome.UNKNOWN, "dot", True)
    [txn] = server.wait_for(lambda journal: len(journal) == 1)
    assert txn.data == MESSAGE and txn.reply is None  # it arrived: the RFC 1047 window is real


def test_lease_lost_before_the_dot_delivers_nothing(smtp_server: StartServer) -> None:
    server = smtp_server()
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        result = session.send(SENDER, ALICE, MESSAGE, before_dot=lambda: False)
        assert not session.alive
    assert (result.outcome, result.stage, result.dot_sent, result.reached_mail) == (
        Outcome.LEASE_LOST, "dot", False, True)
    [txn] = server.wait_for(lambda journal: len(journal) == 1)
    assert (txn.data, txn.reply, txn.delivered) == (None, None, False)


def test_before_dot_error_propagates_and_no_dot_is_sent(smtp_server: StartServer) -> None:
    server = smtp_server()

    def store_down() -> bool:
        raise OSError("database is locked")

    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        with pytest.raises(OSError, match="database is locked"):
            session.send(SENDER, ALICE, MESSAGE, before_dot=store_down)
        assert not session.alive
        with pytest.raises(StateError, match="acct-1"):
            session.send(SENDER, BOB, MESSAGE)
    server.wait_for(lambda journal: len(journal) == 1)
    assert server.delivered() == []


# -- connection reuse and deadlines ---------------------------------------------------------


def test_one_connection_carries_many_messages(smtp_server: StartServer) -> None:
    server = smtp_server(mode="starttls", users={USER: PASSWORD})
    recipients = [f"r{n}@example.test" for n in range(5)]
    with smtp.open_session(authed(server), PASSWORD, timeouts=FAST) as session:
        results = [session.send(SENDER, rcpt, MESSAGE, before_dot=lambda: True) for rcpt in recipients]
        assert session.sent == 5
    assert all(r.outcome is Outcome.SENT for r in results)
    assert [t.rcpt_to for t in server.delivered()] == [(r,) for r in recipients]
    assert len({t.session for t in server.journal}) == 1 and server.connections == 1


def test_session_the_server_closed_while_idle_is_no_longer_alive(smtp_server: StartServer) -> None:
    server = smtp_server(idle_timeout=0.2)
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        assert session.alive
        wait_until_hung_up(server)
        assert not session.alive  # the sender opens a new session instead of losing a message


def test_send_on_a_connection_closed_while_idle_requeues_without_reaching_mail(smtp_server: StartServer) -> None:
    server = smtp_server(idle_timeout=0.2)
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        wait_until_hung_up(server)
        result = session.send(SENDER, ALICE, MESSAGE)  # without asking `alive` first
    assert (result.outcome, result.stage, result.reached_mail) == (Outcome.REQUEUE, "mail", False)
    assert server.journal == []


def test_trickling_greeting_cannot_hold_open_session_past_its_deadline(smtp_server: StartServer) -> None:
    # ~50 bytes 0.1 s apart: 5 s of greeting, each byte well inside the command timeout.
    server = smtp_server(rules=[{"stage": "connect", "action": "trickle", "seconds": 0.1}])
    started = time.monotonic()
    error = open_error(account(server), timeouts=smtp.Timeouts(command=5, transaction=0.5))
    assert time.monotonic() - started < 2.5
    assert (error.kind, error.outcome) == ("timeout", Outcome.ACCOUNT_RETRY)


def test_trickling_reply_cannot_hold_send_past_its_deadline(smtp_server: StartServer) -> None:
    server = smtp_server()
    with smtp.open_session(account(server), None, timeouts=smtp.Timeouts(command=5, transaction=0.5)) as session:
        server.set_rules([{"stage": "rcpt", "action": "trickle", "seconds": 0.2}])
        started = time.monotonic()
        result = session.send(SENDER, ALICE, MESSAGE)
        assert time.monotonic() - started < 2.5 and not session.alive
    assert (result.outcome, result.stage, result.reached_mail, result.dot_sent) == (
        Outcome.ACCOUNT_RETRY, "connection", True, False)
    assert "deadline" in result.text


# -- the bytes and the envelope ------------------------------------------------------------


def test_8bit_message_goes_with_body_8bitmime_and_arrives_byte_for_byte(smtp_server: StartServer) -> None:
    server = smtp_server()
    utf8 = MESSAGE.replace(b"bye", "до свидания, Zoë".encode())
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        assert session.capabilities.eightbitmime
        assert session.send(SENDER, ALICE, utf8).outcome is Outcome.SENT
        assert session.send(SENDER, BOB, MESSAGE).outcome is Outcome.SENT
    eight, seven = server.delivered()
    assert "BODY=8BITMIME" in eight.mail_options and "BODY=8BITMIME" not in seven.mail_options
    assert (eight.data, seven.data) == (utf8, MESSAGE)


def test_8bit_message_is_refused_when_the_server_lacks_8bitmime(smtp_server: StartServer) -> None:
    server = smtp_server(eightbitmime=False)
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        assert not session.capabilities.eightbitmime
        with pytest.raises(ValueError, match="8BITMIME"):
            session.send(SENDER, ALICE, "Subject: Zoë\r\n\r\nx\r\n".encode())
        assert session.alive and session.send(SENDER, ALICE, MESSAGE).outcome is Outcome.SENT
    assert len(server.journal) == 1


def test_bare_line_feeds_are_refused_before_anything_is_sent(smtp_server: StartServer) -> None:
    server = smtp_server()
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        with pytest.raises(ValueError, match="bare CR or LF"):
            session.send(SENDER, ALICE, b"Subject: x\n\nbody\n")
    assert server.journal == []


def test_envelope_is_exactly_the_one_recipient_whatever_the_headers_say(smtp_server: StartServer) -> None:
    server = smtp_server()
    data = (b"From: news@sender.test\r\nTo: alice@example.test, carol@example.test\r\n"
            b"Cc: dave@example.test\r\nBcc: eve@example.test\r\nSubject: hi\r\n\r\nhello\r\n")
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        session.send(SENDER, BOB, data)
    [txn] = server.delivered()
    assert (txn.mail_from, txn.rcpt_to, txn.data) == (SENDER, (BOB,), data)


def test_utf8_address_goes_with_smtputf8_when_offered(smtp_server: StartServer) -> None:
    server = smtp_server(smtputf8=True)
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        result = session.send(SENDER, "зоя@example.test", MESSAGE)
    assert result.outcome is Outcome.SENT
    [txn] = server.delivered()
    assert txn.rcpt_to == ("зоя@example.test",) and "SMTPUTF8" in txn.mail_options


def test_utf8_address_fails_for_this_recipient_when_smtputf8_is_not_offered(smtp_server: StartServer) -> None:
    server = smtp_server(smtputf8=False)
    with smtp.open_session(account(server), None, timeouts=FAST) as session:
        result = session.send(SENDER, "зоя@example.test", MESSAGE)
        assert session.alive
    assert (result.outcome, result.reached_mail, result.dot_sent) == (Outcome.FAILED, False, False)
    assert "SMTPUTF8" in result.text and server.journal == []


def test_close_is_idempotent_and_never_raises(smtp_server: StartServer) -> None:
    server = smtp_server()
    session = smtp.open_session(account(server), None, timeouts=FAST)
    server.stop()  # the server is gone: QUIT fails, close() must not
    session.close()
    session.close()
    assert not session.alive and repr(session) == f"<Session acct-1 127.0.0.1:{server.port} closed sent=0>"
