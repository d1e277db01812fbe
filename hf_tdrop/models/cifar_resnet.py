"""CIFAR-style ResNet (He et al., 2016, section 4.2) as a Hugging Face ``PreTrainedModel``.

The network of Gomez et al. (2019)'s image experiments (ResNet-32 on CIFAR-10): a 3x3 stem
convolution, three stages of ``blocks_per_stage`` basic blocks (two 3x3 convolutions with batch
norm) with ``stage_channels`` = (16, 32, 64) channels, the second and third stage starting with a
stride-2 block, global average pooling and a linear ``classifier`` head. Depth is
``6 * blocks_per_stage + 2`` (5 blocks per stage: ResNet-32).

Input ``pixel_values``: ``[batch, num_channels, H, W]`` float (any H, W >= 1; 32x32 for CIFAR);
output: :class:`transformers.modeling_outputs.ImageClassifierOutputWithNoAttention` with ``logits``
``[batch, num_labels]`` and, when ``labels`` ``[batch]`` are given, the cross-entropy ``loss``.

The head is named ``classifier``, so :func:`hf_tdrop.patch_model` targets every convolution but not
the head by default. Importing :mod:`hf_tdrop.models` registers the config and model with
``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageClassification`` (``model_type``
``"tdrop_cifar_resnet"``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from .outputs import classification_output

SHORTCUTS = ("projection", "zero_pad")


class CifarResNetConfig(PretrainedConfig):
    """Configuration of :class:`CifarResNetForImageClassification`.

    Args:
        num_channels: input image channels (3 for RGB, 1 for grayscale).
        stage_channels: channels of each stage (default ``(16, 32, 64)``); every stage after the first
            halves the spatial size.
        blocks_per_stage: basic blocks per stage (5: ResNet-32, 3: ResNet-20, 9: ResNet-56).
        shortcut: ``"projection"`` (1x1 convolution + batch norm where the shape changes, He et al.'s
            option B) or ``"zero_pad"`` (strided identity padded with zero channels, option A,
            parameter-free).
        num_labels / id2label / label2id: as in every transformers config (default 10 labels).

    Raises:
        ValueError: a non-positive size, an empty ``stage_channels``, or an unknown ``shortcut``.
    """

    model_type = "tdrop_cifar_resnet"

    def __init__(
        self,
        num_channels: int = 3,
        stage_channels: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 5,
        shortcut: str = "projection",
        **kwargs,
    ):
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 10
        stage_channels = list(stage_channels)
        for name, value in (("num_channels", num_channels), ("blocks_per_stage", blocks_per_stage)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if not stage_channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in stage_channels):
            raise ValueError(f"`stage_channels` must be a non-empty list of positive ints, got {stage_channels!r}.")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"`shortcut` must be one of {list(SHORTCUTS)}, got {shortcut!r}.")
        self.num_channels = num_channels
        self.stage_channels = stage_channels
        self.blocks_per_stage = blocks_per_stage
        self.shortcut = shortcut
        super().__init__(**kwargs)

    @property
    def depth(self) -> int:
        """Number of weight layers on the longest path: ``2 * blocks * stages + 2``."""
        return 2 * self.blocks_per_stage * len(self.stage_channels) + 2


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra > 0 else x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "zero_pad":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class CifarResNetPreTrainedModel(PreTrainedModel):
    config_class = CifarResNetConfig
    config: CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The loss is a per-batch mean that ignores Trainer's `num_items_in_batch`; without this, Trainer sees
    # `**kwargs` in forward and multiplies the loss by the world size under DDP.
    accepts_loss_kwargs = False
    _no_split_modules = ["BasicBlock"]

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)


class CifarResNetModel(CifarResNetPreTrainedModel):
    """The backbone: stem and stages; returns pooled features ``[batch, stage_channels[-1]]``."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        channels = config.stage_channels
        self.stem = nn.Conv2d(config.num_channels, channels[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        self.act = nn.ReLU()
        stages = []
        in_channels = channels[0]
        for i, out_channels in enumerate(channels):
            blocks = []
            for j in range(config.blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride, config.shortcut))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(pixel_values)))
        for stage in self.stages:
            x = stage(x)
        return self.pool(x).flatten(1)


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    """:class:`CifarResNetModel` plus a linear ``classifier`` head (see the module docstring)."""

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = CifarResNetModel(config)
        self.classifier = nn.Linear(config.stage_channels[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.LongTensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention:
        logits = self.classifier(self.resnet(pixel_values))
        return classification_output(logits, labels, return_dict, self.config)
