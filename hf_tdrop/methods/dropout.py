"""Untargeted dropout of weights or of whole output units (the reference's ``untargeted_weight`` /
``untargeted_unit``): every weight (or unit) is dropped with probability ``rate`` at each training
forward pass. Pruned afterwards by magnitude."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, MethodConfig, check_choice, check_flag, check_number, n_units, register_method, settings


@dataclass
class DropoutConfig(MethodConfig):
    """Untargeted weight or unit dropout.

    Args:
        rate: drop probability of every weight (``mode="weight"``) or output unit (``"unit"``), in [0, 1).
        mode: ``"weight"`` (DropConnect-style: each weight independently) or ``"unit"`` (each output
            unit: its w_o and bias, i.e. its output, is zeroed).
        rescale: scale the kept weights / units by ``1 / (1 - rate)`` in training (default True, as
            the reference's ``tf.nn.dropout`` and unit dropout do).
    """

    rate: float = 0.5
    mode: str = "weight"
    rescale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rate = check_number("rate", self.rate, low=0.0, high=1.0, high_open=True)
        check_choice("mode", self.mode, ("weight", "unit"))
        check_flag("rescale", self.rescale)

    def run_label(self) -> str:
        return f"dropout {self.mode} {self.rate:g}"


@register_method
class Dropout(Method):
    name = "dropout"
    config_class = DropoutConfig

    def forward(self, module, input):  # noqa: A002
        config: DropoutConfig = settings(module)
        if not module.training or config.rate == 0.0:
            return module.compute(input, module.weight, module.bias)
        weight = module.weight
        scale = 1.0 / (1.0 - config.rate) if config.rescale else 1.0
        if config.mode == "weight":
            keep = (torch.rand(weight.shape, device=weight.device) >= config.rate).to(weight.dtype)
            return module.compute(input, weight * (keep * scale), module.bias)
        keep = (torch.rand(n_units(module), device=weight.device) >= config.rate).to(weight.dtype)
        return module.scale_units(module.compute(input, weight, module.bias), keep * scale)
