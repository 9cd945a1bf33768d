"""One delivery's message: envelope, tokens and signature put together (no store needed)."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

import dkim as dkimpy
import pytest

from bulksend import dkim, messages, tokens
from bulksend.config import DkimKey, SenderConfig
from bulksend.errors import ConfigError
from bulksend.store_campaigns import CampaignRow

SECRET = b"0123456789abcdef-secret"
SENDER = SenderConfig(from_address="News <news@example.com>", list_id="news.example.com",
                      return_path="bounces@example.com", unsubscribe_url="https://example.com/u",
                      unsubscribe_mailto="unsubscribe@example.com")


def campaign(**changes: object) -> CampaignRow:
    values = dict(
        id=7, name="nov", subject="Hi {{ name }}",
        html_template='<p>{{ name }} in {{ city }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>',
        text_template=None, from_address=None, status="running", send_at=None, pause_reason=None,
        no_dkim=False, settings={"attributes": ["city"], "html_name": "n.html", "text_name": "text"},
        created_at=0.0, started_at=0.0, finished_at=None, lists=("news",),
    )
    values.update(changes)
    return CampaignRow(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [
    "Eve\r\nBcc: victim@example.org", "Eve\nTo: second@example.org", "Eve\rCc: x@example.org",
    "Eve\x00Bcc: y@example.org", "=?UTF-8?Q?x=0D=0ABcc:_x@example.org?=",
])
def test_hostile_values_give_one_recipient_and_no_extra_header(name: str) -> None:
    factory = messages.MessageFactory(campaign(), SENDER, SECRET, None)
    out = factory.build(42, "eve@пример.рф", name, {"city": "Riga\r\nBcc: z@example.org"}, 1.8e9)
    assert out.recipient == "eve@xn--e1afmkfd.xn--p1ai"  # exactly one envelope recipient
    parsed = email.message_from_bytes(out.data, policy=email.policy.default)
    assert sorted(set(parsed.keys())) == sorted({
        "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "List-Id",
        "List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID", "X-Bulksend-Delivery",
        "Content-Type"})
    assert len(parsed.get_all("To")) == 1
    assert [a.addr_spec for a in parsed["To"].addresses] == ["eve@xn--e1afmkfd.xn--p1ai"]


def test_tokens_tie_every_handle_back_to_the_delivery() -> None:
    out = messages.MessageFactory(campaign(), SENDER, SECRET, None).build(
        42, "ann@example.org", "Ann", {}, 1.8e9)
    parsed = email.message_from_bytes(out.data, policy=email.policy.default)
    verp = tokens.verp_token(out.envelope_from, "bounces")
    assert verp is not None and tokens.read_token(SECRET, tokens.BOUNCE, verp) == 42
    assert tokens.read_token(SECRET, tokens.BOUNCE, parsed["X-Bulksend-Delivery"]) == 42
    message_id = parsed["Message-ID"].strip("<>").partition("@")
    assert message_id[2] == "example.com"
    assert tokens.read_token(SECRET, tokens.MESSAGE_ID, message_id[0]) == 42
    https, mailto = [part.strip(" <>") for part in parsed["List-Unsubscribe"].split(",")]
    assert tokens.read_token(SECRET, tokens.UNSUBSCRIBE, https.rpartition("/")[2]) == 42
    assert mailto.startswith("mailto:unsubscribe+") and mailto.endswith("@example.com")
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_subscriber_without_an_attribute_renders_it_empty() -> None:
    out = messages.MessageFactory(campaign(), SENDER, SECRET, None).build(
        1, "ann@example.org", "Ann", {}, 1.8e9)
    html = email.message_from_bytes(out.data, policy=email.policy.default).get_body(("html",))
    assert "<p>Ann in </p>" in html.get_content()


def test_message_is_dkim_signed_last_and_verifies(tmp_path: Path) -> None:
    path, _ = dkim.keygen("example.com", "s1", tmp_path)
    signer = dkim.load_signer(DkimKey("example.com", "s1", path, "rsa"))
    out = messages.MessageFactory(campaign(), SENDER, SECRET, signer).build(
        5, "ann@example.org", "Ann", {"city": "Oslo"}, time.time())  # dkimpy refuses future t=
    assert out.data.startswith(b"DKIM-Signature:")
    record = dkim.public_txt(signer).encode()
    assert dkimpy.verify(out.data, dnsfunc=lambda name, timeout=5: record)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        messages.MessageFactory(campaign(), SENDER, b"short", None)
