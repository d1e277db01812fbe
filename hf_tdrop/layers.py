"""Targeted-dropout versions of the supported layer types.

Patching swaps a layer's ``__class__`` for the matching subclass below, in place: the module keeps
its own Parameter objects (so optimizers, tied weights and accelerate hooks still hold the right
tensors), its ``state_dict`` keys and tensors are unchanged, and the classes are defined at import
time, so patched models pickle and deep-copy. ``unpatch`` swaps the original class back.

The per-layer settings live in one :class:`TargetingState` attribute. Mask selection and sampling
run inside :func:`sample_drop_mask`, which ``torch.compile`` does not trace
(``torch.compiler.disable``): α and γ can change at every step without recompiling the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import masking

STATE_ATTR = "tdrop_state"


@dataclass
class TargetingState:
    """Targeted-dropout settings of one patched layer (not part of the ``state_dict``)."""

    mode: str
    alpha: float
    gamma: float
    layout: str
    rescale: bool = False
    drop_targeted_at_eval: bool = False
    original_class: Optional[type] = None

    def as_dict(self) -> dict:
        return {"mode": self.mode, "alpha": self.alpha, "gamma": self.gamma}


@torch.compiler.disable
def sample_drop_mask(module: nn.Module, sample: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Which elements of a patched ``module`` to drop in this forward pass.

    Args:
        module: a patched layer.
        sample: True in training: drop each targeted element with probability α (a fresh draw from
            torch's RNG). False: drop the whole targeted set (the reference code's evaluation).

    Returns:
        ``(drop, scale)``: ``drop`` is bool, True = zero it; in weight mode it has the weight's
        shape, in unit mode it is ``[n_out]``. ``scale`` is a 0-d tensor ``1 / (1 - γα)`` when the
        layer rescales while sampling, else None.

    ``torch.compile`` does not trace this function (selection needs a data-independent ``k``, and α/γ
    change during a schedule): the compiled graph only sees the returned tensors, whose kind never
    changes, so moving α or γ never triggers a recompilation.
    """
    state: TargetingState = getattr(module, STATE_ATTR)
    weight = module.weight
    alpha = state.alpha if sample else 1.0
    w2d = masking.unit_matrix(weight, state.layout)
    if state.mode == "weight":
        targeted = masking.targeted_weights(w2d, state.gamma)
        drop = masking.to_weight_layout(masking.sample_drop(targeted, alpha), weight, state.layout)
    else:
        drop = masking.sample_drop(masking.targeted_units(w2d, state.gamma), alpha)
    scale = None
    if sample and state.rescale:
        kept = 1.0 - state.gamma * alpha
        scale = torch.tensor(1.0 / kept if kept > 0.0 else 1.0, dtype=weight.dtype, device=weight.device)
    return drop, scale


def masked_parameters(module: nn.Module, sample: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of a patched ``module`` for one forward pass, in the module's own shapes.

    Dropped entries are exact zeros and get zero gradient (``masked_fill`` saves only the bool
    mask for backward); kept entries are the parameters (times ``1/(1-γα)`` with ``rescale``).
    In unit mode a dropped unit loses its whole w_o and its bias.
    """
    state: TargetingState = getattr(module, STATE_ATTR)
    drop, scale = sample_drop_mask(module, sample)
    bias = module.bias
    if state.mode == "weight":
        weight = module.weight.masked_fill(drop, 0.0)
    else:
        shape = [1] * module.weight.dim()
        shape[1 if state.layout == masking.LAYOUT_IN_OUT else 0] = -1
        weight = module.weight.masked_fill(drop.view(shape), 0.0)
        if bias is not None:
            bias = bias.masked_fill(drop, 0.0)
    if scale is not None:
        weight = weight * scale
    return weight, bias


class TargetedDropoutMixin:
    """Forward of a patched layer: the original computation with the masked weight and bias.

    In ``eval()`` (and unless ``drop_targeted_at_eval``) it calls the original forward unchanged.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own name
        state: TargetingState = getattr(self, STATE_ATTR)
        if not self.training and not state.drop_targeted_at_eval:
            return super().forward(input)
        weight, bias = masked_parameters(self, sample=self.training)
        return self._forward_with(input, weight, bias)


class TargetedDropoutLinear(TargetedDropoutMixin, nn.Linear):
    def _forward_with(self, input, weight, bias):
        return F.linear(input, weight, bias)


class TargetedDropoutConv1D(TargetedDropoutMixin, Conv1D):
    def _forward_with(self, input, weight, bias):
        size_out = input.size()[:-1] + (self.nf,)
        out = torch.addmm(bias, input.view(-1, input.size(-1)), weight)
        return out.view(size_out)


class TargetedDropoutConv1d(TargetedDropoutMixin, nn.Conv1d):
    def _forward_with(self, input, weight, bias):
        return self._conv_forward(input, weight, bias)


class TargetedDropoutConv2d(TargetedDropoutMixin, nn.Conv2d):
    def _forward_with(self, input, weight, bias):
        return self._conv_forward(input, weight, bias)


class TargetedDropoutConv3d(TargetedDropoutMixin, nn.Conv3d):
    def _forward_with(self, input, weight, bias):
        return self._conv_forward(input, weight, bias)


SUPPORTED_LAYERS: dict[type, tuple[type, str]] = {
    nn.Linear: (TargetedDropoutLinear, masking.LAYOUT_OUT_IN),
    Conv1D: (TargetedDropoutConv1D, masking.LAYOUT_IN_OUT),
    nn.Conv1d: (TargetedDropoutConv1d, masking.LAYOUT_OUT_IN),
    nn.Conv2d: (TargetedDropoutConv2d, masking.LAYOUT_OUT_IN),
    nn.Conv3d: (TargetedDropoutConv3d, masking.LAYOUT_OUT_IN),
}
"""Exact layer type -> (patched class, weight layout). Subclasses are not patched: their forward
may differ from the base class's."""

PATCHED_CLASSES = tuple(cls for cls, _ in SUPPORTED_LAYERS.values())


def weight_layout(module: nn.Module) -> Optional[str]:
    """Layout of a supported (patched or not) layer's weight, or None for any other module."""
    if isinstance(module, PATCHED_CLASSES):
        return getattr(module, STATE_ATTR).layout
    entry = SUPPORTED_LAYERS.get(type(module))
    return entry[1] if entry else None


def is_patched_layer(module: nn.Module) -> bool:
    return isinstance(module, PATCHED_CLASSES) and hasattr(module, STATE_ATTR)


def patch_layer(module: nn.Module, state: TargetingState) -> None:
    """Swap ``module`` (an exact instance of a supported type) to its targeted-dropout class."""
    patched_cls, layout = SUPPORTED_LAYERS[type(module)]
    state.layout = layout
    state.original_class = type(module)
    setattr(module, STATE_ATTR, state)
    module.__class__ = patched_cls


def unpatch_layer(module: nn.Module) -> None:
    """Give a patched layer back its original class; its parameters were never touched."""
    state: TargetingState = getattr(module, STATE_ATTR)
    module.__class__ = state.original_class
    delattr(module, STATE_ATTR)
