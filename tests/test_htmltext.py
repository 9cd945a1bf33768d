"""HTML → plain text for the generated text/plain part."""

from __future__ import annotations

import pytest

from bulksend.htmltext import html_to_text

LONG_URL = "https://example.com/" + "a" * 90


@pytest.mark.parametrize(("html", "text"), [
    ("<p>One</p><p>Two</p>", "One\n\nTwo"),
    ("<h1>Title</h1><p>Body</p>", "Title\n\nBody"),
    ("<p>line one<br>line two<br/>three</p>", "line one\nline two\nthree"),
    ("<p>a<br><br>b</p>", "a\n\nb"),
    ("<ul><li>one</li><li>two</li></ul>", "- one\n- two"),
    ("<ol><li>one</li><li>two</li></ol>", "1. one\n2. two"),
    ("<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>", "- a\n  - b\n- c"),
    ("<p>Before</p><ul><li>x</li></ul><p>After</p>", "Before\n\n- x\n\nAfter"),
    ('<p>See <a href="https://example.com/x">our site</a>.</p>',
     "See our site (https://example.com/x)."),
    ('<a href="https://example.com/">https://example.com/</a>', "https://example.com/"),
    ('<a href="mailto:a@example.com">a@example.com</a>', "a@example.com"),
    ('<a href="https://example.com/"><img src="x.png"></a>', "https://example.com/"),
    ('<a href="https://example.com/"><img src="x.png" alt="Logo"></a>',
     "Logo (https://example.com/)"),
    ('<a href="#top">Top</a> <a href="javascript:void(0)">JS</a>', "Top JS"),
    ('<img src="x.png" alt="A chart"> <img src="y.png">', "A chart"),
    ("<p>Tom &amp; Jerry &lt;3 &nbsp;&eacute;t&eacute; &#8212; &#x41;</p>",
     "Tom & Jerry <3 été — A"),
    ("<p>  lots   of\n\n   space\t here </p>", "lots of space here"),
    ("<head><title>T</title><style>p { color: red }</style></head><body><p>Hi</p></body>",
     "Hi"),
    ("<p>a</p><script>alert('<p>x</p>')</script><p>b</p>", "a\n\nb"),
    ('<div style="display:none">preheader</div><p>Hi</p>', "Hi"),
    ('<div style="DISPLAY: None;max-height:0"><b>pre</b>header</div><p>Hi</p>', "Hi"),
    ('<p hidden>secret</p><p>Hi</p>', "Hi"),
    ("<pre>  code\n    indented\n</pre>", "  code\n    indented"),
    ("<table><tr><td>cell 1</td><td>cell 2</td></tr></table>", "cell 1\n\ncell 2"),
    ("<p>a</p><hr><p>b</p>", "a\n\n" + "-" * 30 + "\n\nb"),
    ("<p>zero&zwnj;width&#8203;chars&#847;</p>", "zerowidthchars"),
    ("<p>" + "word " * 20 + "</p>",
     ("word " * 15).strip() + "\n" + ("word " * 5).strip()),
    (f'<p>Go to <a href="{LONG_URL}">the page</a> now</p>', f"Go to the page\n({LONG_URL})\nnow"),
    (f"<p>{LONG_URL}</p>", LONG_URL),
    ("<ul><li>" + "item " * 20 + "</li></ul>",
     "- " + ("item " * 15).strip() + "\n  " + ("item " * 5).strip()),
    ("", ""),
    ("plain text, no tags", "plain text, no tags"),
    ("<p>unclosed <b>bold<p>next", "unclosed bold\n\nnext"),
    ("<p>nul\x00here</p>", "nul\ufffdhere"),
])
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


def test_lines_are_wrapped_at_76_and_urls_never_broken() -> None:
    html = "<p>" + " ".join(f"w{i} https://example.com/{'p' * i}" for i in range(60)) + "</p>"
    text = html_to_text(html)
    for line in text.split("\n"):
        assert len(line) <= 76 or (" " not in line and line.startswith("https://"))
    assert text.split() == html[3:-4].split()
