"""Reading one TOML table of bulksend.toml: typed takes, unknown keys and secrets refused.

A `Section` pops each key through a parser from `config_values`; whatever is left when the
section is done is a typo (answered with a "did you mean") or a secret written into the file
(answered with the `*_env` key to use instead). Messages read `FILE: KEY.PATH: problem`.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bulksend import config_values as values
from bulksend.errors import ConfigError

T = TypeVar("T")
_REQUIRED: Any = object()
_SECRET_WORDS = {"password", "passwd", "pass", "pwd", "passphrase", "secret", "token", "apikey"}


class Section:
    """One TOML table being read: `take` pops a key through a parser, `done` refuses leftovers."""

    def __init__(self, data: dict[str, Any], path: str, source: Path, base: Path) -> None:
        self.data, self.path, self.source, self.base = dict(data), path, source, base
        self.known: list[str] = []

    def key(self, name: str) -> str:
        """The key path of `name` in this table, for messages."""
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ConfigError:
        """A ConfigError about key `name` of this table."""
        return ConfigError(f"{self.source}: {self.key(name)}: {problem}")

    def label(self, name: str) -> None:
        """Call this table `accounts "name"` instead of `accounts[3]` from now on."""
        self.path = re.sub(r"\[\d+\]$", lambda _: f' "{name}"', self.path)

    def take(self, name: str, parse: Callable[[Any], T], default: T = _REQUIRED) -> T:
        """Key `name` parsed; `default` if absent; ConfigError if absent and required."""
        self.known.append(name)
        if name in self.data:
            return self._parse(name, self.data.pop(name), parse)
        if default is _REQUIRED:
            raise self.error(name, f"missing; {_expectation(parse)}")
        return default

    def take_list(self, name: str, parse: Callable[[Any], T]) -> tuple[T, ...]:
        """Key `name` as an array (default empty), each item parsed; errors name the index."""
        items = self.take(name, values.array, [])
        return tuple(self._parse(f"{name}[{i}]", item, parse) for i, item in enumerate(items))

    def table(self, name: str, build: Callable[[Section], T], default: T) -> T:
        """Sub-table `name` built by `build`, or `default` when absent."""
        raw = self.take(name, values.table, None)
        return default if raw is None else self._child(raw, self.key(name), build)

    def tables(self, name: str, build: Callable[[Section], T],
               unique: Callable[[T], str]) -> tuple[T, ...]:
        """Array of tables [[name]], each built by `build`; `unique` names must not repeat."""
        raw = self.take(name, _array_of_tables(name), [])
        built = [self._child(item, f"{self.key(name)}[{i}]", build) for i, item in enumerate(raw)]
        names = [unique(item) for item in built]
        for index, value in enumerate(names):
            if value in names[:index]:
                first = names.index(value)
                problem = f'duplicate "{value}" (already used by {name}[{first}])'
                raise self.error(f"{name}[{index}]", problem)
        return tuple(built)

    def done(self) -> None:
        """Refuse the first key nobody took: a secret, or a typo (with a suggestion)."""
        self.refuse_secrets()
        if self.data:
            name = next(iter(self.data))
            raise self.error(name, f"unknown key ({_suggestion(name, self.known)})")

    def refuse_secrets(self) -> None:
        """Refuse a key that holds a secret (`password`, `token`, ...) among those not taken yet."""
        for name in self.data:
            if _looks_secret(name):
                raise self.error(name, _secret_problem(name, self.known))

    def _child(self, data: dict[str, Any], path: str, build: Callable[[Section], T]) -> T:
        child = Section(data, path, self.source, self.base)
        try:
            value = build(child)
        except ConfigError:
            child.refuse_secrets()  # a secret written into the file outranks any other mistake
            raise
        child.done()
        return value

    def _parse(self, key: str, value: object, parse: Callable[[Any], T]) -> T:
        try:
            return parse(value)
        except values.Problem as exc:
            raise self.error(key, str(exc)) from None
        except ValueError as exc:
            raise self.error(key, f"{exc}, got {_show(value)}") from None


def _array_of_tables(name: str) -> Callable[[object], list[dict[str, Any]]]:
    def parse(value: object) -> list[dict[str, Any]]:
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            return value
        raise ValueError(f"expected an array of tables, each written [[{name}]]")
    return parse


def _expectation(parse: Callable[[Any], object]) -> str:
    """What `parse` expects, learned by feeding it nothing (every parser refuses None)."""
    try:
        parse(None)
    except ValueError as exc:
        return str(exc)
    return "required"


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    words = set(re.split(r"[^a-z0-9]+", lowered))
    return not lowered.endswith(("_env", "_file")) and bool(
        words & _SECRET_WORDS or {"api", "key"} <= words or "private_key" in lowered)


def _suggestion(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known here: {', '.join(known) or 'none'}"


def _secret_problem(name: str, known: list[str]) -> str:
    # Name the key to use instead: password → password_env, private_key → private_key_file.
    refused = "secrets are refused in the config file"
    files = difflib.get_close_matches(name, [k for k in known if k.endswith("_file")], n=1)
    envs = difflib.get_close_matches(name, [k for k in known if k.endswith("_env")], n=1, cutoff=0)
    if files:
        return f"{refused}; put it in a file and name that file with {files[0]}"
    if envs:
        return (f"{refused}; put it in an environment variable "
                f'and write its name as {envs[0]} = "VARIABLE"')
    return f"{refused}; bulksend reads them only from environment variables named by *_env keys"


def syntax_error(exc: tomllib.TOMLDecodeError, text: str, source: Path) -> ConfigError:
    """A TOML syntax error as `FILE:LINE:COLUMN: invalid TOML: …`."""
    message = str(exc)
    where = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if where:
        problem = message[:where.start()]
        return ConfigError(f"{source}:{where[1]}:{where[2]}: invalid TOML: {problem}")
    lines = text.split("\n")  # "(at end of document)": point at the end
    message = message.removesuffix(" (at end of document)")
    return ConfigError(f"{source}:{len(lines)}:{len(lines[-1]) + 1}: invalid TOML: {message}")


def _show(value: object) -> str:
    """`value` as TOML-like text for messages, cut short."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= 60 else shown[:57] + "..."
