"""Campaign templates: the sandbox, and everything refused when a campaign is created."""

from __future__ import annotations

import os
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest

from bulksend import templating
from bulksend.errors import TemplateError
from bulksend.render import compile_templates, missing_unsubscribe

KNOWN = frozenset({"email", "name", "unsubscribe_url", "campaign", "x", "city"})
HTML = "<p>Hi {{ name }}</p><p><a href=\"{{ unsubscribe_url }}\">Unsubscribe</a></p>"
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def compile_html(html: str, known: frozenset[str] = KNOWN, text: str | None = None,
                 subject: str = "Hi") -> templating.Templates:
    return compile_templates(subject, html, text, known=known)


def sample(templates: templating.Templates, **values: str) -> str:
    variables = {key: "" for key in templates.known} | {"unsubscribe_url": "https://u/T"}
    return templating.render(templates.html, "html", variables | values)


HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__ }}",
    "{{ config }}",
    "{{ x|attr('__class__') }}",
    "{{ '{0.__class__}'.format(x) }}",
    "{{ range(10**9)|list }}",
    "{{ 'a'*10**9 }}",
    # and their relatives
    "{{ cycler }}", "{{ joiner() }}", "{{ lipsum() }}", "{{ self }}", "{{ request.environ }}",
    "{{ x['__class__'] }}", "{{ x[('_' ~ '_class__')] }}", "{{ x.format_map({}) }}",
    "{{ x|map(attribute='__class__')|list }}", "{{ [x]|map('attr', '__class__')|list }}",
    "{{ 'a' * 1000000000 }}", "{{ [1] * 1000000000 }}", "{{ 2 ** 100000 }}",
    "{{ 'a'|center(1000000000) }}", "{{ 'a'.center(10**9) }}", "{{ 'a'.ljust(10**9) }}",
    "{{ '%999999999s' % x }}", "{{ '%999999999s'|format(x) }}", "{{ '%*s' % (10**9, x) }}",
    "{{ 'a b'|indent(1000000000) }}", "{{ [1, 2]|batch(1000000000)|list }}",
    "{{ x|wordwrap(1, wrapstring='x' * 400000) }}", "{{ ('a' * 400000).join(['b'] * 100) }}",
    "{{ dict.fromkeys(range(10000), 'x') }}", "{{ (1).to_bytes(1000000000, 'big') }}",
    "{{ x.encode() }}", "{{ x.__len__() }}", "{{ namespace.__init__ }}", "{{ range.__call__ }}",
    "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('a', 40) }}",
    "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}",
    "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "{% macro m() %}{% for i in range(10000) %}{{ 'y' * 400000 }}{% endfor %}{% endmacro %}"
    "{{ m() }}",
    "{% set s %}{% for i in range(10000) %}{{ 'y' * 400000 }}{% endfor %}{% endset %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% include 'x.html' %}", "{% import 'x.html' as m %}", "{% from 'x.html' import m %}",
    "{% extends 'x.html' %}", "{% block b %}{% endblock %}",
]


class Watch:
    """Counts file, network, process and environment access while switched on."""

    events: list[tuple[str, tuple[object, ...]]] = []
    on = False
    WATCHED = ("open", "os.", "socket.", "subprocess.", "shutil.", "ctypes.", "urllib.",
               "http.", "sqlite3.", "glob.", "pathlib.", "import")

    @classmethod
    def hook(cls, event: str, args: tuple[object, ...]) -> None:
        if cls.on and event.startswith(cls.WATCHED):
            cls.events.append((event, args))


sys.addaudithook(Watch.hook)  # audit hooks cannot be removed: it only records while `on`


class CountingEnviron(dict[str, str]):
    """os.environ that counts every read."""

    reads = 0

    def __getitem__(self, key: str) -> str:
        CountingEnviron.reads += 1
        return super().__getitem__(key)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        CountingEnviron.reads += 1
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        CountingEnviron.reads += 1
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        CountingEnviron.reads += 1
        return super().__iter__()


@pytest.mark.parametrize("source", HOSTILE)
@pytest.mark.parametrize("part", ["subject", "html", "text"])
def test_hostile_template_is_refused_with_no_reads_and_little_memory(
        source: str, part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = {"subject": "Hi", "html": HTML, "text": "{{ unsubscribe_url }}"}
    sources[part] = source
    compile_args = (sources["subject"], sources["html"], sources["text"])
    with pytest.raises(TemplateError):  # first, so lazily imported modules are loaded
        compile_templates(*compile_args, known=KNOWN)
    monkeypatch.setattr(os, "environ", CountingEnviron(os.environ))
    CountingEnviron.reads = 0
    Watch.events.clear()
    tracemalloc.start()
    Watch.on = True
    try:
        with pytest.raises(TemplateError, match=rf"^{part}(:\d+)?: "):
            compile_templates(*compile_args, known=KNOWN)
    finally:
        Watch.on = False
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert Watch.events == []
    assert CountingEnviron.reads == 0
    assert peak < 20_000_000  # refused before allocating: 'a'*10**9 would be 1 GB


def test_the_watch_sees_file_and_environment_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "environ", CountingEnviron(os.environ))
    CountingEnviron.reads = 0
    Watch.events.clear()
    Watch.on = True
    try:
        Path(__file__).read_bytes()
        os.environ.get("HOME")
    finally:
        Watch.on = False
    assert [event for event, _ in Watch.events] == ["open"]
    assert CountingEnviron.reads == 1


@pytest.mark.parametrize(("source", "message"), [
    ("{{ ''.__class__.__mro__ }}", "html:1: attribute '__mro__' is not allowed"),
    ("<p>\n{{ cycler.__init__.__globals__ }}", "html:2: attribute '__globals__' is not allowed"),
    ("{{ config }}", "html:1: unknown variable 'config'"),
    ("{{ x|attr('__class__') }}", "html:1: the |attr filter is not allowed"),
    ("{{ '{0}'.format(x) }}", "html:1: attribute 'format' is not allowed"),
    ("\n\n{{ range(10**9)|list }}", r"html:3: not allowed in a template: range\(\) of more"),
    ("{{ 'a'*10**9 }}", "html:1: not allowed in a template: the value would be longer"),
    ("{% include 'x' %}", "html:1: {% include %} is not allowed: campaign templates cannot read"),
    ("{% for i in range(10000) %}{% for j in range(10) %}{% endfor %}{% endfor %}",
     "html:1: not allowed in a template: more than 10000 loop iterations"),
])
def test_refusals_name_the_part_the_line_and_the_reason(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=f"^{message}"):
        compile_html(source + HTML)


@pytest.mark.parametrize(("source", "output"), [
    ("{{ name|upper }}", "ANN"),
    ("{{ '%s, %d' % (name, 3) }}", "Ann, 3"),
    ("{{ '%s!'|format(name) }}", "Ann!"),
    ("{{ name ~ '!' * 3 }}", "Ann!!!"),
    ("{{ [name, city]|join(', ') }}", "Ann, Oslo"),
    ("{{ name.replace('n', 'N') }}", "ANN"),
    ("{{ name.split('n')|length }}", "3"),
    ("{% for i in range(3) %}{{ loop.index }}{% endfor %}", "123"),
    ("{% set ns = namespace(n=0) %}{% for c in name %}{% set ns.n = ns.n + 1 %}{% endfor %}"
     "{{ ns.n }}", "3"),
    ("{% macro b(t) %}[{{ t }}]{% endmacro %}{{ b(name) }}", "[Ann]"),
    ("{{ {'a': 1}['a'] + 2 ** 3 }}", "9"),
    ("{{ name|center(9) }}", "   Ann   "),
    ("{{ city if city is defined else 'nowhere' }}", "Oslo"),
    ("{{ (name * 2)|truncate(4, end='') }}", "AnnA"),
    ("{{ dict(a=name).a }}", "Ann"),
])
def test_ordinary_templates_still_work(source: str, output: str) -> None:
    templates = compile_html(source + HTML)
    assert sample(templates, name="Ann", city="Oslo").startswith(output)


def test_unknown_variable_names_file_and_line() -> None:
    with pytest.raises(TemplateError, match=r"^newsletter\.html:3: unknown variable 'citty' "
                                            r"\(known: campaign, city, email, name"):
        compile_templates("Hi", "<p>\n<b>x</b>\n{{ citty }}" + HTML, None, known=KNOWN,
                          html_name="newsletter.html")


@pytest.mark.parametrize(("subject", "html", "text", "message"), [
    ("Hi {{ name }", HTML, None, r"^subject:1: "),
    ("Hi", "<p>\n{% if name %}\n" + HTML, None, r"^newsletter\.html:3: .*endif"),
    ("Hi", HTML, "line\n{{ name | }}", r"^newsletter\.txt:2: "),
    ("Hi", HTML + "{{ name|nosuchfilter }}", None, r"^newsletter\.html:1: No filter named"),
])
def test_syntax_error_names_file_and_line(subject: str, html: str, text: str | None,
                                          message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        compile_templates(subject, html, text, known=KNOWN, html_name="newsletter.html",
                          text_name="newsletter.txt")


def test_runtime_error_at_create_names_the_line() -> None:
    with pytest.raises(TemplateError, match=r"^html:2: ZeroDivisionError"):
        compile_html("<p>\n{{ 1 / (x|int) }}</p>" + HTML)


def test_template_failing_for_subscribers_without_a_name_is_refused_at_create() -> None:
    with pytest.raises(TemplateError, match=r"^html:1: str object has no element 0"):
        compile_html("{{ name[0] }}" + HTML)


@pytest.mark.parametrize("source", [
    "{% if city is defined %}{{ city }}{% endif %}",
    "{% if city is defined and city %}{{ city }}{% endif %}",
    "{% if city is not defined %}-{% else %}{{ city }}{% endif %}",
    "{{ city|default('nowhere') }}",
    "{{ city if city is defined else '' }}",
])
def test_attribute_guarded_by_is_defined_may_be_missing_from_the_lists(source: str) -> None:
    templates = compile_html(source + HTML, known=KNOWN - {"city"})
    assert "unsubscribe" in sample(templates, name="Ann").lower()


def test_unguarded_use_of_a_missing_attribute_is_refused() -> None:
    with pytest.raises(TemplateError, match="html:1: unknown variable 'city'"):
        compile_html("{% if city is defined %}{% endif %}{{ city }}" + HTML,
                     known=KNOWN - {"city"})


@pytest.mark.parametrize(("html", "text", "missing"), [
    (HTML, None, []),
    (HTML, "Bye: {{ unsubscribe_url }}", []),
    ("<p>no link</p>", None, ["html", "text"]),
    (HTML, "no link here", ["text"]),
    ("<p>x</p><div style=\"display:none\"><a href=\"{{ unsubscribe_url }}\">u</a></div>",
     None, ["text"]),
    ("<p>x</p><!-- {{ unsubscribe_url }} -->", None, ["text"]),
    ("<p>x</p>{% if false %}<a href=\"{{ unsubscribe_url }}\">u</a>{% endif %}", None,
     ["html", "text"]),
    ("<p>{% if name %}<a href=\"{{ unsubscribe_url }}\">u</a>{% endif %}</p>", None,
     ["html", "text"]),
    ("<p>https://unsubscribe.example.com/u/TOKEN</p>", None, ["html", "text"]),
    ("<p>{{ x }}</p>", "{{ unsubscribe_url }}", ["html"]),
])
def test_missing_unsubscribe_lists_the_parts_without_the_link(
        html: str, text: str | None, missing: list[str]) -> None:
    assert missing_unsubscribe(compile_html(html, text=text)) == missing


def test_subject_of_text_and_variables_skips_jinja_with_the_same_result() -> None:
    variables = {key: "" for key in KNOWN} | {"name": "<Ann & {{ x }}>", "x": "1"}
    for subject in ["Hi {{ name }}!", "{{ name }}{{ x }}", "plain", "", "a\r\nb {{ x }}\n"]:
        templates = compile_templates(subject, HTML, None, known=KNOWN)
        assert templates.plain_subject is not None
        expected = templating.render(templates.subject, "subject", variables)
        assert templating.render_subject(templates, variables) == expected
    assert compile_templates("{{ name|upper }}", HTML, None, known=KNOWN).plain_subject is None


def test_newsletter_example_compiles_and_renders() -> None:
    html = (TEMPLATES / "newsletter.html").read_text(encoding="utf-8")
    text = (TEMPLATES / "newsletter.txt").read_text(encoding="utf-8")
    known = frozenset({"email", "name", "unsubscribe_url", "campaign", "city"})
    for part_text in (None, text):
        templates = compile_templates("News for {{ name or 'you' }}", html, part_text,
                                      known=known, html_name="newsletter.html")
        assert missing_unsubscribe(templates) == []
        out = sample(templates, name="Ann", city="Oslo", email="ann@example.com")
        assert "Hi Ann," in out and "coming to Oslo" in out and "https://u/T" in out
        assert "Hi there," in sample(templates, name="")
    without_city = compile_templates("News", html, text, known=known - {"city"})
    assert "coming to" not in sample(without_city, name="Ann")


@pytest.mark.parametrize("page", ["unsubscribe.html", "unsubscribed.html"])
@pytest.mark.parametrize(("lang", "word"), [("en", "nsubscribe"), ("ru", "тпис"),
                                            ("de", "nsubscribe")])
def test_unsubscribe_pages_render_in_both_languages(page: str, lang: str, word: str) -> None:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string((TEMPLATES / page).read_text(encoding="utf-8"))
    out = template.render(lang=lang, email="<b>@example.com", list_names=["News", "Offers"],
                          action_url="/u/TOKEN", everything=False)
    assert word in out and "&lt;b&gt;@example.com" in out and "News, Offers" in out
    assert f'<html lang="{"en" if lang == "de" else lang}">' in out
    if page == "unsubscribe.html":
        assert '<form method="post" action="/u/TOKEN">' in out
        assert 'name="List-Unsubscribe" value="One-Click"' in out
        assert 'name="scope" value="all"' in out
