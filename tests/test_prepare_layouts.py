"""``prepare`` with users' own file layouts: one big text file per domain, a directory of
files without extensions, empty inputs, repeated files; no split ends up empty by accident."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_aquila.cli.tools import prepare_command as main
from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.prepare import guess_language, prepare
from lightning_aquila.datamodules.split import HELDOUT_WINDOW_TOKENS
from lightning_aquila.datamodules.store import ShardStore, iter_documents
from lightning_aquila.tokenizer import load_tokenizer


def book(path: Path, lines: int, seed: int = 0) -> Path:
    """A single long text file: ~13 tokens a line with the bundled tokenizer."""
    words = np.random.default_rng(seed).choice(
        ["court", "contract", "party", "shall", "notice", "term", "law", "clause", "the"],
        size=(lines, 8))
    path.write_text("".join(f"{i}. {' '.join(row)}.\n" for i, row in enumerate(words)),
                    encoding="utf-8")
    return path


def documents(url: str, domain: str, split: str) -> list[np.ndarray]:
    return list(iter_documents(ShardStore(url), domain, split))


def test_one_large_text_file_is_split_by_token_windows_and_trains(tmp_path, dmu_tokenizer):
    source = book(tmp_path / "legal.txt", 5000)
    url = str(tmp_path / "s.zarr")
    report = prepare(str(source), "legal", url, held_out_fraction=0.05, progress=False)
    tok = load_tokenizer(dmu_tokenizer)
    eos = ShardStore(url).info("legal").tokenizer["eos_id"]
    whole = [*tok.encode(source.read_text("utf-8"), add_special_tokens=False).ids, eos]
    train, heldout = (documents(url, "legal", s) for s in ("train", "heldout"))
    assert report.split_mode == "windows" and report.documents == 1
    # Every token is in exactly one split; held-out pieces are whole windows of the document.
    assert sum(map(len, train)) + sum(map(len, heldout)) == len(whole)
    assert np.array_equal(np.sort(np.concatenate(train + heldout)), np.sort(whole))
    windows = len(whole) // HELDOUT_WINDOW_TOKENS  # ~64: binomial(64, 0.05) within 4 sigma
    assert abs(len(heldout) - 0.05 * windows) <= 4 * np.sqrt(windows * 0.05 * 0.95)
    assert len(heldout) >= 1
    starts = {tuple(whole[i:i + 8]) for i in range(0, len(whole), HELDOUT_WINDOW_TOKENS)}
    for piece in heldout:  # a piece is one or more whole windows, cut where windows start
        assert len(piece) % HELDOUT_WINDOW_TOKENS == 0 or piece[-1] == eos
        assert tuple(piece[:8].tolist()) in starts
    # ... and the datamodule trains and validates from it.
    dm = DomainDataModule(url, seq_len=64, batch_size=2, val_windows_per_domain=2)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 64)


def test_the_window_split_is_reproducible(tmp_path):
    source = book(tmp_path / "a.txt", 3000)
    urls = [str(tmp_path / f"s{i}.zarr") for i in range(2)]
    for url in urls:
        prepare(str(source), "legal", url, held_out_fraction=0.05, progress=False)
    first, second = ([d.tolist() for d in documents(u, "legal", "heldout")] for u in urls)
    assert first == second


def test_when_no_window_is_drawn_the_last_window_is_held_out(tmp_path, dmu_tokenizer):
    source = book(tmp_path / "short.txt", 300)  # ~4 windows: 1% draws none of them
    url = str(tmp_path / "s.zarr")
    prepare(str(source), "legal", url, held_out_fraction=0.01, progress=False)
    [train], [heldout] = documents(url, "legal", "train"), documents(url, "legal", "heldout")
    whole = np.concatenate([train, heldout])  # the held-out tail follows the training head
    tok = load_tokenizer(dmu_tokenizer)
    assert tok.decode(whole[:-1].tolist()) == source.read_text("utf-8")
    # the last window, the document's tail included: long enough to validate on
    assert HELDOUT_WINDOW_TOKENS <= len(heldout) < 2 * HELDOUT_WINDOW_TOKENS


def test_a_few_large_documents_hold_out_windows_not_a_whole_document(tmp_path):
    paths = [book(tmp_path / f"{i}.txt", 2500, seed=i) for i in range(3)]
    url = str(tmp_path / "s.zarr")
    report = prepare([str(p) for p in paths], "legal", url, held_out_fraction=0.02,
                     progress=False)
    info = ShardStore(url).info("legal")
    assert report.split_mode == "windows"
    assert 0 < info.tokens("heldout") < 0.1 * info.total_tokens  # not a third of it


def test_text_too_short_for_both_splits_is_refused_naming_the_file_and_the_way_out(
        tmp_path, capsys):
    source = tmp_path / "note.txt"
    source.write_text("Too short to hold anything out.\n", "utf-8")
    url = str(tmp_path / "s.zarr")
    code = main(["--input", str(source), "--domain", "legal", "--output", url, "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and str(source) in err and "--held-out-fraction 0" in err
    assert ShardStore(url).domains == {}  # nothing was committed
    assert main(["--input", str(source), "--domain", "legal", "--output", url, "--quiet",
                 "--held-out-fraction", "0"]) == 0


def test_an_empty_input_adds_nothing_and_exits_non_zero(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    prepare(str(book(tmp_path / "a.txt", 300)), "legal", url, progress=False)
    before = ShardStore(url).domains
    (tmp_path / "empty.jsonl").write_text("", "utf-8")
    code = main(["--input", str(tmp_path / "empty.jsonl"), "--domain", "empty", "--output",
                 url, "--quiet"])
    assert code == 1 and "no documents" in capsys.readouterr().err
    assert ShardStore(url).domains == before


def test_the_summary_reports_the_size_of_each_split(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    assert main(["--input", str(book(tmp_path / "a.txt", 3000)), "--domain", "legal",
                 "--output", url, "--quiet", "-v", "--held-out-fraction", "0.05"]) == 0
    out = capsys.readouterr().out
    info = ShardStore(url).info("legal")
    assert (f"domain now: train {info.tokens('train'):,} tokens, held out "
            f"{info.tokens('heldout'):,} tokens") in out
    segment = info.segments["heldout"][0]
    parts = ShardStore(url).array("legal", "heldout", segment.id, "part")[:].tolist()
    assert (f"({info.documents('heldout'):,} pieces: {parts.count(0)} dev, "
            f"{parts.count(1)} test; windows of 1024 tokens") in out


def test_a_directory_input_honours_format_for_files_without_extensions(tmp_path):
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    for name in ("Apache-2.0", "GPL-3", "MIT"):
        (licenses / name).write_text(f"The {name} licence text.\n" * 20, "utf-8")
    url = str(tmp_path / "s.zarr")
    report = prepare(str(licenses), "en_licenses", url, fmt="txt", held_out_fraction=0,
                     progress=False)
    assert sorted(Path(s["path"]).name for s in report.added) == ["Apache-2.0", "GPL-3", "MIT"]


def test_duplicate_sources_are_summarised_in_one_line_and_listed_with_v(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(6):
        (inputs / f"{i}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n")
    url = str(tmp_path / "s.zarr")
    args = ["--input", str(inputs), "--domain", "en", "--output", url, "--quiet",
            "--held-out-fraction", "0"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("skipped 6 source(s) already in domain 'en'")
    assert "(3 more; -v lists all)" in out[0] and str(inputs / "5.jsonl") not in out[0]
    assert main([*args, "-v"]) == 0
    assert str(inputs / "5.jsonl") in capsys.readouterr().out


@pytest.mark.parametrize(("domain", "language"), [("en_prose", "en"), ("zh_lit", "zh"),
                                                  ("code_python", "code"),
                                                  ("legal", "unknown")])
def test_the_default_language_is_a_two_letter_prefix_or_code_as_documented(domain, language):
    assert guess_language(domain) == language
