"""The methods' own parameters learn: Adam groups of their own (hf_tdrop.method_optimizer), float32
master copies on low-precision models, and variational dropout's float16 variance path."""

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_tdrop import (
    CombinedOptimizer,
    L0Config,
    L1Config,
    SmallifyConfig,
    VariationalDropoutConfig,
    method_optimizer,
    method_parameter_groups,
    method_parameters,
    patch_model,
    regularization_loss,
)
from hf_tdrop.methods.base import learned_scores


def mlp():
    layers = [nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)]
    return nn.Sequential(OrderedDict(zip(["0", "1", "2", "3", "classifier"], layers)))


def sgd_args(tmp_path, **kw):
    return TrainingArguments(str(tmp_path), optim="sgd", optim_args="momentum=0.9,nesterov=True", learning_rate=0.05,
                             weight_decay=5e-4, report_to="none", use_cpu=True, **kw)


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, optimizer, steps=60, seed=0):
    x, y = data(seed=seed)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + regularization_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_groups_from_training_arguments(tmp_path):
    torch.manual_seed(0)
    model = patch_model(mlp(), config=L0Config(dataset_size=100))
    opt = method_optimizer(model, sgd_args(tmp_path))
    assert isinstance(opt, CombinedOptimizer)
    sgd, adam = opt.optimizers
    assert type(sgd) is torch.optim.SGD and type(adam) is torch.optim.Adam
    decay, no_decay, gates = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and decay["lr"] == 0.05 and decay["momentum"] == 0.9 and decay["nesterov"]
    assert {id(p) for p in decay["params"]} == {id(getattr(model, i).weight) for i in ("0", "2", "classifier")}
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # biases
    assert gates["lr"] == 1e-3 and gates["weight_decay"] == 0.0 and gates["tdrop_method"] == "l0"
    assert {id(p) for p in gates["params"]} == {id(p) for p in method_parameters(model).values()}
    # method_lr overrides every method's own; a model without method parameters gets a plain optimizer
    assert method_optimizer(model, sgd_args(tmp_path), method_lr=0.01).param_groups[2]["lr"] == 0.01
    plain = method_optimizer(patch_model(mlp(), config=L1Config(l1=0.1)), sgd_args(tmp_path))
    assert type(plain) is torch.optim.SGD and len(plain.param_groups) == 2


def test_adam_network_optimizer_takes_the_method_groups_itself():
    model = patch_model(mlp(), config=VariationalDropoutConfig(dataset_size=100))
    opt = method_optimizer(model, optimizer_cls=torch.optim.AdamW, optimizer_kwargs={"lr": 3e-4}, weight_decay=0.1)
    assert type(opt) is torch.optim.AdamW
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.0]


def test_method_optimizer_argument_errors(tmp_path):
    model = patch_model(mlp(), config=L0Config(dataset_size=100))
    with pytest.raises(ValueError, match="either `args`"):
        method_optimizer(model)
    with pytest.raises(ValueError, match="either `args`"):
        method_optimizer(model, sgd_args(tmp_path), optimizer_cls=torch.optim.SGD)
    with pytest.raises(ValueError, match="`lr` must be > 0"):
        method_parameter_groups(model, lr=0.0)


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_gates_learn_in_their_own_group_and_not_under_plain_sgd(mode):
    """The audit's finding: from the TD reference's start (drop rate 0.001, log α = 6.9) SGD at the
    network's learning rate leaves the gates within their initial noise (±0.01); in their Adam group
    they move by several times that."""
    moved = {}
    for how in ("sgd", "groups"):
        torch.manual_seed(0)
        model = patch_model(mlp(), config=L0Config(dataset_size=1000, l0=0.1, mode=mode, init_drop_rate=0.001))
        before = {n: p.detach().clone() for n, p in method_parameters(model).items()}
        if how == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        else:
            opt = method_optimizer(model, optimizer_cls=torch.optim.SGD, optimizer_kwargs={"lr": 0.05, "momentum": 0.9})
        train(model, opt, steps=60)
        moved[how] = max((p.detach() - before[n]).abs().max().item() for n, p in method_parameters(model).items())
    assert moved["sgd"] < 0.01
    assert moved["groups"] > 0.03  # 60 Adam steps at 1e-3: log α moves by 3x its initial noise and more


def test_combined_optimizer_resumes_exactly():
    torch.manual_seed(0)
    model = patch_model(mlp(), config=L0Config(dataset_size=100))

    def make(m):
        return method_optimizer(m, optimizer_cls=torch.optim.SGD, optimizer_kwargs={"lr": 0.05, "momentum": 0.9})

    opt = make(model)
    train(model, opt, steps=5)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict shares the live moment tensors
    torch.manual_seed(1)
    train(model, opt, steps=5, seed=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved_model)
    fresh = make(model)
    fresh.load_state_dict(saved_opt)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]
    torch.manual_seed(1)
    train(model, fresh, steps=5, seed=1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected a state_dict of 2 optimizers"):
        fresh.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_lr_scheduler_scales_every_group_and_trainer_uses_the_optimizer(tmp_path):
    torch.manual_seed(0)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x, labels=None):
            logits = self.net(x)
            loss = nn.functional.cross_entropy(logits, labels) + regularization_loss(self)
            return {"loss": loss, "logits": logits}

    model = Wrapped()
    patch_model(model, config=L0Config(dataset_size=64, l0=0.1))
    x, y = data()
    train_set = [{"x": x[i], "labels": y[i]} for i in range(64)]
    args = sgd_args(tmp_path, max_steps=8, per_device_train_batch_size=16, lr_scheduler_type="linear",
                    warmup_steps=0, save_strategy="no")
    opt = method_optimizer(model, args)
    before = {n: p.detach().clone() for n, p in method_parameters(model).items()}
    trainer = Trainer(model=model, args=args, train_dataset=train_set, optimizers=(opt, None))
    trainer.train()
    assert trainer.optimizer.optimizer is opt if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is opt
    # the linear schedule ends at 0 for every group, relative to the group's own learning rate
    assert [g["initial_lr"] for g in opt.param_groups] == [0.05, 0.05, 1e-3]
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    assert max((p.detach() - before[n]).abs().max().item() for n, p in method_parameters(model).items()) > 1e-3


@pytest.mark.parametrize("config", [L0Config(dataset_size=100), L0Config(dataset_size=100, mode="unit"),
                                    VariationalDropoutConfig(dataset_size=100), SmallifyConfig(l1=1e-3)],
                         ids=["l0_weight", "l0_unit", "variational", "smallify"])
def test_method_parameters_are_float32_master_copies_on_a_bfloat16_model(config):
    torch.manual_seed(0)
    model = patch_model(mlp().to(torch.bfloat16), config=config)
    params = method_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    x = torch.randn(32, 12, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())
    model.eval()
    assert model(x).dtype == torch.bfloat16


def test_bfloat16_l0_gates_move_and_rank_with_distinct_scores():
    """On a bfloat16 model a bfloat16 log α near its initial mean has 3 representable values within
    its ±0.01 noise; the float32 master copy keeps the noise and learns."""
    torch.manual_seed(0)
    model = patch_model(mlp().to(torch.bfloat16), config=L0Config(dataset_size=1000, l0=0.1,
                                                                  init_drop_rate=0.001))
    log_alpha = getattr(model, "0").l0_log_alpha
    before = log_alpha.detach().clone()
    assert before.unique().numel() > 100
    opt = method_optimizer(model, optimizer_cls=torch.optim.SGD, optimizer_kwargs={"lr": 0.05})
    x, y = data()
    for _ in range(50):
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).add(regularization_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    assert (log_alpha.detach() != before).float().mean() > 0.9
    assert learned_scores(getattr(model, "0"), "gates").scores.unique().numel() > 100


def test_variational_dropout_float16_autocast_has_finite_gradients_on_all_zero_inputs():
    """An all-zero input row gives var = 0; float16's 1e-8 is 0, so sqrt had an infinite slope."""
    torch.manual_seed(0)
    model = patch_model(mlp(), config=VariationalDropoutConfig(dataset_size=100))
    x = torch.randn(8, 12)
    x[:4] = 0.0
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x)
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
