"""Image-classification models used by the paper's experiments, as Hugging Face ``PreTrainedModel``s.

Importing this package registers both configs and models with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageClassification``, so ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
and the Auto classes work with them:

* ``CifarResNetConfig`` / ``CifarResNetForImageClassification`` (``model_type="tdrop_cifar_resnet"``):
  ResNet-32 (and -20/-56, ...) for 32x32 images.
* ``MLPConfig`` / ``MLPForImageClassification`` (``model_type="tdrop_mlp"``): the toy MLP of Table 1.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .cifar_resnet import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel
from .mlp import MLPConfig, MLPForImageClassification


def resnet32_config(num_channels: int = 3, num_labels: int = 10, **kwargs) -> CifarResNetConfig:
    """The paper's ResNet-32: 16/32/64 channels, 5 basic blocks per stage."""
    return CifarResNetConfig(num_channels=num_channels, stage_channels=(16, 32, 64), blocks_per_stage=5,
                             num_labels=num_labels, **kwargs)


def _register() -> None:
    for config_cls, base_cls, head_cls in (
        (CifarResNetConfig, CifarResNetModel, CifarResNetForImageClassification),
        (MLPConfig, None, MLPForImageClassification),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        if base_cls is not None:
            AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, head_cls, exist_ok=True)


_register()

__all__ = [
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "MLPConfig",
    "MLPForImageClassification",
    "resnet32_config",
]
