"""Bounce mail → events: DSNs, ARF complaints, mailto unsubscribes, auto-replies, garbage."""

from __future__ import annotations

import base64
import json
import random
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import pytest

from bulksend import bounces, messages, tokens
from bulksend.bounces import Event, Report, Unparseable
from bulksend.config import SenderConfig
from bulksend.store_campaigns import CampaignRow

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
CORPUS = Path(__file__).resolve().parent / "data" / "bounces" / "flufl"  # from ../shared/corpora
SENDER = SenderConfig(from_address="News <news@example.com>", list_id="news.example.com",
                      return_path="bounces@example.com", unsubscribe_url="https://example.com/u",
                      unsubscribe_mailto="unsub@example.com")
NOTICE = "This is the mail system at host mx.example.net.\n\nI'm sorry to have to inform you...\n"


# --- building real messages -----------------------------------------------------------------

def original(delivery_id: int = 42, email: str = "ann@example.org") -> bytes:
    """The message bulksend sent for `delivery_id`, as the recipient's server got it."""
    campaign = CampaignRow(
        id=7, name="nov", subject="Hi {{ name }}", html_template="<p>Hello {{ name }}</p>" * 40,
        text_template=None, from_address=None, status="running", send_at=None,
        pause_reason=None, no_dkim=False, settings={}, created_at=0.0, started_at=0.0,
        finished_at=None, lists=("news",))
    out = messages.MessageFactory(campaign, SENDER, SECRET, None).build(
        delivery_id, email, "Ann", {}, 1.8e9)
    return b"Return-Path: <" + out.envelope_from.encode() + b">\r\n" + out.data


def verp(delivery_id: int, secret: bytes = SECRET) -> str:
    return tokens.verp_address("bounces@example.com",
                               tokens.make_token(secret, tokens.BOUNCE, delivery_id))


def block(**fields: str) -> Message:
    part = Message()
    for name, value in fields.items():
        part[name.replace("_", "-")] = value
    return part


def rcpt(address: str, action: str = "failed", status: str | None = "5.1.1",
         diagnostic: str | None = "smtp; 550 5.1.1 <{a}>: Recipient address rejected") -> Message:
    """One per-recipient block of a delivery status report."""
    fields = {"Final_Recipient": f"rfc822; {address}", "Action": action}
    if status is not None:
        fields["Status"] = status
    if diagnostic is not None:
        fields["Diagnostic_Code"] = diagnostic.format(a=address)
    return block(**fields)


def report(kind: str, parts: list[Message], *, to: str = "bounces@example.com",
           sender: str = "MAILER-DAEMON@mx.example.net", subject: str = "Undelivered Mail",
           message_id: str | None = "<bounce-1@mx.example.net>") -> MIMEMultipart:
    """A multipart/report of `kind` ("delivery-status", "feedback-report") around `parts`."""
    outer = MIMEMultipart("report", report_type=kind)
    outer["From"] = sender
    outer["To"] = to
    outer["Subject"] = subject
    outer["Auto-Submitted"] = "auto-replied"  # RFC 3464 reports carry it: it must not hide them
    if message_id:
        outer["Message-ID"] = message_id
    outer.attach(MIMEText(NOTICE))
    for part in parts:
        outer.attach(part)
    return outer


def dsn(*recipients: Message, returned: bytes | None = None, headers_only: bool = False,
        **options: str) -> bytes:
    """An RFC 3464 DSN for `recipients`, with the returned original (or its header) attached."""
    status = MIMEBase("message", "delivery-status")
    status.set_payload([block(Reporting_MTA="dns; mx.example.net"), *recipients])
    parts: list[Message] = [status]
    if returned is not None:
        if headers_only:
            header = returned.partition(b"\r\n\r\n")[0].decode("ascii")
            parts.append(MIMEText(header, "rfc822-headers"))
        else:
            parts.append(MIMEMessage(BytesParser(policy=compat32).parsebytes(returned)))
    return report("delivery-status", parts, **options).as_bytes()


def global_dsn(text: str, *, encoding: str = "8bit") -> bytes:
    """An RFC 6533 DSN whose message/global-delivery-status part holds UTF-8 `text`."""
    status = MIMEBase("message", "global-delivery-status")
    del status["MIME-Version"]
    status["Content-Transfer-Encoding"] = encoding
    data = text.encode("utf-8")
    if encoding == "base64":
        data = base64.encodebytes(data)
    status.set_payload("GLOBAL-STATUS")  # the generator writes 8-bit payloads only as ASCII
    return report("delivery-status", [status], to=verp(5)).as_bytes().replace(
        b"GLOBAL-STATUS", data)


def arf(*, rcpt_to: str | None = "ann@example.org", feedback_type: str = "abuse",
        returned: bytes | None = None, to: str = "fbl@example.com") -> bytes:
    """An RFC 5965 feedback report about `returned`."""
    fields = {"Feedback_Type": feedback_type, "User_Agent": "SomeISP-FBL/1.0", "Version": "1"}
    if rcpt_to:
        fields["Original_Rcpt_To"] = rcpt_to
    feedback = MIMEBase("message", "feedback-report")
    feedback.set_payload([block(**fields)])
    parts: list[Message] = [feedback]
    if returned is not None:
        parts.append(MIMEMessage(BytesParser(policy=compat32).parsebytes(returned)))
    return report("feedback-report", parts, to=to, sender="fbl@isp.example",
                  subject="Abuse report").as_bytes()


def plain(body: str, **headers: str) -> bytes:
    """A one-part text message with `headers` (underscores become hyphens)."""
    msg = MIMEText(body, "plain", "utf-8")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    return msg.as_bytes()


def parse(raw: bytes, secret: bytes | None = SECRET) -> Report:
    return bounces.parse(raw, secret=secret)


def only(result: Report) -> Event:
    assert result.ignored is None and len(result.events) == 1, result
    return result.events[0]


# --- the corpus -------------------------------------------------------------------------------

def test_corpus_finds_every_labelled_address_in_at_least_95_percent_of_files() -> None:
    labels = json.loads((CORPUS / "labels.json").read_text())
    found, outcomes = [], {}
    for name, label in sorted(labels.items()):
        wanted = {address.lower() for address in label["permanent"] + label["temporary"]}
        try:
            result = parse((CORPUS / name).read_bytes(), secret=None)
        except Unparseable as exc:
            outcomes[name] = f"unparseable: {exc}"
            continue
        events = {event.email.lower() for event in result.events if event.email}
        outcomes[name] = result.ignored or "+".join(sorted({e.kind for e in result.events}))
        found.append(wanted <= events)
        if not wanted:  # the five non-bounces: nothing that could suppress anyone
            assert not result.events, (name, result)
    rate = sum(found) / len(labels)
    print(f"\nflufl corpus: {sum(found)}/{len(labels)} files = {rate:.1%} with every labelled "
          f"address found in events (delay warnings included); outcomes "
          f"{sorted((o, list(outcomes.values()).count(o)) for o in set(outcomes.values()))}")
    assert len(labels) == 117
    assert rate >= 0.95


# --- classification ---------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "kind"), [
    ("5.1.1", "hard"), ("5.1.10", "hard"), ("5.4.4", "hard"), ("5.3.0", "hard"),
    ("5.0.0", "hard"), ("5.2.2", "soft"), ("5.2.1", "hard"), ("4.2.2", "soft"),
    ("4.7.1", "soft"), ("5.7.1", "block"), ("5.7.26", "block"), ("2.0.0", None),
])
def test_enhanced_status_code_decides_the_kind(status: str, kind: str | None) -> None:
    assert bounces.classify(status) == kind


@pytest.mark.parametrize(("status", "kind"), [
    ("5.1.1", "hard"), ("5.1.10", "hard"), ("5.2.2", "soft"), ("5.7.1", "block"),
    ("4.4.7", "soft"),
])
def test_dsn_recipient_is_classified_by_its_status(status: str, kind: str) -> None:
    event = only(parse(dsn(rcpt("ann@example.org", status=status,
                                diagnostic=f"smtp; 550 {status} no"))))
    assert (event.kind, event.status, event.source) == (kind, status, "dsn")


@pytest.mark.parametrize(("status", "diagnostic", "action", "kind", "code"), [
    (None, "smtp; 550 5.1.1 <{a}>: user unknown", "failed", "hard", "5.1.1"),
    ("5.0.0", "smtp; 554 5.7.1 Service unavailable; client host blocked", "failed", "block",
     "5.7.1"),
    (None, "smtp; 452 Too many recipients", "failed", "soft", None),
    (None, "smtp; 552 Mailbox full", "failed", "soft", None),
    ("550", "X-Postfix; unknown user", "failed", "hard", None),
    (None, None, "failed", "hard", None),
])
def test_without_an_enhanced_status_the_diagnostic_then_the_action_decide(
        status: str | None, diagnostic: str | None, action: str, kind: str,
        code: str | None) -> None:
    event = only(parse(dsn(rcpt("ann@example.org", action, status, diagnostic))))
    assert (event.kind, event.status) == (kind, code)


def test_delayed_dsn_gives_a_delayed_event_tied_like_a_failure() -> None:
    result = parse(dsn(rcpt("ann@example.org", "delayed", "4.4.1", "smtp; 421 try later"),
                       to=verp(9)))
    assert result == Report("bounce-1@mx.example.net", (Event(
        "delayed", "dsn", "ann@example.org", "4.4.1", "421 try later", 9),), None)


def test_delayed_recipient_is_tied_through_the_returned_original_or_left_to_the_address() -> None:
    tied = only(parse(dsn(rcpt("ann@example.org", "delayed", None, None),
                          returned=original(12), headers_only=True)))
    untied = only(parse(dsn(rcpt("ann@example.org", "delayed", "4.4.7", None))))
    assert (tied.kind, tied.email, tied.status, tied.delivery_id) == (
        "delayed", "ann@example.org", None, 12)
    assert (untied.kind, untied.email, untied.status, untied.delivery_id) == (
        "delayed", "ann@example.org", "4.4.7", None)


def test_delay_warning_naming_nobody_is_ignored() -> None:
    result = parse(dsn(block(Action="delayed", Status="4.4.1")))
    assert (result.events, result.ignored) == ((), "delayed")


def test_delivered_and_relayed_dsn_reports_nothing() -> None:
    result = parse(dsn(rcpt("ann@example.org", "delivered", "2.0.0", None),
                       rcpt("bob@example.org", "relayed", "2.0.0", None)))
    assert (result.events, result.ignored) == ((), "not a bounce")


# --- DSN content ------------------------------------------------------------------------------

def test_hard_bounce_to_verp_address_is_tied_to_its_delivery() -> None:
    event = only(parse(dsn(rcpt("ann@example.org"), to=verp(42))))
    assert event == Event("hard", "dsn", "ann@example.org", "5.1.1",
                          "550 5.1.1 <ann@example.org>: Recipient address rejected", 42)


@pytest.mark.parametrize("header", ["Delivered-To", "X-Original-To", "Envelope-To",
                                    "X-Envelope-To", "Return-Path"])
def test_verp_token_is_found_in_every_envelope_header(header: str) -> None:
    msg = BytesParser(policy=compat32).parsebytes(dsn(rcpt("ann@example.org")))
    msg[header] = f"<{verp(777)}>"
    assert only(parse(msg.as_bytes())).delivery_id == 777


def test_verp_address_survives_an_mta_upper_casing_it() -> None:
    assert only(parse(dsn(rcpt("ann@example.org"), to=verp(42).upper()))).delivery_id == 42


def test_without_verp_the_returned_originals_header_ties_the_delivery() -> None:
    event = only(parse(dsn(rcpt("ann@example.org"), returned=original(1234))))
    assert (event.email, event.delivery_id) == ("ann@example.org", 1234)


def test_returned_header_alone_as_text_rfc822_headers_ties_the_delivery() -> None:
    raw = dsn(rcpt("ann@example.org"), returned=original(99), headers_only=True)
    assert b"text/rfc822-headers" in raw
    assert only(parse(raw)).delivery_id == 99


def test_verp_token_wins_over_the_returned_original() -> None:
    assert only(parse(dsn(rcpt("ann@example.org"), to=verp(5), returned=original(6)))) \
        .delivery_id == 5


@pytest.mark.parametrize("secret", [OTHER_SECRET, None])
def test_forged_or_unverifiable_tokens_tie_nothing(secret: bytes | None) -> None:
    event = only(parse(dsn(rcpt("ann@example.org"), to=verp(5), returned=original(6)), secret))
    assert (event.email, event.delivery_id) == ("ann@example.org", None)


def test_bounce_token_in_another_local_part_still_ties() -> None:
    to = "returns+" + tokens.make_token(SECRET, tokens.BOUNCE, 8) + "@mail.example.com"
    assert only(parse(dsn(rcpt("ann@example.org"), to=to))).delivery_id == 8


def test_multi_recipient_dsn_gives_one_event_per_failed_recipient() -> None:
    result = parse(dsn(
        rcpt("ann@example.org"),
        rcpt("bob@example.org", status="4.2.2", diagnostic="smtp; 452 4.2.2 mailbox full"),
        rcpt("cat@example.org", "delivered", "2.0.0", None),
        rcpt("dan@example.org", "delayed", "4.4.1", None),
        rcpt("eve@example.org", status="5.7.1", diagnostic="smtp; 550 5.7.1 blocked"),
        Message(),
        rcpt("Ann@Example.org"),  # the same recipient twice counts once
        returned=original(3)))
    assert [(e.kind, e.email, e.status, e.delivery_id) for e in result.events] == [
        ("hard", "ann@example.org", "5.1.1", 3), ("soft", "bob@example.org", "4.2.2", 3),
        ("delayed", "dan@example.org", "4.4.1", 3), ("block", "eve@example.org", "5.7.1", 3)]
    assert result.ignored is None


def test_original_recipient_is_preferred_over_the_final_one() -> None:
    recipient = rcpt("ann.forwarded@elsewhere.example")
    recipient["Original-Recipient"] = "rfc822;ann+2Bnews@example.org"  # xtext for "+"
    assert only(parse(dsn(recipient))).email == "ann+news@example.org"


@pytest.mark.parametrize("encoding", ["8bit", "base64"])
def test_global_dsn_with_utf8_recipient_is_parsed(encoding: str) -> None:
    text = ("Reporting-MTA: dns; почта.example\n\n"
            "Original-Recipient: utf-8; аня@пример.рф\n"
            "Final-Recipient: utf-8; \\x{0430}ня@пример.рф\n"
            "Action: failed\nStatus: 5.1.1\n"
            "Diagnostic-Code: smtp; 550 5.1.1 нет такого ящика\n")
    event = only(parse(global_dsn(text, encoding=encoding)))
    assert event == Event("hard", "dsn", "аня@пример.рф", "5.1.1",
                          "550 5.1.1 нет такого ящика", 5)


def test_global_dsn_unitext_escapes_are_decoded() -> None:
    text = "Reporting-MTA: dns; x\n\nFinal-Recipient: utf-8; \\x{0430}\\x{043D}\\x{044F}@x.рф\n" \
           "Action: failed\nStatus: 5.1.10\n"
    event = only(parse(global_dsn(text)))
    assert (event.email, event.kind, event.status) == ("аня@x.рф", "hard", "5.1.10")


def test_diagnostic_is_one_clean_line_of_at_most_500_characters() -> None:
    diagnostic = "smtp; 550 5.1.1 first\r\n line\x00 with\x1b junk " + "x" * 2000
    event = only(parse(dsn(rcpt("ann@example.org", diagnostic=diagnostic))))
    assert event.diagnostic is not None and len(event.diagnostic) == 500
    assert event.diagnostic.startswith("550 5.1.1 first line with junk x")
    assert event.diagnostic.isprintable()


# --- the fast path for plain DSNs --------------------------------------------------------------

def typical_dsns() -> list[bytes]:
    return [
        dsn(rcpt("ann@example.org"), to=verp(42), returned=original(42)),
        dsn(rcpt("ann@example.org"), to=verp(42), returned=original(42), headers_only=True),
        dsn(rcpt("a@example.org"), rcpt("b@example.org", status="4.2.2"),
            rcpt("c@example.org", "delayed", "4.4.1"), rcpt("d@example.org", "relayed"),
            to=verp(43)),
        dsn(rcpt("ann@example.org", "delayed", "4.4.1", None), to=verp(44)),
        dsn(rcpt("ann@example.org", "delivered", "2.0.0", None), to=verp(45), message_id=None),
    ]


@pytest.mark.parametrize("index", range(5))
def test_fast_path_takes_typical_dsns_and_agrees_with_the_full_parse(index: int) -> None:
    raw = typical_dsns()[index]
    fast = bounces._fast_dsn(raw, SECRET)
    assert fast is not None and fast == bounces._parse(raw, SECRET)


@pytest.mark.parametrize("raw", [
    dsn(rcpt("ann@example.org"), returned=original(42)),  # the tie is in the original
    dsn(rcpt("ann@example.org"), to=verp(42)).replace(  # a transfer encoding to undo
        b"Content-Type: message/delivery-status",
        b"Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64"),
    arf(returned=original(1), to=verp(1)),
    global_dsn("Reporting-MTA: dns; x\n\nFinal-Recipient: utf-8; a@b.c\nAction: failed\n"),
    plain("hello", To=verp(1)),
    b"no header end",
])
def test_fast_path_declines_what_the_full_path_must_read(raw: bytes) -> None:
    assert bounces._fast_dsn(raw, SECRET) is None


def test_fast_path_agrees_with_the_full_parse_on_the_corpus() -> None:
    assert len(list(CORPUS.glob("*.txt"))) == 117, CORPUS
    taken = 0
    for path in sorted(CORPUS.glob("*.txt")):
        raw = path.read_bytes()
        fast = bounces._fast_dsn(raw, None)
        if fast is not None:
            taken += 1
            assert fast == bounces._parse(raw, None), path.name
    assert taken >= 5


# --- ARF, mailto, auto-replies ----------------------------------------------------------------

def test_arf_complaint_names_the_original_recipient_and_delivery() -> None:
    event = only(parse(arf(returned=original(55))))
    assert event == Event("complaint", "arf", "ann@example.org", None, "Feedback-Type: abuse",
                          55)


def test_arf_without_original_rcpt_to_takes_the_originals_to() -> None:
    event = only(parse(arf(rcpt_to=None, returned=original(56, "zoe@example.net"))))
    assert (event.kind, event.email, event.delivery_id) == ("complaint", "zoe@example.net", 56)


@pytest.mark.parametrize("feedback_type", ["auth-failure", "not-spam"])
def test_arf_that_is_no_complaint_is_ignored(feedback_type: str) -> None:
    result = parse(arf(feedback_type=feedback_type, returned=original(1)))
    assert (result.events, result.ignored) == ((), "not a bounce")


def test_arf_naming_nobody_is_quarantined() -> None:
    with pytest.raises(Unparseable, match="feedback report"):
        parse(arf(rcpt_to=None))


def unsubscribe_mail(local: str, delivery_id: int, secret: bytes = SECRET,
                     purpose: str = tokens.UNSUBSCRIBE, **headers: str) -> bytes:
    to = f"{local}+{tokens.make_token(secret, purpose, delivery_id)}@example.com"
    return plain("please remove me", From="Ann <ann@example.org>", To=to,
                 Subject="unsubscribe", Message_ID="<u-1@mua.example.org>", **headers)


@pytest.mark.parametrize("local", ["unsub", "unsubscribe", "list-off"])
def test_mailto_unsubscribe_names_the_sender_and_delivery(local: str) -> None:
    result = parse(unsubscribe_mail(local, 31))
    assert result == Report("u-1@mua.example.org", (Event(
        "unsubscribe", "mailto", "ann@example.org", None, None, 31),), None)


@pytest.mark.parametrize(("secret", "purpose", "parse_secret"), [
    (OTHER_SECRET, tokens.UNSUBSCRIBE, SECRET),  # forged
    (SECRET, tokens.BOUNCE, SECRET),  # a token for another purpose
    (SECRET, tokens.UNSUBSCRIBE, None),  # nothing to check it with
])
def test_mailto_with_a_token_that_does_not_read_is_not_an_unsubscribe(
        secret: bytes, purpose: str, parse_secret: bytes | None) -> None:
    result = parse(unsubscribe_mail("unsub", 31, secret, purpose), parse_secret)
    assert (result.events, result.ignored) == ((), "not a bounce")


@pytest.mark.parametrize("headers", [
    {"Auto_Submitted": "auto-replied (vacation)"},
    {"X_Autoreply": "yes"},
    {"X_Autorespond": "Out of office"},
    {"Precedence": "auto_reply"},
    {"Subject": "Out of Office: Hi Ann"},
    {"Subject": "Automatic reply: Hi Ann"},
    {"Subject": "=?utf-8?b?0JDQstGC0L7QvtGC0LLQtdGCOiBIaQ==?="},  # "Автоответ: Hi"
])
def test_auto_replies_are_ignored(headers: dict[str, str]) -> None:
    fields = {"From": "Ann <ann@example.org>", "To": verp(4), "Subject": "Re: Hi Ann"} | headers
    result = parse(plain("I am away until Monday. Your mail to ann@example.org will wait.",
                         **fields))
    assert (result.events, result.ignored) == ((), "autoreply")


def test_auto_reply_to_the_unsubscribe_address_unsubscribes_nobody() -> None:
    result = parse(unsubscribe_mail("unsub", 31, Auto_Submitted="auto-replied"))
    assert (result.events, result.ignored) == ((), "autoreply")


def test_auto_submitted_is_no_is_not_an_auto_reply() -> None:
    assert only(parse(unsubscribe_mail("unsub", 32, Auto_Submitted="no"))).delivery_id == 32


QMAIL = """Hi. This is the qmail-send program at mx.example.net.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<gone@example.org>:
{reply}

--- Below this line is a copy of the message.

{original}"""


@pytest.mark.parametrize(("reply", "kind", "status"), [
    ("Sorry, no mailbox here by that name. (#5.1.1)", "hard", "5.1.1"),
    ("550 5.7.1 Message rejected as spam", "block", "5.7.1"),
    ("Sorry, no mailbox here by that name.", "hard", None),
])
def test_non_standard_bounce_falls_back_to_flufl(reply: str, kind: str, status: str | None) -> \
        None:
    body = QMAIL.format(reply=reply, original=original(21).decode())
    raw = plain(body, From="MAILER-DAEMON@mx.example.net", To="bounces@example.com",
                Subject="failure notice", Auto_Submitted="auto-replied")
    event = only(parse(raw))
    # the original is quoted as text: its X-Bulksend-Delivery still ties the delivery
    assert event == Event(kind, "dsn", "gone@example.org", status, None, 21)


def test_quoted_original_ties_nothing_with_a_wrong_secret() -> None:
    body = QMAIL.format(reply="no mailbox", original=original(21).decode())
    raw = plain(body, From="MAILER-DAEMON@mx.example.net", To="bounces@example.com")
    assert only(parse(raw, OTHER_SECRET)).delivery_id is None


def test_ordinary_mail_is_not_a_bounce() -> None:
    raw = plain("Thanks for the newsletter!", From="ann@example.org", To=verp(3),
                Subject="Re: Hi")
    assert parse(raw) == Report(None, (), "not a bounce")


# --- robustness -------------------------------------------------------------------------------

def test_message_over_max_bytes_is_unparseable() -> None:
    raw = dsn(rcpt("ann@example.org"))
    assert only(bounces.parse(raw, secret=SECRET, max_bytes=len(raw))).kind == "hard"
    with pytest.raises(Unparseable, match="over the"):
        bounces.parse(raw, secret=SECRET, max_bytes=len(raw) - 1)


@pytest.mark.parametrize("raw", [
    b"", b"\x00" * 100, b"\r\n\r\n", b"not a header line\r\n\r\nbody",
    bytes(random.Random(5).randrange(256) for _ in range(50_000)),
    bytes(random.Random(6).randrange(256) for _ in range(5_000)) * 20,
])
def test_garbage_is_unparseable_or_not_a_bounce(raw: bytes) -> None:
    try:
        result = parse(raw)
    except Unparseable:
        return
    assert (result.events, result.ignored) == ((), "not a bounce")


def test_garbage_bytes_in_every_position_never_raise_anything_else() -> None:
    good = dsn(rcpt("ann@example.org"), to=verp(1), returned=original(1))
    rng = random.Random(7)
    for _ in range(300):
        raw = bytearray(good)
        for _ in range(rng.randrange(1, 40)):
            position = rng.randrange(len(raw))
            raw[position:position + rng.randrange(1, 20)] = rng.randbytes(rng.randrange(0, 20))
        try:
            result = parse(bytes(raw))
        except Unparseable:
            continue
        assert all(event.kind in ("hard", "soft", "block") for event in result.events)


@pytest.mark.parametrize("raw", [
    # boundary missing, never closed, or wrong
    b"From: MAILER-DAEMON@x\r\nContent-Type: multipart/report\r\n\r\n--x\r\nhello\r\n",
    b"From: MAILER-DAEMON@x\r\nContent-Type: multipart/report; boundary=x\r\n\r\n"
    b"--x\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\n",
    b"From: a@x\r\nContent-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n--\r\n",
    # unknown and lying charsets, broken encoded-words and transfer encodings
    b"From: a@x\r\nSubject: =?x-unknown?q?=FF=FE?= =?utf-8?b?####?=\r\n"
    b"Content-Type: text/plain; charset=x-does-not-exist\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n",
    b"From: \xff\xfe\xfd\r\nTo: \xc3\x28@\xa0\xa1\r\nSubject: \xe2\x82\r\n\r\n\xff\xff",
    b"From: a@x\r\nContent-Type: message/rfc822\r\n\r\n" * 3,
])
def test_malformed_mime_and_charsets_never_raise_anything_else(raw: bytes) -> None:
    try:
        result = parse(raw)
    except Unparseable:
        return
    assert isinstance(result, Report)


def test_deeply_nested_message_is_unparseable_not_a_crash() -> None:
    raw = b"From: a@x\r\nContent-Type: message/rfc822\r\n\r\n" * 2000 + b"From: b@y\r\n\r\nhi"
    with pytest.raises(Unparseable, match="too deeply"):
        parse(raw)


def test_too_many_parts_is_unparseable() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(600))
    raw = b"From: a@x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    with pytest.raises(Unparseable, match="MIME parts"):
        parse(raw)


def test_backtracking_bait_for_flufls_heuristics_is_parsed() -> None:
    # quadratic for flufl's regexes if it saw these lines whole; parse trims them first
    body = ("The Postfix program\n<" + "<" * 400_000 + "\n" + ",a" * 300_000 + "\n"
            + "x" * 300_000 + " on \n")
    raw = plain(body, From="MAILER-DAEMON@mx.example.net", Subject="Undelivered Mail")
    result = parse(raw)
    assert result.events == () and result.ignored == "not a bounce"


@pytest.mark.parametrize(("field", "email"), [
    ("Final-Recipient: rfc822; victim@example.org\r\nX-Injected: yes", "victim@example.org"),
    ("Final-Recipient: rfc822; =?UTF-8?Q?a=0D=0AStatus:_2.0.0?=@example.org",
     "=?UTF-8?Q?a=0D=0AStatus:_2.0.0?=@example.org"),
    ('Final-Recipient: rfc822; "a b"@example.org, second@example.org', '"a b"@example.org'),
    ("Final-Recipient: rfc822; <ann@example.org>\x00\x1b, <x@y>", "ann@example.org"),
])
def test_header_injection_in_status_fields_gives_one_clean_address(field: str, email: str) -> \
        None:
    raw = dsn(rcpt("placeholder@example.org")).replace(
        b"Final-Recipient: rfc822; placeholder@example.org", field.encode())
    event = only(parse(raw))
    assert (event.email, event.kind, event.status) == (email, "hard", "5.1.1")


def test_header_injection_in_message_id_and_subject_is_harmless() -> None:
    raw = (b"Message-ID: <a@b>\r\n X-Injected: <c@d>\r\nFrom: MAILER-DAEMON@x\r\n"
           b"Subject: =?UTF-8?Q?x=0D=0AAuto-Submitted:_auto-replied?=\r\n"
           b"To: bounces@example.com\r\n\r\nhello\r\n")
    result = parse(raw)
    assert result.ignored == "not a bounce"  # the encoded CRLF made no Auto-Submitted field
    assert result.message_id is None or result.message_id.isprintable()
    assert " " not in (result.message_id or "")


def test_source_key_is_the_message_id_else_a_digest() -> None:
    with_id = dsn(rcpt("ann@example.org"), message_id="<  abc@mx.example.net >")
    assert bounces.source_key(with_id, parse(with_id)) == "abc@mx.example.net"
    without = dsn(rcpt("ann@example.org"), message_id=None)
    key = bounces.source_key(without, parse(without))
    assert key.startswith("sha256:") and len(key) == 7 + 64
    assert key == bounces.source_key(without, parse(without))
