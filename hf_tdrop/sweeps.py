"""Pruning sweeps and paper-style tables and plots.

* :func:`prune_sweep` evaluates a model at several pruning levels (each under
  :func:`hf_tdrop.pruning.pruned`, so the model ends exactly as it started) and returns a
  :class:`SweepResult` (Markdown / CSV / JSON / PNG).
* :func:`combine_sweeps` lays several runs side by side like the paper's tables (rows = prune %,
  columns = runs, e.g. ``"none"`` vs ``"targeted α=0.66 γ=0.75"``); :func:`plot_sweeps` draws
  metric vs sparsity per run with matplotlib (Agg canvas, no pyplot state, no display needed).
* :func:`metric_evaluator` turns a 🤗 ``evaluate`` metric (or a ``Trainer``-style
  ``compute_metrics`` function) plus a prediction function into the ``evaluate_fn`` of
  :func:`prune_sweep`.

No pandas: tables are plain lists rendered by hand, files written with ``csv`` and ``json``.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ._utils import JsonFileMixin, markdown_table
from .batchnorm import BufferSnapshot
from .config import check_mode
from .patching import CONFIG_ATTR
from .pruning import check_group_fraction, check_method, check_sparsity, pruned, resolve_targets

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The paper's pruning levels: 0 %, 10 %, ..., 90 %."""

SCALAR_METRIC = "metric"
"""Metric name used when ``evaluate_fn`` returns a single float."""

_RESERVED = ("sparsity", "pruned_fraction")
_FORMAT = "hf-tdrop-sweep"
_TABLE_FORMAT = "hf-tdrop-sweep-table"

PathLike = Union[str, os.PathLike]


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


def _parse_metrics(value: Any, sparsity: float) -> dict[str, float]:
    def number(v: Any, key: str) -> float:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or isinstance(v, (str, bytes)):
            raise ValueError(f"`evaluate_fn` returned {v!r} for {key!r} at sparsity {sparsity:g}; expected a float.")
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"`evaluate_fn` must return a float or a dict of named floats, got {type(v).__name__} for {key!r} "
                f"at sparsity {sparsity:g}.") from None

    if isinstance(value, Mapping):
        if not value:
            raise ValueError("`evaluate_fn` returned an empty dict; expected named floats.")
        out = {}
        for key, v in value.items():
            if not isinstance(key, str) or not key or key in _RESERVED:
                raise ValueError(f"`evaluate_fn` metric names must be non-empty strings other than {list(_RESERVED)}, "
                                 f"got {key!r}.")
            out[key] = number(v, key)
        return out
    return {SCALAR_METRIC: number(value, SCALAR_METRIC)}


def _default_run_name(model: nn.Module) -> str:
    config = getattr(model, CONFIG_ATTR, None)
    if callable(getattr(config, "run_label", None)):
        return config.run_label()
    if config is not None and hasattr(config, "alpha"):
        return f"targeted α={config.alpha:g} γ={config.gamma:g}"
    return "model"


def prune_sweep(
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], Union[float, Mapping[str, float]]],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    *,
    mode: str = "weight",
    method: str = "magnitude",
    target_modules=None,
    exclude_modules=None,
    run_name: Optional[str] = None,
    progress: bool = True,
    generator: Optional[torch.Generator] = None,
    recalibrate: Optional[Callable[[nn.Module], Any]] = None,
    n: Optional[int] = None,
    m: Optional[int] = None,
) -> SweepResult:
    """Evaluate ``model`` at every pruning level in ``sparsities``; the model ends exactly as it began.

    At each level ``s`` the model is pruned with :func:`hf_tdrop.pruned` (``floor(s * fan_in)``
    weights per w_o, or ``floor(s * n_out)`` units per layer, in every targeted layer) and
    ``evaluate_fn(model)`` is called. Pruning always starts from the original weights, so the levels
    are independent. Afterwards the weights are bit-exactly restored (also if ``evaluate_fn`` raises)
    and every module is put back in its original train/eval mode.

    Args:
        model: the model to evaluate (patched or not; a patched model in ``eval()`` computes exactly
            like the unpatched one, so ``evaluate_fn`` should call ``model.eval()``).
        evaluate_fn: ``evaluate_fn(model) -> float`` (recorded as metric ``"metric"``) or
            ``-> {"accuracy": ..., "loss": ...}``; the same names at every level. It should run under
            ``torch.no_grad()`` / ``torch.inference_mode()``. For a 🤗 ``evaluate`` metric or a
            ``Trainer``-style ``compute_metrics`` function, pass :func:`metric_evaluator`.
        sparsities: distinct levels in [0, 1), evaluated in the given order (default 0 %, 10 %, ..., 90 %).
            In mode ``"nm"`` a level is the fraction of each row's groups pruned to N:M, in [0, 1]
            (1 = the exact pattern everywhere).
        mode, method, target_modules, exclude_modules, n, m: as in :func:`hf_tdrop.prune_model`.
            Without ``target_modules``, a patched model is pruned in its patched layers only
            (the layers it was trained with), as by :func:`hf_tdrop.prune_model`.
        run_name: column label; default ``"targeted α=… γ=…"`` for a model patched by
            :func:`hf_tdrop.patch_model`, else ``"model"``.
        progress: show a tqdm progress bar.
        generator: RNG for ``method="random"``.
        recalibrate: ``recalibrate(model)``, called on the pruned model before ``evaluate_fn`` at every
            level, e.g. :class:`hf_tdrop.BatchNormRecalibration` (re-estimate BatchNorm statistics,
            the fair protocol for BatchNorm networks). Every buffer of the model (running
            statistics included) is restored bit for bit after each level. Recorded in
            :attr:`SweepResult.recalibration` (its ``describe()``, if it has one).

    Returns:
        A :class:`SweepResult`.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(evaluate_fn):
        if callable(getattr(evaluate_fn, "compute", None)):
            raise ValueError(
                f"`evaluate_fn` is a metric ({type(evaluate_fn).__name__}), which needs predictions and references "
                "that the sweep cannot compute itself; wrap it with a function that predicts: "
                "prune_sweep(model, hf_tdrop.metric_evaluator(metric, predict_fn), ...), where "
                "predict_fn(model) returns (predictions, references).")
        raise ValueError(
            f"`evaluate_fn` must be callable (model -> float or dict of floats), got {type(evaluate_fn).__name__}.")
    levels = _as_float_list(sparsities, "sparsities")
    if not levels:
        raise ValueError("`sparsities` must contain at least one level in [0, 1).")
    check_mode(mode)
    for s in levels:
        _check_level(s, mode)
    if len(set(levels)) != len(levels):
        raise ValueError(f"`sparsities` must be distinct, got {levels}.")
    check_method(method)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be None or a torch.Generator, got {type(generator).__name__}.")
    if run_name is not None and (not isinstance(run_name, str) or not run_name):
        raise ValueError(f"`run_name` must be None or a non-empty string, got {run_name!r}.")
    if not isinstance(progress, bool):
        raise ValueError(f"`progress` must be True or False, got {progress!r}.")
    if recalibrate is not None and not callable(recalibrate):
        raise ValueError(f"`recalibrate` must be None or callable (model -> anything), got {type(recalibrate).__name__}.")
    resolve_targets(model, target_modules, exclude_modules, method)  # validates the patterns up front
    run_name = run_name or _default_run_name(model)

    training = [(m, m.training) for m in model.modules()]
    metrics: dict[str, list[float]] = {}
    fractions: list[float] = []
    bar = tqdm(levels, desc=f"prune sweep [{run_name}]", unit="level", disable=not progress)
    try:
        for s in bar:
            with pruned(model, s, mode=mode, method=method, target_modules=target_modules, n=n, m=m,
                        exclude_modules=exclude_modules, generator=generator) as report:
                if recalibrate is None:
                    value = evaluate_fn(model)
                else:
                    buffers = BufferSnapshot(model)
                    try:
                        recalibrate(model)
                        value = evaluate_fn(model)
                    finally:
                        buffers.restore()
            values = _parse_metrics(value, s)
            if metrics and set(values) != set(metrics):
                raise ValueError(f"`evaluate_fn` returned metrics {sorted(values)} at sparsity {s:g} but "
                                 f"{sorted(metrics)} before; it must return the same names at every level.")
            for key, v in values.items():
                metrics.setdefault(key, []).append(v)
            fractions.append(report.pruned_fraction)
            shown = {k: f"{v:.4g}" for k, v in list(values.items())[:3]}
            bar.set_postfix({"prune": _percent(s), **shown}, refresh=False)
    finally:
        bar.close()
        for module, flag in training:
            module.training = flag
    recalibration = None
    if recalibrate is not None:
        describe = getattr(recalibrate, "describe", None)
        recalibration = describe() if callable(describe) else {"method": getattr(recalibrate, "__name__", "custom")}
    return SweepResult(run_name=run_name, mode=mode, method=method, sparsities=levels, metrics=metrics,
                       pruned_fraction=fractions, recalibration=recalibration)


# --------------------------------------------------------------------------------------------------
# 🤗 evaluate metrics and compute_metrics functions as evaluate_fn
# --------------------------------------------------------------------------------------------------


def _as_metric_input(value: Any) -> Any:
    """Tensors (also inside lists / tuples) as NumPy arrays, which ``evaluate`` and ``compute_metrics`` expect."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [v.detach().cpu().numpy() for v in value]
    return value


def _is_scalar_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype == torch.bool
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        return False
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalars and 0-d arrays
        return not isinstance(value.item(), bool)
    return isinstance(value, (int, float))


class MetricEvaluator:
    """An ``evaluate_fn`` for :func:`prune_sweep` built from a metric and a prediction function.

    Made by :func:`metric_evaluator`; see there. Calling it with a model puts the model in eval
    mode, runs ``predict_fn(model)`` under ``torch.no_grad()``, computes the metric and returns the
    dict of its scalar results.
    """

    def __init__(self, metric: Any, predict_fn: Callable[[nn.Module], Any], *,
                 keys: Optional[Sequence[str]] = None, compute_kwargs: Optional[Mapping[str, Any]] = None):
        self.is_module = callable(getattr(metric, "compute", None))
        if not self.is_module and not callable(metric):
            raise ValueError(
                "`metric` must be a 🤗 evaluate metric (evaluate.load(...) or evaluate.combine([...]): anything with "
                "compute(predictions=..., references=...)) or a Trainer-style compute_metrics(EvalPrediction) "
                f"function, got {type(metric).__name__}.")
        if not callable(predict_fn):
            raise ValueError(
                f"`predict_fn` must be callable (model -> (predictions, references)), got {type(predict_fn).__name__}.")
        if keys is not None:
            if isinstance(keys, str):
                keys = [keys]
            keys = list(keys) if isinstance(keys, Sequence) else keys
            if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
                raise ValueError(f"`keys` must be None or a non-empty list of metric names, got {keys!r}.")
            if len(set(keys)) != len(keys):
                raise ValueError(f"`keys` must be distinct, got {keys}.")
            reserved = [k for k in keys if k in _RESERVED]
            if reserved:
                raise ValueError(f"`keys` may not contain the reserved names {reserved}.")
        if compute_kwargs is None:
            compute_kwargs = {}
        if not isinstance(compute_kwargs, Mapping) or not all(isinstance(k, str) for k in compute_kwargs):
            raise ValueError(f"`compute_kwargs` must be None or a dict of keyword arguments, got {compute_kwargs!r}.")
        if not self.is_module and compute_kwargs:
            raise ValueError("`compute_kwargs` only applies to an evaluate metric (its compute() arguments); "
                             "a compute_metrics function takes none.")
        for reserved in ("predictions", "references"):
            if reserved in compute_kwargs:
                raise ValueError(f"`compute_kwargs` may not set {reserved!r}: it comes from `predict_fn`.")
        self.metric = metric
        self.predict_fn = predict_fn
        self.keys = keys
        self.compute_kwargs = dict(compute_kwargs)

    def _predict(self, model: nn.Module) -> tuple[Any, Any]:
        model.eval()
        with torch.no_grad():
            out = self.predict_fn(model)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"`predict_fn` must return a pair (predictions, references), got {type(out).__name__}"
                             + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "") + ".")
        return _as_metric_input(out[0]), _as_metric_input(out[1])

    def _compute(self, predictions: Any, references: Any) -> Any:
        if self.is_module:
            return self.metric.compute(predictions=predictions, references=references, **self.compute_kwargs)
        from transformers import EvalPrediction

        return self.metric(EvalPrediction(predictions=predictions, label_ids=references))

    def __call__(self, model: nn.Module) -> dict[str, float]:
        result = self._compute(*self._predict(model))
        name = type(self.metric).__name__ if self.is_module else getattr(self.metric, "__name__", "compute_metrics")
        if not isinstance(result, Mapping) or not result:
            raise ValueError(f"The metric ({name}) returned {result!r}; expected a non-empty dict of results.")
        if self.keys is not None:
            missing = [k for k in self.keys if k not in result]
            if missing:
                raise ValueError(f"The metric ({name}) returned no {missing}; it returned {sorted(result)}.")
            bad = [k for k in self.keys if not _is_scalar_number(result[k])]
            if bad:
                raise ValueError(f"The metric ({name}) results {bad} are not single numbers; pick scalar `keys`.")
            chosen = {k: result[k] for k in self.keys}
        else:
            chosen = {k: v for k, v in result.items() if _is_scalar_number(v) and k not in _RESERVED}
            if not chosen:
                raise ValueError(f"The metric ({name}) returned no single-number result ({sorted(result)}); "
                                 "pass `keys` naming the results to record.")
        return {str(k): float(v.item() if hasattr(v, "item") else v) for k, v in chosen.items()}

    def __repr__(self) -> str:
        name = type(self.metric).__name__ if self.is_module else getattr(self.metric, "__name__", "compute_metrics")
        return f"MetricEvaluator(metric={name}, keys={self.keys})"


def metric_evaluator(
    metric: Any,
    predict_fn: Callable[[nn.Module], Any],
    *,
    keys: Optional[Sequence[str]] = None,
    compute_kwargs: Optional[Mapping[str, Any]] = None,
) -> MetricEvaluator:
    """Build the ``evaluate_fn`` of :func:`prune_sweep` from a metric and a prediction function.

    A metric needs predictions and references, which the sweep cannot produce itself: you say how
    to predict, the metric says how to score. At every pruning level the returned callable puts the
    model in eval mode, calls ``predict_fn(model)`` under ``torch.no_grad()``, scores the result
    and returns the metric's single-number results as a dict (e.g. ``{"accuracy": 0.91}``).

    ```python
    import evaluate
    from hf_tdrop import metric_evaluator, prune_sweep

    def predict(model):                       # -> (predictions, references)
        preds, refs = [], []
        for batch in eval_loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            preds.append(logits.argmax(-1)); refs.append(batch["labels"])
        return torch.cat(preds), torch.cat(refs)

    sweep = prune_sweep(model, metric_evaluator(evaluate.load("accuracy"), predict))
    ```

    Args:
        metric: a 🤗 ``evaluate`` metric (``evaluate.load(...)``, or ``evaluate.combine([...])`` for
            several), called as ``metric.compute(predictions=..., references=..., **compute_kwargs)``;
            or a ``Trainer``-style ``compute_metrics`` function, called with a
            ``transformers.EvalPrediction(predictions=..., label_ids=references)`` (so one written
            for ``Trainer`` can be reused when ``predict_fn`` returns logits and labels).
        predict_fn: ``predict_fn(model) -> (predictions, references)``, in whatever form the metric
            takes (lists, NumPy arrays, or tensors: tensors are converted to NumPy arrays).
        keys: the results to record (default: every result that is a single number; lists such as
            per-class scores or n-gram counts are left out).
        compute_kwargs: extra keyword arguments of ``metric.compute`` (e.g. ``{"average": "macro"}``
            for F1); only for an ``evaluate`` metric.

    Returns:
        A :class:`MetricEvaluator`, to pass as ``prune_sweep(model, evaluate_fn, ...)``.

    Raises:
        ValueError: an argument has the wrong type; later, at the first level, ``predict_fn`` does
            not return a pair or the metric returns no (requested) single-number result.
    """
    return MetricEvaluator(metric, predict_fn, keys=keys, compute_kwargs=compute_kwargs)


# --------------------------------------------------------------------------------------------------
# Combined tables and plots
# --------------------------------------------------------------------------------------------------


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


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the [examples] extra
        raise ImportError(
            "Plotting sweeps needs matplotlib: pip install 'hf-tdrop[examples]' (or matplotlib).") from err
    return FigureCanvasAgg, Figure


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
    FigureCanvasAgg, Figure = _import_matplotlib()
    path = Path(path)
    fig = Figure(figsize=(5.0 * len(names), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for result, label in zip(results, columns):
            order = sorted(range(len(result.sparsities)), key=lambda i: result.sparsities[i])
            xs = [100 * result.sparsities[i] for i in order]
            ys = [result.metrics[name][i] for i in order]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel(f"prune % ({results[0].mode} pruning)" if len({r.mode for r in results}) == 1 else "prune %")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png")
    return path
