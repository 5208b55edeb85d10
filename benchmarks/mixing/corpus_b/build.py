"""Build corpus B of the mixing benchmark: 12 domains of other kinds and sizes than corpus A.

Why this exists: a mixture policy that only ever met corpus A (8 domains, 15x apart, ~55M
tokens) may be tuned to it. Corpus B has another shape: 12 domains whose sizes span ~65x in
training tokens (one large domain, a long tail of small ones), ~18M tokens in all (3 epochs
~55M tokens), and kinds of text corpus A does not have: Rust, Racket/Scheme, Perl, OCaml and
Octave code, Markdown books, English dictionaries, and German, Spanish, French, Russian and
Japanese. The rules are corpus A's (``../build_corpus.py``): real human-written text from
pinned packages of public registries (here Debian 12 "bookworm" only), never generated;
deterministic (pinned versions, sorted inputs, selection in a fixed hash order to fixed byte
budgets, exact deduplication within and across domains); documents of at most 20 KB (longer
texts cut at blank lines, then at line breaks). ``LICENSES.md`` lists every source with its
licence; ``manifest.json`` holds the SHA-256, documents and text bytes of every output file.

Every Debian package here is pinned at the version bookworm released with (no ``+deb12uN``
security or point-release update), because those are the versions the archive keeps; corpus
A's pin of ``linux-libc-dev`` 6.1.192-2 was superseded by a security update and can no longer
be downloaded.

Usage (needs ``apt-get``/``dpkg-deb`` with Debian 12 sources, ``apt-get update`` once)::

    python benchmarks/mixing/corpus_b/build.py --out /work/mixing-corpus-b \\
        [--cache /tmp/lightning-aquila-mixing-b-src] [--sample /tmp/aq-tok-sample-b]

Output: ``OUT/<domain>/<source>.jsonl``, lines ``{"text": ..., "source": ...}``. ``--sample``
also writes the tokenizer's training sample, the first 4 MB of each domain's files in sorted
order, one .jsonl per domain (see README.md).
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Callable
from pathlib import Path

# corpus A's builder (benchmarks/mixing/build_corpus.py), which puts the repository root on
# sys.path for its own helpers (corpus/build_corpus.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_corpus import budgeted, cap, decode, fetch_deb, generated, man_page_texts, sword_books
from build_corpus import main as build_main

from corpus.build_corpus import Doc, b64, looks_like_table, normalise, pack

# --- pinned sources: Debian 12 "bookworm" binary packages, as released ----------------------
DEBIAN = {
    "rust-src": "1.63.0+dfsg1-2",  # MIT OR Apache-2.0 (Rust 1.63 sources and books)
    "racket-common": "8.7+dfsg1-1",  # Racket collects: MIT OR Apache-2.0 (LGPL-2.1+ parts)
    "guile-3.0-libs": "3.0.8-2",  # LGPL-3+
    "ocaml": "4.13.1-4",  # LGPL-2.1 with the OCaml linking exception
    "octave-common": "7.3.0-2",  # GPL-3+
    "libmojolicious-perl": "9.31+dfsg-1",  # Artistic-2.0
    "perltidy": "20220613-1",  # GPL-2+
    "libperl-critic-perl": "1.148-1",  # Artistic-1.0 OR GPL-1+
    "libdbix-class-perl": "0.082843-1",  # Artistic-1.0 OR GPL-1+
    "manpages-de": "4.18.1-1",  # translations GPL-3+
    "manpages-fr": "4.18.1-1",
    "manpages-es": "4.18.1-1",
    "manpages-ru": "4.18.1-1",
    "manpages-ja": "0.5.0.0.20221215+dfsg-1",  # JM project: each original page's licence
    "fortunes-de": "0.35-1",  # GPL-2+
    "fortunes-es": "1.36",  # GPL-2+ (quotes presumed public domain)
    "fortunes-ru": "1.52-3.1",  # GPL-2 / GPL-2+
    "sword-text-sparv": "2.60-1",  # Reina-Valera 1909, public domain
    "dict-gcide": "0.48.5+nmu2",  # GPL-2+
    "dict-foldoc": "20230119-1",  # GFDL-1.1+
    "dict-jargon": "4.4.7-3.1",  # public domain
    "dict-vera": "1:1.24-1",  # GFDL-1.1+, no invariant sections
}

# bytes of text per source (a domain with several sources gives each its own budget, so no
# one source crowds out the others); sized so that the domains' token counts span ~65x
BUDGETS = {
    "code_rust": 40_000_000,  # compiler, library and tools together
    "racket": 7_600_000,
    "guile": 1_450_000,
    "gcide": 3_300_000,
    "foldoc": 1_200_000,
    "jargon": 450_000,
    "vera": 250_000,
    "manpages-de": 2_500_000,
    "fortunes-de": 900_000,
    "manpages-ja": 3_200_000,
    "en_markdown": 2_100_000,
    "manpages-ru": 1_180_000,
    "fortunes-ru": 750_000,
    "perl": 340_000,  # per Perl package (perltidy has less in files <= 200 KB)
    "sword-text-sparv": 500_000,
    "manpages-es": 290_000,
    "fortunes-es": 180_000,
    "code_ocaml": 890_000,
    "manpages-fr": 720_000,
    "code_octave": 690_000,
}
SAMPLE_BYTES = 4_000_000  # per domain, for the tokenizer sample
RUST = "usr/src/rustc-1.63.0"


# --- helpers ---------------------------------------------------------------------------------
def deb(name: str, cache: Path) -> Path:
    return fetch_deb(name, DEBIAN[name], cache)


def source_files(root: Path, suffixes: tuple[str, ...], lo: int = 500,
                 hi: int = 200_000, code: bool = True) -> dict[str, str]:
    """UTF-8 files under ``root`` ending in one of ``suffixes`` (symlinks left out), keyed by
    their path relative to ``root``; code files that look generated or are tables are left
    out."""
    files = {}
    for path in sorted(root.rglob("*")):
        if not path.name.endswith(suffixes) or path.is_symlink() or not path.is_file():
            continue
        text = decode(path.read_bytes())
        if not text or not lo <= len(text.encode()) <= hi:
            continue
        if code and (generated(text) or looks_like_table(text)):
            continue
        files[path.relative_to(root).as_posix()] = text
    return files


def man_pages(pkg: str, lang: str, cache: Path) -> dict[str, str]:
    """A translated manual-page package's roff sources (``.so`` redirections left out),
    keyed ``pkg/<section>/<page>``."""
    return man_page_texts(deb(pkg, cache) / "usr/share/man" / lang, pkg, min_bytes=500,
                          keep_suffix=False)


def man_docs(pkg: str, lang: str, cache: Path) -> list[Doc]:
    return budgeted(man_pages(pkg, lang, cache), BUDGETS[pkg], lambda k: k)


def fortunes(pkg: str, lang: str, cache: Path) -> list[Doc]:
    """fortune cookie files: entries packed into documents of up to 8 KB within each file
    (corpus A's rule), then those documents in hash order to the package's budget; the
    offensive subdirectory (``off/``) is left out."""
    base = deb(pkg, cache) / "usr/share/games/fortunes" / lang
    units = {}
    for path in sorted(base.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
            continue
        text = decode(path.read_bytes())
        if not text:
            continue
        entries = [normalise(e) for e in text.split("\n%\n") if normalise(e)]
        for i, t in enumerate(pack(entries, 8_000)):
            units[f"{pkg}/{path.name}/{i:04d}"] = t
    return budgeted(units, BUDGETS[pkg], lambda k: k.rsplit("/", 1)[0])


def dictd(pkg: str, name: str, cache: Path) -> list[Doc]:
    """A dictd database (``.index`` + dictzip ``.dict.dz``, which is gzip): its entries in
    file order, grouped by the headword's first letter and packed into documents of up to
    16 KB (as corpus A packs The Devil's Dictionary), then those documents in hash order to
    the budget. An entry that is not valid UTF-8 is left out."""
    dictd_dir = deb(pkg, cache) / "usr/share/dictd"
    raw = gzip.decompress((dictd_dir / f"{name}.dict.dz").read_bytes())
    spans: dict[int, tuple[str, int]] = {}
    for line in (dictd_dir / f"{name}.index").read_text("utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00"):
            spans.setdefault(b64(offset), (word, b64(length)))
    by_letter: dict[str, list[str]] = {}
    for offset in sorted(spans):
        word, length = spans[offset]
        entry = decode(raw[offset:offset + length])  # None: not UTF-8 (9 GCIDE entries)
        if entry:
            letter = word[0].upper() if word[0].isalpha() and word[0].isascii() else "0"
            by_letter.setdefault(letter, []).append(entry)
    units = {f"{pkg}/{letter}/{i:05d}": t for letter, entries in sorted(by_letter.items())
             for i, t in enumerate(pack(entries, 16_000))}
    return budgeted(units, BUDGETS[name], lambda k: f"{pkg}/{name}.dict")


def sword_ztext(pkg: str, module: str, cache: Path) -> list[Doc]:
    """A SWORD zText Bible module (zlib blocks, one per book, of OSIS markup): footnotes and
    markup dropped, paragraphs and titles kept (corpus A's rule for the World English Bible),
    each book cut into documents of at most 20 KB, then those in hash order to the budget."""
    root = deb(pkg, cache) / "usr/share/sword/modules/texts/ztext" / module
    units = {f"{pkg}/{testament}/book{i:02d}/{j:03d}": t
             for testament, i, text in sword_books(root) for j, t in enumerate(cap(text))}
    return budgeted(units, BUDGETS[pkg], lambda k: k.rsplit("/", 1)[0])


# --- code ------------------------------------------------------------------------------------
def code_rust(cache: Path) -> dict[str, list[Doc]]:
    """Rust: the compiler (``compiler/``), the standard library (``library/``) and the tools
    (``src/librustdoc``, ``src/tools``: rustdoc, clippy, rustfmt, compiletest, ...) of Rust
    1.63, their tests included; ``stdarch`` (SIMD intrinsic bindings, largely generated) and
    the compiler's UI test programs (``src/test``) left out; one budget over all three."""
    root = deb("rust-src", cache) / RUST
    files = {}
    for top in ("compiler", "library", "src/librustdoc", "src/tools"):
        files.update((f"{top}/{k}", v) for k, v in source_files(root / top, (".rs",)).items()
                     if not k.startswith("stdarch/"))
    docs = budgeted(files, BUDGETS["code_rust"], lambda k: f"rust-src/{k}")
    return {name: [d for d in docs if d.source.startswith(prefix)] for name, prefix in
            (("compiler", "rust-src/compiler/"), ("library", "rust-src/library/"),
             ("tools", "rust-src/src/"))}


def code_lisp(cache: Path) -> dict[str, list[Doc]]:
    """Lisp family: Racket's collections and packages (``.rkt``) and GNU Guile's Scheme
    library (``.scm``)."""
    root = deb("racket-common", cache) / "usr/share/racket"
    racket = budgeted(source_files(root, (".rkt",)), BUDGETS["racket"],
                      lambda k: f"racket-common/{k}")
    root = deb("guile-3.0-libs", cache) / "usr/share/guile/3.0"
    guile = budgeted(source_files(root, (".scm",)), BUDGETS["guile"],
                     lambda k: f"guile-3.0-libs/{k}")
    return {"racket": racket, "guile": guile}


def code_perl(cache: Path) -> dict[str, list[Doc]]:
    """Perl modules with their POD: Mojolicious (web), Perl::Tidy, Perl::Critic and
    DBIx::Class (ORM), each to its own budget."""
    out = {}
    for pkg in ("libmojolicious-perl", "perltidy", "libperl-critic-perl", "libdbix-class-perl"):
        root = deb(pkg, cache) / "usr/share/perl5"
        out[pkg] = budgeted(source_files(root, (".pm", ".pod")), BUDGETS["perl"],
                            lambda k, p=pkg: f"{p}/{k}")
    return out


def code_ocaml(cache: Path) -> dict[str, list[Doc]]:
    """OCaml: the 4.13 standard library's implementations and interfaces (``.ml``,
    ``.mli``, whose doc comments are its documentation)."""
    root = deb("ocaml", cache) / "usr/lib/ocaml"
    files = source_files(root, (".ml", ".mli"), lo=300)
    return {"ocaml_stdlib": budgeted(files, BUDGETS["code_ocaml"], lambda k: f"ocaml/{k}")}


def code_octave(cache: Path) -> dict[str, list[Doc]]:
    """GNU Octave's function library (``.m``, the MATLAB language), help texts and tests
    inside each function file."""
    root = deb("octave-common", cache) / "usr/share/octave/7.3.0/m"
    files = source_files(root, (".m",), lo=300)
    return {"octave_m": budgeted(files, BUDGETS["code_octave"],
                                 lambda k: f"octave-common/m/{k}")}


# --- docs and dictionaries -------------------------------------------------------------------
def en_markdown(cache: Path) -> dict[str, list[Doc]]:
    """Markdown books shipped with Rust 1.63 (The Rust Programming Language, the Reference,
    the Rustonomicon, Rust by Example, the rustc and rustdoc books, the rustc-dev-guide, the
    Edition Guide, the Embedded book, the Unstable book) and the compiler's error-code
    explanations; one budget over all."""
    root = deb("rust-src", cache) / RUST
    files = {f"src/doc/{k}": v for k, v in
             source_files(root / "src/doc", (".md",), code=False).items()}
    files.update((f"compiler/rustc_error_codes/{k}", v) for k, v in
                 source_files(root / "compiler/rustc_error_codes", (".md",), lo=300,
                              code=False).items())
    docs = budgeted(files, BUDGETS["en_markdown"], lambda k: f"rust-src/{k}")
    return {"rust_books": [d for d in docs if d.source.startswith("rust-src/src/doc/")],
            "rustc_error_codes": [d for d in docs if "/rustc_error_codes/" in d.source]}


def en_dict(cache: Path) -> dict[str, list[Doc]]:
    """English dictionaries in dictd format: GCIDE (Webster's 1913 + WordNet), FOLDOC
    (computing), the Jargon File and V.E.R.A. (computing acronyms)."""
    return {"gcide": dictd("dict-gcide", "gcide", cache),
            "foldoc": dictd("dict-foldoc", "foldoc", cache),
            "jargon": dictd("dict-jargon", "jargon", cache),
            "vera": dictd("dict-vera", "vera", cache)}


# --- natural languages -----------------------------------------------------------------------
def de(cache: Path) -> dict[str, list[Doc]]:
    """German: the Linux/GNU manual pages translated by manpages-l10n (roff), and German
    fortune cookies (sayings, quotes, jokes)."""
    return {"manpages_de": man_docs("manpages-de", "de", cache),
            "fortunes_de": fortunes("fortunes-de", "de", cache)}


def es(cache: Path) -> dict[str, list[Doc]]:
    """Spanish: the Reina-Valera 1909 Bible, manual pages (manpages-l10n, roff) and Spanish
    fortune cookies."""
    return {"reina_valera_1909": sword_ztext("sword-text-sparv", "spaRV1909eb", cache),
            "manpages_es": man_docs("manpages-es", "es", cache),
            "fortunes_es": fortunes("fortunes-es", "es", cache)}


def fr(cache: Path) -> dict[str, list[Doc]]:
    """French: manual pages translated by manpages-l10n (roff)."""
    return {"manpages_fr": man_docs("manpages-fr", "fr", cache)}


def ru(cache: Path) -> dict[str, list[Doc]]:
    """Russian: manual pages (manpages-l10n, roff) and Russian fortune cookies."""
    return {"manpages_ru": man_docs("manpages-ru", "ru", cache),
            "fortunes_ru": fortunes("fortunes-ru", "ru", cache)}


def ja(cache: Path) -> dict[str, list[Doc]]:
    """Japanese: the JM project's translated manual pages (roff)."""
    return {"manpages_ja": man_docs("manpages-ja", "ja", cache)}


DOMAINS: dict[str, Callable[[Path], dict[str, list[Doc]]]] = {
    "code_lisp": code_lisp,
    "code_ocaml": code_ocaml,
    "code_octave": code_octave,
    "code_perl": code_perl,
    "code_rust": code_rust,
    "de": de,
    "en_dict": en_dict,
    "en_markdown": en_markdown,
    "es": es,
    "fr": fr,
    "ja": ja,
    "ru": ru,
}


def main(argv: list[str] | None = None) -> int:
    return build_main(argv, domains=DOMAINS, cache=Path("/tmp/lightning-aquila-mixing-b-src"),
                      manifest=Path(__file__).resolve().parent / "manifest.json",
                      description=__doc__, sample_bytes=SAMPLE_BYTES)


if __name__ == "__main__":
    sys.exit(main())
