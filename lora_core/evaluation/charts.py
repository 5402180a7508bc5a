"""The charts a user reads in the Prefect UI: the training loss and the selection's metrics, drawn by matplotlib.

Figures are made with matplotlib's object API (`Figure`, never pyplot), so
they draw in any thread of a Prefect worker with no display and no global
state, on the Agg canvas. Each has labelled axes, ticks and a legend; a
figure is returned before it is saved, so what it says can be read back.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LOSS_COLOUR", "LR_COLOUR", "loss_figure", "metric_figure", "png_bytes"]

LOSS_COLOUR, LR_COLOUR = "tab:blue", "tab:orange"


def loss_figure(
    losses: Sequence[float],
    lrs: Sequence[float],
    first_step: int = 1,
    epoch_ends: Sequence[int] = (),
    title: str = "",
) -> Figure:
    """The loss of every optimizer step, the learning rate on its own axis, the epochs' ends marked.

    `first_step`: the global step of `losses[0]`; `epoch_ends`: the global steps that end an epoch.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 2.8), dpi=100, layout="constrained")
    ax = figure.add_subplot()
    steps = list(range(first_step, first_step + len(losses)))
    lines = ax.plot(steps, list(losses), color=LOSS_COLOUR, linewidth=1.2, label="training loss (per step)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color=LOSS_COLOUR)
    ax.grid(alpha=0.3)
    rate = ax.twinx()
    lines += rate.plot(steps, list(lrs), color=LR_COLOUR, linewidth=1.0, label="learning rate")
    rate.set_ylabel("learning rate", color=LR_COLOUR)
    rate.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for end in epoch_ends:
        ax.axvline(end, color="0.5", linestyle="--", linewidth=0.8)
    if epoch_ends:
        lines.append(ax.axvline(epoch_ends[0], color="0.5", linestyle="--", linewidth=0.8, label="end of an epoch"))
    ax.legend(handles=lines, loc="upper right", fontsize="small")
    if title:
        ax.set_title(title, fontsize="medium")
    return figure


def metric_figure(metrics: Sequence[dict], names: Sequence[str], chosen: int | None = None) -> Figure:
    """Each metric over the epochs on its own panel and scale (they measure different things), the chosen
    epoch marked; metrics with no value in any epoch are left out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shown = [name for name in names if any(row.get(name) is not None for row in metrics)]
    figure = Figure(figsize=(6.4, 1.0 + 1.3 * max(1, len(shown))), dpi=100, layout="constrained")
    axes = figure.subplots(max(1, len(shown)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, shown, strict=False):
        points = [(row["epoch"], float(row[name])) for row in metrics if row.get(name) is not None]
        ax.plot(*zip(*points, strict=True), marker="o", linewidth=1.2, label=name)
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
        if chosen is not None:
            ax.axvline(chosen, color="black", linewidth=0.8, label=f"chosen: epoch {chosen}")
        ax.legend(loc="best", fontsize="x-small")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if not shown:
        axes[0].set_ylabel("no metric available")
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG, drawn on the Agg canvas (no display, whatever backend the process has)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)  # the figure draws on Agg from now on
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
