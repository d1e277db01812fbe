"""Targeted-dropout versions of the supported layer types.

Patching swaps a layer's ``__class__`` for the matching subclass below, in place: the module keeps
its own Parameter objects (so optimizers, tied weights and accelerate hooks still hold the right
tensors), its ``state_dict`` keys and tensors are unchanged, and the classes are defined at import
time, so patched models pickle and deep-copy. ``unpatch`` swaps the original class back.

The per-layer settings live in one :class:`TargetingState` attribute. Mask selection and sampling
run inside :func:`sample_drop_mask`, which patched layers call through a lazily created
``torch.compiler.disable`` wrapper: ``torch.compile`` does not trace it, so α and γ can change at
every step without recompiling the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    refresh_every: int = 1
    original_class: Optional[type] = None
    # cache of the targeted set when refresh_every > 1: (weight._version, gamma, bool mask)
    cached_targeting: Optional[tuple] = field(default=None, repr=False, compare=False)
    # weight mode: where each row's threshold was at the last targeting (a hint that makes the next
    # exact selection cheaper; see masking.lowest_k_bracketed)
    threshold_bracket: Optional[masking.KthBracket] = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "alpha": self.alpha, "gamma": self.gamma}

    def __setstate__(self, state: dict) -> None:
        # a patched layer unpickled (or deep-copied) in a process that never called patch_model
        self.__dict__.update(state)
        _ensure_untraced_sample_drop_mask()


def targeted_set(module: nn.Module) -> torch.Tensor:
    """The current targeted set of a patched layer, on the ``[n_out, fan_in]`` view (weight mode)
    or ``[n_out]`` (unit mode). With ``refresh_every > 1`` it is reused until the weight has been
    updated in place ``refresh_every`` times (``Tensor._version``) or γ changed; the version only
    moves on optimizer steps, so a gradient-checkpointing recomputation sees the same set."""
    state: TargetingState = getattr(module, STATE_ATTR)
    weight = module.weight
    version = weight._version
    if state.refresh_every > 1 and state.cached_targeting is not None:
        cached_version, cached_gamma, cached = state.cached_targeting
        if cached_gamma == state.gamma and 0 <= version - cached_version < state.refresh_every:
            return cached
    w2d = masking.unit_matrix(weight, state.layout)
    if state.mode == "weight":
        targeted, state.threshold_bracket = masking.targeted_weights_bracketed(w2d, state.gamma, state.threshold_bracket)
    else:
        targeted = masking.targeted_units(w2d, state.gamma)
    if state.refresh_every > 1:
        state.cached_targeting = (version, state.gamma, targeted)
    return targeted


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

    Patched layers call it through :func:`_untraced_sample_drop_mask`, which ``torch.compile``
    does not trace (selection needs a data-independent ``k``, and α/γ change during a schedule):
    the compiled graph only sees the returned tensors, whose kind never changes, so moving α or γ
    never triggers a recompilation.
    """
    state: TargetingState = getattr(module, STATE_ATTR)
    weight = module.weight
    alpha = state.alpha if sample else 1.0
    targeted = targeted_set(module)
    if state.mode == "weight":
        # drawn in the weight's own layout (one random word per weight, in storage order), so the
        # draw and every mask op after it run on memory in order, also for Conv1D's [in, out]
        targeted = masking.to_weight_layout(targeted, weight, state.layout)
    drop = masking.sample_drop(targeted, alpha)
    scale = None
    if sample and state.rescale:
        kept = 1.0 - state.gamma * alpha
        scale = torch.tensor(1.0 / kept if kept > 0.0 else 1.0, dtype=weight.dtype, device=weight.device)
    return drop, scale


def keep_multiplier(drop: torch.Tensor) -> torch.Tensor:
    """``1`` where kept, ``0`` where dropped: ``uint8``, the bytes of ``~drop``. Multiplying a float
    tensor by it gives that tensor's dtype, the same values and the same (zero) gradient for
    dropped entries as ``masked_fill``/``where`` with the bool mask, several times faster on CPU,
    and faster than converting the mask to the float dtype first (no float copy of the mask)."""
    return (~drop).view(torch.uint8)


_untraced_sample_drop_mask = None
"""``torch.compiler.disable(sample_drop_mask)``, made by :func:`patch_layer` on first use: wrapping
at import time would import ``torch._dynamo`` (seconds) for every user of hf_tdrop, even those who
never patch (the CLI, pruning)."""


def _ensure_untraced_sample_drop_mask() -> None:
    global _untraced_sample_drop_mask
    if _untraced_sample_drop_mask is None:
        _untraced_sample_drop_mask = torch.compiler.disable(sample_drop_mask)


class MaskedLinearFunction(torch.autograd.Function):
    """``F.linear(input, weight * keep, bias)`` with ``keep = ~drop``, keeping only the compact bool
    ``drop`` mask for backward (not a masked copy of the weight): the masked weight is rebuilt in
    backward.

    Shapes: ``input [..., in]``, ``weight [out, in]`` (may be a transposed view), ``drop`` bool like
    ``weight``, ``bias [out]`` or None. Dropped weights get exactly zero gradient. Under autocast the
    forward runs in the autocast dtype and the backward in the gradient's dtype.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, drop):
        ctx.save_for_backward(input, weight, drop)
        ctx.has_bias = bias is not None
        return F.linear(input, weight * keep_multiplier(drop), bias)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, drop = ctx.saved_tensors
        dtype = grad_out.dtype
        keep = keep_multiplier(drop)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_out @ (weight * keep).to(dtype)).to(input.dtype)
        if ctx.needs_input_grad[1]:
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            x2d = input.reshape(-1, input.shape[-1]).to(dtype)
            if not weight.is_contiguous() and weight.t().is_contiguous():
                # a transposed view (Conv1D's [in, out] weight): produce the gradient in the
                # parameter's own layout, so neither the mask nor autograd has to transpose it
                grad_weight = (x2d.t() @ g2d).to(weight.dtype).mul_(keep.t()).t()
            else:
                grad_weight = (g2d.t() @ x2d).to(weight.dtype).mul_(keep)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias, None


class TargetedDropoutMixin:
    """Forward of a patched layer.

    - ``eval()`` (unless ``drop_targeted_at_eval``): the original forward, unchanged.
    - Unit mode: the original forward, then the dropped output units are zeroed (equivalent to
      zeroing their w_o and bias; only an ``[n_out]`` mask is kept for backward).
    - Weight mode: the layer's computation with the masked weight (:meth:`_weight_masked_forward`).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own name
        state: TargetingState = getattr(self, STATE_ATTR)
        if not self.training and not state.drop_targeted_at_eval:
            return super().forward(input)
        drop, scale = _untraced_sample_drop_mask(self, sample=self.training)
        if state.mode == "unit":
            out = super().forward(input)
            # out of place on purpose: for N-D inputs the layer's output is a view, and an in-place
            # multiply of a view makes autograd rebuild the base (CopySlices) in backward
            out = out * keep_multiplier(drop).view(self._unit_shape(out))
        else:
            out = self._weight_masked_forward(input, drop, scale)
            scale = None  # applied to the weight already
        return out if scale is None else out * scale

    def _unit_shape(self, out: torch.Tensor) -> list[int]:
        return [-1]  # output units on the last dimension (Linear, Conv1D)


class TargetedDropoutLinear(TargetedDropoutMixin, nn.Linear):
    def _weight_masked_forward(self, input, drop, scale):
        weight = self.weight if scale is None else self.weight * scale
        return MaskedLinearFunction.apply(input, weight, self.bias, drop)


class TargetedDropoutConv1D(TargetedDropoutMixin, Conv1D):
    def _weight_masked_forward(self, input, drop, scale):
        weight = self.weight if scale is None else self.weight * scale
        return MaskedLinearFunction.apply(input, weight.t(), self.bias, drop.t())


class _TargetedDropoutConvNd(TargetedDropoutMixin):
    def _weight_masked_forward(self, input, drop, scale):
        weight = self.weight * keep_multiplier(drop)
        if scale is not None:
            weight = weight * scale
        return self._conv_forward(input, weight, self.bias)

    def _unit_shape(self, out):
        return [1, -1] + [1] * (out.dim() - 2)  # channels on dim 1


class TargetedDropoutConv1d(_TargetedDropoutConvNd, nn.Conv1d):
    pass


class TargetedDropoutConv2d(_TargetedDropoutConvNd, nn.Conv2d):
    pass


class TargetedDropoutConv3d(_TargetedDropoutConvNd, nn.Conv3d):
    pass


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
    _ensure_untraced_sample_drop_mask()
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
