"""Optimizers for models patched with a training method that has parameters of its own.

L0 gates (``log α``), variational dropout's ``log σ²`` and Smallify's switches are trained the way
their papers train them: with Adam at their own learning rate (each method's
``Method.optimizer_lr``, 1e-3 by default), without weight decay, in their own parameter group,
whatever optimizer trains the network's weights. Under plain SGD they barely move: the L0 penalty's
gradient per gate is ``λ / N`` times a sigmoid slope (about 1e-8 on CIFAR-10), so SGD at the
network's learning rate leaves ``log α`` where it started; Adam normalises the step.

:func:`method_optimizer` builds the optimizer for a ``Trainer`` (from its ``TrainingArguments``) or a
plain loop (from an optimizer class and its settings)::

    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      optimizers=(hf_tdrop.method_optimizer(model, args), None))

The learning-rate scheduler scales every group alike (warm-up and decay apply to the method groups
too, relative to their own learning rate).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from .constants import METHOD_ATTR
from .methods.base import method_layers

METHOD_GROUP_KEY = "tdrop_method"
"""Key of a parameter group that holds a method's own parameters (its value: the method's name)."""

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


def method_parameter_groups(model: nn.Module, lr: Optional[float] = None) -> list[dict]:
    """One Adam parameter group per patched method with parameters of its own.

    Args:
        model: a model patched with :func:`hf_tdrop.patch_model`.
        lr: learning rate of every method group (default: each method's ``optimizer_lr``).

    Returns:
        ``[{"params": [...], "lr": ..., "weight_decay": 0.0, "tdrop_method": name}, ...]`` in model
        order (empty when no patched method adds trainable parameters).
    """
    groups: dict[str, dict] = {}
    for _, module in method_layers(model):
        handler = getattr(module, METHOD_ATTR).handler
        for attr in handler.extra_tensors:
            param = module._parameters.get(attr)
            if param is None or not param.requires_grad:
                continue
            group = groups.setdefault(handler.name, {"params": [], "lr": handler.optimizer_lr if lr is None else lr,
                                                     "weight_decay": 0.0, METHOD_GROUP_KEY: handler.name})
            group["params"].append(param)
    if lr is not None and not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    return list(groups.values())


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (the network's own and Adam for the methods' parameters).

    ``param_groups`` is the concatenation of the inner optimizers' groups (the very same dicts), so
    learning-rate schedulers, gradient clipping and ``GradScaler`` see every group; ``state_dict`` /
    ``load_state_dict`` save and restore every inner optimizer (``Trainer`` checkpoints resume exactly).

    Args:
        optimizers: the inner optimizers; no parameter may be in two of them.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        if not self.optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in self.optimizers):
            raise ValueError("`optimizers` must be a non-empty list of torch.optim.Optimizer.")
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("`optimizers`: a parameter is in more than one optimizer.")
        super().__init__(params, {})
        self._sync_groups()

    def _sync_groups(self) -> None:
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        inner = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            raise ValueError(f"CombinedOptimizer.load_state_dict: expected a state_dict of {len(self.optimizers)} "
                             "optimizers (from CombinedOptimizer.state_dict), got another optimizer's.")
        for optimizer, state in zip(self.optimizers, inner):
            optimizer.load_state_dict(state)
        self._sync_groups()  # load_state_dict replaces the group dicts

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def _decay_parameter_names(model: nn.Module) -> set[str]:
    """The names ``Trainer`` weight-decays (``Trainer.get_decay_parameter_names``'s rule): not biases,
    not LayerNorm / RMSNorm parameters."""
    from transformers.trainer_pt_utils import get_parameter_names

    forbidden = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    return set(get_parameter_names(model, [nn.LayerNorm], forbidden))


def method_optimizer(model: nn.Module, args: Any = None, *, optimizer_cls: Optional[type] = None,
                     optimizer_kwargs: Optional[dict] = None, weight_decay: Optional[float] = None,
                     method_lr: Optional[float] = None) -> torch.optim.Optimizer:
    """The optimizer of a patched model: the network's parameters as ``Trainer`` would group them
    (weight decay on weights, none on biases and normalisation layers), the methods' own parameters in
    Adam groups of their own (:func:`method_parameter_groups`: their method's learning rate, no weight
    decay).

    Args:
        model: the (patched) model.
        args: ``transformers.TrainingArguments``: the network's optimizer, learning rate and weight
            decay are read from it (``optim``, ``optim_args``, ``learning_rate``, ``weight_decay``).
        optimizer_cls, optimizer_kwargs: instead of ``args``, the network's optimizer class and its
            settings (e.g. ``torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}``).
        weight_decay: weight decay of the network's weights (default: ``args.weight_decay``, else 0).
        method_lr: learning rate of every method group (default: each method's own).

    Returns:
        The network's optimizer when no method adds parameters; one Adam/AdamW optimizer with the
        method groups added when the network's optimizer is Adam/AdamW; else a
        :class:`CombinedOptimizer` of the network's optimizer and an Adam over the method groups.
    """
    if (args is None) == (optimizer_cls is None):
        raise ValueError("method_optimizer: pass either `args` (TrainingArguments) or `optimizer_cls` (with "
                         "`optimizer_kwargs`), not both and not neither.")
    if args is not None:
        from transformers import Trainer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = dict(kwargs)
        if weight_decay is None:
            weight_decay = args.weight_decay
    else:
        kwargs = dict(optimizer_kwargs or {})
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise ValueError(f"method_optimizer: the network's optimizer must be a torch.optim.Optimizer class, got "
                         f"{optimizer_cls!r}.")
    weight_decay = float(kwargs.pop("weight_decay", 0.0) if weight_decay is None else weight_decay)
    kwargs.pop("weight_decay", None)
    method_groups = method_parameter_groups(model, method_lr)
    extra = {id(p) for g in method_groups for p in g["params"]}
    decay = _decay_parameter_names(model)
    network = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in extra]
    groups = [{"params": [p for n, p in network if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in network if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not method_groups:
        return optimizer_cls(groups, **kwargs)
    if issubclass(optimizer_cls, ADAM_FAMILY):
        return optimizer_cls(groups + method_groups, **kwargs)
    return CombinedOptimizer([optimizer_cls(groups, **kwargs), torch.optim.Adam(method_groups)])
