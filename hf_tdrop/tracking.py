"""Per-weight bookkeeping shared by the training-time methods and by held pruning: the optimizer
steps taken on a weight tensor (:func:`optimizer_steps`) and the entries held at zero
(:data:`HELD_ZEROS`, maintained by :mod:`hf_tdrop.hold`).

Steps are counted by a global ``torch.optim`` step hook (registered on first use), per weight
tensor: a step counts for a weight when the stepping optimizer holds it. This works for every
``torch.optim.Optimizer`` (for-loop, foreach and fused implementations alike, which update a weight
a different number of times per step) and is independent of how many forward passes run per step
(gradient accumulation, gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class _StepCount:
    """Optimizer steps seen by one weight tensor (see :func:`optimizer_steps`)."""

    start: int  # value of the global step count when the weight was first seen
    steps: int = 0  # steps of optimizers holding the weight
    held: bool = False  # whether an optimizer holding the weight has stepped


_all_optimizer_steps = 0
"""Steps of every ``torch.optim.Optimizer`` in this process, once the hook is registered."""
_weight_steps: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Weight tensor -> :class:`_StepCount`, for the weights of patched layers (by identity, without
keeping the tensor alive)."""
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _all_optimizer_steps
    _all_optimizer_steps += 1
    if not _weight_steps:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            count = _weight_steps.get(param)
            if count is not None:
                count.steps += 1
                count.held = True


def optimizer_steps(weight: torch.Tensor) -> int:
    """Optimizer steps taken on ``weight`` since it was first passed here (0 on the first call).

    Counts calls of ``step()`` of any ``torch.optim.Optimizer`` whose ``param_groups`` hold this very
    tensor, once per call, however the optimizer updates it (fused optimizers never bump
    ``weight._version``; for-loop AdamW with weight decay bumps it twice). Until such an optimizer
    has stepped, every optimizer step in the process counts: a weight whose updates go through a
    copy the optimizer holds instead (e.g. flattened or sharded parameters) still follows the
    training steps. A step skipped by a gradient scaler (inf/NaN gradients) is no step.
    """
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    count = _weight_steps.get(weight)
    if count is None:
        count = _weight_steps[weight] = _StepCount(start=_all_optimizer_steps)
    return count.steps if count.held else _all_optimizer_steps - count.start


HELD_ZEROS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Weight tensor -> bool mask in the weight's shape, True = held at zero by
:func:`hf_tdrop.hold_pruned` (the union over its live holds; maintained by :mod:`hf_tdrop.hold`).
Targeting leaves these entries out."""


def held_zeros(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The held-at-zero mask of ``weight`` (its shape, on its device), or None if nothing is held."""
    mask = HELD_ZEROS.get(weight) if HELD_ZEROS else None
    if mask is not None and mask.device != weight.device:
        mask = HELD_ZEROS[weight] = mask.to(weight.device)
    return mask
