"""Bounce mail as remote MTAs and mailbox providers write it, tied to real deliveries.

Each builder returns the CRLF bytes a mailbox would hold: RFC 3464 DSNs (failed, delayed,
any status), RFC 5965 ARF complaints, a `mailto` unsubscribe request, a vacation reply and
garbage. Used by the bounce tests and by bench/bounce_bench.py.
"""

from __future__ import annotations

import itertools
import os

_numbers = itertools.count(1)


def _message_id(kind: str) -> str:
    return f"<{kind}-{next(_numbers)}.{os.getpid()}@mx.remote.example>"


def original_headers(recipient: str, delivery_token: str | None, return_path: str | None = None,
                     subject: str = "News") -> str:
    """The headers of the message we sent, as a report quotes them."""
    lines = ["From: News <news@example.com>", f"To: {recipient}", f"Subject: {subject}",
             "Message-ID: <orig@example.com>", "MIME-Version: 1.0"]
    if return_path:
        lines.insert(0, f"Return-Path: <{return_path}>")
    if delivery_token:
        lines.append(f"X-Bulksend-Delivery: {delivery_token}")
    return "\r\n".join(lines) + "\r\n"


def dsn(*, to: str, recipient: str, status: str, action: str = "failed",
        diagnostic: str | None = None, delivery_token: str | None = None,
        message_id: str | None = None, original: str | None = None) -> bytes:
    """A multipart/report DSN for one recipient, sent to `to` (the VERP return path).

    `original` is the header section of the returned message (default: made up, with
    `delivery_token` as its X-Bulksend-Delivery).
    """
    if original is None:
        original = original_headers(recipient, delivery_token)
    boundary = f"dsn-{next(_numbers)}"
    diagnostic = diagnostic or f"smtp; {'550' if status.startswith('5') else '452'} {status} " \
                               "mailbox problem"
    human = ("Delivery has been delayed." if action == "delayed"
             else f"Your message to {recipient} could not be delivered.")
    return "\r\n".join([
        "From: Mail Delivery System <MAILER-DAEMON@mx.remote.example>",
        f"To: {to}",
        f"Subject: {'Delivery Status Notification (Delay)' if action == 'delayed' else 'Undelivered Mail Returned to Sender'}",  # noqa: E501
        f"Message-ID: {message_id or _message_id('dsn')}",
        "Date: Sat, 28 Nov 2026 03:00:00 +0000",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mx.remote.example",
        "Arrival-Date: Sat, 28 Nov 2026 02:59:00 +0000",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Recipient: rfc822; {recipient}",
        f"Action: {action}",
        f"Status: {status}",
        "Remote-MTA: dns; mx.remote.example",
        f"Diagnostic-Code: {diagnostic}",
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
        original.rstrip("\r\n"),
        "",
        f"--{boundary}--",
        "",
    ]).encode("ascii")


def arf(*, to: str, recipient: str, delivery_token: str | None = None,
        message_id: str | None = None) -> bytes:
    """An RFC 5965 abuse report from a mailbox provider's feedback loop."""
    boundary = f"arf-{next(_numbers)}"
    return "\r\n".join([
        "From: Feedback Loop <fbl@isp.example>",
        f"To: {to}",
        "Subject: FW: News",
        f"Message-ID: {message_id or _message_id('arf')}",
        "Date: Sat, 28 Nov 2026 03:00:00 +0000",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is an email abuse report for an email message received from IP 192.0.2.1.",
        "",
        f"--{boundary}",
        "Content-Type: message/feedback-report",
        "",
        "Feedback-Type: abuse",
        "User-Agent: ISP-FBL/1.0",
        "Version: 1",
        f"Original-Rcpt-To: {recipient}",
        "Source-IP: 192.0.2.1",
        "",
        f"--{boundary}",
        "Content-Type: message/rfc822",
        "Content-Disposition: inline",
        "",
        original_headers(recipient, delivery_token) + "\r\nHello, this is the newsletter.",
        "",
        f"--{boundary}--",
        "",
    ]).encode("ascii")


def mailto_unsubscribe(*, sender: str, to: str, message_id: str | None = None) -> bytes:
    """What a mail client sends for the `mailto:` List-Unsubscribe link."""
    return "\r\n".join([
        f"From: {sender}",
        f"To: {to}",
        "Subject: unsubscribe",
        f"Message-ID: {message_id or _message_id('unsub')}",
        "Date: Sat, 28 Nov 2026 03:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "unsubscribe",
        "",
    ]).encode("ascii")


def vacation(*, sender: str, to: str, message_id: str | None = None) -> bytes:
    """An out-of-office auto-reply (RFC 3834) to the VERP return path."""
    return "\r\n".join([
        f"From: {sender}",
        f"To: {to}",
        "Subject: Out of office: News",
        f"Message-ID: {message_id or _message_id('vacation')}",
        "Date: Sat, 28 Nov 2026 03:00:00 +0000",
        "Auto-Submitted: auto-replied",
        "X-Autoreply: yes",
        "Precedence: auto_reply",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "I am away until Monday and will read your message when I am back.",
        "",
    ]).encode("ascii")


def garbage() -> bytes:
    """Not a mail message at all: binary noise without a header section."""
    return bytes(range(256)) * 8 + b"\x00\xff\r\n\r\n--\r\n"


def oversize(megabytes: int = 20) -> bytes:
    """A message over the reader's size bound (a bounce with a huge attachment)."""
    line = b"A" * 76 + b"\r\n"
    body = line * (megabytes * 2**20 // len(line) + 1)
    return (b"From: MAILER-DAEMON@mx.remote.example\r\nTo: bounces@example.com\r\n"
            b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <huge@mx.remote.example>\r\n"
            b"Content-Type: text/plain\r\n\r\n" + body)
