"""BatchNorm statistics of the network as it will be used: re-estimation after training and pruning.

A BatchNorm layer's running mean/variance are averages over the activations it saw while training.
Targeted dropout trains a thinned network (each step drops about ``γ·α`` of a layer's weights or
units), and pruning removes weights after training: in both cases the statistics no longer match
the network that is evaluated, and a BatchNorm model can fall to chance accuracy although its
weights are fine. Re-estimating the statistics on a few training batches of the network as it will
be evaluated (every targeted dropout layer in eval mode, so nothing is dropped) is the standard
remedy.

- :func:`recalibrate_batchnorm` re-estimates the statistics of every BatchNorm layer in place.
- :class:`BatchNormRecalibration` packages the batches and count as a callable for
  :func:`hf_tdrop.prune_sweep` (``recalibrate=``), which then re-estimates at every pruning level
  and restores the buffers bit for bit afterwards.
- :class:`hf_tdrop.TargetedDropoutCallback` calls :func:`recalibrate_batchnorm` at the end of
  ``Trainer`` training (on by default for models with BatchNorm); in an accelerate loop, call it
  yourself after the last step, before saving.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

DEFAULT_RECALIBRATION_BATCHES = 50
"""Batches used by default to re-estimate BatchNorm statistics (6,400 images at batch 128)."""

LABEL_KEYS = ("labels", "label", "label_ids")


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(name, module)`` of every BatchNorm layer (1d/2d/3d, SyncBatchNorm, lazy) that tracks
    running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm layer with running statistics."""
    return bool(batchnorm_layers(model))


def check_num_batches(value: Any, name: str = "num_batches", allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "a positive integer" + (" or None (every batch)" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
    return int(value)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return value


def _forward(model: nn.Module, batch: Any, device: torch.device) -> None:
    if isinstance(batch, Mapping):
        model(**{k: _to_device(v, device) for k, v in batch.items() if k not in LABEL_KEYS})
    elif isinstance(batch, (tuple, list)):
        # (inputs, targets) pairs as torchvision-style loaders yield them: the inputs only
        model(_to_device(batch[0], device))
    else:
        model(_to_device(batch, device))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable,
    num_batches: Optional[int] = DEFAULT_RECALIBRATION_BATCHES,
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` in place.

    The statistics are reset and recomputed over the first ``num_batches`` batches of ``batches``,
    without gradients: the running mean becomes the mean of the per-batch means and the running
    variance the mean of the per-batch (unbiased) variances, each batch weighted by the number of
    values it normalises per channel (a ragged last batch counts for its size). The mean is then
    the exact mean over all the data; the variance is the average within-batch variance (what
    BatchNorm normalises by in training), not the variance of the pooled data. The statistics are
    with every module but the BatchNorm layers in eval mode: targeted dropout layers and
    ``nn.Dropout`` drop nothing, so the statistics are those of the network as it is evaluated
    (pruned weights included; with ``drop_targeted_at_eval=True``, without the targeted set).
    Afterwards every module's train/eval flag and every BatchNorm momentum are as before.

    Args:
        model: the model (unwrapped: not a DDP/FSDP wrapper). Under data parallelism each process
            estimates from its own batches; save from one process.
        batches: an iterable of model inputs, e.g. the training ``DataLoader``. A mapping is passed
            as keyword arguments (``labels``/``label``/``label_ids`` removed), a tuple/list as
            ``model(batch[0])``, a tensor as ``model(batch)``; tensors are moved to the model's
            device.
        num_batches: how many batches to use (default 50), or None for all of them.
        forward_fn: ``forward_fn(model, batch)`` to call the model another way.

    Returns:
        The number of batches used.

    Raises:
        ValueError: ``model`` has no BatchNorm layer with running statistics, ``num_batches`` is not
            a positive integer or None, or ``batches`` yielded nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    num_batches = check_num_batches(num_batches)
    if forward_fn is not None and not callable(forward_fn):
        raise ValueError(f"`forward_fn` must be None or callable (model, batch), got {type(forward_fn).__name__}.")
    layers = [m for _, m in batchnorm_layers(model)]
    if not layers:
        raise ValueError(f"`model` ({type(model).__name__}) has no BatchNorm layer with running statistics "
                         "to re-estimate.")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in layers]
    seen = {id(m): 0 for m in layers}

    def weigh_by_size(module, args):  # running = (1 - n / (seen + n)) running + n / (seen + n) batch
        n = args[0].numel() // max(1, module.num_features)
        seen[id(module)] += n
        module.momentum = n / seen[id(module)]

    hooks = [m.register_forward_pre_hook(weigh_by_size) for m in layers]
    used = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.train()
        source = batches if num_batches is None else itertools.islice(batches, num_batches)
        for batch in source:
            if forward_fn is not None:
                forward_fn(model, batch)
            else:
                _forward(model, batch, device)
            used += 1
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in momenta:
            m.momentum = momentum
        for m, flag in modes:
            m.training = flag
    if used == 0:
        raise ValueError("`batches` yielded no batch: BatchNorm statistics cannot be re-estimated "
                         "(they were reset; restore them from a copy or pass a non-empty iterable).")
    return used


@dataclass
class BatchNormRecalibration:
    """``recalibrate=`` argument of :func:`hf_tdrop.prune_sweep`: re-estimate BatchNorm statistics
    of the pruned model at every level from ``num_batches`` batches of ``batches``.

    ``batches`` is iterated afresh at every level (a ``DataLoader`` is re-iterable; a generator is
    not: pass a list). :meth:`describe` is what the sweep records.
    """

    batches: Iterable
    num_batches: Optional[int] = DEFAULT_RECALIBRATION_BATCHES
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None

    def __post_init__(self) -> None:
        self.num_batches = check_num_batches(self.num_batches)
        if iter(self.batches) is self.batches:
            raise ValueError("`batches` must be re-iterable (a DataLoader, list or tuple), not an iterator: "
                             "it is read again at every pruning level.")

    def __call__(self, model: nn.Module) -> int:
        return recalibrate_batchnorm(model, self.batches, self.num_batches, forward_fn=self.forward_fn)

    def describe(self) -> dict:
        return {"method": "batchnorm", "num_batches": self.num_batches}


class BufferSnapshot:
    """Copies of every buffer of a module (BatchNorm running statistics and counters included),
    written back in place, bit for bit, by :meth:`restore`."""

    def __init__(self, model: nn.Module):
        self._saved = [(b, b.detach().clone()) for b in model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in self._saved:
            buffer.copy_(value)
