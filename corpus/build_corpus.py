"""Rebuild the bundled multi-domain corpus in ``corpus/<domain>/*.jsonl``.

Why this exists: the library's data tools (mixture weights, per-domain loss, the tokenizer) are
only worth testing on text whose domains really differ, and a corpus that ships inside a
repository has to be small, freely licensed and traceable. So every document here is real
human-written text taken from a pinned package of a public registry (npm, PyPI, Debian) or from
the CPython installation that runs this script, never generated; ``corpus/LICENSES.md`` lists
each source with its licence. The script is the provenance record: it is not run in CI, and it
is deterministic (pinned versions, sorted inputs, selection by a fixed hash order, fixed byte
budgets), so running it again with the same sources gives byte-identical files.

Usage (needs ``npm``, ``apt-get``/``dpkg`` and CPython 3.11.7)::

    python corpus/build_corpus.py [--cache /tmp/lightning-aquila-corpus-src] [--out corpus]

Each output line is ``{"text": ..., "source": ...}``; ``source`` names the package (or the
CPython version) and the file a document came from. Documents are cut at natural units (a poem
group, an essay, a chapter, a module, a header, a licence) and packed or split at blank lines
to roughly 1-20 KB. Texts are valid UTF-8 with ``\\n`` line endings and no control characters
but tab and newline, left otherwise as published (Unicode normalisation is the tokenizer's
job), and exact duplicates are dropped.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- pinned sources --------------------------------------------------------------------------
CHINESE_POETRY = "chinese-poetry@2.0.1"  # npm, MIT
BROTLI = ("brotli", "1.2.1")  # PyPI sdist, MIT; also carries the Canterbury corpus texts
DEBIAN = {  # Debian 12 "bookworm" binary packages
    "dict-devil": "1.0-13.1",  # The Devil's Dictionary, public domain
    "python3.11-doc": "3.11.2-6+deb12u9",  # Python docs (reST sources), PSF licence
    "base-files": "12.4+deb12u15",  # /usr/share/common-licenses
}
PYTHON_VERSION = (3, 11, 7)  # the stdlib and C headers of this CPython (PSF licence)

MAX_DOC_BYTES = 20_000  # split anything longer at blank lines
BUDGETS = {  # bytes of text to take from the sources that offer more than we want
    "python_docs": 1_000_000,
    "cpython_stdlib": 1_000_000,
    "brotli_c": 550_000,
    "cpython_include": 550_000,
}


@dataclass(frozen=True)
class Doc:
    text: str
    source: str


# --- text helpers ----------------------------------------------------------------------------
def normalise(text: str) -> str:
    """One canonical form per text, so exact deduplication also catches CRLF/trailing-space
    variants and every document is clean UTF-8 for the tokenizer."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\t\n" or unicodedata.category(c) != "Cc")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def pack(pieces: Iterable[str], max_bytes: int = MAX_DOC_BYTES, sep: str = "\n\n") -> list[str]:
    """Greedily join consecutive pieces into documents of at most ``max_bytes`` (a single
    longer piece stays whole): keeps poems, entries and paragraphs intact."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        n = len(piece.encode()) + len(sep)
        if current and size + n > max_bytes:
            docs.append(sep.join(current))
            current, size = [], 0
        current.append(piece)
        size += n
    if current:
        docs.append(sep.join(current))
    return docs


def split_blocks(text: str, max_bytes: int = MAX_DOC_BYTES) -> list[str]:
    """Split a long text at blank lines followed by an unindented line (top-level boundaries
    in code, section or paragraph starts in prose), then pack the blocks back up."""
    if len(text.encode()) <= max_bytes:
        return [text]
    return pack(re.split(r"\n\n+(?=\S)", text), max_bytes)


def hash_order(keys: Iterable[str]) -> list[str]:
    """A fixed pseudo-random order: a budgeted selection then spans the whole source rather
    than its alphabetically first files."""
    return sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())


def select(files: dict[str, str], budget: int) -> dict[str, str]:
    """Whole files in hash order until ``budget`` bytes; returned in path order."""
    chosen: dict[str, str] = {}
    used = 0
    for key in hash_order(files):
        n = len(files[key].encode())
        if used + n > budget:
            continue
        chosen[key] = files[key]
        used += n
    return dict(sorted(chosen.items()))


def looks_like_table(text: str) -> bool:
    """Generated lookup tables (numbers and commas) are not code anyone wrote by hand."""
    return sum(c.isdigit() or c in ",x{}" for c in text) > 0.4 * len(text)


# --- fetching --------------------------------------------------------------------------------
def run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch_npm(spec: str, cache: Path) -> Path:
    name, version = spec.rsplit("@", 1)
    tgz = cache / f"{name}-{version}.tgz"
    if not tgz.exists():
        run(["npm", "pack", spec, "--pack-destination", str(cache)], cache)
    return tgz


def fetch_pypi_sdist(name: str, version: str, cache: Path) -> Path:
    tgz = cache / f"{name}-{version}.tar.gz"
    if not tgz.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", "-d", str(cache), f"{name}=={version}"], cache)
    return tgz


def fetch_deb(name: str, version: str, cache: Path) -> Path:
    root = cache / f"{name}_{version}"
    if not root.exists():
        run(["apt-get", "download", f"{name}={version}"], cache)
        deb = next(cache.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
        run(["dpkg-deb", "-x", str(deb), str(root)], cache)
    return root


def read_tar_members(tgz: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    with tarfile.open(tgz) as tar:
        return {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile() and wanted(m.name)}


# --- zh_literature: chinese-poetry (npm) -----------------------------------------------------
def zh_literature(cache: Path) -> dict[str, list[Doc]]:
    """Classical Chinese poetry and prose, pre-modern (public-domain) works as compiled by the
    chinese-poetry project: the Book of Songs, Chu Ci, the Four Books, Guwen Guanzhi essays,
    Tang and Song anthologies, Cao Cao, Nalan Xingde and Youmengying."""
    prefix = "package/dist/"
    files = ["shijing/shijing.json", "chuci/chuci.json", "lunyu/lunyu.json",
             "sishuwujing/daxue.json", "sishuwujing/zhongyong.json", "sishuwujing/mengzi.json",
             "mengxue/guwenguanzhi.json", "youmengying/youmengying.json",
             "quantangshi/唐诗三百首.json", "songci/宋词三百首.json", "caocaoshiji/caocao.json",
             "nalanxingde/纳兰性德诗集.json"]
    raw = read_tar_members(fetch_npm(CHINESE_POETRY, cache),
                           lambda n: n.removeprefix(prefix) in files)
    data: dict[str, Any] = {n.removeprefix(prefix): json.loads(b) for n, b in raw.items()}
    docs: list[Doc] = []

    def add(name: str, texts: Iterable[str]) -> None:
        docs.extend(Doc(t, f"chinese-poetry/{name}") for t in texts)

    def lines(items: list[str]) -> str:
        return "\n".join(items)

    groups: dict[str, list[str]] = {}
    for poem in data["shijing/shijing.json"]:
        key = f"诗经·{poem['chapter']}·{poem['section']}"
        groups.setdefault(key, []).append(f"{poem['title']}\n{lines(poem['content'])}")
    add("shijing", (f"{k}\n\n" + "\n\n".join(v) for k, v in groups.items()))
    add("chuci", pack(f"{p['title']}\n{p['author']}\n\n{lines(p['content'])}"
                      for p in data["chuci/chuci.json"]))
    add("lunyu", (f"论语·{c['chapter']}\n\n{lines(c['paragraphs'])}"
                  for c in data["lunyu/lunyu.json"]))
    for name in ("daxue", "zhongyong"):
        c = data[f"sishuwujing/{name}.json"]
        add(name, split_blocks(f"{c['chapter']}\n\n" + "\n\n".join(c["paragraphs"])))
    for c in data["sishuwujing/mengzi.json"]:
        add("mengzi", split_blocks(f"孟子·{c['chapter']}\n\n" + "\n\n".join(c["paragraphs"])))
    for volume in data["mengxue/guwenguanzhi.json"]["content"]:
        for a in volume["content"]:
            head = f"{a['chapter']}\n{a['source']} {a['author'].strip()}\n\n"
            add("guwenguanzhi", split_blocks(head + "\n\n".join(a["paragraphs"])))
    add("youmengying", pack(lines([e["content"], *e["comment"]])
                            for e in data["youmengying/youmengying.json"]))
    by_author: dict[str, list[str]] = {}
    for p in data["quantangshi/唐诗三百首.json"]:
        by_author.setdefault(p["author"], []).append(f"{p['title']}\n{lines(p['paragraphs'])}")
    add("tangshi300", (f"{a}\n\n{t}" for a, ps in by_author.items() for t in pack(ps)))
    by_author = {}
    for p in data["songci/宋词三百首.json"]:
        by_author.setdefault(p["author"], []).append(f"{p['rhythmic']}\n{lines(p['paragraphs'])}")
    add("songci300", (f"{a}\n\n{t}" for a, ps in by_author.items() for t in pack(ps)))
    add("caocao", pack(f"{p['title']}\n{lines(p['paragraphs'])}"
                       for p in data["caocaoshiji/caocao.json"]))
    add("nalanxingde", pack(f"{p['title']}\n{lines(p['para'])}"
                            for p in data["nalanxingde/纳兰性德诗集.json"]))
    return {"chinese_poetry": docs}


# --- en_prose: Alice, the LoC workshop proceedings, The Devil's Dictionary -------------------
def en_prose(cache: Path) -> dict[str, list[Doc]]:
    """Public-domain English prose. No Project Gutenberg novel ships in these registries on
    its own, but the Canterbury compression corpus (in brotli's sdist test data) carries two
    public-domain Gutenberg etexts, and Debian ships Bierce's Devil's Dictionary."""
    name, version = BROTLI
    data = f"{name}-{version}/tests/testdata/"
    raw = read_tar_members(fetch_pypi_sdist(name, version, cache),
                           lambda n: n in {data + "alice29.txt", data + "lcet10.txt"})
    alice = normalise(raw[data + "alice29.txt"].decode("ascii"))
    title, *chapters = re.split(r"\n+(?=[ \t]*CHAPTER [IVXL]+\n)", alice)
    chapters[0] = f"{title}\n\n\n{chapters[0]}"
    out = {"alice_in_wonderland": [Doc(normalise(c), "brotli-testdata/alice29.txt")
                                   for c in chapters]}

    workshop = normalise(raw[data + "lcet10.txt"].decode("ascii")).split("\n")
    body = "\n".join(line for line in workshop if "Project Gutenberg Etext" not in line)
    out["loc_workshop_electronic_texts"] = [
        Doc(normalise(t), "brotli-testdata/lcet10.txt")
        for t in pack(re.split(r"\n\n+", normalise(body)), 12_000)]

    root = fetch_deb("dict-devil", DEBIAN["dict-devil"], cache)
    dictd = root / "usr/share/dictd"
    raw_bytes = gzip.decompress((dictd / "devil.dict.dz").read_bytes())  # dictzip is gzip
    spans: dict[int, tuple[str, int]] = {}
    for line in (dictd / "devil.index").read_text("utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00database"):
            spans.setdefault(b64(offset), (word, b64(length)))
    info = next(line for line in (dictd / "devil.index").read_text("utf-8").splitlines()
                if line.startswith("00databaseinfo\t"))
    _, off, ln = info.split("\t")
    preface = raw_bytes[b64(off):b64(off) + b64(ln)].decode()
    preface = preface[preface.index("PREFACE"):]
    by_letter: dict[str, list[str]] = {}
    for offset in sorted(spans):
        word, length = spans[offset]
        entry = normalise(raw_bytes[offset:offset + length].decode())
        by_letter.setdefault(word[0].upper(), []).append(entry)
    texts = [normalise(preface)] + [t for entries in by_letter.values()
                                    for t in pack(entries, 16_000)]
    out["devils_dictionary"] = [Doc(t, "dict-devil/devil.dict") for t in texts]
    return out


def b64(value: str) -> int:
    """dictd index numbers are base64 digits."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in value:
        n = n * 64 + alphabet.index(c)
    return n


# --- en_tech_docs: the Python 3.11 documentation sources -------------------------------------
def en_tech_docs(cache: Path) -> dict[str, list[Doc]]:
    """reStructuredText sources of the Python docs (tutorial, how-tos, library and language
    reference): long-form technical English with inline code, as Sphinx ships them."""
    root = fetch_deb("python3.11-doc", DEBIAN["python3.11-doc"], cache)
    base = root / "usr/share/doc/python3.11/html/_sources"
    files = {}
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix()
        text = normalise(path.read_text("utf-8"))
        if rel.startswith("whatsnew/changelog") or not 2_000 <= len(text.encode()) <= 100_000:
            continue
        files[rel.removesuffix(".txt")] = text
    chosen = select(files, BUDGETS["python_docs"])
    return {"python_docs": [Doc(t, f"python3.11-doc/{rel}")
                            for rel, text in chosen.items() for t in split_blocks(text)]}


# --- code_python: the CPython standard library -----------------------------------------------
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings",
              "pydoc_data", "_bundled"}


def code_python(cache: Path) -> dict[str, list[Doc]]:
    """Hand-written Python modules of the standard library (tests, generated codec tables and
    the pydoc topic dump left out)."""
    base = Path(sysconfig.get_paths()["stdlib"])
    files = {}
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if SKIP_PARTS & set(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        try:
            text = normalise(path.read_text("utf-8"))
        except UnicodeDecodeError:
            continue
        if 1_000 <= len(text.encode()) <= 60_000:
            files[f"Lib/{rel.as_posix()}"] = text
    chosen = select(files, BUDGETS["cpython_stdlib"])
    tag = "cpython-{}.{}.{}".format(*PYTHON_VERSION)
    return {"cpython_stdlib": [Doc(t, f"{tag}/{rel}")
                               for rel, text in chosen.items() for t in split_blocks(text)]}


# --- code_c: brotli's C implementation and CPython's public headers --------------------------
def code_c(cache: Path) -> dict[str, list[Doc]]:
    """Two C styles: an implementation (brotli's encoder/decoder, MIT) and an API surface
    (CPython's ``Include/`` headers, PSF); generated lookup tables left out."""
    name, version = BROTLI
    top = f"{name}-{version}/"
    raw = read_tar_members(fetch_pypi_sdist(name, version, cache),
                           lambda n: n.startswith(top + "c/") and n.endswith((".c", ".h")))
    files = {}
    for member, blob in sorted(raw.items()):
        text = normalise(blob.decode("utf-8"))
        if 1_000 <= len(text.encode()) <= 100_000 and not looks_like_table(text):
            files[member.removeprefix(top)] = text
    out = {"brotli": [Doc(t, f"brotli-{version}/{rel}")
                      for rel, text in select(files, BUDGETS["brotli_c"]).items()
                      for t in split_blocks(text)]}

    include = Path(sysconfig.get_paths()["include"])
    files = {}
    for path in sorted(include.rglob("*.h")):
        text = normalise(path.read_text("utf-8"))
        if len(text.encode()) >= 1_000 and not looks_like_table(text):
            files[f"Include/{path.relative_to(include).as_posix()}"] = text
    tag = "cpython-{}.{}.{}".format(*PYTHON_VERSION)
    out["cpython_include"] = [Doc(t, f"{tag}/{rel}")
                              for rel, text in select(files, BUDGETS["cpython_include"]).items()
                              for t in split_blocks(text)]
    return out


# --- en_legal: licence texts -----------------------------------------------------------------
def en_legal(cache: Path) -> dict[str, list[Doc]]:
    """The full licence texts Debian ships in base-files: formal legal English. Each licence
    is one document (aliases such as GPL -> GPL-3 fall out in deduplication)."""
    root = fetch_deb("base-files", DEBIAN["base-files"], cache)
    base = root / "usr/share/common-licenses"
    docs = [Doc(normalise(p.read_text("utf-8")), f"common-licenses/{p.name}")
            for p in sorted(base.iterdir()) if p.is_file() and not p.is_symlink()]
    return {"common_licenses": docs}


DOMAINS: dict[str, Callable[[Path], dict[str, list[Doc]]]] = {
    "code_c": code_c,
    "code_python": code_python,
    "en_legal": en_legal,
    "en_prose": en_prose,
    "en_tech_docs": en_tech_docs,
    "zh_literature": zh_literature,
}


# --- output ----------------------------------------------------------------------------------
def deduplicate(docs: Iterable[Doc], seen: set[str]) -> Iterator[Doc]:
    """Exact duplicates (after normalisation, ignoring whitespace runs) are dropped; the first
    occurrence in domain/file/document order wins."""
    for doc in docs:
        key = hashlib.sha256(" ".join(doc.text.split()).encode()).hexdigest()
        if doc.text.strip() and key not in seen:
            seen.add(key)
            yield doc


def write_jsonl(path: Path, docs: list[Doc]) -> str:
    lines = "".join(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n"
                    for d in docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines, "utf-8")
    return hashlib.sha256(lines.encode()).hexdigest()


def write_domain(domain: str, files: dict[str, list[Doc]], out: Path,
                 seen: set[str]) -> dict[str, dict[str, Any]]:
    """Write ``out/<domain>/<name>.jsonl`` for each of a domain's files, dropping documents
    already ``seen`` (in any domain); returns the domain's manifest entries."""
    entries = {}
    for name, docs in sorted(files.items()):
        kept = list(deduplicate(docs, seen))
        sha = write_jsonl(out / domain / f"{name}.jsonl", kept)
        size = sum(len(d.text.encode()) for d in kept)
        entries[f"{name}.jsonl"] = {"docs": len(kept), "text_bytes": size, "sha256": sha}
        print(f"{domain}/{name}.jsonl: {len(kept)} docs, {size:,} bytes "
              f"({len(docs) - len(kept)} duplicates dropped)", flush=True)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lightning-aquila-corpus-src"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--domain", action="append", choices=sorted(DOMAINS),
                        help="rebuild only these domains (default: all)")
    args = parser.parse_args(argv)
    if sys.version_info[:3] != PYTHON_VERSION:
        parser.error("run with CPython {}.{}.{}: its stdlib and headers are a pinned source"
                     .format(*PYTHON_VERSION))
    args.cache.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for domain in sorted(args.domain or DOMAINS):
        manifest[domain] = write_domain(domain, DOMAINS[domain](args.cache), args.out, seen)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
