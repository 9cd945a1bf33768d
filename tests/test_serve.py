"""`bulksend serve` as a real process on loopback, fed with links from real sent messages.

The campaign goes through `bulksend send --once` to the test SMTP server; the unsubscribe
URLs are read from the messages in its journal, and the server answering them is a
`bulksend serve` child process on a free port (SQLite and PostgreSQL).
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from bulksend import models, tokens
from tests.support.cli import Bulksend, row_counts

SECRET = "serve-test-secret-0123456789"
HTML = '<p>Hi {{ name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>'
ONE_CLICK = b"List-Unsubscribe=One-Click"
URLENCODED = {"Content-Type": "application/x-www-form-urlencoded"}
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
FORGED = 10_000


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Reply:
    """One HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes


def fetch(connection: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
          headers: dict[str, str] | None = None) -> Reply:
    """One request on a (kept-alive) connection."""
    connection.request(method, path, body=body if body or method == "POST" else None,
                       headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


class Server:
    """A `bulksend serve` child process."""

    def __init__(self, config_path: Path, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bulksend", "--config", str(config_path), "serve"],
            stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "BULKSEND_SECRET": SECRET},
        )

    def connection(self) -> http.client.HTTPConnection:
        """A new HTTP/1.1 connection to the server."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> Reply:
        """One request on its own connection."""
        connection = self.connection()
        try:
            return fetch(connection, method, path, body, headers)
        finally:
            connection.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /healthz until it says ok; fail with the server's output if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.request("GET", "/healthz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"bulksend serve did not come up: {self.log.read_text(errors='replace')}")

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


@pytest.fixture
def setup(bulksend: Bulksend, workspace: Path, store_url: str, smtp_server: Any,
          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A workspace whose unsubscribe_url and [server] listen point at a free loopback port,
    one STARTTLS account on the test SMTP server, and a `serve` factory."""
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    monkeypatch.setenv("PW_A1", "pw-a1")
    box = smtp_server(mode="starttls", users={"a1": "pw-a1"})
    port = free_port()
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        f'unsubscribe_url = "http://127.0.0.1:{port}/u"\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[[accounts]]\nname = "a1"\nhost = "{box.host}"\nport = {box.port}\n'
        f'security = "starttls"\nca_file = "{box.ca_file}"\nusername = "a1"\n'
        'password_env = "PW_A1"\n', encoding="utf-8")
    servers: list[Server] = []

    def serve() -> Server:
        server = Server(workspace / "bulksend.toml", port, tmp_path / f"serve-{len(servers)}.log")
        servers.append(server)
        server.wait_ready()
        return server

    yield {"box": box, "serve": serve, "port": port}
    for server in servers:
        assert server.stop() == 0, server.log.read_text(errors="replace")


def campaign(bulksend: Bulksend, workspace: Path, names: tuple[str, ...], recipients: int) -> None:
    """Import u0..u{n-1}@example.org into list "news", create and start the campaigns."""
    rows = "".join(f"u{i}@example.org\r\n" for i in range(recipients))
    (workspace / "l.csv").write_text("email\r\n" + rows, encoding="utf-8")
    (workspace / "n.html").write_text(HTML, encoding="utf-8")
    assert bulksend("import", workspace / "l.csv", "--list", "news").code == 0
    for name in names:
        assert bulksend("campaign", "create", name, "--list", "news", "--subject", "Hi",
                        "--html", workspace / "n.html").code == 0
        assert bulksend("campaign", "start", name, "--no-dkim").code == 0


def unsubscribe_links(box: Any) -> dict[str, list[str]]:
    """Recipient → the http(s) List-Unsubscribe URL of each message delivered to it."""
    links: dict[str, list[str]] = {}
    for transaction in box.delivered():
        head = re.sub(rb"\r\n[ \t]+", b" ", transaction.data.split(b"\r\n\r\n", 1)[0])
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n"))
        assert fields[b"List-Unsubscribe-Post"] == ONE_CLICK
        url = re.search(rb"<(https?://[^>]+)>", fields[b"List-Unsubscribe"])
        assert url is not None
        links.setdefault(transaction.rcpt_to[0], []).append(url.group(1).decode())
    return links


def memberships(engine: sa.Engine) -> dict[str, str]:
    """Address → its membership status on list "news"."""
    with engine.connect() as connection:
        return dict(connection.execute(
            sa.select(models.subscribers.c.email_key, models.list_members.c.status)
            .join(models.list_members,
                  models.list_members.c.subscriber_id == models.subscribers.c.id)).all())


def multipart(fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body as a browser or mail client sends it."""
    boundary = "----bulksendServeTest0123"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_one_click_from_a_sent_message_unsubscribes_and_get_changes_nothing(
        bulksend: Bulksend, workspace: Path, setup: dict[str, Any], engine: sa.Engine) -> None:
    campaign(bulksend, workspace, ("c",), 3)
    assert bulksend("send", "--once").code == 0
    links = unsubscribe_links(setup["box"])
    assert sorted(links) == ["u0@example.org", "u1@example.org", "u2@example.org"]
    server = setup["serve"]()
    path = {email: urlsplit(found[0]).path for email, found in links.items()}
    assert all(urlsplit(found[0]).port == setup["port"] for found in links.values())

    before = row_counts(engine)
    page = server.request("GET", path["u0@example.org"], headers={"Accept-Language": "ru"})
    assert page.status == 200 and "Отписаться" in page.body.decode()
    assert server.request("HEAD", path["u0@example.org"]).body == b""
    assert row_counts(engine) == before  # GET changes nothing (bounce_events included)
    too_big = server.request("POST", path["u0@example.org"], b"x" * 70_000, URLENCODED)
    assert too_big.status == 413 and row_counts(engine) == before

    urlencoded = server.request("POST", path["u0@example.org"], ONE_CLICK, URLENCODED)
    body, headers = multipart({"List-Unsubscribe": "One-Click"})
    multi = server.request("POST", path["u1@example.org"], body, headers)
    for reply in (urlencoded, multi):
        assert reply.status == 200 and b"You are unsubscribed" in reply.body
        assert "set-cookie" not in reply.headers and "location" not in reply.headers
        assert reply.headers["content-security-policy"].startswith("default-src 'none'")
    assert memberships(engine) == {"u0@example.org": "unsubscribed",
                                   "u1@example.org": "unsubscribed",
                                   "u2@example.org": "subscribed"}
    shown = bulksend("campaign", "show", "c", "--json").json()
    assert shown["unsubscribed"] == 2 and shown["sent"] == 3
    assert server.request("GET", "/healthz").body == b"ok\n"


def altered(token: str, rng: random.Random) -> str:
    """The token with one character replaced by a different one of its alphabet."""
    index = rng.randrange(len(token))
    replacement = rng.choice([c for c in ALPHABET if c != token[index]])
    return token[:index] + replacement + token[index + 1:]


def forgeries(real: list[str], count: int, rng: random.Random) -> list[str]:
    """Altered, truncated, extended, random and unknown-delivery tokens, `count` in all."""
    secret = SECRET.encode()
    makers = [
        lambda: altered(rng.choice(real), rng),
        lambda: rng.choice(real)[:-rng.randint(1, 5)],
        lambda: rng.choice(real) + rng.choice(ALPHABET),
        lambda: "".join(rng.choice(ALPHABET) for _ in range(rng.randint(21, 34))),
        lambda: tokens.make_token(secret, tokens.UNSUBSCRIBE, rng.randint(10_000, 10**12)),
        lambda: tokens.make_token(b"someone-else's-secret-0123", tokens.UNSUBSCRIBE,
                                  rng.randint(1, 3)),
        lambda: tokens.make_token(secret, tokens.BOUNCE, rng.randint(1, 3)),
    ]
    return [makers[i % len(makers)]() for i in range(count)]


def test_ten_thousand_forged_or_altered_tokens_get_404_and_change_nothing(
        bulksend: Bulksend, workspace: Path, setup: dict[str, Any], engine: sa.Engine) -> None:
    campaign(bulksend, workspace, ("c",), 3)
    assert bulksend("send", "--once").code == 0
    real = [urlsplit(found[0]).path.removeprefix("/u/")
            for found in unsubscribe_links(setup["box"]).values()]
    server = setup["serve"]()
    fakes = forgeries(real, FORGED, random.Random(5))
    assert not set(fakes) & set(real)
    before = row_counts(engine)
    replies: list[list[tuple[int, tuple[tuple[str, str], ...], bytes]]] = [[] for _ in range(4)]

    def worker(index: int) -> None:
        connection = server.connection()  # keep-alive: one connection per thread
        try:
            for n, token in enumerate(fakes[index::4]):
                method = ("GET", "POST", "HEAD")[n % 3]
                reply = fetch(connection, method, f"/u/{token}",
                              ONE_CLICK if method == "POST" else b"",
                              URLENCODED if method == "POST" else None)
                same = tuple(sorted((k, v) for k, v in reply.headers.items() if k != "date"))
                replies[index].append((reply.status, same, reply.body if method != "HEAD" else b""))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers = [answer for chunk in replies for answer in chunk]
    assert len(answers) == FORGED
    assert {status for status, _, _ in answers} == {404}
    assert len({headers for _, headers, _ in answers}) == 1  # identical headers
    assert len({body for _, _, body in answers if body}) == 1  # and one body
    assert row_counts(engine) == before
    assert set(memberships(engine).values()) == {"subscribed"}
    # The real links still work afterwards.
    assert server.request("GET", f"/u/{real[0]}").status == 200


def test_an_address_unsubscribed_while_its_campaign_is_sending_gets_nothing_more(
        bulksend: Bulksend, workspace: Path, setup: dict[str, Any], engine: sa.Engine) -> None:
    # c1 and c2 both go to the list; c1 is sent first, c2 is queued and running meanwhile.
    campaign(bulksend, workspace, ("c1", "c2"), 4)
    assert bulksend("send", "--once", "--campaign", "c1").code == 0
    box = setup["box"]
    links = unsubscribe_links(box)
    assert len(box.delivered()) == 4
    server = setup["serve"]()
    with engine.begin() as connection:  # u1's c2 message: claimed by a worker that then died
        c2 = connection.execute(sa.select(models.campaigns.c.id)
                                .where(models.campaigns.c.name == "c2")).scalar_one()
        connection.execute(
            sa.update(models.deliveries)
            .where(models.deliveries.c.campaign_id == c2,
                   models.deliveries.c.email_key == "u1@example.org")
            .values(state="claimed", account="a1", lease_owner="gone", lease_token="t" * 32,
                    lease_expires_at=time.time() - 1))
    for email in ("u0@example.org", "u1@example.org"):
        reply = server.request("POST", urlsplit(links[email][0]).path, ONE_CLICK, URLENCODED)
        assert reply.status == 200
    with engine.connect() as connection:
        pending = dict(connection.execute(
            sa.select(models.deliveries.c.email_key, models.deliveries.c.state)
            .where(models.deliveries.c.campaign_id == c2)).all())
    assert pending == {"u0@example.org": "suppressed", "u1@example.org": "suppressed",
                       "u2@example.org": "queued", "u3@example.org": "queued"}
    assert bulksend("send", "--once").code == 0
    assert [box.delivered_to(f"u{i}@example.org") for i in range(4)] == [1, 1, 2, 2]
    shown = bulksend("campaign", "show", "c2", "--json").json()
    assert (shown["status"], shown["sent"], shown["suppressed"]) == ("finished", 2, 2)


def test_serve_refuses_a_bad_listen_address_a_missing_secret_and_a_taken_port(
        bulksend: Bulksend, workspace: Path, store_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        'unsubscribe_url = "https://example.com/u"\n', encoding="utf-8")
    monkeypatch.delenv("BULKSEND_SECRET", raising=False)
    assert bulksend("serve", "--listen", "nowhere").code == 2
    missing = bulksend("serve")
    assert missing.code == 1 and "BULKSEND_SECRET is not set" in missing.stderr
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = bulksend("serve", "--listen", f"127.0.0.1:{port}")
    assert busy.code == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
