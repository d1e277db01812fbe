"""N:M sparsity: check that a model's layers have an exact N:M pattern, and export 2:4 layers to
PyTorch's semi-structured sparse tensors for CUDA inference.

The groups are those of nm targeting and pruning (see :class:`hf_tdrop.TargetedDropoutConfig`):
``m`` consecutive inputs of each w_o, row ``o`` of the ``[n_out, fan_in]`` view of a weight (Linear
rows, the columns of transformers' ``Conv1D`` ``[in, out]`` weight, a ConvNd output channel's
flattened ``in * kernel`` inputs); when ``m`` does not divide ``fan_in`` the last group is shorter.
A pattern is exact when no group has more than ``n`` nonzeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from . import masking
from .config import check_nm
from .layers import check_materialized, is_patched_layer, layer_type_name, patch_state, weight_layout
from .targets import select_layers

logger = logging.getLogger(__name__)

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
"""Weight dtypes :func:`to_semi_structured` converts."""


@dataclass
class NMLayerCheck:
    """N:M check of one layer (see :func:`check_nm_sparsity`).

    Attributes:
        name: the module's dotted name (``""`` for the model itself).
        type: class name of the layer (the original class for a patched layer).
        shape: the weight's shape, in the layer's own layout.
        n_groups: groups checked: ``n_out * ceil(fan_in / m)``.
        violating_groups: groups with more than ``n`` nonzeros.
        max_nonzeros: most nonzeros found in one group.
        zero_fraction: fraction of the weight's entries that are exactly zero.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    n_groups: int
    violating_groups: int
    max_nonzeros: int
    zero_fraction: float

    @property
    def ok(self) -> bool:
        return self.violating_groups == 0

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "shape": list(self.shape), "n_groups": self.n_groups,
                "violating_groups": self.violating_groups, "max_nonzeros": self.max_nonzeros,
                "zero_fraction": self.zero_fraction, "ok": self.ok}


@dataclass
class NMSparsityReport:
    """Result of :func:`check_nm_sparsity`: per layer, the groups of ``m`` with more than ``n`` nonzeros.

    ``ok`` is True when every checked layer has an exact N:M pattern.
    """

    n: int
    m: int
    layers: list[NMLayerCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    @property
    def n_groups(self) -> int:
        return sum(layer.n_groups for layer in self.layers)

    @property
    def violating_groups(self) -> int:
        return sum(layer.violating_groups for layer in self.layers)

    @property
    def failing_layers(self) -> list[str]:
        """Names of the layers without an exact N:M pattern, in model order."""
        return [layer.name for layer in self.layers if not layer.ok]

    def to_dict(self) -> dict:
        return {"n": self.n, "m": self.m, "ok": self.ok, "n_groups": self.n_groups,
                "violating_groups": self.violating_groups, "layers": [layer.to_dict() for layer in self.layers]}

    def _rows(self) -> list[tuple[str, ...]]:
        rows = [(layer.name or "<model>", layer.type, "x".join(map(str, layer.shape)),
                 f"{layer.violating_groups}/{layer.n_groups}", str(layer.max_nonzeros),
                 f"{layer.zero_fraction:.2%}", "yes" if layer.ok else "NO") for layer in self.layers]
        rows.append(("total", "", f"{len(self.layers)} layers", f"{self.violating_groups}/{self.n_groups}",
                     str(max((layer.max_nonzeros for layer in self.layers), default=0)), "",
                     "yes" if self.ok else "NO"))
        return rows

    _HEADER = ("layer", "type", "shape", "violating groups", "max nonzeros/group", "zeros", "exact")

    def __str__(self) -> str:
        rows = self._rows()
        widths = [max(len(r[i]) for r in [self._HEADER, *rows]) for i in range(len(self._HEADER))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        verdict = "exact" if self.ok else f"NOT exact in {len(self.failing_layers)} layer(s)"
        lines = [f"NMSparsityReport({self.n}:{self.m}: {verdict}; {self.violating_groups} of {self.n_groups} "
                 f"groups have more than {self.n} nonzeros)",
                 fmt.format(*self._HEADER), fmt.format(*("-" * w for w in widths))]
        return "\n".join(lines + [fmt.format(*row) for row in rows])

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEADER) + " |", "|---|---|---|---:|---:|---:|---|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self._rows()])


def check_nm_sparsity(model: nn.Module, n: int = 2, m: int = 4, target_modules=None,
                      exclude_modules=None) -> NMSparsityReport:
    """Check every selected layer for an exact N:M pattern: no group of ``m`` consecutive inputs of a
    w_o has more than ``n`` nonzeros (see the module docstring for the groups).

    Args:
        model: any ``nn.Module`` (patched or not).
        n, m: the pattern, integers with ``1 <= n < m`` (default 2:4).
        target_modules, exclude_modules: which layers, with the defaults and matching rules of
            :func:`hf_tdrop.prune_model` (default: every supported layer but output heads and layers
            tied to embeddings).

    Returns:
        An :class:`NMSparsityReport` (``.ok``, per-layer counts of violating groups, ``str()`` a table).

    Raises:
        ValueError: ``model`` not a module, bad ``n``/``m``/patterns, no layer matched, or a layer
            on the meta device.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    n, m = check_nm(n, m)
    selected = select_layers(model, target_modules, exclude_modules)
    report = NMSparsityReport(n=n, m=m)
    with torch.no_grad():
        for name, module in selected:
            check_materialized(module, name, "check_nm_sparsity")
            w2d = masking.unit_matrix(module.weight.detach(), weight_layout(module))
            counts = masking.nm_group_nonzeros(w2d, m)
            report.layers.append(NMLayerCheck(
                name=name, type=layer_type_name(module), shape=tuple(module.weight.shape),
                n_groups=counts.numel(), violating_groups=int((counts > n).sum()),
                max_nonzeros=int(counts.max()) if counts.numel() else 0,
                zero_fraction=float((w2d == 0).sum()) / max(1, w2d.numel()),
            ))
    return report


def _semi_structured_class():
    """The subclass ``torch.sparse.to_sparse_semi_structured`` will build (cuSPARSELt unless forced
    to CUTLASS), whose ``_DTYPE_SHAPE_CONSTRAINTS`` give the shapes it accepts."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def to_semi_structured(model: nn.Module, target_modules=None, exclude_modules=None) -> list[str]:
    """Convert the 2:4-pruned ``nn.Linear`` layers of ``model`` for sparse inference on CUDA, in place:
    each weight becomes a frozen ``nn.Parameter`` holding
    ``torch.sparse.to_sparse_semi_structured(weight)`` (``F.linear`` then runs the 2:4 sparse kernel).

    For inference only: the converted weights take no gradient, and the model should be saved
    (:func:`hf_tdrop.save_pruned`) before converting. Typical use::

        prune_model(model, mode="nm", n=2, m=4)
        model = model.half().cuda().eval()
        to_semi_structured(model)

    Args:
        model: the model, on a CUDA device of compute capability 8.0 or newer, in float16 or bfloat16.
        target_modules, exclude_modules: which layers, as in :func:`hf_tdrop.prune_model` (default:
            every supported layer but output heads and tied layers). Selected layers that are not
            ``nn.Linear`` (``Conv1D``, ConvNd) are left as they are.

    Returns:
        The names of the converted layers, in model order.

    Raises:
        ValueError: ``model`` not a module; bad patterns; no ``nn.Linear`` selected; or a selected
            Linear that is patched for training (targeted dropout or another method: ``unpatch_model`` first), not
            float16/bfloat16, of a shape the sparse
            kernel does not take (``[out, in]`` both multiples of its minimum block, e.g. 16 x 16 for
            cuSPARSELt, 32 x 64 for CUTLASS), or not exactly 2:4 (some group of 4 consecutive inputs
            with more than 2 nonzeros). Every layer is checked and all problems are listed.
        RuntimeError: CUDA is not available, a selected weight is not on a CUDA device, or the GPU
            is older than compute capability 8.0. Checked after the ValueErrors, before any change.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    selected = select_layers(model, target_modules, exclude_modules)
    linears = [(name, mod) for name, mod in selected if type(mod) is nn.Linear or
               (is_patched_layer(mod) and patch_state(mod).original_class is nn.Linear)]
    skipped = [name or "<model>" for name, mod in selected if not any(mod is lin for _, lin in linears)]
    if not linears:
        raise ValueError(f"to_semi_structured converts nn.Linear layers; none among the selected layers {skipped[:8]}.")
    backend = _semi_structured_class()
    problems = []
    with torch.no_grad():
        for name, module in linears:
            label = name or "<model>"
            weight = module.weight
            if is_patched_layer(module):
                problems.append(f"{label}: patched for training by hf_tdrop (call unpatch_model(model) first)")
                continue
            check_materialized(module, name, "to_semi_structured")
            if weight.dtype not in SEMI_STRUCTURED_DTYPES:
                problems.append(f"{label}: dtype {weight.dtype} (needs torch.float16 or torch.bfloat16, e.g. model.half())")
                continue
            rows, cols = weight.shape
            limits = backend._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
            min_rows, min_cols = limits.sparse_min_rows, limits.sparse_min_cols
            if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
                problems.append(f"{label}: weight shape [{rows}, {cols}] (the {backend.BACKEND} kernel needs "
                                f"[out, in] both multiples of [{min_rows}, {min_cols}])")
                continue
            bad = int((masking.nm_group_nonzeros(weight.detach(), 4) > 2).sum())
            if bad:
                problems.append(f"{label}: not exactly 2:4 ({bad} of {rows * cols // 4} groups of 4 have more than "
                                "2 nonzeros; prune_model(model, mode='nm', n=2, m=4) first)")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} layers in all)" if len(problems) > 6 else "")
        raise ValueError(f"to_semi_structured: {len(problems)} layer(s) cannot be converted: {shown}.")
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs CUDA: torch's 2:4 semi-structured sparse kernels run on "
                           "NVIDIA GPUs (compute capability 8.0+) only; move the model with model.cuda() on such a machine.")
    for name, module in linears:
        device = module.weight.device
        if device.type != "cuda":
            raise RuntimeError(f"to_semi_structured: layer {name or '<model>'!r} is on {device}; move the model "
                               "to a CUDA device first (model.cuda()).")
        if torch.cuda.get_device_capability(device) < (8, 0):
            raise RuntimeError(f"to_semi_structured: {torch.cuda.get_device_name(device)} (compute capability "
                               f"{torch.cuda.get_device_capability(device)}) has no 2:4 sparse tensor cores; "
                               "needs 8.0 or newer.")
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in linears:
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()), requires_grad=False)
        converted.append(name)
    if skipped:
        logger.info("to_semi_structured: left %d selected non-Linear layer(s) dense: %s", len(skipped), skipped[:8])
    return converted
