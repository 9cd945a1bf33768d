"""The unsubscribe app (`bulksend.web`) called as WSGI, against a real store on both backends."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from bulksend import config, models, tokens, web
from bulksend.errors import ConfigError
from tests.support.cli import Bulksend, row_counts

SECRET = "web-test-secret-0123456789"
HTML = '<p>Hi {{ name }}</p><a href="{{ unsubscribe_url }}">unsubscribe</a>'
ONE_CLICK = b"List-Unsubscribe=One-Click"
BOUNDARY = "----bulksendtest7MA4YWxkTrZu0gW"


def multipart(fields: Mapping[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) and its Content-Type."""
    body = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()) + f"--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


class Reply:
    """What the app answered."""

    def __init__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.code = int(status.split()[0])
        self.status = status
        self.header_list = headers
        self.headers = {name.lower(): value for name, value in headers}
        self.body = body
        self.text = body.decode("utf-8")


def call(app: web.UnsubscribeApp, method: str, path: str, body: bytes = b"",
         content_type: str = "", **headers: str) -> Reply:
    """One request through the WSGI interface."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8025", "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http",
        "CONTENT_LENGTH": str(len(body)) if body else "", "CONTENT_TYPE": content_type,
        **{f"HTTP_{name.upper()}": value for name, value in headers.items()},
    }
    answer: dict[str, Any] = {}

    def start_response(status: str, header_list: list[tuple[str, str]]) -> None:
        answer.update(status=status, headers=header_list)

    data = b"".join(app(environ, start_response))
    return Reply(answer["status"], answer["headers"], data)


@pytest.fixture
def sent(bulksend: Bulksend, workspace: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
         ) -> dict[str, int]:
    """Campaign "c" on lists news and promo, queued; returns delivery id per address.

    a0@example.org is on both lists, a1 and a2 only on news, b0@example.org only on promo.
    """
    monkeypatch.setenv("BULKSEND_SECRET", SECRET)
    (workspace / "bulksend.toml").write_text(
        f'database = "{store_url}"\n[sender]\nfrom = "News <news@example.com>"\n'
        'list_id = "news.example.com"\nreturn_path = "bounces@example.com"\n'
        'unsubscribe_url = "https://example.com/u"\n', encoding="utf-8")
    (workspace / "news.csv").write_text("email\r\na0@example.org\r\na1@example.org\r\n"
                                        "a2@example.org\r\n", encoding="utf-8")
    (workspace / "promo.csv").write_text("email\r\na0@example.org\r\nb0@example.org\r\n",
                                         encoding="utf-8")
    (workspace / "n.html").write_text(HTML, encoding="utf-8")
    assert bulksend("import", workspace / "news.csv", "--list", "news").code == 0
    assert bulksend("import", workspace / "promo.csv", "--list", "promo").code == 0
    assert bulksend("campaign", "create", "c", "--list", "news", "--list", "promo",
                    "--subject", "Hi", "--html", workspace / "n.html").code == 0
    assert bulksend("campaign", "start", "c", "--no-dkim").code == 0
    engine = sa.create_engine(store_url)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(models.deliveries.c.email_key, models.deliveries.c.id))
        ids = {email: delivery_id for email, delivery_id in rows}
    engine.dispose()
    return ids


@pytest.fixture
def app(engine: sa.Engine) -> web.UnsubscribeApp:
    """The app on the test store, with a fixed clock."""
    return web.UnsubscribeApp(engine, SECRET.encode(), clock=lambda: 1_800_000_000.0)


def url(delivery_id: int) -> str:
    """The path of a delivery's unsubscribe link."""
    return f"/u/{tokens.make_token(SECRET.encode(), tokens.UNSUBSCRIBE, delivery_id)}"


def memberships(engine: sa.Engine, email_key: str) -> dict[str, str]:
    """List name → membership status of one address."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(models.lists.c.name, models.list_members.c.status)
            .join(models.list_members, models.list_members.c.list_id == models.lists.c.id)
            .join(models.subscribers,
                  models.subscribers.c.id == models.list_members.c.subscriber_id)
            .where(models.subscribers.c.email_key == email_key))
        return dict(rows.all())


def suppressed(engine: sa.Engine) -> set[str]:
    """Addresses on the suppression list."""
    with engine.connect() as connection:
        return set(connection.execute(sa.select(models.suppressions.c.email_key)).scalars())


def unsubscribe_events(engine: sa.Engine) -> list[tuple[str, str, int | None]]:
    """(email_key, source, delivery_id) of every unsubscribe event."""
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(
            sa.select(models.bounce_events.c.email_key, models.bounce_events.c.source,
                      models.bounce_events.c.delivery_id)
            .where(models.bounce_events.c.kind == "unsubscribe"))]


def assert_secure(reply: Reply) -> None:
    headers = reply.headers
    assert headers["content-security-policy"].startswith("default-src 'none'")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert "set-cookie" not in headers and "location" not in headers


# --- GET / HEAD --------------------------------------------------------------------------


def test_get_shows_the_page_and_changes_nothing(app: web.UnsubscribeApp, engine: sa.Engine,
                                                sent: dict[str, int]) -> None:
    before = row_counts(engine)
    reply = call(app, "GET", url(sent["a0@example.org"]))
    assert reply.code == 200 and reply.headers["content-type"] == "text/html; charset=utf-8"
    assert_secure(reply)
    assert "Unsubscribe from these emails?" in reply.text and 'lang="en"' in reply.text
    assert "a***@example.org" in reply.text and "a0@example.org" not in reply.text
    assert "news, promo" in reply.text  # a0 is on both of the campaign's lists
    token = url(sent["a0@example.org"]).removeprefix("/u/")
    assert f'action="{token}"' in reply.text  # relative: works behind any path prefix
    assert 'name="List-Unsubscribe" value="One-Click"' in reply.text
    assert row_counts(engine) == before
    assert memberships(engine, "a0@example.org") == {"news": "subscribed", "promo": "subscribed"}


def test_page_names_only_the_lists_the_address_is_on(app: web.UnsubscribeApp,
                                                     sent: dict[str, int]) -> None:
    reply = call(app, "GET", url(sent["b0@example.org"]))
    assert reply.code == 200 and "promo" in reply.text and "news" not in reply.text


def test_page_speaks_russian_to_a_russian_browser(app: web.UnsubscribeApp,
                                                  sent: dict[str, int]) -> None:
    reply = call(app, "GET", url(sent["a1@example.org"]),
                 ACCEPT_LANGUAGE="ru-RU,ru;q=0.9,en-US;q=0.8,en;q=0.7")
    assert reply.code == 200 and 'lang="ru"' in reply.text and "Отписаться" in reply.text
    assert reply.headers["content-language"] == "ru" and reply.headers["vary"] == "Accept-Language"
    english = call(app, "GET", url(sent["a1@example.org"]), ACCEPT_LANGUAGE="de-DE, en;q=0.5")
    assert 'lang="en"' in english.text and "Отписаться" not in english.text


def test_head_has_the_headers_of_get_and_no_body(app: web.UnsubscribeApp, engine: sa.Engine,
                                                 sent: dict[str, int]) -> None:
    before = row_counts(engine)
    get = call(app, "GET", url(sent["a1@example.org"]))
    head = call(app, "HEAD", url(sent["a1@example.org"]))
    assert head.code == 200 and head.body == b"" and head.header_list == get.header_list
    assert int(head.headers["content-length"]) == len(get.body)
    assert row_counts(engine) == before


# --- POST ---------------------------------------------------------------------------------


def test_one_click_urlencoded_leaves_the_campaign_lists(app: web.UnsubscribeApp,
                                                        engine: sa.Engine,
                                                        sent: dict[str, int]) -> None:
    reply = call(app, "POST", url(sent["a0@example.org"]), ONE_CLICK,
                 "application/x-www-form-urlencoded")
    assert reply.code == 200 and "You are unsubscribed" in reply.text
    assert_secure(reply)
    assert memberships(engine, "a0@example.org") == {"news": "unsubscribed",
                                                     "promo": "unsubscribed"}
    assert memberships(engine, "a1@example.org") == {"news": "subscribed"}
    assert suppressed(engine) == set()  # scope "lists": no global suppression
    assert unsubscribe_events(engine) == [("a0@example.org", "web", sent["a0@example.org"])]


def test_one_click_multipart_leaves_the_campaign_lists(app: web.UnsubscribeApp,
                                                       engine: sa.Engine,
                                                       sent: dict[str, int]) -> None:
    body, content_type = multipart({"List-Unsubscribe": "One-Click"})
    reply = call(app, "POST", url(sent["a1@example.org"]), body, content_type)
    assert reply.code == 200 and "You are unsubscribed" in reply.text
    assert memberships(engine, "a1@example.org") == {"news": "unsubscribed"}
    assert memberships(engine, "a2@example.org") == {"news": "subscribed"}


def test_form_scope_all_suppresses_the_address(app: web.UnsubscribeApp, engine: sa.Engine,
                                               sent: dict[str, int]) -> None:
    body, content_type = multipart({"List-Unsubscribe": "One-Click", "scope": "all"})
    reply = call(app, "POST", url(sent["b0@example.org"]), body, content_type,
                 ACCEPT_LANGUAGE="ru")
    assert reply.code == 200 and "никаких наших писем" in reply.text
    assert "b0@example.org" in suppressed(engine)
    assert memberships(engine, "b0@example.org") == {"promo": "unsubscribed"}


def test_unsubscribe_suppresses_the_address_s_pending_delivery(app: web.UnsubscribeApp,
                                                               engine: sa.Engine,
                                                               sent: dict[str, int]) -> None:
    reply = call(app, "POST", url(sent["a2@example.org"]),
                 b"List-Unsubscribe=One-Click&scope=lists", "application/x-www-form-urlencoded")
    assert reply.code == 200
    with engine.connect() as connection:
        states = dict(connection.execute(
            sa.select(models.deliveries.c.email_key, models.deliveries.c.state)).all())
    assert states["a2@example.org"] == "suppressed"
    assert {states[k] for k in states if k != "a2@example.org"} == {"queued"}


def test_a_second_post_answers_the_same_and_records_nothing_more(app: web.UnsubscribeApp,
                                                                 engine: sa.Engine,
                                                                 sent: dict[str, int]) -> None:
    path = url(sent["a1@example.org"])
    first = call(app, "POST", path, ONE_CLICK, "application/x-www-form-urlencoded")
    counts = row_counts(engine)
    second = call(app, "POST", path, ONE_CLICK, "application/x-www-form-urlencoded")
    assert first.code == second.code == 200 and first.body == second.body
    assert row_counts(engine) == counts
    assert len(unsubscribe_events(engine)) == 1


@pytest.mark.parametrize("body, content_type, code", [
    (b"x" * (web.MAX_BODY + 1), "application/x-www-form-urlencoded", 413),
    (b"List-Unsubscribe=One-Click", "text/plain", 415),
    (b"List-Unsubscribe=One-Click&scope=everything", "application/x-www-form-urlencoded", 400),
    (b"scope=\xff", "application/x-www-form-urlencoded", 400),
    (b"a=1&" * 50, "application/x-www-form-urlencoded", 400),
    (b"no parts here", "multipart/form-data; boundary=zz", 400),
])
def test_unfit_bodies_are_refused_and_change_nothing(app: web.UnsubscribeApp, engine: sa.Engine,
                                                     sent: dict[str, int], body: bytes,
                                                     content_type: str, code: int) -> None:
    before = row_counts(engine)
    reply = call(app, "POST", url(sent["a0@example.org"]), body, content_type)
    assert reply.code == code
    assert_secure(reply)
    assert row_counts(engine) == before


# --- tokens that name nothing -------------------------------------------------------------


def test_forged_altered_unknown_and_deleted_tokens_get_one_identical_404(
        app: web.UnsubscribeApp, engine: sa.Engine, sent: dict[str, int]) -> None:
    good = url(sent["a0@example.org"]).removeprefix("/u/")
    flipped = good[:-1] + ("a" if good[-1] != "a" else "b")
    other_secret = tokens.make_token(b"another-secret-0123456789", tokens.UNSUBSCRIBE,
                                     sent["a0@example.org"])
    bounce_token = tokens.make_token(SECRET.encode(), tokens.BOUNCE, sent["a0@example.org"])
    unknown = tokens.make_token(SECRET.encode(), tokens.UNSUBSCRIBE, 10**9)
    with engine.begin() as connection:  # a delivery that no longer exists
        connection.execute(sa.delete(models.deliveries)
                           .where(models.deliveries.c.id == sent["a2@example.org"]))
    deleted = url(sent["a2@example.org"]).removeprefix("/u/")
    paths = [f"/u/{t}" for t in (flipped, good[:-1], good + "a", other_secret, bounce_token,
                                 unknown, deleted, "x", "%00", good.upper() + "!", "a" * 5000)]
    paths += ["/u/", "/u", "/", "/favicon.ico", f"/u/{good}/", f"/x/{good}"]
    before = row_counts(engine)
    replies = [call(app, method, path, ONE_CLICK if method == "POST" else b"",
                    "application/x-www-form-urlencoded" if method == "POST" else "")
               for path in paths for method in ("GET", "POST")]
    assert {r.code for r in replies} == {404}
    assert len({(r.status, tuple(r.header_list), r.body) for r in replies}) == 1
    assert_secure(replies[0])
    assert row_counts(engine) == before
    assert unsubscribe_events(engine) == []


def test_token_reads_case_insensitively_like_read_token(app: web.UnsubscribeApp,
                                                        sent: dict[str, int]) -> None:
    reply = call(app, "GET", url(sent["a1@example.org"]).upper().replace("/U/", "/u/"))
    assert reply.code == 200


# --- methods, health, config --------------------------------------------------------------


def test_other_methods_get_405(app: web.UnsubscribeApp, engine: sa.Engine,
                               sent: dict[str, int]) -> None:
    before = row_counts(engine)
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        reply = call(app, method, url(sent["a0@example.org"]), ONE_CLICK,
                     "application/x-www-form-urlencoded")
        assert reply.code == 405 and reply.headers["allow"] == "GET, HEAD, POST"
    assert call(app, "POST", "/healthz").headers["allow"] == "GET, HEAD"
    assert row_counts(engine) == before


def test_healthz_says_ok_when_the_store_answers(app: web.UnsubscribeApp) -> None:
    reply = call(app, "GET", "/healthz")
    assert (reply.code, reply.text) == (200, "ok\n")
    assert call(app, "HEAD", "/healthz").body == b""


def test_healthz_says_503_when_the_store_does_not_answer(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    reply = call(web.UnsubscribeApp(engine, SECRET.encode()), "GET", "/healthz")
    assert reply.code == 503
    engine.dispose()


def test_a_store_that_fails_mid_request_gives_503_not_a_page(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    app = web.UnsubscribeApp(engine, SECRET.encode())
    reply = call(app, "GET", url(1))
    assert reply.code == 503 and reply.headers["retry-after"]
    engine.dispose()


def test_the_unsubscribe_url_path_is_served_too(engine: sa.Engine, sent: dict[str, int]) -> None:
    settings = config.parse_config(
        'database = "sqlite:///x.db"\n[sender]\nfrom = "n@example.com"\nlist_id = "l.example.com"\n'
        'return_path = "b@example.com"\nunsubscribe_url = "https://example.com/news/unsubscribe"\n',
        Path("bulksend.toml"))
    app = web.UnsubscribeApp(engine, SECRET.encode(), prefixes=web.prefixes(settings))
    token = url(sent["a0@example.org"]).removeprefix("/u/")
    assert call(app, "GET", f"/news/unsubscribe/{token}").code == 200
    assert call(app, "GET", f"/u/{token}").code == 200
    assert call(app, "GET", f"/{token}").code == 404
    at_root = config.parse_config(
        'database = "sqlite:///x.db"\n[sender]\nfrom = "n@example.com"\nlist_id = "l.example.com"\n'
        'return_path = "b@example.com"\nunsubscribe_url = "https://u.example.com/"\n',
        Path("bulksend.toml"))
    app = web.UnsubscribeApp(engine, SECRET.encode(), prefixes=web.prefixes(at_root))
    assert call(app, "GET", f"/{token}").code == 200
    assert call(app, "GET", f"/u/{token}").code == 200
    assert call(app, "GET", f"/u/{token}/x").code == 404
    assert call(app, "GET", "/healthz").code == 200


def test_read_secret_needs_sender_and_a_long_enough_secret() -> None:
    base = 'database = "sqlite:///x.db"\n'
    sender = ('[sender]\nfrom = "n@example.com"\nlist_id = "l.example.com"\n'
              'return_path = "b@example.com"\nunsubscribe_url = "https://example.com/u"\n'
              'secret_env = "MY_SECRET"\n')
    with pytest.raises(ConfigError, match=r"\[sender\] is missing"):
        web.read_secret(config.parse_config(base, Path("b.toml")), {})
    settings = config.parse_config(base + sender, Path("b.toml"))
    with pytest.raises(ConfigError, match="MY_SECRET is not set"):
        web.read_secret(settings, {})
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        web.read_secret(settings, {"MY_SECRET": "short"})
    assert web.read_secret(settings, {"MY_SECRET": SECRET}) == SECRET.encode()


@pytest.mark.parametrize("header, language", [
    ("", "en"), ("ru", "ru"), ("ru-RU,ru;q=0.9,en;q=0.8", "ru"), ("en-GB,en;q=0.9,ru;q=0.8", "en"),
    ("de, ru;q=0.5", "ru"), ("de, fr", "en"), ("ru;q=0.2, en;q=0.3", "en"), ("RU", "ru"),
    ("ru;q=oops, en", "en"), ("*", "en"),
])
def test_preferred_language(header: str, language: str) -> None:
    assert web.preferred_language(header) == language


@pytest.mark.parametrize("email, shown", [
    ("john@example.com", "j***n@example.com"), ("ann@example.com", "a***@example.com"),
    ("x@example.com", "x***@example.com"), ("иван@пример.рф", "и***н@пример.рф"),
])
def test_mask_address(email: str, shown: str) -> None:
    assert web.mask_address(email) == shown


def test_list_names_are_escaped_in_the_page(app: web.UnsubscribeApp, engine: sa.Engine,
                                            sent: dict[str, int]) -> None:
    with engine.begin() as connection:
        connection.execute(sa.update(models.lists).where(models.lists.c.name == "promo")
                           .values(name='<script>alert("x")</script>'))
    for method, body in (("GET", b""), ("POST", ONE_CLICK)):
        reply = call(app, method, url(sent["b0@example.org"]), body,
                     "application/x-www-form-urlencoded" if body else "")
        assert reply.code == 200 and "<script>" not in reply.text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in reply.text
