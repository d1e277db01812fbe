"""hf-tdrop: Targeted Dropout (Gomez et al., 2019) for Hugging Face Transformers and any PyTorch model."""

from .config import MODES, TargetedDropoutConfig
from .hub import push_pruned_to_hub, save_pruned
from .patching import get_targeting, is_patched, patch_model, set_targeting, targeted_layers, unpatch_model
from .pruning import METHODS, PruneReport, prune_model, pruned
from .reports import SparsityReport, SweepResult, SweepTable, combine_sweeps, plot_sweeps, prune_sweep, sparsity_report
from .schedules import SCHEDULE_KINDS, TargetingSchedule, TargetingScheduler
from .shrink import ShrinkReport, shrink_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # TargetedDropoutCallback imports transformers.Trainer (slow); load it only when asked for.
    if name == "TargetedDropoutCallback":
        from .callback import TargetedDropoutCallback

        return TargetedDropoutCallback
    raise AttributeError(f"module 'hf_tdrop' has no attribute {name!r}")

__all__ = [
    "METHODS",
    "MODES",
    "PruneReport",
    "SCHEDULE_KINDS",
    "ShrinkReport",
    "SparsityReport",
    "SweepResult",
    "SweepTable",
    "TargetedDropoutCallback",
    "TargetedDropoutConfig",
    "TargetingSchedule",
    "TargetingScheduler",
    "combine_sweeps",
    "get_targeting",
    "is_patched",
    "patch_model",
    "plot_sweeps",
    "prune_model",
    "prune_sweep",
    "pruned",
    "push_pruned_to_hub",
    "save_pruned",
    "set_targeting",
    "shrink_model",
    "sparsity_report",
    "targeted_layers",
    "unpatch_model",
]
