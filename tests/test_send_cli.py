"""The operator's commands around sending: accounts check/enable, campaign test/retry, plan."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import models
from tests.support.cli import Bulksend

SECRET = "cli-test-secret-0123456789"
HTML = '<p>Hi {{ name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>'


def configure(workspace: Path, store_url: str, boxes: dict[str, Any],
              limits: dict[str, str] | None = None) -> None:
    """A config with [sender] and one STARTTLS account per test server."""
    blocks = "".join(
        f'[[accounts]]\nname = "{name}"\nhost = "{box.host}"\nport = {box.port}\n'
        f'security = "starttls"\nca_file = "{box.ca_file}"\nusername = "{name}"\n'
        f'password_env = "PW_{name.upper()}"\n'
        + (f'limits = ["{limits[name]}"]\n' if limits and name in limits else "")
        for name, box in boxes.items())
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        'unsubscribe_url = "https://example.com/u"\n' + blocks, encoding="utf-8")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret and the accounts' passwords, as cron would have them."""
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    for name in ("A1", "A2", "BAD"):
        monkeypatch.setenv(f"PW_{name}", f"pw-{name.lower()}")


def campaign(bulksend: Bulksend, workspace: Path, recipients: int, start: bool = True) -> None:
    rows = "".join(f"u{i}@example.org\r\n" for i in range(recipients))
    (workspace / "l.csv").write_text("email\r\n" + rows, encoding="utf-8")
    (workspace / "n.html").write_text(HTML, encoding="utf-8")
    assert bulksend("import", workspace / "l.csv", "--list", "l").code == 0
    assert bulksend("campaign", "create", "c", "--list", "l", "--subject", "Hi",
                    "--html", workspace / "n.html").code == 0
    if start:
        assert bulksend("campaign", "start", "c", "--no-dkim").code == 0


def test_accounts_check_logs_in_and_sends_nothing(bulksend: Bulksend, workspace: Path,
                                                  store_url: str, smtp_server: Any,
                                                  env: None) -> None:
    good = smtp_server(mode="starttls", users={"a1": "pw-a1"})
    bad = smtp_server(mode="starttls", users={"bad": "something-else"})
    configure(workspace, store_url, {"a1": good, "bad": bad})
    result = bulksend("accounts", "check", "--json")
    assert result.code == 1  # one account failed
    rows = {row["name"]: row for row in result.json()["accounts"]}
    assert rows["a1"]["ok"] and rows["a1"]["tls"] and "PLAIN" in rows["a1"]["capabilities"]["auth"]
    assert not rows["bad"]["ok"] and "535" in rows["bad"]["error"]
    assert "pw-bad" not in result.stdout + result.stderr
    assert good.journal == [] and bad.journal == []
    assert bulksend("accounts", "check", "a1").code == 0


def test_campaign_test_sends_one_copy_and_records_nothing(bulksend: Bulksend, workspace: Path,
                                                         store_url: str, smtp_server: Any,
                                                         env: None, engine: sa.Engine) -> None:
    box = smtp_server(mode="starttls", users={"a1": "pw-a1"})
    configure(workspace, store_url, {"a1": box})
    campaign(bulksend, workspace, 3, start=False)
    result = bulksend("campaign", "test", "c", "--to", "me@example.net")
    assert result.code == 0, result.stderr
    assert [list(t.rcpt_to) for t in box.delivered()] == [["me@example.net"]]
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(
            models.deliveries)).scalar_one() == 0


def test_retry_unknown_requeues_and_reopens_the_campaign(bulksend: Bulksend, workspace: Path,
                                                        store_url: str, smtp_server: Any,
                                                        env: None, engine: sa.Engine) -> None:
    box = smtp_server(mode="starttls", users={"a1": "pw-a1"})
    configure(workspace, store_url, {"a1": box})
    campaign(bulksend, workspace, 3)
    assert bulksend("send", "--once").code == 0
    with engine.begin() as connection:  # as if the server had gone silent after one dot
        connection.execute(sa.update(models.deliveries).where(
            models.deliveries.c.email_key == "u1@example.org").values(state="unknown"))
    assert bulksend("campaign", "retry", "c").code == 1  # say what to retry
    result = bulksend("campaign", "retry", "c", "--unknown")
    assert result.code == 0 and "1 deliveries queued again" in result.stdout
    shown = bulksend("campaign", "show", "c", "--json").json()
    assert (shown["status"], shown["queued"], shown["sent"]) == ("running", 1, 2)
    message_ids = [t.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for t in box.delivered()
                   if list(t.rcpt_to) == ["u1@example.org"]]
    assert bulksend("send", "--once").code == 0
    again = [t.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] for t in box.delivered()
             if list(t.rcpt_to) == ["u1@example.org"]]
    assert len(again) == 2 and again[0] == again[1] == message_ids[0]  # same Message-ID
    assert bulksend("campaign", "show", "c", "--json").json()["status"] == "finished"


def test_plan_counts_what_the_limits_allow(bulksend: Bulksend, workspace: Path, store_url: str,
                                          smtp_server: Any, env: None) -> None:
    boxes = {"a1": smtp_server(mode="starttls", users={"a1": "pw-a1"}),
             "a2": smtp_server(mode="starttls", users={"a2": "pw-a2"})}
    configure(workspace, store_url, boxes, limits={"a1": "10/hour", "a2": "5/hour"})
    campaign(bulksend, workspace, 100)
    before = time.time()
    data = bulksend("plan", "c", "--json").json()
    assert data["remaining"] == 100
    # 15 an hour together: 100 messages need 7 windows after the first, i.e. 6-7 hours.
    assert before + 6 * 3600 <= data["finishes_at"] <= time.time() + 7 * 3600
    assert set(data["by_account"]) == {"a1", "a2"}
    assert bulksend("send", "--once").code == 0
    assert bulksend("plan", "c", "--json").json()["remaining"] == 85


def test_enable_puts_a_disabled_account_back(bulksend: Bulksend, workspace: Path, store_url: str,
                                             smtp_server: Any, env: None) -> None:
    bad = smtp_server(mode="starttls", users={"bad": "something-else"})
    configure(workspace, store_url, {"bad": bad})
    campaign(bulksend, workspace, 1)
    sent = bulksend("send", "--once", "--json").json()
    assert sent["sent"] == 0 and sent["stopped_because"] == "all accounts unavailable"
    listing = bulksend("accounts", "--json").json()["accounts"][0]
    assert listing["state"] == "disabled" and "535" in (listing["reason"] or "")
    assert bulksend("accounts", "enable", "bad").code == 0
    assert bulksend("accounts", "--json").json()["accounts"][0]["state"] == "active"
    assert bulksend("accounts", "enable", "bad").code == 1  # already active
    assert bulksend("accounts", "enable", "nope").code == 1
