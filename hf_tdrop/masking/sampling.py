"""Sampling which targeted entries to drop: 16-bit random words from torch's generator compared
with an integer threshold (:func:`sample_drop`)."""

from __future__ import annotations

import math
from typing import Optional

import torch


WORD_LEVELS = 1 << 16
"""Resolution of the dropout probability: α is applied as ``round(α * 2**16) / 2**16``."""


def random_words(shape, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Independent uniform random int16 words (all 65,536 values equally likely) of ``shape``: four
    per 64-bit draw of torch's RNG (``generator`` or the global one), so a quarter of the random
    bits, and a cheaper comparison, of one float32 ``torch.rand`` per element."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:numel].view(shape)


def drop_word_threshold(alpha: float) -> int:
    """A random word ``u`` (see :func:`random_words`) means "drop" iff ``u < drop_word_threshold(α)``:
    probability ``round(α * 2**16) / 2**16``, within ``2**-17`` of α."""
    return min(WORD_LEVELS // 2, max(-WORD_LEVELS // 2, round(alpha * WORD_LEVELS) - WORD_LEVELS // 2))


def sample_drop(targeted: torch.Tensor, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Drop each targeted element independently with probability ``alpha``: bool, True = dropped.

    Every element gets a random word from :func:`random_words` (targeted or not, so the draw does not
    depend on the targeting) and is dropped iff it is targeted and its word is below
    :func:`drop_word_threshold`: the probability is α rounded to a multiple of ``2**-16``.
    ``alpha`` at 0 or 1 (after that rounding) drops nothing or every targeted element, without
    drawing random numbers."""
    threshold = drop_word_threshold(alpha)
    if threshold <= -WORD_LEVELS // 2:
        return torch.zeros_like(targeted)
    if threshold >= WORD_LEVELS // 2:
        return targeted.clone()
    return targeted & (random_words(targeted.shape, targeted.device, generator) < threshold)
