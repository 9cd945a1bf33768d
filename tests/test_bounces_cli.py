"""`bulksend bounces fetch` and `bounces import` end to end: real Dovecot, real store, real CLI.

The mailbox holds what a bounce mailbox really gets: DSNs (hard 5.1.1, soft 4.2.2, a delay
warning, a 5.7.1 block), an ARF complaint, a mailto unsubscribe, a vacation reply, garbage
and a 20 MB message, each tied to a real delivery of a started campaign by tokens made with
the workspace's secret. Counts, suppressions, recorded events and what is left on the
server are checked, over IMAP (STARTTLS, TLS) and POP3 (STLS, TLS), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from bulksend import bounces, models, tokens
from tests.support import bounce_mail
from tests.support.cli import Bulksend, row_counts
from tests.support.dovecot import QUARANTINE_FOLDER, Mailbox

SECRET = "bounces-cli-test-secret-0123456789"
PEOPLE = ("ann", "bob", "cid", "dan", "eve", "fay", "gus", "hal")
ZERO = dict.fromkeys(("messages", "hard", "soft", "complaints", "unsubscribes", "ignored",
                      "quarantined", "suppressed"), 0)
HTML = '<p>Hi {{ name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>'


def address(person: str) -> str:
    return f"{person}@example.org"


def write_config(workspace: Path, store_url: str, box: Mailbox | None = None,
                 protocol: str = "imap", security: str = "tls") -> None:
    """[sender] with a mailto unsubscribe address, and [bounces] on the test Dovecot."""
    bounces = "" if box is None else (
        f'[bounces]\nprotocol = "{protocol}"\nhost = "{box.host}"\n'
        f'port = {box.port(protocol, security)}\nsecurity = "{security}"\n'  # type: ignore[arg-type]
        f'ca_file = "{box.ca_file}"\nusername = "{box.user}"\npassword_env = "BOUNCES_PASSWORD"\n'
        f'quarantine_folder = "{QUARANTINE_FOLDER}"\n')
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        'unsubscribe_url = "https://example.com/u"\nunsubscribe_mailto = "unsubscribe@example.com"\n'
        + bounces, encoding="utf-8")


@pytest.fixture
def password(mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounce mailbox's password where [bounces] password_env points."""
    monkeypatch.setenv("BOUNCES_PASSWORD", mailbox.password)


@pytest.fixture
def campaign(bulksend: Bulksend, workspace: Path, store_url: str, engine: sa.Engine,
             monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A started campaign to PEOPLE; returns their delivery ids."""
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    write_config(workspace, store_url)
    (workspace / "news.csv").write_text(
        "email\r\n" + "".join(f"{address(p)}\r\n" for p in PEOPLE), encoding="utf-8")
    (workspace / "n.html").write_text(HTML, encoding="utf-8")
    assert bulksend("import", workspace / "news.csv", "--list", "news").code == 0
    assert bulksend("campaign", "create", "c", "--list", "news", "--subject", "News",
                    "--html", workspace / "n.html").code == 0
    assert bulksend("campaign", "start", "c", "--no-dkim").code == 0
    with engine.connect() as connection:
        rows = connection.execute(sa.select(models.deliveries.c.email_key, models.deliveries.c.id))
        return {key.partition("@")[0]: delivery_id for key, delivery_id in rows}


def token(purpose: str, delivery_id: int) -> str:
    return tokens.make_token(SECRET.encode(), purpose, delivery_id)


def verp(delivery_id: int) -> str:
    return tokens.verp_address("bounces@example.com", token(tokens.BOUNCE, delivery_id))


def bounce_mailbox_content(ids: dict[str, int]) -> dict[str, bytes]:
    """One of each kind of mail, tied to the deliveries by VERP, header or mailto token."""
    return {
        "hard": bounce_mail.dsn(to=verp(ids["ann"]), recipient=address("ann"), status="5.1.1",
                                delivery_token=token(tokens.BOUNCE, ids["ann"])),
        "soft": bounce_mail.dsn(to=verp(ids["bob"]), recipient=address("bob"), status="4.2.2"),
        "delayed": bounce_mail.dsn(to=verp(ids["cid"]), recipient=address("cid"), status="4.4.7",
                                   action="delayed"),
        "block": bounce_mail.dsn(to=verp(ids["dan"]), recipient=address("dan"), status="5.7.1",
                                 diagnostic="smtp; 550 5.7.1 message rejected as spam"),
        # The feedback loop writes to its own address: only the original's header ties it.
        "complaint": bounce_mail.arf(to="fbl@example.com", recipient=address("eve"),
                                     delivery_token=token(tokens.BOUNCE, ids["eve"])),
        "unsubscribe": bounce_mail.mailto_unsubscribe(
            sender=address("fay"),
            to=tokens.verp_address("unsubscribe@example.com", token(tokens.UNSUBSCRIBE, ids["fay"]))),
        "vacation": bounce_mail.vacation(sender=address("gus"), to=verp(ids["gus"])),
        "garbage": bounce_mail.garbage(),
        "huge": bounce_mail.oversize(20),
    }


EXPECTED = {"messages": 9, "hard": 1, "soft": 1, "complaints": 1, "unsubscribes": 1,
            "ignored": 2, "quarantined": 2, "suppressed": 2}


def events(engine: sa.Engine) -> list[tuple[str, int | None, str]]:
    """(kind, delivery id, email key) of every recorded event, sorted."""
    table = models.bounce_events
    with engine.connect() as connection:
        return sorted(tuple(row) for row in connection.execute(
            sa.select(table.c.kind, table.c.delivery_id, table.c.email_key)))


def suppressed(engine: sa.Engine) -> dict[str, str]:
    table = models.suppressions
    with engine.connect() as connection:
        return {key: reason for key, reason in connection.execute(
            sa.select(table.c.email_key, table.c.reason))}


def member_status(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(models.subscribers.c.email_key, models.list_members.c.status)
            .join(models.list_members,
                  models.list_members.c.subscriber_id == models.subscribers.c.id))
        return {key: status for key, status in rows}


def check_results(engine: sa.Engine, ids: dict[str, int]) -> None:
    """Every event (the delay warning too) recorded once, tied to its delivery; hard bounce
    and complaint suppressed, the delay warning and the soft bounce not."""
    assert events(engine) == sorted([
        ("hard", ids["ann"], address("ann")), ("soft", ids["bob"], address("bob")),
        ("delayed", ids["cid"], address("cid")),
        ("block", ids["dan"], address("dan")), ("complaint", ids["eve"], address("eve")),
        ("unsubscribe", ids["fay"], address("fay")),
    ])
    assert suppressed(engine) == {address("ann"): "hard_bounce", address("eve"): "complaint"}
    statuses = member_status(engine)
    assert statuses.pop(address("fay")) == "unsubscribed"
    assert set(statuses.values()) == {"subscribed"}


MODES = [("imap", "starttls"), ("imap", "tls"), ("pop3", "starttls"), ("pop3", "tls")]


@pytest.mark.parametrize(("protocol", "security"), MODES, ids=["imap-starttls", "imap-tls",
                                                               "pop3-stls", "pop3-tls"])
def test_fetch_counts_applies_and_cleans_the_mailbox(
        bulksend: Bulksend, workspace: Path, store_url: str, engine: sa.Engine,
        mailbox: Mailbox, password: None, campaign: dict[str, int], protocol: str,
        security: str) -> None:
    write_config(workspace, store_url, mailbox, protocol, security)
    content = bounce_mailbox_content(campaign)
    for raw in content.values():
        mailbox.deliver(raw)

    result = bulksend("bounces", "fetch", "--json")
    assert result.code == 0, result.stderr
    assert result.json() == EXPECTED
    assert list(result.json()) == list(EXPECTED)  # exactly these keys, in DESIGN §9's order
    check_results(engine, campaign)
    shown = bulksend("campaign", "show", "c", "--json").json()
    assert (shown["bounced"], shown["complaints"], shown["unsubscribed"]) == (1, 1, 1)

    set_aside = sorted([content["garbage"], content["huge"]])
    if protocol == "imap":
        assert mailbox.messages() == []  # processed mail deleted
        assert sorted(mailbox.messages(QUARANTINE_FOLDER)) == set_aside
    else:
        assert sorted(mailbox.messages()) == set_aside  # POP3: kept on the server

    before = row_counts(engine)
    again = bulksend("bounces", "fetch", "--json")
    assert again.code == 0 and again.json() == ZERO
    check_results(engine, campaign)
    after = row_counts(engine)
    # POP3 forgets the UIDLs of deleted mail and remembers the two it keeps.
    assert after.pop("mailbox_seen") == (0 if protocol == "imap" else 2)
    before.pop("mailbox_seen")
    assert after == before


def test_plain_output_is_one_line_and_a_failure_names_the_mailbox(
        bulksend: Bulksend, workspace: Path, store_url: str, mailbox: Mailbox, password: None,
        campaign: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(workspace, store_url, mailbox, "imap", "starttls")
    mailbox.deliver(bounce_mailbox_content(campaign)["hard"])
    result = bulksend("bounces", "fetch")
    assert result.code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith(f"{mailbox.user}@{mailbox.host}:") and "hard 1" in result.stdout

    monkeypatch.setenv("BOUNCES_PASSWORD", "definitely-wrong-pw")
    failed = bulksend("bounces", "fetch", "--json")
    assert failed.code == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and "login failed" in failed.stderr
    assert f"{mailbox.user}@{mailbox.host}:{mailbox.port('imap', 'starttls')}" in failed.stderr
    assert "definitely-wrong-pw" not in failed.stderr

    write_config(workspace, store_url)  # no [bounces]
    missing = bulksend("bounces", "fetch")
    assert missing.code == 1 and "[bounces] is missing" in missing.stderr


def test_import_reads_maildir_mbox_and_files_and_counts_nothing_twice(
        bulksend: Bulksend, workspace: Path, engine: sa.Engine,
        campaign: dict[str, int], tmp_path: Path) -> None:
    content = bounce_mailbox_content(campaign)
    del content["huge"]
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for name in ("hard", "soft", "delayed"):
        (maildir / "new" / f"{name}.eml").write_bytes(content[name])
    mbox = tmp_path / "bounces.mbox"
    mbox.write_bytes(b"".join(b"From MAILER-DAEMON Sat Nov 28 03:00:00 2026\n"
                              + content[name].replace(b"\r\n", b"\n") + b"\n"
                              for name in ("block", "complaint", "unsubscribe")))
    singles = []
    for name in ("vacation", "garbage"):
        path = tmp_path / f"{name}.eml"
        path.write_bytes(content[name])
        singles.append(path)

    result = bulksend("bounces", "import", maildir, mbox, *singles, "--json")
    assert result.code == 0, result.stderr
    assert result.json() == {**EXPECTED, "messages": 8, "quarantined": 1}
    check_results(engine, campaign)

    before = row_counts(engine)
    again = bulksend("bounces", "import", maildir, mbox, *singles, "--json").json()
    # Read again, but no event is recorded, counted or suppressed a second time.
    assert {key: again[key] for key in ("hard", "soft", "complaints", "unsubscribes", "suppressed")} \
        == dict.fromkeys(("hard", "soft", "complaints", "unsubscribes", "suppressed"), 0)
    assert row_counts(engine) == before
    check_results(engine, campaign)


def test_import_of_a_missing_path_fails_naming_it(bulksend: Bulksend, workspace: Path,
                                                  campaign: dict[str, int], engine: sa.Engine) -> None:
    good = workspace / "one.eml"
    good.write_bytes(bounce_mailbox_content(campaign)["hard"])
    before = row_counts(engine)
    result = bulksend("bounces", "import", good, workspace / "missing.mbox")
    assert result.code == 1 and "missing.mbox: no such file or directory" in result.stderr
    assert row_counts(engine) == before  # checked before anything is processed


def test_broken_mail_never_stops_the_rest(bulksend: Bulksend, workspace: Path,
                                          campaign: dict[str, int], engine: sa.Engine) -> None:
    """Malformed MIME, an unknown charset and garbage around a real bounce: the bounce counts."""
    folder = workspace / "corpus"
    folder.mkdir()
    (folder / "1-garbage.eml").write_bytes(bounce_mail.garbage())
    (folder / "2-bad-charset.eml").write_bytes(
        b"From: x@remote.example\r\nSubject: =?x-no-such-charset?q?=FF=FE?=\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n\xff\xfe\xfd\r\n")
    (folder / "3-broken-mime.eml").write_bytes(
        b"From: MAILER-DAEMON@remote.example\r\nContent-Type: multipart/report; "
        b'report-type=delivery-status; boundary="b"\r\n\r\n--b\r\nContent-Type: '
        b"message/delivery-status\r\n\r\nStatus: 5.1.1\r\n--b\r\nContent-Type: multipart/mixed\r\n\r\n")
    (folder / "4-hard.eml").write_bytes(bounce_mailbox_content(campaign)["hard"])
    result = bulksend("bounces", "import", folder, "--json")
    assert result.code == 0, result.stderr
    counts = result.json()
    assert counts["messages"] == 4 and counts["hard"] == 1 and counts["suppressed"] == 1
    assert counts["quarantined"] >= 1  # the garbage at least; the others as the parser sees them
    assert counts["quarantined"] + counts["ignored"] + counts["hard"] + counts["soft"] == 4
    assert suppressed(engine) == {address("ann"): "hard_bounce"}
    plain = bulksend("bounces", "import", folder / "1-garbage.eml")
    assert plain.code == 0 and "1-garbage.eml: unparseable" in plain.stderr


CORPUS = Path(__file__).resolve().parent / "data" / "bounces" / "flufl"  # from ../shared/corpora


def test_import_of_the_flufl_corpus_finds_the_labelled_addresses(
        bulksend: Bulksend, workspace: Path, store_url: str, engine: sa.Engine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """All 117 real bounces through `bounces import`: ≥ 95 % of files fully found, no crash,
    nothing recorded for the five non-bounces, nobody suppressed who was not labelled."""
    labels = json.loads((CORPUS / "labels.json").read_text())
    labelled = {a.lower() for label in labels.values() for a in label["permanent"] + label["temporary"]}
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    write_config(workspace, store_url)
    (workspace / "all.csv").write_text("email\n" + "\n".join(sorted(labelled)) + "\n", encoding="utf-8")
    assert bulksend("import", workspace / "all.csv", "--list", "corpus").code == 0

    result = bulksend("bounces", "import", CORPUS, "--json")
    assert result.code == 0, result.stderr
    counts = result.json()
    assert counts["messages"] == len(labels) == 117

    table = models.bounce_events
    with engine.connect() as connection:
        recorded: dict[str, set[str]] = {}
        for key, email_key in connection.execute(sa.select(table.c.source_key, table.c.email_key)):
            recorded.setdefault(key, set()).add(email_key)
    found, quarantined = 0, 0
    for name, label in sorted(labels.items()):
        raw = (CORPUS / name).read_bytes()
        wanted = {a.lower() for a in label["permanent"] + label["temporary"]}
        try:
            report = bounces.parse(raw, secret=SECRET.encode())
        except bounces.Unparseable:
            quarantined += 1
            continue
        found += wanted <= recorded.get(bounces.source_key(raw, report), set())
        if not wanted:
            assert bounces.source_key(raw, report) not in recorded, name
    print(f"\nflufl corpus via bounces import: {found}/{len(labels)} files = "
          f"{found / len(labels):.1%} with every labelled address recorded in bounce_events "
          f"(delay warnings included); {counts}")
    assert counts["quarantined"] == quarantined
    assert found / len(labels) >= 0.95, f"{found}/{len(labels)}"
    assert set(suppressed(engine)) <= labelled


def test_a_secret_too_short_to_read_tokens_is_refused(bulksend: Bulksend, workspace: Path,
                                                      store_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise every tokened bounce would fail to tie to its delivery."""
    write_config(workspace, store_url)
    (workspace / "one.eml").write_bytes(bounce_mail.vacation(sender="a@example.org", to="b@example.com"))
    monkeypatch.setenv("BULKSEND_SECRET", "short")
    result = bulksend("bounces", "import", workspace / "one.eml")
    assert result.code == 1 and "at least 16 bytes" in result.stderr
