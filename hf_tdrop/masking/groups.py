"""N:M patterns: targeting and pruning within groups of ``m`` consecutive entries of each row
(:func:`targeted_nm`, :func:`nm_prune_mask`), by ``m`` whole-tensor comparisons instead of a sort."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .layouts import fraction_count, nm_group_count, nm_targetable_groups
from .selection import _ranking_scores, lowest_k, uses_sync_free_selection


def _lowest_in_groups(g: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest of every group ``g[..., :]`` (bool like ``g``), ties by lowest index: an
    entry is taken iff its rank ``#{j: g_j < g_i} + #{j < i: g_j == g_i}`` is below ``k``. ``m``
    comparisons of the whole tensor (no sort; for small groups cheaper than ``topk``), ``m - 1``
    more only when ties decide."""
    m = g.shape[-1]
    if k <= 0:
        return torch.zeros_like(g, dtype=torch.bool)
    if k >= m:
        return torch.ones_like(g, dtype=torch.bool)
    rank = torch.zeros(g.shape, dtype=torch.int8 if m <= 127 else torch.int32, device=g.device)
    for j in range(m):
        rank += g[..., j:j + 1] < g
    selected = rank < k
    # Without ties each group now has exactly k; a tie straddling a group's k-th place gives it
    # more (never fewer). Only then pay for the index tie-break (on an accelerator, always: checking
    # would read a count back to the host).
    if uses_sync_free_selection(g) or int(selected.sum()) != (selected.numel() // m) * k:
        for j in range(m - 1):
            rank[..., j + 1:] += g[..., j:j + 1] == g[..., j + 1:]
        selected = rank < k
    return selected


def _nm_select(scores: torch.Tensor, fraction: float, n: int, m: int, held: Optional[torch.Tensor] = None,
               group_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N:M selection on ``scores [rows, fan_in]`` (non-negative; see :func:`targeted_nm`).
    ``group_scores [rows, G]``, if given, replaces the per-group sums used to choose groups."""
    rows, fan_in = scores.shape
    n_groups = nm_group_count(fan_in, m)
    n_targetable = nm_targetable_groups(fan_in, n, m)
    k_groups = fraction_count(fraction, n_targetable)
    if k_groups == 0 or rows == 0:
        return torch.zeros((rows, fan_in), dtype=torch.bool, device=scores.device)
    s = _ranking_scores(scores)
    if held is not None:
        s = s.masked_fill(held, -1.0)  # below every |w|: a held entry fills one of its group's m - n
    pad = n_groups * m - fan_in
    if pad:  # the tail group, zero-padded: the padding ranks below everything (distinct values: no ties)
        fill = -2.0 - torch.arange(pad, dtype=s.dtype, device=s.device)
        s = torch.cat([s, fill.expand(rows, pad)], dim=1)
    g = s.reshape(rows, n_groups, m)
    selected = _lowest_in_groups(g, m - n)
    if k_groups < n_targetable:
        if group_scores is None:
            group_scores = torch.where(selected, g.clamp_min(0.0), 0.0).to(torch.float64).sum(dim=-1)
        if n_targetable < n_groups:  # a tail of r <= n entries has nothing to target: never chosen
            group_scores = group_scores.clone()
            group_scores[:, -1] = math.inf
        selected &= lowest_k(group_scores, k_groups).unsqueeze(-1)
    selected = selected.view(rows, n_groups * m)[:, :fan_in]
    if held is not None:
        selected &= ~held
    return selected


def targeted_nm(w2d: torch.Tensor, gamma: float, n: int, m: int, held: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N:M targeting: bool ``[n_out, fan_in]``, True for the entries an N:M pattern removes.

    Each row w_o is cut into ``G = ceil(fan_in / m)`` groups of ``m`` consecutive inputs; in every
    group the ``m - n`` smallest |w| are selected (ranked in float32, ties: lowest index first). A
    last group of ``r < m`` entries counts as zero-padded to ``m``: its ``max(0, r - n)`` smallest
    are selected. Of the ``T`` groups of a row with something selected (:func:`nm_targetable_groups`),
    the ``floor(gamma * T)`` whose selected entries have the smallest sum of |w| (in float64; ties:
    lowest group index) are targeted (all of them for ``gamma = 1``).

    ``held`` (bool ``[n_out, fan_in]``, True = held at zero) entries are never targeted; each one
    counts as one of its group's ``m - n`` (it is zero already), so only the rest of a group's
    budget targets its surviving weights.
    """
    return _nm_select(w2d.abs(), gamma, n, m, held)


def nm_prune_mask(w2d: torch.Tensor, fraction: float, n: int, m: int) -> torch.Tensor:
    """N:M magnitude pruning: bool ``[n_out, fan_in]``, True = prune. Same selection as targeting
    with ``gamma = fraction`` (``fraction = 1``: every group, the exact N:M pattern)."""
    return targeted_nm(w2d, fraction, n, m)


def random_nm_prune_mask(w2d: torch.Tensor, fraction: float, n: int, m: int,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random N:M pruning baseline: in ``floor(fraction * T)`` uniformly random groups of each row
    (``T``: :func:`nm_targetable_groups`),
    ``m - n`` uniformly random entries (``max(0, r - n)`` of a last group of ``r < m``)."""
    rows, fan_in = w2d.shape
    scores = torch.rand((rows, fan_in), device=w2d.device, generator=generator)
    group_scores = torch.rand((rows, nm_group_count(fan_in, m)), device=w2d.device, generator=generator)
    return _nm_select(scores, fraction, n, m, group_scores=group_scores)
