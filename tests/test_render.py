"""Message bytes: headers of DESIGN §7, MIME structure, header injection, round trips."""

from __future__ import annotations

import datetime as dt
import email
import email.header
import email.policy
import email.utils
import itertools
from email.message import EmailMessage
from pathlib import Path

import pytest
from markupsafe import escape

from bulksend import render as render_module
from bulksend import templating
from bulksend.errors import TemplateError
from bulksend.render import (
    MessageSettings, Recipient, Renderer, compile_templates, html_to_text,
)

KNOWN = frozenset({"email", "name", "unsubscribe_url", "campaign", "city"})
LINK = '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "Reply-To", "List-Id",
           "List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID", "X-Bulksend-Delivery",
           "MIME-Version", "Content-Type"]


def settings(**changes: object) -> MessageSettings:
    values: dict[str, object] = {
        "from_header": "Example News <news@example.com>", "reply_to": "support@example.com",
        "list_id": "news.example.com", "feedback_id": "c1:news:bulksend", "eight_bit": False,
        "campaign": "Spring",
    }
    return MessageSettings(**(values | changes))  # type: ignore[arg-type]


def recipient(**changes: object) -> Recipient:
    values: dict[str, object] = {
        "email": "ann@example.com", "name": "Ann", "attributes": {"city": "Oslo"},
        "message_id": "<m.TOKEN@example.com>", "unsubscribe_url": "https://example.com/u/TOKEN",
        "unsubscribe_mailto": "unsubscribe+TOKEN@example.com", "delivery_token": "DTOKEN",
        "date": 1_700_000_000.0,
    }
    return Recipient(**(values | changes))  # type: ignore[arg-type]


def renderer(subject: str = "Hi {{ name }}", html: str = "<p>Hi {{ name }}</p>" + LINK,
             text: str | None = None, known: frozenset[str] = KNOWN,
             **setting_changes: object) -> Renderer:
    templates = compile_templates(subject, html, text, known=known)
    return Renderer(templates, settings(**setting_changes))


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> tuple[EmailMessage, EmailMessage]:
    plain, html = message.iter_parts()
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    return plain, html


def content(part: EmailMessage) -> str:
    return str(part.get_content()).replace("\r\n", "\n")


def check_lines(raw: bytes) -> None:
    """Lines end in CRLF, no line passes 998 octets, header lines fold at 78 (76 if encoded)."""
    assert raw.endswith(b"\r\n") and b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        assert len(line) <= (76 if b"=?" in line else 78), line
    for line in body.split(b"\r\n"):
        assert len(line) <= 998


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_every_header_of_design_section_7_is_there() -> None:
    raw = renderer().render(recipient())
    check_lines(raw)
    message = parse(raw)
    assert list(message.keys()) == HEADERS
    assert message["From"] == "Example News <news@example.com>"
    assert message["To"] == "Ann <ann@example.com>"
    assert message["Subject"] == "Hi Ann"
    assert email.utils.parsedate_to_datetime(message["Date"]) == \
        dt.datetime.fromtimestamp(1_700_000_000, dt.timezone.utc)
    assert message["Message-ID"] == "<m.TOKEN@example.com>"
    assert message["Reply-To"] == "support@example.com"
    assert message["List-Id"] == "<news.example.com>"
    assert message["List-Unsubscribe"] == \
        "<https://example.com/u/TOKEN>, <mailto:unsubscribe+TOKEN@example.com>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Feedback-ID"] == "c1:news:bulksend"
    assert message["X-Bulksend-Delivery"] == "DTOKEN"
    assert message["MIME-Version"] == "1.0"
    assert message.defects == []


def test_optional_headers_are_left_out_when_not_configured() -> None:
    raw = renderer(reply_to=None, feedback_id=None).render(recipient(unsubscribe_mailto=None))
    message = parse(raw)
    assert list(message.keys()) == [h for h in HEADERS if h not in ("Reply-To", "Feedback-ID")]
    assert message["List-Unsubscribe"] == "<https://example.com/u/TOKEN>"


def test_body_is_multipart_alternative_text_then_html_in_utf8() -> None:
    message = parse(renderer().render(recipient()))
    assert message.get_content_type() == "multipart/alternative"
    plain, html = parts(message)
    assert (plain.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert plain.get_content_charset() == html.get_content_charset() == "utf-8"
    assert plain["Content-Transfer-Encoding"] == html["Content-Transfer-Encoding"] == \
        "quoted-printable"
    assert content(plain) == "Hi Ann\n\nUnsubscribe (https://example.com/u/TOKEN)\n"
    assert content(html) == "<p>Hi Ann</p>" + LINK.replace("{{ unsubscribe_url }}",
                                                           "https://example.com/u/TOKEN") + "\n"


def test_subscriber_data_is_data_never_template_code_and_html_escaped() -> None:
    r = renderer(html="<p>{{ name }}</p>" + LINK, text="{{ name }} {{ unsubscribe_url }}")
    for name in ["{{ 7*7 }}", "{% raw %}x", "<script>alert(1)</script>"]:
        message = parse(r.render(recipient(name=name)))
        plain, html = parts(message)
        assert message["Subject"] == f"Hi {name}"
        assert content(plain).startswith(name + " ")
        assert content(html).startswith(f"<p>{escape(name)}</p>")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content(html)
    assert "<script>" not in content(html)


INJECTIONS = [
    ("Eve\r\nBcc: victim@example.com", "Eve Bcc: victim@example.com"),
    ("Eve\rBcc: victim@example.com", "Eve Bcc: victim@example.com"),
    ("Eve\nBcc: victim@example.com", "Eve Bcc: victim@example.com"),
    ("Eve\x00Bcc: victim@example.com", "Eve Bcc: victim@example.com"),
    ("Eve\r\n\r\n<p>a body</p>", "Eve <p>a body</p>"),
    ("Eve\r\n Bcc: folded@example.com", "Eve  Bcc: folded@example.com"),
    ("=?UTF-8?Q?x=0D=0ABcc:_x@y?=", "=?UTF-8?Q?x=0D=0ABcc:_x@y?="),
    ("Eve =?UTF-8?B?DQpCY2M6IHhAeQ==?=", "Eve =?UTF-8?B?DQpCY2M6IHhAeQ==?="),
    ("Eve\u2028Bcc: x@y\x85To: z@y\x0bCc: w@y", "Eve Bcc: x@y To: z@y Cc: w@y"),
    ('Eve" <evil@example.com>, "x', 'Eve" <evil@example.com>, "x'),
]


@pytest.mark.parametrize(("value", "clean"), INJECTIONS)
@pytest.mark.parametrize("text", [None, "{{ name }} / {{ city }} / {{ unsubscribe_url }}"])
@pytest.mark.parametrize("eight_bit", [False, True])
def test_merged_values_never_make_a_header(value: str, clean: str, text: str | None,
                                           eight_bit: bool) -> None:
    r = renderer(subject="Hi {{ name }} from {{ city }}",
                 html="<p>{{ name }}</p><p>{{ city }}</p>" + LINK, text=text,
                 eight_bit=eight_bit)
    raw = r.render(recipient(name=value, attributes={"city": value}))
    check_lines(raw)
    message = parse(raw)
    assert list(message.keys()) == HEADERS
    assert len(message.get_all("To", [])) == 1 and "Bcc" not in message and "Cc" not in message
    assert message["Subject"] == f"Hi {clean} from {clean}"
    (address,) = message["To"].addresses
    assert (address.display_name, address.addr_spec) == (clean, "ann@example.com")
    assert message.defects == [] and message["To"].defects == () == message["Subject"].defects
    plain, html = parts(message)
    assert normalise(content(html)).startswith(normalise(f"<p>{escape(value)}</p>"))
    if text is not None:
        assert normalise(content(plain)).startswith(normalise(f"{value} / {value} / "))


@pytest.mark.parametrize("eight_bit", [False, True])
@pytest.mark.parametrize("text", [None, "{{ name }}\n{{ city }}\n{{ unsubscribe_url }}\n"])
def test_cyrillic_idn_and_a_3000_character_line_come_back_unchanged(eight_bit: bool,
                                                                   text: str | None) -> None:
    long_word = "ы" * 1000 + "y" * 2000
    html = "<h1>Привет, {{ name }}!</h1><p>" + "z" * 3000 + "</p><p>{{ city }}</p>" + LINK
    r = renderer(subject="Привет, {{ name }}! Новости недели", html=html, text=text,
                 eight_bit=eight_bit, from_header="Новости Примера <news@пример.рф>")
    person = recipient(name="Иван Петров", email="user@пример.рф",
                       attributes={"city": long_word})
    raw = r.render(person)
    check_lines(raw)
    message = parse(raw)
    assert message["Subject"] == "Привет, Иван Петров! Новости недели"
    (to,) = message["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Иван Петров", "user@xn--e1afmkfd.xn--p1ai")
    (sender,) = message["From"].addresses
    assert (sender.display_name, sender.domain) == ("Новости Примера", "xn--e1afmkfd.xn--p1ai")
    assert b"To: =?UTF-8?B?" in raw
    plain, html_part = parts(message)
    variables = r.variables(person)
    assert content(html_part) == templating.render(r._templates.html, "html", variables) + "\n"
    if text is None:
        expected = html_to_text(templating.render(r._templates.html, "html", variables))
    else:
        expected = templating.render(r._templates.text, "text", variables)  # type: ignore[arg-type]
    assert content(plain).rstrip("\n") == expected.rstrip("\n")
    # Lines over 998 octets force quoted-printable even when 8BITMIME is offered.
    assert plain["Content-Transfer-Encoding"] == "quoted-printable"
    assert html_part["Content-Transfer-Encoding"] == "quoted-printable"


def test_8bit_is_used_only_when_offered_and_every_line_fits() -> None:
    r = renderer(html="<p>Привет, {{ name }}</p>" + LINK, eight_bit=True)
    plain, html = parts(parse(r.render(recipient(name="Иван"))))
    assert plain["Content-Transfer-Encoding"] == html["Content-Transfer-Encoding"] == "8bit"
    assert content(html).startswith("<p>Привет, Иван</p>")
    ascii_only = parts(parse(r.render(recipient(name="Ivan"))))
    assert ascii_only[0]["Content-Transfer-Encoding"] == "8bit"  # the HTML part has Cyrillic
    plain_qp, html_qp = parts(parse(renderer(eight_bit=False).render(recipient(name="Иван"))))
    assert plain_qp["Content-Transfer-Encoding"] == "quoted-printable"


def test_8bit_body_that_would_contain_the_boundary_or_nul_is_quoted_printable() -> None:
    r = renderer(html="<p>{{ name }}</p>" + LINK, eight_bit=True)
    boundary = parse(r.render(recipient())).get_boundary()
    for name in [f"x\r\n--{boundary}--\r\n", "nul\x00here"]:
        raw = r.render(recipient(name=name))
        message = parse(raw)
        plain, html = parts(message)
        assert html["Content-Transfer-Encoding"] == "quoted-printable"
        assert normalise(content(html)).startswith(normalise(f"<p>{name}</p>"))
        assert len(list(message.iter_parts())) == 2


@pytest.mark.parametrize(("name", "header"), [
    ("Ann Smith", "To: Ann Smith <ann@example.com>"),
    ("Smith, Ann", 'To: "Smith, Ann" <ann@example.com>'),
    ('Ann "A" Smith', 'To: "Ann \\"A\\" Smith" <ann@example.com>'),
    ("", "To: ann@example.com"),
    ("   ", "To: ann@example.com"),
])
def test_display_names_are_atoms_quoted_or_absent(name: str, header: str) -> None:
    raw = renderer().render(recipient(name=name))
    assert header.encode() + b"\r\n" in raw
    assert parse(raw)["To"].addresses[0].display_name == name.strip()


def test_long_names_and_subjects_fold_and_decode_back() -> None:
    name = "Анна-Мария Иванова-Петрова " * 10 + "x" * 200
    subject = "word " * 60 + "y" * 300
    raw = renderer(subject=subject + "{{ name }}").render(recipient(name=name))
    check_lines(raw)
    message = parse(raw)
    assert message["Subject"] == subject + name.strip()
    # RFC 2047 decoders drop the folding between encoded-words: the exact name comes back.
    head = raw.partition(b"\r\n\r\n")[0].decode()
    to_field = head.split("\r\nTo: ")[1].split("\r\nSubject:")[0]
    decoded = str(email.header.make_header(email.header.decode_header(to_field)))
    assert decoded == f"{name.strip()} <ann@example.com>"
    # Python 3.11's address parser keeps that whitespace (against §6.2): words shorter than
    # an encoded-word stay whole, only the 200-character one is cut.
    parsed = message["To"].addresses[0].display_name.split()
    assert parsed[:20] == name.split()[:20] and "".join(parsed) == "".join(name.split())


def test_runtime_failure_for_one_subscriber_is_a_template_error_with_the_line() -> None:
    r = renderer(html='<p>\n{% if name == "boom" %}{{ 1 / 0 }}{% endif %}</p>' + LINK)
    r.render(recipient())
    with pytest.raises(TemplateError, match=r"^html:2: ZeroDivisionError"):
        r.render(recipient(name="boom"))


def test_missing_attributes_render_as_empty() -> None:
    r = renderer(html="<p>[{{ city }}]</p>" + LINK)
    assert content(parts(parse(r.render(recipient(attributes={}))))[1]).startswith("<p>[]</p>")


SHAPES = [
    (TEMPLATES / "newsletter.html").read_text(encoding="utf-8"),
    "<p>Hello {{ name }}, <a href='{{ unsubscribe_url }}'>{{ unsubscribe_url }}</a></p>",
    '<ul>{% for w in name.split() %}<li>{{ w }} in {{ city }}</li>{% endfor %}</ul>' + LINK,
    "<pre>{{ name }}\n  {{ city }}</pre>" + LINK,
    "<p>{{ name|safe }}</p><p><a href='{{ city }}'>Go</a> <a href='x{{ city }}'>In</a></p>" + LINK,
    '<div style="{{ city }}">hidden?</div><p title="{{ name }}">{{ name }}<br>{{ city }}</p>'
    + LINK,
    "{% macro b(t) %}<b>{{ t }}</b>{% endmacro %}<p>{{ b(name) }} and {{ city }}</p>" + LINK,
    "<p>" + "long words " * 20 + "{{ name }} {{ city }}" + "=" * 100 + "</p>" + LINK,
]
NAMES = ["Ann", "", "  spaced \t  out  ", "<b>bold</b>", "a & b &amp; c", "x" * 200,
         "Иван\r\nПетров", "nul\x00", "=3D trailing space ", "word " * 30, "é" * 90]
CITIES = ["Oslo", "#top", "javascript:alert(1)", "display:none", "https://e.com/a b",
          "https://e.com/?a=1&b=2", ""]


@pytest.mark.parametrize("html", SHAPES)
@pytest.mark.parametrize("eight_bit", [False, True])
def test_text_and_html_from_the_shape_cache_equal_the_plain_conversion(html: str,
                                                                       eight_bit: bool) -> None:
    r = renderer(html=html, eight_bit=eight_bit)
    for name, city in itertools.product(NAMES, CITIES):
        raw = r.render(recipient(name=name, attributes={"city": city}))
        check_lines(raw)
        plain, html_part = parts(parse(raw))
        variables = r.variables(recipient(name=name, attributes={"city": city}))
        rendered = templating.render(r._templates.html, "html", variables)
        assert content(html_part) == normalise(rendered.rstrip("\r\n")) + "\n", (name, city)
        assert content(plain) == html_to_text(rendered) + "\n", (name, city)
        if not eight_bit:
            _, _, body = raw.partition(b"\r\n\r\n")
            assert max(len(line) for line in body.split(b"\r\n")) <= 76  # RFC 2045 QP lines


def test_past_the_shape_limit_messages_are_still_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_module, "MAX_SHAPES", 2)
    r = renderer(html="<ul>{% for w in name.split() %}<li>{{ w }}</li>{% endfor %}</ul>" + LINK)
    for n in range(1, 6):
        name = " ".join(f"w{i}" for i in range(n))
        plain, _ = parts(parse(r.render(recipient(name=name))))
        assert content(plain).startswith("\n".join(f"- w{i}" for i in range(n)) + "\n\n")


def test_unicode_local_part_is_kept_for_smtputf8_and_domain_is_an_a_label() -> None:
    raw = renderer().render(recipient(email="иван@пример.рф"))
    assert "To: Ann <иван@xn--e1afmkfd.xn--p1ai>\r\n".encode() in raw
