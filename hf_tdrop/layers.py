"""The patched-layer family: one subclass per supported layer type (``nn.Linear``, transformers'
``Conv1D``, ``nn.Conv1d/2d/3d``), shared by every training method.

Patching swaps a layer's ``__class__`` for the matching subclass below, in place: the module keeps
its own Parameter objects (so optimizers, tied weights and accelerate hooks still hold the right
tensors), its ``state_dict`` keys and tensors are unchanged (apart from a method's own extra
tensors), and the classes are defined at import time, so patched models pickle and deep-copy.
:func:`unpatch_layer` swaps the original class back.

A patched layer's forward asks its method handler (``layer.tdrop_method.handler``, see
:mod:`hf_tdrop.methods.base`) for the output. The layer family gives the handler the layer-type
specific building blocks, so a handler never branches on the layer type:

* :meth:`PatchedLayerMixin.original_forward`: the original class's forward, unchanged;
* :meth:`PatchedLayerMixin.compute`: the original computation with a given weight and bias;
* :meth:`PatchedLayerMixin.masked_weight_forward`: the computation with the weight masked by a
  compact bool ``drop`` mask, keeping only that mask for backward (:class:`MaskedLinearFunction`);
* :meth:`PatchedLayerMixin.scale_units` / :meth:`PatchedLayerMixin.drop_units`: every output unit
  (or channel) multiplied by a value, or zeroed by a bool mask;
  :meth:`PatchedLayerMixin.unit_masked_forward`: the original forward with units zeroed, keeping
  only the ``[n_out]`` mask for backward (:class:`UnitMaskedLinearFunction`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import masking
from .constants import METHOD_ATTR, STATE_ATTR
from .tracking import HELD_ZEROS, held_zeros, optimizer_steps

__all__ = [
    "HELD_ZEROS", "METHOD_ATTR", "PATCHED_CLASSES", "STATE_ATTR", "SUPPORTED_LAYERS", "MaskedLinearFunction",
    "PatchedConv1D", "PatchedConv1d", "PatchedConv2d", "PatchedConv3d", "PatchedLayerMixin", "PatchedLinear",
    "UnitMaskedLinearFunction",
    "check_materialized", "held_zeros", "is_patched_layer", "keep_multiplier", "layer_type_name",
    "optimizer_steps", "patch_layer", "patch_state", "unpatch_layer", "weight_layout",
]


def check_materialized(module: nn.Module, name: str, action: str) -> None:
    """Raise ``ValueError`` if ``module``'s weight or bias is on the meta device (shapes without
    values): targeting and pruning rank the weights by their values. The message names the layer
    (``name``) and how to materialise the model."""
    for attr in ("weight", "bias"):
        tensor = getattr(module, attr, None)
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise ValueError(
                f"{action}: layer {name or '<model itself>'!r} ({layer_type_name(module)}) has its {attr} on the "
                "meta device (a shape without values), and targeted dropout and pruning rank weights by their "
                "values. Materialise the model first: `model.to_empty(device=...)` and then load the "
                "weights (`model.load_state_dict(...)`), or load the model with `from_pretrained(...)`."
            )


def keep_multiplier(drop: torch.Tensor) -> torch.Tensor:
    """``1`` where kept, ``0`` where dropped: ``uint8``, the bytes of ``~drop``. Multiplying a float
    tensor by it gives that tensor's dtype, the same values and the same (zero) gradient for
    dropped entries as ``masked_fill``/``where`` with the bool mask, several times faster on CPU,
    and faster than converting the mask to the float dtype first (no float copy of the mask)."""
    return (~drop).view(torch.uint8)


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


class UnitMaskedLinearFunction(torch.autograd.Function):
    """The layer's linear map with the output units where ``drop [n_out]`` is True zeroed, the
    values of ``original forward * keep`` exactly. The output is masked in place inside the function
    (no second activation-sized tensor, no autograd node for the multiply) and only the ``[n_out]``
    bool mask is kept for backward, where the incoming gradient is masked once.

    ``in_out=False``: ``F.linear(input, weight [out, in], bias)`` (``nn.Linear``). ``in_out=True``:
    transformers' ``Conv1D`` with its ``[in, out]`` weight, computed as ``Conv1D.forward`` computes
    it (``addmm`` on the flattened input); its weight gradient is produced in that layout.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, drop, in_out):
        ctx.save_for_backward(input, weight, drop)
        ctx.has_bias = bias is not None
        ctx.in_out = in_out
        if in_out:
            size_out = input.size()[:-1] + (weight.shape[1],)
            x2d = input.view(-1, input.size(-1))
            out = (x2d @ weight if bias is None else torch.addmm(bias, x2d, weight)).view(size_out)
        else:
            out = F.linear(input, weight, bias)
        return out.mul_((~drop).to(out.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, drop = ctx.saved_tensors
        dtype = grad_out.dtype
        grad = grad_out * (~drop).to(dtype)
        grad_input = grad_weight = grad_bias = None
        w = weight.to(dtype)
        if ctx.needs_input_grad[0]:
            grad_input = (grad @ (w.t() if ctx.in_out else w)).to(input.dtype)
        g2d = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            x2d = input.reshape(-1, input.shape[-1]).to(dtype)
            grad_weight = (x2d.t() @ g2d if ctx.in_out else g2d.t() @ x2d).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2d.sum(0)
        return grad_input, grad_weight, grad_bias, None, None


class PatchedLayerMixin:
    """Forward of a patched layer: its method handler's ``forward(layer, input)``, plus the
    layer-type specific operations handlers build on."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's own name
        return self.__dict__[METHOD_ATTR].handler.forward(self, input)

    @property
    def tdrop_state(self):
        """The method's per-layer settings (``layer.tdrop_method.config``; for targeted dropout its
        ``TargetingState``)."""
        return self.__dict__[METHOD_ATTR].config

    def original_forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """The original layer class's forward, unchanged."""
        return super().forward(input)

    def compute(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: A002
        """The original layer's computation with the given ``weight`` (the layer's own shape and
        layout) and ``bias``."""
        raise NotImplementedError

    def masked_weight_forward(self, input: torch.Tensor, drop: torch.Tensor,  # noqa: A002
                              scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The computation with ``weight * ~drop`` (``drop``: bool, the weight's shape), times
        ``scale`` (a 0-d tensor) if given; only the bool mask is kept for backward where the layer
        type allows (Linear, Conv1D)."""
        raise NotImplementedError

    def unit_shape(self, out: torch.Tensor) -> list[int]:
        """The view that broadcasts an ``[n_out]`` tensor against the layer's output."""
        return [-1]  # output units on the last dimension (Linear, Conv1D)

    def scale_units(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out`` with every output unit ``o`` multiplied by ``values[o]`` (out of place)."""
        return out * values.view(self.unit_shape(out)).to(out.dtype)

    def drop_units(self, out: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """``out`` with the output units where ``drop [n_out]`` is True zeroed (out of place: for N-D
        inputs the layer's output is a view, and an in-place multiply of a view makes autograd
        rebuild the base in backward)."""
        return out * keep_multiplier(drop).view(self.unit_shape(out))

    def unit_masked_forward(self, input: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """The original forward with the output units where ``drop [n_out]`` is True zeroed: the
        values of ``drop_units(original_forward(input), drop)``; Linear and Conv1D mask their
        output in place and keep only the ``[n_out]`` mask for backward
        (:class:`UnitMaskedLinearFunction`)."""
        return self.drop_units(self.original_forward(input), drop)


class PatchedLinear(PatchedLayerMixin, nn.Linear):
    def compute(self, input, weight, bias):  # noqa: A002
        return F.linear(input, weight, bias)

    def masked_weight_forward(self, input, drop, scale=None):  # noqa: A002
        weight = self.weight if scale is None else self.weight * scale
        return MaskedLinearFunction.apply(input, weight, self.bias, drop)

    def unit_masked_forward(self, input, drop):  # noqa: A002
        return UnitMaskedLinearFunction.apply(input, self.weight, self.bias, drop, False)


class PatchedConv1D(PatchedLayerMixin, Conv1D):
    def compute(self, input, weight, bias):  # noqa: A002 - weight [in, out]
        size_out = input.size()[:-1] + (weight.shape[1],)
        x = input.reshape(-1, input.size(-1))
        out = x @ weight if bias is None else torch.addmm(bias, x, weight)
        return out.view(size_out)

    def masked_weight_forward(self, input, drop, scale=None):  # noqa: A002
        weight = self.weight if scale is None else self.weight * scale
        return MaskedLinearFunction.apply(input, weight.t(), self.bias, drop.t())

    def unit_masked_forward(self, input, drop):  # noqa: A002
        return UnitMaskedLinearFunction.apply(input, self.weight, self.bias, drop, True)


class _PatchedConvNd(PatchedLayerMixin):
    def compute(self, input, weight, bias):  # noqa: A002
        return self._conv_forward(input, weight, bias)

    def masked_weight_forward(self, input, drop, scale=None):  # noqa: A002
        weight = self.weight * keep_multiplier(drop)
        if scale is not None:
            weight = weight * scale
        return self._conv_forward(input, weight, self.bias)

    def unit_shape(self, out):
        return [1, -1] + [1] * (out.dim() - 2)  # channels on dim 1


class PatchedConv1d(_PatchedConvNd, nn.Conv1d):
    pass


class PatchedConv2d(_PatchedConvNd, nn.Conv2d):
    pass


class PatchedConv3d(_PatchedConvNd, nn.Conv3d):
    pass


SUPPORTED_LAYERS: dict[type, tuple[type, str]] = {
    nn.Linear: (PatchedLinear, masking.LAYOUT_OUT_IN),
    Conv1D: (PatchedConv1D, masking.LAYOUT_IN_OUT),
    nn.Conv1d: (PatchedConv1d, masking.LAYOUT_OUT_IN),
    nn.Conv2d: (PatchedConv2d, masking.LAYOUT_OUT_IN),
    nn.Conv3d: (PatchedConv3d, masking.LAYOUT_OUT_IN),
}
"""Exact layer type -> (patched class, weight layout). Subclasses are not patched: their forward
may differ from the base class's."""

PATCHED_CLASSES = tuple(cls for cls, _ in SUPPORTED_LAYERS.values())


def weight_layout(module: nn.Module) -> Optional[str]:
    """Layout of a supported (patched or not) layer's weight, or None for any other module."""
    state = module.__dict__.get(METHOD_ATTR)
    if state is not None:
        return state.layout
    entry = SUPPORTED_LAYERS.get(type(module))
    return entry[1] if entry else None


def is_patched_layer(module: nn.Module) -> bool:
    """True for a layer patched with a training method (targeted dropout or another)."""
    return METHOD_ATTR in module.__dict__


def patch_state(module: nn.Module):
    """The per-layer state of a patched layer (``layer.tdrop_method``: a
    :class:`hf_tdrop.methods.base.MethodState` with ``config``, ``handler``, ``layout``,
    ``original_class`` and ``name``)."""
    return module.__dict__[METHOD_ATTR]


def layer_type_name(module: nn.Module) -> str:
    """Class name of a supported layer: the original class for a patched one."""
    state = module.__dict__.get(METHOD_ATTR)
    return (state.original_class if state is not None else type(module)).__name__


def patch_layer(module: nn.Module, state) -> None:
    """Swap ``module`` (an exact instance of a supported type) to its patched class, with ``state``
    (a ``MethodState``; its ``layout`` and ``original_class`` are filled in here) as
    ``layer.tdrop_method``."""
    patched_cls, layout = SUPPORTED_LAYERS[type(module)]
    state.layout = layout
    state.original_class = type(module)
    setattr(module, METHOD_ATTR, state)
    module.__class__ = patched_cls


def unpatch_layer(module: nn.Module) -> None:
    """Give a patched layer back its original class and drop its per-layer state (its extra
    tensors, if any, must have been removed by then)."""
    state = module.__dict__[METHOD_ATTR]
    module.__class__ = state.original_class
    delattr(module, METHOD_ATTR)
