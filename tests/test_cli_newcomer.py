"""A newcomer's own data and tokenizer through the ``lightning-aquila`` command (issue 28):
the store is the tokenizer's one source of truth, undecodable text can be skipped, the
console stays quiet, and a failed fit leaves nothing behind. Real stores, real ``fit``
subprocesses of the tiny preset on the quickstart config."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
CORPUS = REPO / "corpus"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m lightning_aquila.cli ARGS`` in ``cwd``, with this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEPTUNE_MODE": "offline"}
    env.pop("NEPTUNE_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "lightning_aquila.cli", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def in_process(*args: str, cwd: Path) -> tuple[int | str | None, str]:
    """``main(ARGS)`` in this process (no second import of torch and Lightning, for tests
    of what happens before training): its exit code and what it wrote to stderr."""
    from lightning_aquila.cli import main

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["lightning-aquila"])
        try:
            code: int | str | None = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def fit_args(store: Path, root: str, max_steps: int, *extra: str,
             config: Path = QUICKSTART) -> list[str]:
    """The quickstart config at toy size on the tiny preset."""
    return ["fit", "--config", str(config), "--trainer.default_root_dir", root,
            "--data.init_args.store", str(store), "--model.preset", "aquila2-tiny",
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--data.init_args.seq_len", "32",
            "--data.init_args.batch_size", "2", "--data.init_args.val_windows_per_domain",
            "2", "--data.init_args.num_workers", "0", *extra]


def fit(cwd: Path, store: Path, root: str, max_steps: int, *extra: str,
        config: Path = QUICKSTART) -> subprocess.CompletedProcess[str]:
    """A real ``fit`` process of :func:`fit_args`."""
    return cli(*fit_args(store, root, max_steps, *extra, config=config), cwd=cwd)


def probes_every(folder: Path, steps: int) -> Path:
    """The quickstart config with its probe every ``steps`` steps (a list entry, which no
    flag reaches)."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["probes_every_n_steps"] = steps
    path = folder / "quickstart-probes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def own_store(tmp_path_factory) -> tuple[Path, Path]:
    """(folder, store) of two bundled-corpus domains prepared with a 4,096-id tokenizer the
    user trained with ``train-tokenizer``."""
    folder = tmp_path_factory.mktemp("own")
    code = folder / "code.jsonl"
    lines = (CORPUS / "code_python" / "cpython_stdlib.jsonl").read_text().splitlines()
    code.write_text("\n".join(lines[:30]) + "\n")
    prose = CORPUS / "en_prose" / "alice_in_wonderland.jsonl"
    done = cli("train-tokenizer", "--input", str(prose), "--input", str(code), "--output",
               "tok", "--vocab-size", "4096", cwd=folder)
    assert done.returncode == 0, done.stderr
    for domain, source in (("code", code), ("prose", prose)):
        done = cli("prepare", "--input", str(source), "--domain", domain, "--output",
                   "corpus.zarr", "--tokenizer", "tok", "--held-out-fraction", "0.2",
                   "--quiet", cwd=folder)
        assert done.returncode == 0, done.stderr
    return folder, folder / "corpus.zarr"


@pytest.fixture(scope="module")
def own_run(own_store) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """(folder, process) of a 3-step run on ``own_store`` with no tokenizer flag, probing at
    step 2."""
    folder, store = own_store
    done = fit(folder, store, "run", 3, config=probes_every(folder, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def test_own_tokenizer_needs_no_flags_and_the_probes_use_it(own_run):
    folder, _ = own_run
    checkpoint = torch.load(folder / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    config = checkpoint["aquila_config"]
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (
        4096, 4094, 4095)
    metrics = (folder / "run" / "tsm" / "metrics.jsonl").read_text()
    assert '"tsm/probe/cloze/acc"' in metrics  # the probe ran at step 2, on 4,096 ids


def test_a_probe_with_another_tokenizer_is_refused_before_step_0_in_one_line(own_store,
                                                                            tmp_path):
    _, store = own_store
    config = yaml.safe_load(probes_every(tmp_path, 2).read_text())
    probe = config["trainer"]["callbacks"][0]["init_args"]["probes"][0]
    probe["init_args"] = {"tokenizer": str(REPO / "lightning_aquila" / "assets" / "tokenizer")}
    (tmp_path / "bundled-probe.yaml").write_text(yaml.safe_dump(config))
    done = fit(tmp_path, store, "run", 3, config=tmp_path / "bundled-probe.yaml")
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-2]
    assert line.startswith("lightning-aquila fit: probe 'cloze' tokenizes with the bundled "
                           "tokenizer (8,192 ids, hash ")
    assert "was prepared with tok (4,096 ids, hash " in line
    assert "drop the probe's tokenizer argument" in line
    assert "Traceback" not in done.stderr


def test_the_export_carries_the_store_tokenizer_and_refuses_another(own_run):
    from lightning_aquila.tokenizer import tokenizer_hash

    folder, _ = own_run
    done = cli("export-hf", "run/checkpoints/last.ckpt", "--output", "hf", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert tokenizer_hash(folder / "hf") == tokenizer_hash(folder / "tok")
    bundled = REPO / "lightning_aquila" / "assets" / "tokenizer"
    done = cli("export-hf", "run/checkpoints/last.ckpt", "--output", "hf2", "--tokenizer",
               str(bundled), cwd=folder)
    assert done.returncode == 2
    assert (f"error: --tokenizer {bundled} has 8,192 ids, but the model's vocabulary has "
            "4,096; give the tokenizer the model was trained with") in done.stderr
    assert not (folder / "hf2").exists()


# -- real-world text -----------------------------------------------------------------------------
@pytest.fixture
def mixed_txt(tmp_path) -> Path:
    """A --format txt directory: two UTF-8 files and one in Latin-1."""
    folder = tmp_path / "texts"
    folder.mkdir()
    prose = (CORPUS / "en_prose" / "alice_in_wonderland.jsonl").read_text().splitlines()
    for name, lines in (("a.txt", prose[:6]), ("b.txt", prose[6:])):
        (folder / name).write_text("\n".join(lines), encoding="utf-8")
    (folder / "latin.txt").write_bytes("Café au lait, © 1865.\n".encode("latin-1") * 40)
    return folder


def test_a_file_that_is_not_utf8_is_skipped_and_named_under_on_error_skip(mixed_txt,
                                                                         tmp_path):
    done = cli("prepare", "--input", str(mixed_txt), "--format", "txt", "--domain", "prose",
               "--output", "s.zarr", "--on-error", "skip", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "added 2 source(s), 2 documents" in done.stdout
    assert (f"skipped 1 file(s) that do not decode (--encoding reads another encoding):\n"
            f"  {mixed_txt / 'latin.txt'}: not utf-8 text (invalid continuation byte: byte "
            "0xe9)") in done.stderr


def test_encoding_reads_a_latin1_file(mixed_txt, tmp_path):
    from lightning_aquila.datamodules.store import ShardStore

    for encoding in ("latin-1", "auto"):
        done = cli("prepare", "--input", str(mixed_txt / "latin.txt"), "--format", "txt",
                   "--domain", "prose", "--output", f"{encoding}.zarr", "--encoding", encoding,
                   "--held-out-fraction", "0", "--quiet", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        (source,) = ShardStore(str(tmp_path / f"{encoding}.zarr")).info("prose").sources
        assert source["documents"] == 1 and source["encoding"] != "utf-8"


def test_train_tokenizer_names_the_file_that_does_not_decode_and_the_fix(mixed_txt, tmp_path):
    done = cli("train-tokenizer", "--input", str(mixed_txt / "*.txt"), "--output", "tok",
               "--vocab-size", "1000", cwd=tmp_path)
    assert done.returncode == 2
    assert (f"error: {mixed_txt / 'latin.txt'}: not utf-8 text (") in done.stderr
    assert "pass --encoding NAME (e.g. latin-1, cp1252) or --encoding auto" in done.stderr
    done = cli("train-tokenizer", "--input", str(mixed_txt / "*.txt"), "--output", "tok",
               "--vocab-size", "1000", "--encoding", "latin-1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# -- clean failure -------------------------------------------------------------------------------
def test_a_fit_failing_before_its_first_step_leaves_the_folder_as_it_found_it(own_store,
                                                                            tmp_path):
    _, store = own_store
    code, err = in_process(*fit_args(store, "runs/new", 3, "--data.init_args.seq_len", "300"),
                           cwd=tmp_path)
    assert code == 1 and "seq_len 300 is longer" in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    code, _ = in_process(*fit_args(store, "kept", 3, "--data.init_args.seq_len", "300"),
                         cwd=tmp_path)
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]


# -- a quiet console -----------------------------------------------------------------------------
def test_a_fit_prints_no_dependency_tips_one_line_per_evaluation_and_no_v_num(own_run):
    _, done = own_run
    console = done.stdout + done.stderr
    for noise in ("litlogger", "already configured with model summary", "LeafSpec", "v_num",
                  "Validation DataLoader", "Sanity Checking", "Training:"):
        assert noise not in console, noise
    assert console.count("step 2: val/loss ") == 1
    assert "(code " in console and ", prose " in console  # each domain's loss on the line


def test_a_fit_prints_a_one_line_model_summary_and_no_tpu_line_or_neptune_goodbye(own_run):
    """The model summary is one line (not Lightning's 12-line table), there is no "TPU
    available: False" nor "`Trainer.fit` stopped: `max_steps=3` reached" (the bar says so),
    and the Neptune client's goodbye at exit is not printed."""
    _, done = own_run
    console = done.stdout + done.stderr
    for noise in ("Total params", "| Name", "TPU available", "Trainer.fit` stopped",
                  "Shutting down background jobs", "Done!"):
        assert noise not in console, noise
    [summary] = [line for line in console.splitlines() if line.startswith("model: ")]
    assert re.fullmatch(r"model: [\d.]+ [KM] parameters \(all trainable\), [\d.]+ MB", summary)


def test_a_quiet_prepare_says_in_one_line_what_it_added_and_held_out(tmp_path, capsys):
    from lightning_aquila.cli import main
    from lightning_aquila.datamodules.store import ShardStore

    url = str(tmp_path / "s.zarr")
    assert main(["prepare", "--input", str(CORPUS / "en_legal" / "*.jsonl"), "--domain",
                 "en_legal", "--output", url, "--held-out-fraction", "0.1", "--quiet"]) == 0
    info = ShardStore(url).info("en_legal")
    assert capsys.readouterr().out.splitlines() == [
        f"domain 'en_legal' (language 'en'): added 1 source(s), {info.total_documents:,} "
        f"documents, {info.total_tokens:,} tokens ({info.tokens('heldout'):,} held out) -> {url}"]


def test_the_report_says_where_it_is_in_one_line(own_run):
    folder, _ = own_run
    done = cli("report", "run", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "report: run/report.html (figure: run/report.png)\n"
    assert (folder / "run" / "report.html").is_file() and (folder / "run" / "report.png").is_file()


def test_a_resumed_run_shows_steps_and_a_finished_one_says_so_and_does_nothing(own_store,
                                                                              tmp_path):
    folder, store = own_store
    # the old recipe's flag still works: the hparams of model and data cannot conflict
    first = fit(tmp_path, store, "run", 2, "--model.tokenizer", str(folder / "tok"))
    assert first.returncode == 0, first.stderr[-2000:]
    done = fit(tmp_path, store, "run", 3, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Step: 100%" in done.stdout and "| 3/3 [" in done.stdout
    assert "Training" not in done.stdout and "exists and is not empty" not in done.stderr
    neptune_runs = sorted((tmp_path / "run" / ".neptune" / "offline").iterdir())
    done = fit(tmp_path, store, "run", 3, "--ckpt_path", "last")
    assert done.returncode == 0
    assert done.stderr.strip().splitlines()[-1] == (
        "lightning-aquila fit: the run of run/checkpoints/last.ckpt already finished (step 3 "
        "of max_steps 3); nothing to do. Raise --trainer.max_steps to train on.")
    assert "Step" not in done.stdout and "Training" not in done.stdout
    assert sorted((tmp_path / "run" / ".neptune" / "offline").iterdir()) == neptune_runs


# -- fast, helpful errors ------------------------------------------------------------------------
TYPOS = {  # a typo on the command line, one in a config file: the one line each gets
    "flag": (["--trainer.max_step", "3"], "lightning-aquila fit: error: unknown option "
             "--trainer.max_step; did you mean --trainer.max_steps?"),
    "config": (["--config", "typo.yaml"], "lightning-aquila fit: error: unknown option "
               "'trainer.max_step' (set in typo.yaml); did you mean 'trainer.max_steps'?"),
}
#: ``main(ARGS)`` in a fresh interpreter; prints its exit code and which of the heavy
#: packages were imported by the time it returned.
IMPORTS_PROBE = ("import sys; from lightning_aquila.cli import main; code = main(sys.argv[1:]); "
                 "print(code, [m for m in ('torch', 'lightning', 'jsonargparse') "
                 "if m in sys.modules])")


@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_a_typo_gets_one_line_from_the_parser_first_and_before_lightning_after(
        typo, tmp_path, monkeypatch):
    """The first time, LightningCLI's parser refuses the typo (and keeps its options); after
    that the same line comes before torch, Lightning or jsonargparse is imported."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_step: 3\n")
    args, line = TYPOS[typo]
    code, err = in_process("fit", "--config", str(QUICKSTART), *args, cwd=tmp_path)
    assert code == 2 and err.splitlines() == [
        line, "(`lightning-aquila fit --help` lists the flags; --verbose shows the full message)"]
    assert len(list((tmp_path / "cache").rglob("fit-options-*.json"))) == 1
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    again = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, "fit", "--config",
                            str(QUICKSTART), *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.stdout == "2 []\n" and again.stderr == err


@pytest.fixture(scope="module")
def fit_options(tmp_path_factory):
    """The options ``fit``'s parser keeps (from a ``fit --help`` into a fresh cache)."""
    from lightning_aquila.cli import known_options

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        with contextlib.redirect_stdout(io.StringIO()):
            in_process("fit", "--help", cwd=tmp_path_factory.mktemp("cwd"))
        known = known_options.kept("fit")
    # the tests below pass nothing to judge without it: refuse a cache that was not written
    assert known is not None and "trainer.max_steps" in known.options
    return known


@pytest.mark.parametrize("words", [
    ["--data.init_args.stor", "x"],  # the data class's arguments: the parser's to judge
    ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
     "--trainer.callbacks.logging_interval", "step"],
    ["--trainer.callbacks.init_args.policy", "lightning_aquila.callbacks.EffectiveDataMixture"],
    ["--model.config.max_seq_len", "64"],  # a dict
    ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"],
    ["--print_config", "--trainer.max_steps=3", "--ckpt_path", "last"],
    ["--data.help", "DomainDataModule", "--trainer.max_step", "3"],  # help first, as argparse
    ["--config", "open.yaml"],
], ids=["init_args", "appended-callback", "callback-arg", "dict", "optimizer", "print_config",
        "help", "config"])
def test_what_only_the_full_parser_can_judge_is_left_to_it(words, fit_options, tmp_path,
                                                           monkeypatch):
    from lightning_aquila.cli.known_options import refusal

    monkeypatch.chdir(tmp_path)
    (tmp_path / "open.yaml").write_text(yaml.safe_dump({
        "trainer.max_steps": 3,
        "trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": "x", "anything": 1}}},
        "model": {"config": {"anything": 1}},
        "data": {"class_path": "lightning_aquila.datamodules.DomainDataModule",
                 "init_args": {"stor": "x"}}}))
    assert refusal("fit", words, fit_options) is None


@pytest.mark.parametrize(("words", "refused"), [
    (["--trainer.foo.bar", "3"], "unknown option --trainer.foo.bar"),
    (["--seed_everythin", "3"], "unknown option --seed_everythin; did you mean --seed_everything?"),
    (["--config", "top.yaml"], "unknown option 'trainr' (set in top.yaml); did you mean "
                               "'trainer'?"),
])
def test_a_name_no_option_can_hold_is_refused_before_the_parser(words, refused, fit_options,
                                                                tmp_path, monkeypatch):
    from lightning_aquila.cli.known_options import refusal

    monkeypatch.chdir(tmp_path)
    (tmp_path / "top.yaml").write_text("trainr:\n  max_steps: 3\n")
    assert refusal("fit", words, fit_options) == refused


def test_fit_help_comes_from_the_cache_after_the_first_time(tmp_path, monkeypatch):
    """The first ``fit --help`` fills the cache; the second prints what the cache holds
    (shown by marking the cached text, not by timing it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = cli("fit", "--help", cwd=tmp_path)
    assert first.returncode == 0 and "--trainer.max_steps" in first.stdout
    [cached] = (tmp_path / "cache").rglob("fit-help-*")
    assert cached.read_text(encoding="utf-8") == first.stdout
    assert len(list((tmp_path / "cache").rglob("fit-options-*.json"))) == 1  # (for typos)
    cached.write_text(first.stdout + "MARKER from the cache\n", encoding="utf-8")
    again = cli("fit", "--help", cwd=tmp_path)
    assert again.stdout == first.stdout + "MARKER from the cache\n" and again.stderr == ""


def test_a_store_from_before_the_tokenizer_copy_still_gives_the_model_its_ids(tmp_path):
    import shutil

    from lightning_aquila.datamodules.prepare import prepare
    from lightning_aquila.datamodules.store import ShardStore
    from lightning_aquila.datamodules.store_tokenizer import TOKENIZERS_GROUP, store_tokenizer

    url = str(tmp_path / "old.zarr")
    prepare(str(CORPUS / "en_prose" / "alice_in_wonderland.jsonl"), "prose", url,
            progress=False)
    shutil.rmtree(tmp_path / "old.zarr" / TOKENIZERS_GROUP)  # as stores were written before
    record = store_tokenizer(ShardStore(url))
    assert record.json is None and record.load() is None
    assert record.model_config() == {"vocab_size": 8192, "bos_token_id": 8190,
                                     "eos_token_id": 8191}
    prepare(str(CORPUS / "en_prose" / "alice_in_wonderland.jsonl"), "prose", url,
            progress=False)  # nothing to add, but the copy is recorded
    assert store_tokenizer(ShardStore(url)).load() is not None
