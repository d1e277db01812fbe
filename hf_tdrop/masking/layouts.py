"""Weight layouts and exact counts: the ``[n_out, fan_in]`` view every mask function works on
(:func:`unit_matrix`, :func:`to_weight_layout`), ``floor(fraction * n)`` computed exactly
(:func:`fraction_count`), and the group counts of N:M patterns."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch


LAYOUT_OUT_IN = "out_in"
"""``weight`` is ``[n_out, fan_in, *kernel]`` (``nn.Linear``, ``nn.Conv1d/2d/3d``)."""


LAYOUT_IN_OUT = "in_out"
"""``weight`` is ``[fan_in, n_out]`` (transformers' ``Conv1D``, used by GPT-2)."""


LAYOUTS = (LAYOUT_OUT_IN, LAYOUT_IN_OUT)


def fraction_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` for the fraction as written in decimal, computed exactly.

    The float is read as the shortest decimal that gives it back (its ``repr``: ``0.29`` is exactly
    29/100, not the binary float just below it), and that rational times ``n`` is floored with no
    rounding: ``fraction_count(0.29, 100) == 29`` (where ``0.29 * 100 == 28.999999999999996``), and
    ``fraction_count(0.999999999999, 1000) == 999``. The result is clamped to ``[0, n]``.
    """
    return _fraction_count(float(fraction), int(n))


@functools.lru_cache(maxsize=4096)
def _fraction_count(fraction: float, n: int) -> int:
    # cached: called per layer at every forward pass, with few distinct (γ, size) pairs
    return min(n, max(0, math.floor(Fraction(repr(fraction)) * n)))


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


def _counts_of_survivors(fraction: float, survivors: torch.Tensor) -> torch.Tensor:
    """``fraction_count(fraction, c)`` for every count ``c`` of ``survivors`` (an int tensor), exactly."""
    values = survivors.unique()
    counts = torch.tensor([fraction_count(fraction, int(c)) for c in values.tolist()], device=survivors.device)
    return counts[torch.searchsorted(values, survivors)]


def nm_group_count(fan_in: int, m: int) -> int:
    """Groups of ``m`` consecutive inputs in a row of ``fan_in`` entries: ``ceil(fan_in / m)`` (the
    last one has ``fan_in mod m`` entries when ``m`` does not divide ``fan_in``)."""
    return -(-int(fan_in) // int(m))


def nm_targetable_groups(fan_in: int, n: int, m: int) -> int:
    """Groups of a row that an N:M pattern prunes something in: the ``fan_in // m`` full groups, plus
    the last group of ``r = fan_in mod m`` entries when ``r > n``. The γ (nm targeting) and
    ``sparsity`` (nm pruning) fractions count these groups."""
    return int(fan_in) // int(m) + (1 if int(fan_in) % int(m) > int(n) else 0)


def nm_group_nonzeros(w2d: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzero entries in every group of ``m`` consecutive inputs of each row of ``w2d [rows, fan_in]``:
    int ``[rows, ceil(fan_in / m)]`` (the last group may be shorter)."""
    rows, fan_in = w2d.shape
    n_groups = nm_group_count(fan_in, m)
    nonzero = (w2d != 0).to(torch.int32)
    pad = n_groups * m - fan_in
    if pad:
        nonzero = torch.cat([nonzero, nonzero.new_zeros(rows, pad)], dim=1)
    return nonzero.reshape(rows, n_groups, m).sum(dim=-1)
