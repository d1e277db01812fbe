"""The shared machinery of the training methods: config base class, registry, patched layer classes,
regularisation loss, finalisation and learned pruning criteria.

A *method* is four things, registered together under one name:

* a config dataclass (a subclass of :class:`MethodConfig`: validated fields, ``to_dict`` /
  ``from_dict``), the argument of ``patch_model(model, config=...)``;
* the layer behaviour: a :class:`Method` handler whose ``forward`` runs in place of the layer's own
  (its extra trainable tensors are registered on the layer by ``setup``);
* optionally a loss term (``Method.loss``), summed over the layers by :func:`regularization_loss`;
* optionally a learned pruning criterion (``Method.criterion``, e.g. ``"gates"``) that
  :func:`hf_tdrop.prune_model` accepts as ``method=``.

Patching swaps each selected layer's ``__class__`` for a generic subclass (:class:`MethodLinear`,
:class:`MethodConv1D`, :class:`MethodConv1d`/``2d``/``3d``) that delegates its forward to the
method's handler, and keeps the per-layer settings in one attribute (``tdrop_method``). Extra
tensors are ordinary Parameters / buffers of the layer: optimizers train them, and ``state_dict``,
``Trainer`` and accelerate checkpoints save and restore them exactly. :func:`finalize_model` folds
them into the layer's own weight and bias, records the learned pruning order on the layer, removes
them and gives the layer back its class, so ``save_pretrained`` writes a plain checkpoint.

Targeted dropout itself (:class:`hf_tdrop.TargetedDropoutConfig`) keeps its dedicated, optimised
layer classes (:mod:`hf_tdrop.layers`) and is listed in the registry under ``"targeted_dropout"``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import masking
from ..config import ConfigSerializationMixin, TargetSpec, check_target_spec
from ..layers import METHOD_ATTR, SUPPORTED_LAYERS, check_materialized

CRITERION_ATTR = "tdrop_criterion"
"""Attribute under which :func:`finalize_model` leaves a layer's :class:`LearnedCriterion`."""

GRANULARITIES = ("weight", "unit")


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def check_number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number in the given range, else raise
    ``ValueError`` naming ``name`` and the range. ``bool`` and NaN are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isinf(value):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be in {lo}{low:g}, {high:g}{hi}, got {value!r}.")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------------
# config base class and registry
# --------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MethodConfig(ConfigSerializationMixin):
    """Base class of the method configs (all fields but the method's own are keyword-only).

    Args:
        target_modules: which layers to patch, with the rules of :class:`hf_tdrop.TargetedDropoutConfig`
            (``None``: every supported layer except output heads and layers tied to embeddings).
        exclude_modules: patterns of layers never to patch.
        extra: free-form metadata kept with the config (written to JSON as is).
    """

    method: ClassVar[str] = ""

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in ("target_modules", "exclude_modules"):
            patterns = check_target_spec(spec, getattr(self, spec))
            if patterns is not None and not isinstance(getattr(self, spec), str):
                setattr(self, spec, list(patterns))
        if not isinstance(self.extra, dict):
            raise ValueError(f"`extra` must be a dict, got {type(self.extra).__name__}.")

    def to_dict(self) -> dict:
        """``{"method": name, **fields}``, JSON-friendly; :meth:`from_dict` reads it back."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        """Build a config from :meth:`to_dict`'s output. On :class:`MethodConfig` itself the
        ``"method"`` key picks the class; on a subclass it must be absent or match."""
        data = dict(data)
        name = data.pop("method", None)
        if cls is MethodConfig:
            if name is None:
                raise ValueError(f"`method` is missing; one of {available_methods()}.")
            return config_class(name).from_dict(data)
        if name is not None and name != cls.method:
            raise ValueError(f"{cls.__name__}.from_dict got method={name!r}, expected {cls.method!r}.")
        return super().from_dict(data)

    def run_label(self) -> str:
        """A short label for tables and sweeps, e.g. ``"l0 weight λ=0.001"``."""
        return self.method


_REGISTRY: dict[str, type["Method"]] = {}
"""Method name -> handler class (its ``config_class`` is the config)."""
TARGETED_DROPOUT = "targeted_dropout"


def register_method(handler: type["Method"]) -> type["Method"]:
    """Class decorator: register a :class:`Method` handler under ``handler.name`` (its config class
    gets ``method = name``). Raises ``ValueError`` for a name or criterion already taken."""
    name = handler.name
    if not name or name in _REGISTRY or name == TARGETED_DROPOUT:
        raise ValueError(f"method name {name!r} is empty or already registered.")
    if handler.criterion is not None:
        taken = {h.criterion for h in _REGISTRY.values()} | {"magnitude", "random"}
        if handler.criterion in taken:
            raise ValueError(f"pruning criterion {handler.criterion!r} is already registered.")
    handler.config_class.method = name
    _REGISTRY[name] = handler
    return handler


def available_methods() -> list[str]:
    """Registered method names, ``"targeted_dropout"`` first."""
    return [TARGETED_DROPOUT, *_REGISTRY]


def config_class(name: str) -> type:
    """The config class registered under ``name``."""
    if name == TARGETED_DROPOUT:
        from ..config import TargetedDropoutConfig

        return TargetedDropoutConfig
    if name not in _REGISTRY:
        raise ValueError(f"`method` must be one of {available_methods()}, got {name!r}.")
    return _REGISTRY[name].config_class


def method_config(name: str, **settings) -> Any:
    """Build the config of method ``name`` from keyword settings, e.g.
    ``method_config("l0", dataset_size=50000, mode="unit")``."""
    return config_class(name)(**settings)


def config_from_dict(data: dict) -> Any:
    """A config from its dict: ``data["method"]`` picks the class (no ``"method"`` key: a
    :class:`hf_tdrop.TargetedDropoutConfig`)."""
    data = dict(data)
    name = data.pop("method", TARGETED_DROPOUT)
    return config_class(name).from_dict(data)


def learned_criteria() -> dict[str, str]:
    """``{criterion name: method name}`` of the learned pruning criteria, e.g. ``{"gates": "l0"}``."""
    return {h.criterion: name for name, h in _REGISTRY.items() if h.criterion is not None}


def handler_for(config: MethodConfig) -> type["Method"]:
    for handler in _REGISTRY.values():
        if type(config) is handler.config_class:
            return handler
    raise ValueError(f"{type(config).__name__} is not a registered method config; registered: {available_methods()}.")


# --------------------------------------------------------------------------------------------------
# per-layer state, handler base class and the patched layer classes
# --------------------------------------------------------------------------------------------------


@dataclass
class MethodState:
    """The method settings of one patched layer (``layer.tdrop_method``; not in the ``state_dict``)."""

    config: MethodConfig  # this layer's own copy (set_targeting may change α/γ of a layer)
    handler: "Method"
    layout: str = ""
    original_class: Optional[type] = None
    name: str = field(default="", compare=False)

    @property
    def method(self) -> str:
        return self.handler.name

    def as_dict(self) -> dict:
        settings = {k: v for k, v in dataclasses.asdict(self.config).items()
                    if k not in ("target_modules", "exclude_modules", "extra")}
        return {"method": self.handler.name, **settings}


@dataclass
class LearnedCriterion:
    """A learned pruning order left on a finalised layer (``layer.tdrop_criterion``).

    Attributes:
        name: the criterion (``prune_model(method=name)``).
        granularity: ``"weight"``: ``scores`` is ``[n_out, fan_in]``; ``"unit"``: ``[n_out]``.
        scores: lowest pruned first (a detached float32 copy, on the weight's device).
    """

    name: str
    granularity: str
    scores: torch.Tensor


class Method:
    """Behaviour of one method in a patched layer. Subclasses set the class attributes and override
    what they need; every hook receives the patched layer (``module``), whose settings are
    ``module.tdrop_method.config``.

    Class attributes:
        name: registry name. config_class: the config dataclass.
        criterion: name of the learned pruning criterion, or None (magnitude pruning).
        criterion_granularity: ``"weight"`` or ``"unit"``: what :meth:`criterion_scores` ranks
            (:meth:`granularity` may decide per layer instead).
        extra_tensors: names of the Parameters / buffers :meth:`setup` registers (removed by
            finalisation). They are float32 whatever the weight's dtype (master copies, as
            mixed-precision training keeps optimizer state): a bfloat16 ``log α`` near 7 has a step of
            0.03.
        optimizer_lr: learning rate of the method's own parameters in their Adam group
            (:func:`hf_tdrop.method_optimizer`; 1e-3, the papers' setting).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    criterion: ClassVar[Optional[str]] = None
    criterion_granularity: ClassVar[str] = "weight"
    extra_tensors: ClassVar[tuple[str, ...]] = ()
    optimizer_lr: ClassVar[float] = 1e-3

    def setup(self, module: nn.Module, config: MethodConfig) -> None:
        """Register the extra Parameters / buffers on ``module`` (float32, on its weight's device)."""

    def forward(self, module: nn.Module, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """The layer's output; default: the layer's own computation."""
        return module.compute(input, module.weight, module.bias)

    def loss(self, module: nn.Module, step: Optional[int]) -> Optional[torch.Tensor]:
        """This layer's term of :func:`regularization_loss` (``step``: optimizer updates done), or None."""
        return None

    def granularity(self, module: nn.Module) -> str:
        """What :meth:`criterion_scores` ranks in this layer: ``"weight"`` or ``"unit"``."""
        return self.criterion_granularity

    def criterion_scores(self, module: nn.Module) -> torch.Tensor:
        """Learned pruning scores, lowest pruned first (see :attr:`criterion_granularity`)."""
        raise NotImplementedError

    def fold(self, module: nn.Module) -> None:
        """Write the method's eval-time effect into ``module.weight`` / ``module.bias`` (in place,
        under ``no_grad``), so the plain layer computes what the patched layer computes in eval."""


def settings(module: nn.Module) -> Any:
    """The config of a method-patched layer."""
    return getattr(module, METHOD_ATTR).config


def weight2d(module: nn.Module, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tensor`` (default the weight), of the weight's shape, viewed as ``[n_out, fan_in]``."""
    state = getattr(module, METHOD_ATTR)
    return masking.unit_matrix(module.weight if tensor is None else tensor, state.layout)


def per_unit(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``values [n_out]`` shaped to broadcast against the layer's weight (one value per w_o)."""
    state = getattr(module, METHOD_ATTR)
    weight = module.weight
    if state.layout == masking.LAYOUT_IN_OUT:
        return values.view(1, -1)
    return values.view(-1, *([1] * (weight.dim() - 1)))


def n_units(module: nn.Module) -> int:
    return weight2d(module).shape[0]


class MethodLayerMixin:
    """Forward of a method-patched layer: the method handler's ``forward``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return getattr(self, METHOD_ATTR).handler.forward(self, input)

    def compute(self, input, weight, bias):
        """The original layer's computation with the given ``weight`` and ``bias`` (defined per layer type)."""
        raise NotImplementedError

    def _unit_shape(self, out: torch.Tensor) -> list[int]:
        return [-1]  # output units on the last dimension (Linear, Conv1D)

    def scale_units(self, out: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``out`` with every output unit ``o`` multiplied by ``values[o]`` (out of place)."""
        return out * values.view(self._unit_shape(out)).to(out.dtype)


class MethodLinear(MethodLayerMixin, nn.Linear):
    def compute(self, input, weight, bias):
        return F.linear(input, weight, bias)


class MethodConv1D(MethodLayerMixin, Conv1D):
    def compute(self, input, weight, bias):  # weight [in, out]
        size_out = input.size()[:-1] + (weight.shape[1],)
        x = input.reshape(-1, input.size(-1))
        out = x @ weight if bias is None else torch.addmm(bias, x, weight)
        return out.view(size_out)


class _MethodConvNd(MethodLayerMixin):
    def compute(self, input, weight, bias):
        return self._conv_forward(input, weight, bias)

    def _unit_shape(self, out):
        return [1, -1] + [1] * (out.dim() - 2)


class MethodConv1d(_MethodConvNd, nn.Conv1d):
    pass


class MethodConv2d(_MethodConvNd, nn.Conv2d):
    pass


class MethodConv3d(_MethodConvNd, nn.Conv3d):
    pass


METHOD_LAYERS: dict[type, type] = {
    nn.Linear: MethodLinear, Conv1D: MethodConv1D, nn.Conv1d: MethodConv1d, nn.Conv2d: MethodConv2d,
    nn.Conv3d: MethodConv3d,
}
"""Exact layer type -> method-patched class."""


def is_method_layer(module: nn.Module) -> bool:
    return METHOD_ATTR in module.__dict__


def method_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every method-patched layer of ``model``, in model order."""
    return [(name, m) for name, m in model.named_modules() if is_method_layer(m)]


# --------------------------------------------------------------------------------------------------
# patching, loss, finalisation
# --------------------------------------------------------------------------------------------------


def patch_with_method(model: nn.Module, config: MethodConfig) -> nn.Module:
    """``patch_model(model, config=...)`` for a registered method config (validated before any
    layer changes)."""
    from ..layers import is_patched_layer
    from ..patching import CONFIG_ATTR
    from ..targets import select_layers

    handler_cls = handler_for(config)
    selected = select_layers(model, config.target_modules, config.exclude_modules)
    already = [name or "<model itself>" for name, m in selected if is_patched_layer(m)]
    if already:
        raise ValueError(f"{len(already)} selected layer(s) are already patched (e.g. {already[:3]}); "
                         "call unpatch_model(model) (or finalize_model) first.")
    for name, module in selected:
        check_materialized(module, name, f"patch_model ({config.method})")
    for name, module in selected:
        original = type(module)
        state = MethodState(config=dataclasses.replace(config), handler=handler_cls(), name=name,
                            layout=SUPPORTED_LAYERS[original][1], original_class=original)
        setattr(module, METHOD_ATTR, state)
        module.__class__ = METHOD_LAYERS[original]
        state.handler.setup(module, state.config)
    setattr(model, CONFIG_ATTR, config)
    return model


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
        term = getattr(module, METHOD_ATTR).handler.loss(module, step)
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total


def warmup_factor(name: str, steps: int, step: Optional[int], method: str) -> float:
    """``min(1, step / steps)`` (1 when ``steps`` is 0); ``step`` is required when ``steps > 0``."""
    if steps == 0:
        return 1.0
    if step is None:
        raise ValueError(f"regularization_loss: the {method} loss warms up over `{name}`={steps} steps; pass "
                         "`step` (optimizer updates done so far), e.g. regularization_loss(model, step=k).")
    return min(1.0, step / steps)


def finalize_layer(module: nn.Module) -> None:
    """Fold a method-patched layer, record its learned pruning order, strip its extra tensors and
    restore its original class."""
    state: MethodState = getattr(module, METHOD_ATTR)
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
    module.__class__ = state.original_class
    delattr(module, METHOD_ATTR)


def finalize_model(model: nn.Module) -> nn.Module:
    """Finish training: give every patched layer back its original class, in place; returns ``model``.

    For a method with extra tensors (L0 gates, variational log σ², Smallify switches, random-target
    scores) the layer's eval-time behaviour is folded into its own weight/bias (L0: ``w * z_eval``;
    variational dropout: weights with ``log α >= threshold`` zeroed; Smallify: each unit's weights and
    bias times its masked switch), the learned pruning order is kept on the layer as
    ``layer.tdrop_criterion`` (a :class:`LearnedCriterion`, read by ``prune_model(method=...)``), and
    the extra tensors are removed. The model then computes in eval exactly what the patched model
    computed in eval (up to float rounding of the fold), and its ``save_pretrained`` is a plain
    checkpoint for stock ``from_pretrained``. Targeted-dropout layers are unpatched as by
    :func:`hf_tdrop.unpatch_model` (which does the same as this function).

    Raises ``ValueError`` if nothing is patched.
    """
    from ..patching import unpatch_model

    return unpatch_model(model)


def method_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: Parameter}`` of the extra trainable tensors the patched methods added (gates, log σ²,
    switches), e.g. to give them their own optimizer group without weight decay."""
    out = {}
    for name, module in method_layers(model):
        for attr in getattr(module, METHOD_ATTR).handler.extra_tensors:
            param = module._parameters.get(attr)
            if param is not None:
                out[f"{name}.{attr}" if name else attr] = param
    return out


# --------------------------------------------------------------------------------------------------
# learned pruning criteria
# --------------------------------------------------------------------------------------------------


def learned_scores(module: nn.Module, criterion: str) -> Optional[LearnedCriterion]:
    """The learned scores ``criterion`` of a layer (live from a patched layer, or recorded by
    :func:`finalize_model`), or None if the layer carries no such criterion."""
    state = module.__dict__.get(METHOD_ATTR)
    if state is not None and state.handler.criterion == criterion:
        with torch.no_grad():
            scores = state.handler.criterion_scores(module).detach().float()
        return LearnedCriterion(criterion, state.handler.granularity(module), scores)
    recorded = module.__dict__.get(CRITERION_ATTR)
    if recorded is not None and recorded.name == criterion:
        return recorded
    return None


def require_learned_scores(selected: list[tuple[str, nn.Module]], criterion: str, mode: str) -> dict[str, LearnedCriterion]:
    """The learned scores of every selected layer, or a one-line ``ValueError`` naming the argument,
    the layer lacking them and the allowed values."""
    out = {}
    method = learned_criteria()[criterion]
    for name, module in selected:
        found = learned_scores(module, criterion)
        if found is None:
            raise ValueError(
                f"`method`={criterion!r} needs learned {method} scores on every pruned layer, but layer "
                f"{name or '<model itself>'!r} has none (patch_model(model, config=...) with the {method} method, "
                f"train, then prune or finalize_model); use one of ['magnitude', 'random'] for this model.")
        if found.granularity != mode:
            raise ValueError(
                f"`method`={criterion!r} on layer {name or '<model itself>'!r} ranks {found.granularity}s "
                f"(learned with mode={found.granularity!r}); prune it with mode={found.granularity!r}.")
        out[name] = found
    return out
