"""The method contract and registry: the config base class, the handler base class, the per-layer
state, the registry, and the record of a learned pruning order.

A *method* is registered under one name and is:

* a config dataclass (a subclass of :class:`MethodConfig`: validated fields, ``to_dict`` /
  ``from_dict``), the argument of ``patch_model(model, config=...)``;
* a :class:`Method` handler, one instance per patched layer: ``setup`` registers the layer's extra
  trainable tensors, ``forward`` computes the layer in place of its own forward (through the
  building blocks of the patched-layer family, :mod:`hf_tdrop.layers`), ``loss`` is the layer's
  term of :func:`hf_tdrop.regularization_loss`, ``criterion_scores`` a learned pruning order and
  ``fold`` the eval-time behaviour written into the layer's own weights at finalisation;
* a per-layer state (``layer.tdrop_method``, a :class:`MethodState`): the layer's own copy of the
  settings (``Method.layer_settings``), the handler, the weight layout and the original class.

Targeted dropout (:mod:`hf_tdrop.methods.targeted_dropout`) is registered like every other method.
Patching, unpatching, finalisation, the loss, pruning by a learned criterion, export and the command
line go through this contract only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import masking
from ..config import (
    ConfigSerializationMixin,
    TargetSpec,
    check_choice,
    check_flag,
    check_int,
    check_number,
    check_target_spec,
)
from ..constants import CRITERION_ATTR, METHOD_ATTR, TARGETED_DROPOUT

__all__ = [
    "CRITERION_ATTR", "GRANULARITIES", "LearnedCriterion", "METHOD_ATTR", "Method", "MethodConfig", "MethodState",
    "available_methods", "check_choice", "check_flag", "check_int", "check_number", "config_class",
    "config_from_dict", "handler_for", "learned_criteria", "learned_scores", "method_config", "method_layers",
    "n_units", "per_unit", "register_method", "registered_handlers", "require_learned_scores", "settings", "warmup_factor", "weight2d",
]

GRANULARITIES = ("weight", "unit")


# --------------------------------------------------------------------------------------------------
# config base class
# --------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class MethodConfig(ConfigSerializationMixin):
    """Base class of the method configs (the layer selection and ``extra`` are keyword-only).

    Args:
        target_modules: which layers to patch. ``None`` = every supported layer (``nn.Linear``,
            transformers' ``Conv1D``, ``nn.Conv1d/2d/3d``) except output heads and layers tied to
            embeddings. A string or list of strings; each pattern matches a module's full name
            exactly, as a dotted suffix (``"query"`` matches ``encoder.layer.0.attention.self.query``),
            or as a regex (``re.fullmatch``).
        exclude_modules: patterns (same rules) of layers never to patch.
        extra: free-form metadata kept with the config (e.g. the schedule used); written to JSON as is.
    """

    method: ClassVar[str] = ""

    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in ("target_modules", "exclude_modules"):
            patterns = check_target_spec(spec, getattr(self, spec))
            if patterns is not None and not isinstance(getattr(self, spec), str):
                setattr(self, spec, list(patterns))  # JSON-friendly
        if not isinstance(self.extra, dict):
            raise ValueError(f"`extra` must be a dict, got {type(self.extra).__name__}.")

    def to_dict(self) -> dict:
        """``{"method": name, **fields}``, JSON-friendly; :meth:`from_dict` reads it back."""
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "MethodConfig":
        """Build a config from :meth:`to_dict`'s output. On :class:`MethodConfig` itself the
        ``"method"`` key picks the class (absent: targeted dropout); on a subclass it must be
        absent or match."""
        data = dict(data)
        name = data.pop("method", None)
        if cls is MethodConfig:
            return config_class(TARGETED_DROPOUT if name is None else name).from_dict(data)
        if name is not None and name != cls.method:
            raise ValueError(f"{cls.__name__}.from_dict got method={name!r}, expected {cls.method!r}.")
        return super().from_dict(data)

    def run_label(self) -> str:
        """A short label for tables and sweeps, e.g. ``"L0 weight λ=0.001"``."""
        return self.method

    def card_rows(self) -> list[tuple[str, Any]]:
        """``(setting, value)`` rows describing the training in a saved model's card."""
        return [("training method", self.run_label())]


# --------------------------------------------------------------------------------------------------
# per-layer state and handler base class
# --------------------------------------------------------------------------------------------------


@dataclass
class MethodState:
    """The method state of one patched layer (``layer.tdrop_method``; not in the ``state_dict``)."""

    config: Any  # the layer's own settings (Method.layer_settings): set_targeting may change α/γ of a layer
    handler: "Method"
    layout: str = ""
    original_class: Optional[type] = None
    name: str = field(default="", compare=False)  # the layer's dotted name in the patched model, for messages

    @property
    def method(self) -> str:
        return self.handler.name

    def as_dict(self) -> dict:
        """The layer's settings as :func:`hf_tdrop.targeted_layers` lists them."""
        return self.handler.describe(self.config)


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
    """Behaviour of one method in one patched layer (an instance per layer). Subclasses set the
    class attributes and override what they need; every hook receives the patched layer
    (``module``), whose settings are ``module.tdrop_method.config`` (:func:`settings`).

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
        targeting: the per-layer settings have ``alpha`` and ``gamma`` that
            :func:`hf_tdrop.set_targeting` / :func:`hf_tdrop.get_targeting` and the schedules drive.
        needs_values: patching needs the weights' values (a meta-device layer is refused at
            ``patch_model``); False for a method that reads them only in its forward.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    criterion: ClassVar[Optional[str]] = None
    criterion_granularity: ClassVar[str] = "weight"
    extra_tensors: ClassVar[tuple[str, ...]] = ()
    optimizer_lr: ClassVar[float] = 1e-3
    targeting: ClassVar[bool] = False
    needs_values: ClassVar[bool] = True

    def layer_settings(self, config: MethodConfig, name: str) -> Any:
        """The per-layer settings kept as ``layer.tdrop_method.config``: by default a copy of
        ``config`` (so α/γ can change per layer)."""
        return dataclasses.replace(config)

    @classmethod
    def title(cls) -> str:
        """The method as messages name it (default: ``"the '<name>' training method"``)."""
        return f"the {cls.name!r} training method"

    def describe(self, layer_settings: Any) -> dict:
        """The layer's settings as :func:`hf_tdrop.targeted_layers` lists them (``"method"`` first)."""
        fields = {k: v for k, v in dataclasses.asdict(layer_settings).items()
                  if k not in ("target_modules", "exclude_modules", "extra")}
        return {"method": self.name, **fields}

    def setup(self, module: nn.Module, config: Any) -> None:
        """Register the extra Parameters / buffers on ``module`` (float32, on its weight's device);
        ``config`` is the layer's settings."""

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


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


_REGISTRY: dict[str, type[Method]] = {}
"""Method name -> handler class (its ``config_class`` is the config)."""


def register_method(handler: type[Method]) -> type[Method]:
    """Class decorator: register a :class:`Method` handler under ``handler.name`` (its config class
    gets ``method = name``). Raises ``ValueError`` for a name or criterion already taken, or a
    config class that is not a :class:`MethodConfig` dataclass."""
    name = handler.name
    if not name or name in _REGISTRY:
        raise ValueError(f"method name {name!r} is empty or already registered.")
    config_cls = handler.config_class
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig) and config_cls is not MethodConfig
            and dataclasses.is_dataclass(config_cls)):
        raise ValueError(f"method {name!r}: `config_class` must be a MethodConfig dataclass subclass, got {config_cls!r}.")
    if any(h.config_class is config_cls for h in _REGISTRY.values()):
        raise ValueError(f"method {name!r}: {config_cls.__name__} is already the config of another method.")
    if handler.criterion is not None:
        taken = {h.criterion for h in _REGISTRY.values()} | {"magnitude", "random"}
        if handler.criterion in taken:
            raise ValueError(f"pruning criterion {handler.criterion!r} is already registered.")
    config_cls.method = name
    _REGISTRY[name] = handler
    return handler


def available_methods() -> list[str]:
    """Registered method names, in registration order (``"targeted_dropout"`` first)."""
    return list(_REGISTRY)


def registered_handlers() -> dict[str, type[Method]]:
    """``{method name: handler class}`` of every registered method."""
    return dict(_REGISTRY)


def config_class(name: str) -> type:
    """The config class registered under ``name``."""
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


def handler_for(config: Any) -> type[Method]:
    """The handler class registered for ``config``'s exact class; ``ValueError`` for any other object."""
    for handler in _REGISTRY.values():
        if type(config) is handler.config_class:
            return handler
    raise ValueError(f"`config` must be a TargetedDropoutConfig or the config of a registered method "
                     f"({available_methods()}), got {type(config).__name__}.")


# --------------------------------------------------------------------------------------------------
# helpers for handlers
# --------------------------------------------------------------------------------------------------


def settings(module: nn.Module) -> Any:
    """The per-layer settings of a patched layer (``layer.tdrop_method.config``)."""
    return module.__dict__[METHOD_ATTR].config


def weight2d(module: nn.Module, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``tensor`` (default the weight), of the weight's shape, viewed as ``[n_out, fan_in]``."""
    state = module.__dict__[METHOD_ATTR]
    return masking.unit_matrix(module.weight if tensor is None else tensor, state.layout)


def per_unit(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """``values [n_out]`` shaped to broadcast against the layer's weight (one value per w_o)."""
    state = module.__dict__[METHOD_ATTR]
    if state.layout == masking.LAYOUT_IN_OUT:
        return values.view(1, -1)
    return values.view(-1, *([1] * (module.weight.dim() - 1)))


def n_units(module: nn.Module) -> int:
    """Output units (or channels) of a patched layer."""
    return weight2d(module).shape[0]


def method_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every patched layer of ``model`` (any method), in model order."""
    return [(name, m) for name, m in model.named_modules() if METHOD_ATTR in m.__dict__]


# --------------------------------------------------------------------------------------------------
# learned pruning criteria
# --------------------------------------------------------------------------------------------------


def learned_scores(module: nn.Module, criterion: str) -> Optional[LearnedCriterion]:
    """The learned scores ``criterion`` of a layer (live from a patched layer, or recorded by
    :func:`hf_tdrop.finalize_model`), or None if the layer carries no such criterion."""
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


def warmup_factor(name: str, steps: int, step: Optional[int], method: str) -> float:
    """``min(1, step / steps)`` (1 when ``steps`` is 0); ``step`` is required when ``steps > 0``."""
    if steps == 0:
        return 1.0
    if step is None:
        raise ValueError(f"regularization_loss: the {method} loss warms up over `{name}`={steps} steps; pass "
                         "`step` (optimizer updates done so far), e.g. regularization_loss(model, step=k).")
    return min(1.0, step / steps)
