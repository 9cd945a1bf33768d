"""The send loop against real loopback SMTP servers, on SQLite and PostgreSQL.

The servers' journals are the truth: what they accepted is what was delivered.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from bulksend import campaigns, models, sender, smtp, subscribers
from bulksend.config import AccountConfig, DeliveryConfig, SenderConfig
from bulksend.durations import parse_limit
from tests.support.cli import Bulksend

SECRET = b"send-test-secret-0123456789"
SENDER = SenderConfig(from_address="News <news@example.com>", list_id="news.example.com",
                      return_path="bounces@example.com", unsubscribe_url="https://example.com/u")
HTML = '<p>Hi {{ name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>'


class FakeClock:
    """Time that moves only when the test says so (sleep advances it)."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def account(server: Any, name: str, *, limits: tuple[str, ...] = (), weight: int = 1,
            connections: int = 1) -> AccountConfig:
    """An account on a test server (STARTTLS, AUTH, the test CA trusted)."""
    return AccountConfig(
        name=name, host=server.host, port=server.port, security="starttls",
        ca_file=Path(server.ca_file), username=name, password_env=f"PW_{name}",
        limits=tuple(parse_limit(text) for text in limits), weight=weight,
        connections=connections, messages_per_connection=1000,
    )


def servers(smtp_server: Any, names: list[str]) -> dict[str, Any]:
    """One STARTTLS server per account name, each knowing that account's password."""
    return {name: smtp_server(mode="starttls", users={name: f"secret-{name}"}, require_auth=True)
            for name in names}


def prepare(engine: sa.Engine, tmp_path: Path, recipients: int) -> str:
    """A list of `recipients` subscribers and a started campaign for it."""
    rows = "".join(f"user{i:05d}@example.org,User {i}\r\n" for i in range(recipients))
    (tmp_path / "list.csv").write_text("email,name\r\n" + rows, encoding="utf-8")
    subscribers.import_file(engine, tmp_path / "list.csv", "news", now=time.time())
    spec = campaigns.NewCampaign(name="c", lists=("news",), subject="Hi {{ name }}", html=HTML,
                                 html_name="n.html")
    campaigns.create(engine, spec, time.time())
    campaigns.start(engine, "c", campaigns.Launch(SENDER, (), SECRET), now=time.time(), no_dkim=True)
    return "c"


def make_sender(engine: sa.Engine, accounts: list[AccountConfig], clock: FakeClock | None = None,
                **kwargs: Any) -> sender.Sender:
    settings = sender.Settings(tuple(accounts), DeliveryConfig(), SENDER, SECRET, (),
                               ZoneInfo("UTC"))

    def open_session(acc: AccountConfig) -> smtp.Session:
        return smtp.open_session(acc, f"secret-{acc.name}")

    clock = clock or FakeClock(time.time())
    return sender.Sender(engine, settings, open_session, clock=clock, sleep=clock.sleep, **kwargs)


def assigned_order(engine: sa.Engine) -> list[str]:
    """Accounts in the order deliveries were claimed (deliveries are claimed by id)."""
    with engine.connect() as connection:
        return list(connection.execute(
            sa.select(models.deliveries.c.account).order_by(models.deliveries.c.id)).scalars())


def delivered(journals: dict[str, Any]) -> Counter[str]:
    """Recipient → how many times any server accepted a message for it."""
    counts: Counter[str] = Counter()
    for server in journals.values():
        for transaction in server.delivered():
            counts.update(transaction.rcpt_to)
    return counts


def test_three_equal_accounts_take_turns_exactly(engine: sa.Engine, tmp_path: Path,
                                                  smtp_server: Any) -> None:
    names = ["a1", "a2", "a3"]
    boxes = servers(smtp_server, names)
    prepare(engine, tmp_path, 30)
    report = make_sender(engine, [account(boxes[n], n) for n in names]).run(once=True)
    assert report.sent == 30 and report.stopped_because == "queue empty"
    assert assigned_order(engine) == names * 10
    assert {name: len(box.delivered()) for name, box in boxes.items()} == dict.fromkeys(names, 10)
    assert all(count == 1 for count in delivered(boxes).values()) and len(delivered(boxes)) == 30


def test_weights_1_1_1_2_are_smooth_and_shares_match(engine: sa.Engine, tmp_path: Path,
                                                    smtp_server: Any) -> None:
    names = ["w1", "w2", "w3", "w4"]
    boxes = servers(smtp_server, names)
    prepare(engine, tmp_path, 1000)
    accounts = [account(boxes[n], n, weight=2 if n == "w4" else 1) for n in names]
    report = make_sender(engine, accounts).run(once=True)
    assert report.sent == 1000
    order = assigned_order(engine)
    for i in range(len(order) - 4):
        assert sorted(order[i:i + 5]) == ["w1", "w2", "w3", "w4", "w4"], i
    assert all(a != b for a, b in zip(order, order[1:]))
    shares = {name: len(box.delivered()) / 1000 for name, box in boxes.items()}
    for name, share in shares.items():
        assert abs(share - (0.4 if name == "w4" else 0.2)) <= 0.05 * (0.4 if name == "w4" else 0.2)


def test_limits_bind_and_free_with_the_window(engine: sa.Engine, tmp_path: Path,
                                             smtp_server: Any) -> None:
    boxes = servers(smtp_server, ["l5", "l10", "l3"])
    prepare(engine, tmp_path, 100)
    accounts = [account(boxes["l5"], "l5", limits=("5/10s",)),
                account(boxes["l10"], "l10", limits=("10/10s",)),
                account(boxes["l3"], "l3", limits=("3/10s",))]
    clock = FakeClock(time.time())
    first = make_sender(engine, accounts, clock).run(once=True)
    assert (first.sent, first.stopped_because) == (18, "all accounts unavailable")
    assert dict(first.by_account) == {"l5": 5, "l10": 10, "l3": 3}
    again = make_sender(engine, accounts, clock).run(once=True)
    assert (again.sent, again.stopped_because) == (0, "all accounts unavailable")
    clock.sleep(10.0)
    third = make_sender(engine, accounts, clock).run(once=True)
    assert third.sent == 18
    total = sum(len(box.delivered()) for box in boxes.values())
    assert total == 36 and len(delivered(boxes)) == 36


def test_unknown_recipient_fails_and_is_suppressed_others_go_on(engine: sa.Engine, tmp_path: Path,
                                                               smtp_server: Any) -> None:
    box = smtp_server(mode="starttls", users={"h1": "secret-h1"}, rules=[
        {"stage": "rcpt", "address": "user00001@example.org", "reply": "550 5.1.1 user unknown"}])
    prepare(engine, tmp_path, 3)
    report = make_sender(engine, [account(box, "h1")]).run(once=True)
    assert (report.sent, report.failed) == (2, 1)
    with engine.connect() as connection:
        states = dict(connection.execute(sa.select(models.deliveries.c.email_key,
                                                   models.deliveries.c.state)).all())
        reasons = dict(connection.execute(sa.select(models.suppressions.c.email_key,
                                                    models.suppressions.c.reason)).all())
    assert states["user00001@example.org"] == "failed"
    assert reasons == {"user00001@example.org": "hard_bounce"}
    assert campaigns.show(engine, "c")["status"] == "finished"


def test_an_account_that_refuses_login_is_disabled_and_mail_rerouted(
        engine: sa.Engine, tmp_path: Path, smtp_server: Any) -> None:
    good = smtp_server(mode="starttls", users={"ok": "secret-ok"})
    bad = smtp_server(mode="starttls", users={"bad": "another-password"})
    prepare(engine, tmp_path, 6)
    report = make_sender(engine, [account(bad, "bad"), account(good, "ok")]).run(once=True)
    assert report.sent == 6 and len(good.delivered()) == 6 and bad.delivered() == []
    with engine.connect() as connection:
        state = connection.execute(sa.select(models.account_state.c.state).where(
            models.account_state.c.name == "bad")).scalar_one()
        attempts = connection.execute(sa.select(sa.func.count()).select_from(
            models.delivery_attempts).where(models.delivery_attempts.c.account == "bad")).scalar_one()
    assert state == "disabled" and attempts == 0  # reservations given back


def test_send_once_cli_reports_json(bulksend: Bulksend, workspace: Path, store_url: str,
                                    smtp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    box = smtp_server(mode="starttls", users={"cli": "secret-cli"})
    monkeypatch.setenv("BULKSEND_SECRET", SECRET.decode())
    monkeypatch.setenv("PW_CLI", "secret-cli")
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        'unsubscribe_url = "https://example.com/u"\n'
        f'[[accounts]]\nname = "cli"\nhost = "{box.host}"\nport = {box.port}\n'
        f'security = "starttls"\nca_file = "{box.ca_file}"\nusername = "cli"\n'
        'password_env = "PW_CLI"\nlimits = ["2/hour"]\n', encoding="utf-8")
    (workspace / "l.csv").write_text("email\r\na@example.org\r\nb@example.org\r\nc@example.org\r\n")
    (workspace / "n.html").write_text(HTML)
    assert bulksend("import", workspace / "l.csv", "--list", "l").code == 0
    assert bulksend("campaign", "create", "c", "--list", "l", "--subject", "s",
                    "--html", workspace / "n.html").code == 0
    assert bulksend("campaign", "start", "c", "--no-dkim").code == 0
    result = bulksend("send", "--once", "--json")
    assert result.code == 0, result.stderr
    assert result.json() == {"sent": 2, "failed": 0, "deferred": 0, "unknown": 0, "suppressed": 0,
                             "by_account": {"cli": 2}, "stopped_because": "all accounts unavailable"}
    listing = bulksend("accounts", "--json").json()["accounts"]
    assert listing[0]["name"] == "cli" and listing[0]["limits"][0]["used"] == 2
    assert listing[0]["limits"][0]["free_at"] is not None and listing[0]["sent"] == 2
    assert len(box.delivered()) == 2
