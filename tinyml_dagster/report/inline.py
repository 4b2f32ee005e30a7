"""Plots of a run's own data as Dagster metadata: a PNG embedded in Markdown, drawn when the asset runs."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import dagster as dg


def _figure(title: str, ylabel: str, width: float = 6.4):
    from matplotlib.figure import Figure  # no pyplot: no global state in a run's worker thread

    fig = Figure(figsize=(width, 3.2), dpi=80)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def _markdown(fig, caption: str) -> dg.MetadataValue:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{caption}](data:image/png;base64,{data})\n\n{caption}")


def bar_plot(title: str, ylabel: str, labels: Sequence[str], series: dict[str, Sequence[float]],
             caption: str) -> dg.MetadataValue:
    """Grouped bars, one group per label, one bar per series."""
    fig, ax = _figure(title, ylabel, width=max(6.4, 0.35 * len(labels) * len(series)))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels, rotation=60,
                  ha="right", fontsize=7)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _markdown(fig, caption)


def line_plot(title: str, xlabel: str, ylabel: str, lines: dict[str, tuple[Sequence[float], Sequence[float]]],
              caption: str) -> dg.MetadataValue:
    """One line (x, y) per name."""
    fig, ax = _figure(title, ylabel)
    ax.set_xlabel(xlabel, fontsize=9)
    for name, (x, y) in lines.items():
        ax.plot(x, y, marker="." if len(x) < 40 else None, label=name)
    ax.legend(fontsize=8)
    return _markdown(fig, caption)
