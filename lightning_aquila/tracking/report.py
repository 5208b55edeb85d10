"""The run report: one PNG and one self-contained HTML page from a run's files.

``lightning-aquila report RUN_DIR`` (:func:`write_report`) reads the run through
``run_record.py`` and writes ``report.png`` and ``report.html`` next to the ``tsm`` folder:
per-domain training and held-out loss, the mixture over steps, stage boundaries, anomalies,
gradient norm, throughput/MFU, the weights' update ratios and change since the stage began,
and probes; the page also tables the loss per score bucket when the run logged one.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_aquila.atomic import write_bytes_atomically
from lightning_aquila.tracking.figure import finish_panel, png_bytes, pyplot
from lightning_aquila.tracking.run_record import RunRecord, finite_points, load_run

#: The page lists at most this many events (the most recent); the file has them all.
MAX_EVENT_ROWS = 500


# -- the figure --------------------------------------------------------------------------------
def plot_run(record: RunRecord, title: str | None = None) -> Any:
    """The report figure (matplotlib, Agg): eleven panels, all but "held-out loss against
    tokens" sharing the step axis. A panel with nothing to draw says "no data yet"."""
    from matplotlib import colormaps

    plt = pyplot()
    domains = record.domains()
    palette = colormaps["tab10"]
    color = {d: palette(i % 10) for i, d in enumerate(domains)}
    fig = plt.figure(figsize=(15, 24))
    grid = fig.add_gridspec(6, 2)
    first = fig.add_subplot(grid[0, 0])
    step_axes = [first]

    def step_panel(row: int, column: int | slice) -> Any:
        ax = fig.add_subplot(grid[row, column], sharex=first)
        step_axes.append(ax)
        return ax

    loss_ax, val_ax = first, step_panel(0, 1)
    tokens_loss_ax = fig.add_subplot(grid[1, 0])
    mix_ax, seen_ax = step_panel(1, 1), step_panel(2, 0)
    lr_ax, grad_ax = step_panel(2, 1), step_panel(3, 0)
    tput_ax, upd_ax = step_panel(3, 1), step_panel(4, 0)
    stage_ax, probe_ax = step_panel(4, 1), step_panel(5, slice(None))
    fig.suptitle(title or f"run report: {record.tsm_dir.parent}", fontsize=13)

    _train_loss_panel(record, loss_ax, domains, color)
    _held_out_panels(record, val_ax, tokens_loss_ax, domains, color)
    _mixture_panel(record, mix_ax, color)
    for d in domains:
        seen_ax.plot(*finite_points(*record.series(f"tsm/tokens/{d}")), color=color[d], lw=1.4,
                     label=d)
    seen_ax.set_title("tokens seen per domain (cumulative)")
    _lr_panel(record, lr_ax)
    steps, values = finite_points(*record.series("tsm/grad_norm"))
    grad_ax.plot(steps, values, color="tab:blue", lw=1.2)
    if values and min(values) > 0 and max(values) / min(values) > 50:
        grad_ax.set_yscale("log")
    grad_ax.set_title("gradient norm (before clipping)")
    _throughput_panel(record, tput_ax)
    _layer_panel(record, upd_ax, "update_ratio",
                 "weights: update-to-weight ratio per layer, between checks")
    _layer_panel(record, stage_ax, "stage_change",
                 "weights: relative change since the stage began, per layer")
    _probe_panel(record, probe_ax, palette)

    for ax in [*step_axes, tokens_loss_ax]:
        has_data = bool(ax.lines or ax.collections)
        if ax in step_axes:
            _mark_timeline(record, ax, label=ax is loss_ax)
        finish_panel(ax, has_data)
    for ax in step_axes:
        ax.tick_params(labelbottom=True)
    for ax in (stage_ax, upd_ax, probe_ax):
        ax.set_xlabel("optimizer step")
    tokens_loss_ax.set_xlabel("training tokens seen (all domains)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def _train_loss_panel(record: RunRecord, ax: Any, domains: list[str], color: dict) -> None:
    """Per domain: the interval means solid, their EMA dashed; loss spikes as red crosses."""
    for d in domains:
        ax.plot(*finite_points(*record.series(f"tsm/train_loss/{d}")), color=color[d], lw=1.4,
                label=d)
        ax.plot(*finite_points(*record.series(f"tsm/train_loss_ema/{d}")), color=color[d], lw=1.2,
                ls="--", alpha=0.6)
    spikes = [e for e in record.of_kind("anomaly") if e.get("type") == "spike"
              and e.get("value") is not None]
    if spikes:
        ax.scatter([e["step"] for e in spikes], [e["value"] for e in spikes], marker="x",
                   color="red", s=60, zorder=5, label="loss spike")
    ax.set_title("training loss per domain (interval mean; dashed: EMA)")
    ax.set_ylabel("nats/token")


def _held_out_panels(record: RunRecord, by_step: Any, by_tokens: Any, domains: list[str],
                     color: dict) -> None:
    """Held-out loss per domain and the token-weighted average, against steps and against
    the training tokens seen at that step (what compares runs of different batch sizes): of
    the test part when the run has one (what judges it), else of the dev part."""
    part = record.report_part()
    curves = [(f"tsm/{part}_loss/{d}", d, {"color": color[d], "marker": "o", "ms": 3,
                                           "lw": 1.5}) for d in domains]
    curves.append((f"tsm/{part}_loss_avg", "token-weighted avg",
                   {"color": "black", "ls": "--", "lw": 1.5}))
    for name, label, style in curves:
        steps, values = finite_points(*record.series(name))
        by_step.plot(steps, values, label=label, **style)
        tokens = record.tokens_at(steps)
        pairs = [(t, v) for t, v in zip(tokens, values) if t is not None]
        by_tokens.plot([t for t, _ in pairs], [v for _, v in pairs], label=label, **style)
    name = "test part" if part == "test" else "dev part"
    by_step.set_title(f"held-out loss per domain ({name})")
    by_tokens.set_title(f"held-out loss against training tokens ({name})")
    for ax in (by_step, by_tokens):
        ax.set_ylabel("nats/token")


def _mixture_panel(record: RunRecord, ax: Any, color: dict) -> None:
    """The weights the sampler used, from the mixture history: each change drawn from the
    step its first batch was trained in (a change requested at step s applies from a later
    batch, since batches already fetched keep the old weights)."""
    history = record.mixture_history()
    last_step = max((int(r["step"]) for r in record.rows), default=0)
    if history:
        names = list(dict.fromkeys(d for _, weights in history for d in weights))
        steps = [s for s, _ in history] + [max(last_step, history[-1][0])]
        stacks = [[w.get(d, 0.0) for _, w in history] + [history[-1][1].get(d, 0.0)]
                  for d in names]
        ax.stackplot(steps, *stacks, labels=names, step="post", alpha=0.85,
                     colors=[color.get(d, "gray") for d in names])
        ax.set_ylim(0, 1)
    for change in record.of_kind("mixture"):
        ax.axvline(change["step"], color="black", lw=0.8, ls=":")
    ax.set_title("mixture weights as applied (stacked; dotted: a change was requested)")


def _lr_panel(record: RunRecord, ax: Any) -> None:
    groups = record.names("tsm/lr_group/")
    if groups:
        for i, group in enumerate(groups):  # groups often share one schedule: dash the rest
            ax.plot(*finite_points(*record.series(f"tsm/lr_group/{group}")), lw=1.2, label=group,
                    ls="-" if i == 0 else (0, (3 + i, 3)))
    else:
        ax.plot(*finite_points(*record.series("tsm/lr")), color="tab:orange", lw=1.2)
    ax.set_title("learning rate")


def _throughput_panel(record: RunRecord, ax: Any) -> None:
    """Tokens/s per device; MFU is that times a constant, so it is a second scale on the same
    line (in %), not a second series."""
    steps, values = finite_points(*record.series("tsm/tokens_per_sec"))
    ax.plot(steps, values, color="tab:green", lw=1.2)
    ax.set_ylabel("tokens/s per device")
    mfu = dict(zip(*finite_points(*record.series("tsm/mfu"))))
    ratios = [mfu[s] / v for s, v in zip(steps, values) if s in mfu and v > 0]
    if ratios:
        per_token = 100 * sorted(ratios)[len(ratios) // 2]  # % MFU per token/s
        right = ax.secondary_yaxis("right", functions=(lambda x: x * per_token,
                                                       lambda y: y / per_token))
        right.set_ylabel("MFU (%)")
    ax.set_title("throughput (right axis: the same as MFU)")


def _probe_panel(record: RunRecord, ax: Any, palette: Any) -> None:
    """Each probe metric, and its probe's chance level (``<probe>/chance``) as a dotted line."""
    names = [n for n in record.names("tsm/probe/") if not n.endswith("/chance")]
    for i, name in enumerate(names):
        ax.plot(*finite_points(*record.series(f"tsm/probe/{name}")), marker="o", ms=3,
                color=palette(i % 10), label=name)
    for probe in record.names("tsm/probe/", "/chance"):
        chance = record.last(f"tsm/probe/{probe}/chance")
        if names and chance is not None and math.isfinite(chance):
            ax.axhline(chance, color="gray", ls=":", lw=1.2, label=f"{probe}: chance")
    ax.set_title("downstream probes (dotted: chance)")


def _layer_panel(record: RunRecord, ax: Any, stat: str, title: str) -> None:
    from matplotlib import colormaps

    layers = record.names("tsm/weights/", f"/{stat}")
    cmap = colormaps["viridis"]
    for i, layer in enumerate(layers):
        steps, values = finite_points(*record.series(f"tsm/weights/{layer}/{stat}"))
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
    """Stage boundaries (grey dashed, named), resumes (green), rollbacks (purple) and
    anomalies (red)."""
    top = ax.get_xaxis_transform()
    for stage in record.of_kind("stage"):
        ax.axvline(stage["step"], color="dimgray", ls="--", lw=1)
        if label:
            ax.text(stage["step"], 1.0, f" {stage.get('name', '')}", rotation=90, va="top",
                    ha="left", fontsize=8, color="dimgray", transform=top)
    for start in record.of_kind("session_start"):
        if int(start["step"]) > 0:
            ax.axvline(start["step"], color="tab:green", lw=1.2, ls=(0, (4, 2)))
            if label:
                ax.text(start["step"], 0.0, " resumed", rotation=90, va="bottom", ha="left",
                        fontsize=8, color="tab:green", transform=top)
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


def _count(value: float | None) -> str | None:
    """A count as people write it: ``307,200``, not ``3.072e+05``."""
    return None if value is None or not math.isfinite(value) else f"{round(value):,}"


def _percent(fraction: float | None) -> str | None:
    """MFU as the figure shows it, in %."""
    return None if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.3g}%"


def _event_details(event: dict[str, Any]) -> str:
    skip = {"kind", "step", "time", "mixture_history"}
    details = {k: v for k, v in event.items() if k not in skip}
    if event.get("kind") == "session_start":
        details["mixture_changes_so_far"] = len(event.get("mixture_history") or [])
    text = json.dumps(details, ensure_ascii=False)
    return text if len(text) <= 300 else text[:297] + "..."


def _score_bucket_section(record: RunRecord) -> list[str]:
    """The last loss per score bucket (``tsm/*_by_score/q<k>``) with each bucket's score
    range from the run log's ``score_buckets`` event; nothing when the run has none."""
    buckets = [*dict.fromkeys(b for part in ("train", "val", "test")
                              for b in record.names(f"tsm/{part}_share_by_score/"))]
    if not buckets:
        return []
    fixed = (record.of_kind("score_buckets") or [{}])[-1]
    edges, low_high = fixed.get("edges") or [], fixed.get("range") or [None, None]
    bounds = [low_high[0], *edges, low_high[1]] if len(edges) + 1 == len(buckets) else None

    def score_range(k: int) -> str | None:
        if bounds is None:
            return None
        low, high = bounds[k], bounds[k + 1]
        close = "]" if k == len(buckets) - 1 else ")"
        return (f"[{low:.4g}, {high:.4g}{close}" if low is not None and high is not None
                else f"< {high:.4g}" if high is not None else f">= {low:.4g}")

    rows = [(name, score_range(k),
             *(record.last(f"tsm/{part}_{what}_by_score/{name}")
               for part in ("train", "val", "test") for what in ("loss", "share")))
            for k, name in enumerate(buckets)]
    score = html.escape(str(fixed.get("score", "score")))
    return [f"<h2>Loss by score bucket ({score}, last values)</h2>",
            _table(("bucket", "score range", "train loss", "train share", "dev loss",
                    "dev share", "test loss", "test share"), rows)]


def render_html(record: RunRecord, png: bytes, title: str | None = None) -> str:
    title = title or f"Run report: {record.tsm_dir.parent}"
    domains = record.domains()
    last_step = max((int(r["step"]) for r in record.rows), default=0)
    history = record.mixture_history()
    current = history[-1][1] if history else {}
    resumes = [str(e["step"]) for e in record.of_kind("session_start") if int(e["step"]) > 0]
    summary = [
        ("run directory", str(record.tsm_dir.parent)),
        ("last step", last_step),
        ("tokens seen", _count(record.last("tsm/tokens_total"))),
        ("training loss (last step)", record.last("tsm/loss")),
        ("dev loss, token-weighted (what policies read)", record.last("tsm/val_loss_avg")),
        ("test loss, token-weighted (what judges the run)", record.last("tsm/test_loss_avg")),
        ("throughput (last), tokens/s per device", _count(record.last("tsm/tokens_per_sec"))),
        ("MFU (last)", _percent(record.last("tsm/mfu"))),
        ("anomalies", len(record.of_kind("anomaly"))),
        ("stages", ", ".join(str(e.get("name", "")) for e in record.of_kind("stage")) or "-"),
        ("resumed at step", ", ".join(resumes) or "-"),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]
    per_domain = [(d, _count(record.last(f"tsm/tokens/{d}")),
                   record.last(f"tsm/train_loss_ema/{d}"), record.last(f"tsm/val_loss/{d}"),
                   record.last(f"tsm/test_loss/{d}"),
                   None if d not in current else f"{current[d]:.3f}") for d in domains]
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
        _table(("domain", "tokens", "train loss (EMA)", "dev loss", "test loss",
                "mixture weight (now)"), per_domain),
        *_score_bucket_section(record),
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
    record = load_run(run_dir)
    out = Path(output_dir) if output_dir is not None else record.tsm_dir.parent
    png = png_bytes(plot_run(record, title))
    png_path, html_path = out / "report.png", out / "report.html"
    write_bytes_atomically(png_path, png)
    write_bytes_atomically(html_path, render_html(record, png, title).encode("utf-8"))
    return png_path, html_path


__all__ = ["plot_run", "render_html", "write_report"]
