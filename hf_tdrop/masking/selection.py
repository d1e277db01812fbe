"""Exact selection of the lowest-ranked entries: :func:`lowest_k` (a partial selection per row),
:func:`lowest_k_bracketed` (the same mask for weights that move a little between calls, mostly by
counting against the previous call's thresholds; through the compiled kernel of
:mod:`hf_tdrop.native` on CPU), :func:`lowest_k_sync_free` (no host synchronisation, on the device
types in :data:`SYNC_FREE_DEVICE_TYPES`), and the targeted-dropout and magnitude-pruning masks
built on them (weight and unit modes, with or without entries held at zero)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import native
from .layouts import _counts_of_survivors, _row_counts, fraction_count


def _ranking_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` detached, in float32 (float64 stays float64): ranking never ties low-precision values
    that float32 tells apart, and comparisons against thresholds are exact."""
    s = scores.detach()
    return s if s.dtype == torch.float64 else s.float()


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based, ``1 <= k <= n``) of every row of ``scores [..., n]``:
    ``[..., 1]``. A partial selection (``topk`` of whichever side is smaller), not a sort."""
    s = _ranking_scores(scores)
    n = s.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, {n}], got {k}.")
    if k <= n - k + 1:
        return s.topk(k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
    return s.topk(n - k + 1, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)


def _select_up_to_kth(s: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest of each row of ranking scores ``s [..., n]`` given each row's ``k``-th
    smallest value ``kth [..., 1]``: everything below it, then ties at it by lowest index."""
    selected = s <= kth
    # Fast path: with continuous weights the comparison alone selects exactly k per row. Only when a
    # row ties at its k-th value do we pay for the cumulative count that keeps the lowest indices.
    if bool((_row_counts(selected) > k).any()):
        at = s == kth
        below = selected & ~at
        needed = k - below.sum(dim=-1, keepdim=True)
        selected = below | (at & (at.cumsum(dim=-1) <= needed))
    return selected


SYNC_FREE_DEVICE_TYPES: frozenset = frozenset({"cuda", "xpu", "mps"})
"""Device types whose selection avoids every host synchronisation (:func:`lowest_k_sync_free`).
On CPU, where reading a value back is free, the data-dependent fast paths of :func:`lowest_k` and
:func:`lowest_k_bracketed` are faster."""


def uses_sync_free_selection(scores: torch.Tensor) -> bool:
    """Whether :func:`lowest_k` / :func:`lowest_k_bracketed` select ``scores`` without host syncs."""
    return scores.device.type in SYNC_FREE_DEVICE_TYPES


def _sort_keys(s: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordered like ``(value, index)`` for float32 ranking scores ``s [..., n]``:
    the value's bits mapped to an order-preserving int32 in the high half, the index in the low half,
    so ties at a value go to the lowest index, as in :func:`lowest_k`."""
    bits = (s + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 makes -0.0 equal to +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their order
    index = torch.arange(s.shape[-1], device=s.device, dtype=torch.int64)
    return (ordered << 32) | index


def lowest_k_sync_free(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`lowest_k` (the same mask, bit for bit) with no data-dependent control flow: nothing is
    read back to the host, so an accelerator never waits for the CPU. One ``topk`` of the smaller
    side over unique keys (float32 scores: value bits and index packed in an int64; float64 scores: a
    stable sort), then a scatter into a mask with the layout of ``scores``."""
    n = scores.shape[-1]
    if k <= 0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    s = _ranking_scores(scores)
    selected = torch.zeros_like(scores, dtype=torch.bool)
    if s.dtype == torch.float64:
        order = torch.sort(s, dim=-1, stable=True).indices
        return selected.scatter_(-1, order[..., :k], True)
    keys = _sort_keys(s)
    if k <= n - k:
        return selected.scatter_(-1, keys.topk(k, dim=-1, largest=False, sorted=False).indices, True)
    kept = keys.topk(n - k, dim=-1, largest=True, sorted=False).indices
    return selected.logical_not_().scatter_(-1, kept, False)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest entries of each row of ``scores`` (``[..., n]``).

    Exactly ``min(k, n)`` entries per row are True. Ties at the threshold are broken by position
    (lowest index first), so the result is deterministic. Ranking is done in float32 (float64 stays
    float64). Scores must be NaN-free (a NaN weight means training has already diverged). The mask
    has the memory layout (strides) of ``scores`` for every ``k``, also ``k <= 0`` and ``k >= n``.
    """
    n = scores.shape[-1]
    if k <= 0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if uses_sync_free_selection(scores):
        return lowest_k_sync_free(scores, k)
    s = _ranking_scores(scores)
    return _select_up_to_kth(s, kth_smallest(s, k), k)


@dataclass
class KthBracket:
    """Per-row bounds ``lower[r] <= kth[r] <= upper[r]`` around the ``k``-th smallest value of row
    ``r``, found by one :func:`lowest_k_bracketed` call and used as a guess by the next one.

    ``lower``/``upper`` are ``[n_rows]`` tensors in the ranking dtype; ``margin`` is how many ranks
    on each side of the ``k``-th the bounds are placed (it adapts to how far values move between
    calls). A bracket is only ever a hint: a wrong one costs time, never exactness.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    margin: int


def _initial_margin(n: int) -> int:
    return max(4, n // 64)


def _max_margin(n: int) -> int:
    return max(4, n // 16)


def _kth_and_bounds(s: torch.Tensor, k: int, margin: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row of ``s [rows, n]`` (``1 <= k < n``): the ``k``-th smallest value and the values
    ``margin`` ranks below and above it (clamped to the row), each ``[rows]``. One sorted ``topk`` of
    the smaller side."""
    n = s.shape[1]
    lo_rank, hi_rank = max(k - 1 - margin, 0), min(k - 1 + margin, n - 1)  # 0-based ranks
    if hi_rank + 1 <= n - lo_rank:
        v = s.topk(hi_rank + 1, dim=1, largest=False, sorted=True).values  # v[:, i] has rank i
        return v[:, k - 1], v[:, lo_rank], v[:, hi_rank]
    v = s.topk(n - lo_rank, dim=1, largest=True, sorted=True).values  # v[:, i] has rank n - 1 - i
    return v[:, n - k], v[:, n - 1 - lo_rank], v[:, n - 1 - hi_rank]


def lowest_k_bracketed(
    scores: torch.Tensor, k: int, bracket: Optional[KthBracket] = None
) -> tuple[torch.Tensor, Optional[KthBracket]]:
    """:func:`lowest_k` for a 2-D ``scores [n_rows, n]`` that changes a little between calls (the
    weights of a layer between optimizer steps): the same mask, bit for bit, plus a
    :class:`KthBracket` to pass to the next call.

    With a bracket from the previous call, each row is checked by counting: if fewer than ``k``
    values lie below ``lower`` and at least ``k`` lie at or below ``upper``, the row's ``k``-th
    smallest value is inside the bracket and is found among the few values in it (compacted and
    sorted), instead of by a ``topk`` over the whole row. Rows where the check fails (values moved
    past the bracket, ``k`` changed by more than the margin) and calls without a bracket use a
    ``topk``, exactly as :func:`lowest_k`. On the device types of :data:`SYNC_FREE_DEVICE_TYPES` the
    counting needs the host, so every call is :func:`lowest_k_sync_free` (and no bracket is kept).
    The margin grows by half when more than 1/8 of the rows fail
    (up to ``n / 16``) and shrinks slowly while fewer than 1/64 do.
    """
    if scores.dim() != 2:
        raise ValueError(f"`scores` must be 2-D [n_rows, n], got shape {tuple(scores.shape)}.")
    n_rows, n = scores.shape
    if k <= 0 or k >= n or n_rows == 0 or uses_sync_free_selection(scores):
        return lowest_k(scores, k), None
    s = _ranking_scores(scores)
    if not _usable_bracket(bracket, n_rows, s.device, s.dtype):
        margin = _initial_margin(n)
        kth, lower, upper = _kth_and_bounds(s, k, margin)
        return _select_up_to_kth(s, kth[:, None], k), KthBracket(lower, upper, margin)

    margin = bracket.margin
    lower, upper = bracket.lower, bracket.upper
    below = s < lower[:, None]
    band = s <= upper[:, None]
    n_below = _row_counts(below).long()
    n_upto = _row_counts(band).long()
    band ^= below  # lower <= s <= upper on every row that can pass the check below (there below ⊆ band)
    width = n_upto - n_below
    ok = (n_below < k) & (n_upto >= k) & (width <= 4 * margin + 16)
    failed = (~ok).nonzero().squeeze(1)
    if failed.numel():
        band[failed] = False
    width = torch.where(ok, width, 0)
    selected = below  # completed row by row below
    new_lower, new_upper = lower.clone(), upper.clone()

    if failed.numel() < n_rows:
        # compact each good row's band into a small dense [n_rows, max_width] matrix and sort it
        flat = (band if band.is_contiguous() else band.contiguous()).view(-1).nonzero().squeeze(1)
        rows = flat // n
        cols = flat - rows * n
        if s.is_contiguous():
            values = s.view(-1).index_select(0, flat)
        elif s.t().is_contiguous():  # the [n_out, fan_in] view of Conv1D's [in, out] weight
            values = s.t().reshape(-1).index_select(0, cols * n_rows + rows)
        else:
            values = s[rows, cols]
        max_width = int(width.max())
        starts = width.cumsum(0) - width
        slots = rows * max_width + (torch.arange(flat.numel(), device=s.device) - starts.index_select(0, rows))
        dense = torch.full((n_rows * max_width,), math.inf, dtype=s.dtype, device=s.device)
        dense[slots] = values
        dense = dense.view(n_rows, max_width).sort(dim=1).values
        need = k - n_below  # values still to take from the band, >= 1 on good rows
        last = max_width - 1
        kth = dense.gather(1, (need - 1).clamp(0, last)[:, None]).squeeze(1)
        lo_idx = need - 1 - margin
        hi_idx = need - 1 + margin
        lo_val = dense.gather(1, lo_idx.clamp(0, last)[:, None]).squeeze(1)
        hi_val = dense.gather(1, hi_idx.clamp(0, last)[:, None]).squeeze(1)
        has_lo, has_hi = lo_idx >= 0, hi_idx < width
        # The band only holds values inside the old bracket: when the k-th value moved towards one of
        # its ends, mirror the other side's spread (in value) so the bracket follows the drift.
        lo_val = torch.where(has_lo, lo_val, torch.where(has_hi, 2 * kth - hi_val, lower))
        hi_val = torch.where(has_hi, hi_val, torch.where(has_lo, 2 * kth - lo_val, upper))
        new_lower = torch.where(ok, torch.minimum(lo_val, kth), new_lower)
        new_upper = torch.where(ok, torch.maximum(hi_val, kth), new_upper)
        # select: everything below the bracket (already in `selected`) plus the band values <= kth
        # (band values above it are written False, which they already are: they are not below `lower`)
        selected[rows, cols] = values <= kth.index_select(0, rows)
        taken = _row_counts(dense <= kth[:, None])
        tied = (ok & (taken > need)).nonzero().squeeze(1)  # ties at the k-th value: lowest index wins
        if tied.numel():
            s_tied = s[tied]
            selected[tied] = _select_up_to_kth(s_tied, kth[tied][:, None], k)

    if failed.numel():
        s_failed = s[failed]
        kth_f, lower_f, upper_f = _kth_and_bounds(s_failed, k, margin)
        selected[failed] = _select_up_to_kth(s_failed, kth_f[:, None], k)
        new_lower[failed] = lower_f
        new_upper[failed] = upper_f
    return selected, KthBracket(new_lower, new_upper, _next_margin(margin, failed.numel(), n_rows, n))


def _next_margin(margin: int, failed: int, n_rows: int, n: int) -> int:
    """The bracket margin after a call where the bracket did not hold for ``failed`` of ``n_rows`` rows."""
    if failed * 8 > n_rows:
        return min(margin + margin // 2 + 1, _max_margin(n))
    if failed * 64 < n_rows:
        return max(margin - margin // 8, 1)
    return margin


def _usable_bracket(bracket: Optional[KthBracket], n_rows: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``bracket`` was made for ``n_rows`` rows of ranking scores on ``device`` in ``dtype``."""
    return (
        bracket is not None
        and bracket.lower.shape == (n_rows,)
        and bracket.lower.device == device
        and bracket.lower.dtype == dtype
    )


def unit_norms(w2d: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of a ``[n_out, fan_in]`` matrix, in float32: ``[n_out]``."""
    return torch.linalg.vector_norm(w2d.detach().float(), dim=1)


def targeted_weights(w2d: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weight-level targeting: bool ``[n_out, fan_in]``, True for the ``floor(gamma * fan_in)``
    smallest-|w| entries of every row w_o."""
    return lowest_k(w2d.abs(), fraction_count(gamma, w2d.shape[1]))


def targeted_weights_bracketed(
    w2d: torch.Tensor, gamma: float, bracket: Optional[KthBracket] = None
) -> tuple[torch.Tensor, Optional[KthBracket]]:
    """:func:`targeted_weights` (the same mask) through :func:`lowest_k_bracketed`: pass back the
    returned bracket on the next call for the same layer, after its weights moved a little.

    On CPU (float32, bfloat16 or float16 weights) this runs the compiled kernel of
    :mod:`hf_tdrop.native` when it is available: the same mask and bracket rules in two passes over
    each row, in a quarter to a third of the time."""
    return _lowest_k_abs_bracketed(w2d, fraction_count(gamma, w2d.shape[1]), bracket)


def _lowest_k_abs_bracketed(
    w2d: torch.Tensor, k: int, bracket: Optional[KthBracket]
) -> tuple[torch.Tensor, Optional[KthBracket]]:
    """``lowest_k_bracketed(w2d.abs(), k, bracket)``, through the compiled kernel where it applies."""
    n_rows, n = w2d.shape
    if 0 < k < n and n_rows and native.supports(w2d) and not uses_sync_free_selection(w2d) and native.available():
        margin = _initial_margin(n)
        lower = upper = None
        if _usable_bracket(bracket, n_rows, w2d.device, torch.float32):
            lower, upper, margin = bracket.lower, bracket.upper, bracket.margin
        selected, new_lower, new_upper, failed = native.lowest_k_abs_bracketed(w2d, k, lower, upper, margin)
        if lower is not None:
            margin = _next_margin(margin, failed, n_rows, n)
        return selected, KthBracket(new_lower, new_upper, margin)
    return lowest_k_bracketed(w2d.abs(), k, bracket)


def targeted_units(w2d: torch.Tensor, gamma: float) -> torch.Tensor:
    """Unit-level targeting: bool ``[n_out]``, True for the ``floor(gamma * n_out)`` units with the
    smallest ||w_o||_2."""
    return lowest_k(unit_norms(w2d), fraction_count(gamma, w2d.shape[0]))


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


# --- per-row counts: targeting among the weights that survive a held pruning ---


def lowest_k_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k[r]`` smallest entries of row ``r`` of ``scores [rows, n]``
    (``k``: integer ``[rows]``, values clamped to ``[0, n]``). Same ranking (float32, float64 kept)
    and tie rule (lowest index first) as :func:`lowest_k`, through a stable sort of each row."""
    if scores.dim() != 2 or k.shape != scores.shape[:1]:
        raise ValueError(f"`scores` must be [rows, n] and `k` [rows], got {tuple(scores.shape)} and {tuple(k.shape)}.")
    s = _ranking_scores(scores)
    order = s.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return ranks < k.to(ranks.device, torch.long)[:, None]


def targeted_weights_among(w2d: torch.Tensor, gamma: float, held: torch.Tensor) -> torch.Tensor:
    """Weight-level targeting among the surviving weights: bool ``[n_out, fan_in]``, True for the
    ``floor(gamma * s_o)`` smallest-|w| entries of row o among its ``s_o`` entries not ``held``
    (bool ``[n_out, fan_in]``, True = held at zero by :func:`hf_tdrop.hold_pruned`). Held entries
    are never targeted. With nothing held this is :func:`targeted_weights`."""
    return targeted_weights_among_bracketed(w2d, gamma, held)[0]


def targeted_weights_among_bracketed(
    w2d: torch.Tensor, gamma: float, held: torch.Tensor, bracket: Optional[KthBracket] = None
) -> tuple[torch.Tensor, Optional[KthBracket]]:
    """:func:`targeted_weights_among` (the same mask), plus a bracket for the next call as in
    :func:`targeted_weights_bracketed`. When every row keeps the same number of survivors (weight
    pruning prunes every row alike) the held entries rank last (as ``+inf``) in one bracketed
    selection, through the compiled kernel on CPU where it is available; otherwise each row gets
    its own count through a stable sort (and no bracket is returned)."""
    if w2d.shape[0] == 0:
        return torch.zeros(w2d.shape, dtype=torch.bool, device=w2d.device), None
    k = _counts_of_survivors(gamma, w2d.shape[1] - _row_counts(held).long())
    if bool((k == k[0]).all()):  # the usual case (every row pruned alike): one selection
        # one pass: held entries become +inf, the magnitudes are taken by the selection
        return _lowest_k_abs_bracketed(torch.where(held, math.inf, w2d.detach()), int(k[0]), bracket)
    return lowest_k_per_row(_ranking_scores(w2d.abs()).masked_fill(held, math.inf), k), None


def targeted_units_among(w2d: torch.Tensor, gamma: float, held_units: torch.Tensor) -> torch.Tensor:
    """Unit-level targeting among surviving units: bool ``[n_out]``, True for the
    ``floor(gamma * s)`` units of smallest ||w_o||_2 among the ``s`` units not in ``held_units``
    (bool ``[n_out]``). Held units are never targeted."""
    k = fraction_count(gamma, w2d.shape[0] - int(held_units.sum()))
    return lowest_k(unit_norms(w2d).masked_fill(held_units, math.inf), k)
