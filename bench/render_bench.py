"""Rendering speed: bulksend's finished messages against a plain Jinja2 render of the same HTML.

    .venv/bin/python bench/render_bench.py [--messages 20000] [--rounds 3] [--dkim-messages 5000]

The template is the shipped newsletter (templates/newsletter.html, ~6 KB, 5 merge fields:
name, city, email, unsubscribe_url, campaign) with the text part generated from the HTML.
Prints messages/s of (a) `jinja2.Template.render` of that HTML (non-sandboxed, autoescape,
same data), (b) `Renderer.render` (subject, HTML, generated text, headers, MIME, bytes),
their ratio b/a, the same with 8BITMIME, and, when bulksend.dkim is there, render + sign
with an RSA-2048 and an Ed25519 key. Each figure is the best of --rounds runs, rounds
interleaved, because the machine is shared. Target (issue 3): b/a >= 0.2.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jinja2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bulksend.render import (  # noqa: E402
    MessageSettings, Recipient, Renderer, compile_templates,
)

FIRST = ["Anna", "Boris", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Irina", "Jonas",
         "Иван", "Мария", "Ольга", "Пётр", "José", "Zoë", ""]
LAST = ["Ivanova", "Petrov", "Müller", "Smirnova", "García", "Novak", "Кузнецов", "Соколова"]
CITIES = ["Moscow", "Berlin", "Kazan", "Madrid", "Paris", "Riga", "Москва", "Новосибирск", ""]
DOMAINS = ["gmail.com", "yandex.ru", "mail.ru", "outlook.com", "company.example.com"]
SUBJECT = "{{ name }}, what is new in {{ campaign }}"
CAMPAIGN = "June issue"


def recipients(count: int) -> list[Recipient]:
    """Recipients like a real list: mixed scripts, some without a name or a city."""
    rng = random.Random(2026)
    people = []
    for i in range(count):
        token = "%032x" % rng.getrandbits(128)
        people.append(Recipient(
            email=f"user{i}.{rng.randrange(10**6)}@{rng.choice(DOMAINS)}",
            name=f"{rng.choice(FIRST)} {rng.choice(LAST)}".strip(),
            attributes={"city": rng.choice(CITIES)},
            message_id=f"<{token}@news.example.com>",
            unsubscribe_url=f"https://news.example.com/u/{token}",
            unsubscribe_mailto=f"unsubscribe+{token}@news.example.com",
            delivery_token=token,
            date=1_780_000_000.0 + i / 1000,
        ))
    return people


def rate(count: int, run: Callable[[], object]) -> float:
    """Messages per second of `run`, which handles `count` messages."""
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def signers(directory: Path) -> list[tuple[str, object, Callable[..., bytes]]]:
    """RSA-2048 and Ed25519 signers from keys written into `directory`; [] without bulksend.dkim."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from bulksend import dkim
    from bulksend.config import DkimKey

    found = []
    for label, algorithm, key in (
            ("RSA-2048", "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            ("Ed25519", "ed25519", ed25519.Ed25519PrivateKey.generate())):
        path = directory / f"{algorithm}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        signer = dkim.load_signer(DkimKey("news.example.com", "s2026", path, algorithm))
        found.append((label, signer, dkim.sign))
    return found


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dkim-messages", type=int, default=5_000)
    args = parser.parse_args()

    html = (ROOT / "templates" / "newsletter.html").read_text(encoding="utf-8")
    known = frozenset({"email", "name", "unsubscribe_url", "campaign", "city"})
    templates = compile_templates(SUBJECT, html, None, known=known,
                                  html_name="newsletter.html")
    settings = MessageSettings(
        from_header="Example News <news@news.example.com>", reply_to="help@example.com",
        list_id="news.example.com", feedback_id="june:news:bulksend", eight_bit=False,
        campaign=CAMPAIGN)
    renderer = Renderer(templates, settings)
    renderer_8bit = Renderer(templates, dataclasses.replace(settings, eight_bit=True))
    plain = jinja2.Environment(autoescape=True).from_string(html)
    people = recipients(args.messages)
    data = [{"email": p.email, "name": p.name, "unsubscribe_url": p.unsubscribe_url,
             "campaign": CAMPAIGN, "city": p.attributes["city"]} for p in people]
    size = len(renderer.render(people[0]))

    def jinja_only() -> None:
        for variables in data:
            plain.render(variables)

    def bulksend(r: Renderer = renderer) -> None:
        for person in people:
            r.render(person)

    best = {"jinja": 0.0, "bulksend": 0.0, "8bit": 0.0}
    for _ in range(args.rounds):
        best["jinja"] = max(best["jinja"], rate(len(data), jinja_only))
        best["bulksend"] = max(best["bulksend"], rate(len(people), bulksend))
        best["8bit"] = max(best["8bit"], rate(len(people), lambda: bulksend(renderer_8bit)))
    ratio = best["bulksend"] / best["jinja"]
    print(f"template: newsletter.html, {len(html)} characters, 5 fields, text part generated; "
          f"{args.messages} messages of ~{size} bytes, best of {args.rounds} rounds")
    print(f"(a) plain Jinja2 Template.render:         {best['jinja']:9.0f} messages/s")
    print(f"(b) bulksend Renderer.render (QP):        {best['bulksend']:9.0f} messages/s")
    print(f"    bulksend Renderer.render (8BITMIME):  {best['8bit']:9.0f} messages/s")
    print(f"ratio b/a: {ratio:.3f} (target >= 0.2: {'met' if ratio >= 0.2 else 'NOT met'})")

    with tempfile.TemporaryDirectory() as directory:
        try:
            found = signers(Path(directory))
        except Exception as exc:  # noqa: BLE001 - any failure just means no DKIM figures
            print(f"DKIM: not available ({type(exc).__name__}: {exc})")
            return
        some = people[:args.dkim_messages]
        for label, signer, sign in found:
            def signed(signer: object = signer, sign: Callable[..., bytes] = sign) -> None:
                for person in some:
                    sign(renderer.render(person), signer)
            try:
                fastest = max(rate(len(some), signed) for _ in range(args.rounds))
            except Exception as exc:  # noqa: BLE001
                print(f"DKIM {label}: not available ({type(exc).__name__}: {exc})")
                continue
            print(f"(c) bulksend render + DKIM {label:9s} {fastest:9.0f} messages/s "
                  f"(ratio to a: {fastest / best['jinja']:.3f})")


if __name__ == "__main__":
    main()
