"""hf-tdrop: Targeted Dropout (Gomez et al., 2019) for Hugging Face Transformers and any PyTorch model."""

from .config import MODES, TargetedDropoutConfig
from .patching import get_targeting, is_patched, patch_model, set_targeting, targeted_layers, unpatch_model

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "TargetedDropoutConfig",
    "get_targeting",
    "is_patched",
    "patch_model",
    "set_targeting",
    "targeted_layers",
    "unpatch_model",
]
