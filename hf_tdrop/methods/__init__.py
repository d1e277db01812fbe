"""Training methods that make a network prunable, one module each: targeted dropout itself
(:mod:`~hf_tdrop.methods.targeted_dropout`), untargeted dropout, the random-target control, L1, L0
hard-concrete gates, sparse variational dropout and Smallify. Each registers itself with the
registry of :mod:`hf_tdrop.methods.base`; :mod:`hf_tdrop.methods.regularization` sums their loss
terms. Importing this package registers every built-in method (targeted dropout first)."""

from .base import (
    LearnedCriterion,
    Method,
    MethodConfig,
    MethodState,
    available_methods,
    config_class,
    config_from_dict,
    learned_criteria,
    method_config,
    register_method,
)
from .targeted_dropout import TargetedDropoutConfig  # noqa: I001 - registered first
from .dropout import DropoutConfig
from .l0 import L0Config
from .l1 import L1Config
from .random_target import RandomTargetConfig
from .regularization import method_parameters, regularization_loss
from .smallify import SmallifyConfig
from .variational import VariationalDropoutConfig

__all__ = [
    "DropoutConfig",
    "L0Config",
    "L1Config",
    "LearnedCriterion",
    "Method",
    "MethodConfig",
    "MethodState",
    "RandomTargetConfig",
    "SmallifyConfig",
    "TargetedDropoutConfig",
    "VariationalDropoutConfig",
    "available_methods",
    "config_class",
    "config_from_dict",
    "learned_criteria",
    "method_config",
    "method_parameters",
    "register_method",
    "regularization_loss",
]
