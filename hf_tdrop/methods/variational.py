"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, 2017), per weight, as the reference's
``variational``.

Each weight gets a learned ``log σ²`` (initialised at -10); ``log α = clip(log σ² - log(w² + 1e-8), -8, 8)``.
In training the layer samples its pre-activations with the local reparameterisation trick:
``mean = layer(x; w)``, ``var = layer(x²; α w²)`` (no bias), output ``mean + sqrt(var + 1e-8) · ε``
with ``ε ~ N(0, 1)`` (``log σ²``, ``log α`` and the standard deviation in float32 whatever the
weight's or autocast's dtype: in float16 ``1e-8`` is 0 and an all-zero input would give an infinite
gradient). In eval the weights with ``log α >= threshold`` (3, the reference's) are
zeroed. The loss term is the KL approximation of Molchanov et al.,
``-KL ≈ k1 σ(k2 + k3 log α) - 0.5 log(1 + 1/α) - k1`` (``k1, k2, k3 = 0.63576, 1.87320, 1.48695``),
summed over the weights, times ``kl_scale / N`` and a linear warm-up ``min(1, step / kl_warmup_steps)``.
Learned pruning criterion ``"log_alpha"``: highest ``log α`` first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (
    Method,
    MethodConfig,
    check_int,
    check_number,
    register_method,
    settings,
    warmup_factor,
    weight2d,
)

LOG_SIGMA2 = "vd_log_sigma2"
K1, K2, K3 = 0.63576, 1.87320, 1.48695


@dataclass
class VariationalDropoutConfig(MethodConfig):
    """Sparse variational dropout.

    Args:
        dataset_size: training-set size ``N``; the KL is divided by it (required).
        kl_scale: extra factor on the KL term (the reference's ``var_scale``: 1, or 1/100 in its
            "scaled" runs; default 1).
        kl_warmup_steps: the KL weight grows linearly from 0 to 1 over this many optimizer updates
            (the reference: 50,000); 0 = no warm-up (default). With a warm-up,
            :func:`hf_tdrop.regularization_loss` needs ``step``.
        threshold: in eval (and when finalising) weights with ``log α >= threshold`` are zeroed (default 3).
        init_log_sigma2: initial ``log σ²`` (default -10).

    Turn weight decay off for these runs (the reference does): it would also pull ``log σ²`` to 0.
    """

    dataset_size: int = 0
    kl_scale: float = 1.0
    kl_warmup_steps: int = 0
    threshold: float = 3.0
    init_log_sigma2: float = -10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("dataset_size", self.dataset_size, 1)
        self.kl_scale = check_number("kl_scale", self.kl_scale, low=0.0)
        check_int("kl_warmup_steps", self.kl_warmup_steps, 0)
        self.threshold = check_number("threshold", self.threshold)
        self.init_log_sigma2 = check_number("init_log_sigma2", self.init_log_sigma2)

    def run_label(self) -> str:
        return f"variational dropout ×{self.kl_scale:g}"


def log_alpha(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``clip(log σ² - log(w² + 1e-8), -8, 8)``, in float32."""
    weight = weight.float()
    return (log_sigma2.float() - torch.log(weight * weight + 1e-8)).clamp(-8.0, 8.0)


def kl_approximation(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s approximation of ``KL(q(w) || p(w))`` per weight (elementwise)."""
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * torch.nn.functional.softplus(-log_alpha) - K1
    return -neg_kl


@register_method
class VariationalDropout(Method):
    name = "variational_dropout"
    config_class = VariationalDropoutConfig
    criterion = "log_alpha"
    criterion_granularity = "weight"
    extra_tensors = (LOG_SIGMA2,)

    def setup(self, module, config):
        weight = module.weight
        init = torch.full(weight.shape, config.init_log_sigma2, device=weight.device, dtype=torch.float32)
        module.register_parameter(LOG_SIGMA2, torch.nn.Parameter(init))

    def _log_alpha(self, module) -> torch.Tensor:
        return log_alpha(module.weight, getattr(module, LOG_SIGMA2))

    def forward(self, module, input):  # noqa: A002
        weight = module.weight
        if not module.training:
            keep = (self._log_alpha(module) < settings(module).threshold).to(weight.dtype)
            return module.compute(input, weight * keep, module.bias)
        mean = module.compute(input, weight, module.bias)
        var_weight = (torch.exp(self._log_alpha(module)) * weight.float() ** 2).to(weight.dtype)
        var = module.compute(input * input, var_weight, None)
        std = torch.sqrt(var.float() + 1e-8)
        return mean + (std * torch.randn_like(std)).to(mean.dtype)

    def loss(self, module, step):
        config: VariationalDropoutConfig = settings(module)
        factor = warmup_factor("kl_warmup_steps", config.kl_warmup_steps, step, self.name)
        return kl_approximation(self._log_alpha(module)).sum() * (config.kl_scale * factor / config.dataset_size)

    def criterion_scores(self, module):
        return -weight2d(module, self._log_alpha(module))

    def fold(self, module):
        keep = self._log_alpha(module) < settings(module).threshold
        module.weight.mul_(keep.to(module.weight.dtype))
