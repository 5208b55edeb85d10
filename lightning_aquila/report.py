"""The run report: one PNG and one self-contained HTML page from a run's TSM files.

``lightning-aquila report RUN_DIR`` reads ``<run>/tsm/metrics.jsonl`` and
``<run>/tsm/events.jsonl`` (written by ``TrainingStateMonitor``; format in docs/monitor.md)
and writes ``report.png`` and ``report.html`` next to the ``tsm`` folder: per-domain training
and held-out loss, the mixture over steps, stage boundaries, anomalies, gradient norm,
throughput/MFU, the weights' update ratios and change since the stage began, and probes.

Reading is crash-tolerant: a torn line (a run killed mid-write) is skipped. Timelines are
cleaned the way training went: a ``session_start`` at step S (a resume) drops what the
previous session recorded after S (it was replayed), and a ``rollback`` to step S drops the
metrics recorded after S before it (the events stay, so the report shows why).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_aquila.atomic import write_bytes_atomically

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
#: The page lists at most this many events (the most recent); the file has them all.
MAX_EVENT_ROWS = 500


# -- reading -----------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """JSON objects, one per line; lines that do not parse (a torn last line) are skipped."""
    records = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines) - 1:  # not the last line: say so, it is not a crash artefact
                warnings.warn(f"{path}:{number}: skipping a line that is not JSON", stacklevel=2)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def find_tsm_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/tsm``, or the most recently written ``tsm`` folder below ``run_dir`` (a
    logger may have put the run in ``lightning_logs/version_N``)."""
    run_dir = Path(run_dir)
    if (run_dir / "tsm" / METRICS_FILE).exists():
        return run_dir / "tsm"
    if run_dir.name == "tsm" and (run_dir / METRICS_FILE).exists():
        return run_dir
    found = sorted(run_dir.glob(f"**/tsm/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no TSM run files under {run_dir} (looked for "
                                f"tsm/{METRICS_FILE}); was TrainingStateMonitor in the run?")
    return found[-1].parent


@dataclass
class RunRecord:
    """A run's metric rows and events after the timeline clean-up."""

    tsm_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric; a step logged twice keeps its last value."""
        points: dict[int, float] = {}
        for row in self.rows:
            if name in row:
                value = row[name]
                points[int(row["step"])] = float("nan") if value is None else float(value)
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def names(self, prefix: str, suffix: str = "") -> list[str]:
        """The ``<x>`` of every metric named ``<prefix><x><suffix>``, first-seen order."""
        found: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(
                        suffix):
                    found[key[len(prefix) : len(key) - len(suffix)]] = None
        return list(found)

    def last(self, name: str) -> float | None:
        values = self.series(name)[1]
        return values[-1] if values else None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") == kind]

    def domains(self) -> list[str]:
        for event in reversed(self.of_kind("session_start")):
            if event.get("domains"):
                return list(event["domains"])
        names = self.names("tsm/train_loss/") + self.names("tsm/val_loss/")
        names += self.names("tsm/mixture/")
        return list(dict.fromkeys(n for n in names if "/" not in n))


def load_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    tsm_dir = find_tsm_dir(run_dir)
    rows = read_jsonl(tsm_dir / METRICS_FILE)
    events = read_jsonl(tsm_dir / EVENTS_FILE)
    timeline = sorted([(r.get("time", 0.0), 0, r) for r in rows if "step" in r]
                      + [(e.get("time", 0.0), 1, e) for e in events if "step" in e],
                      key=lambda item: (item[0], item[1]))
    kept_rows: list[dict[str, Any]] = []
    kept_events: list[dict[str, Any]] = []
    for _, is_event, record in timeline:
        kind = record.get("kind") if is_event else None
        if kind == "session_start":
            start = int(record["step"])
            kept_rows = [r for r in kept_rows if r["step"] <= start]
            kept_events = [e for e in kept_events if e["step"] <= start]
        elif kind == "rollback" and record.get("to_step") is not None:
            kept_rows = [r for r in kept_rows if r["step"] <= int(record["to_step"])]
        (kept_events if is_event else kept_rows).append(record)
    return RunRecord(tsm_dir, kept_rows, kept_events)


# -- the figure --------------------------------------------------------------------------------
def _finite(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_run(record: RunRecord, title: str | None = None) -> Any:
    """The report figure (matplotlib, Agg): eight panels sharing the step axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    domains = record.domains()
    palette = colormaps["tab10"]
    color = {d: palette(i % 10) for i, d in enumerate(domains)}
    fig, axes = plt.subplots(4, 2, figsize=(15, 17), sharex=True)
    (loss_ax, val_ax), (mix_ax, grad_ax), (tput_ax, upd_ax), (stage_ax, probe_ax) = axes
    fig.suptitle(title or f"run report: {record.tsm_dir.parent}", fontsize=13)

    # training loss per domain: the interval means faint, their EMA solid
    for d in domains:
        steps, values = _finite(*record.series(f"tsm/train_loss/{d}"))
        loss_ax.plot(steps, values, color=color[d], lw=1.4, label=d)
        steps, values = _finite(*record.series(f"tsm/train_loss_ema/{d}"))
        loss_ax.plot(steps, values, color=color[d], lw=1.2, ls="--", alpha=0.6)
    spikes = [e for e in record.of_kind("anomaly") if e.get("type") == "spike"
              and e.get("value") is not None]
    if spikes:
        loss_ax.scatter([e["step"] for e in spikes], [e["value"] for e in spikes], marker="x",
                        color="red", s=60, zorder=5, label="loss spike")
    loss_ax.set_title("training loss per domain (interval mean; dashed: EMA)")
    loss_ax.set_ylabel("nats/token")

    for d in domains:
        steps, values = _finite(*record.series(f"tsm/val_loss/{d}"))
        val_ax.plot(steps, values, color=color[d], marker="o", ms=3, lw=1.5, label=d)
    steps, values = _finite(*record.series("tsm/val_loss_avg"))
    val_ax.plot(steps, values, color="black", ls="--", lw=1.5, label="token-weighted avg")
    val_ax.set_title("held-out loss per domain")
    val_ax.set_ylabel("nats/token")

    mixture = [d for d in domains if record.series(f"tsm/mixture/{d}")[0]]
    if mixture:
        steps = sorted({s for d in mixture for s in record.series(f"tsm/mixture/{d}")[0]})
        stacks = []
        for d in mixture:
            points = dict(zip(*record.series(f"tsm/mixture/{d}")))
            stacks.append([points.get(s, 0.0) if math.isfinite(points.get(s, 0.0)) else 0.0
                           for s in steps])
        mix_ax.stackplot(steps, *stacks, labels=mixture, colors=[color[d] for d in mixture],
                         step="post", alpha=0.85)
        mix_ax.set_ylim(0, 1)
    for change in record.of_kind("mixture"):
        mix_ax.axvline(change["step"], color="black", lw=0.8, ls=":")
    mix_ax.set_title("mixture weights (stacked; dotted: a change was requested)")

    steps, values = _finite(*record.series("tsm/grad_norm"))
    grad_ax.plot(steps, values, color="tab:blue", lw=1.2)
    if values and min(values) > 0 and max(values) / min(values) > 50:
        grad_ax.set_yscale("log")
    grad_ax.set_title("gradient norm (before clipping)")

    steps, values = _finite(*record.series("tsm/tokens_per_sec"))
    tput_ax.plot(steps, values, color="tab:green", lw=1.2, label="tokens/s per device")
    tput_ax.set_ylabel("tokens/s per device", color="tab:green")
    steps, values = _finite(*record.series("tsm/mfu"))
    if steps:  # MFU is tokens/s times a constant: its own axis, drawn as points
        mfu_ax = tput_ax.twinx()
        mfu_ax.plot(steps, [100 * v for v in values], color="tab:purple", ls="none",
                    marker=".", ms=5, label="MFU (%)")
        mfu_ax.set_ylabel("MFU (%)", color="tab:purple")
        mfu_ax.legend(fontsize=8, loc="lower right")
    tput_ax.set_title("throughput and MFU")

    _layer_panel(record, upd_ax, "update_ratio",
                 "weights: update-to-weight ratio per layer, between checks")
    _layer_panel(record, stage_ax, "stage_change",
                 "weights: relative change since the stage began, per layer")

    probe_names = record.names("tsm/probe/")
    for i, name in enumerate(probe_names):
        steps, values = _finite(*record.series(f"tsm/probe/{name}"))
        probe_ax.plot(steps, values, marker="o", ms=3, color=palette(i % 10), label=name)
    probe_ax.set_title("downstream probes")

    for ax in axes.flat:
        _mark_timeline(record, ax, label=ax is loss_ax)
        if not ax.lines and not ax.collections:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="gray")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


def _layer_panel(record: RunRecord, ax: Any, stat: str, title: str) -> None:
    from matplotlib import colormaps

    layers = record.names("tsm/weights/", f"/{stat}")
    cmap = colormaps["viridis"]
    for i, layer in enumerate(layers):
        steps, values = _finite(*record.series(f"tsm/weights/{layer}/{stat}"))
        positive = [(s, v) for s, v in zip(steps, values) if v > 0]
        ax.plot([s for s, _ in positive], [v for _, v in positive], marker=".",
                color=cmap(i / max(1, len(layers) - 1)), lw=1,
                label=layer if len(layers) <= 8 else None)
    if any(ax.lines):
        ax.set_yscale("log")
    if len(layers) > 8:
        ax.text(0.01, 0.02, f"{len(layers)} layers, first purple to last yellow",
                transform=ax.transAxes, fontsize=8)
    ax.set_title(title)


def _mark_timeline(record: RunRecord, ax: Any, label: bool) -> None:
    """Stage boundaries (grey dashed, named), rollbacks (purple) and anomalies (red)."""
    for stage in record.of_kind("stage"):
        ax.axvline(stage["step"], color="dimgray", ls="--", lw=1)
        if label:
            ax.text(stage["step"], 1.0, f" {stage.get('name', '')}", rotation=90, va="top",
                    ha="left", fontsize=8, color="dimgray", transform=ax.get_xaxis_transform())
    for rollback in record.of_kind("rollback"):
        ax.axvline(rollback["step"], color="purple", lw=1.2, ls="-.")
    for anomaly in record.of_kind("anomaly"):
        ax.axvline(anomaly["step"], color="red", lw=0.8, alpha=0.35)


# -- the page ----------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        return html.escape("" if value is None else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _event_details(event: dict[str, Any]) -> str:
    skip = {"kind", "step", "time", "mixture_history"}
    details = {k: v for k, v in event.items() if k not in skip}
    if event.get("kind") == "session_start":
        details["mixture_changes_so_far"] = len(event.get("mixture_history") or [])
    text = json.dumps(details, ensure_ascii=False)
    return text if len(text) <= 300 else text[:297] + "..."


def render_html(record: RunRecord, png: bytes, title: str | None = None) -> str:
    title = title or f"Run report: {record.tsm_dir.parent}"
    domains = record.domains()
    last_step = max((int(r["step"]) for r in record.rows), default=0)
    summary = [
        ("run directory", str(record.tsm_dir.parent)),
        ("last step", last_step),
        ("tokens seen", record.last("tsm/tokens_total")),
        ("training loss (last step)", record.last("tsm/loss")),
        ("held-out loss, token-weighted", record.last("tsm/val_loss_avg")),
        ("MFU (last)", record.last("tsm/mfu")),
        ("anomalies", len(record.of_kind("anomaly"))),
        ("stages", ", ".join(str(e.get("name", "")) for e in record.of_kind("stage")) or "-"),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]
    per_domain = [(d, record.last(f"tsm/tokens/{d}"), record.last(f"tsm/train_loss_ema/{d}"),
                   record.last(f"tsm/val_loss/{d}"), record.last(f"tsm/val_ppl/{d}"),
                   record.last(f"tsm/mixture/{d}")) for d in domains]
    events = [(e["step"], e.get("kind"), e.get("type", ""), _event_details(e))
              for e in record.events[-MAX_EVENT_ROWS:]]
    probes = [(name, record.last(f"tsm/probe/{name}")) for name in record.names("tsm/probe/")]
    image = base64.b64encode(png).decode("ascii")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
             "th{background:#f0f0f0}img{max-width:100%}")
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{style}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _table(("", ""), summary),
        "<h2>Domains (last values)</h2>",
        _table(("domain", "tokens", "train loss (EMA)", "held-out loss", "held-out ppl",
                "mixture weight"), per_domain),
        f"<img alt='run report' src='data:image/png;base64,{image}'>",
        "<h2>Probes (last values)</h2>", _table(("probe/metric", "value"), probes),
        "<h2>Events</h2>", _table(("step", "kind", "type", "details"), events),
        "</body></html>",
    ]
    return "\n".join(parts)


# -- writing -----------------------------------------------------------------------------------
def write_report(run_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str] | None = None,
                 title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` (default: next to the run's ``tsm`` folder);
    returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    record = load_run(run_dir)
    out = Path(output_dir) if output_dir is not None else record.tsm_dir.parent
    figure = plot_run(record, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    png = buffer.getvalue()
    png_path, html_path = out / "report.png", out / "report.html"
    write_bytes_atomically(png_path, png)
    write_bytes_atomically(html_path, render_html(record, png, title).encode("utf-8"))
    return png_path, html_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-aquila report",
        description="Write the PNG + HTML report of a run directory (its TSM run files).")
    parser.add_argument("run_dir", help="the trainer's default_root_dir / log_dir of the run")
    parser.add_argument("--output-dir", default=None,
                        help="where to write report.png/report.html (default: the folder that "
                             "holds the run's tsm/ files)")
    parser.add_argument("--title", default=None, help="title of the figure and page")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        png, page = write_report(args.run_dir, args.output_dir, args.title)
    except FileNotFoundError as error:
        print(f"lightning-aquila report: {error}", file=sys.stderr)
        return 1
    print(f"report: {page}\nfigure: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
