"""One campaign's outgoing messages: templates, tokens and DKIM put together per delivery.

`MessageFactory` is built once per campaign (templates compiled, MIME skeleton prepared,
signing key loaded) and then turns a delivery into the envelope and the exact bytes to
send. `campaign preview` and the sender use the same factory, so a preview is the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parseaddr

from bulksend import dkim, headers, render, tokens
from bulksend.config import SenderConfig
from bulksend.errors import ConfigError
from bulksend.store_campaigns import CampaignRow

BASE_VARIABLES = frozenset({"email", "name", "unsubscribe_url", "campaign"})


@dataclass(frozen=True)
class Outgoing:
    """A message ready for SMTP: envelope sender, the one envelope recipient, the bytes."""

    delivery_id: int
    envelope_from: str
    recipient: str
    data: bytes


def ascii_domain(address: str) -> str:
    """The domain of an address as a lower-case IDNA A-label (the same as in the To header)."""
    return headers.ascii_domain(address.rpartition("@")[2].strip())


def envelope_address(address: str) -> str:
    """An address with its domain as an A-label, as RCPT TO needs it."""
    local, _, _ = address.rpartition("@")
    return f"{local}@{ascii_domain(address)}"


def from_header(campaign: CampaignRow, sender: SenderConfig) -> str:
    """The From of a campaign: its own `--from`, else `[sender] from`."""
    return campaign.from_address or sender.from_address


def from_domain(campaign: CampaignRow, sender: SenderConfig) -> str:
    """The A-label domain of the campaign's From address (what DKIM d= must align with)."""
    return ascii_domain(parseaddr(from_header(campaign, sender))[1])


def campaign_variables(campaign: CampaignRow) -> frozenset[str]:
    """The template variables a campaign may use: the basics and its lists' attributes."""
    return BASE_VARIABLES | frozenset(campaign.settings.get("attributes", ()))


class MessageFactory:
    """Builds every message of one campaign; construct once, call `build` per delivery."""

    def __init__(self, campaign: CampaignRow, sender: SenderConfig, secret: bytes,
                 signer: dkim.Signer | None, *, eight_bit: bool = False) -> None:
        if len(secret) < tokens.MIN_SECRET_BYTES:
            raise ConfigError(f"[sender] secret_env {sender.secret_env}: the secret must be at "
                              f"least {tokens.MIN_SECRET_BYTES} bytes")
        self._campaign = campaign
        self._sender = sender
        self._secret = secret
        self._signer = signer
        self._attributes = tuple(campaign.settings.get("attributes", ()))
        self._domain = from_domain(campaign, sender)
        templates = render.compile_templates(
            campaign.subject, campaign.html_template, campaign.text_template,
            html_name=campaign.settings.get("html_name", "html"),
            text_name=campaign.settings.get("text_name", "text"),
            known=campaign_variables(campaign),
        )
        self._renderer = render.Renderer(templates, render.MessageSettings(
            from_header=from_header(campaign, sender),
            reply_to=sender.reply_to,
            list_id=sender.list_id,
            feedback_id=f"{campaign.id}:{sender.list_id}:bulksend",
            eight_bit=eight_bit,
            campaign=campaign.name,
        ))

    def build(self, delivery_id: int, email: str, name: str, attributes: Mapping[str, str],
              now: float) -> Outgoing:
        """The message for one delivery, signed when the campaign has a DKIM key."""
        token = lambda purpose: tokens.make_token(self._secret, purpose, delivery_id)  # noqa: E731
        unsubscribe = token(tokens.UNSUBSCRIBE)
        bounce = token(tokens.BOUNCE)
        mailto = self._sender.unsubscribe_mailto
        recipient = render.Recipient(
            email=email,
            name=name,
            # Every attribute the campaign knows, so a subscriber without one renders "".
            attributes={key: str(attributes.get(key, "")) for key in self._attributes},
            message_id=f"<{token(tokens.MESSAGE_ID)}@{self._domain}>",
            unsubscribe_url=f"{self._sender.unsubscribe_url}/{unsubscribe}",
            unsubscribe_mailto=tokens.verp_address(mailto, unsubscribe) if mailto else None,
            delivery_token=bounce,
            date=now,
        )
        data = self._renderer.render(recipient)
        if self._signer is not None:
            data = dkim.sign(data, self._signer, timestamp=int(now))
        return Outgoing(delivery_id, tokens.verp_address(self._sender.return_path, bounce),
                        envelope_address(email), data)
