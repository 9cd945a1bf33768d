"""SMTP replies → outcomes (DESIGN §6), proven on reply lines real servers send.

Each line is as a provider sends it (addresses and IPs anonymised); the source is named
beside it. `classify` sees what `bulksend.smtp` gives it: the code, the enhanced code
parsed from the text, and the text.
"""

from __future__ import annotations

import pytest

from bulksend.smtp_replies import Outcome, SendResult, classify, parse_enhanced, reply_text

O = Outcome

# (stage, reply line, expected outcome)
REAL_REPLIES: list[tuple[str, str, Outcome]] = [
    # -- the account sent too much: reroute, account exhausted until its window frees --
    ("mail", "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to "
             "https://support.google.com/a/answer/166852 - gsmtp", O.ACCOUNT_EXHAUSTED),  # Gmail
    ("dot", "550 5.4.5 Daily user sending quota exceeded. - gsmtp", O.ACCOUNT_EXHAUSTED),  # Gmail
    ("rcpt", "421 4.7.28 [203.0.113.9] Our system has detected an unusual rate of unsolicited mail originating "
             "from your IP address. To protect our users from spam, mail sent from your IP address has been "
             "temporarily rate limited. - gsmtp", O.ACCOUNT_EXHAUSTED),  # Gmail 4.7.28
    ("dot", '451 4.7.1 Ratelimit "user" exceeded', O.ACCOUNT_EXHAUSTED),  # rspamd (mailcow)
    ("dot", "451 Ratelimit exceeded for mailbox news@mail.ru. Try again later.", O.ACCOUNT_EXHAUSTED),  # Mail.ru
    ("dot", "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message "
            "due to a permanent exception with message Cannot submit message.", O.ACCOUNT_EXHAUSTED),  # Outlook
    ("rcpt", "550 5.1.90 Your message can't be sent because you've reached your daily limit for message "
             "recipients", O.ACCOUNT_EXHAUSTED),  # Outlook.com
    ("rcpt", "550 5.7.705 Access denied, tenant has exceeded threshold", O.ACCOUNT_EXHAUSTED),  # Exchange Online
    ("rcpt", "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP.",
     O.ACCOUNT_EXHAUSTED),  # Exchange Online
    ("mail", "550 5.4.6 mail rate exceeded limit", O.ACCOUNT_EXHAUSTED),  # Zoho
    ("data", "554 5.7.1 <DATA>: Data command rejected: only 10 messages per day", O.ACCOUNT_EXHAUSTED),  # Postfix policy
    ("data", "554 5.7.1 <DATA>: Data command rejected: limit of 400 rcpts per 24 hours for client "
             "user@example.me reached", O.ACCOUNT_EXHAUSTED),  # Postfix policy (posteo-like)
    ("dot", "554 5.7.1 Reached address outgoing limits for", O.ACCOUNT_EXHAUSTED),  # Migadu
    ("dot", "554 sorry, too many emails (#5.7.1)", O.ACCOUNT_EXHAUSTED),  # qmail (OVH)
    ("rcpt", "452 4.3.2 Connection rate limit exceeded.", O.ACCOUNT_EXHAUSTED),  # sisimai corpus
    ("rcpt", "554 5.7.1 <user@example.com>: Recipient address rejected: You have exceeded your Outmail quota.",
     O.ACCOUNT_EXHAUSTED),  # Prolateral outMail
    ("dot", "454 Throttling failure: Maximum sending rate exceeded.", O.ACCOUNT_EXHAUSTED),  # Amazon SES
    ("dot", "454 Throttling failure: Daily message quota exceeded.", O.ACCOUNT_EXHAUSTED),  # Amazon SES
    ("dot", "451 4.7.651 The mail server [203.0.113.9] has been temporarily rate limited due to IP reputation.",
     O.ACCOUNT_EXHAUSTED),  # Outlook
    ("mail", "450 4.7.1 <news@example.com>: Sender address rejected: You are sending too many emails too fast.",
     O.ACCOUNT_EXHAUSTED),  # Mailu
    ("dot", "554 5.7.1 Message rejected: daily limit exceeded", O.ACCOUNT_EXHAUSTED),  # Yandex, as users report it
    # -- the recipient does not exist: failed + suppressed --
    ("rcpt", "550 5.1.1 The email account that you tried to reach does not exist. Please try double-checking the "
             "recipient's email address for typos or unnecessary spaces. - gsmtp", O.HARD_BOUNCE),  # Gmail
    ("rcpt", "550 5.1.1 <someone@icloud.com>: user does not exist", O.HARD_BOUNCE),  # iCloud
    ("rcpt", "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found", O.HARD_BOUNCE),  # Exchange
    ("rcpt", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     O.HARD_BOUNCE),  # Exchange Online
    ("rcpt", "550 5.7.1 No such user!", O.HARD_BOUNCE),  # Yandex (5.7.1, yet it says so)
    ("rcpt", "550 Message was not accepted -- invalid mailbox. Local mailbox someone@mail.ru is unavailable: "
             "account is disabled", O.HARD_BOUNCE),  # Mail.ru
    ("rcpt", "550 5.5.0 Requested action not taken: mailbox unavailable. [BN8NAM12FT012.eop-nam12.prod.protection."
             "outlook.com]", O.HARD_BOUNCE),  # Outlook.com
    ("rcpt", "554 delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [-5] - "
             "mta1234.mail.bf1.yahoo.com", O.HARD_BOUNCE),  # Yahoo
    ("rcpt", "550 No such user (someone@example.com)", O.HARD_BOUNCE),  # Barracuda
    ("rcpt", "550 Invalid recipient <someone@example.com> (#5.1.1)", O.HARD_BOUNCE),  # Symantec
    ("rcpt", "550 cuda_nsu 5.1.1 <someone@example.com>... User unknown", O.HARD_BOUNCE),  # Barracuda
    ("rcpt", "501 5.1.3 Bad recipient address syntax", O.HARD_BOUNCE),  # Postfix
    ("rcpt", "550 5.1.2 Host unknown (Name server: example.invalid: host not found)", O.HARD_BOUNCE),  # sendmail
    ("rcpt", "550 Requested action not taken: mailbox unavailable", O.HARD_BOUNCE),  # RFC 5321 stock text
    ("dot", "550 5.1.1 <someone@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
     O.HARD_BOUNCE),  # Postfix behind a content filter
    # -- refused for policy or spam: failed, counts toward the account's block rate --
    ("dot", "554 5.7.1 [2] Message rejected under suspicion of SPAM; https://ya.cc/1IrBc 1631900360-h4Ajl35YEe",
     O.POLICY_BLOCK),  # Yandex
    ("dot", "550 spam message rejected. Please visit http://help.mail.ru/notspam-support/id?c=x or report details "
            "to abuse@corp.mail.ru.", O.POLICY_BLOCK),  # Mail.ru
    ("dot", "550 5.7.1 [203.0.113.9] Our system has detected that this message is likely suspicious due to the very "
            "low reputation of the sending domain. - gsmtp", O.POLICY_BLOCK),  # Gmail
    ("dot", "550 5.7.1 Unauthenticated email from example.com is not accepted due to domain's DMARC policy.",
     O.POLICY_BLOCK),  # Gmail
    ("rcpt", "554 5.7.1 <someone@icloud.com>: Relay access denied", O.POLICY_BLOCK),  # iCloud
    ("dot", "554 5.7.9 Message not accepted for policy reasons. See https://help.yahoo.com/kb/postmaster/SLN7253.html",
     O.POLICY_BLOCK),  # Yahoo
    ("dot", "554 Message not allowed - [PH01] Email not accepted for policy reasons.", O.POLICY_BLOCK),  # Yahoo
    ("rcpt", "550 5.7.1 Service unavailable, MailFrom domain is listed in Spamhaus. (S8002)", O.POLICY_BLOCK),  # Outlook
    ("dot", "554 5.7.1 Spam message rejected; If this is not spam contact abuse", O.POLICY_BLOCK),  # Rambler
    ("rcpt", "550 5.2.0 Message rejected due to DMARC. Please see http://postmaster.comcast.net/smtp-error-codes.php",
     O.POLICY_BLOCK),  # Comcast
    ("rcpt", "550 Rejected by header based manually Blocked Senders: news@example.com", O.POLICY_BLOCK),  # Mimecast
    ("dot", "550 5.7.1 [CSR] Our system has detected an unusual amount of unsolicited email originating from your "
            "address", O.POLICY_BLOCK),  # a hosting provider
    # -- try this recipient again later --
    ("rcpt", "452 4.2.2 The email account that you tried to reach is over quota. Please direct the recipient to "
             "https://support.google.com/mail/?p=OverQuotaTemp - gsmtp", O.DEFERRED),  # Gmail
    ("rcpt", "552 5.2.2 The email account that you tried to reach is over quota and inactive.", O.DEFERRED),  # Gmail
    ("rcpt", "554 5.2.2 <someone@free.fr>: Recipient address rejected: Quota exceeded (mailbox for user is full)",
     O.DEFERRED),  # Free: "quota exceeded" of a mailbox, not of the account
    ("rcpt", "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
             "messages from being delivered. Please resend your message at a later time.", O.DEFERRED),  # Gmail
    ("rcpt", "554 5.2.122 The recipient has exceeded their limit for the number of messages they can receive per "
             "hour.", O.DEFERRED),  # Outlook
    ("rcpt", "451 4.7.1 <someone@example.com>: Recipient address rejected: Greylisted for 5 minutes",
     O.DEFERRED),  # Barracuda
    ("dot", "451 4.3.0 Mail server temporarily rejected message. - gsmtp", O.DEFERRED),  # Gmail
    ("rcpt", "450 4.1.1 <someone@example.com>: Recipient address rejected: unverified address: Address "
             "verification in progress", O.DEFERRED),  # Postfix
    ("dot", "451 4.7.0 Temporary server error. Please try again later. PRX4", O.DEFERRED),  # Office 365
    # -- other permanent refusals of this recipient or message --
    ("dot", "552 5.2.3 Your message exceeded Google's message size limits. Please visit "
            "https://support.google.com/mail/?p=MaxSizeError to view our size guidelines. - gsmtp", O.FAILED),  # Gmail
    ("rcpt", "550 5.2.1 The email account that you tried to reach is disabled. - gsmtp", O.FAILED),  # Gmail
    ("dot", "552 5.3.4 Message size exceeds fixed limit", O.FAILED),  # Postfix
    ("rcpt", "554 delivery error: dd Sorry, your message to someone@example.com cannot be delivered. This mailbox "
             "is disabled (554.30). - mta1.mail.yahoo.com", O.FAILED),  # Yahoo
    # -- the account needs a pause --
    ("greeting", "421 4.3.2 Service not available", O.ACCOUNT_RETRY),  # Outlook
    ("rcpt", "421 4.7.0 Try again later, closing connection. (EHLO) - gsmtp", O.ACCOUNT_RETRY),  # Gmail
    ("auth", "454 4.7.0 Too many login attempts, please try again later. - gsmtp", O.ACCOUNT_RETRY),  # Gmail
    ("dot", "421 Max message per connection reached, closing transmission channel", O.ACCOUNT_RETRY),  # Yahoo
    ("dot", "421 4.3.2 The maximum number of concurrent connections per resource forest has exceeded a limit, "
            "closing transmission channel.", O.ACCOUNT_RETRY),  # Exchange Online
    ("starttls", "454 4.7.0 TLS not available due to local problem", O.ACCOUNT_RETRY),  # Postfix
    # -- the account needs a person --
    ("greeting", "554 5.7.1 No SMTP service here", O.ACCOUNT_DISABLED),  # Postfix
    ("auth", "535 5.7.8 Username and Password not accepted. Learn more at "
             "https://support.google.com/mail/?p=BadCredentials - gsmtp", O.ACCOUNT_DISABLED),  # Gmail
    ("auth", "534 5.7.9 Application-specific password required. - gsmtp", O.ACCOUNT_DISABLED),  # Gmail
    ("auth", "535 5.7.8 Error: authentication failed: Invalid user or password!", O.ACCOUNT_DISABLED),  # Yandex
    ("auth", "530 5.7.0 Must issue a STARTTLS command first.", O.ACCOUNT_DISABLED),  # Gmail
    ("auth", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
     O.ACCOUNT_DISABLED),  # Office 365
    ("mail", "553 5.7.1 <news@example.com>: Sender address rejected: not owned by user news@yandex.ru",
     O.ACCOUNT_DISABLED),  # Yandex / Postfix
    ("mail", "550 5.7.60 SMTP; Client does not have permissions to send as this sender", O.ACCOUNT_DISABLED),  # Exchange
    # -- delivered --
    ("dot", "250 2.0.0 OK  1700000000 a1-20020a170906000000b00000000000si1234567ejb.123 - gsmtp", O.SENT),  # Gmail
    ("dot", "250 Ok: queued as 4Xyz1234", O.SENT),  # Postfix
]


def _parts(line: str) -> tuple[int, str | None, str]:
    code, _, text = line.partition(" ")
    return int(code), parse_enhanced(int(code), text), text


@pytest.mark.parametrize(("stage", "line", "expected"), REAL_REPLIES, ids=[f"{s}:{l[:40]}" for s, l, _ in REAL_REPLIES])
def test_real_reply_is_classified_as_design_says(stage: str, line: str, expected: Outcome) -> None:
    code, enhanced, text = _parts(line)
    assert classify(stage, code, enhanced, text) is expected  # type: ignore[arg-type]


def test_the_table_covers_every_reply_outcome_with_forty_lines_or_more() -> None:
    assert len(REAL_REPLIES) >= 40
    no_reply = {O.REQUEUE, O.UNKNOWN, O.LEASE_LOST}
    assert {expected for _, _, expected in REAL_REPLIES} == set(Outcome) - no_reply


@pytest.mark.parametrize(("stage", "expected"), [
    ("dot", O.UNKNOWN),  # the dot went out: the RFC 1047 window
    ("data", O.REQUEUE), ("rcpt", O.REQUEUE), ("mail", O.REQUEUE),  # lost before the dot
    ("connection", O.ACCOUNT_RETRY), ("greeting", O.ACCOUNT_RETRY), ("auth", O.ACCOUNT_RETRY),
])
def test_no_reply_depends_on_whether_the_dot_went_out(stage: str, expected: Outcome) -> None:
    assert classify(stage, None, None, "connection lost") is expected  # type: ignore[arg-type]


def test_a_positive_reply_before_the_dot_is_not_an_outcome() -> None:
    with pytest.raises(ValueError, match="250 at rcpt"):
        classify("rcpt", 250, "2.1.5", "2.1.5 OK")


@pytest.mark.parametrize(("line", "expected"), [
    ("550 5.1.1 user unknown", "5.1.1"),
    ("421 4.7.28 unusual rate", "4.7.28"),
    ("554 5.2.122 The recipient has exceeded their limit", "5.2.122"),
    ("550 Invalid recipient <someone@example.com> (#5.1.1)", "5.1.1"),  # Symantec, qmail style
    ("550 cuda_nsu 5.1.1 <someone@example.com>... User unknown", "5.1.1"),  # Barracuda
    ("451 5.7.1 wrong class for the code", None),  # the class must agree with the code
    ("550 host [5.1.1.9] said no", None),  # an IP address is no status code
    ("550 Requested action not taken: mailbox unavailable", None),
])
def test_enhanced_code_is_read_from_the_reply_text(line: str, expected: str | None) -> None:
    code, _, text = line.partition(" ")
    assert parse_enhanced(int(code), text) == expected


def test_multiline_reply_reads_as_one_line_without_repeated_codes() -> None:
    gmail = (b"5.4.5 Daily user sending limit exceeded. For more information on Gmail\n"
             b"5.4.5 sending limits go to\n5.4.5  https://support.google.com/a/answer/166852 - gsmtp")
    assert reply_text(gmail) == ("5.4.5 Daily user sending limit exceeded. For more information on Gmail "
                                 "sending limits go to https://support.google.com/a/answer/166852 - gsmtp")


def test_reply_text_cannot_smuggle_control_characters_or_run_on() -> None:
    assert reply_text(b"5.0.0 bad\x1b[31m red\x00") == "5.0.0 bad?[31m red?"
    assert len(reply_text(b"x" * 5000)) == 500


def test_send_result_reads_as_one_line() -> None:
    result = SendResult("rcpt", 550, "5.1.1", "5.1.1 user unknown", O.HARD_BOUNCE, dot_sent=False, reached_mail=True)
    assert str(result) == "hard_bounce at rcpt: 550 5.1.1 user unknown"
