"""Low-quality text made from clean text, the kinds a web crawl is full of: pages that are
mostly navigation and boilerplate, near-duplicate copies, text whose sentences lost their
order, text decoded with the wrong encoding (mojibake), and truncated fragments.

Each maker is a pure function of (text, ``random.Random``), so a corpus built from them is
reproducible from its seed. They degrade *real* documents of the domain rather than invent
text, so the junk has the domain's vocabulary and a classifier cannot separate it by topic:
only by what makes it junk.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

#: Every kind of document the quality corpus holds, by the number stored with it
#: (``prepare --quality-field kind``): 0 is clean text, the others are junk.
KINDS = ("clean", "boilerplate", "near_duplicate", "shuffled", "mojibake", "truncated")

_SITES = ("DevDocs Hub", "CodeRef Online", "TechWiki", "ManPage Mirror", "DocsArchive",
          "LearnProgramming.net", "The Reference Desk", "OpenManuals")
_NAV = (
    "Home | Docs | Tutorials | Blog | Forum | Contact",
    "Skip to main content",
    "Sign in   Register   Help",
    "Search this site...",
    "Menu",
    "You are here: Home » Documentation » {title}",
    "Share: Facebook  Twitter  LinkedIn  Reddit  Email",
    "Cookies help us deliver our services. By using our services, you agree to our use of "
    "cookies. Learn more   OK",
    "© {year} {site}. All rights reserved. | Privacy Policy | Terms of Use | Sitemap",
    "Related posts:",
    "Tags: {word}, {word2}, tutorial, howto, reference",
    "« Previous   Next »",
    "Subscribe to our newsletter and never miss an update!",
    "Page 1 of {pages}   1 2 3 … Next »",
    "Advertisement",
    "Was this page helpful?  Yes  No",
    "Posted in {word} | {comments} Comments",
    "Recent Posts",
    "Categories",
    "Archives: January {year} | February {year} | March {year}",
    "Back to top ↑",
    "Print this page",
    "Login to reply",
    "Powered by WordPress | Theme by {site}",
)
_SENTENCE = re.compile(r"(?<=[.!?:;])\s+|\n+")
_WORD = re.compile(r"[A-Za-z]{4,}")


def _title(text: str) -> str:
    first = next((line.strip() for line in text.splitlines() if line.strip()), "Untitled")
    return first[:70]


def _fill(line: str, text: str, rng: random.Random, site: str) -> str:
    words = _WORD.findall(text) or ["docs"]
    return line.format(title=_title(text), year=rng.randint(2009, 2024), site=site,
                       word=rng.choice(words).lower(), word2=rng.choice(words).lower(),
                       pages=rng.randint(2, 40), comments=rng.randint(0, 99))


def boilerplate(text: str, rng: random.Random) -> str:
    """A page that is mostly navigation, cookie banners and footers around a sentence or two
    of the document (what a boilerplate-heavy crawled page keeps after HTML extraction)."""
    site = rng.choice(_SITES)
    sentences = [s.strip() for s in _SENTENCE.split(text) if len(s.strip()) > 20]
    start = rng.randrange(max(1, len(sentences)))
    snippet = " ".join(sentences[start:start + rng.randint(1, 2)]) or _title(text)
    head = [_fill(rng.choice(_NAV), text, rng, site) for _ in range(rng.randint(5, 12))]
    foot = [_fill(rng.choice(_NAV), text, rng, site) for _ in range(rng.randint(5, 12))]
    return "\n".join([*head, _title(text), snippet, *foot])


def near_duplicate(text: str, rng: random.Random) -> str:
    """A scraped copy of the document: a few words dropped or swapped, a mirror's header and
    footer added (near-duplicate pages differ from their source by such small edits)."""
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        kept = [w for w in words if rng.random() > 0.05]
        for _ in range(len(kept) // 40):
            i = rng.randrange(max(1, len(kept) - 1))
            kept[i:i + 2] = kept[i:i + 2][::-1]
        lines.append(" ".join(kept))
    site = rng.choice(_SITES)
    header = f"{_title(text)} - {site}\nPosted by admin on {rng.randint(1, 28)}/" \
             f"{rng.randint(1, 12)}/{rng.randint(2009, 2024)}"
    footer = f"Source: {site}. Read more »"
    return "\n".join([header, *lines, footer])


def shuffled(text: str, rng: random.Random) -> str:
    """The document's sentences in random order (spun or badly re-assembled pages: every
    sentence is fluent, the text is not)."""
    sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    rng.shuffle(sentences)
    return " ".join(sentences)


_SMART = {"'": "\u2019", " - ": " \u2014 ", "...": "\u2026", "--": "\u2013"}


def mojibake(text: str, rng: random.Random) -> str:
    """UTF-8 read as Windows-1252, once or twice: typographic quotes, dashes and no-break
    spaces (which a web page has and plain ASCII lacks) become ``â€™``, ``â€"`` and ``Â``,
    and a few bytes are lost to U+FFFD."""
    out = text
    for plain, smart in _SMART.items():
        out = out.replace(plain, smart)
    out = re.sub(r'"([^"\n]*)"', "\u201c\\1\u201d", out)
    out = "".join("\u00a0" if c == " " and rng.random() < 0.15 else c for c in out)
    for _ in range(rng.choice((1, 1, 2))):
        out = out.encode("utf-8").decode("cp1252", errors="replace")
    return "".join("\ufffd" if c.isalpha() and rng.random() < 0.01 else c for c in out)


def truncated(text: str, rng: random.Random) -> str:
    """A fragment of 60 to 400 characters cut mid-word at both ends (what is left of a page
    after a failed fetch or a snippet box)."""
    size = rng.randint(60, 400)
    start = rng.randrange(max(1, len(text) - size))
    fragment = text[start:start + size]
    return fragment + rng.choice(("", "", "…", " [Read more]", " ..."))


#: The makers by kind, in :data:`KINDS` order (clean excluded).
MAKERS: dict[str, Callable[[str, random.Random], str]] = {
    "boilerplate": boilerplate, "near_duplicate": near_duplicate, "shuffled": shuffled,
    "mojibake": mojibake, "truncated": truncated}
