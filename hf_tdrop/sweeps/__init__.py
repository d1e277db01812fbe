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

The package has three modules: :mod:`.results` (the result and table types, their Markdown / CSV
/ JSON forms), :mod:`.run` (running a sweep and building evaluation callables) and :mod:`.plots`
(drawing); every public name is importable from ``hf_tdrop.sweeps``.
"""

from .results import DEFAULT_SPARSITIES, SCALAR_METRIC, SweepResult, SweepTable, combine_sweeps, plot_sweeps
from .run import MetricEvaluator, metric_evaluator, prune_sweep

__all__ = ["DEFAULT_SPARSITIES", "SCALAR_METRIC", "MetricEvaluator", "SweepResult", "SweepTable", "combine_sweeps",
           "metric_evaluator", "plot_sweeps", "prune_sweep"]
