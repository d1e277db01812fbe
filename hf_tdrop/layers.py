"""Targeted-dropout versions of the supported layer types.

Patching swaps a layer's ``__class__`` for the matching subclass below, in place: the module keeps
its own Parameter objects (so optimizers, tied weights and accelerate hooks still hold the right
tensors), its ``state_dict`` keys and tensors are unchanged, and the classes are defined at import
time, so patched models pickle and deep-copy. ``unpatch`` swaps the original class back.

The per-layer settings live in one :class:`TargetingState` attribute. Mask selection and sampling
run inside :func:`sample_drop_mask`, which patched layers call through a lazily created
``torch.compiler.disable`` wrapper: ``torch.compile`` does not trace it, so α and γ can change at
every step without recompiling the model.

With ``refresh_every > 1`` a layer reuses its targeted set for that many optimizer steps. The steps
are counted by a global ``torch.optim`` step hook (registered on first use), per weight tensor: a
step counts for a weight when the stepping optimizer holds it. This works for every
``torch.optim.Optimizer`` (for-loop, foreach and fused implementations alike, which update a weight
a different number of times per step) and is independent of how many forward passes run per step
(gradient accumulation, gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.pytorch_utils import Conv1D

from . import masking

STATE_ATTR = "tdrop_state"
METHOD_ATTR = "tdrop_method"
"""Attribute of a layer patched by another training method (:mod:`hf_tdrop.methods`): its
``MethodState``, which has the same ``layout`` / ``original_class`` / ``name`` fields."""


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
    n: int = 2  # nm mode: keep n of every m consecutive inputs
    m: int = 4
    original_class: Optional[type] = None
    name: str = field(default="", compare=False)  # the layer's dotted name in the patched model, for messages
    # the last targeted set: (optimizer step of the weight when it was computed (see
    # optimizer_steps), the weight's version counter and storage address then, gamma, held-zeros
    # mask it was computed with, bool mask)
    cached_targeting: Optional[tuple] = field(default=None, repr=False, compare=False)
    # weight mode: where each row's threshold was at the last targeting (a hint that makes the next
    # exact selection cheaper; see masking.lowest_k_bracketed)
    threshold_bracket: Optional[masking.KthBracket] = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        out = {"mode": self.mode, "alpha": self.alpha, "gamma": self.gamma}
        if self.mode == "nm":
            out.update(n=self.n, m=self.m)
        return out

    @property
    def targeted_fraction(self) -> float:
        """Nominal fraction of a row targeted at γ (``γ``; ``γ (m - n) / m`` in nm mode)."""
        return self.gamma * (self.m - self.n) / self.m if self.mode == "nm" else self.gamma

    def __setstate__(self, state: dict) -> None:
        # a patched layer unpickled (or deep-copied) in a process that never called patch_model
        self.__dict__.update(state)
        _ensure_untraced_sample_drop_mask()


def check_materialized(module: nn.Module, name: str, action: str) -> None:
    """Raise ``ValueError`` if ``module``'s weight or bias is on the meta device (shapes without
    values): targeting and pruning rank the weights by their values. The message names the layer
    (``name``) and how to materialise the model."""
    for attr in ("weight", "bias"):
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            state = getattr(module, STATE_ATTR, None)
            layer_type = (getattr(state, "original_class", None) or type(module)).__name__
            raise ValueError(
                f"{action}: layer {name or '<model itself>'!r} ({layer_type}) has its {attr} on the meta "
                "device (a shape without values), and targeted dropout and pruning rank weights by their "
                "values. Materialise the model first: `model.to_empty(device=...)` and then load the "
                "weights (`model.load_state_dict(...)`), or load the model with `from_pretrained(...)`."
            )


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
REUSE_WITHIN_STEP = True
"""Reuse a layer's targeted set between forward passes of one optimizer step when its weight did
not change (gradient accumulation). Only the step-overhead benchmark turns it off, to measure it."""


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
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    count = _weight_steps.get(weight)
    if count is None:
        count = _weight_steps[weight] = _StepCount(start=_all_optimizer_steps)
    return count.steps if count.held else _all_optimizer_steps - count.start


HELD_ZEROS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Weight tensor -> bool mask in the weight's shape, True = held at zero by
:func:`hf_tdrop.hold_pruned` (the union over its live holds; maintained by :mod:`hf_tdrop.hold`).
Targeting leaves these entries out (see :func:`targeted_set`)."""


def held_zeros(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The held-at-zero mask of ``weight`` (its shape, on its device), or None if nothing is held."""
    mask = HELD_ZEROS.get(weight) if HELD_ZEROS else None
    if mask is not None and mask.device != weight.device:
        mask = HELD_ZEROS[weight] = mask.to(weight.device)
    return mask


def targeted_set(module: nn.Module) -> torch.Tensor:
    """The current targeted set of a patched layer, on the ``[n_out, fan_in]`` view (weight and nm
    modes) or ``[n_out]`` (unit mode), computed from the detached weight (no autograd graph).

    Entries held at zero by :func:`hf_tdrop.hold_pruned` are left out: weight mode targets
    ``floor(γ s_o)`` of the ``s_o`` surviving entries of each w_o, unit mode ``floor(γ s)`` of the
    ``s`` units not entirely held, and nm mode counts a held entry as one of its group's ``m - n``.

    The set is computed once per optimizer step (:func:`optimizer_steps`) and reused by every
    forward pass of that step while the weight is unchanged (same version counter and storage): the
    micro-batches of gradient accumulation and the recomputation of gradient checkpointing see the
    same set, ranked once. Any in-place change of the weight (an optimizer step, ``copy_``,
    ``load_state_dict``, pruning) triggers a new ranking; a change made through ``weight.data``
    outside an optimizer step is not seen until the next step. With ``refresh_every > 1`` the set
    is kept for ``refresh_every`` optimizer steps (recomputed at steps 0, N, 2N, ...). Either way it
    is recomputed at once when γ or the held entries changed."""
    state: TargetingState = getattr(module, STATE_ATTR)
    weight = module.weight
    held = held_zeros(weight)
    step = optimizer_steps(weight)
    version = (weight._version, weight.data_ptr())
    if state.cached_targeting is not None:
        cached_step, cached_version, cached_gamma, cached_held, cached = state.cached_targeting
        if cached_gamma == state.gamma and cached_held is held:
            if state.refresh_every > 1 and 0 <= step - cached_step < state.refresh_every:
                return cached
            if REUSE_WITHIN_STEP and step == cached_step and version == cached_version:
                return cached
    w2d = masking.unit_matrix(weight.detach(), state.layout)
    held2d = None if held is None else masking.unit_matrix(held, state.layout)
    if state.mode == "weight":
        if held2d is None:
            targeted, state.threshold_bracket = masking.targeted_weights_bracketed(
                w2d, state.gamma, state.threshold_bracket)
        else:
            targeted, state.threshold_bracket = masking.targeted_weights_among_bracketed(
                w2d, state.gamma, held2d, state.threshold_bracket)
    elif state.mode == "nm":
        targeted = masking.targeted_nm(w2d, state.gamma, state.n, state.m, held=held2d)
    elif held2d is None:
        targeted = masking.targeted_units(w2d, state.gamma)
    else:
        targeted = masking.targeted_units_among(w2d, state.gamma, held2d.all(dim=1))
    state.cached_targeting = (step, version, state.gamma, held, targeted)
    return targeted


def sample_drop_mask(module: nn.Module, sample: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Which elements of a patched ``module`` to drop in this forward pass.

    Args:
        module: a patched layer.
        sample: True in training: drop each targeted element with probability α (a fresh draw from
            torch's RNG). False: drop the whole targeted set (the reference code's evaluation).

    Returns:
        ``(drop, scale)``: ``drop`` is bool, True = zero it, contiguous; in weight and nm modes it
        has the weight's shape, in unit mode it is ``[n_out]``. ``scale`` is a 0-d tensor
        ``1 / (1 - γα)`` (``1 / (1 - γα (m - n) / m)`` in nm mode) when the layer rescales while
        sampling, else None. Their dtype, shape and strides depend
        only on the layer (and on whether it samples and rescales), never on α or γ.

    Patched layers call it through :func:`_untraced_sample_drop_mask`, which ``torch.compile``
    does not trace (selection needs a data-independent ``k``, and α/γ change during a schedule):
    the compiled graph only sees the returned tensors, whose kind never changes, so moving α or γ
    never triggers a recompilation.
    """
    state: TargetingState = getattr(module, STATE_ATTR)
    check_materialized(module, state.name, "targeted dropout forward" if sample else "targeted dropout at eval")
    weight = module.weight
    alpha = state.alpha if sample else 1.0
    targeted = targeted_set(module)
    if state.mode != "unit":
        # drawn in the weight's own layout (one random word per weight, in storage order), so the
        # draw and every mask op after it run on memory in order, also for Conv1D's [in, out]
        targeted = masking.to_weight_layout(targeted, weight, state.layout)
    # contiguous whatever k is (an all-False/all-True selection and a partial one could otherwise
    # differ in strides, and the compiled graph would be re-specialised on them)
    drop = masking.sample_drop(targeted, alpha).contiguous()
    scale = None
    if sample and state.rescale:
        kept = 1.0 - state.targeted_fraction * alpha
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
    - Weight and nm modes: the layer's computation with the masked weight (:meth:`_weight_masked_forward`).
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
    method_state = module.__dict__.get(METHOD_ATTR)
    if method_state is not None:
        return method_state.layout
    entry = SUPPORTED_LAYERS.get(type(module))
    return entry[1] if entry else None


def is_patched_layer(module: nn.Module) -> bool:
    """True for a layer patched with targeted dropout or with another training method."""
    return (isinstance(module, PATCHED_CLASSES) and hasattr(module, STATE_ATTR)) or METHOD_ATTR in module.__dict__


def patch_state(module: nn.Module):
    """The per-layer state of a patched layer: its ``TargetingState`` (targeted dropout) or its
    ``MethodState`` (other methods); both have ``layout``, ``original_class`` and ``name``."""
    state = module.__dict__.get(METHOD_ATTR)
    return state if state is not None else getattr(module, STATE_ATTR)


def layer_type_name(module: nn.Module) -> str:
    """Class name of a supported layer: the original class for a patched one."""
    original = patch_state(module).original_class if is_patched_layer(module) else None
    return (original or type(module)).__name__


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
