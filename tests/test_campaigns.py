"""Campaign lifecycle through the CLI: create, launch gates, queueing, transitions, preview."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import dkim as dkimpy
import pytest
import sqlalchemy as sa

from bulksend import dkim, models, tokens
from bulksend.config import DkimKey
from tests.support.cli import Bulksend, row_counts

SECRET = "a-test-secret-of-enough-length-0123456789"
HTML = ('<p>Hello {{ name or "friend" }} from {{ city }}</p>'
        '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>')
TEXT = "Hello {{ name }}\nUnsubscribe: {{ unsubscribe_url }}\n"


def write_config(workspace: Path, store_url: str, *, dkim_domain: str | None = "example.com",
                 timezone: str = "UTC") -> Path | None:
    """A full bulksend.toml: [sender], optionally a DKIM key for `dkim_domain`."""
    key_block, key_path = "", None
    if dkim_domain is not None:
        key_path = workspace / "dkim" / f"{dkim_domain}.s1.pem"
        if not key_path.exists():
            dkim.keygen(dkim_domain, "s1", workspace / "dkim", ed25519=True)
        key_block = (f'[[dkim]]\ndomain = "{dkim_domain}"\nselector = "s1"\n'
                     f'private_key_file = "{key_path}"\n')
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\ntimezone = "{timezone}"\n'
        '[sender]\nfrom = "Example News <news@example.com>"\nlist_id = "news.example.com"\n'
        'return_path = "bounces@example.com"\nunsubscribe_url = "https://example.com/u"\n'
        'unsubscribe_mailto = "unsubscribe@example.com"\n' + key_block,
        encoding="utf-8",
    )
    return key_path


@pytest.fixture
def ready(bulksend: Bulksend, workspace: Path, store_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Bulksend:
    """A workspace with [sender], a DKIM key for example.com, the secret, two lists and templates."""
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    write_config(workspace, store_url)
    (workspace / "news.csv").write_text(
        "email,name,city\r\nann@example.org,Ann,Riga\r\nbob@example.org,Bob,Kazan\r\n"
        "cid@example.net,Cid,Paris\r\n", encoding="utf-8")
    (workspace / "extra.csv").write_text(
        "email,name\r\nBOB@example.org,Bob\r\ndan@example.net,Dan\r\n", encoding="utf-8")
    (workspace / "n.html").write_text(HTML, encoding="utf-8")
    (workspace / "n.txt").write_text(TEXT, encoding="utf-8")
    assert bulksend("import", workspace / "news.csv", "--list", "news").code == 0
    assert bulksend("import", workspace / "extra.csv", "--list", "extra").code == 0
    return bulksend


def create(bulksend: Bulksend, workspace: Path, name: str = "c1", *extra: str,
           html: str = "n.html") -> int:
    return bulksend("campaign", "create", name, "--list", "news", "--list", "extra",
                    "--subject", "Hi {{ name }}", "--html", workspace / html,
                    "--text", workspace / "n.txt", *extra).code


def show(bulksend: Bulksend, name: str = "c1") -> dict:
    result = bulksend("campaign", "show", name, "--json")
    assert result.code == 0, result.stderr
    return result.json()


def test_start_queues_each_address_once_across_lists_minus_suppressed(ready: Bulksend,
                                                                     workspace: Path) -> None:
    assert ready("suppress", "add", "cid@example.net").code == 0
    assert create(ready, workspace) == 0
    started = ready("campaign", "start", "c1", "--json")
    assert started.code == 0, started.stderr
    assert started.json()["queued"] == 3 and started.json()["suppressed"] == 1
    data = show(ready)
    assert (data["status"], data["total"], data["queued"], data["suppressed"]) == ("running", 4, 3, 1)
    assert data["sent"] == data["failed"] == data["unknown"] == 0 and data["by_account"] == {}
    assert data["no_dkim"] is False


def test_starting_twice_is_refused(ready: Bulksend, workspace: Path) -> None:
    create(ready, workspace)
    assert ready("campaign", "start", "c1").code == 0
    again = ready("campaign", "start", "c1")
    assert again.code == 1 and "is running: only a draft can be started" in again.stderr
    assert show(ready)["total"] == 4


def test_unknown_variable_is_refused_at_create_with_file_and_line(ready: Bulksend,
                                                                  workspace: Path) -> None:
    (workspace / "bad.html").write_text("<p>x</p>\n<p>{{ frist_name }}</p>\n", encoding="utf-8")
    result = ready("campaign", "create", "c1", "--list", "news", "--subject", "s",
                   "--html", workspace / "bad.html")
    assert result.code == 1
    assert "bad.html:2" in result.stderr and "frist_name" in result.stderr
    assert ready("campaign", "list", "--json").json() == {"campaigns": []}


def test_hostile_template_is_refused_at_create(ready: Bulksend, workspace: Path) -> None:
    (workspace / "evil.html").write_text("{{ ''.__class__.__mro__ }} {{ unsubscribe_url }}",
                                         encoding="utf-8")
    result = ready("campaign", "create", "c1", "--list", "news", "--subject", "s",
                   "--html", workspace / "evil.html")
    assert result.code == 1 and "evil.html" in result.stderr


def test_duplicate_name_and_unknown_list_are_refused(ready: Bulksend, workspace: Path) -> None:
    assert create(ready, workspace) == 0
    again = ready("campaign", "create", "c1", "--list", "news", "--subject", "s",
                  "--html", workspace / "n.html")
    assert again.code == 1 and "already exists" in again.stderr
    missing = ready("campaign", "create", "c2", "--list", "nope", "--subject", "s",
                    "--html", workspace / "n.html")
    assert missing.code == 1 and "list 'nope' does not exist" in missing.stderr


@pytest.mark.parametrize(("html", "text", "part"), [
    ("<p>{{ name }}</p>", None, "html"),
    ("<p>{{ name }}</p>", "{{ unsubscribe_url }}", "html"),
    (HTML, "Hello {{ name }}", "text"),
])
def test_launch_gate_no_unsubscribe_link(ready: Bulksend, workspace: Path, engine: sa.Engine,
                                         html: str, text: str | None, part: str) -> None:
    (workspace / "g.html").write_text(html, encoding="utf-8")
    args = ["--text", workspace / "g.txt"] if text is not None else []
    if text is not None:
        (workspace / "g.txt").write_text(text, encoding="utf-8")
    assert ready("campaign", "create", "g", "--list", "news", "--subject", "s",
                 "--html", workspace / "g.html", *args).code == 0
    result = ready("campaign", "start", "g")
    assert result.code == 1
    assert f"no {{{{ unsubscribe_url }}}} in the {part}" in result.stderr
    assert row_counts(engine)["deliveries"] == 0 and show(ready, "g")["status"] == "draft"


def test_launch_gate_unknown_variable_is_rechecked_at_start(ready: Bulksend, workspace: Path,
                                                           engine: sa.Engine) -> None:
    assert create(ready, workspace) == 0
    with engine.begin() as connection:  # as if an older bulksend had stored it
        connection.execute(sa.update(models.campaigns).values(
            html_template="{{ unsubscribe_url }} {{ nickname }}"))
    result = ready("campaign", "start", "c1")
    assert result.code == 1 and "nickname" in result.stderr
    assert row_counts(engine)["deliveries"] == 0


def test_launch_gate_no_dkim_key_and_the_override(ready: Bulksend, workspace: Path,
                                                  store_url: str, engine: sa.Engine) -> None:
    write_config(workspace, store_url, dkim_domain=None)
    assert create(ready, workspace) == 0
    refused = ready("campaign", "start", "c1")
    assert refused.code == 1
    assert "no DKIM key for the From domain example.com" in refused.stderr
    assert "--no-dkim" in refused.stderr and row_counts(engine)["deliveries"] == 0
    started = ready("campaign", "start", "c1", "--no-dkim")
    assert started.code == 0 and "NOT DKIM-signed" in started.stdout
    assert show(ready)["no_dkim"] is True


def test_launch_gate_dkim_domain_not_aligned(ready: Bulksend, workspace: Path, store_url: str,
                                            engine: sa.Engine) -> None:
    write_config(workspace, store_url, dkim_domain="other.example.net")
    assert create(ready, workspace) == 0
    refused = ready("campaign", "start", "c1")
    assert refused.code == 1
    assert "d=other.example.net is not aligned with the From domain example.com" in refused.stderr
    assert row_counts(engine)["deliveries"] == 0


def test_dkim_key_of_a_parent_domain_is_aligned(ready: Bulksend, workspace: Path) -> None:
    assert create(ready, workspace, "c1", "--from", "News <news@mail.example.com>") == 0
    started = ready("campaign", "start", "c1")
    assert started.code == 0 and "signed d=example.com" in started.stdout


def test_launch_gate_empty_audience(ready: Bulksend, workspace: Path, engine: sa.Engine) -> None:
    assert ready("suppress", "add", "@example.org", "@example.net").code == 0
    assert create(ready, workspace) == 0
    result = ready("campaign", "start", "c1")
    assert result.code == 1 and "has no one to send to" in result.stderr and "4 suppressed" in result.stderr
    assert row_counts(engine)["deliveries"] == 0 and show(ready)["status"] == "draft"


def test_launch_gate_missing_secret(ready: Bulksend, workspace: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BULKSEND_SECRET")
    assert create(ready, workspace) == 0
    result = ready("campaign", "start", "c1")
    assert result.code == 1 and "BULKSEND_SECRET is not set" in result.stderr


def test_start_at_a_future_local_time_schedules_it(ready: Bulksend, workspace: Path,
                                                  store_url: str) -> None:
    write_config(workspace, store_url, timezone="Europe/Moscow")
    assert create(ready, workspace) == 0
    result = ready("campaign", "start", "c1", "--at", "2099-07-01T09:00", "--json")
    assert result.code == 0, result.stderr
    # 09:00 in Moscow (UTC+3) is 06:00 UTC.
    assert result.json()["send_at"] == 4086568800.0
    assert show(ready)["status"] == "scheduled"


def test_pause_resume_cancel_and_illegal_transitions(ready: Bulksend, workspace: Path,
                                                     engine: sa.Engine) -> None:
    create(ready, workspace)
    assert ready("campaign", "pause", "c1").code == 1  # a draft is not sending
    assert ready("campaign", "start", "c1").code == 0
    assert ready("campaign", "pause", "c1").code == 0
    assert (show(ready)["status"], show(ready)["pause_reason"]) == ("paused", "paused by user")
    assert ready("campaign", "resume", "c1").code == 0
    assert show(ready)["status"] == "running" and show(ready)["pause_reason"] is None
    assert ready("campaign", "cancel", "c1").code == 0
    data = show(ready)
    assert (data["status"], data["cancelled"], data["queued"]) == ("cancelled", 4, 0)
    resumed = ready("campaign", "resume", "c1")
    assert resumed.code == 1 and "is cancelled: it cannot be resumed" in resumed.stderr


def test_a_finished_campaign_cannot_be_resumed(ready: Bulksend, workspace: Path,
                                              engine: sa.Engine) -> None:
    create(ready, workspace)
    with engine.begin() as connection:
        connection.execute(sa.update(models.campaigns).values(status="finished"))
    result = ready("campaign", "resume", "c1")
    assert result.code == 1 and "is finished" in result.stderr


def test_preview_is_the_signed_message_of_that_subscriber(ready: Bulksend, workspace: Path,
                                                        engine: sa.Engine) -> None:
    create(ready, workspace)
    assert ready("campaign", "start", "c1").code == 0
    result = ready("campaign", "preview", "c1", "--email", "BOB@example.org",
                   "--output", workspace / "bob.eml")
    assert result.code == 0, result.stderr
    raw = (workspace / "bob.eml").read_bytes()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["To"].addresses[0].addr_spec == "bob@example.org"
    assert message["Subject"] == "Hi Bob"
    with engine.connect() as connection:
        delivery_id = connection.execute(sa.select(models.deliveries.c.id).where(
            models.deliveries.c.email_key == "bob@example.org")).scalar_one()
    token = message["Message-ID"].strip("<>").partition("@")[0]
    assert tokens.read_token(SECRET.encode(), tokens.MESSAGE_ID, token) == delivery_id
    assert "RCPT TO:<bob@example.org>" in result.stderr
    signer = dkim.load_signer(DkimKey("example.com", "s1", workspace / "dkim" / "example.com.s1.pem",
                                      "ed25519"))
    record = dkim.public_txt(signer).encode()
    assert dkimpy.verify(raw, dnsfunc=lambda name, timeout=5: record)


def test_dkim_keygen_prints_the_record_and_the_config_block(bulksend: Bulksend,
                                                           workspace: Path) -> None:
    result = bulksend("dkim", "keygen", "example.com", "s2026", "--dir", workspace / "keys")
    assert result.code == 0, result.stderr
    assert "s2026._domainkey.example.com. IN TXT" in result.stdout
    assert '[[dkim]]' in result.stdout and (workspace / "keys" / "example.com.s2026.pem").exists()
    again = bulksend("dkim", "keygen", "example.com", "s2026", "--dir", workspace / "keys")
    assert again.code == 1 and "example.com.s2026.pem" in again.stderr
