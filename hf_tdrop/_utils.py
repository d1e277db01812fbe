"""Small helpers shared by several modules of the package."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / FSDP / ``torch.compile`` wrappers (accelerate's ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)
