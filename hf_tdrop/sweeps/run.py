"""Running a sweep: :func:`prune_sweep` prunes the model in place at each sparsity, evaluates it and
restores its weights; :func:`metric_evaluator` / :class:`MetricEvaluator` turn
``evaluate`` metrics or a plain function into the evaluation callable."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..batchnorm import BufferSnapshot
from ..config import check_mode
from ..constants import CONFIG_ATTR
from ..pruning import check_method, pruned, resolve_targets
from .results import DEFAULT_SPARSITIES, SCALAR_METRIC, SweepResult, _RESERVED, _as_float_list, _check_level, _percent


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
    return config.run_label() if config is not None else "model"


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
