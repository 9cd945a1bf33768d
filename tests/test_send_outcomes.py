"""DESIGN §6, one test per row: what an SMTP reply does to the delivery, the account and the
address, on SQLite and PostgreSQL, against real loopback servers whose journals are the truth.

Every test drives the sender with a FakeClock, so cooldowns, backoffs and expiry take no
time. Sessions to a server that is meant to go silent time out in 0.5 s: the sender takes
its session factory as a parameter (the CLI's uses the `smtp.Timeouts()` defaults, 30 s per
command and 120 s per transaction, which no config key changes).
"""

from __future__ import annotations

import dataclasses
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from bulksend import accounts, campaigns, db, models, sender, smtp, store_deliveries, subscribers, suppression
from bulksend.config import AccountConfig, DeliveryConfig
from bulksend.outcomes import COOLDOWN_FIRST, COOLDOWN_MAX, EXHAUSTED_FALLBACK
from tests.support.certs import TlsFiles, make_tls_files
from tests.test_send import HTML, SECRET, SENDER, FakeClock, account

PATIENT = smtp.Timeouts(command=10.0, transaction=30.0)
IMPATIENT = smtp.Timeouts(command=0.5, transaction=5.0)  # for accounts whose server goes silent
START = datetime(2026, 3, 2, 10, 20, tzinfo=timezone.utc).timestamp()  # a Monday, 10:20 UTC


def address(i: int) -> str:
    return f"user{i:05d}@example.org"


# --- setting up -------------------------------------------------------------------------------


def subscribe(engine: sa.Engine, tmp_path: Path, count: int, now: float) -> None:
    """`count` subscribers on the list "news"."""
    rows = "".join(f"{address(i)},User {i}\r\n" for i in range(count))
    (tmp_path / "list.csv").write_text("email,name\r\n" + rows, encoding="utf-8")
    subscribers.import_file(engine, tmp_path / "list.csv", "news", now=now)


def launch(engine: sa.Engine, name: str, now: float) -> None:
    """Create and start campaign `name` for the list "news"."""
    spec = campaigns.NewCampaign(name=name, lists=("news",), subject="Hi {{ name }}", html=HTML,
                                 html_name="n.html")
    campaigns.create(engine, spec, now)
    campaigns.start(engine, name, campaigns.Launch(SENDER, (), SECRET), now=now, no_dkim=True)


def begin(engine: sa.Engine, tmp_path: Path, recipients: int) -> FakeClock:
    """A FakeClock at START, and campaign "c" started for `recipients` subscribers."""
    clock = FakeClock(START)
    subscribe(engine, tmp_path, recipients, clock())
    launch(engine, "c", clock())
    return clock


def healthy(smtp_server: Any, name: str, **options: Any) -> Any:
    """A STARTTLS server that knows account `name` and its password."""
    return smtp_server(mode="starttls", users={name: f"secret-{name}"}, require_auth=True, **options)


def send(engine: sa.Engine, accounts_: list[AccountConfig], clock: FakeClock, *,
         delivery: DeliveryConfig = DeliveryConfig(), passwords: dict[str, str] | None = None,
         impatient: tuple[str, ...] = ()) -> sender.Report:
    """One `send --once` run at the clock's time; `impatient` accounts time out in 0.5 s."""
    settings = sender.Settings(tuple(accounts_), delivery, SENDER, SECRET, (), ZoneInfo("UTC"))

    def open_session(acc: AccountConfig) -> smtp.Session:
        password = (passwords or {}).get(acc.name, f"secret-{acc.name}")
        return smtp.open_session(acc, password, IMPATIENT if acc.name in impatient else PATIENT)

    worker = sender.Sender(engine, settings, open_session, clock=clock, sleep=clock.sleep)
    return worker.run(once=True)


# --- reading the outcome ----------------------------------------------------------------------


def delivery(engine: sa.Engine, email: str, campaign: str = "c") -> Any:
    """The delivery row of `email` in `campaign`."""
    d, c = models.deliveries, models.campaigns
    with engine.connect() as connection:
        return connection.execute(
            sa.select(d).join(c, c.c.id == d.c.campaign_id)
            .where(d.c.email_key == email, c.c.name == campaign)).one()


def account_row(engine: sa.Engine, name: str) -> store_deliveries.AccountRow:
    with db.reading(engine) as connection:
        return store_deliveries.accounts(connection, [name])[name]


def suppressed(engine: sa.Engine) -> dict[str, str]:
    """Suppressed address → reason."""
    with engine.connect() as connection:
        return dict(connection.execute(sa.select(models.suppressions.c.email_key,
                                                 models.suppressions.c.reason)).all())


def reservations(engine: sa.Engine, name: str) -> list[str | None]:
    """The outcomes of the attempts still reserved on account `name` (the quota ledger)."""
    a = models.delivery_attempts
    with engine.connect() as connection:
        return list(connection.execute(sa.select(a.c.outcome).where(a.c.account == name)
                                       .order_by(a.c.id)).scalars())


def accepted(server: Any) -> list[str]:
    """Recipients the server accepted a message for (2xx after the dot), in order."""
    return [rcpt for transaction in server.delivered() for rcpt in transaction.rcpt_to]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_rests(engine: sa.Engine, name: str, state: str, until: float | None,
                 failures: int | None = None) -> store_deliveries.AccountRow:
    row = account_row(engine, name)
    assert (row.state, row.until) == (state, until), row
    if failures is not None:
        assert row.failures == failures, row
    return row


# --- connect/TLS failure, timeout, 421 anywhere -----------------------------------------------

RETRY_CASES = [
    pytest.param("closed port", False, id="connection-refused"),
    pytest.param("implicit TLS to a plain server", False, id="tls-handshake-fails"),
    pytest.param([{"stage": "starttls", "reply": "454 4.7.0 TLS not available due to local problem"}],
                 False, id="starttls-refused"),
    pytest.param([{"stage": "connect", "action": "delay", "seconds": 3.0}], False,
                 id="timeout-at-greeting"),
    pytest.param([{"stage": "rcpt", "action": "delay", "seconds": 3.0}], True, id="timeout-at-rcpt"),
    pytest.param([{"stage": "connect", "reply": "421 4.3.2 Service not available"}], False,
                 id="421-greeting"),
    pytest.param([{"stage": "mail", "reply": "421 4.7.0 Try again later, closing connection"}], True,
                 id="421-mail"),
    pytest.param([{"stage": "rcpt", "reply": "421 4.4.5 Server busy, try again later"}], True,
                 id="421-rcpt"),
    pytest.param([{"stage": "dot", "reply": "421 4.3.0 Temporary system problem"}], True,
                 id="421-after-dot"),
]


def retry_account(case: Any, smtp_server: Any, tls_files: TlsFiles) -> tuple[AccountConfig, Any]:
    """The failing account "bad" of a RETRY_CASES case, and its server (None: none listens)."""
    if case == "closed port":
        nowhere = SimpleNamespace(host="127.0.0.1", port=closed_port(), ca_file=tls_files.ca_file)
        return account(nowhere, "bad"), None
    if case == "implicit TLS to a plain server":
        server = smtp_server(mode="plain")
        return dataclasses.replace(account(server, "bad"), security="tls"), server
    server = healthy(smtp_server, "bad", rules=case)
    return account(server, "bad"), server


@pytest.mark.parametrize(("case", "reached_mail"), RETRY_CASES)
def test_account_failure_requeues_without_attempt_reroutes_and_cools_down_60s(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any, tls_files: TlsFiles,
        case: Any, reached_mail: bool) -> None:
    clock = begin(engine, tmp_path, 2)
    bad, bad_server = retry_account(case, smtp_server, tls_files)
    good = healthy(smtp_server, "good")

    report = send(engine, [bad, account(good, "good")], clock, impatient=("bad",))

    # user0 was claimed for "bad" first (config order), came back and went through "good".
    assert (report.sent, report.failed, report.deferred, report.unknown) == (2, 0, 0, 0)
    assert sorted(accepted(good)) == [address(0), address(1)]
    assert bad_server is None or accepted(bad_server) == []
    first = delivery(engine, address(0))
    assert (first.state, first.account, first.attempts) == ("sent", "good", 1)  # no attempt counted
    # The quota counts only if MAIL FROM went out (DESIGN §5); the attempt led back to `queued`.
    assert reservations(engine, "bad") == (["queued"] if reached_mail else [])
    row = assert_rests(engine, "bad", "cooldown", START + COOLDOWN_FIRST, failures=1)
    assert row.reason and row.blocked == 0 and row.failed == 0
    assert suppressed(engine) == {}


def test_cooldown_doubles_after_each_failure_up_to_an_hour_and_resets_on_success(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 1)
    server = healthy(smtp_server, "flaky", rules=[{"stage": "connect", "reply": "421 4.3.2 busy"}])
    flaky = account(server, "flaky")

    for failures, pause in enumerate([60, 120, 240, 480, 960, 1920, 3600, 3600], start=1):
        report = send(engine, [flaky], clock)
        assert (report.sent, report.stopped_because) == (0, "all accounts unavailable")
        assert_rests(engine, "flaky", "cooldown", clock() + pause, failures=failures)
        row = delivery(engine, address(0))
        assert (row.state, row.attempts) == ("queued", 0)
        connections = server.connections
        clock.sleep(pause - 1)
        assert send(engine, [flaky], clock).sent == 0  # still resting: not even a connection
        assert server.connections == connections
        clock.sleep(1)

    server.clear_rules()
    assert send(engine, [flaky], clock).sent == 1
    assert accepted(server) == [address(0)]
    assert_rests(engine, "flaky", "active", None, failures=0)
    assert delivery(engine, address(0)).attempts == 1


# --- 554 greeting, AUTH 535/534/530, certificate not trusted -----------------------------------

DISABLE_CASES = [
    pytest.param("554 greeting", id="554-greeting"),
    pytest.param("wrong password", id="auth-535-wrong-password"),
    pytest.param("534", id="auth-534"),
    pytest.param("530", id="auth-530"),
    pytest.param("untrusted certificate", id="certificate-not-trusted"),
]
DISABLE_RULES = {
    "554 greeting": [{"stage": "connect", "reply": "554 5.7.1 mx.bulksend.test: no SMTP service for you"}],
    "534": [{"stage": "auth", "reply": "534 5.7.9 Application-specific password required"}],
    "530": [{"stage": "auth", "reply": "530 5.7.0 Access denied"}],
}


@pytest.mark.parametrize("case", DISABLE_CASES)
def test_refused_account_is_disabled_until_accounts_enable(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any, case: str) -> None:
    clock = begin(engine, tmp_path, 2)
    bad_server = healthy(smtp_server, "bad", rules=DISABLE_RULES.get(case, []))
    good = healthy(smtp_server, "good")
    bad = account(bad_server, "bad")
    passwords = {"bad": "not-the-password"} if case == "wrong password" else {}
    if case == "untrusted certificate":
        bad = dataclasses.replace(bad, ca_file=make_tls_files(tmp_path / "other-ca").ca_file)

    report = send(engine, [bad, account(good, "good")], clock, passwords=passwords)

    assert report.sent == 2 and sorted(accepted(good)) == [address(0), address(1)]
    assert bad_server.journal == []
    assert (delivery(engine, address(0)).attempts, reservations(engine, "bad")) == (1, [])
    row = assert_rests(engine, "bad", "disabled", None)
    assert row.reason and row.last_error
    assert suppressed(engine) == {}

    # Disabled has no end: two days later the account is still skipped, without a connection.
    clock.sleep(2 * 86400)
    launch(engine, "c2", clock())
    connections = bad_server.connections
    assert send(engine, [bad, account(good, "good")], clock).sent == 2
    assert bad_server.connections == connections and len(accepted(good)) == 4
    assert_rests(engine, "bad", "disabled", None)

    # The operator fixes the cause and runs `bulksend accounts enable bad`.
    bad_server.clear_rules()
    bad = dataclasses.replace(bad, ca_file=bad_server.ca_file)
    assert accounts.enable(engine, (bad,), "bad", clock()) == "disabled"
    assert_rests(engine, "bad", "active", None, failures=0)
    launch(engine, "c3", clock())
    assert send(engine, [bad, account(good, "good")], clock).sent == 2
    assert accepted(bad_server) == [address(0)]


# --- rate/quota replies ----------------------------------------------------------------------

EXHAUST_CASES = [
    pytest.param([{"stage": "mail", "reply": "451 4.7.1 rate limited, try again later"}], True,
                 id="451-4.7.1-rate-limited"),
    pytest.param([{"stage": "rcpt", "reply": "452 4.7.1 Message rate exceeded for this sender"}], True,
                 id="452-4.7.1-rate"),
    pytest.param([{"stage": "auth", "reply": "454 4.7.0 Too many logins: rate limit exceeded"}], False,
                 id="454-4.7.0-rate-at-auth"),
    pytest.param([{"stage": "mail", "reply": "550 5.4.5 Daily user sending quota exceeded."}], True,
                 id="550-5.4.5"),
    pytest.param([{"stage": "dot", "reply": "554 5.7.0 Quota exceeded, message not accepted"}], True,
                 id="quota-exceeded-after-dot"),
    pytest.param([{"stage": "rcpt", "reply": "550 5.7.1 You have reached your daily limit"}], True,
                 id="daily-limit"),
]


@pytest.mark.parametrize(("rules", "reached_mail"), EXHAUST_CASES)
def test_rate_or_quota_reply_exhausts_the_account_and_reroutes(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any, rules: list[dict[str, Any]],
        reached_mail: bool) -> None:
    clock = begin(engine, tmp_path, 2)
    bad_server = healthy(smtp_server, "bad", rules=rules)
    good = healthy(smtp_server, "good")

    report = send(engine, [account(bad_server, "bad"), account(good, "good")], clock)

    assert report.sent == 2 and sorted(accepted(good)) == [address(0), address(1)]
    assert accepted(bad_server) == []
    assert delivery(engine, address(0)).attempts == 1
    assert reservations(engine, "bad") == (["queued"] if reached_mail else [])
    # No limit configured: the provider's is unknown, so the account rests the fallback time.
    row = assert_rests(engine, "bad", "exhausted", START + EXHAUSTED_FALLBACK)
    assert row.failures == 0 and row.reason
    assert suppressed(engine) == {}


DAILY_QUOTA = "550 5.4.5 Daily user sending quota exceeded."
RATE_LIMITED = "451 4.7.1 rate limited, try again later"


@pytest.mark.parametrize(("limits", "window", "reply", "frees"), [
    pytest.param(("100/day",), "rolling", DAILY_QUOTA, START + 86400, id="rolling-day"),
    pytest.param(("100/hour",), "calendar", DAILY_QUOTA,
                 datetime(2026, 3, 2, 11, tzinfo=timezone.utc).timestamp(), id="calendar-hour"),
    # Several windows: the one the reply names, else the first that frees.
    pytest.param(("20/minute", "500/day"), "rolling", DAILY_QUOTA, START + 86400,
                 id="the-window-the-reply-names"),
    pytest.param(("20/minute", "500/day"), "rolling", RATE_LIMITED, START + 60,
                 id="the-first-window-to-free"),
])
def test_quota_reply_exhausts_the_account_until_its_configured_window_frees(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any, limits: tuple[str, ...], window: str,
        reply: str, frees: float) -> None:
    clock = begin(engine, tmp_path, 2)
    bad_server = healthy(smtp_server, "bad", rules=[{"stage": "mail", "reply": reply}])
    bad = dataclasses.replace(account(bad_server, "bad", limits=limits), window=window)
    good = account(healthy(smtp_server, "good"), "good")

    assert send(engine, [bad, good], clock).sent == 2
    # The provider says the quota is used up although bulksend counted 1 message: mail went
    # out through this account from elsewhere. It rests until its window can have room again.
    assert_rests(engine, "bad", "exhausted", frees)

    bad_server.clear_rules()
    clock.now = frees - 1
    launch(engine, "c2", clock())
    assert send(engine, [bad, good], clock).sent == 2 and accepted(bad_server) == []
    clock.now = frees
    launch(engine, "c3", clock())
    assert send(engine, [bad, good], clock).sent == 2 and accepted(bad_server) == [address(0)]
    assert_rests(engine, "bad", "active", None)


# --- RCPT 5.1.1 / 5.1.2 / 5.1.3 / 5.1.10 / "user unknown" --------------------------------------

HARD_REPLIES = [
    "550 5.1.1 <user00000@example.org>: Recipient address rejected: User unknown",
    "550 5.1.2 Bad destination system address",
    "553 5.1.3 Bad recipient address syntax",
    "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    "550 sorry, user unknown",
    "550 5.7.1 No such user!",  # Yandex: "no such user" wins over 5.7.x
]


# Postfix verifying our return path at RCPT time: about the sender, not this recipient.
SENDER_REFUSED = ("550 5.1.7 <bounces@example.com>: Sender address rejected: undeliverable address: "
                  "host mx.example.com said: 550 5.1.1 User unknown in virtual mailbox table")


def test_unknown_recipient_fails_is_suppressed_and_never_mailed_again(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    replies = [*HARD_REPLIES, SENDER_REFUSED]
    clock = begin(engine, tmp_path, len(replies) + 1)
    server = healthy(smtp_server, "h", rules=[
        {"stage": "rcpt", "address": address(i), "reply": reply} for i, reply in enumerate(replies)])
    h = account(server, "h")

    report = send(engine, [h], clock)

    hard = [address(i) for i in range(len(HARD_REPLIES))]
    sender_refused, fine = address(len(HARD_REPLIES)), address(len(replies))
    assert (report.sent, report.failed) == (1, len(replies))
    for i, reply in enumerate(replies):
        row = delivery(engine, address(i))
        assert (row.state, row.attempts, row.smtp_code) == ("failed", 1, int(reply[:3])), reply
    assert suppressed(engine) == dict.fromkeys(hard, "hard_bounce")  # not sender_refused
    row = assert_rests(engine, "h", "active", None, failures=0)
    assert (row.failed, row.blocked) == (len(replies), 0)
    assert campaigns.show(engine, "c")["status"] == "finished"

    # A later campaign queues them as suppressed and never gives them to a server.
    clock.sleep(86400)
    launch(engine, "c2", clock())
    assert all(delivery(engine, email, "c2").state == "suppressed" for email in hard)
    server.clear_rules()
    assert send(engine, [h], clock).sent == 2
    refused = [rcpt for t in server.journal for rcpt, _ in t.rcpt_rejected]
    assert sorted(refused) == [*hard, sender_refused]  # once each, in the first campaign only
    assert accepted(server) == [fine, sender_refused, fine]


# --- RCPT or DATA 5.7.x policy/spam block ----------------------------------------------------


def test_policy_block_fails_counts_toward_block_rate_and_does_not_suppress(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 3)
    server = healthy(smtp_server, "p", rules=[
        {"stage": "rcpt", "address": address(0),
         "reply": "554 5.7.1 <user00000@example.org>: Recipient address rejected: Access denied"},
        # user0 never reaches DATA, so the first message to get here is user1's.
        {"stage": "dot", "times": 1, "reply": "554 5.7.1 Message rejected as spam by Content Filtering"},
    ])

    report = send(engine, [account(server, "p")], clock)

    assert (report.sent, report.failed) == (1, 2)
    assert accepted(server) == [address(2)]
    for email in (address(0), address(1)):
        row = delivery(engine, email)
        assert (row.state, row.attempts, row.smtp_code, row.smtp_enhanced) == ("failed", 1, 554, "5.7.1")
    row = assert_rests(engine, "p", "active", None, failures=0)
    assert (row.blocked, row.failed, row.sent) == (2, 2, 1)
    assert suppressed(engine) == {}


# --- 4xx per recipient, incl. 4.2.2 / 5.2.2 mailbox full ----------------------------------------

DEFER_REPLIES = [
    "451 4.7.1 Greylisted, please try again later",
    "450 4.2.0 Mailbox temporarily unavailable",
    "452 4.2.2 Mailbox full",
    "552 5.2.2 Mailbox full",
    "550 5.2.2 <user00004@example.org>: user is over quota",
]


def test_recipient_4xx_and_mailbox_full_defer_with_doubling_backoff_then_expire(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, len(DEFER_REPLIES) + 1)
    server = healthy(smtp_server, "d", rules=[
        {"stage": "rcpt", "address": address(i), "reply": reply} for i, reply in enumerate(DEFER_REPLIES)])
    d = account(server, "d")
    waiting = [address(i) for i in range(len(DEFER_REPLIES))]

    # retry_after 300 s (the default) doubles per attempt and stops growing at 4000 s.
    for attempt, wait in enumerate([300, 600, 1200, 2400, 4000, 4000, 4000], start=1):
        report = send(engine, [d], clock)
        assert (report.deferred, report.stopped_because) == (len(waiting), "only future retries remain")
        for email in waiting:
            row = delivery(engine, email)
            assert (row.state, row.attempts, row.next_attempt_at) == ("deferred", attempt, clock() + wait)
        clock.sleep(wait - 1)
        assert send(engine, [d], clock).deferred == 0  # not due yet
        clock.sleep(1)

    # The 8th attempt is the last one (max_attempts = 8).
    report = send(engine, [d], clock)
    assert report.deferred == 0 and report.stopped_because == "queue empty"
    assert all((delivery(engine, e).state, delivery(engine, e).attempts) == ("expired", 8) for e in waiting)
    assert accepted(server) == [address(len(waiting))]
    assert sum(1 for t in server.journal for rcpt, _ in t.rcpt_rejected if rcpt == address(0)) == 8
    assert_rests(engine, "d", "active", None, failures=0)
    assert suppressed(engine) == {}
    assert campaigns.show(engine, "c")["status"] == "finished"


def test_deferred_past_give_up_after_expires(engine: sa.Engine, tmp_path: Path,
                                             smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 1)
    server = healthy(smtp_server, "d", rules=[{"stage": "rcpt", "reply": "450 4.2.1 try later"}])
    d = account(server, "d")
    policy = DeliveryConfig(retry_after=300, give_up_after=1000)

    for attempt, wait in enumerate([300, 600, 1200], start=1):
        assert send(engine, [d], clock, delivery=policy).deferred == 1
        row = delivery(engine, address(0))
        assert (row.state, row.attempts, row.next_attempt_at) == ("deferred", attempt, clock() + wait)
        clock.sleep(wait)
    # Now 2100 s after queueing, past give_up_after: this deferral is the last.
    send(engine, [d], clock, delivery=policy)
    row = delivery(engine, address(0))
    assert (row.state, row.attempts) == ("expired", 4)
    assert campaigns.show(engine, "c")["status"] == "finished"


# --- 4xx after the dot -----------------------------------------------------------------------


def test_4xx_after_the_dot_defers_and_the_retry_delivers(engine: sa.Engine, tmp_path: Path,
                                                         smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 2)
    server = healthy(smtp_server, "d", rules=[
        {"stage": "dot", "times": 1, "reply": "451 4.3.0 Temporary local problem, try later"}])
    d = account(server, "d")

    report = send(engine, [d], clock)

    assert (report.sent, report.deferred) == (1, 1)
    first = server.journal[0]
    assert (first.rcpt_to, first.data is not None, first.reply) == (
        (address(0),), True, "451 4.3.0 Temporary local problem, try later")
    row = delivery(engine, address(0))
    assert (row.state, row.attempts, row.next_attempt_at, row.smtp_code) == ("deferred", 1, START + 300, 451)
    assert_rests(engine, "d", "active", None, failures=0)

    clock.sleep(300)
    assert send(engine, [d], clock).sent == 1
    assert (delivery(engine, address(0)).state, delivery(engine, address(0)).attempts) == ("sent", 2)
    assert sorted(accepted(server)) == [address(0), address(1)]
    assert suppressed(engine) == {}


# --- connection lost before the dot -----------------------------------------------------------
# The server hangs up at RCPT. A drop in mid-DATA is no deterministic test of this row: the
# client may write the final dot before the reset reaches it, and then `unknown` is right.


def test_connection_lost_before_the_dot_requeues_with_the_attempt_counted(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 1)
    server = healthy(smtp_server, "x", rules=[{"stage": "rcpt", "times": 1, "action": "drop"}])

    report = send(engine, [account(server, "x")], clock)

    # Once is no pattern: no cooldown, so the same account takes it again at once.
    assert (report.sent, report.unknown) == (1, 0)
    dropped, delivered_ = server.journal
    assert (dropped.end, dropped.data, delivered_.reply[:3]) == ("dropped", None, "250")
    assert delivered_.rcpt_to == (address(0),)
    row = delivery(engine, address(0))
    assert (row.state, row.attempts) == ("sent", 2)
    assert reservations(engine, "x") == ["queued", "sent"]  # both reached MAIL FROM
    assert_rests(engine, "x", "active", None, failures=0)


def test_connection_lost_before_the_dot_again_cools_the_account_down(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 1)
    server = healthy(smtp_server, "x", rules=[{"stage": "rcpt", "action": "drop"}])
    x = account(server, "x")

    report = send(engine, [x], clock)

    assert (report.sent, report.unknown, report.stopped_because) == (0, 0, "all accounts unavailable")
    assert [t.end for t in server.journal] == ["dropped", "dropped"]
    row = delivery(engine, address(0))
    assert (row.state, row.attempts) == ("queued", 2)
    assert_rests(engine, "x", "cooldown", START + COOLDOWN_FIRST, failures=2)

    good = healthy(smtp_server, "good")
    assert send(engine, [x, account(good, "good")], clock).sent == 1
    assert accepted(good) == [address(0)] and delivery(engine, address(0)).attempts == 3
    assert len(server.journal) == 2


# --- no reply after the dot ------------------------------------------------------------------


def test_no_reply_after_the_dot_is_unknown_and_never_resent(engine: sa.Engine, tmp_path: Path,
                                                            smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 2)
    server = healthy(smtp_server, "s", rules=[{"stage": "dot", "times": 1, "action": "silence"}])
    s = account(server, "s")

    report = send(engine, [s], clock, impatient=("s",))

    assert (report.sent, report.unknown) == (1, 1)
    silenced = server.journal[0]
    assert (silenced.rcpt_to, silenced.end, silenced.data is not None) == ((address(0),), "silenced", True)
    row = delivery(engine, address(0))
    assert (row.state, row.attempts) == ("unknown", 1)
    assert_rests(engine, "s", "active", None, failures=0)
    assert suppressed(engine) == {}
    assert campaigns.show(engine, "c")["status"] == "finished"

    clock.sleep(7 * 86400)
    report = send(engine, [s], clock)
    assert (report.sent, report.stopped_because) == (0, "queue empty")
    assert [t.rcpt_to for t in server.journal] == [(address(0),), (address(1),)]
    assert delivery(engine, address(0)).state == "unknown"


# --- address suppressed between queueing and sending --------------------------------------------


def test_address_suppressed_after_start_is_never_sent_and_uses_no_quota(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 2)
    assert delivery(engine, address(0)).state == "queued"
    suppression.add(engine, [address(0)], reason="unsubscribe", source="test", now=clock())
    server = healthy(smtp_server, "q")
    q = account(server, "q", limits=("1/hour",))

    report = send(engine, [q], clock)

    # With room for one message an hour, user1 went out: user0 gave its reservation back.
    assert (report.sent, report.suppressed) == (1, 1)
    assert [t.rcpt_to for t in server.journal] == [(address(1),)]
    row = delivery(engine, address(0))
    assert (row.state, row.attempts) == ("suppressed", 0)
    assert reservations(engine, "q") == ["sent"]
    usage = accounts.status(engine, (q,), ZoneInfo("UTC"), clock())[0]["limits"]
    assert usage[0]["used"] == 1
    assert suppressed(engine) == {address(0): "unsubscribe"}
    assert campaigns.show(engine, "c")["status"] == "finished"


# --- an account that starts resting takes no more mail, however many sessions saw it fail ------


def test_failure_seen_by_several_connections_at_once_cools_down_once(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any, tls_files: TlsFiles) -> None:
    clock = begin(engine, tmp_path, 4)
    nowhere = SimpleNamespace(host="127.0.0.1", port=closed_port(), ca_file=tls_files.ca_file)
    bad = account(nowhere, "bad", connections=2)  # two sessions fail to open, one per lane
    good = healthy(smtp_server, "good")

    assert send(engine, [bad, account(good, "good")], clock).sent == 4
    assert_rests(engine, "bad", "cooldown", START + COOLDOWN_FIRST, failures=1)


def test_disabled_account_is_not_revived_by_a_later_lesser_failure(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    clock = begin(engine, tmp_path, 4)
    bad_server = healthy(smtp_server, "bad", rules=[
        {"stage": "mail", "times": 1,
         "reply": "553 5.7.1 <news@example.com>: Sender address rejected: not owned by user"},
        {"stage": "mail", "reply": "421 4.7.0 Try again later, closing connection"},
    ])
    good = healthy(smtp_server, "good")

    accounts_ = [account(bad_server, "bad"), account(good, "good")]
    assert send(engine, accounts_, clock).sent == 4
    assert_rests(engine, "bad", "disabled", None)
    tried = len(bad_server.journal)
    clock.sleep(COOLDOWN_MAX)
    launch(engine, "c2", clock())
    assert send(engine, accounts_, clock).sent == 4 and len(bad_server.journal) == tried
    assert_rests(engine, "bad", "disabled", None)


@pytest.mark.parametrize("reply", [
    pytest.param("421 4.7.0 Try again later, closing connection", id="421-cooldown"),
    pytest.param("550 5.4.5 Daily user sending quota exceeded.", id="quota-exhausted"),
    pytest.param("553 5.7.1 <news@example.com>: Sender address rejected: not owned by user",
                 id="sender-refused-disabled"),
])
def test_account_that_starts_resting_mid_batch_takes_no_more_of_it(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any, reply: str) -> None:
    clock = begin(engine, tmp_path, 4)
    bad_server = healthy(smtp_server, "bad", rules=[{"stage": "mail", "reply": reply}])
    good = healthy(smtp_server, "good")

    # user0 and user2 are claimed for "bad" in one batch, and go out over one lane.
    assert send(engine, [account(bad_server, "bad"), account(good, "good")], clock).sent == 4
    assert sorted(accepted(good)) == [address(i) for i in range(4)]
    assert [t.mail_reply for t in bad_server.journal] == [reply]  # user2 was never tried there
    assert delivery(engine, address(2)).attempts == 1
