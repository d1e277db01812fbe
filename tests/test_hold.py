"""hold_pruned: pruned weights stay exactly zero through fine-tuning (optimizers, weight decay,
stale momentum, autocast, accumulation, Trainer), optimizer state is zeroed, removal, the plain
state_dict, targeted dropout among the survivors, and bad arguments. DDP: test_compile_ddp.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_bert
from hf_tdrop import (
    TargetedDropoutConfig,
    held_entries,
    hold_pruned,
    patch_model,
    prune_model,
    release_pruned,
    unpatch_model,
)
from hf_tdrop import masking
from hf_tdrop.methods.targeted_dropout import targeted_set


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 5, accumulate: int = 1, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(8, 16, generator=g)
            model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _held_weights(model: nn.Module, hold) -> list[tuple[torch.Tensor, torch.Tensor]]:
    params = dict(model.named_parameters())
    return [(params[name], mask) for name, mask in hold.masks().items()]


def _assert_held_zero(model, hold, opt=None):
    assert hold.nonzero_held() == 0
    for param, mask in _held_weights(model, hold):
        assert (param.detach()[mask] == 0).all()
        if opt is not None:
            states = [v for v in opt.state[param].values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
            assert states, "the optimizer kept no per-entry state"
            for value in states:
                assert (value[mask] == 0).all(), "optimizer state of a held entry is not zero"


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.1, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, foreach=False),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, fused=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_zeros_and_optimizer_state_survive_every_optimizer(opt_name):
    model = _mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    _train(model, opt, steps=3)  # stale momentum / second moments from before pruning
    report = prune_model(model, 0.75)
    hold = hold_pruned(model, report)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, steps=5)
    _assert_held_zero(model, hold, opt)
    for name, param in model.named_parameters():  # the surviving weights did train
        assert not torch.equal(param, before[name]), name
    hold.remove()


def test_without_the_hold_stale_momentum_and_gradients_revive_pruned_weights():
    """The control for the test above: the same run without hold_pruned loses the zeros."""
    model = _mlp()
    opt = OPTIMIZERS["sgd_momentum"](model.parameters())
    _train(model, opt, steps=3)
    prune_model(model, 0.75)
    zeros = model[0].weight == 0
    _train(model, opt, steps=1)
    assert (model[0].weight[zeros] != 0).all()


@pytest.mark.parametrize("mode,kwargs", [("weight", dict(sparsity=0.9)), ("unit", dict(sparsity=0.5)),
                                         ("nm", dict()), ("random", dict(sparsity=0.6))])
def test_every_pruning_mode_and_method_is_held(mode, kwargs):
    model = _mlp()
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.bias.uniform_(0.5, 1.0)  # nonzero biases: unit pruning zeroes those of the pruned units
    if mode == "random":
        report = prune_model(model, method="random", generator=torch.Generator().manual_seed(0), **kwargs)
    else:
        report = prune_model(model, mode=mode, **kwargs)
    hold = hold_pruned(model, report)
    if mode == "unit":
        assert "0.bias" in hold.masks() and int(hold.masks()["0.bias"].sum()) == 16
    else:
        assert not any(name.endswith("bias") for name in hold.masks())
    assert hold.n_held == sum(int(m.sum()) for m in hold.masks().values())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    _train(model, opt, steps=5)
    _assert_held_zero(model, hold, opt)
    hold.remove()


def test_bf16_autocast_low_precision_weights_and_grad_scaler():
    model = _mlp()
    hold = hold_pruned(model, prune_model(model, mode="nm"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(8, 16, generator=g)).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    _assert_held_zero(model, hold, opt)
    hold.remove()

    bf16 = _mlp().to(torch.bfloat16)
    hold = hold_pruned(bf16, prune_model(bf16, 0.8))
    opt = torch.optim.AdamW(bf16.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(4):
        bf16(torch.randn(8, 16, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    _assert_held_zero(bf16, hold, opt)
    hold.remove()


def test_gradients_of_held_entries_are_zero_under_accumulation_and_clipping():
    model = _mlp()
    hold = hold_pruned(model, prune_model(model, 0.5))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # accumulate three micro-batches
        model(torch.randn(8, 16, generator=g)).square().mean().backward()
    params = dict(model.named_parameters())
    norm_held_out = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params.values()]))
    for name, mask in hold.masks().items():
        assert (params[name].grad[mask] == 0).all() and (params[name].grad[~mask] != 0).any()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9) == norm_held_out
    hold.remove()


def test_removal_lets_training_move_the_entries_again():
    model = _mlp()
    report = prune_model(model, 0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with hold_pruned(model, report) as hold:
        _train(model, opt, steps=3)
        assert hold.active
        masks = hold.masks()
    assert not hold.active and held_entries(model) == {}
    # momentum of the held entries was zero at release: the first step after it moves them by lr * grad only
    model(torch.randn(8, 16)).square().mean().backward()
    grad = model[0].weight.grad.clone()
    before = model[0].weight.detach().clone()
    opt.step()
    mask = masks["0.weight"]
    torch.testing.assert_close(model[0].weight.detach()[mask], (before - 0.1 * grad)[mask])
    assert (model[0].weight[mask] != 0).any()
    hold.remove()  # idempotent


def test_release_pruned_removes_every_hold_of_the_model_and_holds_compose():
    model = _mlp()
    prune_model(model, 0.5, target_modules=["0"])
    first = hold_pruned(model, target_modules=["0"])
    masks = {"2": masking.lowest_k(torch.rand(32, 32), 8), "0": masking.lowest_k(torch.rand(32, 16), 4)}
    second = hold_pruned(model, masks=masks)
    assert (model[2].weight[masks["2"]] == 0).all()  # given masks are zeroed at once
    union = held_entries(model)
    assert torch.equal(union["0.weight"], first.masks()["0.weight"] | masks["0"])
    second.remove()
    assert torch.equal(held_entries(model)["0.weight"], first.masks()["0.weight"]) and "2.weight" not in held_entries(model)
    third = hold_pruned(model, target_modules=["0"])
    assert release_pruned(model) == 2 and not first.active and not third.active
    assert release_pruned(model) == 0 and held_entries(model) == {}


def test_state_dict_stays_plain_and_trainer_runs_without_a_callback(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    keys = list(model.state_dict())
    classes = {name: type(m) for name, m in model.named_modules()}
    report = prune_model(model, 0.8)
    hold = hold_pruned(model, report)
    assert list(model.state_dict()) == keys and {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(3, 99, (32, 8), generator=g).tolist(),
                              "labels": torch.randint(0, 3, (32,), generator=g).tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=4, learning_rate=0.05, weight_decay=0.1, max_grad_norm=1.0,
        save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    layer = model.bert.encoder.layer[0].intermediate.dense
    before = layer.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert hold.nonzero_held() == 0
    assert not torch.equal(layer.weight, before)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    _assert_held_zero(model, hold, opt)
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) <= set(keys)
    assert (saved["bert.encoder.layer.0.intermediate.dense.weight"][hold.masks()[
        "bert.encoder.layer.0.intermediate.dense.weight"]] == 0).all()
    hold.remove()


# ---------------------------------------------------------------------------------------- with targeted dropout


def test_targeted_dropout_targets_only_the_survivors():
    torch.manual_seed(0)
    layer = nn.Linear(20, 6)
    with torch.no_grad():
        layer.weight[0, :3] = 0  # a row with more zeros than the others
    prune_model(layer, 0.5)  # 10 zeros per row (row 0 keeps its 3 and gets 7 more)
    patch_model(layer, alpha=0.5, gamma=0.5)
    assert targeted_set(layer).sum(dim=1).tolist() == [10] * 6  # without a hold: the zeros themselves
    held_mask = layer.weight == 0
    hold = hold_pruned(layer)
    targeted = targeted_set(layer)
    assert not (targeted & held_mask).any()
    assert targeted.sum(dim=1).tolist() == [5] * 6  # floor(0.5 * 10 survivors)
    survivors = layer.weight.detach().abs().masked_fill(held_mask, float("inf"))
    assert torch.equal(targeted, masking.lowest_k(survivors, 5))
    hold.remove()
    partial = held_mask.clone()
    partial[1] = False  # rows with different survivor counts (20 in row 1, 10 elsewhere): a k per row
    hold = hold_pruned(layer, masks={"": partial})
    targeted = targeted_set(layer)
    assert targeted.sum(dim=1).tolist() == [5, 10, 5, 5, 5, 5]
    assert torch.equal(targeted[1], held_mask[1])  # row 1's 10 smallest are its unheld zeros
    assert torch.equal(targeted[0], masking.lowest_k(survivors[:1], 5)[0])
    hold.remove()


def test_unit_and_nm_targeting_with_held_entries():
    torch.manual_seed(0)
    layer = nn.Linear(8, 10)
    prune_model(layer, 0.4, mode="unit")  # 4 dead units
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, mode="unit"))
    with hold_pruned(layer):
        targeted = targeted_set(layer)
        dead = (layer.weight == 0).all(dim=1)
        assert int(targeted.sum()) == 3 and not (targeted & dead).any()  # floor(0.5 * 6 live units)
    unpatch_model(layer)

    layer = nn.Linear(8, 3)
    with torch.no_grad():
        layer.weight[:, 0] = 0  # one zero in the first group of every row
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=1.0, mode="nm"))
    with hold_pruned(layer):
        targeted = targeted_set(layer)
        assert targeted[:, :4].sum(dim=1).tolist() == [1] * 3  # the held zero fills one of the two
        assert targeted[:, 4:].sum(dim=1).tolist() == [2] * 3 and not targeted[:, 0].any()


def test_refresh_every_retargets_when_the_hold_changes():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    prune_model(layer, 0.5)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=100))
    unheld = targeted_set(layer).clone()
    with hold_pruned(layer):
        held = targeted_set(layer)
        assert not torch.equal(held, unheld) and not (held & (layer.weight == 0)).any()
    assert torch.equal(targeted_set(layer), unheld)


def test_iterative_prune_train_with_targeted_dropout_prune_keeps_first_round_zeros():
    model = _mlp()
    report = prune_model(model, 0.5)
    first = {n: (p == 0).clone() for n, p in model.named_parameters() if n.endswith("weight")}
    hold = hold_pruned(model, report)
    patch_model(model, alpha=0.75, gamma=0.5)  # targets half of the survivors
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    model.train()
    _train(model, opt, steps=20)
    assert hold.nonzero_held() == 0
    hold.remove()
    unpatch_model(model)
    second = prune_model(model, 0.75)  # total sparsity: the held zeros rank first
    for name, mask in first.items():
        weight = dict(model.named_parameters())[name]
        assert (weight[mask] == 0).all(), name
        fan_in = weight.shape[1]
        assert (weight == 0).sum(dim=1).tolist() == [int(0.75 * fan_in)] * weight.shape[0]
    assert second.pruned_weights == sum(int(0.75 * w.shape[1]) * w.shape[0] for w in (model[0].weight, model[2].weight,
                                                                                     model[4].weight))


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(prune_report="report"), "`prune_report` must be None or a PruneReport"),
    (dict(masks=[1]), "`masks` must be None or a dict"),
    (dict(masks={"0": torch.zeros(3, 3, dtype=torch.bool)}), r"`masks\['0'\]` must be a bool tensor of the weight's shape"),
    (dict(masks={"0": torch.zeros(32, 16)}), r"`masks\['0'\]` must be a bool tensor"),
    (dict(masks={"1": torch.zeros(1, dtype=torch.bool)}), "names layer '1', but the model has a ReLU"),
    (dict(masks={"9": torch.zeros(1, dtype=torch.bool)}), "names layer '9', but the model has no module"),
    (dict(masks={}), "`masks` names no layer"),
    (dict(masks={"0": torch.zeros(32, 16, dtype=torch.bool)}, target_modules=["0"]), "one way of choosing"),
    (dict(target_modules=["nothing"]), "No layer matched"),
])
def test_bad_arguments_hold_nothing(kwargs, match):
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        hold_pruned(model, **kwargs)
    assert held_entries(model) == {}
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module"):
        hold_pruned("model")
    with pytest.raises(ValueError, match="`model` must be a torch.nn.Module"):
        release_pruned(None)
