"""What the run report and the comparison figure share: matplotlib off-screen, the note on
an empty panel, a panel's legend and grid, and the figure as PNG bytes."""

from __future__ import annotations

import io
from typing import Any

#: What an empty panel says (a run too short for that measurement, or it is turned off).
NO_DATA = "no data yet"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def finish_panel(ax: Any, has_data: bool | None = None) -> None:
    """:data:`NO_DATA` on a panel with nothing drawn (``has_data``; default: whether it has
    lines or areas), else its legend when something drawn has a label; a light grid."""
    if not (bool(ax.lines or ax.collections) if has_data is None else has_data):
        ax.text(0.5, 0.5, NO_DATA, transform=ax.transAxes, ha="center", va="center",
                color="gray", fontsize=12)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def png_bytes(figure: Any) -> bytes:
    """The figure as a PNG (100 dpi); the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()


__all__ = ["NO_DATA", "finish_panel", "png_bytes", "pyplot"]
