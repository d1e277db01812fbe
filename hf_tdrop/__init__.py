"""hf-tdrop: Targeted Dropout (Gomez et al., 2019) for Hugging Face Transformers and any PyTorch model."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Every public name is imported on first use (PEP 562), so that ``import hf_tdrop.cli`` (the
# ``hf-tdrop`` command) does not pay for torch and transformers before it has parsed its arguments.
_LAZY = {
    "batchnorm": ("BatchNormRecalibration", "has_batchnorm", "recalibrate_batchnorm"),
    "config": ("MODES",),
    "hold": ("PrunedHold", "held_entries", "hold_pruned", "release_pruned"),
    "criteria": ("load_learned_criteria", "save_learned_criteria"),
    "hub": ("push_pruned_to_hub", "save_pruned"),
    "methods": ("DropoutConfig", "L0Config", "L1Config", "LearnedCriterion", "MethodConfig", "RandomTargetConfig",
                "SmallifyConfig", "TargetedDropoutConfig", "VariationalDropoutConfig", "available_methods",
                "config_from_dict", "learned_criteria", "method_config", "method_parameters", "regularization_loss"),
    "optim": ("CombinedOptimizer", "method_optimizer", "method_parameter_groups"),
    "nm": ("NMSparsityReport", "check_nm_sparsity", "to_semi_structured"),
    "patching": ("finalize_model", "get_targeting", "is_patched", "patch_model", "set_targeting", "targeted_layers",
                 "unpatch_model"),
    "pruning": ("METHODS", "PruneReport", "allowed_methods", "prune_model", "pruned"),
    "reports": ("SparsityReport", "sparsity_report"),
    "schedules": ("SCHEDULE_KINDS", "TargetingSchedule", "TargetingScheduler"),
    "shrink": ("ShrinkReport", "shrink_model"),
    "sweeps": ("MetricEvaluator", "SweepResult", "SweepTable", "combine_sweeps", "metric_evaluator", "plot_sweeps",
               "prune_sweep"),
    # TargetedDropoutCallback imports transformers.Trainer (slow).
    "callback": ("RegularizationCallback", "TargetedDropoutCallback"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:  # for type checkers and the documentation tools
    from .batchnorm import BatchNormRecalibration, has_batchnorm, recalibrate_batchnorm
    from .callback import RegularizationCallback, TargetedDropoutCallback
    from .config import MODES
    from .hold import PrunedHold, held_entries, hold_pruned, release_pruned
    from .criteria import load_learned_criteria, save_learned_criteria
    from .hub import push_pruned_to_hub, save_pruned
    from .methods import (
        DropoutConfig,
        L0Config,
        L1Config,
        LearnedCriterion,
        MethodConfig,
        RandomTargetConfig,
        SmallifyConfig,
        TargetedDropoutConfig,
        VariationalDropoutConfig,
        available_methods,
        config_from_dict,
        learned_criteria,
        method_config,
        method_parameters,
        regularization_loss,
    )
    from .nm import NMSparsityReport, check_nm_sparsity, to_semi_structured
    from .optim import CombinedOptimizer, method_optimizer, method_parameter_groups
    from .patching import (
        finalize_model,
        get_targeting,
        is_patched,
        patch_model,
        set_targeting,
        targeted_layers,
        unpatch_model,
    )
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


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_tdrop' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "load_learned_criteria",
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
    "save_learned_criteria",
    "save_pruned",
    "set_targeting",
    "shrink_model",
    "sparsity_report",
    "targeted_layers",
    "to_semi_structured",
    "unpatch_model",
]
