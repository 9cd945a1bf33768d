"""The whole loop: send a campaign, the remote side bounces some of it, `bounces fetch` ties
every bounce to the delivery it answers.

`bulksend send --once` delivers to the test SMTP server. For the recipients the test picks,
a DSN is written the way the receiving MTA would: addressed to the VERP envelope sender the
server journal recorded, quoting the headers of the message it received, and put into the
Dovecot mailbox. The journal is the ground truth for which delivery each DSN answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import models, tokens
from tests.support import bounce_mail
from tests.support.cli import Bulksend
from tests.support.dovecot import QUARANTINE_FOLDER, Mailbox

SECRET = "bounce-loop-test-secret-0123456789"
HTML = '<p>Hi {{ name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>'
RECIPIENTS = [f"u{i}@example.org" for i in range(8)]
# What the remote side answers for some recipients: status, and whether the DSN quotes the
# original's headers (with its X-Bulksend-Delivery) or only the VERP address ties it.
ANSWERS = {
    "u1@example.org": ("5.1.1", True),
    "u3@example.org": ("4.2.2", False),
    "u4@example.org": ("5.7.1", True),
    "u6@example.org": ("5.1.10", False),
}


def configure(workspace: Path, store_url: str, smtp: Any, box: Mailbox) -> None:
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n'
        '[sender]\nfrom = "News <news@example.com>"\nlist_id = "news.example.com"\n'
        'return_path = "bounces@example.com"\nunsubscribe_url = "https://example.com/u"\n'
        f'[[accounts]]\nname = "a1"\nhost = "{smtp.host}"\nport = {smtp.port}\n'
        f'security = "starttls"\nca_file = "{smtp.ca_file}"\nusername = "a1"\npassword_env = "PW_A1"\n'
        f'[bounces]\nprotocol = "imap"\nhost = "{box.host}"\nport = {box.port("imap", "tls")}\n'
        f'security = "tls"\nca_file = "{box.ca_file}"\nusername = "{box.user}"\n'
        f'password_env = "BOUNCES_PASSWORD"\nquarantine_folder = "{QUARANTINE_FOLDER}"\n',
        encoding="utf-8")


def test_every_dsn_is_tied_to_the_delivery_it_answers(
        bulksend: Bulksend, workspace: Path, store_url: str, engine: sa.Engine, smtp_server: Any,
        mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    monkeypatch.setenv("PW_A1", "pw-a1")
    monkeypatch.setenv("BOUNCES_PASSWORD", mailbox.password)
    smtp = smtp_server(mode="starttls", users={"a1": "pw-a1"})
    configure(workspace, store_url, smtp, mailbox)
    (workspace / "l.csv").write_text("email\r\n" + "\r\n".join(RECIPIENTS) + "\r\n", encoding="utf-8")
    (workspace / "n.html").write_text(HTML, encoding="utf-8")
    assert bulksend("import", workspace / "l.csv", "--list", "l").code == 0
    assert bulksend("campaign", "create", "c", "--list", "l", "--subject", "Hi",
                    "--html", workspace / "n.html").code == 0
    assert bulksend("campaign", "start", "c", "--no-dkim").code == 0
    sent = bulksend("send", "--once", "--json")
    assert sent.code == 0 and sent.json()["sent"] == len(RECIPIENTS), sent.stderr

    # The remote MTA: a DSN to the envelope sender of each message it decides to bounce.
    answered: dict[str, int] = {}  # recipient → delivery id, read from the journal
    for transaction in smtp.delivered():
        (recipient,) = transaction.rcpt_to
        if recipient not in ANSWERS:
            continue
        status, quote_original = ANSWERS[recipient]
        token = tokens.verp_token(transaction.mail_from, "bounces")
        assert token is not None, transaction.mail_from
        delivery_id = tokens.read_token(SECRET.encode(), tokens.BOUNCE, token)
        assert delivery_id is not None
        answered[recipient] = delivery_id
        headers = transaction.data.split(b"\r\n\r\n", 1)[0].decode("ascii") + "\r\n"  # type: ignore[union-attr]
        mailbox.deliver(bounce_mail.dsn(
            to=transaction.mail_from, recipient=recipient, status=status,
            original=headers if quote_original else bounce_mail.original_headers(recipient, None)))
    assert sorted(answered) == sorted(ANSWERS)

    fetched = bulksend("bounces", "fetch", "--json")
    assert fetched.code == 0, fetched.stderr
    assert fetched.json() == {"messages": 4, "hard": 2, "soft": 1, "complaints": 0,
                              "unsubscribes": 0, "ignored": 0, "quarantined": 0, "suppressed": 2}
    assert mailbox.messages() == []

    table = models.bounce_events
    with engine.connect() as connection:
        recorded = {email_key: (kind, delivery_id, status) for email_key, kind, delivery_id, status
                    in connection.execute(sa.select(table.c.email_key, table.c.kind,
                                                    table.c.delivery_id, table.c.status))}
        delivered_to = {delivery_id: (email_key, state) for delivery_id, email_key, state
                        in connection.execute(sa.select(models.deliveries.c.id,
                                                        models.deliveries.c.email_key,
                                                        models.deliveries.c.state))}
    kinds = {"5.1.1": "hard", "4.2.2": "soft", "5.7.1": "block", "5.1.10": "hard"}
    assert recorded == {recipient: (kinds[ANSWERS[recipient][0]], answered[recipient],
                                    ANSWERS[recipient][0]) for recipient in ANSWERS}
    for recipient, delivery_id in answered.items():
        assert delivered_to[delivery_id] == (recipient, "sent")
    shown = bulksend("campaign", "show", "c", "--json").json()
    assert shown["bounced"] == 2
