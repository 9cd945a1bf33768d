"""`bulksend serve`: the unsubscribe pages, a plain WSGI app on waitress (DESIGN §8).

Routes (the token is the UNSUBSCRIBE token of one delivery, see `tokens`)::

    GET|HEAD /u/TOKEN   the page (templates/unsubscribe.html) with the confirm buttons;
                        changes nothing: mail scanners follow links
    POST     /u/TOKEN   the form (scope=lists|all) or the RFC 8058 one-click body
                        `List-Unsubscribe=One-Click` (urlencoded or multipart) → the
                        unsubscribe is committed, then 200 and templates/unsubscribed.html;
                        no redirect (RFC 8058 §3.1), no cookie
    GET|HEAD /healthz   200 "ok" when the database answers, 503 otherwise

The route also answers under the path of `[sender] unsubscribe_url` when that is not /u, so
a proxy may pass the public path through unchanged.

A forged, altered or unknown token, and a token whose delivery no longer exists, all get the
same 404 (same bytes, same headers). `tokens.read_token` compares MACs in constant time, and
the not-found path does the same work as the found one: a token that does not read still
looks up a delivery id that never exists, so timing tells a caller nothing it did not know
from the token's public format.

The page shows the address masked (`j***n@example.com`): the link travels in mail that may be
forwarded, logged or previewed, and whoever holds it should not learn the full address; the
domain and the first and last letters are enough for its owner to recognise it. The language
is the visitor's (Accept-Language: English or Russian, English otherwise).
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from importlib.resources import files
from typing import Any

import jinja2
import markupsafe
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bulksend import config, db, store_web, suppression, tokens
from bulksend.errors import BulksendError, ConfigError
from bulksend.group_commit import GroupCommit

__all__ = ["LANGUAGES", "MAX_BODY", "UnsubscribeApp", "mask_address", "preferred_language",
           "read_secret", "serve"]

LANGUAGES = ("en", "ru")  # the first is the default
MAX_BODY = 64 * 1024  # bytes of a POST body; a one-click body is 26
MAX_FIELDS = 20  # form fields of a POST body
SCOPES = ("lists", "all")
THREADS = 8  # waitress workers: concurrent POSTs share a commit, so a few more than cores
NOT_A_DELIVERY = -1  # ids start at 1: the lookup a token that does not read makes finds nothing
CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)
NOT_FOUND_PAGE = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="robots" content="noindex, nofollow">\n<title>Not found</title>\n</head>\n'
    "<body>\n<h1>This link is not valid</h1>\n"
    "<p>Please use the unsubscribe link from the latest email you received.</p>\n"
    '<p lang="ru">Ссылка недействительна. Воспользуйтесь ссылкой для отписки из последнего '
    "письма.</p>\n</body>\n</html>\n"
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Response:
    """A complete response: status line, headers (Content-Length included) and body."""

    status: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _response(status: str, body: bytes, content_type: str,
              extra: tuple[tuple[str, str], ...] = ()) -> Response:
    headers = (("Content-Type", content_type), ("Content-Length", str(len(body))),
               *SECURITY_HEADERS, *extra)
    return Response(status, headers, body)


def _text(status: str, text: str, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    return _response(status, text.encode("utf-8") + b"\n", "text/plain; charset=utf-8", extra)


def _not_allowed(allow: str) -> Response:
    return _text("405 Method Not Allowed", "method not allowed", (("Allow", allow),))


NOT_FOUND = _response("404 Not Found", NOT_FOUND_PAGE.encode("utf-8"), "text/html; charset=utf-8")


class Page:
    """A page template rendered once per variant; a request only fills in its slots.

    Rendering the whole page for each POST costs about as much as its SQL. A variant (the
    fixed arguments, e.g. the language, and which slots are empty: what the template's
    `if`s can see) is rendered once with a marker in each slot; a request then joins the
    constant pieces with its slot values, escaped as autoescape escapes them. The first
    request of a variant is also rendered in full and compared: a template that does more
    with a slot than print it is rendered in full every time.
    """

    _MARKER = re.compile(r"\x00(\w+)\x00")  # no template text holds a NUL; escaping keeps it

    def __init__(self, template: jinja2.Template) -> None:
        self.template = template
        self._pieces: dict[tuple[Any, ...], list[str] | None] = {}

    def render(self, fixed: Mapping[str, Any], slots: Mapping[str, str]) -> str:
        """What `template.render(**fixed, **slots)` returns."""
        key = (*fixed.items(), *((name, bool(value)) for name, value in slots.items()))
        if key in self._pieces:
            pieces = self._pieces[key]
            return self.template.render(**fixed, **slots) if pieces is None \
                else self._fill(pieces, slots)
        marked = {name: f"\x00{name}\x00" if value else "" for name, value in slots.items()}
        pieces = self._MARKER.split(self.template.render(**fixed, **marked))
        html = self.template.render(**fixed, **slots)
        fits = set(pieces[1::2]) <= set(slots) and self._fill(pieces, slots) == html
        self._pieces[key] = pieces if fits else None
        return html

    @staticmethod
    def _fill(pieces: list[str], slots: Mapping[str, str]) -> str:
        # pieces: text, slot name, text, ..., text (what re.split gives with one group)
        values = {name: str(markupsafe.escape(value)) for name, value in slots.items()}
        return "".join(piece if i % 2 == 0 else values[piece] for i, piece in enumerate(pieces))


class BadRequest(Exception):
    """A POST body this app refuses; carries the response to send."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class UnsubscribeApp:
    """The WSGI application behind `bulksend serve`."""

    def __init__(self, engine: Engine, secret: bytes, *, clock: Callable[[], float] = time.time,
                 prefixes: Iterable[str] = ("/u",)) -> None:
        if len(secret) < tokens.MIN_SECRET_BYTES:
            raise ConfigError(f"the token secret must be at least {tokens.MIN_SECRET_BYTES} bytes")
        self.engine = engine
        self.secret = secret
        self.clock = clock
        self.prefixes = tuple(dict.fromkeys(p.rstrip("/") + "/" for p in prefixes))
        self.commits = GroupCommit(engine)  # concurrent unsubscribes share one commit
        environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
        templates = files("bulksend.templates")
        self.page, self.done = (
            Page(environment.from_string(templates.joinpath(name).read_text(encoding="utf-8")))
            for name in ("unsubscribe.html", "unsubscribed.html")
        )

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> list[bytes]:
        """WSGI entry point; HEAD gets GET's headers and no body."""
        response = self.respond(environ)
        start_response(response.status, list(response.headers))
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]

    def respond(self, environ: Mapping[str, Any]) -> Response:
        """The response to one request."""
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            return self.health()
        token = self._token_in(path)
        if token is None:
            return NOT_FOUND
        try:
            if method in ("GET", "HEAD"):
                return self.show(token, preferred_language(environ.get("HTTP_ACCEPT_LANGUAGE", "")))
            if method == "POST":
                return self.unsubscribe(token, environ)
        except BulksendError as exc:  # the database is down or locked for too long
            log.warning("bulksend serve: %s", exc)
            return _text("503 Service Unavailable", "temporarily unavailable, please retry",
                         (("Retry-After", "30"),))
        return _not_allowed("GET, HEAD, POST")

    def health(self) -> Response:
        """200 "ok" if the database answers, else 503."""
        try:
            with db.reading(self.engine) as connection:
                store_web.ping(connection)
        except (BulksendError, sa.exc.SQLAlchemyError) as exc:
            log.warning("bulksend serve: health check: %s", exc)
            return _text("503 Service Unavailable", "database unavailable")
        return _text("200 OK", "ok")

    def show(self, token: str, language: str) -> Response:
        """The confirmation page of the delivery `token` names (GET: reads only)."""
        with db.reading(self.engine) as connection:
            view = store_web.page_view(connection, self._delivery_id(token))
        if view is None:
            return NOT_FOUND
        html = self.page.render({"lang": language}, {
            "email": mask_address(view.email), "list_names": ", ".join(view.list_names),
            "action_url": token})
        return self._html(html, language)

    def unsubscribe(self, token: str, environ: Mapping[str, Any]) -> Response:
        """Commit the unsubscribe the POST asks for, then the done page."""
        try:
            scope = _scope(read_form(environ))
        except BadRequest as exc:
            return exc.response
        delivery_id = self._delivery_id(token)

        def work(connection: Connection) -> store_web.PageView | None:
            # Every token, read or not, looks up a delivery in the shared write transaction.
            view = store_web.page_view(connection, delivery_id)
            if view is not None:
                suppression.unsubscribe_delivery(connection, view.delivery, scope=scope,
                                                 source="web", now=self.clock(),
                                                 source_key=f"web:{delivery_id}:{scope}")
            return view

        view = self.commits.run(work)
        if view is None:
            return NOT_FOUND
        language = preferred_language(environ.get("HTTP_ACCEPT_LANGUAGE", ""))
        html = self.done.render({"lang": language, "everything": scope == "all"}, {
            "email": mask_address(view.email), "list_names": ", ".join(view.list_names)})
        return self._html(html, language)

    def _token_in(self, path: str) -> str | None:
        for prefix in self.prefixes:
            if path.startswith(prefix):
                token = path[len(prefix):]
                return token if token and "/" not in token else None
        return None

    def _delivery_id(self, token: str) -> int:
        """The delivery id the token names, or NOT_A_DELIVERY: either way it is looked up."""
        delivery_id = tokens.read_token(self.secret, tokens.UNSUBSCRIBE, token)
        return NOT_A_DELIVERY if delivery_id is None else delivery_id

    @staticmethod
    def _html(html: str, language: str) -> Response:
        return _response("200 OK", html.encode("utf-8"), "text/html; charset=utf-8",
                         (("Content-Language", language), ("Vary", "Accept-Language")))


def read_form(environ: Mapping[str, Any]) -> dict[str, str]:
    """The fields of a POST body (urlencoded, multipart or empty); BadRequest if unfit."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise BadRequest(_text("400 Bad Request", "bad Content-Length")) from None
    if length < 0:
        raise BadRequest(_text("400 Bad Request", "bad Content-Length"))
    if length > MAX_BODY:
        raise BadRequest(_text("413 Content Too Large", f"at most {MAX_BODY} bytes, please"))
    body = environ["wsgi.input"].read(length) if length else b""
    content_type = environ.get("CONTENT_TYPE", "")
    mime = content_type.partition(";")[0].strip().lower()
    try:
        if mime == "application/x-www-form-urlencoded":
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                           max_num_fields=MAX_FIELDS)
        elif mime == "multipart/form-data":
            pairs = _multipart(content_type, body)
        elif not body:
            pairs = []
        else:
            raise BadRequest(_text("415 Unsupported Media Type",
                                   "send application/x-www-form-urlencoded or multipart/form-data"))
    except (ValueError, LookupError):  # UnicodeDecodeError is a ValueError
        raise BadRequest(_text("400 Bad Request", "the form could not be read")) from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """The fields of a multipart/form-data body (RFC 7578); ValueError if it is not one."""
    if "\r" in content_type or "\n" in content_type:
        raise ValueError("Content-Type spans lines")
    head = f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("not multipart")
    parts = list(message.iter_parts())
    if len(parts) > MAX_FIELDS:
        raise ValueError("too many parts")
    pairs = []
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True) or b""
            pairs.append((name, payload.decode(part.get_content_charset() or "utf-8")))
    return pairs


def _scope(fields: Mapping[str, str]) -> str:
    """"lists" (one-click, or the form's first button) or "all"; BadRequest otherwise."""
    scope = fields.get("scope", "lists").strip().lower()
    if scope not in SCOPES:
        raise BadRequest(_text("400 Bad Request", 'scope must be "lists" or "all"'))
    return scope


def preferred_language(header: str) -> str:
    """The language of LANGUAGES the Accept-Language header prefers (ties: the first listed)."""
    best, best_q = LANGUAGES[0], 0.0
    for item in header.split(",")[:32]:
        tag, *params = item.split(";")
        primary = tag.strip().lower().partition("-")[0]
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best


def mask_address(email: str) -> str:
    """"john@example.com" → "j***n@example.com"; a local part under 4 characters keeps one."""
    local, at, domain = email.rpartition("@")
    if not at or not local:
        return "***"
    tail = local[-1] if len(local) >= 4 else ""
    return f"{local[0]}***{tail}@{domain}"


def read_secret(settings: config.Config, environ: Mapping[str, str]) -> bytes:
    """The token secret from the environment variable [sender] secret_env names."""
    if settings.sender is None:
        raise ConfigError(f"{settings.source}: [sender] is missing: `serve` needs its secret_env")
    env_name = settings.sender.secret_env
    secret = config.resolve_secret(env_name, environ, "[sender] secret_env").encode("utf-8")
    if len(secret) < tokens.MIN_SECRET_BYTES:
        raise ConfigError(f"[sender] secret_env {env_name}: the secret must be at least "
                          f"{tokens.MIN_SECRET_BYTES} bytes")
    return secret


def prefixes(settings: config.Config) -> tuple[str, ...]:
    """/u, and the path of [sender] unsubscribe_url when it is another one (maybe the root)."""
    paths = ["/u"]
    if settings.sender is not None:
        paths.append(urllib.parse.urlsplit(settings.sender.unsubscribe_url).path.rstrip("/"))
    return tuple(paths)


def serve(app: UnsubscribeApp, host: str, port: int, *, threads: int = THREADS,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve `app` on host:port until SIGINT (or SystemExit raised in the main thread)."""
    import waitress  # noqa: PLC0415 - only `serve` needs it

    # Under load every worker is busy and requests queue (their commits are shared): waitress
    # would warn "Task queue depth is N" on stderr for each one. Only its errors are news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        server = waitress.create_server(
            app, host=host, port=port, threads=threads, ident="bulksend",
            max_request_body_size=MAX_BODY, clear_untrusted_proxy_headers=True,
        )
    except OSError as exc:
        reason = exc.strerror or exc
        raise BulksendError(f"serve: cannot listen on {host}:{port}: {reason}") from None
    if ready is not None:
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{server.effective_port}")
    server.run()
