"""The run report, from the files a real short run writes: the PNG, the self-contained HTML
page, and the reader's handling of torn lines and resumes."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import torch
from helpers.tiny_project import TinyLM
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.cli.tools import report_command as main
from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.tracking.compare import (
    compare_runs,
    held_out_curves,
    settled_range,
    summarise_run,
)
from lightning_aquila.tracking.figure import NO_DATA
from lightning_aquila.tracking.report import plot_run, write_report
from lightning_aquila.tracking.run_files import read_jsonl
from lightning_aquila.tracking.run_record import load_run

DOMAINS = ["code", "web", "zh"]


class Windows(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        domain = i % 3
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        window = (torch.randint(0, 20, (13,), generator=g) + 20 * domain) % 64
        return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(domain)}


class Data(LightningDataModule):
    def __init__(self):
        super().__init__()
        self.mixture = DomainMixture(DOMAINS, {"code": 1, "web": 1, "zh": 1})

    def train_dataloader(self):
        return DataLoader(Windows(2000), batch_size=6)

    def val_dataloader(self):
        return DataLoader(Windows(12, seed=1), batch_size=6)


def small_lm(spike_at: int | None = None) -> TinyLM:
    """The test project's module under AdamW; at batch ``spike_at`` its loss is 8 times larger."""
    return TinyLM(lr=1e-2, optimizer="adamw", spike_at=spike_at, spike_factor=8)


class Schedule(Callback):
    """What the ATE would do: name stages and change the mixture."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 12:
            self.monitor.record_event("stage", name="K2")
            trainer.datamodule.mixture.set_weights({"code": 0.6, "web": 0.2, "zh": 0.2},
                                                   reason="stage K2", step=12)


def monitor_for_tests(**kwargs) -> TrainingStateMonitor:
    every = {f"{name}_every_n_steps": 2 for name in (
        "train_loss", "grad_norm", "lr", "throughput", "mixture")}
    # Lightning knows no CPU's peak FLOP/s: an H100's, so that the run logs MFU
    return TrainingStateMonitor(weight_stats_every_n_steps=4, spike_window=10,
                                spike_min_history=6, flops_per_token=1e4, peak_flops=989e12,
                                **every, **kwargs)


def fit(root: Path, max_steps: int, callbacks=(), ckpt_path=None, spike_at=None):
    torch.manual_seed(0)
    monitor = monitor_for_tests()
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root,
                      callbacks=[monitor, Schedule(monitor), *callbacks], val_check_interval=8,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, enable_checkpointing=bool(callbacks))
    trainer.fit(small_lm(spike_at), Data(), ckpt_path=ckpt_path)
    return monitor


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    monitor = fit(root, max_steps=24, spike_at=18)
    assert [a.kind for a in monitor.state.anomalies] == ["spike"]
    return root


def test_report_writes_a_png_and_a_self_contained_html_page(run_dir, tmp_path):
    png_path, html_path = write_report(run_dir, output_dir=tmp_path)
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png_path).shape
    assert (width, height) == (1500, 2400)

    page = html_path.read_text(encoding="utf-8")
    embedded = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page).group(1)
    assert base64.b64decode(embedded) == png  # the figure is in the page itself
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing to fetch
    assert "<script" not in page and "<link" not in page
    for domain in DOMAINS:
        assert f"<td>{domain}</td>" in page
    assert "<td>stage</td>" in page and "&quot;name&quot;: &quot;K2&quot;" in page
    assert "<td>anomaly</td><td>spike</td>" in page


def test_report_reads_the_series_the_monitor_wrote(run_dir):
    record = load_run(run_dir)
    steps, values = record.series("tsm/train_loss/code")
    assert steps == list(range(2, 25, 2)) and all(v > 0 for v in values)
    assert record.series("tsm/val_loss_avg")[0] == [8, 16, 24]
    assert record.series("tsm/mixture/code")[1][-1] == pytest.approx(0.6)
    assert [e["name"] for e in record.of_kind("stage")] == ["K2"]
    [spike] = record.of_kind("anomaly")
    assert (spike["type"], spike["step"]) == ("spike", 19)
    assert record.domains() == DOMAINS


def test_metric_names_never_nest_so_every_logger_can_hold_them(run_dir):
    # Neptune cannot hold a value at "a/b" and a namespace "a/b/c" at once
    names = {key for row in read_jsonl(run_dir / "tsm" / "metrics.jsonl") for key in row
             if key.startswith("tsm/")}
    assert len(names) > 40
    nested = [(a, b) for a in names for b in names if b.startswith(a + "/")]
    assert nested == []


def test_a_torn_last_line_is_skipped(run_dir, tmp_path):
    copy = tmp_path / "run"
    (copy / "tsm").mkdir(parents=True)
    for name in ("metrics.jsonl", "events.jsonl"):
        text = (run_dir / "tsm" / name).read_text()
        (copy / "tsm" / name).write_text(text + text.splitlines()[-1][:25])  # killed mid-write
    assert load_run(copy).rows == load_run(run_dir).rows
    assert load_run(copy).events == load_run(run_dir).events
    assert all(path.exists() for path in write_report(copy))


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """14 steps, then a resume from the checkpoint of step 10 to step 16."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10,
                                 save_top_k=-1)
    fit(tmp_path, max_steps=14, callbacks=[checkpoint])  # "crashes" after step 14
    fit(tmp_path, max_steps=16, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    return tmp_path


def test_a_resumed_run_keeps_only_the_replayed_steps_of_the_second_session(resumed_run):
    tmp_path = resumed_run
    rows = read_jsonl(tmp_path / "tsm" / "metrics.jsonl")
    second_session = [r for r in rows if r["time"] > [
        e for e in read_jsonl(tmp_path / "tsm" / "events.jsonl")
        if e["kind"] == "session_start"][1]["time"]]
    record = load_run(tmp_path)
    steps = record.series("tsm/train_loss/web")[0]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    replayed = {r["step"]: r["tsm/train_loss/web"] for r in second_session
                if "tsm/train_loss/web" in r}
    assert sorted(replayed) == [12, 14, 16]
    assert dict(zip(*record.series("tsm/train_loss/web"))).items() >= replayed.items()
    # the stage event of step 12 was replayed too: it is in the report once
    assert [e["step"] for e in record.of_kind("stage")] == [12]


def test_command_line_prints_the_paths_and_names_a_missing_run(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--output-dir", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "no TSM run files under" in capsys.readouterr().err


def axis_titled(figure, start: str):
    [axis] = [ax for ax in figure.axes if ax.get_title().startswith(start)]
    return axis


def test_the_figure_marks_where_a_run_was_resumed(resumed_run):
    figure = plot_run(load_run(resumed_run))
    loss = axis_titled(figure, "training loss per domain")
    assert [t.get_position()[0] for t in loss.texts if t.get_text() == " resumed"] == [10]


def test_empty_panels_say_no_data_yet_and_full_ones_do_not(run_dir):
    figure = plot_run(load_run(run_dir))  # the run has no probes
    texts = lambda ax: [t.get_text() for t in ax.texts]  # noqa: E731
    assert NO_DATA in texts(axis_titled(figure, "downstream probes"))
    assert NO_DATA not in texts(axis_titled(figure, "learning rate"))
    assert NO_DATA not in texts(axis_titled(figure, "held-out loss against training tokens"))


def test_the_page_writes_counts_with_separators_and_mfu_in_percent(run_dir, tmp_path):
    _, html_path = write_report(run_dir, output_dir=tmp_path)
    page = html_path.read_text(encoding="utf-8")
    record = load_run(run_dir)
    tokens = record.last("tsm/tokens_total")
    assert tokens > 1000 and f"<td>tokens seen</td><td>{round(tokens):,}</td>" in page
    mfu = record.last("tsm/mfu")
    assert f"<td>MFU (last)</td><td>{100 * mfu:.3g}%</td>" in page
    assert "e+0" not in page.split("<img")[0]


def test_the_mixture_is_drawn_from_the_batch_a_change_applied_from(tmp_path):
    class PrefetchingMixture(Callback):
        """Like the real sampler: batches already fetched keep the old weights, so a change
        requested at step 6 applies from a later batch."""

        def on_train_start(self, trainer, pl_module):
            trainer.datamodule.mixture.bind(lambda: trainer.fit_loop.total_batch_idx + 3)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                self.change = trainer.datamodule.mixture.set_weights(
                    {"code": 0.6, "web": 0.2, "zh": 0.2}, reason="test", step=6)

    torch.manual_seed(0)
    prefetching = PrefetchingMixture()
    Trainer(accelerator="cpu", max_steps=10, default_root_dir=tmp_path, logger=False,
            callbacks=[monitor_for_tests(), prefetching], limit_val_batches=0,
            enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False).fit(small_lm(), Data())
    record = load_run(tmp_path)
    assert prefetching.change.batch_index > 6
    assert record.mixture_history() == [
        (0.0, {"code": pytest.approx(1 / 3), "web": pytest.approx(1 / 3),
               "zh": pytest.approx(1 / 3)}),
        (float(prefetching.change.batch_index), {"code": 0.6, "web": 0.2, "zh": 0.2})]
    assert [e["step"] for e in record.of_kind("mixture")] == [6]  # when it was requested


# -- comparing runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short")
    fit(root, max_steps=16)
    return root


def test_summarise_run_gives_the_last_held_out_losses(run_dir):
    summary = summarise_run(run_dir)
    record = load_run(run_dir)
    losses = {d: record.last(f"tsm/val_loss/{d}") for d in DOMAINS}
    worst = max(losses, key=losses.__getitem__)
    assert summary == {  # this run's data has no test part: the dev losses are all there is
        "run": str(run_dir), "part": "val", "step": 24,
        "tokens": record.last("tsm/tokens_total"),
        "domain_avg_loss": pytest.approx(sum(losses.values()) / 3), "worst_domain": worst,
        "worst_domain_loss": losses[worst],
        "token_weighted_loss": record.last("tsm/val_loss_avg"), "losses": losses}


def test_held_out_curves_put_each_validation_at_the_tokens_seen_by_then(run_dir):
    curves = held_out_curves(load_run(run_dir))
    record = load_run(run_dir)
    tokens = dict(zip(*record.series("tsm/tokens_total")))
    assert [t for t, _ in curves["average"]] == [tokens[8], tokens[16], tokens[24]]
    assert [v for _, v in curves["worst"]] == [
        max(record.series(f"tsm/val_loss/{d}")[1][i] for d in DOMAINS) for i in range(3)]


def test_compare_runs_writes_one_figure_of_all_runs(run_dir, short_run, tmp_path):
    path = compare_runs([str(run_dir), str(short_run)], str(tmp_path / "compare.png"),
                        labels=["24 steps", "16 steps"])
    assert path == tmp_path / "compare.png"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    # 3 columns; rows: (mean, worst, 3 domains) -> 2, then one mixture panel per run -> 1
    assert (width, height) == (1560, 1140)


def test_compare_panels_show_the_losses_after_the_first_tenth_of_tokens():
    # the first evaluations (8 nats) would flatten the end, where the runs differ by 0.04
    a = [(0.0, 8.0), (10.0, 3.0), (50.0, 2.40), (100.0, 2.30)]
    b = [(0.0, 8.1), (50.0, 2.45), (90.0, 2.34)]
    low, high = settled_range([a, b])
    assert low == pytest.approx(2.30 - 0.05 * 0.70) and high == pytest.approx(3.0 + 0.05 * 0.70)
    assert settled_range([[], []]) is None


def test_compare_runs_refuses_a_label_count_that_does_not_match(run_dir, short_run, tmp_path):
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        compare_runs([str(run_dir), str(short_run)], str(tmp_path / "c.png"), labels=["a"])


def test_report_compare_prints_one_summary_row_per_run(run_dir, short_run, tmp_path, capsys):
    output = tmp_path / "c.png"
    assert main(["--compare", str(run_dir), str(short_run), "--labels", "long", "short",
                 "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "part", "step", "tokens", "domain", "avg", "worst",
                                "domain", "per", "held-out", "token"]
    assert [line.split()[:3] for line in lines[1:3]] == [["long", "val", "24"],
                                                         ["short", "val", "16"]]
    assert lines[3] == f"figure: {output}" and output.is_file()
