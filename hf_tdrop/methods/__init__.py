"""Training methods that make a network prunable, side by side with targeted dropout: untargeted
dropout, the random-target control, L1, L0 hard-concrete gates, sparse variational dropout and
Smallify. Each lives in its own module and registers itself (see :mod:`hf_tdrop.methods.base`)."""

from .base import (
    LearnedCriterion,
    Method,
    MethodConfig,
    available_methods,
    config_from_dict,
    finalize_model,
    learned_criteria,
    method_config,
    method_parameters,
    register_method,
    regularization_loss,
)
from .dropout import DropoutConfig
from .l0 import L0Config
from .l1 import L1Config
from .random_target import RandomTargetConfig
from .smallify import SmallifyConfig
from .variational import VariationalDropoutConfig

__all__ = [
    "DropoutConfig",
    "L0Config",
    "L1Config",
    "LearnedCriterion",
    "Method",
    "MethodConfig",
    "RandomTargetConfig",
    "SmallifyConfig",
    "VariationalDropoutConfig",
    "available_methods",
    "config_from_dict",
    "finalize_model",
    "learned_criteria",
    "method_config",
    "method_parameters",
    "register_method",
    "regularization_loss",
]
