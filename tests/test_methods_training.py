"""Every training method through the real paths, on a tiny BERT on CPU: Trainer (with
RegularizationCallback) run -> checkpoint -> resume gives the same parameters (extra tensors
included) as the uninterrupted run; finalize_model -> save_pretrained -> stock from_pretrained gives
identical eval outputs; the Trainer path adds the regulariser's gradient once per update; and an
accelerate loop with regularization_loss."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from accelerate.utils import set_seed
from transformers import AutoModelForSequenceClassification, Trainer

from conftest import tiny_bert, tiny_gpt2, tiny_inputs
from hf_tdrop import (
    DropoutConfig,
    L0Config,
    L1Config,
    RandomTargetConfig,
    RegularizationCallback,
    SmallifyConfig,
    VariationalDropoutConfig,
    finalize_model,
    method_parameters,
    patch_model,
    prune_model,
    regularization_loss,
)
from test_callback import classification_data, training_args

N = 32
CONFIGS = {
    "dropout": DropoutConfig(rate=0.25),
    "dropout_unit": DropoutConfig(rate=0.25, mode="unit"),
    "random_target": RandomTargetConfig(alpha=0.5, gamma=0.5),
    "l1": L1Config(l1=0.1),
    "l0_weight": L0Config(dataset_size=N, l0=0.1),
    "l0_unit": L0Config(dataset_size=N, mode="unit", l0=0.1),
    "variational": VariationalDropoutConfig(dataset_size=N, kl_warmup_steps=6),
    "smallify": SmallifyConfig(l1=1e-2),
}


def make_trainer(output_dir, config, max_steps=8, **kwargs):
    set_seed(0)
    model = patch_model(tiny_bert(), config=config)
    args = training_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=3, weight_decay=0.0,
                         **kwargs)
    return Trainer(model=model, args=args, train_dataset=classification_data(), callbacks=[RegularizationCallback()])


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_trainer_resume_is_exact(tmp_path, key):
    full = make_trainer(tmp_path / "full", CONFIGS[key])
    before = {k: v.clone() for k, v in full.model.state_dict().items()}
    full.train()
    after = full.model.state_dict()
    extra = method_parameters(full.model)
    for name in extra:  # the extra trainable tensors really trained
        assert not torch.equal(before[name], after[name]), name
    if key in ("l1", "l0_weight", "smallify"):
        assert all("regularization_loss" in e for e in full.state.log_history if "loss" in e)
    resumed = make_trainer(tmp_path / "resumed", CONFIGS[key])
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_finalize_save_pretrained_loads_with_stock_from_pretrained(tmp_path, key):
    torch.manual_seed(0)
    model = patch_model(tiny_bert(), config=CONFIGS[key])
    inputs = tiny_inputs("bert", batch=4)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        (model(**inputs).loss + regularization_loss(model, step=step)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
    finalize_model(model)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    reloaded.eval()
    assert set(reloaded.state_dict()) == set(tiny_bert().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    if key.startswith("l0") or key == "variational":  # the learned order survives finalisation (in memory)
        criterion = "gates" if key.startswith("l0") else "log_alpha"
        report = prune_model(model, 0.5, mode="unit" if key == "l0_unit" else "weight", method=criterion)
        assert report.pruned_weights > 0


def test_gpt2_conv1d_layers_train_and_finalise(tmp_path):
    """transformers' Conv1D ([in, out] weights) with the per-unit L0 gates and Smallify."""
    from transformers import GPT2LMHeadModel

    for config in (L0Config(dataset_size=N, mode="unit"), SmallifyConfig(), VariationalDropoutConfig(dataset_size=N)):
        torch.manual_seed(0)
        model = patch_model(tiny_gpt2(), config=config)
        inputs = tiny_inputs("gpt2")
        model.train()
        (model(**inputs).loss + regularization_loss(model)).backward()
        model.eval()
        with torch.no_grad():
            expected = model(**inputs).logits
        finalize_model(model)
        model.save_pretrained(tmp_path / config.method)
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / config.method).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_callback_adds_the_regulariser_gradient_once_per_update(tmp_path):
    """With gradient accumulation 2 and lr 0 nothing moves, so the gradient seen by the optimizer at
    the first update is the task gradient plus exactly one L1 gradient λ·sign(w)/n."""
    seen = {}

    def grab(optimizer, args, kwargs):
        layer = trainer.model.bert.encoder.layer[0].intermediate.dense
        seen.setdefault("grad", layer.weight.grad.detach().clone())

    config = L1Config(l1=0.5)
    grads = []
    for regularize in (True, False):  # each Trainer made right before it trains (the seeding happens at init)
        trainer = make_trainer(tmp_path / str(regularize), config, max_steps=1, gradient_accumulation_steps=2,
                               learning_rate=0.0)
        if not regularize:
            trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks
                                                  if not isinstance(c, RegularizationCallback)]
        seen.clear()
        handle = register_optimizer_step_pre_hook(grab)
        try:
            trainer.train()
        finally:
            handle.remove()
        grads.append(seen["grad"])
    weight = trainer.model.bert.encoder.layer[0].intermediate.dense.weight.detach()
    torch.testing.assert_close(grads[0] - grads[1], 0.5 * torch.sign(weight) / weight.numel(), rtol=1e-4, atol=1e-8)


def test_callback_refuses_an_unpatched_model(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=1),
                      train_dataset=classification_data(), callbacks=[RegularizationCallback()])
    with pytest.raises(ValueError, match="no layer patched with a training method"):
        trainer.train()
