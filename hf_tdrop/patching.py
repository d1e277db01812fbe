"""Patch any ``torch.nn.Module`` so its targeted layers train with targeted dropout.

``patch_model`` swaps each selected layer's class in place (see :mod:`hf_tdrop.layers`): the
``state_dict`` keys and tensors do not change, so ``save_pretrained`` of a patched model writes a
plain checkpoint, and ``unpatch_model`` restores the original modules exactly.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .config import TargetedDropoutConfig, check_fraction
from .layers import METHOD_ATTR, TargetingState, is_patched_layer, patch_layer, patch_state, unpatch_layer
from .targets import select_layers

CONFIG_ATTR = "tdrop_config"
"""Attribute under which ``patch_model`` keeps its :class:`TargetedDropoutConfig` on the model."""


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
    (default 2:4), ``target_modules``, ``exclude_modules``), or a ready ``config`` alone. See
    :class:`TargetedDropoutConfig` for what each setting means. ``config`` may also be the config of
    another registered method (:class:`hf_tdrop.L0Config`, :class:`hf_tdrop.VariationalDropoutConfig`,
    :class:`hf_tdrop.SmallifyConfig`, :class:`hf_tdrop.L1Config`, :class:`hf_tdrop.DropoutConfig`,
    :class:`hf_tdrop.RandomTargetConfig`; see the methods guide). Every argument is validated and the layers
    are selected before anything changes: on any error the model is left exactly as it was.

    Raises:
        ValueError: invalid α/γ/mode/patterns, both ``config`` and keyword settings given, no layer
            matched (the message lists candidate names), or a selected layer is already patched
            (use :func:`set_targeting` to change α/γ, or :func:`unpatch_model` first).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if config is not None:
        from .methods.base import MethodConfig, available_methods, patch_with_method

        if not isinstance(config, (TargetedDropoutConfig, MethodConfig)):
            raise ValueError(f"`config` must be a TargetedDropoutConfig or the config of a registered method "
                             f"({available_methods()}), got {type(config).__name__}.")
        given = {k: v for k, v in dict(alpha=alpha, gamma=gamma, n=n, m=m, target_modules=target_modules,
                                       exclude_modules=exclude_modules).items() if v is not None}
        if given or mode != "weight":
            raise ValueError(
                f"Pass either `config` or keyword settings, not both (got config and {sorted(given) or ['mode']})."
            )
        if isinstance(config, MethodConfig):
            return patch_with_method(model, config)
    else:
        if alpha is None or gamma is None:
            missing = [n for n, v in (("alpha", alpha), ("gamma", gamma)) if v is None]
            raise ValueError(f"patch_model needs `alpha` and `gamma` (or `config`); missing: {missing}.")
        if mode != "nm" and (n is not None or m is not None):
            raise ValueError(f"`n`/`m` set the N:M pattern of mode='nm'; got mode={mode!r}.")
        config = TargetedDropoutConfig(alpha=alpha, gamma=gamma, mode=mode, n=2 if n is None else n,
                                       m=4 if m is None else m, target_modules=target_modules,
                                       exclude_modules=exclude_modules)
    selected = select_layers(model, config.target_modules, config.exclude_modules)
    already = [name or "<model itself>" for name, m in selected if is_patched_layer(m)]
    if already:
        raise ValueError(
            f"{len(already)} selected layer(s) are already patched (e.g. {already[:3]}). "
            "Use set_targeting(model, alpha=..., gamma=...) to change α/γ, or unpatch_model(model) first."
        )
    for name, module in selected:
        patch_layer(module, TargetingState(
            mode=config.mode, alpha=config.alpha, gamma=config.gamma, layout="",
            rescale=config.rescale, drop_targeted_at_eval=config.drop_targeted_at_eval,
            refresh_every=config.refresh_every, n=config.n, m=config.m, name=name,
        ))
    setattr(model, CONFIG_ATTR, config)  # the latest call's settings, e.g. for export metadata
    return model


def _patched(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_patched_layer(m)]


def is_patched(model: nn.Module) -> bool:
    """True if at least one layer of ``model`` is patched."""
    return bool(_patched(model))


def unpatch_model(model: nn.Module) -> nn.Module:
    """Restore every patched layer's original class. For targeted dropout the model then computes
    bit for bit what it computed before patching (its parameters were never replaced). Layers of a
    method with extra tensors (gates, log σ², switches) are finalised first, as by
    :func:`hf_tdrop.finalize_model`: their eval-time effect is folded into the weights and the extra
    tensors are removed. Returns ``model``. Raises ``ValueError`` if nothing is patched."""
    patched = _patched(model)
    if not patched:
        raise ValueError("unpatch_model: the model has no patched layer.")
    for _, module in patched:
        if METHOD_ATTR in module.__dict__:
            from .methods.base import finalize_layer

            finalize_layer(module)
        else:
            unpatch_layer(module)
    if CONFIG_ATTR in model.__dict__:
        delattr(model, CONFIG_ATTR)
    return model


def targeted_layers(model: nn.Module) -> dict[str, dict]:
    """Every patched layer: ``{name: {"type", "mode", "alpha", "gamma"}}`` (plus ``"n"``, ``"m"`` in
    nm mode) in model order (``type`` is the original class name, e.g. ``"Linear"``, ``"Conv1D"``).
    A layer patched with another method gives ``{"type", "method", **its settings}``."""
    return {
        name: {"type": patch_state(m).original_class.__name__, **patch_state(m).as_dict()}
        for name, m in _patched(model)
    }


def _targeting_settings(module: nn.Module):
    """The object holding a patched layer's α and γ (targeted dropout's state, or the config of a
    method with α/γ such as the random-target control), or None."""
    state = patch_state(module)
    holder = state.config if METHOD_ATTR in module.__dict__ else state
    return holder if hasattr(holder, "alpha") and hasattr(holder, "gamma") else None


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
        raise ValueError(f"{caller}: layer {name or '<model itself>'!r} is patched with method {method!r}, "
                         "which has no α/γ (only targeted dropout and the random-target control have).")
