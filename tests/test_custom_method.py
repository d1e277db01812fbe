"""A method registered from outside the package, in one file: the worked example of the methods
guide ("Adding a method"). A learned scale per output unit with an L2 loss pulling it towards 0:
patched, trained with ``RegularizationCallback`` through ``Trainer``, finalised, saved with
``save_pretrained`` and reloaded with stock ``from_pretrained``, computing the same eval outputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hf_tdrop import (RegularizationCallback, available_methods, config_from_dict, finalize_model, patch_model,
                      regularization_loss, targeted_layers)
from hf_tdrop.config import check_number
from hf_tdrop.methods import Method, MethodConfig, register_method
from hf_tdrop.methods.base import n_units, per_unit, settings

# --------------------------------------------------------------------------------- the whole method


@dataclass
class UnitScaleConfig(MethodConfig):
    """A learned scale per output unit, with the loss ``l2 · Σ scale²``."""

    l2: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        self.l2 = check_number("l2", self.l2, low=0.0)


class UnitScale(Method):  # registered by the fixture below; in user code: @register_method
    name = "unit_scale"
    config_class = UnitScaleConfig
    extra_tensors = ("unit_scale",)

    def setup(self, module, config):
        ones = torch.ones(n_units(module), device=module.weight.device)
        module.register_parameter("unit_scale", torch.nn.Parameter(ones))

    def forward(self, module, input):  # noqa: A002
        return module.scale_units(module.compute(input, module.weight, module.bias), module.unit_scale)

    def loss(self, module, step):
        return settings(module).l2 * module.unit_scale.square().sum()

    def fold(self, module):
        module.weight.mul_(per_unit(module, module.unit_scale).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.mul_(module.unit_scale.to(module.bias.dtype))


# ---------------------------------------------------------------------------------------- the tests


@pytest.fixture(autouse=True, scope="module")
def registered():
    """``register_method(UnitScale)`` for this module's tests, unregistered afterwards so the other
    test modules see the built-in registry only."""
    from hf_tdrop.methods import base

    assert register_method(UnitScale) is UnitScale
    yield
    base._REGISTRY.pop(UnitScale.name)


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 50, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_the_method_is_registered_and_its_config_round_trips():
    assert "unit_scale" in available_methods() and UnitScaleConfig.method == "unit_scale"
    config = UnitScaleConfig(l2=0.5, target_modules=["intermediate.dense"])
    assert config.to_dict()["method"] == "unit_scale"
    assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="`l2` must be in"):
        UnitScaleConfig(l2=-1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_method(UnitScale)


def test_patch_train_finalise_save_and_reload_with_stock_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    model = _tiny_bert()
    patch_model(model, config=UnitScaleConfig(l2=0.1, target_modules=["intermediate.dense", "output.dense"]))
    layers = targeted_layers(model)
    assert set(layers) == {"bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense",
                           "bert.encoder.layer.0.attention.output.dense"}
    assert all(v == {"type": "Linear", "method": "unit_scale", "l2": 0.1} for v in layers.values())
    scales = [m.unit_scale for n, m in model.named_modules() if n in layers]
    assert float(regularization_loss(model).detach()) == pytest.approx(0.1 * sum(s.numel() for s in scales))

    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=0.05,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[RegularizationCallback()])
    trainer.train()
    # the L2 term pulled every scale below its start, and the logs carry it
    assert all(bool((s < 1).all()) for s in scales)
    assert any("regularization_loss" in entry for entry in trainer.state.log_history)

    model.eval()
    batch = _Data(4)[slice(0, 4)]
    with torch.no_grad():
        patched_out = model(input_ids=batch["input_ids"]).logits
    finalize_model(model)
    assert not targeted_layers(model) and "unit_scale" not in str(list(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, patched_out, rtol=1e-5, atol=1e-6)

    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, patched_out, rtol=1e-5, atol=1e-6)
