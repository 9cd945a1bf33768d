"""HTML → readable plain text for the text/plain part, fast enough to run per recipient.

`html_to_text` parses with the stdlib `html.parser` into blocks (paragraphs, headings, list
items, table cells), then lays each block out: whitespace collapsed, ``<br>`` kept, links as
"text (url)", lines wrapped at 76 columns without ever breaking a word or URL.

Parsing a 6 KB newsletter costs far more than rendering it, so a `TextPlan` is built once
per *shape* of a template's output: the pieces Jinja yields are static template text
(string constants of the compiled template, recognised by identity) or merged values.
`marked_html` replaces the values by private-use marker characters; the plan parses that
once, lays out the blocks without markers, and per recipient only fills in, collapses and
wraps the blocks holding values. The result is the text `html_to_text` gives for the full
HTML; a value carrying markup (``|safe``, macros) makes the caller fall back to the parse.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from operator import itemgetter
from typing import Union

WIDTH = 76
BR = "\x00"  # a hard line break inside a block; NUL in the text itself becomes U+FFFD
MARK = 0xF0000  # first slot marker: Supplementary Private Use Area-A
MAX_SLOTS = 0xFFFD
MAX_RECENT = 4096  # encoded blocks remembered per plan

_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details",
    "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1",
    "h2", "h3", "h4", "h5", "h6", "header", "hgroup", "html", "main", "nav", "p", "section",
    "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
})
_SKIP_TAGS = frozenset({"head", "script", "style", "template", "title"})
_VOID_TAGS = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
    "source", "track", "wbr",
})
_INVISIBLE = re.compile("[\u00ad\u034f\u200b-\u200f\u2060\ufeff]")  # soft hyphen, ZW chars
_MARKS = re.compile("[\U000f0000-\U000ffffd]")
_BLANK_LINES = (b"", b"", b"\r\n")  # between blocks ending in CRLF, by their gap
_DISPLAY_NONE = re.compile(r"display\s*:\s*none", re.IGNORECASE)

LinkStart = tuple[str, str]  # ("a", href) opens a link, ("/a", "") closes it
Item = Union[str, LinkStart]


@dataclass(frozen=True)
class _Block:
    """One paragraph-level unit: its gap before, line prefixes, and inline items."""

    gap: int  # newlines before it: 1 between list items, 2 between paragraphs
    first: str  # prefix of its first line ("- ", "2. ", indentation)
    rest: str  # prefix of every other line
    pre: bool
    items: tuple[Item, ...]


def html_to_text(markup: str) -> str:
    """Readable plain text of an HTML document (see the module docstring for the rules)."""
    return _join([(block.gap, _layout(block)) for block in _parse(markup).blocks])


def marked_html(pieces: Sequence[str], static: Collection[int]) -> str | None:
    """`pieces` joined with slot k's value replaced by chr(MARK + k); None if impossible."""
    marked: list[str] = []
    slots = 0
    for piece in pieces:
        if id(piece) in static:
            if _MARKS.search(piece):
                return None  # the template itself uses our marker characters
            marked.append(piece)
        elif slots < MAX_SLOTS:
            marked.append(chr(MARK + slots))
            slots += 1
        else:
            return None
    return "".join(marked)


def slot_format(marked: str) -> str:
    """`marked` as a str.format template: slot k becomes {k}, so .format(*values) fills it."""
    escaped = marked.replace("{", "{{").replace("}", "}}")
    return _MARKS.sub(lambda m: "{%d}" % (ord(m.group()) - MARK), escaped)


def slot_values(values: Sequence[str]) -> list[str] | None:
    """Rendered values (HTML-escaped) as the text they show; None if one carries markup."""
    texts: list[str] = []
    for value in values:
        if "<" in value:
            return None  # a value carrying tags (|safe, a macro): the shape no longer tells
        if "&" in value:
            value = html.unescape(value)
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        texts.append(_INVISIBLE.sub("", value) if not value.isascii() else str(value))
    return texts


@dataclass(frozen=True)
class _Flat:
    """A block with slots whose links are resolved already: only fill, collapse and wrap."""

    first: str
    rest: str
    text: str  # a slot_format template; BR separates forced lines
    slot_links: tuple[tuple[int, str], ...]  # (slot, label) of links whose href is one slot
    block: _Block  # the general way, when a slot_link's value is not a plain URL
    slots: tuple[int, ...]  # the slots it shows: its text depends on nothing else


class TextPlan:
    """One shape's text: fixed blocks laid out once, blocks with slots filled per recipient.

    With `encode` (text → bytes of complete lines, e.g. quoted-printable), the fixed blocks
    are also encoded once and `render_encoded` only encodes what the values changed.
    """

    def __init__(self, entries: list[tuple[int, str | _Flat | _Block]],
                 encode: Callable[[str], bytes] | None) -> None:
        self._entries = _merge_fixed(entries)
        # For render_encoded: (gap, bytes of a fixed block or None, entry, its slots' getter).
        self._steps = [
            (gap, encode(entry) if encode is not None and isinstance(entry, str) else None,
             entry, itemgetter(*entry.slots) if isinstance(entry, _Flat) and entry.slots else None)
            for gap, entry in self._entries
        ]
        # Encoded blocks by the values they show: {{ campaign }}, or a city, repeat a lot.
        self._recent: dict[tuple[int, object], bytes] = {}

    @classmethod
    def build(cls, marked: str, encode: Callable[[str], bytes] | None = None) -> TextPlan | None:
        """The plan for HTML with slot markers (see `marked_html`); None if slots shape it."""
        parser = _parse(marked)
        if parser.structural_mark:
            return None
        entries: list[tuple[int, str | _Flat | _Block]] = []
        for block in parser.blocks:
            if any(_MARKS.search(i if isinstance(i, str) else i[1]) for i in block.items):
                entries.append((block.gap, _flatten(block) or block))
            else:
                entries.append((block.gap, _layout(block)))
        return cls(entries, encode)

    def render(self, texts: list[str]) -> str:
        """The text with the slots filled from `texts` (see `slot_values`)."""
        return _join([(gap, self._fill(entry, texts)) for gap, entry in self._entries])

    def render_encoded(self, texts: list[str], encode: Callable[[str], bytes]) -> bytes:
        """`encode(render(texts))`, reusing the fixed blocks' encoding (each ends a line)."""
        out: list[bytes] = []
        pending = 0
        recent = self._recent
        for i, (gap, data, entry, slots) in enumerate(self._steps):
            if gap > pending:
                pending = gap
            if data is None:
                key = (i, slots(texts)) if slots is not None else None
                data = recent.get(key) if key is not None else None  # type: ignore[arg-type]
                if data is None:
                    text = self._fill(entry, texts)
                    data = encode(text) if text else b""
                    if key is not None:
                        if len(recent) >= MAX_RECENT:
                            recent.clear()
                        recent[key] = data
                if not data:
                    continue
            if out:
                out.append(_BLANK_LINES[pending])
            out.append(data)
            pending = 0
        return b"".join(out) or encode("")

    @staticmethod
    def _fill(entry: str | _Flat | _Block, texts: list[str]) -> str:
        if isinstance(entry, str):
            return entry
        if isinstance(entry, _Flat) and all(_plain_href(texts[slot], label)
                                            for slot, label in entry.slot_links):
            return _lines(entry.text.format(*texts).split(BR), entry.first, entry.rest)
        block = entry.block if isinstance(entry, _Flat) else entry
        return _layout(_fill(block, {MARK + k: text for k, text in enumerate(texts)}))


def _merge_fixed(entries: list[tuple[int, str | _Flat | _Block]]
                 ) -> list[tuple[int, str | _Flat | _Block]]:
    """Neighbouring laid-out blocks joined into one; empty ones folded into the next gap."""
    merged: list[tuple[int, str | _Flat | _Block]] = []
    pending = 0
    for gap, entry in entries:
        gap = max(pending, gap)
        pending = 0
        if isinstance(entry, str):
            if not entry:
                pending = gap
                continue
            if merged and isinstance(merged[-1][1], str):
                before_gap, before = merged[-1]
                merged[-1] = (before_gap, before + "\n" * gap + entry)
                continue
        merged.append((gap, entry))
    return merged  # trailing empty blocks separate nothing


def _flatten(block: _Block) -> _Flat | None:
    """`block` as a _Flat, if no slot sits in a link label or inside a longer href."""
    if block.pre:
        return None
    parts: list[str] = []
    slot_links: list[tuple[int, str]] = []
    link: tuple[str, int] | None = None
    for item in block.items:
        if isinstance(item, str):
            if link is not None and _MARKS.search(item):
                return None
            parts.append(item)
        elif item[0] == "a":
            if link is not None:
                return None
            link = (item[1].strip(), len(parts))
        elif link is not None:
            href, start = link
            link = None
            if not _MARKS.search(href):
                _close_link(parts, start, href)
                continue
            label = " ".join("".join(parts[start:]).split())
            if len(href) != 1 or not label:
                return None
            slot_links.append((ord(href) - MARK, label))
            parts.append(f" ({href})")
    marked = _INVISIBLE.sub("", "".join(parts))
    slots = tuple(sorted({ord(m) - MARK for m in _MARKS.findall(marked)}))
    return _Flat(block.first, block.rest, slot_format(marked), tuple(slot_links), block, slots)


def _plain_href(href: str, label: str) -> bool:
    """Whether _close_link would write this slot's link as "label (href)"."""
    return (href != label and href[:1] not in ("", "#") and href.split() == [href]
            and not href[:11].lower().startswith(("javascript:", "data:"))
            and href.removeprefix("mailto:") != label)


def _fill(block: _Block, table: dict[int, str]) -> _Block:
    items = tuple(i.translate(table) if isinstance(i, str) else (i[0], i[1].translate(table))
                  for i in block.items)
    return _Block(block.gap, block.first, block.rest, block.pre, items)


def _join(entries: Iterable[tuple[int, str]]) -> str:
    out: list[str] = []
    pending = 0
    for gap, text in entries:
        pending = max(pending, gap)  # an empty block still separates its neighbours
        if text:
            if out:
                out.append("\n" * pending)
            out.append(text)
            pending = 0
    return "".join(out)


# --- parsing ----------------------------------------------------------------------------------

class _Parser(HTMLParser):
    """Collects blocks; skips head, scripts, styles and elements hidden with display:none."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[_Block] = []
        self.items: list[Item] = []
        self.gap = 0
        self.first = self.rest = ""
        self.lists: list[list[int]] = []  # [ordered, items so far] per open list
        self.pre = 0
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.structural_mark = False  # a slot marker where it would change the structure

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open a block, list, link or skipped element; put images' alt text inline."""
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_depth += 1
            if not (tag == "body" and self.skip_tag == "head"):  # <head> left unclosed
                return
            self.skip_tag = None
        values = dict(attrs)
        style = values.get("style") or ""
        if _MARKS.search(tag + "".join(name for name, _ in attrs) + style) or (
                "hidden" in values and _MARKS.search(values["hidden"] or "")):
            self.structural_mark = True
        if tag in _SKIP_TAGS or "hidden" in values or _DISPLAY_NONE.search(style):
            if tag not in _VOID_TAGS:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "br":
            self.items.append(BR)
        elif tag == "a":
            self.items.append(("a", values.get("href") or ""))
        elif tag == "img":
            self.items.append(values.get("alt") or "")
        elif tag in ("ul", "ol"):
            self._break(1 if self.lists else 2)
            self.lists.append([tag == "ol", 0])
        elif tag == "li":
            self._break(1)
            indent = "  " * (len(self.lists) - 1)
            marker = "- "
            if self.lists and self.lists[-1][0]:
                self.lists[-1][1] += 1
                marker = f"{self.lists[-1][1]}. "
            self.first, self.rest = indent + marker, indent + " " * len(marker)
        elif tag == "pre":
            self._break(2)
            self.pre += 1
        elif tag == "hr":
            self._break(2)
            self.items.append("-" * 30)
            self._break(2)
        elif tag in _BLOCK_TAGS:
            self._break(2)

    def handle_endtag(self, tag: str) -> None:
        """Close what handle_starttag opened."""
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "a":
            self.items.append(("/a", ""))
        elif tag in ("ul", "ol", "li"):
            self._break(1)
            if tag != "li" and self.lists:
                self.lists.pop()
                self.gap = max(self.gap, 1 if self.lists else 2)
            self.first = self.rest = "  " * len(self.lists)
        elif tag == "pre":
            self._break(2)
            self.pre = max(0, self.pre - 1)
        elif tag in _BLOCK_TAGS:
            self._break(2)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """<br/>, <img/>, and <div/> as if written <div></div>."""
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS:
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        """Text, unless inside a skipped element."""
        if self.skip_tag is not None:
            return
        if "\x00" in data:
            data = data.replace("\x00", "\ufffd")
        if self.pre:
            data = data.replace("\r\n", "\n").replace("\r", "\n").replace("\n", BR)
        self.items.append(data)

    def _break(self, gap: int) -> None:
        if _has_content(self.items):
            self.blocks.append(_Block(self.gap, self.first, self.rest, self.pre > 0,
                                      tuple(self.items)))
            self.gap = 0
            self.first = self.rest
        self.items = []
        self.gap = max(self.gap, gap)


def _has_content(items: list[Item]) -> bool:
    return any(bool(i[1].strip()) if isinstance(i, tuple) and i[0] == "a"
               else isinstance(i, str) and bool(i.replace(BR, " ").strip()) for i in items)


def _parse(markup: str) -> _Parser:
    parser = _Parser()
    parser.feed(markup)
    parser.close()
    parser._break(0)
    return parser


# --- layout -----------------------------------------------------------------------------------

def _layout(block: _Block) -> str:
    parts: list[str] = []
    links: list[tuple[str, int]] = []
    for item in block.items:
        if isinstance(item, str):
            parts.append(item)
        elif item[0] == "a":
            links.append((item[1], len(parts)))
        elif links:
            href, start = links.pop()
            _close_link(parts, start, href)
    text = _INVISIBLE.sub("", "".join(parts))
    if not block.pre:
        return _lines(text.split(BR), block.first, block.rest)
    lines = [line.rstrip() for line in text.split(BR)]
    if lines and not lines[0]:
        lines.pop(0)  # HTML ignores a newline right after <pre>
    return _prefixed(lines, block.first, block.rest)


def _close_link(parts: list[str], start: int, href: str) -> None:
    href = "%20".join(href.split())
    if not href or href.startswith("#") or href.lower().startswith(("javascript:", "data:")):
        return
    label = " ".join("".join(parts[start:]).split())
    if not label:
        parts.append(" " + href)
    elif label != href and label != href.removeprefix("mailto:"):
        parts.append(f" ({href})")


def _lines(raw_lines: list[str], first: str, rest: str) -> str:
    """Each raw line whitespace-collapsed and wrapped, then prefixed."""
    room = WIDTH - len(rest)
    if len(raw_lines) == 1:  # the usual paragraph: no <br>
        text = " ".join(raw_lines[0].split())
        if len(text) <= room:
            return first + text if text else ""
        if not first and not rest:
            return "\n".join(_wrapper(room).findall(text))
    wrap = _wrapper(room)
    lines: list[str] = []
    for raw in raw_lines:
        text = " ".join(raw.split())
        lines.extend(wrap.findall(text) if text else ("",))
    return _prefixed(lines, first, rest)


def _prefixed(lines: list[str], first: str, rest: str) -> str:
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        return ""
    if not first and not rest:
        return "\n".join(lines)
    return "\n".join([first + lines[0], *((rest + line).rstrip() for line in lines[1:])])


_WRAPPERS: dict[int, re.Pattern[str]] = {}


def _wrapper(room: int) -> re.Pattern[str]:
    """A pattern whose findall gives greedy lines of at most `room` columns; a longer word
    (a URL) gets a line of its own and is never split."""
    pattern = _WRAPPERS.get(room)
    if pattern is None:
        pattern = _WRAPPERS[room] = re.compile(rf"(.{{1,{max(room, 1)}}}(?= |$)|[^ ]+) ?")
    return pattern
