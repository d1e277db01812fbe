"""hf-tdrop: Targeted Dropout (Gomez et al., 2019) for Hugging Face Transformers and any PyTorch model."""

from .batchnorm import BatchNormRecalibration, has_batchnorm, recalibrate_batchnorm
from .config import MODES, TargetedDropoutConfig
from .hold import PrunedHold, held_entries, hold_pruned, release_pruned
from .hub import push_pruned_to_hub, save_pruned
from .methods import (
    DropoutConfig,
    L0Config,
    L1Config,
    LearnedCriterion,
    MethodConfig,
    RandomTargetConfig,
    SmallifyConfig,
    VariationalDropoutConfig,
    available_methods,
    config_from_dict,
    finalize_model,
    learned_criteria,
    method_config,
    method_parameters,
    regularization_loss,
)
from .optim import CombinedOptimizer, method_optimizer, method_parameter_groups
from .nm import NMSparsityReport, check_nm_sparsity, to_semi_structured
from .patching import get_targeting, is_patched, patch_model, set_targeting, targeted_layers, unpatch_model
from .pruning import METHODS, PruneReport, allowed_methods, prune_model, pruned
from .reports import SparsityReport, sparsity_report
from .schedules import SCHEDULE_KINDS, TargetingSchedule, TargetingScheduler
from .shrink import ShrinkReport, shrink_model
from .sweeps import (
    MetricEvaluator,
    SweepResult,
    SweepTable,
    combine_sweeps,
    metric_evaluator,
    plot_sweeps,
    prune_sweep,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # TargetedDropoutCallback imports transformers.Trainer (slow); load it only when asked for.
    if name in ("TargetedDropoutCallback", "RegularizationCallback"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'hf_tdrop' has no attribute {name!r}")


__all__ = [
    "BatchNormRecalibration",
    "CombinedOptimizer",
    "DropoutConfig",
    "L0Config",
    "L1Config",
    "LearnedCriterion",
    "METHODS",
    "MODES",
    "MethodConfig",
    "MetricEvaluator",
    "NMSparsityReport",
    "PruneReport",
    "PrunedHold",
    "RandomTargetConfig",
    "RegularizationCallback",
    "SCHEDULE_KINDS",
    "ShrinkReport",
    "SmallifyConfig",
    "SparsityReport",
    "SweepResult",
    "SweepTable",
    "TargetedDropoutCallback",
    "TargetedDropoutConfig",
    "TargetingSchedule",
    "TargetingScheduler",
    "VariationalDropoutConfig",
    "allowed_methods",
    "available_methods",
    "check_nm_sparsity",
    "combine_sweeps",
    "config_from_dict",
    "finalize_model",
    "get_targeting",
    "has_batchnorm",
    "held_entries",
    "hold_pruned",
    "is_patched",
    "learned_criteria",
    "method_config",
    "method_optimizer",
    "method_parameter_groups",
    "method_parameters",
    "metric_evaluator",
    "patch_model",
    "plot_sweeps",
    "prune_model",
    "prune_sweep",
    "pruned",
    "push_pruned_to_hub",
    "recalibrate_batchnorm",
    "regularization_loss",
    "release_pruned",
    "save_pruned",
    "set_targeting",
    "shrink_model",
    "sparsity_report",
    "targeted_layers",
    "to_semi_structured",
    "unpatch_model",
]
