"""Drawing sweeps with matplotlib (an optional dependency, imported on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the [examples] extra
        raise ImportError(
            "Plotting sweeps needs matplotlib: pip install 'hf-tdrop[examples]' (or matplotlib).") from err
    return FigureCanvasAgg, Figure


def draw_sweeps(runs: Sequence[tuple[str, Sequence[float], Mapping[str, Sequence[float]]]], names: Sequence[str],
                path: Path, *, xlabel: str, title: Optional[str] = None) -> Path:
    """Draw one panel per metric in ``names`` (metric vs prune %, one line per ``(label, sparsities,
    {metric: values})`` run) into a PNG at ``path``, with matplotlib's Agg canvas."""
    FigureCanvasAgg, Figure = _import_matplotlib()
    fig = Figure(figsize=(5.0 * len(names), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for label, sparsities, metrics in runs:
            order = sorted(range(len(sparsities)), key=lambda i: sparsities[i])
            xs = [100 * sparsities[i] for i in order]
            ys = [metrics[name][i] for i in order]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    return path
