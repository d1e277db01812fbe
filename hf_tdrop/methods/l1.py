"""L1 regularisation of the patched layers' weights (the reference's ``l1_norm``): the loss gains
``λ · Σ_layers mean|W|``. The layers compute as usual; pruned afterwards by magnitude."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, MethodConfig, check_number, register_method, settings


@dataclass
class L1Config(MethodConfig):
    """L1 penalty ``l1 * Σ over patched layers of mean(|W|)`` (output heads are excluded by the
    default layer selection, as in the reference).

    Args:
        l1: the coefficient λ, > 0 (the reference uses 1e-3, 1e-2, 1e-1).
    """

    l1: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.l1 = check_number("l1", self.l1, low=0.0, low_open=True)

    def run_label(self) -> str:
        return f"L1 λ={self.l1:g}"


@register_method
class L1(Method):
    name = "l1"
    config_class = L1Config

    def loss(self, module, step):
        return settings(module).l1 * module.weight.abs().mean()
