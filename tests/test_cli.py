"""The ``lightning-aquila`` command as a newcomer meets it: the help page, typos, bad config
files, and where a run writes (one folder, refused when taken, resumed with
``--ckpt_path last``). The fits are real two-step runs of the quickstart config on a store
prepared from the bundled corpus, with the real offline Neptune client."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_aquila.cli import TOOLS, TRAINER_COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """LightningCLI warns when given args while sys.argv holds pytest's."""
    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])


def run(args: list[str]) -> tuple[int | str | None, str]:
    """``main(args)``'s exit code (or SystemExit code) and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code: int | str | None = main(args)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


# -- help and typos ----------------------------------------------------------------------------
def test_help_lists_every_command_with_its_one_line(capsys):
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    helps = {**TRAINER_COMMANDS, **{name: info[2] for name, info in TOOLS.items()}}
    for name, text in helps.items():
        assert [line.split() for line in lines if line.split()[:1] == [name]] == [
            [name, *text.split()]]


def test_an_unknown_command_is_refused_naming_it():
    code, err = run(["fti"])
    assert code == 2
    assert "unknown command 'fti'" in err and "fit" in err


@pytest.mark.parametrize("tool", ["prepare", "inspect", "remove-domain", "train-tokenizer",
                                  "report", "score"])
def test_a_data_tool_imports_neither_torch_nor_lightning(tool):
    """A data tool must start at once; importing the datamodules package once pulled in
    Lightning (7 s of a 14 s ``prepare`` on the development machine)."""
    module = TOOLS[tool][0]
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_refuses_an_abbreviated_flag(tool):
    code, err = run([tool, "--hel"])  # argparse's default takes it as --help: exit 0
    assert code == 2
    assert "error:" in err


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_flag_has_help_text(tool, capsys):
    with pytest.raises(SystemExit):
        main([tool, "--help"])
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1].splitlines()
    undocumented = []
    for i, line in enumerate(options):
        if line.startswith("  -"):
            spec_and_help = line.strip().split("  ", 1)
            continued = i + 1 < len(options) and options[i + 1].startswith(" " * 6)
            if len(spec_and_help) == 1 and not continued:
                undocumented.append(line.strip())
    assert undocumented == []


def test_a_prefix_of_a_trainer_flag_is_refused_not_completed():
    code, err = run(["fit", "--config", str(QUICKSTART), "--trainer.max_step", "40",
                     "--print_config"])
    assert code == 2
    assert "unknown option --trainer.max_step; did you mean --trainer.max_steps?" in err


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 5\n   accelerator: cpu\n")
    code, err = run(["fit", "--config", str(bad)])
    assert code == 1
    first, hint = err.strip().splitlines()
    assert first.startswith(f"lightning-aquila fit: config file {bad}: line 3, column 15: ")
    assert "--verbose" in hint


def test_a_class_name_typo_is_one_line_naming_the_field_and_the_cause(tmp_path):
    config = QUICKSTART.read_text().replace(
        "class_path: lightning_aquila.callbacks.EffectiveDataMixture",
        "class_path: lightning_aquila.callbacks.EffectiveDataMixtur")
    path = tmp_path / "typo.yaml"
    path.write_text(config)
    code, err = run(["fit", "--config", str(path), "--print_config"])
    assert code == 2
    first, _hint = err.strip().splitlines()
    assert "'trainer.callbacks.policy'" in first
    assert "module 'lightning_aquila.callbacks' has no attribute 'EffectiveDataMixtur'" in first


class RefusingWindows:
    """A dataset whose every item raises ``error(message)``, as a store read in a loader
    worker does."""

    def __init__(self, error: type[Exception], message: str) -> None:
        self.error, self.message = error, message

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise self.error(self.message)


@pytest.mark.parametrize("error", ["DataError", "StorageUnavailable"])
def test_an_error_of_a_loader_worker_is_the_workers_own_line(error):
    """A DataLoader rebuilds a worker's error in the main process with the worker's whole
    traceback as its message; the line the CLI prints is the worker's message."""
    from torch.utils.data import DataLoader

    from lightning_aquila.cli.errors import is_user_error, one_line
    from lightning_aquila.datamodules import storage_retry

    kind = getattr(storage_retry, error)
    message = ("s3://bucket/s.zarr stayed unreachable for 3 s, past storage_retry "
               "max_wait_s=3: ConnectionError: refused; once it is back, resume")
    with pytest.raises(kind) as raised:
        next(iter(DataLoader(RefusingWindows(kind, message), num_workers=1)))
    assert "Original Traceback" in str(raised.value)
    assert is_user_error(raised.value) and one_line(raised.value) == message


def test_a_callback_argument_its_constructor_refuses_is_one_line_naming_the_cause():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    from lightning_aquila.cli.errors import one_line

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback] | None)
    config = parser.parse_object({"callbacks": [
        {"class_path": "lightning_aquila.callbacks.TrainingStateMonitor"},
        {"class_path": "lightning_aquila.callbacks.AdaptiveTrainingEngine",
         "init_args": {"policy": {"class_path": "lightning_aquila.callbacks.BanditMixture",
                                  "init_args": {"smoothing": 2.0}}}}]})
    with pytest.raises(ValueError) as refused:  # jsonargparse's report of the union's types
        parser.instantiate_classes(config)
    assert one_line(refused.value) == "BanditMixture(smoothing=2.0) must be in [0, 1)"


# -- one run, one folder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Two real domains from the bundled corpus, tokenized by ``prepare``."""
    folder = tmp_path_factory.mktemp("store")
    code = folder / "code.jsonl"
    lines = (REPO / "corpus" / "code_python" / "cpython_stdlib.jsonl").read_text().splitlines()
    code.write_text("\n".join(lines[:30]) + "\n")
    url = str(folder / "corpus.zarr")
    for domain, source in (("code", code),
                           ("prose", REPO / "corpus" / "en_prose" / "alice_in_wonderland.jsonl")):
        assert main(["prepare", "--input", str(source), "--domain", domain, "--output", url,
                     "--held-out-fraction", "0.2"]) == 0
    return url


def fit_args(root: Path, store: str, max_steps: int, *extra: str) -> list[str]:
    """The quickstart config at toy size (its engine plans with EffectiveDataMixture, which
    re-plans every ``update_every`` steps: set to the toy's evaluation interval)."""
    return ["fit", "--config", str(QUICKSTART), "--trainer.default_root_dir", str(root),
            "--data.init_args.store", store, "--trainer.max_steps", str(max_steps),
            "--trainer.callbacks.init_args.policy.update_every", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
            "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "2",
            "--data.init_args.val_windows_per_domain", "2", "--data.init_args.num_workers", "0",
            *extra]


@pytest.fixture(scope="module")
def first_run(store, tmp_path_factory) -> tuple[Path, Path, str]:
    """(working directory, run folder, stderr) of a 2-step run started with
    ``--ckpt_path last`` in an empty folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["lightning-aquila"])
        code, err = run(fit_args(Path("runs/mine"), store, 2, "--ckpt_path", "last"))
    assert code == 0, err[-3000:]
    return cwd, cwd / "runs" / "mine", err


def test_every_file_of_a_run_goes_under_its_default_root_dir(first_run):
    cwd, root, _ = first_run
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
    assert sorted(p.name for p in root.iterdir()) == [".neptune", "checkpoints", "config.yaml",
                                                      "tsm"]
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "tsm" / "metrics.jsonl").stat().st_size > 0
    assert len(list((root / ".neptune" / "offline").iterdir())) == 1


def test_the_quickstart_engine_plans_with_effective_data(first_run):
    _, root, _ = first_run
    engine = yaml.safe_load((root / "config.yaml").read_text())["trainer"]["callbacks"][-1]
    assert engine["class_path"].endswith("AdaptiveTrainingEngine")
    assert engine["init_args"]["policy"]["class_path"].endswith("EffectiveDataMixture")
    events = [json.loads(line) for line in (root / "tsm" / "events.jsonl").open()]
    assert any(e["kind"] == "stage" and e.get("policy") == "EffectiveDataMixture"
               for e in events)


def test_doremi_without_its_reference_run_names_the_file(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(["fit", "--config", str(QUICKSTART), "--data.init_args.store", store,
                     "--trainer.default_root_dir", "run", "--trainer.callbacks.init_args.policy",
                     "lightning_aquila.callbacks.ExcessLossMixture",
                     "--trainer.callbacks.init_args.policy.reference",
                     "runs/quickstart-reference/tsm/metrics.jsonl"])
    assert code == 1
    first, hint = err.strip().splitlines()[-2:]
    assert first.startswith("lightning-aquila fit: ExcessLossMixture: the reference file "
                            "runs/quickstart-reference/tsm/metrics.jsonl does not exist; "
                            "train the reference run first")
    assert "--verbose" in hint and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_reference_run_of_another_tokenizer_is_refused_before_the_first_step(
        first_run, store, tmp_path, monkeypatch):
    """A run records its store's tokenizer; DoReMi reading a reference run trained with
    another one (losses in another tokenizer's units) stops in one line before step 0."""
    from lightning_aquila.datamodules.store import ShardStore
    from lightning_aquila.datamodules.store_tokenizer import store_tokenizer

    _, root, _ = first_run
    ours = store_tokenizer(ShardStore(store), ["code", "prose"]).hash
    events = [json.loads(line) for line in (root / "tsm" / "events.jsonl").open()]
    assert [e["tokenizer"] for e in events if e["kind"] == "session_start"] == [ours]
    reference = tmp_path / "reference" / "tsm"
    reference.mkdir(parents=True)
    (reference / "metrics.jsonl").write_text((root / "tsm" / "metrics.jsonl").read_text())
    (reference / "events.jsonl").write_text("".join(json.dumps(
        {**e, "tokenizer": "f" * 64} if e["kind"] == "session_start" else e) + "\n"
        for e in events))
    monkeypatch.chdir(tmp_path)
    policy = ["--trainer.callbacks.init_args.policy",
              "lightning_aquila.callbacks.ExcessLossMixture",
              "--trainer.callbacks.init_args.policy.reference",
              str(reference / "metrics.jsonl"),
              "--trainer.callbacks.init_args.policy.signal", "val"]
    code, err = run([*fit_args(Path("run"), store, 2), *policy])
    assert code == 1
    first = err.strip().splitlines()[-2]
    assert first.startswith(f"lightning-aquila fit: the reference run {reference}/metrics.jsonl "
                            "trained with a tokenizer of hash ffffffff, but the store ")
    assert "train the reference run on this store" in first and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ckpt_path_last_without_a_checkpoint_says_so_and_starts_fresh(first_run):
    _, _, err = first_run
    assert "no checkpoint to resume in runs/mine/checkpoints; starting a fresh run" in err
    assert "save_last" not in err


def test_a_fresh_run_in_a_folder_holding_a_run_is_refused_in_one_line(first_run, store,
                                                                      monkeypatch):
    cwd, root, _ = first_run
    monkeypatch.chdir(cwd)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    code, err = run(fit_args(Path("runs/mine"), store, 2))
    assert code == 2
    first, _hint = err.strip().splitlines()[-2:]
    assert "runs/mine already holds a run (runs/mine/tsm/metrics.jsonl, " in first
    assert "--ckpt_path last" in first and "--reuse_run_dir true" in first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_resume_with_ckpt_path_last_continues_in_the_same_folder_counting_steps(
        first_run, store, monkeypatch, capsys):
    cwd, root, _ = first_run
    monkeypatch.chdir(cwd)
    code, err = run(fit_args(Path("runs/mine"), store, 4, "--ckpt_path", "last"))
    assert code == 0, err[-3000:]
    events = [json.loads(line) for line in (root / "tsm" / "events.jsonl").open()]
    assert [e["step"] for e in events if e["kind"] == "session_start"] == [0, 2]
    bar = capsys.readouterr().out  # Lightning's bars write to stdout
    assert "Step: 100%" in bar and "| 4/4 [" in bar  # steps of max_steps, not batches
    assert "Epoch" not in bar
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == [
        ".last.ckpt.crc32c.json", "last.ckpt"]  # the checkpoint and its checksum record


def test_a_fit_failing_before_its_first_step_is_one_line_and_leaves_no_tracker_run(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-such-store.zarr")
    code, err = run(fit_args(Path("run"), missing, 2))
    assert code == 1
    first, hint = err.strip().splitlines()[-2:]
    assert first.startswith("lightning-aquila fit: ") and missing in first
    assert "--verbose" in hint and "Traceback" not in err
    assert not (tmp_path / "run" / ".neptune").exists()


def test_shipped_configs_leave_output_paths_to_default_root_dir():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        trainer = config.get("trainer") or {}
        for callback in trainer.get("callbacks") or []:
            args = callback.get("init_args") or {}
            assert "run_dir" not in args and "dirpath" not in args, (path, callback)
        logger = trainer.get("logger") or {}
        if isinstance(logger, dict):
            args = logger.get("init_args") or {}
            assert "save_dir" not in args and args.get("data_directory") is None, path


# -- what a run prints ---------------------------------------------------------------------------
@pytest.mark.parametrize(("flops", "line"), [
    (0, "model: 2.8 M parameters (all trainable), 11.3 MB"),
    (5_000_000, "model: 2.8 M parameters (all trainable), 11.3 MB, 5.0 M FLOPs")])
def test_the_model_summary_is_one_line_with_flops_only_when_measured(flops, line, caplog):
    from lightning_aquila.cli.console import CompactModelSummary

    with caplog.at_level("INFO", logger="lightning.pytorch.callbacks.model_summary"):
        CompactModelSummary.summarize([("Name", ["model"]), ("Params", ["2.8 M"])], 2_800_000,
                                      2_800_000, 11.3, {"train": 53, "eval": 0}, flops)
    assert caplog.messages == [line]


def test_verbose_raises_the_error_itself_for_its_traceback(tmp_path):
    from lightning_aquila.cli.errors import ConfigFileError

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 5\n   accelerator: cpu\n")
    with pytest.raises(ConfigFileError, match="line 3, column 15") as raised:
        main(["fit", "--config", str(bad), "--verbose"])
    assert raised.value.__cause__ is not None  # the YAML parser's own error, chained
