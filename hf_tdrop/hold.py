"""Fine-tune a pruned model with its pruned weights held at exactly zero.

:func:`hold_pruned` records which entries of the targeted layers are zero (after
:func:`hf_tdrop.prune_model`, any mode and method) and keeps them zero through further training:

* a gradient hook on each held Parameter zeroes the gradient of its held entries before it is
  accumulated, so gradient accumulation, gradient clipping norms, DDP's all-reduce and optimizer
  statistics only ever see zeros there;
* a global ``torch.optim`` step post-hook (``register_optimizer_step_post_hook``), after every
  ``step()`` of any ``torch.optim.Optimizer`` holding a held Parameter (for-loop, foreach and fused
  implementations, under a ``GradScaler``, inside accelerate's or the Trainer's wrappers), writes
  zeros into the held entries of the Parameter and of every floating-point optimizer state tensor
  of the Parameter's shape (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...), so neither stale
  momentum nor weight decay can move them, and releasing the hold later resumes from zero state.

Nothing is added to the modules: no parametrization, no buffer, no new ``state_dict`` key, no class
swap; ``save_pretrained`` writes a plain checkpoint and ``torch.compile`` sees unchanged modules.
The hold follows the Parameter objects (``model.to(device)`` keeps them; the masks follow the
device); a deep copy of the model is not held. Optimizers that keep their own copy of the weights
(DeepSpeed ZeRO, FSDP's flat parameters) are not covered.

Sharded parameters (``torch.distributed.tensor.DTensor``, as FSDP2's ``fully_shard`` and tensor
parallelism make them) are refused: the optimizer steps the shards, while the forward sees a gathered
copy of the weight that the hold does not track, so neither the gradient masking nor targeting among
the survivors would apply. :func:`hold_pruned` on such a model raises ``ValueError``; a model
sharded after :func:`hold_pruned` (its held Parameters replaced by DTensors) raises ``RuntimeError``
at the next optimizer step (and from :meth:`PrunedHold.nonzero_held` / :meth:`PrunedHold.reapply`)
instead of silently training the pruned entries.

With targeted dropout on the same layers (:func:`hf_tdrop.patch_model`), held entries are never
targeted and the targeted set is computed among the surviving weights: weight mode targets
``floor(γ s_o)`` of the ``s_o`` surviving entries of each w_o, unit mode ``floor(γ s)`` of the ``s``
units not entirely held, nm mode counts each held entry as one of its group's ``m - n``. A second
:func:`hf_tdrop.prune_model` ranks the held zeros first, so its ``sparsity`` is the total fraction
(first round included).
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import masking
from .layers import check_materialized, weight_layout
from .pruning import PruneReport
from .targets import select_layers
from .tracking import HELD_ZEROS

_HOLDS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Parameter -> {hold id: bool mask}; the union of a Parameter's masks is ``layers.HELD_ZEROS[param]``."""
_LIVE: dict[int, "PrunedHold"] = {}
"""Holds not yet removed, by id."""
_step_hook = None


@dataclass
class _HeldTensor:
    """One held Parameter of one hold."""

    name: str  # "<layer>.weight" / "<layer>.bias"
    param: "weakref.ref[torch.Tensor]"
    mask: torch.Tensor  # bool, the Parameter's shape
    grad_hook: Any = None  # RemovableHandle of the gradient hook, or None (frozen Parameter)
    module: Optional["weakref.ref[nn.Module]"] = None  # the layer owning the Parameter ...
    attr: str = ""  # ... as this attribute ("weight" / "bias")

    def mask_on(self, device: torch.device) -> torch.Tensor:
        if self.mask.device != device:
            self.mask = self.mask.to(device)
        return self.mask


def _mask_grad(entry: _HeldTensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(entry.mask_on(grad.device), 0)


def _is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallelism). Free
    when nothing imported DTensor: then no tensor can be one."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)


_SHARDED_HINT = (
    "hold_pruned does not support sharded parameters: the optimizer updates the shards while the forward "
    "uses a gathered copy of the weight that the hold does not track. Fine-tune with held zeros in one "
    "process or under DDP (both supported), or without hold_pruned.")


def _check_not_sharded(entries: list["_HeldTensor"]) -> None:
    """Raise ``RuntimeError`` if a held Parameter was replaced by a DTensor after :func:`hold_pruned`
    (e.g. the model was passed to FSDP2's ``fully_shard``): the hold would silently stop working."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    for entry in entries:
        module = entry.module() if entry.module is not None else None
        if module is not None and _is_dtensor(getattr(module, entry.attr, None)):
            raise RuntimeError(
                f"hold_pruned: {entry.name} was sharded after the hold was made (it is now a DTensor, e.g. "
                f"from FSDP2's fully_shard), so its held entries are no longer kept at zero. {_SHARDED_HINT}")


def _union_mask(param: torch.Tensor) -> Optional[torch.Tensor]:
    masks = list(_HOLDS.get(param, {}).values())
    if not masks:
        return None
    union = masks[0].to(param.device)
    for other in masks[1:]:
        union = union | other.to(param.device)
    return union


def _refresh_union(param: torch.Tensor) -> None:
    union = _union_mask(param)
    if union is None:
        HELD_ZEROS.pop(param, None)
        _HOLDS.pop(param, None)
    else:
        HELD_ZEROS[param] = union


def _zero_held(param: torch.Tensor, mask: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Zero the held entries of ``param`` and of its optimizer state tensors of the same shape."""
    if mask.shape != param.shape:
        raise RuntimeError(
            f"hold_pruned: a held Parameter changed shape from {tuple(mask.shape)} to {tuple(param.shape)} "
            "(e.g. by shrink_model); remove the hold (handle.remove() or release_pruned(model)) before reshaping.")
    param.masked_fill_(mask, 0)
    if optimizer is not None:
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point():
                value.masked_fill_(mask, 0)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    if _LIVE:
        for hold in list(_LIVE.values()):
            _check_not_sharded(hold._entries)
    if not HELD_ZEROS:
        return
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                mask = HELD_ZEROS.get(param)
                if mask is not None:
                    if mask.device != param.device:  # the model moved after hold_pruned
                        mask = HELD_ZEROS[param] = mask.to(param.device)
                    _zero_held(param, mask, optimizer)


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


class PrunedHold:
    """Handle of :func:`hold_pruned`: the held entries stay zero until :meth:`remove`.

    Also a context manager (``with hold_pruned(model): train()`` removes the hold on exit).

    Attributes:
        layers: ``{layer name: held entries}`` (weight and bias entries together), in model order.
    """

    def __init__(self, entries: list[_HeldTensor], layers: dict[str, int]):
        self._entries = entries
        self.layers = layers
        self._active = True

    @property
    def active(self) -> bool:
        """False once :meth:`remove` (or :func:`release_pruned`) released the hold."""
        return self._active

    @property
    def n_held(self) -> int:
        """Entries held at zero, over all layers."""
        return sum(self.layers.values())

    def masks(self) -> dict[str, torch.Tensor]:
        """``{"<layer>.weight" / "<layer>.bias": bool mask}`` (True = held at zero), in the Parameters' shapes."""
        return {entry.name: entry.mask for entry in self._entries}

    def nonzero_held(self) -> int:
        """Held entries that are not zero right now (0 while the hold works; a Parameter written
        from outside, e.g. by ``load_state_dict``, shows here until the next optimizer step or
        :meth:`reapply`).

        Raises:
            RuntimeError: a held Parameter was sharded (replaced by a DTensor) after the hold was made.
        """
        _check_not_sharded(self._entries)
        total = 0
        for entry in self._entries:
            param = entry.param()
            if param is not None:
                total += int((param.detach()[entry.mask_on(param.device)] != 0).sum())
        return total

    def reapply(self) -> None:
        """Write zeros into the held entries now (optimizer state is zeroed at the next step).

        Raises:
            RuntimeError: a held Parameter was sharded (replaced by a DTensor) after the hold was made.
        """
        _check_not_sharded(self._entries)
        with torch.no_grad():
            for entry in self._entries:
                param = entry.param()
                if param is not None:
                    _zero_held(param, entry.mask_on(param.device))

    def remove(self) -> None:
        """Release the hold: training moves the entries again (from zero, with zero optimizer state).
        Idempotent."""
        if not self._active:
            return
        self._active = False
        _LIVE.pop(id(self), None)
        for entry in self._entries:
            if entry.grad_hook is not None:
                entry.grad_hook.remove()
            param = entry.param()
            if param is not None and param in _HOLDS:
                _HOLDS[param].pop(id(self), None)
                _refresh_union(param)

    def __enter__(self) -> "PrunedHold":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"PrunedHold({state}, {self.n_held} entries held in {len(self.layers)} layers)"


def _check_mask(name: str, mask: Any, weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"`masks[{name!r}]` must be a bool tensor of the weight's shape {tuple(weight.shape)} "
                         f"(True = hold at zero), got {got}.")
    return mask.detach().to(weight.device).clone()


def _layers_to_hold(model: nn.Module, prune_report: Any, target_modules, exclude_modules,
                    masks: Any) -> list[tuple[str, nn.Module, Optional[torch.Tensor]]]:
    if prune_report is not None and not isinstance(prune_report, PruneReport):
        raise ValueError(f"`prune_report` must be None or a PruneReport (from prune_model), got {type(prune_report).__name__}.")
    if masks is not None and not isinstance(masks, Mapping):
        raise ValueError(f"`masks` must be None or a dict {{layer name: bool mask}}, got {type(masks).__name__}.")
    sources = [n for n, v in (("prune_report", prune_report), ("masks", masks)) if v is not None]
    if target_modules is not None or exclude_modules is not None:
        sources.append("target_modules/exclude_modules")
    if len(sources) > 1:
        raise ValueError(f"Give one way of choosing the layers to hold, got {sources}.")
    if prune_report is None and masks is None:
        return [(name, module, None) for name, module in select_layers(model, target_modules, exclude_modules)]
    modules = dict(model.named_modules())
    names = [layer.name for layer in prune_report.layers] if prune_report is not None else list(masks)
    if not names:
        raise ValueError(f"`{sources[0]}` names no layer.")
    out = []
    for name in names:
        module = modules.get(name)
        if module is None or weight_layout(module) is None:
            what = "no module" if module is None else f"a {type(module).__name__}, not a supported layer"
            raise ValueError(f"`{sources[0]}` names layer {name!r}, but the model has {what} there.")
        out.append((name, module, None if masks is None else _check_mask(name, masks[name], module.weight)))
    return out


def hold_pruned(model: nn.Module, prune_report: Any = None, *, target_modules=None, exclude_modules=None,
                masks: Optional[Mapping[str, torch.Tensor]] = None) -> PrunedHold:
    """Keep the pruned (zero) weights of ``model`` exactly zero through further training.

    The held entries are, per layer, the weight entries that are zero now (or ``masks[name]``), plus
    the bias entries of output units whose whole w_o is held and whose bias is zero now (what unit
    pruning zeroes). See the module docstring for the mechanism; it works with plain loops,
    ``Trainer`` (no callback needed), accelerate, gradient accumulation, autocast / ``GradScaler``
    and DDP, and leaves the ``state_dict`` plain.

    Args:
        model: the pruned model (patched for targeted dropout or not).
        prune_report: the :class:`hf_tdrop.PruneReport` of the pruning: hold the zeros of its layers.
        target_modules, exclude_modules: otherwise, which layers, as in :func:`hf_tdrop.prune_model`
            (default: every supported layer but output heads and tied layers).
        masks: otherwise, ``{layer name: bool mask of its weight's shape}`` (True = hold at zero): hold
            these entries, and the bias entries of units whose whole w_o is masked, and zero them now.

    Returns:
        A :class:`PrunedHold`; ``handle.remove()`` (or :func:`release_pruned`) releases it.

    Not for sharded models: a model with a ``DTensor`` parameter (FSDP2's ``fully_shard``, tensor
    parallelism) is refused, and sharding the model after the hold makes the next optimizer
    step raise ``RuntimeError`` (see the module docstring).

    Raises:
        ValueError: ``model`` is not a module, more than one of ``prune_report`` / ``masks`` /
            patterns given, a name that is not a supported layer of ``model``, a bad mask, no layer
            matched, a layer on the meta device, or a sharded model (a DTensor parameter). Nothing
            is held or changed then.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    sharded = next((name for name, p in model.named_parameters() if _is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(f"hold_pruned: the model is sharded ({sharded!r} is a DTensor, e.g. from FSDP2's "
                         f"fully_shard or tensor parallelism). {_SHARDED_HINT}")
    chosen = _layers_to_hold(model, prune_report, target_modules, exclude_modules, masks)
    plans: list[tuple[str, torch.Tensor, torch.Tensor, nn.Module, str]] = []  # (entry name, param, mask, layer, attr)
    layers: dict[str, int] = {}
    with torch.no_grad():
        for name, module, given in chosen:
            check_materialized(module, name, "hold_pruned")
            weight = module.weight
            mask = (weight == 0) if given is None else given
            prefix = f"{name}." if name else ""
            count = int(mask.sum())
            if count:
                plans.append((prefix + "weight", weight, mask, module, "weight"))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor) and count:
                dead_units = masking.unit_matrix(mask, weight_layout(module)).all(dim=1)
                bias_mask = dead_units & (bias == 0) if given is None else dead_units
                if bias_mask.any():
                    plans.append((prefix + "bias", bias, bias_mask.clone(), module, "bias"))
                    count += int(bias_mask.sum())
            layers[name] = count
    _ensure_step_hook()
    hold = PrunedHold([], layers)
    with torch.no_grad():
        for entry_name, param, mask, module, attr in plans:
            _zero_held(param, mask)
            if param.grad is not None:
                param.grad.masked_fill_(mask.to(param.grad.device), 0)
            entry = _HeldTensor(entry_name, weakref.ref(param), mask, module=weakref.ref(module), attr=attr)
            if param.requires_grad:
                entry.grad_hook = param.register_hook(functools.partial(_mask_grad, entry))
            hold._entries.append(entry)
            _HOLDS.setdefault(param, {})[id(hold)] = mask
            _refresh_union(param)
    _LIVE[id(hold)] = hold
    return hold


def release_pruned(model: nn.Module) -> int:
    """Remove every active hold on any Parameter of ``model``; returns how many holds were removed."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    ids = set()
    for param in model.parameters():
        ids.update(_HOLDS.get(param, {}))
    removed = 0
    for hold_id in ids:
        hold = _LIVE.get(hold_id)
        if hold is not None:
            hold.remove()
            removed += 1
    return removed


def held_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of every Parameter of ``model`` with held entries (the union
    over its holds), e.g. to check the zeros after training."""
    return {name: HELD_ZEROS[p] for name, p in model.named_parameters() if p in HELD_ZEROS}
