"""The classification head's output, shared by the project's image classifiers."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention


def classification_output(
    logits: torch.Tensor, labels: Optional[torch.Tensor], return_dict: Optional[bool], config: PretrainedConfig
) -> Union[ImageClassifierOutputWithNoAttention, tuple]:
    """``logits [batch, num_labels]`` (and the cross-entropy loss when ``labels [batch]`` are given)
    as transformers returns them: an ``ImageClassifierOutputWithNoAttention``, or the tuple
    ``(loss, logits)`` / ``(logits,)`` when ``return_dict`` (default ``config.return_dict``) is False."""
    loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
    return_dict = return_dict if return_dict is not None else config.return_dict
    if not return_dict:
        return (loss, logits) if loss is not None else (logits,)
    return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)
