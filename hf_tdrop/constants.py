"""Names shared across the package: files written beside checkpoints, attributes set on models and
layers, and the method name of targeted dropout. This module imports nothing, so every other module
can use it."""

TDROP_CONFIG_NAME = "tdrop_config.json"
"""The record :func:`hf_tdrop.save_pruned` writes beside a pruned checkpoint."""
TRAINING_CONFIG_NAME = "tdrop_training_config.json"
"""File name under which a config's ``save_pretrained`` writes a training config."""
CRITERIA_NAME = "tdrop_criteria.safetensors"
"""Sidecar of a checkpoint holding learned pruning scores (:func:`hf_tdrop.save_learned_criteria`)."""
LEGACY_CRITERIA_NAME = "learned_criterion.pt"
"""Older sidecar (``torch.save`` of ``{layer: {"name", "granularity", "scores"}}``), still read."""
TRAINING_CONFIG_KEY = "targeted_dropout"
"""Entry of ``tdrop_config.json`` holding the training config (its ``to_dict()``) or null."""
TDROP_FORMAT = "hf-tdrop"
"""The ``"format"`` entry of ``tdrop_config.json`` and of the learned-scores sidecar."""
MODEL_CARD_NAME = "README.md"

CONFIG_ATTR = "tdrop_config"
"""Attribute under which ``patch_model`` keeps the config it applied on the model."""
METHOD_ATTR = "tdrop_method"
"""Attribute of a patched layer holding its per-layer state (``hf_tdrop.methods.base.MethodState``)."""
STATE_ATTR = "tdrop_state"
"""Read-only alias on a patched layer for its method's per-layer settings (``MethodState.config``;
for targeted dropout its ``TargetingState``)."""
CRITERION_ATTR = "tdrop_criterion"
"""Attribute under which ``finalize_model`` leaves a layer's learned pruning order."""

TARGETED_DROPOUT = "targeted_dropout"
"""Registry name of targeted dropout (the method a config dict without ``"method"`` describes)."""
