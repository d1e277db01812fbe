"""hf-tdrop: Targeted Dropout (Gomez et al., 2019) for Hugging Face Transformers and any PyTorch model."""

from .callback import TargetedDropoutCallback
from .config import MODES, TargetedDropoutConfig
from .patching import get_targeting, is_patched, patch_model, set_targeting, targeted_layers, unpatch_model
from .pruning import METHODS, PruneReport, prune_model, pruned
from .reports import SparsityReport, SweepResult, SweepTable, combine_sweeps, plot_sweeps, prune_sweep, sparsity_report
from .schedules import SCHEDULE_KINDS, TargetingSchedule, TargetingScheduler

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "MODES",
    "PruneReport",
    "SCHEDULE_KINDS",
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
    "set_targeting",
    "sparsity_report",
    "targeted_layers",
    "unpatch_model",
]
