"""Patch any ``torch.nn.Module`` so its targeted layers train with a registered method (targeted
dropout or another), and give them back their original classes.

``patch_model`` swaps each selected layer's class in place for the matching class of the
patched-layer family (see :mod:`hf_tdrop.layers`), whose forward asks the layer's method handler
(see :mod:`hf_tdrop.methods.base`). The ``state_dict`` keys and tensors do not change (apart from a
method's own extra tensors), so ``save_pretrained`` of a model patched with targeted dropout writes
a plain checkpoint, and ``unpatch_model`` / ``finalize_model`` restore the original classes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import check_fraction
from .constants import CONFIG_ATTR, CRITERION_ATTR
from .layers import check_materialized, is_patched_layer, patch_layer, patch_state, unpatch_layer
from .methods import base as registry
from .methods.base import LearnedCriterion, MethodState
from .methods.targeted_dropout import TargetedDropoutConfig
from .targets import select_layers

__all__ = ["CONFIG_ATTR", "finalize_layer", "finalize_model", "get_targeting", "is_patched", "patch_model",
           "set_targeting", "targeted_layers", "unpatch_model"]



def patch_model(
    model: nn.Module,
    alpha: Optional[float] = None,
    gamma: Optional[float] = None,
    *,
    mode: str = "weight",
    n: Optional[int] = None,
    m: Optional[int] = None,
    target_modules=None,
    exclude_modules=None,
    config=None,
) -> nn.Module:
    """Inject targeted dropout (or another training method) into ``model``'s layers, in place;
    returns ``model``.

    Either pass ``alpha`` and ``gamma`` (and optionally ``mode``, ``n``/``m`` for ``mode="nm"``
    (default 2:4), ``target_modules``, ``exclude_modules``): the short form of targeted dropout; or
    a ready ``config`` alone: the config of any registered method (:class:`TargetedDropoutConfig`,
    :class:`hf_tdrop.L0Config`, :class:`hf_tdrop.VariationalDropoutConfig`,
    :class:`hf_tdrop.SmallifyConfig`, :class:`hf_tdrop.L1Config`, :class:`hf_tdrop.DropoutConfig`,
    :class:`hf_tdrop.RandomTargetConfig`, or one registered with
    :func:`hf_tdrop.methods.register_method`; see the methods guide). Every argument is validated
    and the layers are selected before anything changes: on any error the model is left exactly as
    it was.

    Raises:
        ValueError: invalid α/γ/mode/patterns, both ``config`` and keyword settings given, no layer
            matched (the message lists candidate names), or a selected layer is already patched
            (use :func:`set_targeting` to change α/γ, or :func:`unpatch_model` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if config is not None:
        given = {k: v for k, v in dict(alpha=alpha, gamma=gamma, n=n, m=m, target_modules=target_modules,
                                       exclude_modules=exclude_modules).items() if v is not None}
        if given or mode != "weight":
            raise ValueError(
                f"Pass either `config` or keyword settings, not both (got config and {sorted(given) or ['mode']})."
            )
    else:
        if alpha is None or gamma is None:
            missing = [n for n, v in (("alpha", alpha), ("gamma", gamma)) if v is None]
            raise ValueError(f"patch_model needs `alpha` and `gamma` (or `config`); missing: {missing}.")
        if mode != "nm" and (n is not None or m is not None):
            raise ValueError(f"`n`/`m` set the N:M pattern of mode='nm'; got mode={mode!r}.")
        config = TargetedDropoutConfig(alpha=alpha, gamma=gamma, mode=mode, n=2 if n is None else n,
                                       m=4 if m is None else m, target_modules=target_modules,
                                       exclude_modules=exclude_modules)
    handler_cls = registry.handler_for(config)
    selected = select_layers(model, config.target_modules, config.exclude_modules)
    already = [name or "<model itself>" for name, m in selected if is_patched_layer(m)]
    if already:
        raise ValueError(
            f"{len(already)} selected layer(s) are already patched (e.g. {already[:3]}). "
            "Use set_targeting(model, alpha=..., gamma=...) to change α/γ, or unpatch_model(model) "
            "(or finalize_model) first."
        )
    if handler_cls.needs_values:
        for name, module in selected:
            check_materialized(module, name, f"patch_model ({config.method})")
    for name, module in selected:
        handler = handler_cls()
        state = MethodState(config=handler.layer_settings(config, name), handler=handler, name=name)
        patch_layer(module, state)
        handler.setup(module, state.config)
    setattr(model, CONFIG_ATTR, config)  # the latest call's settings, e.g. for export metadata
    return model


def _patched(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_patched_layer(m)]


def is_patched(model: nn.Module) -> bool:
    """True if at least one layer of ``model`` is patched."""
    return bool(_patched(model))


def finalize_layer(module: nn.Module) -> None:
    """Give one patched layer back its original class: its method folds its eval-time behaviour
    into the weight and bias, the learned pruning order (if the method learns one) is recorded on
    the layer (``layer.tdrop_criterion``), and the extra tensors are removed."""
    state: MethodState = patch_state(module)
    handler = state.handler
    with torch.no_grad():
        if handler.criterion is not None:
            scores = handler.criterion_scores(module).detach().float().clone()
            setattr(module, CRITERION_ATTR, LearnedCriterion(handler.criterion, handler.granularity(module), scores))
        handler.fold(module)
    for name in handler.extra_tensors:
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
        module._non_persistent_buffers_set.discard(name)
    unpatch_layer(module)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore every patched layer's original class, in place; returns ``model``.

    For targeted dropout the model then computes bit for bit what it computed before patching (its
    parameters were never replaced). For a method with extra tensors (L0 gates, variational log σ²,
    Smallify switches, random-target scores) the layer's eval-time behaviour is folded into its own
    weight/bias (L0: ``w * z_eval``; variational dropout: weights with ``log α >= threshold``
    zeroed; Smallify: each unit's weights and bias times its masked switch), the learned pruning
    order is kept on the layer as ``layer.tdrop_criterion`` (a :class:`hf_tdrop.LearnedCriterion`,
    read by ``prune_model(method=...)``), and the extra tensors are removed. The model then
    computes in eval exactly what the patched model computed in eval (up to float rounding of the
    fold), and its ``save_pretrained`` is a plain checkpoint for stock ``from_pretrained``.
    :func:`finalize_model` is the same function.

    Raises ``ValueError`` if nothing is patched.
    """
    patched = _patched(model)
    if not patched:
        raise ValueError("unpatch_model: the model has no patched layer.")
    for _, module in patched:
        finalize_layer(module)
    if CONFIG_ATTR in model.__dict__:
        delattr(model, CONFIG_ATTR)
    return model


def finalize_model(model: nn.Module) -> nn.Module:
    """Finish training: give every patched layer back its original class, in place; returns ``model``.

    The same as :func:`unpatch_model`: each method's eval-time behaviour is folded into the layer's
    own weight/bias (L0: ``w * z_eval``; variational dropout: weights with ``log α >= threshold``
    zeroed; Smallify: each unit's weights and bias times its masked switch), the learned pruning
    order is kept on the layer as ``layer.tdrop_criterion`` (a :class:`hf_tdrop.LearnedCriterion`,
    read by ``prune_model(method=...)``), and the extra tensors are removed. The model then computes
    in eval exactly what the patched model computed in eval (up to float rounding of the fold), and
    its ``save_pretrained`` is a plain checkpoint for stock ``from_pretrained``. Targeted-dropout
    layers are restored exactly.

    Raises ``ValueError`` if nothing is patched.
    """
    return unpatch_model(model)


def targeted_layers(model: nn.Module) -> dict[str, dict]:
    """Every patched layer: ``{name: {"type", "mode", "alpha", "gamma"}}`` (plus ``"n"``, ``"m"`` in
    nm mode) for targeted dropout, in model order (``type`` is the original class name, e.g.
    ``"Linear"``, ``"Conv1D"``). A layer patched with another method gives
    ``{"type", "method", **its settings}``."""
    return {name: {"type": patch_state(m).original_class.__name__, **patch_state(m).as_dict()}
            for name, m in _patched(model)}


def _targeting_settings(module: nn.Module):
    """The per-layer settings holding a patched layer's α and γ (a method that declares
    ``targeting``: targeted dropout, the random-target control), or None."""
    state = patch_state(module)
    return state.config if state.handler.targeting else None


def _require_patched(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    patched = _patched(model)
    if not patched:
        raise ValueError(f"{caller}: the model has no patched layer; call patch_model first.")
    return patched


def set_targeting(model: nn.Module, alpha: Optional[float] = None, gamma: Optional[float] = None) -> None:
    """Set α and/or γ of every patched layer (e.g. from a schedule at each step). Values are
    validated before any layer changes. Cheap: it only updates Python floats; under
    ``torch.compile`` it triggers no recompilation."""
    patched = _require_patched(model, "set_targeting")
    if alpha is None and gamma is None:
        raise ValueError("set_targeting needs `alpha` and/or `gamma`.")
    alpha = None if alpha is None else check_fraction("alpha", alpha)
    gamma = None if gamma is None else check_fraction("gamma", gamma)
    _check_targeting_layers(patched, "set_targeting")
    for _, module in patched:
        state = _targeting_settings(module)
        if alpha is not None:
            state.alpha = alpha
        if gamma is not None:
            state.gamma = gamma


def get_targeting(model: nn.Module, per_layer: bool = False) -> dict:
    """Current targeting of the patched layers.

    Returns ``{"alpha": a, "gamma": g, "mode": m}`` when every patched layer agrees. With
    ``per_layer=True``, returns :func:`targeted_layers` instead. Raises ``ValueError`` if nothing is
    patched, or if the layers disagree and ``per_layer`` is False (the message says which differ).
    """
    _check_targeting_layers(_require_patched(model, "get_targeting"), "get_targeting")
    layers = targeted_layers(model)
    if per_layer:
        return layers
    distinct = {(v["alpha"], v["gamma"], v["mode"]) for v in layers.values()}
    if len(distinct) > 1:
        raise ValueError(
            f"Patched layers disagree on (alpha, gamma, mode): {sorted(distinct)[:4]}; "
            "call get_targeting(model, per_layer=True) for the per-layer mapping."
        )
    alpha, gamma, mode = distinct.pop()
    return {"alpha": alpha, "gamma": gamma, "mode": mode}


def _check_targeting_layers(patched: list[tuple[str, nn.Module]], caller: str) -> None:
    without = [(name, patch_state(m).method) for name, m in patched if _targeting_settings(m) is None]
    if without:
        name, method = without[0]
        with_targeting = [n for n, h in registry.registered_handlers().items() if h.targeting]
        raise ValueError(f"{caller}: layer {name or '<model itself>'!r} is patched with method {method!r}, "
                         f"which has no α/γ (only {with_targeting} have).")
