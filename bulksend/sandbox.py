"""A Jinja2 environment in which a template can neither reach Python internals nor exhaust
memory or time (used by `templating`).

On top of Jinja's ImmutableSandboxedEnvironment (no underscore attributes, no mutation of
lists and dicts, unsafe callables refused):

- ``*``, ``**``, ``%`` and ``+`` are intercepted and checked *before* they allocate; Jinja
  never constant-folds an intercepted operator at compile time, so ``'a'*10**9`` cannot
  run while compiling either;
- ``~`` and list/tuple/dict literals are size-checked, and so are the filters and string
  methods that can grow a value (center, indent, replace, join, wordwrap, format, ...);
  the checks of filters run even when Jinja folds a filter call with constant arguments;
- ``range`` is capped; loop iterations and calls spend one budget per render; every
  ``{{ }}`` output and every buffer join (macros, ``{% set %}`` blocks) counts against an
  output cap, so nothing a render keeps can outgrow it;
- built-in methods are allowlisted (no ``str.format``, ``int.to_bytes``, ``dict.fromkeys``);
- the globals are ``range``, ``dict`` and ``namespace`` only (no cycler, joiner, lipsum),
  ``|attr`` and ``|pprint`` are gone, and there is no loader.

A template's remaining cost is bounded by MAX_STEPS × MAX_SIZE work.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Iterable, Iterator
from functools import update_wrapper
from typing import Any

from jinja2 import StrictUndefined, nodes, pass_context
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

MAX_SIZE = 500_000  # characters (or weighted items) of any value a template builds
MAX_OUTPUT = 2_000_000  # characters one rendered part may have
MAX_RANGE = 10_000  # items one range() may produce
MAX_STEPS = 10_000  # loop iterations plus calls in one render
MAX_INT_BITS = 4_096  # integers a template computes stay below 2**4096
FORBIDDEN_ATTRIBUTES = frozenset({"format", "format_map", "mro"})
GLOBALS = frozenset({"range", "dict", "namespace"})
_STR_METHODS = frozenset({
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha",
    "isascii", "isdecimal", "isdigit", "islower", "isnumeric", "isspace", "istitle",
    "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "rfind",
    "rindex", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip",
    "swapcase", "title", "upper", "escape", "striptags", "unescape",
    "center", "ljust", "rjust", "zfill", "expandtabs", "replace", "join",  # size-checked
})
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_CONTAINER_METHODS = frozenset({"count", "index", "copy", "get", "items", "keys", "values"})


class GuardInserter(NodeTransformer):
    """Routes loop iterables and value-building expressions of a parsed template via guards."""

    # The guards are internal pass_context filters: Jinja forbids custom node types, and it
    # never constant-folds a pass_context filter, so they run on every render.

    def __init__(self, env: Sandbox) -> None:
        self.env = env

    def _wrap(self, node: nodes.Expr, guard: str) -> nodes.Filter:
        wrapped = nodes.Filter(node, guard, [], [], None, None, lineno=node.lineno)
        return wrapped.set_environment(self.env)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, _GUARD_LOOP)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return self._wrap(self.generic_visit(node), _GUARD_SIZE)

    visit_List = visit_Dict = visit_Concat

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return self._wrap(node, _GUARD_SIZE) if node.ctx == "load" else node


class _BudgetContext(Context):
    """A render's context, carrying its remaining loop/call steps and output characters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_left = MAX_STEPS
        self.output_left = MAX_OUTPUT

    def step(self) -> None:
        """Spend one step of the render's budget."""
        self.steps_left -= 1
        if self.steps_left < 0:
            raise SecurityError(f"more than {MAX_STEPS} loop iterations and calls in one message")


def _weight(value: Any, limit: int = MAX_SIZE) -> int:
    """Characters of a string, or items plus the weight of what a container holds (capped)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 1
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        else:
            total += 1
    return total


def _check_size(size: int, what: str = "value") -> None:
    if size > MAX_SIZE:
        raise SecurityError(f"the {what} would be longer than {MAX_SIZE} characters or items")


def _check_printf(fmt: str, args: Any) -> None:
    """Refuse %-formats whose widths or precisions would allocate a lot."""
    widths = _PRINTF_SPEC.findall(fmt)
    if any("*" in pair for pair in widths):
        raise SecurityError("'*' widths are not allowed in % formats")
    _check_size(len(fmt) + _weight(args) + sum(int(w or 0) + int(p or 0) for w, p in widths))


def _int_bits(value: Any) -> int:
    return abs(value).bit_length() if isinstance(value, int) else 0


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                _check_size(_weight(seq) * max(n, 0))
        if isinstance(left, int) and isinstance(right, int) and \
                _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            raise SecurityError(f"the number would be larger than 2**{MAX_INT_BITS}")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                _int_bits(left) * right > MAX_INT_BITS:
            raise SecurityError(f"the number would be larger than 2**{MAX_INT_BITS}")
    elif operator == "%" and isinstance(left, str):
        _check_printf(left, right)
    elif operator == "+" and isinstance(left, (str, list, tuple)):
        _check_size(_weight(left) + _weight(right))


def _check_method(method: Any, args: tuple[Any, ...]) -> None:
    """Refuse built-in methods outside the allowlists and size-check the ones that grow."""
    owner, name = getattr(method, "__self__", None), method.__name__
    if isinstance(owner, str):
        if name not in _STR_METHODS:
            raise SecurityError(f"str.{name}() is not allowed in templates")
        ints = [a for a in args if isinstance(a, int)]
        if name in ("center", "ljust", "rjust", "zfill"):
            _check_size(max([len(owner), *ints]))
        elif name == "expandtabs":
            _check_size(len(owner) + owner.count("\t") * max([8, *ints]))
        elif name == "replace" and len(args) >= 2:
            _check_size(_replace_size(owner, str(args[0]), str(args[1])))
        elif name == "join" and args:
            items = list(args[0]) if not isinstance(args[0], (str, list, tuple)) else args[0]
            _check_size(_weight(items) + len(owner) * len(items))
    elif isinstance(owner, (list, tuple, dict)):
        if name not in _CONTAINER_METHODS:
            raise SecurityError(f"{type(owner).__name__}.{name}() is not allowed in templates")
    elif isinstance(method, types.BuiltinMethodType):
        raise SecurityError(f"{name}() is not allowed in templates")


def _replace_size(text: str, old: str, new: str) -> int:
    matches = len(text) + 1 if not old else text.count(old)
    return len(text) + matches * len(new)


class Sandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with bounded operators, calls, loops and output."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    context_class = _BudgetContext

    @staticmethod
    def concat(pieces: Iterable[str]) -> str:  # type: ignore[override]
        """Join a buffer (macro, {% set %} block, filter block) only if it stays bounded."""
        parts = list(pieces)
        if sum(map(len, parts)) > MAX_OUTPUT:
            raise SecurityError(f"the output is longer than {MAX_OUTPUT} characters")
        return "".join(parts)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """Underscore attributes, str.format and friends are never reachable."""
        if attr in FORBIDDEN_ATTRIBUTES:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        """No sandboxed str.format either: is_safe_attribute refuses it outright."""
        return None

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Check the size an operator would produce before computing it."""
        _check_binop(operator, left, right)
        return self.binop_table[operator](left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Count the call against the render's budget, vet it, and size-check its result."""
        if isinstance(context, _BudgetContext):
            context.step()
        if isinstance(obj, (types.BuiltinMethodType, types.MethodType)):
            _check_method(obj, args)
        result = super().call(context, obj, *args, **kwargs)
        _check_size(_weight(result), "result")
        return result


@pass_context
def _guard_loop(context: Context, iterable: Any) -> Any:
    """Iterate `iterable`, one step of the render's budget per item."""
    if isinstance(iterable, Undefined):
        return iterable  # iterating it raises the usual "is undefined" error
    return _counted(context, iterable)


def _counted(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        if isinstance(context, _BudgetContext):
            context.step()
        yield item


@pass_context
def _guard_size(context: Context, value: Any) -> Any:
    """`value`, if it is not too big."""
    _check_size(_weight(value))
    return value


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """Count every {{ }} output against the render's output budget (buffers hold them all)."""
    if isinstance(context, _BudgetContext):
        context.output_left -= len(value) if isinstance(value, str) else len(str(value))
        if context.output_left < 0:
            raise SecurityError(f"the output is longer than {MAX_OUTPUT} characters")
    return value


def _range(*args: int) -> range:
    """range() capped at MAX_RANGE items."""
    items = range(*args)
    if len(items) > MAX_RANGE:
        raise SecurityError(f"range() of more than {MAX_RANGE} items")
    return items


def _guarded_filter(f: Callable[..., Any],
                    check: Callable[[dict[str, Any]], None]) -> Callable[..., Any]:
    """`f` with `check` run on its bound arguments first (may replace iterators by lists)."""
    signature = inspect.signature(f)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check(bound.arguments)
        return f(*bound.args, **bound.kwargs)

    return update_wrapper(wrapper, f)  # keeps Jinja's pass_context/pass_eval_context marker


def _check_indent(a: dict[str, Any]) -> None:
    width = a["width"]
    pad = width if isinstance(width, str) else max(int(width), 0)
    pad_len = len(pad) if isinstance(pad, str) else pad
    _check_size(pad_len)
    _check_size(len(str(a["s"])) + (str(a["s"]).count("\n") + 1) * pad_len)


def _check_join(a: dict[str, Any]) -> None:
    items = a["value"] = list(a["value"])
    _check_size(_weight([str(i) for i in items]) + len(str(a["d"])) * len(items))


def _check_wordwrap(a: dict[str, Any]) -> None:
    if int(a["width"]) < 1:
        raise SecurityError("wordwrap width must be at least 1")
    _check_size(len(str(a["s"])) * (1 + len(a["wrapstring"] or "\n")))


def _check_count(name: str) -> Callable[[dict[str, Any]], None]:
    def check(a: dict[str, Any]) -> None:
        if int(a[name]) > MAX_RANGE:
            raise SecurityError(f"{name} larger than {MAX_RANGE}")
    return check


_FILTER_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "center": lambda a: _check_size(int(a["width"])),
    "indent": _check_indent,
    "format": lambda a: _check_printf(str(a["value"]), a["args"] or a["kwargs"]),
    "replace": lambda a: _check_size(_replace_size(str(a["s"]), str(a["old"]), str(a["new"]))),
    "join": _check_join,
    "wordwrap": _check_wordwrap,
    "batch": _check_count("linecount"),
    "slice": _check_count("slices"),
    "tojson": lambda a: _check_size(int(a["indent"] or 0) * 1000),
}
_UNSAFE_FILTERS = frozenset({"attr", "pprint"})
_GUARD_LOOP = "_bulksend_loop"  # internal filters the guard inserter adds
_GUARD_SIZE = "_bulksend_size"


def _environment(autoescape: bool) -> Sandbox:
    env = Sandbox(autoescape=autoescape, undefined=StrictUndefined, finalize=_finalize,
                  loader=None, cache_size=0, auto_reload=False)
    env.globals.clear()  # drops cycler, joiner, lipsum
    env.globals.update(range=_range, dict=dict, namespace=Namespace)
    env.filters = {
        name: _guarded_filter(f, _FILTER_CHECKS[name]) if name in _FILTER_CHECKS else f
        for name, f in FILTERS.items() if name not in _UNSAFE_FILTERS
    }
    env.filters.update({_GUARD_LOOP: _guard_loop, _GUARD_SIZE: _guard_size})
    return env


HTML_ENV = _environment(autoescape=True)
TEXT_ENV = _environment(autoescape=False)
