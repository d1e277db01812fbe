"""hf_tdrop.models: the CIFAR ResNet and the MLP as registered HF PreTrainedModels."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from hf_tdrop import patch_model, prune_model, targeted_layers, unpatch_model
from hf_tdrop.models import (
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarResNetModel,
    MLPConfig,
    MLPForImageClassification,
    resnet32_config,
)


def _convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_resnet32_architecture_matches_the_paper():
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(resnet32_config())
    assert model.config.depth == 32
    convs = _convs(model)
    main_path = [(n, m) for n, m in convs if "shortcut" not in n]
    shortcuts = [(n, m) for n, m in convs if "shortcut" in n]
    # 3x3 stem + 3 stages x 5 blocks x 2 convs = 31 convolutions, + the linear head = 32 weight layers
    assert len(main_path) == 31 and all(m.kernel_size == (3, 3) for _, m in main_path)
    assert [m.out_channels for _, m in main_path] == [16] + [16] * 10 + [32] * 10 + [64] * 10
    # projection shortcuts only where the shape changes (first block of stages 2 and 3)
    assert [n for n, _ in shortcuts] == ["resnet.stages.1.0.shortcut.0", "resnet.stages.2.0.shortcut.0"]
    assert [m.stride for _, m in main_path if m.stride != (1, 1)] == [(2, 2), (2, 2)]
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 64
    # the well-known size of ResNet-32 with parameter-free (option A) shortcuts: 0.46M
    option_a = CifarResNetForImageClassification(resnet32_config(shortcut="zero_pad"))
    n_params = sum(p.numel() for p in option_a.parameters())
    assert 460_000 < n_params < 470_000
    assert not [n for n, _ in _convs(option_a) if "shortcut" in n]


@pytest.mark.parametrize("shortcut", ["projection", "zero_pad"])
def test_forward_shapes_loss_and_features(shortcut):
    torch.manual_seed(0)
    config = CifarResNetConfig(num_channels=1, stage_channels=(4, 8, 16), blocks_per_stage=1, shortcut=shortcut,
                               num_labels=3)
    model = CifarResNetForImageClassification(config).eval()
    x = torch.randn(5, 1, 12, 12)
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = model(pixel_values=x, labels=labels)
    assert out.logits.shape == (5, 3)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    assert model.resnet(x).shape == (5, 16)  # pooled features of the last stage
    assert model(x, return_dict=False)[0].shape == (5, 3)
    assert model.accepts_loss_kwargs is False  # Trainer must not rescale the mean loss by num_items_in_batch


def test_config_validation():
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNetConfig(shortcut="bottleneck")
    with pytest.raises(ValueError, match="stage_channels"):
        CifarResNetConfig(stage_channels=[])
    with pytest.raises(ValueError, match="blocks_per_stage"):
        CifarResNetConfig(blocks_per_stage=0)
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLPConfig(hidden_sizes=[10, 0])
    with pytest.raises(ValueError, match="activation"):
        MLPConfig(activation="swish")
    with pytest.raises(ValueError, match="input_size"):
        MLPConfig(input_size=0)


def test_auto_classes_and_save_load_roundtrip(tmp_path):
    assert isinstance(AutoConfig.for_model("tdrop_cifar_resnet"), CifarResNetConfig)
    assert isinstance(AutoConfig.for_model("tdrop_mlp"), MLPConfig)
    torch.manual_seed(0)
    config = CifarResNetConfig(stage_channels=(4, 8, 8), blocks_per_stage=1, num_labels=4)
    model = AutoModelForImageClassification.from_config(config)
    assert isinstance(model, CifarResNetForImageClassification)
    assert isinstance(AutoModel.from_config(config), CifarResNetModel)
    with torch.no_grad():  # non-trivial BN statistics must survive the round trip too
        model.train()(torch.randn(8, 3, 8, 8))
    model.eval()
    model.save_pretrained(tmp_path / "resnet")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "resnet").eval()
    assert type(loaded) is CifarResNetForImageClassification
    assert loaded.config.stage_channels == [4, 8, 8] and loaded.config.blocks_per_stage == 1
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x).logits, loaded(x).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name

    mlp = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[7, 5], num_labels=3)).eval()
    mlp.save_pretrained(tmp_path / "mlp")
    mlp2 = AutoModelForImageClassification.from_pretrained(tmp_path / "mlp").eval()
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(mlp(x).logits, mlp2(x).logits)


def test_patch_model_targets_every_conv_but_not_the_classifier():
    torch.manual_seed(0)
    model = CifarResNetForImageClassification(resnet32_config())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x).logits
    patch_model(model, alpha=0.5, gamma=0.5, mode="unit")
    layers = targeted_layers(model)
    assert set(layers) == {n for n, _ in _convs(model)}  # 31 + 2 shortcut convolutions
    assert len(layers) == 33 and "classifier" not in layers
    assert torch.equal(model(x).logits, before)  # eval: exactly the unpatched computation
    model.train()
    out = model(x, labels=torch.tensor([1, 2]))
    out.loss.backward()  # gradients flow through the masked convolutions
    assert model.resnet.stem.weight.grad is not None
    unpatch_model(model)
    assert not targeted_layers(model)


def test_mlp_structure_and_pruning_counts():
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPConfig(input_size=64, hidden_sizes=[10]))
    assert [tuple(l.weight.shape) for l in model.layers] == [(10, 64)]
    assert model.classifier.weight.shape == (10, 10)
    report = prune_model(model, 0.75, mode="weight")
    # only the hidden layer is targeted: 48 of the 64 incoming weights of each of the 10 units
    assert int((model.layers[0].weight == 0).sum()) == 480
    assert int((model.classifier.weight == 0).sum()) == 0
    assert [l.name for l in report.layers] == ["layers.0"]
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("which", ["resnet", "mlp"])
def test_classifier_outputs_dict_and_tuple_agree(which):
    torch.manual_seed(0)
    if which == "resnet":
        model = CifarResNetForImageClassification(CifarResNetConfig(blocks_per_stage=1, stage_channels=[4, 8, 16], num_labels=3))
        x = torch.randn(4, 3, 8, 8)
    else:
        model = MLPForImageClassification(MLPConfig(input_size=12, hidden_sizes=[6], num_labels=3))
        x = torch.randn(4, 12)
    model.eval()
    labels = torch.tensor([0, 2, 1, 2])
    out = model(x, labels=labels)
    loss, logits = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(out.logits, labels))
    assert out.loss is not None and torch.equal(loss, out.loss)
    (only_logits,) = model(x, return_dict=False)
    torch.testing.assert_close(only_logits, out.logits)
    assert model(x).loss is None
