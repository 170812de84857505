"""A mixed, deterministic, offline corpus for the heuristic filters: what tests/test_curate_heuristics.py
checks against datatrove and benchmarks/cpu_filters.py times. Not a test module (no ``test_`` prefix).

``mixed_corpus()`` gives 674 documents ``(id, text)``; the id starts with the kind:

- ``prose``: docstrings of the Python standard library (the embedded stdlib corpus), as written
  (wrapped lines) and unwrapped (one line a paragraph, the way web pages come out of an extractor);
- ``code``: standard library modules' source;
- ``web``: articles assembled from docstring sentences with headings, a menu, a footer;
- ``list``: bullet and numbered lists, shopping lists, link lists, tables of numbers;
- ``spam``: repeated lines and paragraphs, keyword stuffing, repeated phrases;
- ``boilerplate``: cookie banners, navigation menus, lorem ipsum, "enable JavaScript", legal footers;
- ``lang``: sentences in 23 languages and 12 scripts (tests/data/curate_multilingual.txt), one
  language a document or mixed;
- ``social``: posts with hashtags, ellipses, emoji and links;
- ``short`` and ``edge``: a few words, empty and blank texts, punctuation only, huge words, JSON,
  Wikipedia-style citations, Windows line ends.

Same Python version (the stdlib corpus is its source), same documents.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from llamaherd.data.stdlib_corpus import stdlib_documents

MULTILINGUAL = Path(__file__).parent / "data" / "curate_multilingual.txt"
MAX_CHARS = 20_000  # long modules are cut (at a line end) so that datatrove runs in seconds


def _cut(text: str, limit: int = MAX_CHARS) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind("\n", 0, limit)
    return text[: end if end > 0 else limit]


def _unwrap(text: str) -> str:
    """One line per paragraph: the wrapped lines of each paragraph joined by spaces."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paras)


def _sentences(texts: list[str]) -> list[str]:
    """Plain sentences (ending with a period, 6 to 40 words) out of docstrings."""
    out = []
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split())):
            if s.endswith(".") and 6 <= len(s.split()) <= 40 and not re.search(r"[{}<>=|`]|\.\.\.|>>>", s):
                out.append(s)
    return out


def _languages() -> dict[str, list[str]]:
    langs: dict[str, list[str]] = {}
    for line in MULTILINGUAL.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\[(\w+)\] (.+)", line)
        if m:
            langs.setdefault(m.group(1), []).append(m.group(2))
    return langs


MENU = ["Home", "About us", "Products", "Services", "Blog", "News", "Contact", "Careers", "FAQ", "Support",
        "Shop", "Login", "Sign up", "Search", "Events", "Gallery", "Downloads", "Pricing"]
COOKIE = [
    "This website uses cookies to ensure you get the best experience on our website.",
    "We use cookies to personalise content and ads and to analyse our traffic. Accept all cookies?",
    "By continuing to browse you agree to our use of cookies. Learn more in our Cookie Policy.",
    "Please read our Privacy Policy and Terms of Use before using this site.",
]
JS = ["Please enable JavaScript in your browser to view this page.",
      "JavaScript is disabled. For a better experience, please enable JavaScript in your browser before proceeding.",
      "You need to enable JavaScript to run this app."]
FOOTER = ["Copyright © 2024 Example Corp. All rights reserved.", "Privacy Policy | Terms of Use | Sitemap",
          "Follow us on Facebook, Twitter and Instagram", "Subscribe to our newsletter", "Back to top"]
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
         "ex ea commodo consequat.")
SPAM_WORDS = ["cheap", "best", "price", "buy", "online", "discount", "free", "shipping", "casino", "bonus",
              "loans", "fast", "deal", "watches", "replica", "pills", "sale", "offer", "now", "click"]
PRODUCTS = ["apples", "bread", "milk", "eggs", "coffee", "rice", "tomatoes", "cheese", "butter", "onions",
            "pasta", "olive oil", "tea", "sugar", "flour", "yogurt", "carrots", "lemons", "honey", "salt"]
HASHTAGS = ["#python", "#coding", "#travel", "#food", "#love", "#instagood", "#photooftheday", "#tbt",
            "#nofilter", "#summer", "#weekend", "#news", "#AI", "#data"]
EMOJI = ["😀", "😂", "👍", "🎉", "❤️", "🔥", "✨", "🙏", "😎", "🥳", "🤔", "🌞"]


def mixed_corpus() -> list[tuple[str, str]]:
    """The corpus: a list of (id, text), the same on every call."""
    rng = random.Random(20240611)
    prose = [d for d in stdlib_documents("all", kinds=("prose",))]
    code = [d for d in stdlib_documents("all", kinds=("code",))]
    docs: list[tuple[str, str]] = []

    def add(kind: str, name: str, text: str) -> None:
        docs.append((f"{kind}:{name}:{len(docs)}", text))

    for i, d in enumerate(prose[::3]):
        module = d.id.rsplit(":", 1)[-1]
        text = _cut(d.text)
        add("prose", module, _unwrap(text) if i % 2 else text)
    for d in code[::6]:
        add("code", d.id.rsplit(":", 1)[-1], _cut(d.text))

    sentences = _sentences([d.text for d in prose])
    for i in range(70):  # web articles
        body = []
        for _ in range(rng.randint(1, 7)):
            body.append(" ".join(rng.sample(sentences, rng.randint(1, 6))))
            if rng.random() < 0.3:
                body.append(rng.choice(["Introduction", "Overview", "Details", "Examples", "Notes", "See also",
                                        "## Usage", "### Parameters", "Summary:"]))
        parts = []
        if i % 3 == 0:
            parts.append("\n".join(rng.sample(MENU, rng.randint(3, 9))))
        parts.append(f"{rng.choice(['How to', 'Why', 'A guide to', 'Understanding'])} "
                     f"{rng.choice(['files', 'sockets', 'threads', 'dates', 'numbers', 'strings'])}")
        parts += body
        if i % 4 == 0:
            parts.append("\n".join(rng.sample(FOOTER, rng.randint(1, 4))))
        add("web", str(i), ("\n\n" if i % 2 else "\n").join(parts))

    for i in range(50):  # lists
        style = i % 5
        items = rng.sample(PRODUCTS + MENU, rng.randint(3, 25))
        if style == 0:
            text = "\n".join(f"- {x}" for x in items)
        elif style == 1:
            text = "Shopping list:\n" + "\n".join(f"• {x} ({rng.randint(1, 5)})" for x in items)
        elif style == 2:
            text = "\n".join(f"{k + 1}. {x.capitalize()} is on the list for this week." for k, x in enumerate(items))
        elif style == 3:
            text = "\n".join(f"{x}\t{rng.randint(1, 999)}\t{rng.random():.3f}" for x in items)
        else:
            intro = " ".join(rng.sample(sentences, 2))
            text = intro + "\n\n" + "\n".join(f"  * [{x}](https://example.com/{x.replace(' ', '-')})" for x in items)
        add("list", str(style), text)

    for i in range(50):  # spam
        style = i % 5
        if style == 0:
            line = rng.choice(sentences)
            text = "\n".join([line] * rng.randint(3, 30))
        elif style == 1:
            text = " ".join(rng.choice(SPAM_WORDS) for _ in range(rng.randint(30, 400)))
        elif style == 2:
            para = " ".join(rng.sample(sentences, 3))
            others = rng.sample(sentences, 4)
            text = "\n\n".join([para, others[0], para, others[1], para, others[2], para])
        elif style == 3:
            phrase = " ".join(rng.sample(SPAM_WORDS, rng.randint(2, 4)))
            text = ". ".join(f"{phrase} {rng.choice(SPAM_WORDS)}" for _ in range(rng.randint(10, 80))) + "."
        else:
            base = rng.sample(sentences, 6)
            text = "\n".join(base + base[:rng.randint(1, 6)] + rng.sample(sentences, 3))
        add("spam", str(style), text)

    for i in range(45):  # boilerplate
        style = i % 6
        body = " ".join(rng.sample(sentences, rng.randint(2, 12)))
        if style == 0:
            text = rng.choice(COOKIE) + "\n" + body
        elif style == 1:
            text = " | ".join(rng.sample(MENU, 8)) + "\n\n" + body + "\n\n" + "\n".join(FOOTER)
        elif style == 2:
            text = (LOREM + "\n") * rng.randint(1, 3) + body
        elif style == 3:
            text = rng.choice(JS) + "\n" + "\n".join(rng.sample(MENU, 5))
        elif style == 4:
            text = body.replace(". ", ".\n") + "\n" + "\n".join(rng.sample(COOKIE, 2))
        else:
            text = "\n".join(rng.sample(sentences, rng.randint(5, 10))) + "\n" + rng.choice(JS)
        add("boilerplate", str(style), text)

    langs = _languages()
    for lang, lines in sorted(langs.items()):  # one language a document, two layouts
        shuffled = rng.sample(lines, len(lines))
        add("lang", lang, "\n".join(shuffled))
        add("lang", lang, " ".join(shuffled * 3))
    codes = sorted(langs)
    for i in range(20):  # several languages, with English
        picked = rng.sample(codes, rng.randint(2, 5))
        lines = [s for c in picked for s in langs[c]] + rng.sample(sentences, rng.randint(0, 8))
        rng.shuffle(lines)
        add("lang", "mixed", "\n".join(lines) if i % 2 else " ".join(lines))

    for i in range(40):  # social posts
        words = rng.sample(sentences, rng.randint(1, 4))
        text = " ".join(words)
        if i % 4 == 0:
            text += " " + " ".join(rng.sample(HASHTAGS, rng.randint(3, 10)))
        elif i % 4 == 1:
            text = "...\n".join(w.rstrip(".") for w in words) + "..."
        elif i % 4 == 2:
            link = f" https://t.co/{rng.randint(1000, 9999)}"
            text = " ".join(w + " " + rng.choice(EMOJI) for w in words) + link
        else:
            text = "\n".join(f"### {w}" if k % 2 == 0 else w + "…" for k, w in enumerate(words))
        add("social", str(i % 4), text)

    for i in range(30):  # short
        add("short", str(i), " ".join(rng.sample(sentences, 1 + i % 3))[: rng.randint(10, 400)])

    edge = [
        "", " ", "\n\n\n", "word", "...", "# # # #", "- - -", "{}", "!!! ???", "\t\t",
        "The end.", "x" * 5000, "A " + "y" * 1200 + " sentence here.",
        '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
        "The Eiffel Tower[1] is a tower in Paris.[2] It was built in 1889.[citation needed] "
        "It is 330 m tall.[edit] It was the tallest structure in the world until 1930.[3]",
        "\r\n".join(rng.sample(sentences, 8)),
        "Mr. Smith went to Washington, D.C. at 5 p.m. on Jan. 3rd. He met Dr. Jones, Ph.D., e.g. a friend. "
        "They didn't stay long. It's over. U.S. officials weren't there. Wasn't it odd? Yes!",
        "\u00a0".join(rng.sample(sentences, 5)),
        "\n".join("- " + s for s in rng.sample(sentences, 20)),
        "\n".join(s + " ..." for s in rng.sample(sentences, 10)),
        " ".join(["#"] * 60 + rng.sample(sentences, 3)),
        "\"Quoted line one.\"\n'Quoted line two.'\n\"Quoted line three!\"\n(Parenthesised line.)\nDone?",
    ]
    for i, text in enumerate(edge):
        add("edge", str(i), text)
    return docs
