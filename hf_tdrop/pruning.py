"""Post-hoc pruning with the paper's criterion: magnitude (or random) pruning of targeted layers.

Gomez et al. (2019) prune exactly the kind of set targeted dropout targets, at the same fraction in
every layer:

* **weight mode**: in every output unit's incoming weight vector w_o (row ``o`` of the
  ``[n_out, fan_in]`` view, see :func:`hf_tdrop.masking.unit_matrix`), the
  ``floor(sparsity * fan_in)`` entries of smallest ``|w|`` are zeroed. Biases are kept.
* **unit mode**: the ``floor(sparsity * n_out)`` output units with the smallest ``||w_o||_2`` are
  zeroed entirely: their w_o and their bias entry.

* **nm mode**: in every group of ``m`` consecutive inputs of each w_o, the ``m - n`` entries of
  smallest ``|w|`` are zeroed, so every group keeps at most ``n`` nonzeros (the N:M pattern; a last
  group of ``r < m`` entries keeps ``min(r, n)``). ``sparsity`` is the fraction of each row's groups
  pruned so (default 1: all of them); see :class:`hf_tdrop.TargetedDropoutConfig` for the details.

``method="random"`` prunes the same number of uniformly random weights / units / groups and group
entries (the usual baseline).

Which layers: explicit ``target_modules``, else the layers the model was trained with (its patched
layers, or the layers carrying a learned criterion's scores), else every supported layer but output
heads and tied layers (:func:`resolve_targets`); the report records which (``target_source``).

Pruning writes zeros into the layers' own Parameters under ``torch.no_grad()``: it works on patched
and unpatched models alike (a patched layer keeps its ``.weight``), keeps every Parameter object
(optimizers, tied weights and hooks stay valid) and changes no ``state_dict`` key. :func:`pruned`
undoes it exactly, saving only the pruned entries.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import masking
from .config import check_fraction, check_mode, check_nm, check_target_spec
from .constants import CRITERION_ATTR
from .layers import check_materialized, is_patched_layer, layer_type_name, weight_layout
from .methods.base import learned_criteria, require_learned_scores
from .targets import matches_any, select_layers, supported_layers

METHODS = ("magnitude", "random")
"""Pruning criteria every model has: ``"magnitude"`` (the paper's: smallest ``|w|`` / ``||w_o||_2``
first) or ``"random"`` (same counts, chosen uniformly at random). Models trained with a method
that learns a pruning order also accept its criterion (see :func:`allowed_methods`)."""


def allowed_methods() -> list[str]:
    """:data:`METHODS` plus the learned criteria of the registered training methods
    (``"gates"``: L0 ``log α``, lowest first; ``"log_alpha"``: variational dropout, highest first)."""
    return [*METHODS, *learned_criteria()]


TARGET_SOURCES = ("argument", "patched layers", "layers with learned scores", "default selection")
"""Where :func:`prune_model` took its layers from (``PruneReport.target_source``): explicit
``target_modules``; the layers :func:`hf_tdrop.patch_model` patched (the ones trained with targeted
dropout or another method); for a learned criterion on a finalised model, the layers carrying its
scores; else every supported layer but output heads and tied layers. The command line also
records the file its targets were read from (``"tdrop_training_config.json"``)."""


def resolve_targets(model: nn.Module, target_modules=None, exclude_modules=None,
                    method: Optional[str] = None) -> tuple[list[tuple[str, nn.Module]], str]:
    """The ``(name, module)`` layers pruning selects, in model order, and where the selection came
    from (one of :data:`TARGET_SOURCES`).

    Explicit ``target_modules`` win (``"argument"``). Otherwise a patched model prunes its patched
    layers (``"patched layers"``); a finalised model pruned by a learned criterion (``method``, e.g.
    ``"gates"``) prunes the layers that carry its scores (``"layers with learned scores"``); any
    other model every supported layer but output heads and tied layers (``"default selection"``).
    ``exclude_modules`` is applied in every case. Raises ``ValueError`` for bad patterns or when
    nothing is selected.
    """
    if target_modules is not None:
        return select_layers(model, target_modules, exclude_modules), "argument"
    excludes = check_target_spec("exclude_modules", exclude_modules)
    candidates = supported_layers(model)
    chosen, source = [(n, m) for n, m in candidates if is_patched_layer(m)], "patched layers"
    if not chosen and method is not None and method not in METHODS:
        chosen = [(n, m) for n, m in candidates if getattr(m.__dict__.get(CRITERION_ATTR), "name", None) == method]
        source = "layers with learned scores"
    if not chosen:
        return select_layers(model, None, exclude_modules), "default selection"
    selected = [(n, m) for n, m in chosen if not matches_any(n, excludes)]
    if not selected:
        raise ValueError(f"`exclude_modules`={list(excludes)} excludes every one of the {len(chosen)} {source} "
                         f"(e.g. {chosen[0][0] or '<model itself>'!r}); nothing is left to prune.")
    return selected, source


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    """Return ``value`` as a float if it is a real number in [0, 1), else raise ``ValueError`` naming
    ``name`` and the range. ``bool``, NaN and 1.0 are rejected (pruning everything is not a model)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r} ({type(value).__name__}).")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
    return value


def check_method(method: Any) -> str:
    """Return ``method`` if it is one of :func:`allowed_methods`, else raise ``ValueError`` listing them."""
    allowed = allowed_methods()
    if method not in allowed:
        raise ValueError(f"`method` must be one of {allowed}, got {method!r}.")
    return method


def _check_generator(generator: Any) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be None or a torch.Generator, got {type(generator).__name__}.")
    return generator


def check_group_fraction(value: Any, name: str = "sparsity") -> float:
    """Return ``value`` as a float if it is a real number in [0, 1] (nm mode: the fraction of each
    row's groups pruned to N:M; 1 = all), else raise ``ValueError`` naming ``name`` and the range."""
    return check_fraction(name, value, meaning="fraction of groups pruned to N:M in mode 'nm'")


def check_prune_settings(sparsity: Any, mode: Any, n: Any, m: Any) -> tuple[float, Optional[int], Optional[int]]:
    """Validate :func:`prune_model`'s ``sparsity``/``mode``/``n``/``m``; returns ``(sparsity, n, m)``
    with nm mode's defaults filled in (``sparsity`` 1, 2:4) and ``n = m = None`` in the other modes."""
    check_mode(mode)
    if mode == "nm":
        n, m = check_nm(2 if n is None else n, 4 if m is None else m)
        return (1.0 if sparsity is None else check_group_fraction(sparsity)), n, m
    if n is not None or m is not None:
        raise ValueError(f"`n`/`m` set the N:M pattern of mode='nm'; got mode={mode!r}.")
    if sparsity is None:
        raise ValueError(f"`sparsity` is required in mode {mode!r}: a number in [0, 1).")
    return check_sparsity(sparsity), None, None


@dataclass
class LayerPruneInfo:
    """What :func:`prune_model` pruned in one layer.

    Attributes:
        name: the module's dotted name (``""`` if the model itself is the layer).
        type: class name of the layer (the original class for a patched layer, e.g. ``"Conv1D"``).
        shape: the weight's shape, in the layer's own layout.
        n_weights: number of weight entries (``n_out * fan_in``).
        n_units: number of output units / channels ``n_out``.
        pruned_weights: weight entries set to zero (entries that were already zero count too).
        pruned_units: whole units zeroed (unit mode; 0 in weight mode).
        pruned_biases: bias entries set to zero (unit mode with a bias; else 0).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    n_weights: int
    n_units: int
    pruned_weights: int
    pruned_units: int
    pruned_biases: int = 0

    def to_dict(self) -> dict:
        return {
            "name": self.name, "type": self.type, "shape": list(self.shape), "n_weights": self.n_weights,
            "n_units": self.n_units, "pruned_weights": self.pruned_weights, "pruned_units": self.pruned_units,
            "pruned_biases": self.pruned_biases,
        }


@dataclass
class PruneReport:
    """Result of :func:`prune_model`: the settings and, per pruned layer, what was zeroed.

    Attributes:
        sparsity: requested fraction: in [0, 1) of each w_o / of the units; in nm mode in [0, 1], of
            each w_o's groups pruned to N:M (1: the exact pattern).
        mode: ``"weight"``, ``"unit"`` or ``"nm"``.
        method: ``"magnitude"`` or ``"random"``.
        layers: one :class:`LayerPruneInfo` per targeted layer, in model order.
        n, m: the N:M pattern in nm mode, else None.
        target_source: where the layers came from: one of :data:`TARGET_SOURCES` (``"patched
            layers"`` for a patched model without ``target_modules``), or the file the command line
            read them from.
        target_modules, exclude_modules: the patterns used (None: not given).
    """

    sparsity: float
    mode: str
    method: str
    layers: list[LayerPruneInfo] = field(default_factory=list)
    n: Optional[int] = None
    m: Optional[int] = None
    target_source: str = "default selection"
    target_modules: Optional[list[str]] = None
    exclude_modules: Optional[list[str]] = None

    @property
    def n_weights(self) -> int:
        """Weight entries in the targeted layers."""
        return sum(layer.n_weights for layer in self.layers)

    @property
    def pruned_weights(self) -> int:
        """Weight entries zeroed over all targeted layers."""
        return sum(layer.pruned_weights for layer in self.layers)

    @property
    def n_units(self) -> int:
        return sum(layer.n_units for layer in self.layers)

    @property
    def pruned_units(self) -> int:
        return sum(layer.pruned_units for layer in self.layers)

    @property
    def pruned_fraction(self) -> float:
        """``pruned_weights / n_weights`` over the targeted layers (≤ ``sparsity``: floor per row/layer)."""
        return self.pruned_weights / self.n_weights if self.n_weights else 0.0

    def to_dict(self) -> dict:
        """JSON-friendly dict: settings, ``layers`` (list of dicts) and ``total``."""
        nm = {"n": self.n, "m": self.m} if self.mode == "nm" else {}
        return {
            "sparsity": self.sparsity, "mode": self.mode, "method": self.method, **nm,
            "target_source": self.target_source, "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "layers": [layer.to_dict() for layer in self.layers],
            "total": {
                "n_layers": len(self.layers), "n_weights": self.n_weights, "pruned_weights": self.pruned_weights,
                "n_units": self.n_units, "pruned_units": self.pruned_units, "pruned_fraction": self.pruned_fraction,
            },
        }

    def describe_targets(self) -> str:
        """One line: which layers were pruned and where that choice came from, e.g.
        ``"12 layers, patched layers"`` or ``"target_modules ['.*mlp.*'] from tdrop_training_config.json"``."""
        def patterns(items) -> str:  # as written, without repr's doubled backslashes
            return "[" + ", ".join(f"'{p}'" for p in items) + "]"

        text = f"{len(self.layers)} layers, "
        if self.target_modules is not None:
            text += f"target_modules {patterns(self.target_modules)} from {self.target_source}"
        else:
            text += self.target_source
        if self.exclude_modules:
            text += f", exclude_modules {patterns(self.exclude_modules)}"
        return text

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "pruned weights", "pruned units")
        rows = [
            (layer.name or "<model>", layer.type, "x".join(map(str, layer.shape)),
             f"{layer.pruned_weights}/{layer.n_weights}", f"{layer.pruned_units}/{layer.n_units}")
            for layer in self.layers
        ]
        rows.append(("total", "", f"{len(self.layers)} layers", f"{self.pruned_weights}/{self.n_weights}",
                     f"{self.pruned_units}/{self.n_units}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [
            f"PruneReport(sparsity={self.sparsity:g}, mode={self.mode!r}, "
            + (f"n:m={self.n}:{self.m}, " if self.mode == "nm" else "") + f"method={self.method!r}, "
            f"pruned {self.pruned_fraction:.2%} of {self.n_weights} targeted weights)",
            f"targets: {self.describe_targets()}",
            fmt.format(*header), fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*row) for row in rows]
        return "\n".join(lines)


@dataclass
class _LayerPlan:
    """Masks for one layer, computed before any weight changes."""

    name: str
    module: nn.Module
    weight_mask: torch.Tensor  # bool, weight's shape (a view for the in_out layout)
    bias_mask: Optional[torch.Tensor]  # bool [n_out] in unit mode with a bias, else None
    info: LayerPruneInfo


def _plan_layer(name: str, module: nn.Module, sparsity: float, mode: str, method: str,
                generator: Optional[torch.Generator], n: Optional[int] = None, m: Optional[int] = None,
                learned: Optional[torch.Tensor] = None) -> _LayerPlan:
    layout = weight_layout(module)
    weight = module.weight
    w2d = masking.unit_matrix(weight.detach(), layout)
    n_out, fan_in = w2d.shape
    bias = getattr(module, "bias", None)
    bias_mask = None
    if learned is not None:  # a learned criterion: its scores, lowest pruned first
        if mode == "weight":
            mask2d = masking.lowest_k(learned, masking.fraction_count(sparsity, fan_in))
            units = 0
        else:
            unit_mask = masking.lowest_k(learned, masking.fraction_count(sparsity, n_out))
            mask2d = unit_mask.unsqueeze(1).expand(n_out, fan_in)
            units = int(unit_mask.sum())
            if bias is not None:
                bias_mask = unit_mask
    elif mode == "weight":
        if method == "magnitude":
            mask2d = masking.weight_prune_mask(w2d, sparsity)
        else:
            mask2d = masking.random_weight_prune_mask(w2d, sparsity, generator=generator)
        units = 0
    elif mode == "nm":
        if method == "magnitude":
            mask2d = masking.nm_prune_mask(w2d, sparsity, n, m)
        else:
            mask2d = masking.random_nm_prune_mask(w2d, sparsity, n, m, generator=generator)
        units = 0
    else:
        if method == "magnitude":
            unit_mask = masking.unit_prune_mask(w2d, sparsity)
        else:
            unit_mask = masking.random_unit_prune_mask(w2d, sparsity, generator=generator)
        mask2d = unit_mask.unsqueeze(1).expand(n_out, fan_in)
        units = int(unit_mask.sum())
        if bias is not None:
            bias_mask = unit_mask
    weight_mask = masking.to_weight_layout(mask2d, weight, layout)
    info = LayerPruneInfo(
        name=name, type=layer_type_name(module), shape=tuple(weight.shape), n_weights=n_out * fan_in,
        n_units=n_out, pruned_weights=int(mask2d.sum()), pruned_units=units,
        pruned_biases=int(bias_mask.sum()) if bias_mask is not None else 0,
    )
    return _LayerPlan(name, module, weight_mask, bias_mask, info)


def _plan(model: nn.Module, sparsity: Any, mode: Any, method: Any, target_modules, exclude_modules,
          generator: Any, n: Any = None, m: Any = None):
    """Validate every argument and compute every mask; touches no weight. Returns
    ``(sparsity, n, m, plans, target_source)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    sparsity, n, m = check_prune_settings(sparsity, mode, n, m)
    check_method(method)
    _check_generator(generator)
    selected, source = resolve_targets(model, target_modules, exclude_modules, method)
    for name, module in selected:
        check_materialized(module, name, "pruning")
    learned = {}
    if method not in METHODS:
        if mode == "nm":
            raise ValueError(f"`method`={method!r} (a learned criterion) prunes in mode 'weight' or 'unit', not 'nm'.")
        learned = {name: c.scores.to(module.weight.device) for (name, module), c in
                   zip(selected, require_learned_scores(selected, method, mode).values())}
    return sparsity, n, m, [_plan_layer(name, mod, sparsity, mode, method, generator, n, m, learned.get(name))
                            for name, mod in selected], source


def prune_model(
    model: nn.Module,
    sparsity: Optional[float] = None,
    *,
    mode: str = "weight",
    method: str = "magnitude",
    n: Optional[int] = None,
    m: Optional[int] = None,
    target_modules=None,
    exclude_modules=None,
    generator: Optional[torch.Generator] = None,
) -> PruneReport:
    """Prune ``model`` in place: zero the same fraction ``sparsity`` in every targeted layer.

    Args:
        model: any ``nn.Module``, patched by :func:`hf_tdrop.patch_model` or not.
        sparsity: weight and unit modes (required): fraction in [0, 1). Weight mode zeroes
            ``floor(sparsity * fan_in)`` entries of every w_o (so every unit keeps at least one
            weight); unit mode zeroes ``floor(sparsity * n_out)`` whole units of every layer (their
            w_o and bias). nm mode: fraction in [0, 1] of each w_o's ``ceil(fan_in / m)`` groups
            pruned to N:M (``floor(sparsity * G)`` groups; default 1, the exact N:M pattern).
        mode: ``"weight"``, ``"unit"`` or ``"nm"`` (every group of ``m`` consecutive inputs of each
            w_o keeps its ``n`` largest ``|w|``; a last group of ``r < m`` entries keeps ``min(r, n)``).
        method: ``"magnitude"`` (smallest ``|w|`` per w_o or per group, or smallest ``||w_o||_2``;
            ties broken by position, lowest index first) or ``"random"`` (the same counts,
            uniformly at random), or a learned criterion of a model trained with such a method
            (patched, or finalised by :func:`hf_tdrop.finalize_model`): ``"gates"`` (L0 ``log α``,
            lowest first) or ``"log_alpha"`` (variational dropout, highest ``log α`` first); the
            same counts, in the mode the criterion was learned in (weight or unit).
        n, m: the N:M pattern of nm mode, ``1 <= n < m`` (default 2:4); only with ``mode="nm"``.
        target_modules, exclude_modules: which layers, with the matching rules of
            :func:`hf_tdrop.patch_model`. Default (``target_modules=None``): the layers the model was
            trained with, i.e. its patched layers when it is patched; for a learned criterion on a
            finalised model, the layers carrying its scores; otherwise every supported layer but
            output heads and layers tied to embeddings. Explicit ``target_modules`` always win;
            ``exclude_modules`` is applied in every case. :attr:`PruneReport.target_source` says
            which applied (see :func:`resolve_targets`).
        generator: RNG for ``method="random"`` (default: torch's global RNG); ignored by magnitude.

    Returns:
        A :class:`PruneReport` with per-layer counts.

    Raises:
        ValueError: invalid ``sparsity``/``mode``/``method``/``n``/``m``/``generator``/patterns, no
            layer matched, or a targeted layer is on the meta device (materialise the model first).
            Everything is validated and every mask computed before the first weight changes.
    """
    report, _ = _prune(model, sparsity, mode, method, target_modules, exclude_modules, generator, save=False, n=n, m=m)
    return report


def _prune(model, sparsity, mode, method, target_modules, exclude_modules, generator, save: bool, n=None, m=None):
    sparsity, n, m, plans, source = _plan(model, sparsity, mode, method, target_modules, exclude_modules,
                                          generator, n, m)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, mask, original values)
    with torch.no_grad():
        for plan in plans:
            targets = [(plan.module.weight, plan.weight_mask)]
            if plan.bias_mask is not None:
                targets.append((plan.module.bias, plan.bias_mask))
            for param, mask in targets:
                if save:
                    saved.append((param, mask, param[mask]))  # boolean indexing copies
                param.masked_fill_(mask, 0)
    patterns = {k: (None if v is None else list(check_target_spec(k, v))) for k, v in
                (("target_modules", target_modules), ("exclude_modules", exclude_modules))}
    report = PruneReport(sparsity=sparsity, mode=mode, method=method, layers=[p.info for p in plans], n=n, m=m,
                         target_source=source, **patterns)
    return report, saved


@contextlib.contextmanager
def pruned(
    model: nn.Module,
    sparsity: Optional[float] = None,
    *,
    mode: str = "weight",
    method: str = "magnitude",
    n: Optional[int] = None,
    m: Optional[int] = None,
    target_modules=None,
    exclude_modules=None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[PruneReport]:
    """Context manager: prune ``model`` in place like :func:`prune_model`, undo it on exit.

    Only the pruned entries are saved (their original values and masks, not a copy of the model).
    On exit, also when the body raises, they are written back into the same Parameter objects, so
    the pruned entries are bit-exactly what they were. Entries the body itself changes (e.g. by
    training) are not reverted. Yields the :class:`PruneReport`.

    Example::

        with pruned(model, 0.5, mode="unit") as report:
            print(report.pruned_fraction, evaluate(model))
        # model is back to its original weights here
    """
    report, saved = _prune(model, sparsity, mode, method, target_modules, exclude_modules, generator, save=True, n=n, m=m)
    try:
        yield report
    finally:
        with torch.no_grad():
            for param, mask, values in reversed(saved):  # reversed: tied parameters end up original
                param[mask] = values
