"""A multilayer perceptron image classifier as a Hugging Face ``PreTrainedModel``.

The toy of Gomez et al. (2019)'s Table 1 / Figure 1 is ``TdropMLPConfig(hidden_sizes=[10])``: one
dense hidden layer of ten ReLU units. Input ``pixel_values`` ``[batch, *image_shape]`` is flattened
to ``[batch, input_size]`` (``input_size`` = C*H*W, e.g. 64 for scikit-learn's 8x8 digits); hidden
layers ``layers.0``, ``layers.1``, ... are ``nn.Linear`` + activation; the head is the linear
``classifier`` (not targeted by :func:`hf_tdrop.patch_model` by default). Registered with the Auto
classes as ``model_type`` ``"tdrop_mlp"`` on import of :mod:`hf_tdrop.models`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from .outputs import classification_output

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLPConfig(PretrainedConfig):
    """Configuration of :class:`MLPForImageClassification`.

    Args:
        input_size: number of input features after flattening (C*H*W).
        hidden_sizes: widths of the hidden layers, in order (default ``[10]``, the paper's toy).
        activation: one of ``"relu"``, ``"tanh"``, ``"gelu"``.
        num_labels: number of classes (default 10).

    Raises:
        ValueError: a non-positive size or an unknown activation.
    """

    model_type = "tdrop_mlp"

    def __init__(self, input_size: int = 64, hidden_sizes: Sequence[int] = (10,), activation: str = "relu", **kwargs):
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 10
        hidden_sizes = list(hidden_sizes)
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"`input_size` must be a positive int, got {input_size!r}.")
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"`hidden_sizes` must be a list of positive ints, got {hidden_sizes!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        self.input_size = input_size
        self.hidden_sizes = hidden_sizes
        self.activation = activation
        super().__init__(**kwargs)


class MLPPreTrainedModel(PreTrainedModel):
    config_class = MLPConfig
    config: MLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The loss is a per-batch mean that ignores Trainer's `num_items_in_batch`; without this, Trainer sees
    # `**kwargs` in forward and multiplies the loss by the world size under DDP.
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)


class MLPForImageClassification(MLPPreTrainedModel):
    """Flatten -> [Linear -> activation] * len(hidden_sizes) -> ``classifier`` Linear."""

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        sizes = [config.input_size, *config.hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[config.activation]()
        self.classifier = nn.Linear(sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.LongTensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention:
        x = pixel_values.flatten(1)
        if x.shape[1] != self.config.input_size:
            raise ValueError(
                f"`pixel_values` flatten to {x.shape[1]} features per example, but config.input_size is "
                f"{self.config.input_size}."
            )
        for layer in self.layers:
            x = self.act(layer(x))
        logits = self.classifier(x)
        return classification_output(logits, labels, return_dict, self.config)
