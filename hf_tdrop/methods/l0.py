"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma, 2018), per weight or per
output unit, as the reference's ``louizos_weight`` / ``louizos_unit``.

Each gate has a learned ``log α``. In training a gate is sampled at every forward pass,
``s = sigmoid((log u - log(1 - u) + log α) / β)``, ``u ~ U(0, 1)``, stretched to ``(γ, ζ)`` and
clipped to [0, 1]: ``z = clip(s (ζ - γ) + γ, 0, 1)``, which is exactly 0 or exactly 1 with positive
probability. In eval the gate is deterministic, ``clip(sigmoid(log α) (ζ - γ) + γ, 0, 1)``. The gate
multiplies the weight (per weight), or every weight of w_o (per unit; the bias is not gated, as in
the reference). The loss term is the expected number of nonzero gates,
``λ / N · Σ sigmoid(log α - β log(-γ / ζ))`` (per unit: each unit's term weighted by its fan-in),
with ``N`` the training-set size. Learned pruning criterion ``"gates"``: ``log α``, lowest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import (
    Method,
    MethodConfig,
    check_choice,
    check_int,
    check_number,
    n_units,
    per_unit,
    register_method,
    settings,
    weight2d,
)

LOG_ALPHA = "l0_log_alpha"


@dataclass
class L0Config(MethodConfig):
    """Hard-concrete L0 gates.

    Args:
        dataset_size: training-set size ``N``; the expected-L0 cost is divided by it (required).
        mode: ``"weight"`` (one gate per weight) or ``"unit"`` (one gate per output unit).
        l0: cost coefficient λ, > 0 (the reference's ``louizos_cost``: 1e-1 ... 1e-6; default 1e-3).
        beta, zeta, gamma: temperature β > 0 and stretch interval (γ, ζ), γ < 0 < 1 < ζ
            (defaults 2/3, 1.1, -0.1, the reference's).
        init_drop_rate: ``log α`` is initialised from ``N(log((1 - p) / p), 0.01)`` with this ``p``
            (default 0.5, the L0 paper's code: gates start undecided and learn, with Adam at 1e-3 in
            their own parameter group, see :func:`hf_tdrop.method_optimizer`; the TD reference's
            0.001 puts ``log α`` at 6.9, where the gates hardly move).
    """

    dataset_size: int = 0
    mode: str = "weight"
    l0: float = 1e-3
    beta: float = 2.0 / 3.0
    zeta: float = 1.1
    gamma: float = -0.1
    init_drop_rate: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("dataset_size", self.dataset_size, 1)
        check_choice("mode", self.mode, ("weight", "unit"))
        self.l0 = check_number("l0", self.l0, low=0.0, low_open=True)
        self.beta = check_number("beta", self.beta, low=0.0, low_open=True)
        self.zeta = check_number("zeta", self.zeta, low=1.0, low_open=True)
        self.gamma = check_number("gamma", self.gamma, high=0.0, high_open=True)
        self.init_drop_rate = check_number("init_drop_rate", self.init_drop_rate, low=0.0, high=1.0,
                                           low_open=True, high_open=True)

    def run_label(self) -> str:
        return f"L0 {self.mode} λ={self.l0:g}"


def sample_gates(log_alpha: torch.Tensor, beta: float, zeta: float, gamma: float) -> torch.Tensor:
    """One hard-concrete sample per gate: values in [0, 1], exactly 0 or 1 with positive probability."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """The eval gate ``clip(sigmoid(log α) (ζ - γ) + γ, 0, 1)``."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float, zeta: float, gamma: float) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log α - β log(-γ / ζ))`` per gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


@register_method
class L0(Method):
    name = "l0"
    config_class = L0Config
    criterion = "gates"
    extra_tensors = (LOG_ALPHA,)

    def setup(self, module, config):
        weight = module.weight
        shape = weight.shape if config.mode == "weight" else (n_units(module),)
        mean = math.log(1.0 - config.init_drop_rate) - math.log(config.init_drop_rate)
        init = torch.randn(shape, device=weight.device, dtype=torch.float32) * 0.01 + mean
        module.register_parameter(LOG_ALPHA, torch.nn.Parameter(init))

    def _gates(self, module) -> torch.Tensor:
        config: L0Config = settings(module)
        log_alpha = getattr(module, LOG_ALPHA)
        if module.training:
            return sample_gates(log_alpha, config.beta, config.zeta, config.gamma)
        return deterministic_gates(log_alpha, config.zeta, config.gamma)

    def _gated_weight(self, module, gates):
        gates = gates.to(module.weight.dtype)
        return module.weight * (gates if settings(module).mode == "weight" else per_unit(module, gates))

    def forward(self, module, input):  # noqa: A002
        return module.compute(input, self._gated_weight(module, self._gates(module)), module.bias)

    def loss(self, module, step):
        config: L0Config = settings(module)
        p_nonzero = expected_l0(getattr(module, LOG_ALPHA), config.beta, config.zeta, config.gamma)
        cost = p_nonzero.sum() if config.mode == "weight" else p_nonzero.sum() * weight2d(module).shape[1]
        return config.l0 * cost / config.dataset_size

    def granularity(self, module) -> str:
        return settings(module).mode

    def criterion_scores(self, module):
        log_alpha = getattr(module, LOG_ALPHA)
        return weight2d(module, log_alpha) if settings(module).mode == "weight" else log_alpha

    def fold(self, module):
        config: L0Config = settings(module)
        gates = deterministic_gates(getattr(module, LOG_ALPHA), config.zeta, config.gamma)
        module.weight.copy_(self._gated_weight(module, gates))
