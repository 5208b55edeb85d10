"""Several runs in one figure: ``lightning-aquila report --compare RUN RUN ...``.

Mixture policies are judged by what they buy per training token, so the runs' held-out loss
curves (domain average, worst domain, each domain) are overlaid against training tokens, and
each run's mixture trajectory gets its own panel (stacked weights do not overlay). Reads each
run's files through :func:`lightning_aquila.tracking.run_record.load_run`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_aquila.atomic import write_bytes_atomically
from lightning_aquila.tracking.figure import finish_panel, png_bytes, pyplot
from lightning_aquila.tracking.run_record import RunRecord, load_run


def held_out_curves(record: RunRecord, part: str | None = None
                    ) -> dict[str, list[tuple[float, float]]]:
    """``(tokens, loss)`` points of the held-out loss of ``part`` (``"test"`` or ``"val"``,
    the dev part; default: ``record.report_part()``, the test part when the run has one):
    one curve per domain, ``"average"`` (the plain mean over domains, so every domain counts
    alike) and ``"worst"`` (the highest domain loss), at the validation steps where every
    domain was measured."""
    domains = record.domains()
    part = part or record.report_part()
    per_domain = {d: dict(zip(*record.series(f"tsm/{part}_loss/{d}"))) for d in domains}
    steps = sorted({s for points in per_domain.values() for s in points})
    tokens = dict(zip(steps, record.tokens_at(steps)))
    curves: dict[str, list[tuple[float, float]]] = {d: [] for d in [*domains, "average",
                                                                     "worst"]}
    for step in steps:
        if tokens[step] is None:
            continue
        values = {d: per_domain[d].get(step, math.nan) for d in domains}
        for d, value in values.items():
            if math.isfinite(value):
                curves[d].append((tokens[step], value))
        if domains and all(math.isfinite(v) for v in values.values()):
            curves["average"].append((tokens[step], sum(values.values()) / len(values)))
            curves["worst"].append((tokens[step], max(values.values())))
    return curves


def is_fixed(record: RunRecord) -> bool:
    """A run on a fixed mixture: its sampler used one set of weights throughout."""
    return len(record.mixture_history()) <= 1


def value_at(points: Sequence[tuple[float, float]], tokens: float) -> float | None:
    """The curve's value at ``tokens``, linear between its points; ``None`` outside them."""
    for (t0, v0), (t1, v1) in itertools.pairwise(points):
        if t0 <= tokens <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return points[-1][1] if points and points[-1][0] == tokens else None


def envelope_gap(points: Sequence[tuple[float, float]],
                 fixed: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float]]:
    """A curve minus the lower envelope of the ``fixed`` mixtures' curves (the best fixed
    mixture at each token count), at the curve's points where some fixed curve is defined:
    negative where the run is ahead of every fixed mixture."""
    gaps = []
    for tokens, value in points:
        there = [v for curve in fixed if (v := value_at(curve, tokens)) is not None]
        if there:
            gaps.append((tokens, value - min(there)))
    return gaps


def settled_range(curves: Sequence[Sequence[tuple[float, float]]],
                  skip: float = 0.1) -> tuple[float, float] | None:
    """The loss range a comparison panel shows: the curves' values after the first ``skip`` of
    the longest run's tokens, padded by 5%. The first evaluations sit several nats above the
    rest (8 against 2.3 at 200M tokens), and on one axis they flatten the end of the curves,
    where runs differ by hundredths of a nat and a comparison is decided. ``None`` for no
    points."""
    end = max((points[-1][0] for points in curves if points), default=None)
    if end is None:
        return None
    values = [v for points in curves for t, v in points if t >= skip * end]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = 0.05 * (high - low) or 0.05
    return low - pad, high + pad


def summarise_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's final held-out numbers, for a comparison table, on the part reports judge
    by (``part``: ``"test"``, or ``"val"`` for a run without a test part).

    Keys: ``run`` (the folder), ``part``, ``step`` and ``tokens`` (of the last validation
    where every domain was measured), ``domain_avg_loss`` (mean over domains),
    ``worst_domain`` and ``worst_domain_loss``, ``token_weighted_loss``
    (``tsm/<part>_loss_avg``: loss per held-out token over all domains) and ``losses`` (per
    domain). Losses are ``None`` when the run has no validation yet."""
    record = load_run(run_dir)
    domains = record.domains()
    part = record.report_part()
    per_domain = {d: dict(zip(*record.series(f"tsm/{part}_loss/{d}"))) for d in domains}
    complete = [s for s in sorted({s for p in per_domain.values() for s in p})
                if all(math.isfinite(per_domain[d].get(s, math.nan)) for d in domains)]
    summary: dict[str, Any] = {"run": str(run_dir), "part": part, "step": None,
                               "tokens": None, "domain_avg_loss": None, "worst_domain": None,
                               "worst_domain_loss": None, "token_weighted_loss": None,
                               "losses": {}}
    if not complete or not domains:
        return summary
    step = complete[-1]
    losses = {d: per_domain[d][step] for d in domains}
    worst = max(losses, key=losses.__getitem__)
    weighted = dict(zip(*record.series(f"tsm/{part}_loss_avg"))).get(step)
    summary.update(step=step, tokens=record.tokens_at([step])[0],
                   domain_avg_loss=sum(losses.values()) / len(losses), worst_domain=worst,
                   worst_domain_loss=losses[worst], token_weighted_loss=weighted,
                   losses=losses)
    return summary


def compare_runs(run_dirs: list[str], output: str, labels: list[str] | None = None) -> Path:
    """Write one PNG comparing ``run_dirs``: held-out loss against training tokens (domain
    average, worst domain, one panel per domain) with a line per run, each on the
    :func:`settled_range` of its curves, then each run's mixture weights over steps. Returns
    the PNG's path."""
    if not run_dirs:
        raise ValueError("compare_runs: give at least one run directory")
    labels = list(labels) if labels is not None else [Path(r).name or str(r) for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"compare_runs: {len(labels)} labels for {len(run_dirs)} runs; give "
                         "one label per run")
    from matplotlib import colormaps

    plt = pyplot()
    records = [load_run(r) for r in run_dirs]
    domains = list(dict.fromkeys(d for r in records for d in r.domains()))
    part = "test" if any(r.report_part() == "test" for r in records) else "val"
    curves = [held_out_curves(r, part) for r in records]
    fixed = [c["average"] for r, c in zip(records, curves) if is_fixed(r) and c["average"]]
    if fixed:  # each run's distance to the best fixed mixture at every token count
        for runs in curves:
            runs["gap"] = envelope_gap(runs["average"], fixed)
    loss_panels = ["average", "worst", *(["gap"] if fixed else []), *domains]
    columns = 3
    loss_rows = math.ceil(len(loss_panels) / columns)
    mix_rows = math.ceil(len(records) / columns)
    fig, axes = plt.subplots(loss_rows + mix_rows, columns,
                             figsize=(5.2 * columns, 3.8 * (loss_rows + mix_rows)),
                             squeeze=False)
    run_colors = colormaps["tab10"]
    domain_colors = {d: colormaps["tab20"](i % 20) for i, d in enumerate(domains)}
    name = "test part" if part == "test" else "dev part"
    titles = {"average": f"held-out loss: mean over domains ({name})",
              "worst": f"held-out loss: worst domain ({name})",
              "gap": f"gap to the best of {len(fixed)} fixed mixtures (mean over domains)"}
    for i, panel in enumerate(loss_panels):
        ax = axes[i // columns][i % columns]
        for j, (label, runs) in enumerate(zip(labels, curves)):
            points = runs.get(panel, [])
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, lw=1.5, color=run_colors(j % 10),
                        label=label)
        shown = settled_range([runs.get(panel, []) for runs in curves])
        if shown is not None:
            ax.set_ylim(*shown)
        if panel == "gap":
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(titles.get(panel, f"held-out loss: {panel} ({name})"))
        ax.set_xlabel("training tokens (first 10% above the axis)")
        ax.set_ylabel("nats/token")
    for k, (label, record) in enumerate(zip(labels, records)):
        ax = axes[loss_rows + k // columns][k % columns]
        history = record.mixture_history()
        if history:
            last = max([history[-1][0], *(int(r["step"]) for r in record.rows)])
            names = list(dict.fromkeys(d for _, w in history for d in w))
            ax.stackplot([s for s, _ in history] + [last],
                         *[[w.get(d, 0.0) for _, w in history] + [history[-1][1].get(d, 0.0)]
                           for d in names], labels=names, step="post", alpha=0.85,
                         colors=[domain_colors.get(d, "gray") for d in names])
            ax.set_ylim(0, 1)
        ax.set_title(f"mixture weights: {label}")
        ax.set_xlabel("optimizer step")
    for ax in axes.flat:
        if ax.get_title():
            finish_panel(ax)
        else:
            ax.set_visible(False)
    fig.suptitle(f"{len(records)} runs compared", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(output)
    write_bytes_atomically(path, png_bytes(fig))
    return path


def summary_table(summaries: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """The summaries as a plain-text table (what ``report --compare`` prints)."""

    def number(value: Any, digits: str = ".4f") -> str:
        return "-" if value is None else format(value, digits)

    # per held-out token: weighted by each domain's held-out tokens, not by its corpus share
    # (equal to the domain average when every domain holds out the same number of tokens)
    header = ("run", "part", "step", "tokens", "domain avg", "worst domain",
              "per held-out token")
    rows = [(label, s.get("part", "val"), str(s["step"] if s["step"] is not None else "-"),
             "-" if s["tokens"] is None else f"{round(s['tokens']):,}",
             number(s["domain_avg_loss"]),
             "-" if s["worst_domain"] is None else
             f"{number(s['worst_domain_loss'])} ({s['worst_domain']})",
             number(s["token_weighted_loss"])) for label, s in zip(labels, summaries)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])
