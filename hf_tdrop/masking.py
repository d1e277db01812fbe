"""Targeted-dropout and magnitude-pruning masks as pure tensor functions.

Every function here works on a weight matrix viewed as ``[n_out, fan_in]``: row ``o`` is w_o, all
the weights feeding output unit (or channel) ``o``. :func:`unit_matrix` makes that view for the
supported layouts. Nothing here touches modules, and nothing draws random numbers except
:func:`sample_drop`, which uses torch's global RNG (reproducible under ``torch.manual_seed``) unless
a ``generator`` is given.

Selection is a partial selection per row (``topk`` of the smaller side, plus a cumulative count only
when ties need breaking), never a full sort,
and ranks in float32 whatever the weight's dtype, so exactly ``k`` elements are selected even when
low-precision weights tie.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

LAYOUT_OUT_IN = "out_in"
"""``weight`` is ``[n_out, fan_in, *kernel]`` (``nn.Linear``, ``nn.Conv1d/2d/3d``)."""
LAYOUT_IN_OUT = "in_out"
"""``weight`` is ``[fan_in, n_out]`` (transformers' ``Conv1D``, used by GPT-2)."""
LAYOUTS = (LAYOUT_OUT_IN, LAYOUT_IN_OUT)

_EPS = 1e-9


def fraction_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)``, robust to float rounding (``0.29 * 100`` gives 29, not 28)."""
    return min(n, max(0, math.floor(fraction * n + _EPS)))


def unit_matrix(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """View ``weight`` as ``[n_out, fan_in]`` (no copy for ``out_in``; a transposed view for ``in_out``)."""
    if layout == LAYOUT_OUT_IN:
        return weight.reshape(weight.shape[0], -1)
    if layout == LAYOUT_IN_OUT:
        if weight.dim() != 2:
            raise ValueError(f"layout 'in_out' needs a 2-D weight, got shape {tuple(weight.shape)}.")
        return weight.t()
    raise ValueError(f"`layout` must be one of {list(LAYOUTS)}, got {layout!r}.")


def to_weight_layout(mask2d: torch.Tensor, weight: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`unit_matrix` for a ``[n_out, fan_in]`` mask: returns it in ``weight``'s shape."""
    if layout == LAYOUT_IN_OUT:
        return mask2d.t()
    return mask2d.reshape(weight.shape)


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row of a bool mask; summing the bytes into a small int is several times
    cheaper than ``mask.sum(-1)`` (which widens to int64)."""
    dtype = torch.int16 if mask.shape[-1] < 2**15 else torch.int32
    return mask.view(torch.uint8).sum(dim=-1, dtype=dtype)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of each row of ``scores`` (``[..., n]``).

    Exactly ``min(k, n)`` entries per row are True. Ties at the threshold are broken by position
    (lowest index first), so the result is deterministic. Ranking is done in float32 (float64 stays
    float64). Scores must be NaN-free (a NaN weight means training has already diverged).
    """
    n = scores.shape[-1]
    if k <= 0 or n == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    s = scores.detach()
    if s.dtype != torch.float64:
        s = s.float()
    if k <= n // 2:
        # threshold = the k-th smallest; everything <= it is selected, too many only on ties
        threshold = s.topk(k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
        selected = s <= threshold
        excess = bool((_row_counts(selected) > k).any())
    else:
        # cheaper to find the (n - k) largest: threshold = the (k+1)-th smallest; everything strictly
        # below it is selected, too few only on ties
        threshold = s.topk(n - k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        selected = s < threshold
        excess = bool((_row_counts(selected) < k).any())
    # Fast path: with continuous weights the comparison alone selects exactly k per row. Only when a
    # row ties at its threshold do we pay for the cumulative count that keeps the lowest indices.
    if excess:
        at = s == threshold
        below = selected & ~at
        needed = k - below.sum(dim=-1, keepdim=True)
        selected = below | (at & (at.cumsum(dim=-1) <= needed))
    return selected


def unit_norms(w2d: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of a ``[n_out, fan_in]`` matrix, in float32: ``[n_out]``."""
    return torch.linalg.vector_norm(w2d.detach().float(), dim=1)


def targeted_weights(w2d: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weight-level targeting: bool ``[n_out, fan_in]``, True for the ``floor(gamma * fan_in)``
    smallest-|w| entries of every row w_o."""
    return lowest_k(w2d.abs(), fraction_count(gamma, w2d.shape[1]))


def targeted_units(w2d: torch.Tensor, gamma: float) -> torch.Tensor:
    """Unit-level targeting: bool ``[n_out]``, True for the ``floor(gamma * n_out)`` units with the
    smallest ||w_o||_2."""
    return lowest_k(unit_norms(w2d), fraction_count(gamma, w2d.shape[0]))


def sample_drop(targeted: torch.Tensor, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Drop each targeted element independently with probability ``alpha``: bool, True = dropped.

    ``alpha == 0`` drops nothing and ``alpha == 1`` drops every targeted element; both without
    drawing random numbers."""
    if alpha <= 0.0:
        return torch.zeros_like(targeted)
    if alpha >= 1.0:
        return targeted.clone()
    u = torch.rand(targeted.shape, device=targeted.device, generator=generator)
    return targeted & (u < alpha)


def weight_drop_mask(w2d: torch.Tensor, gamma: float, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One targeted-dropout draw at weight level: bool ``[n_out, fan_in]``, True = zero this weight."""
    return sample_drop(targeted_weights(w2d, gamma), alpha, generator)


def unit_drop_mask(w2d: torch.Tensor, gamma: float, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One targeted-dropout draw at unit level: bool ``[n_out]``, True = drop unit o (w_o and its bias)."""
    return sample_drop(targeted_units(w2d, gamma), alpha, generator)


def weight_prune_mask(w2d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Weight-level magnitude pruning: bool ``[n_out, fan_in]``, True = prune. Same selection as
    targeting with ``gamma = sparsity`` (the paper prunes what it targeted)."""
    return targeted_weights(w2d, sparsity)


def unit_prune_mask(w2d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unit-level magnitude pruning: bool ``[n_out]``, True = prune unit o."""
    return targeted_units(w2d, sparsity)


def random_weight_prune_mask(w2d: torch.Tensor, sparsity: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random pruning baseline: ``floor(sparsity * fan_in)`` uniformly random entries of each row."""
    scores = torch.rand(w2d.shape, device=w2d.device, generator=generator)
    return lowest_k(scores, fraction_count(sparsity, w2d.shape[1]))


def random_unit_prune_mask(w2d: torch.Tensor, sparsity: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random pruning baseline: ``floor(sparsity * n_out)`` uniformly random units."""
    scores = torch.rand(w2d.shape[0], device=w2d.device, generator=generator)
    return lowest_k(scores, fraction_count(sparsity, w2d.shape[0]))
