"""The regulariser plumbing: the sum of the methods' loss terms over a model's patched layers, and
the methods' own trainable tensors (for optimizer groups)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import check_int
from ..constants import METHOD_ATTR
from .base import method_layers


def regularization_loss(model: nn.Module, step: Optional[int] = None) -> torch.Tensor:
    """The sum of the method loss terms of every patched layer of ``model`` (L1, expected L0 cost,
    variational KL, Smallify switch L1): add it to the task loss once per optimizer update.

    Args:
        model: a model patched with :func:`hf_tdrop.patch_model` (wrapped by DDP / accelerate or not).
        step: optimizer updates done so far (for warm-ups, e.g. the variational KL's
            ``kl_warmup_steps``); required when a layer's method has a warm-up.

    Returns:
        A 0-d tensor on the model's device (a constant zero when no patched method has a loss term).

    Example (accelerate or a plain loop)::

        loss = model(**batch).loss + hf_tdrop.regularization_loss(model, step=update)
        accelerator.backward(loss)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if step is not None:
        check_int("step", step, 0)
    total = None
    for _, module in method_layers(model):
        term = module.__dict__[METHOD_ATTR].handler.loss(module, step)
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def method_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: Parameter}`` of the extra trainable tensors the patched methods added (gates, log σ²,
    switches), e.g. to give them their own optimizer group without weight decay."""
    out = {}
    for name, module in method_layers(model):
        for attr in module.__dict__[METHOD_ATTR].handler.extra_tensors:
            param = module._parameters.get(attr)
            if param is not None:
                out[f"{name}.{attr}" if name else attr] = param
    return out
