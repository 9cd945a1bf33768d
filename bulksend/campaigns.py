"""Campaign lifecycle: create, start (launch gates, then queueing), pause, resume, cancel, show.

    draft ─start─► running (or scheduled until send_at) ─pause─► paused ─resume─► running
      └───────────── cancel from any state but finished ─────────► cancelled

Templates are compiled and checked at `create` and again at `start`, together with every
launch gate, so a campaign that starts can render every message: no template error ever
shows up halfway through a send.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.engine import Connection, Engine

from bulksend import (
    db, dkim, domains, importer, messages, render, store, store_campaigns, store_domains,
)
from bulksend.config import DkimKey, SenderConfig
from bulksend.errors import AddressError, ConfigError, NotFound, StateError, TemplateError
from bulksend.store_campaigns import CampaignRow

STARTABLE = ("draft",)
PAUSABLE = ("running", "scheduled")
CANCELLABLE = ("draft", "scheduled", "running", "paused")
STATE_FIELDS = ("queued", "claimed", "sending", "sent", "deferred", "failed", "expired",
                "suppressed", "unknown", "cancelled")


@dataclass(frozen=True)
class NewCampaign:
    """What `campaign create` was given."""

    name: str
    lists: tuple[str, ...]
    subject: str
    html: str
    html_name: str
    text: str | None = None
    text_name: str | None = None
    from_address: str | None = None
    send_at: float | None = None


@dataclass(frozen=True)
class Launch:
    """What starting a campaign needs from the configuration and the environment."""

    sender: SenderConfig | None
    dkim_keys: tuple[DkimKey, ...]
    secret: bytes | None


@dataclass(frozen=True)
class Started:
    """The outcome of `campaign start`."""

    status: str
    queued: int
    suppressed: int
    send_at: float | None
    dkim_domain: str | None
    domain_check: domains.Report | None = None  # with --check-domains


def parse_when(text: str, timezone: ZoneInfo) -> float:
    """An ISO 8601 time as epoch seconds; without an offset it is read in `timezone`."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise StateError(f"time {text!r}: expected ISO 8601 like 2026-12-01T09:00 "
                         "or 2026-12-01T09:00+03:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone)
    return moment.timestamp()


def create(engine: Engine, spec: NewCampaign, now: float) -> CampaignRow:
    """Store a new draft campaign after compiling and checking its templates."""
    if not spec.name.strip():
        raise StateError("a campaign needs a name")
    if not spec.lists:
        raise StateError(f"campaign {spec.name!r}: name at least one --list")
    if spec.from_address is not None:
        _check_from(spec.from_address)
    with db.transaction(engine) as connection:
        if store_campaigns.campaign_exists(connection, spec.name):
            raise StateError(f"campaign {spec.name!r} already exists")
        list_ids = [store.list_id(connection, name) for name in dict.fromkeys(spec.lists)]
        attributes = sorted(store_campaigns.attribute_keys(connection, list_ids))
        settings = {"attributes": attributes, "html_name": spec.html_name,
                    "text_name": spec.text_name or "text"}
        _compile(spec.subject, spec.html, spec.text, settings)
        store_campaigns.insert_campaign(connection, {
            "name": spec.name, "subject": spec.subject, "html_template": spec.html,
            "text_template": spec.text, "from_address": spec.from_address,
            "status": "draft", "send_at": spec.send_at, "settings": settings,
            "created_at": now, "updated_at": now,
        }, list_ids)
        return store_campaigns.campaign(connection, spec.name)


def _check_from(value: str) -> None:
    address = parseaddr(value)[1]
    try:
        importer.AddressValidator().key(address)
    except importer.InvalidAddress as exc:
        raise AddressError(f"--from {value!r}: {exc}") from None


def _compile(subject: str, html: str, text: str | None, settings: dict[str, Any]) -> render.Templates:
    known = messages.BASE_VARIABLES | frozenset(settings["attributes"])
    return render.compile_templates(subject, html, text, html_name=settings["html_name"],
                                    text_name=settings["text_name"], known=known)


def signing_key(domain: str, keys: tuple[DkimKey, ...]) -> DkimKey | None:
    """The DKIM key aligned with `domain`: the same domain, else the closest parent."""
    aligned = [key for key in keys if domain == key.domain or domain.endswith("." + key.domain)]
    return max(aligned, key=lambda key: len(key.domain), default=None)


def campaign_signer(campaign: CampaignRow, sender: SenderConfig,
                    keys: tuple[DkimKey, ...]) -> dkim.Signer | None:
    """The signer of a started campaign's messages: its aligned key, unless --no-dkim."""
    if campaign.no_dkim:
        return None
    key = signing_key(messages.from_domain(campaign, sender), keys)
    return dkim.load_signer(key) if key is not None else None


def _dkim_gate(campaign: CampaignRow, sender: SenderConfig, keys: tuple[DkimKey, ...],
               no_dkim: bool) -> DkimKey | None:
    if no_dkim:
        return None
    domain = messages.from_domain(campaign, sender)
    key = signing_key(domain, keys)
    if key is not None:
        return key
    hint = "or start with --no-dkim"
    if keys:
        have = ", ".join(f"d={k.domain}" for k in keys)
        raise StateError(f"campaign {campaign.name!r}: DKIM {have} is not aligned with the From "
                         f"domain {domain}: add a [[dkim]] key for {domain} {hint}")
    raise StateError(f"campaign {campaign.name!r}: no DKIM key for the From domain {domain}: "
                     f"run `bulksend dkim keygen {domain} SELECTOR`, add the [[dkim]] block it "
                     f"prints, {hint}")


def start(engine: Engine, name: str, launch: Launch, *, now: float, at: float | None = None,
          no_dkim: bool = False, check_domains: domains.Check | None = None) -> Started:
    """Check every launch gate, then queue one delivery per recipient.

    With `check_domains`, the audience's domains are looked up first (outside any
    transaction); dead ones are suppressed in the same transaction that queues, so their
    deliveries are `suppressed` and a failed gate leaves no suppression behind.
    """
    if launch.sender is None:
        raise ConfigError("bulksend.toml: [sender] is missing: it says who the mail is from "
                          "and where unsubscribes go")
    if launch.secret is None:
        raise ConfigError(f"[sender] secret_env: environment variable {launch.sender.secret_env} "
                          "is not set (it signs unsubscribe links and bounce addresses)")
    report = None
    if check_domains is not None:
        report = _check_audience(engine, name, check_domains, launch.sender, launch.dkim_keys,
                                 no_dkim)
    with db.transaction(engine) as connection:
        campaign = _startable(connection, name, lock=True)
        campaign = _refresh_attributes(connection, campaign, now)
        templates = _compile(campaign.subject, campaign.html_template, campaign.text_template,
                             campaign.settings)
        missing = render.missing_unsubscribe(templates)
        if missing:
            raise TemplateError(f"campaign {name!r}: no {{{{ unsubscribe_url }}}} in the "
                                f"{' and '.join(missing)} part: add a visible unsubscribe link")
        key = _dkim_gate(campaign, launch.sender, launch.dkim_keys, no_dkim)
        send_at = at if at is not None else campaign.send_at
        due = max(send_at or now, now)
        list_ids = [store.list_id(connection, list_name) for list_name in campaign.lists]
        if report is not None:
            store.add_suppressions(connection, domains.suppressions(report, now, campaign.id))
        queued, suppressed = store_campaigns.queue_deliveries(connection, campaign.id, list_ids,
                                                              due, now)
        if queued == 0:
            raise StateError(f"campaign {name!r} has no one to send to: lists "
                             f"{', '.join(campaign.lists)} have no subscribed members who may be "
                             f"mailed ({suppressed} suppressed)")
        _trial_message(connection, campaign, launch, key, now)
        status = "scheduled" if send_at is not None and send_at > now else "running"
        store_campaigns.update_campaign(connection, campaign.id, status=status, send_at=send_at,
                                        no_dkim=no_dkim, started_at=now, updated_at=now)
    return Started(status, queued, suppressed, send_at, key.domain if key else None, report)


def _startable(connection: Connection, name: str, *, lock: bool = False) -> CampaignRow:
    campaign = store_campaigns.campaign(connection, name, lock=lock)
    if campaign.status not in STARTABLE:
        raise StateError(f"campaign {name!r} is {campaign.status}: only a draft can be started")
    return campaign


def _check_audience(engine: Engine, name: str, check: domains.Check, sender: SenderConfig,
                    keys: tuple[DkimKey, ...], no_dkim: bool) -> domains.Report:
    """Look up the domains of a startable campaign's audience (no transaction held meanwhile).

    The DKIM gate is passed first: a missing key should not cost a long DNS check.
    """
    with db.reading(engine) as connection:
        campaign = _startable(connection, name)
        _dkim_gate(campaign, sender, keys, no_dkim)
        list_ids = [store.list_id(connection, list_name) for list_name in campaign.lists]
        wanted = store_domains.audience_domains(connection, list_ids)
    return check(wanted)


def _refresh_attributes(connection: Connection, campaign: CampaignRow, now: float) -> CampaignRow:
    """Re-read the lists' attribute names: imports since `create` may have added some."""
    list_ids = [store.list_id(connection, list_name) for list_name in campaign.lists]
    attributes = sorted(store_campaigns.attribute_keys(connection, list_ids))
    if attributes == campaign.settings.get("attributes"):
        return campaign
    settings = {**campaign.settings, "attributes": attributes}
    store_campaigns.update_campaign(connection, campaign.id, settings=settings, updated_at=now)
    return store_campaigns.campaign(connection, campaign.name)


def _trial_message(connection: Connection, campaign: CampaignRow, launch: Launch,
                   key: DkimKey | None, now: float) -> None:
    """Build the first recipient's message for real: rendering and signing work end to end."""
    assert launch.sender is not None and launch.secret is not None
    signer = dkim.load_signer(key) if key is not None else None
    factory = messages.MessageFactory(campaign, launch.sender, launch.secret, signer)
    list_ids = [store.list_id(connection, list_name) for list_name in campaign.lists]
    first = store_campaigns.first_recipient(connection, list_ids)
    if first is not None:
        person = store.subscriber(connection, first)
        factory.build(0, person.email, person.name, person.attributes, now)


def _transition(engine: Engine, name: str, allowed: tuple[str, ...], verb: str,
                now: float, **values: Any) -> CampaignRow:
    with db.transaction(engine) as connection:
        campaign = store_campaigns.campaign(connection, name, lock=True)
        if campaign.status not in allowed:
            raise StateError(f"campaign {name!r} is {campaign.status}: it cannot be {verb}")
        if callable(values.get("status")):
            values["status"] = values["status"](campaign)
        store_campaigns.update_campaign(connection, campaign.id, updated_at=now, **values)
        if values.get("status") == "cancelled":
            store_campaigns.cancel_pending(connection, campaign.id, now)
        return store_campaigns.campaign(connection, name)


def pause(engine: Engine, name: str, now: float, reason: str = "paused by user") -> CampaignRow:
    """Stop handing out the campaign's deliveries until it is resumed."""
    return _transition(engine, name, PAUSABLE, "paused", now, status="paused", pause_reason=reason)


def resume(engine: Engine, name: str, now: float) -> CampaignRow:
    """Continue a paused campaign (scheduled again if its start time is still ahead)."""
    return _transition(
        engine, name, ("paused",), "resumed", now, pause_reason=None,
        status=lambda c: "scheduled" if c.send_at is not None and c.send_at > now else "running",
    )


def cancel(engine: Engine, name: str, now: float) -> CampaignRow:
    """Cancel a campaign: nothing more is sent; messages already handed over stay counted."""
    return _transition(engine, name, CANCELLABLE, "cancelled", now, status="cancelled",
                       finished_at=now)


def retry(engine: Engine, name: str, *, unknown: bool, failed: bool, now: float) -> int:
    """Queue `unknown` and/or `failed` deliveries again; returns how many.

    An `unknown` message may have arrived (the RFC 1047 window): it goes out again with the
    same Message-ID, so a receiving system that keeps Message-IDs can drop the duplicate.
    Failed addresses that were suppressed (hard bounces) stay suppressed: the sender
    re-checks the list before RCPT.
    """
    states = [state for state, wanted in (("unknown", unknown), ("failed", failed)) if wanted]
    if not states:
        raise StateError(f"campaign {name!r}: say what to retry: --unknown and/or --failed")
    with db.transaction(engine) as connection:
        campaign = store_campaigns.campaign(connection, name, lock=True)
        if campaign.status in ("draft", "cancelled"):
            raise StateError(f"campaign {name!r} is {campaign.status}: nothing to retry")
        count = store_campaigns.requeue(connection, campaign.id, states, now)
        if count and campaign.status == "finished":
            store_campaigns.update_campaign(connection, campaign.id, status="running",
                                            finished_at=None, updated_at=now)
    return count


def send_test(engine: Engine, name: str, launch: Launch, to: str, account: Any,
              open_session: Any, now: float) -> Any:
    """Send one copy of the campaign to `to` through `account`; nothing is recorded.

    The copy is rendered for `to` (as that subscriber if it is one) with placeholder tokens,
    signed like the real messages, and sent over a fresh session; the SMTP result is returned.
    It does not count against the account's configured limits.
    """
    if launch.sender is None or launch.secret is None:
        raise ConfigError("a test message needs [sender] in bulksend.toml and its secret in the "
                          "environment")
    key = importer.address_key(to)
    with db.reading(engine) as connection:
        campaign = store_campaigns.campaign(connection, name)
        try:
            person = store.subscriber(connection, key)
            display, attributes = person.name, person.attributes
        except NotFound:
            display, attributes = "", {}
    signer = campaign_signer(campaign, launch.sender, launch.dkim_keys)
    session = open_session(account)
    try:
        factory = messages.MessageFactory(campaign, launch.sender, launch.secret, signer,
                                          eight_bit=session.eight_bit)
        outgoing = factory.build(0, to.strip(), display, attributes, now)
        return session.send(outgoing.envelope_from, outgoing.recipient, outgoing.data,
                            lambda: True)
    finally:
        session.close()


def show(engine: Engine, name: str) -> dict[str, Any]:
    """The `campaign show --json` object: status, counts per state, events, per account."""
    with db.reading(engine) as connection:
        campaign = store_campaigns.campaign(connection, name)
        states = store_campaigns.state_counts(connection, campaign.id)
        events = store_campaigns.event_counts(connection, campaign.id)
        by_account = store_campaigns.sent_by_account(connection, campaign.id)
    return {
        "name": campaign.name,
        "status": campaign.status,
        "pause_reason": campaign.pause_reason,
        "total": sum(states.values()),
        **{state: states.get(state, 0) for state in STATE_FIELDS},
        "bounced": events.get("hard", 0),
        "complaints": events.get("complaint", 0),
        "unsubscribed": events.get("unsubscribe", 0),
        "by_account": by_account,
        "lists": list(campaign.lists),
        "subject": campaign.subject,
        "send_at": campaign.send_at,
        "created_at": campaign.created_at,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "no_dkim": campaign.no_dkim,
    }


def all_campaigns(engine: Engine) -> list[dict[str, Any]]:
    """Every campaign with its status and delivery progress, newest first."""
    with db.reading(engine) as connection:
        rows = store_campaigns.all_campaigns(connection)
        counts = {row.id: store_campaigns.state_counts(connection, row.id) for row in rows}
    return [
        {"name": row.name, "status": row.status, "lists": list(row.lists),
         "total": sum(counts[row.id].values()), "sent": counts[row.id].get("sent", 0),
         "created_at": row.created_at}
        for row in rows
    ]


def preview(engine: Engine, name: str, launch: Launch, *, email: str | None, now: float
            ) -> tuple[messages.Outgoing, bool]:
    """The exact message a subscriber gets (or would get); second: whether it is queued."""
    if launch.sender is None or launch.secret is None:
        raise ConfigError("preview needs [sender] in bulksend.toml and its secret in the "
                          f"environment ({launch.sender.secret_env if launch.sender else 'BULKSEND_SECRET'})")
    with db.reading(engine) as connection:
        campaign = store_campaigns.campaign(connection, name)
        list_ids = [store.list_id(connection, list_name) for list_name in campaign.lists]
        key = (importer.address_key(email) if email
               else store_campaigns.first_recipient(connection, list_ids))
        if key is None:
            raise StateError(f"campaign {name!r}: its lists have no subscribed members to preview")
        person = store.subscriber(connection, key)
        delivery = store_campaigns.delivery_for(connection, campaign.id, key)
    signer = campaign_signer(campaign, launch.sender, launch.dkim_keys)
    factory = messages.MessageFactory(campaign, launch.sender, launch.secret, signer)
    delivery_id = delivery.id if delivery is not None else 0
    return factory.build(delivery_id, person.email, person.name, person.attributes, now), delivery is not None
