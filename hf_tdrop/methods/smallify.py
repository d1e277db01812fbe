"""Smallify (Leclerc et al., 2018), as the reference's ``smallify_dropout``: a learned switch per
output unit multiplies the unit's output, with an L1 penalty on the switches; a moving average
(momentum 0.9) of each switch's sign and of its squared deviation (the sign-flip variance) is kept,
and a unit whose variance has reached the threshold (0.5) is masked for good. Finalisation folds
``switch · mask`` into each unit's weights and bias; the model is then pruned by magnitude."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tracking import optimizer_steps
from .base import Method, MethodConfig, check_number, n_units, per_unit, register_method, settings

SWITCH = "smallify_switch"
MASK = "smallify_mask"
SIGN_AVG = "smallify_sign_avg"
SIGN_VAR = "smallify_sign_var"


@dataclass
class SmallifyConfig(MethodConfig):
    """Smallify switches.

    Args:
        l1: coefficient of ``Σ |switch|`` (the reference: 1e-3 ... 1e-6; default 1e-4).
        momentum: of the sign moving averages, in [0, 1) (default 0.9).
        threshold: a unit is masked for good once its sign-flip variance is ``>= threshold`` (default 0.5).

    Switches start uniform in [0, 1). The moving averages are updated once per optimizer step, at
    the first training forward pass after it (the reference's semantics, which updates at every
    training step): the micro-batches of gradient accumulation and the recomputation of gradient
    checkpointing see the same mask and count once.
    """

    l1: float = 1e-4
    momentum: float = 0.9
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.l1 = check_number("l1", self.l1, low=0.0)
        self.momentum = check_number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        self.threshold = check_number("threshold", self.threshold, low=0.0, low_open=True)

    def run_label(self) -> str:
        return f"Smallify λ={self.l1:g}"


def update_mask(module) -> None:
    """One step of the sign statistics; masks (for good) the units whose variance reached the
    threshold before this step, as the reference does."""
    config: SmallifyConfig = settings(module)
    with torch.no_grad():
        switch = getattr(module, SWITCH)
        mask, avg, var = getattr(module, MASK), getattr(module, SIGN_AVG), getattr(module, SIGN_VAR)
        mask.mul_((var < config.threshold).to(mask.dtype))
        sign = torch.sign(switch)
        var.mul_(config.momentum).add_((1.0 - config.momentum) * (sign - avg) ** 2)
        avg.mul_(config.momentum).add_((1.0 - config.momentum) * sign)


@register_method
class Smallify(Method):
    name = "smallify"
    config_class = SmallifyConfig
    extra_tensors = (SWITCH, MASK, SIGN_AVG, SIGN_VAR)

    def __init__(self):
        self._updated_at: "int | None" = None  # optimizer step of the switch at the last statistics update

    def setup(self, module, config):
        weight = module.weight
        switch = torch.rand(n_units(module), device=weight.device, dtype=torch.float32)
        module.register_parameter(SWITCH, torch.nn.Parameter(switch))
        module.register_buffer(MASK, torch.ones_like(switch))
        module.register_buffer(SIGN_AVG, torch.sign(switch))
        module.register_buffer(SIGN_VAR, torch.zeros_like(switch))

    def forward(self, module, input):  # noqa: A002
        if module.training:
            step = optimizer_steps(getattr(module, SWITCH))
            if step != self._updated_at:
                update_mask(module)
                self._updated_at = step
        gates = getattr(module, SWITCH) * getattr(module, MASK)
        return module.scale_units(module.compute(input, module.weight, module.bias), gates)

    def loss(self, module, step):
        return settings(module).l1 * getattr(module, SWITCH).abs().sum()

    def fold(self, module):
        gates = getattr(module, SWITCH) * getattr(module, MASK)
        module.weight.mul_(per_unit(module, gates).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.mul_(gates.to(module.bias.dtype))
