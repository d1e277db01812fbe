"""The random-target control (the reference's ``targeted_weight_random`` / ``targeted_unit_random``):
targeted dropout whose targeted set is a fixed random γ-fraction of each w_o's weights (or of each
layer's units), drawn once at patching, instead of the lowest magnitudes. It shows that the
targeting, not the dropout, makes a network robust to magnitude pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import masking
from ..config import check_fraction
from ..constants import METHOD_ATTR
from .base import (
    Method,
    MethodConfig,
    check_choice,
    check_flag,
    n_units,
    per_unit,
    register_method,
    settings,
    weight2d,
)

SCORES = "random_target_scores"


@dataclass
class RandomTargetConfig(MethodConfig):
    """Targeted dropout with a fixed random targeted set.

    Each layer gets uniform random scores at patching (a buffer, saved in checkpoints): in weight
    mode the targeted set of w_o is its ``floor(gamma * fan_in)`` lowest-score entries, in unit mode
    the ``floor(gamma * n_out)`` lowest-score units. The set never depends on the weights, and does
    not change during training (a γ ramp grows it: lower γ sets are subsets of higher ones). Each
    targeted element is dropped with probability ``alpha`` at every training forward pass. α and γ
    are changed by :func:`hf_tdrop.set_targeting`, so schedules and the callback drive them too.

    Args:
        alpha, gamma: as in :class:`hf_tdrop.TargetedDropoutConfig`.
        mode: ``"weight"`` or ``"unit"``.
        rescale: scale kept weights / units by ``1 / (1 - gamma * alpha)`` in training (default False).
        drop_targeted_at_eval: zero the targeted set in eval mode (the reference's evaluation);
            default False (eval computes the layer unchanged).
    """

    alpha: float = 0.5
    gamma: float = 0.5
    mode: str = "weight"
    rescale: bool = False
    drop_targeted_at_eval: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = check_fraction("alpha", self.alpha)
        self.gamma = check_fraction("gamma", self.gamma)
        check_choice("mode", self.mode, ("weight", "unit"))
        check_flag("rescale", self.rescale)
        check_flag("drop_targeted_at_eval", self.drop_targeted_at_eval)

    def run_label(self) -> str:
        return f"random-target {self.mode} α={self.alpha:g} γ={self.gamma:g}"


def targeted_set(module) -> torch.Tensor:
    """The fixed random targeted set at the layer's current γ: bool ``[n_out, fan_in]`` (weight
    mode) or ``[n_out]`` (unit mode)."""
    config: RandomTargetConfig = settings(module)
    scores = getattr(module, SCORES)
    if config.mode == "weight":
        s2d = weight2d(module, scores)
        return masking.lowest_k(s2d, masking.fraction_count(config.gamma, s2d.shape[1]))
    return masking.lowest_k(scores, masking.fraction_count(config.gamma, scores.shape[0]))


@register_method
class RandomTarget(Method):
    name = "random_target"
    config_class = RandomTargetConfig
    extra_tensors = (SCORES,)
    targeting = True

    def setup(self, module, config):
        weight = module.weight
        shape = weight.shape if config.mode == "weight" else (n_units(module),)
        module.register_buffer(SCORES, torch.rand(shape, device=weight.device))

    def forward(self, module, input):  # noqa: A002
        config: RandomTargetConfig = settings(module)
        if not module.training and not config.drop_targeted_at_eval:
            return module.compute(input, module.weight, module.bias)
        targeted = targeted_set(module)
        if module.training:
            drop = targeted & (torch.rand(targeted.shape, device=targeted.device) < config.alpha)
            kept = 1.0 - config.gamma * config.alpha
            scale = 1.0 / kept if config.rescale and kept > 0 else 1.0
        else:
            drop, scale = targeted, 1.0
        weight = module.weight
        keep = (~drop).to(weight.dtype) * scale
        if config.mode == "weight":
            keep = masking.to_weight_layout(keep, weight, getattr(module, METHOD_ATTR).layout)
            return module.compute(input, weight * keep, module.bias)
        return module.scale_units(module.compute(input, weight, module.bias), keep)

    def fold(self, module):
        """With ``drop_targeted_at_eval`` the eval layer zeroes its targeted set: zero those weights
        (unit mode: the targeted units' weights and biases) so the plain layer computes the same."""
        config: RandomTargetConfig = settings(module)
        if not config.drop_targeted_at_eval:
            return
        targeted = targeted_set(module)
        weight = module.weight
        if config.mode == "weight":
            drop = masking.to_weight_layout(targeted, weight, getattr(module, METHOD_ATTR).layout)
            weight.masked_fill_(drop.to(torch.bool), 0.0)
            return
        weight.mul_(per_unit(module, (~targeted).to(weight.dtype)))
        if module.bias is not None:
            module.bias.masked_fill_(targeted, 0.0)
