"""Sweep results and tables: :class:`SweepResult` (one run's metric at each sparsity) and
:class:`SweepTable` (several runs side by side, :func:`combine_sweeps`), with their Markdown, CSV
and JSON forms, and :func:`plot_sweeps`."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .._utils import JsonFileMixin, PathLike, markdown_table
from ..config import check_mode
from ..pruning import check_group_fraction, check_method, check_sparsity
from .plots import _import_matplotlib, draw_sweeps


DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The paper's pruning levels: 0 %, 10 %, ..., 90 %."""


SCALAR_METRIC = "metric"
"""Metric name used when ``evaluate_fn`` returns a single float."""


_RESERVED = ("sparsity", "pruned_fraction")


_FORMAT = "hf-tdrop-sweep"


_TABLE_FORMAT = "hf-tdrop-sweep-table"




# --------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------


def _percent(s: float) -> str:
    return f"{round(100 * s, 6):g}%"


def _fmt(value: Optional[float], float_format: str) -> str:
    if value is None:
        return "–"
    return format(value, float_format)


def _check_float_format(float_format: Any) -> str:
    try:
        format(1.0, float_format)
    except (TypeError, ValueError):
        raise ValueError(
            f"`float_format` must be a format spec for floats such as '.4f', got {float_format!r}.") from None
    return float_format


def _as_float_list(values: Any, name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"`{name}` must be a list of numbers, got {type(values).__name__}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"`{name}` must contain numbers only, got {v!r}.")
        out.append(float(v))
    return out


@dataclass
class SweepResult(JsonFileMixin):
    """Metrics of one model at several pruning levels (one run = one column of the paper's tables).

    Attributes:
        run_name: label of the run (e.g. ``"none"``, ``"targeted α=0.66 γ=0.75"``).
        mode: pruning mode used, ``"weight"`` or ``"unit"``.
        method: ``"magnitude"`` or ``"random"``.
        sparsities: the pruning levels, in evaluation order, each in [0, 1).
        metrics: ``{metric name: [value at each level]}``, every list as long as ``sparsities``.
        pruned_fraction: fraction of the targeted weights actually zeroed at each level (the floor
            per row / layer makes it slightly below the level), or None if unknown.
        recalibration: how the pruned model was recalibrated before each evaluation (e.g.
            ``{"method": "batchnorm", "num_batches": 50}``), or None if it was evaluated as pruned.
    """

    run_name: str
    mode: str
    method: str
    sparsities: list[float]
    metrics: dict[str, list[float]]
    pruned_fraction: Optional[list[float]] = None
    recalibration: Optional[dict] = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_name, str) or not self.run_name:
            raise ValueError(f"`run_name` must be a non-empty string, got {self.run_name!r}.")
        check_mode(self.mode)
        check_method(self.method)
        self.sparsities = _as_float_list(self.sparsities, "sparsities")
        for s in self.sparsities:
            _check_level(s, self.mode)
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ValueError(f"`sparsities` must be distinct, got {self.sparsities}.")
        if not isinstance(self.metrics, Mapping) or not self.metrics:
            raise ValueError(
                f"`metrics` must be a non-empty dict of metric name -> list of floats, got {self.metrics!r}.")
        metrics = {}
        for key, values in self.metrics.items():
            if not isinstance(key, str) or not key or key in _RESERVED:
                raise ValueError(f"`metrics` keys must be non-empty strings other than {list(_RESERVED)}, got {key!r}.")
            values = _as_float_list(values, f"metrics[{key!r}]")
            if len(values) != len(self.sparsities):
                raise ValueError(f"`metrics[{key!r}]` has {len(values)} values for {len(self.sparsities)} sparsities.")
            metrics[key] = values
        self.metrics = metrics
        if self.pruned_fraction is not None:
            self.pruned_fraction = _as_float_list(self.pruned_fraction, "pruned_fraction")
            if len(self.pruned_fraction) != len(self.sparsities):
                raise ValueError("`pruned_fraction` must have one value per sparsity.")
        if self.recalibration is not None and not isinstance(self.recalibration, Mapping):
            raise ValueError(f"`recalibration` must be None or a dict, got {self.recalibration!r}.")

    def metric_names(self) -> list[str]:
        return list(self.metrics)

    def _check_metric(self, metric: Optional[str]) -> list[str]:
        if metric is None:
            return self.metric_names()
        if metric not in self.metrics:
            raise ValueError(f"`metric` must be one of {self.metric_names()}, got {metric!r}.")
        return [metric]

    def to_markdown(self, metric: Optional[str] = None, float_format: str = ".4f") -> str:
        """Markdown table: one row per level (``prune %``), one column per metric (or only ``metric``)."""
        names = self._check_metric(metric)
        _check_float_format(float_format)
        rows = [[_percent(s), *(_fmt(self.metrics[m][i], float_format) for m in names)]
                for i, s in enumerate(self.sparsities)]
        title = f"**{self.run_name}** ({self.method} {self.mode} pruning{_recalibration_note(self.recalibration)})\n\n"
        return title + markdown_table(["prune %", *names], rows)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": 1, "run_name": self.run_name, "mode": self.mode,
                "method": self.method, "sparsities": list(self.sparsities),
                "metrics": {k: list(v) for k, v in self.metrics.items()}, "pruned_fraction": self.pruned_fraction,
                "recalibration": self.recalibration}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SweepResult":
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"Not a hf-tdrop sweep result (expected 'format': {_FORMAT!r}).")
        missing = [k for k in ("run_name", "mode", "method", "sparsities", "metrics") if k not in data]
        if missing:
            raise ValueError(f"Sweep result is missing fields {missing}.")
        return cls(run_name=data["run_name"], mode=data["mode"], method=data["method"],
                   sparsities=data["sparsities"], metrics=data["metrics"],
                   pruned_fraction=data.get("pruned_fraction"), recalibration=data.get("recalibration"))

    def to_csv(self, path: PathLike) -> Path:
        """Write ``sparsity,<metric>...,pruned_fraction`` rows (full-precision floats); returns the path."""
        path = Path(path)
        names = self.metric_names()
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["sparsity", *names] + (["pruned_fraction"] if self.pruned_fraction else []))
            for i, s in enumerate(self.sparsities):
                extra = [repr(self.pruned_fraction[i])] if self.pruned_fraction else []
                writer.writerow([repr(s), *(repr(self.metrics[m][i]) for m in names), *extra])
        return path

    def save(self, output_dir: PathLike, prefix: Optional[str] = None, *, plot: bool = True) -> dict[str, Path]:
        """Write ``<prefix>.md``, ``.csv``, ``.json`` and (``plot=True``, needs matplotlib) ``.png``
        into ``output_dir`` (created if needed). ``prefix`` defaults to ``sweep-<run name slug>``.
        Returns ``{"markdown"|"csv"|"json"|"png": path}``."""
        if prefix is None:
            prefix = "sweep-" + _slug(self.run_name)
        if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"`prefix` must be a non-empty file name stem without path separators, got {prefix!r}.")
        if plot:
            _import_matplotlib()  # fail before writing anything
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / f"{prefix}.md", "csv": out / f"{prefix}.csv", "json": out / f"{prefix}.json"}
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        self.to_csv(paths["csv"])
        self.to_json(paths["json"])
        if plot:
            title = f"{self.run_name} ({self.method} {self.mode} pruning)"
            paths["png"] = plot_sweeps([self], out / f"{prefix}.png", title=title)
        return paths

    def __str__(self) -> str:
        return self.to_markdown()


def _check_level(level: float, mode: str) -> float:
    return check_group_fraction(level, "sparsities") if mode == "nm" else check_sparsity(level, "sparsities")


def _recalibration_note(recalibration: Optional[Mapping]) -> str:
    if not recalibration:
        return ""
    if recalibration.get("method") == "batchnorm":
        n = recalibration.get("num_batches")
        return f", BatchNorm re-estimated on {n if n is not None else 'all'} batches"
    return f", recalibrated ({recalibration.get('method', 'custom')})"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("α", "alpha").replace("γ", "gamma")).strip("-.")
    return slug or "run"


@dataclass
class SweepTable(JsonFileMixin):
    """Several runs side by side, shaped like the paper's tables.

    Attributes:
        metric: the metric shown.
        columns: run labels, one column each.
        sparsities: row levels (sorted union of the runs' levels).
        values: ``values[i][j]`` = metric of run ``j`` at ``sparsities[i]``, None if that run lacks the level.
    """

    metric: str
    columns: list[str]
    sparsities: list[float]
    values: list[list[Optional[float]]]

    def to_markdown(self, float_format: str = ".4f") -> str:
        """Markdown: header ``prune % | <run> | <run> ...``, one row per level; missing values as ``–``."""
        _check_float_format(float_format)
        rows = [[_percent(s), *(_fmt(v, float_format) for v in row)] for s, row in zip(self.sparsities, self.values)]
        return f"**{self.metric}**\n\n" + markdown_table(["prune %", *self.columns], rows)

    def to_dict(self) -> dict:
        return {"format": _TABLE_FORMAT, "version": 1, "metric": self.metric, "columns": list(self.columns),
                "sparsities": list(self.sparsities), "values": [list(r) for r in self.values]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SweepTable":
        if not isinstance(data, Mapping) or data.get("format") != _TABLE_FORMAT:
            raise ValueError(f"Not a hf-tdrop sweep table (expected 'format': {_TABLE_FORMAT!r}).")
        missing = [k for k in ("metric", "columns", "sparsities", "values") if k not in data]
        if missing:
            raise ValueError(f"Sweep table is missing fields {missing}.")
        return cls(metric=data["metric"], columns=list(data["columns"]), sparsities=list(data["sparsities"]),
                   values=[list(r) for r in data["values"]])

    def to_csv(self, path: PathLike) -> Path:
        """Write ``sparsity,<run>,<run>...`` rows; a missing value is an empty cell."""
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["sparsity", *self.columns])
            for s, row in zip(self.sparsities, self.values):
                writer.writerow([repr(s), *("" if v is None else repr(v) for v in row)])
        return path

    def __str__(self) -> str:
        return self.to_markdown()


def _check_results(results: Any) -> list[SweepResult]:
    if isinstance(results, SweepResult):
        results = [results]
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence) or not results:
        raise ValueError("`results` must be a non-empty list of SweepResult.")
    for r in results:
        if not isinstance(r, SweepResult):
            raise ValueError(f"`results` must contain SweepResult objects only, got {type(r).__name__}.")
    return list(results)


def _check_labels(labels: Any, results: list[SweepResult]) -> list[str]:
    if labels is None:
        labels = [r.run_name for r in results]
    elif isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) != len(results) or \
            any(not isinstance(x, str) or not x for x in labels):
        raise ValueError(
            f"`labels` must be a list of {len(results)} non-empty strings (one per result), got {labels!r}.")
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"Column labels must be distinct, got {labels}; pass `labels=` or distinct run names.")
    return labels


def _common_metrics(results: list[SweepResult]) -> list[str]:
    return [m for m in results[0].metrics if all(m in r.metrics for r in results)]


def _check_metric_for(results: list[SweepResult], metric: Any) -> str:
    common = _common_metrics(results)
    if metric is None:
        if len(common) == 1:
            return common[0]
        raise ValueError(f"`metric` must be given when the runs share {len(common)} metrics; choose from {common}.")
    if metric not in common:
        raise ValueError(f"`metric` must be a metric of every run, one of {common}, got {metric!r}.")
    return metric


def combine_sweeps(results: Sequence[SweepResult], metric: Optional[str] = None, *,
                   labels: Optional[Sequence[str]] = None) -> SweepTable:
    """Combine runs into one paper-style table of ``metric``: rows = prune %, columns = runs.

    Args:
        results: the runs (e.g. the unregularised model and the targeted-dropout one).
        metric: a metric every run has (may be omitted when they share exactly one).
        labels: column labels; default each run's ``run_name`` (must be distinct).

    Rows are the sorted union of the runs' levels; a run without a level shows ``–`` / None there.
    """
    results = _check_results(results)
    metric = _check_metric_for(results, metric)
    columns = _check_labels(labels, results)
    levels = sorted({s for r in results for s in r.sparsities})
    lookup = [dict(zip(r.sparsities, r.metrics[metric])) for r in results]
    values = [[col.get(s) for col in lookup] for s in levels]
    return SweepTable(metric=metric, columns=columns, sparsities=levels, values=values)


def plot_sweeps(results: Sequence[SweepResult], path: PathLike, metric: Optional[str] = None, *,
                labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """Plot metric vs prune % for each run (one line per run) into a PNG at ``path``.

    ``metric=None`` draws one panel per metric shared by every run. Uses matplotlib's Agg canvas
    directly (no pyplot, no global backend change). Returns ``path``.
    """
    results = _check_results(results)
    columns = _check_labels(labels, results)
    names = _common_metrics(results) if metric is None else [_check_metric_for(results, metric)]
    if not names:
        raise ValueError("The runs share no metric to plot.")
    xlabel = f"prune % ({results[0].mode} pruning)" if len({r.mode for r in results}) == 1 else "prune %"
    runs = [(label, list(r.sparsities), {name: list(r.metrics[name]) for name in names})
            for r, label in zip(results, columns)]
    return draw_sweeps(runs, names, Path(path), xlabel=xlabel, title=title)
