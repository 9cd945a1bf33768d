"""Campaign templates: compiled once in the sandbox, refused at compile time if anything is off.

A template comes from whoever creates the campaign and its variables from subscriber files,
so neither may reach Python internals, the file system or the environment (see `sandbox`).
`compile_templates` refuses, as `TemplateError` "NAME:LINE: what is wrong":

- syntax errors; ``{% include/import/extends/block %}`` (there is no loader either);
  ``_underscore`` attributes, ``.format``/``.format_map``, ``|attr``, ``self``;
- variables other than ``known``, unless only used under ``{% if x is defined %}``
  (or ``x is defined and ...``, ``|default``): the example newsletter's optional ``city``;
- anything that fails when each part is rendered with sample values, then again with empty
  names and attributes (as many subscribers have): runtime errors and sandbox violations
  surface when the campaign is created, not halfway through a send.

The subject is a template too (no autoescape, like the text part); the HTML autoescapes.
"""

from __future__ import annotations

import secrets
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.environment import Template
from jinja2.exceptions import SecurityError

from bulksend import htmltext, sandbox
from bulksend.errors import TemplateError

MAX_SOURCE = 1_000_000  # characters of one template

_CORE_SAMPLES = {"email": "subscriber@example.com", "name": "Sample Name", "campaign": "campaign"}
_OPTIONAL_TESTS = frozenset({"defined", "undefined"})
_DEFAULT_FILTERS = frozenset({"default", "d"})
# Filters whose string arguments name attributes (the sandbox checks them again at run time).
_ATTRIBUTE_FILTERS = frozenset({
    "groupby", "join", "map", "max", "min", "rejectattr", "selectattr", "sort", "sum", "unique",
})
_FORBIDDEN_NODES: dict[type[nodes.Node], str] = {
    nodes.Include: "{% include %} is not allowed: campaign templates cannot read files",
    nodes.Import: "{% import %} is not allowed: campaign templates cannot read files",
    nodes.FromImport: "{% from ... import %} is not allowed: campaign templates cannot read files",
    nodes.Extends: "{% extends %} is not allowed: campaign templates cannot read files",
    nodes.Block: "{% block %} is not allowed (there is no template inheritance): use a macro",
}


@dataclass(frozen=True)
class Templates:
    """A campaign's compiled subject, HTML and optional text template, checked and ready."""

    subject: Template
    html: Template
    text: Template | None
    html_name: str
    text_name: str
    known: frozenset[str]
    without_unsubscribe: tuple[str, ...]  # parts whose output lacks {{ unsubscribe_url }}
    plain_subject: tuple[tuple[bool, str], ...] | None  # (is a variable, text or name) parts


def compile_templates(subject: str, html: str, text: str | None, *, html_name: str = "html",
                      text_name: str = "text", known: frozenset[str]) -> Templates:
    """Compile and check a campaign's templates; TemplateError("NAME:LINE: ...") if unfit."""
    compiled_subject, _ = _compile(sandbox.TEXT_ENV, subject, "subject", known)
    plain_subject = _plain_parts(sandbox.TEXT_ENV.parse(subject))
    compiled_html, html_names = _compile(sandbox.HTML_ENV, html, html_name, known)
    compiled_text, text_names = (None, html_names) if text is None else \
        _compile(sandbox.TEXT_ENV, text, text_name, known)
    url = f"https://unsubscribe.invalid/u/{secrets.token_hex(8)}"
    # A part has the link if its source uses the variable and every trial output shows it.
    html_found = "unsubscribe_url" in html_names
    text_found = "unsubscribe_url" in text_names
    for variables in _samples(known, url):
        render(compiled_subject, "subject", variables)
        html_out = render(compiled_html, html_name, variables)
        html_found = html_found and url in html_out
        if compiled_text is not None:
            text_out = render(compiled_text, text_name, variables)
        else:
            text_out = htmltext.html_to_text(html_out)
        text_found = text_found and url in text_out
    missing = tuple(part for part, found in (("html", html_found), ("text", text_found))
                    if not found)
    return Templates(compiled_subject, compiled_html, compiled_text, html_name, text_name,
                     known, missing, plain_subject)


def missing_unsubscribe(templates: Templates) -> list[str]:
    """Names of the parts ("html", "text") that show no {{ unsubscribe_url }} (a launch gate)."""
    return list(templates.without_unsubscribe)


def render_subject(templates: Templates, variables: Mapping[str, Any]) -> str:
    """The rendered subject; a subject of text and {{ variable }}s skips Jinja (same result)."""
    if templates.plain_subject is not None:
        return "".join([str(variables[text]) if is_variable else text
                        for is_variable, text in templates.plain_subject])
    return render(templates.subject, "subject", variables)


def render(template: Template, name: str, variables: Mapping[str, Any]) -> str:
    """Render one part to a string; TemplateError("NAME:LINE: ...") on any failure."""
    return "".join(render_pieces(template, name, variables))


def render_pieces(template: Template, name: str, variables: Mapping[str, Any]) -> list[str]:
    """Render one part as the list of pieces Jinja yields (static text and merged values)."""
    try:
        try:
            pieces = list(template.root_render_func(template.new_context(variables)))
        except Exception:
            template.environment.handle_exception()  # re-raises with template line numbers
        if sum(map(len, pieces)) > sandbox.MAX_OUTPUT:
            raise SecurityError(f"the output is longer than {sandbox.MAX_OUTPUT} characters")
    except Exception as exc:
        raise TemplateError(_describe(name, exc)) from None
    return pieces


# --- compiling and static checks ------------------------------------------------------------

def _compile(env: sandbox.Sandbox, source: str, name: str,
             known: frozenset[str]) -> tuple[Template, frozenset[str]]:
    """The compiled template and the names its source reads."""
    filename = f"<{name}>"  # angle brackets: linecache never looks for such a file
    if len(source) > MAX_SOURCE:
        raise TemplateError(f"{name}: longer than {MAX_SOURCE} characters")
    try:
        ast = env.parse(source, name, filename)
        _check_nodes(ast, name)
        _check_names(ast, name, known | env.globals.keys())
        sandbox.GuardInserter(env).visit(ast)
        names = frozenset(node.name for node in ast.find_all(nodes.Name) if node.ctx == "load")
        code = env.compile(ast, name, filename)
        # A plain dict, not Jinja's ChainMap: every render copies the globals.
        return env.template_class.from_code(env, code, dict(env.globals), None), names
    except TemplateSyntaxError as exc:
        raise TemplateError(f"{name}:{exc.lineno}: {exc.message}") from None
    except TemplateError:
        raise
    except Exception as exc:  # RecursionError on absurd nesting, and the like
        raise TemplateError(f"{name}: cannot compile: {type(exc).__name__}: {exc}") from None


def _plain_parts(ast: nodes.Template) -> tuple[tuple[bool, str], ...] | None:
    """A template made only of text and {{ name }}s as its parts; None for anything else."""
    parts: list[tuple[bool, str]] = []
    for output in ast.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append((False, node.data))
            elif isinstance(node, nodes.Name) and node.ctx == "load":
                parts.append((True, node.name))
            else:
                return None
    return tuple(parts)


def _check_nodes(ast: nodes.Template, name: str) -> None:
    for node in ast.find_all(nodes.Node):
        problem = _FORBIDDEN_NODES.get(type(node))
        if problem is None and isinstance(node, (nodes.Getattr, nodes.Getitem, nodes.NSRef)):
            attr = _const_str(node.arg) if isinstance(node, nodes.Getitem) else node.attr
            if attr is not None and (attr.startswith("_") or attr in sandbox.FORBIDDEN_ATTRIBUTES):
                problem = f"attribute {attr!r} is not allowed in templates"
                if attr in ("format", "format_map"):
                    problem += " (use ~ or the |format filter)"
        elif problem is None and isinstance(node, nodes.Filter) and node.name == "attr":
            problem = "the |attr filter is not allowed in templates"
        elif problem is None and isinstance(node, nodes.Filter) and node.name in _ATTRIBUTE_FILTERS:
            for arg in (*node.args, *(kw.value for kw in node.kwargs)):
                value = _const_str(arg)
                if value is not None and any(p.startswith("_") for p in value.split(".")):
                    problem = f"attribute {value!r} is not allowed in templates"
        elif problem is None and isinstance(node, nodes.Name) and node.name == "self":
            problem = "'self' is not available in campaign templates"
        if problem is not None:
            raise TemplateError(f"{name}:{node.lineno}: {problem}")


def _const_str(node: nodes.Node) -> str | None:
    value = getattr(node, "value", None) if isinstance(node, nodes.Const) else None
    return value if isinstance(value, str) else None


def _check_names(ast: nodes.Template, name: str, allowed: Iterable[str]) -> None:
    unknown = meta.find_undeclared_variables(ast) - set(allowed)
    if not unknown:
        return
    uses = sorted((node.lineno, node.name) for node in _unguarded_names(ast, frozenset())
                  if node.name in unknown)
    if uses:
        lineno, variable = uses[0]
        known = ", ".join(sorted(n for n in allowed if n not in sandbox.GLOBALS))
        raise TemplateError(f"{name}:{lineno}: unknown variable {variable!r} (known: {known})")


def _unguarded_names(node: nodes.Node, guarded: frozenset[str]) -> Iterator[nodes.Name]:
    """Name loads not protected by `is defined` (in an if) or consumed by `is defined`/|default."""
    if isinstance(node, nodes.Name):
        if node.ctx == "load" and node.name not in guarded:
            yield node
        return
    if isinstance(node, (nodes.Test, nodes.Filter)) and isinstance(node.node, nodes.Name):
        if node.name in (_OPTIONAL_TESTS if isinstance(node, nodes.Test) else _DEFAULT_FILTERS):
            for child in (*node.args, *node.kwargs):
                yield from _unguarded_names(child, guarded)
            return
    if isinstance(node, (nodes.And, nodes.Or)):  # `x is defined and x`: the right side is safe
        yield from _unguarded_names(node.left, guarded)
        when_true, when_false = _defined_by(node.left)
        yield from _unguarded_names(
            node.right, guarded | (when_true if isinstance(node, nodes.And) else when_false))
        return
    if isinstance(node, (nodes.If, nodes.CondExpr)):
        when_true, when_false = _defined_by(node.test)
        yield from _unguarded_names(node.test, guarded)
        body = node.body if isinstance(node, nodes.If) else [node.expr1]
        other = ([*node.elif_, *node.else_] if isinstance(node, nodes.If)
                 else [node.expr2] if node.expr2 is not None else [])
        for child in body:
            yield from _unguarded_names(child, guarded | when_true)
        for child in other:
            yield from _unguarded_names(child, guarded | when_false)
        return
    for child in node.iter_child_nodes():
        yield from _unguarded_names(child, guarded)


def _defined_by(test: nodes.Expr) -> tuple[frozenset[str], frozenset[str]]:
    """Names known to be defined when `test` is true, and when it is false."""
    if isinstance(test, nodes.Test) and isinstance(test.node, nodes.Name):
        if test.name == "defined":
            return frozenset({test.node.name}), frozenset()
        if test.name == "undefined":
            return frozenset(), frozenset({test.node.name})
    if isinstance(test, nodes.Not):
        when_true, when_false = _defined_by(test.node)
        return when_false, when_true
    if isinstance(test, nodes.And):
        return _defined_by(test.left)[0] | _defined_by(test.right)[0], frozenset()
    return frozenset(), frozenset()


def _code_objects(template: Template) -> Iterator[types.CodeType]:
    stack = [template.root_render_func.__code__]
    while stack:
        code = stack.pop()
        yield code
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))


def static_ids(template: Template) -> dict[int, str]:
    """The string constants a compiled template can yield (its static text), by identity."""
    return {id(c): c for code in _code_objects(template) for c in code.co_consts
            if isinstance(c, str)}


def _samples(known: frozenset[str], url: str) -> Iterator[dict[str, str]]:
    """Trial variables: samples, then empty names and attributes (as many subscribers have)."""
    full = {key: _CORE_SAMPLES.get(key, "sample") for key in known}
    if "unsubscribe_url" in known:
        full["unsubscribe_url"] = url
    yield full
    yield {key: value if key in ("email", "unsubscribe_url", "campaign") else ""
           for key, value in full.items()}


def _describe(name: str, exc: BaseException) -> str:
    filename, line = f"<{name}>", None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f"{name}:{line}" if line else name
    if isinstance(exc, SecurityError):
        return f"{where}: not allowed in a template: {exc}"
    if isinstance(exc, UndefinedError):
        return f"{where}: {exc}"
    return f"{where}: {type(exc).__name__}: {exc}"

