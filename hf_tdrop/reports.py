"""Sparsity of a model: :func:`sparsity_report` measures how many weights / whole units of each
supported layer are zero (pruning sweeps, tables and plots are in :mod:`hf_tdrop.sweeps`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from . import masking
from ._utils import markdown_table
from .config import check_target_spec
from .layers import check_materialized, layer_type_name, weight_layout
from .targets import matches_any, nothing_selected_message, output_head_names, select_layers, supported_layers


@dataclass
class LayerSparsity:
    """Zeros in one supported layer.

    Attributes:
        name: dotted module name (``""`` when the model itself is the layer).
        type: layer class (original class for a patched layer).
        shape: weight shape in the layer's own layout.
        n_weights: weight entries (biases not counted).
        zero_weights: weight entries exactly equal to zero.
        n_units: output units / channels.
        zero_units: units whose whole w_o is zero and whose bias (if the layer has one) is zero.
        is_head: an output head or a layer tied to an embedding (not targeted by default).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    n_weights: int
    zero_weights: int
    n_units: int
    zero_units: int
    is_head: bool

    @property
    def weight_sparsity(self) -> float:
        """``zero_weights / n_weights`` (0.0 for a layer without weights)."""
        return self.zero_weights / self.n_weights if self.n_weights else 0.0

    @property
    def unit_sparsity(self) -> float:
        """``zero_units / n_units`` (0.0 for a layer without units)."""
        return self.zero_units / self.n_units if self.n_units else 0.0

    def to_dict(self) -> dict:
        """The layer as a JSON-ready dict: the attributes above (``shape`` as a list) and the two
        fractions, under the keys ``name``, ``type``, ``shape``, ``n_weights``, ``zero_weights``,
        ``weight_sparsity``, ``n_units``, ``zero_units``, ``unit_sparsity``, ``is_head``."""
        return {
            "name": self.name, "type": self.type, "shape": list(self.shape), "n_weights": self.n_weights,
            "zero_weights": self.zero_weights, "weight_sparsity": self.weight_sparsity, "n_units": self.n_units,
            "zero_units": self.zero_units, "unit_sparsity": self.unit_sparsity, "is_head": self.is_head,
        }


def _totals(layers: Sequence[LayerSparsity]) -> dict:
    n_w = sum(layer.n_weights for layer in layers)
    z_w = sum(layer.zero_weights for layer in layers)
    n_u = sum(layer.n_units for layer in layers)
    z_u = sum(layer.zero_units for layer in layers)
    return {
        "n_layers": len(layers), "n_weights": n_w, "zero_weights": z_w, "weight_sparsity": z_w / n_w if n_w else 0.0,
        "n_units": n_u, "zero_units": z_u, "unit_sparsity": z_u / n_u if n_u else 0.0,
    }


@dataclass
class SparsityReport:
    """Per-layer and total sparsity of a model (see :func:`sparsity_report`).

    ``total`` covers every reported layer; ``total_excluding_heads`` only the layers that are not
    heads (the ones pruning targets by default)."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total(self) -> dict:
        """Sums over every reported layer: ``n_layers``, ``n_weights``, ``zero_weights``,
        ``weight_sparsity``, ``n_units``, ``zero_units``, ``unit_sparsity`` (the fractions of the sums,
        so large layers weigh more)."""
        return _totals(self.layers)

    @property
    def total_excluding_heads(self) -> dict:
        """The same sums as :attr:`total` over the layers that are not heads."""
        return _totals([layer for layer in self.layers if not layer.is_head])

    @property
    def weight_sparsity(self) -> float:
        """Fraction of zero weights over all reported layers."""
        return self.total["weight_sparsity"]

    @property
    def unit_sparsity(self) -> float:
        """Fraction of all-zero units over all reported layers."""
        return self.total["unit_sparsity"]

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (``json.dumps`` takes it as is). For a small BERT
        classifier after ``prune_model(model, 0.7, mode="weight")``::

            {
              "layers": [  # one dict per layer, in module order (LayerSparsity.to_dict)
                {"name": "bert.encoder.layer.0.attention.self.query", "type": "Linear",
                 "shape": [64, 64], "n_weights": 4096, "zero_weights": 2816, "weight_sparsity": 0.6875,
                 "n_units": 64, "zero_units": 0, "unit_sparsity": 0.0, "is_head": False},
                ...
              ],
              "total": {"n_layers": 14, "n_weights": 69760, "zero_weights": 48000,
                        "weight_sparsity": 0.688..., "n_units": 962, "zero_units": 0, "unit_sparsity": 0.0},
              "total_excluding_heads": {"n_layers": 13, ...},  # the same keys, heads left out
            }

        Keys of a layer: ``name`` (dotted module name, ``""`` for the model itself), ``type`` (layer
        class; the original class of a patched layer), ``shape`` (weight shape in the layer's own
        layout), ``n_weights`` / ``zero_weights`` (weight entries, and those exactly zero; biases not
        counted), ``weight_sparsity`` (their ratio), ``n_units`` / ``zero_units`` (output units or
        channels, and those whose whole w_o and bias are zero), ``unit_sparsity`` (their ratio),
        ``is_head`` (an output head or a layer tied to an embedding). Keys of ``total`` and
        ``total_excluding_heads``: ``n_layers`` and the sums of the counts over the layers, with
        ``weight_sparsity`` / ``unit_sparsity`` the ratios of those sums."""
        return {"layers": [layer.to_dict() for layer in self.layers], "total": self.total,
                "total_excluding_heads": self.total_excluding_heads}

    def to_markdown(self) -> str:
        """GitHub Markdown table: one row per layer, then the totals."""
        def pct(z: int, n: int) -> str:
            return f"{(z / n if n else 0.0):.2%} ({z}/{n})"

        rows = [
            [f"`{layer.name or '<model>'}`", layer.type, "×".join(map(str, layer.shape)),
             pct(layer.zero_weights, layer.n_weights), pct(layer.zero_units, layer.n_units),
             "yes" if layer.is_head else ""]
            for layer in self.layers
        ]
        for label, t in (("**total**", self.total), ("**total excluding heads**", self.total_excluding_heads)):
            rows.append([label, "", f"{t['n_layers']} layers", pct(t["zero_weights"], t["n_weights"]),
                         pct(t["zero_units"], t["n_units"]), ""])
        return markdown_table(["layer", "type", "shape", "zero weights", "all-zero units", "head"], rows,
                               align=["l", "l", "l", "r", "r", "c"])

    def __str__(self) -> str:
        return self.to_markdown()


def sparsity_report(model: nn.Module, target_modules=None, exclude_modules=None) -> SparsityReport:
    """Measure zeros in ``model``'s supported layers (patched or not).

    Args:
        model: any ``nn.Module``.
        target_modules: ``None`` reports every supported layer, output heads included (flagged by
            ``is_head``); otherwise patterns as in :func:`hf_tdrop.patch_model`.
        exclude_modules: patterns of layers to leave out.

    A weight is zero when it equals 0 exactly (``-0.0`` included). A unit o is all-zero when its
    whole w_o (row o of the ``[n_out, fan_in]`` view) is zero and, if the layer has a bias, so is
    ``bias[o]``. Reads the parameters only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if target_modules is None:
        excludes = check_target_spec("exclude_modules", exclude_modules)
        selected = [(n, m) for n, m in supported_layers(model) if not matches_any(n, excludes)]
        if not selected:
            raise ValueError(nothing_selected_message(supported_layers(model), None, excludes))
    else:
        selected = select_layers(model, target_modules, exclude_modules)
    for name, module in selected:
        check_materialized(module, name, "sparsity_report")
    heads = output_head_names(model)
    layers = []
    with torch.no_grad():
        for name, module in selected:
            weight = module.weight.detach()
            w2d = masking.unit_matrix(weight, weight_layout(module))
            zero2d = w2d == 0
            zero_units = zero2d.all(dim=1)
            bias = getattr(module, "bias", None)
            if bias is not None:
                zero_units &= bias.detach() == 0
            layers.append(LayerSparsity(
                name=name, type=layer_type_name(module), shape=tuple(weight.shape), n_weights=w2d.numel(),
                zero_weights=int(zero2d.sum()), n_units=w2d.shape[0], zero_units=int(zero_units.sum()),
                is_head=name in heads,
            ))
    return SparsityReport(layers)
