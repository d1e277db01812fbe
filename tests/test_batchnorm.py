"""BatchNorm re-estimation: after training (callback), after pruning (sweeps), and its guarantees."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_tdrop
from hf_tdrop import BatchNormRecalibration, SweepResult, patch_model, prune_sweep, recalibrate_batchnorm


def conv_bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6))


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def expected_stats(conv: nn.Conv2d, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a cumulative-average BatchNorm after ``conv`` must hold: the mean over batches of the batch
    means and of the unbiased batch variances."""
    with torch.no_grad():
        outs = [conv(x) for x in inputs]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    return means, variances


def test_statistics_are_really_re_estimated():
    net = conv_bn_net()
    with torch.no_grad():
        net[1].running_mean.fill_(123.0)
        net[1].running_var.fill_(1e-4)
    inputs = batches()
    assert recalibrate_batchnorm(net, inputs, num_batches=None) == 4
    mean, var = expected_stats(net[0], inputs)
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, var, rtol=1e-5, atol=1e-5)
    assert net[1].num_batches_tracked.item() == 4


def test_num_batches_limits_the_batches_and_modes_and_momentum_are_restored():
    net = conv_bn_net()
    net.train()
    net[1].eval()  # an odd mix of modes must come back as it was
    net[5].momentum = 0.3
    inputs = batches(6)
    assert recalibrate_batchnorm(net, inputs, num_batches=2) == 2
    mean, _ = expected_stats(net[0], inputs[:2])
    torch.testing.assert_close(net[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    assert [m.training for m in net] == [True, False, True, True, True, True]
    assert net[1].momentum == 0.1 and net[5].momentum == 0.3


def test_dropout_and_targeted_dropout_drop_nothing_while_estimating():
    plain = conv_bn_net()
    patched = copy.deepcopy(plain)
    patch_model(patched, alpha=1.0, gamma=0.9, mode="weight")  # would drop 90 % of every w_o in training
    patched.train()
    inputs = batches()
    recalibrate_batchnorm(plain, inputs, None)
    recalibrate_batchnorm(patched, inputs, None)
    for a, b in zip(plain.buffers(), patched.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert patched.training  # back in train mode


def test_mapping_batches_drop_labels_and_move_to_the_model_device():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv_bn_net()

        def forward(self, pixel_values, labels=None):
            assert labels is None  # labels are not passed
            return self.body(pixel_values)

    model = Model()
    recalibrate_batchnorm(model, [{"pixel_values": x, "labels": torch.zeros(16)} for x in batches()], 3)
    assert model.body[1].num_batches_tracked.item() == 3
    seen = []
    recalibrate_batchnorm(model, batches(), 2, forward_fn=lambda m, b: seen.append(b.shape) or m.body(b))
    assert len(seen) == 2


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_num_batches_is_refused_before_anything_changes(bad):
    net = conv_bn_net()
    before = [b.clone() for b in net.buffers()]
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(net, batches(), bad)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))


def test_errors_without_batchnorm_or_batches():
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(3, 3), [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_batchnorm(conv_bn_net(), [])
    with pytest.raises(ValueError, match="re-iterable"):
        BatchNormRecalibration(iter(batches()))


# ---------------------------------------------------------------------------------------------- sweeps

def shifted_net() -> nn.Sequential:
    """A two-class net whose magnitude pruning removes a large constant offset before BatchNorm.

    Input ``[100, s, 0, 0]`` with ``s = ±1`` the class. Hidden unit 0 is ``0.1·100 + 1·s``, unit 1 is
    ``0.1·100 − 1·s``: pruning 75 % of each w_o removes the two zero weights and the 0.1 weight, so the
    pre-BatchNorm mean drops from 10 to 0; with the trained statistics every unit is far below its
    mean, ReLU zeroes everything and the output is constant (chance). Re-estimated, it is perfect.
    """
    first = nn.Linear(4, 2, bias=False)
    bn = nn.BatchNorm1d(2)
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.1, 1.0, 0.0, 0.0], [0.1, -1.0, 0.0, 0.0]]))
        head.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    net = nn.Sequential(first, bn, nn.ReLU(), head)
    recalibrate_batchnorm(net, [synthetic_batch(0)], None)  # the statistics of the unpruned net
    return net


def synthetic_batch(seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.zeros(n, 4)
    x[:, 0] = 100.0
    x[:, 1] = labels.float() * 2 - 1
    x[:, 2:] = 0.01 * torch.randn(n, 2, generator=g)
    return x, 1 - labels  # head: class 0 when s = +1


def accuracy(net: nn.Module) -> float:
    x, y = synthetic_batch(99, 200)
    net.eval()
    with torch.no_grad():
        return (net(x).argmax(-1) == y).float().mean().item()


def test_sweep_recalibration_recovers_a_pruned_bn_model_and_restores_weights_and_buffers():
    net = shifted_net()
    assert accuracy(net) == 1.0
    state = {k: v.clone() for k, v in net.state_dict().items()}
    recal = BatchNormRecalibration([synthetic_batch(s)[0] for s in range(3)], num_batches=3)
    raw = prune_sweep(net, accuracy, [0.0, 0.75], mode="weight", exclude_modules=["3"], progress=False)
    fixed = prune_sweep(net, accuracy, [0.0, 0.75], mode="weight", exclude_modules=["3"], progress=False,
                        recalibrate=recal)
    assert raw.metrics["metric"][0] == 1.0 and fixed.metrics["metric"][0] == 1.0
    assert 0.3 < raw.metrics["metric"][1] < 0.7  # constant output: chance on balanced classes
    assert fixed.metrics["metric"][1] == 1.0
    for key, value in net.state_dict().items():  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(value, state[key]), key
    assert raw.recalibration is None
    assert fixed.recalibration == {"method": "batchnorm", "num_batches": 3}
    assert "BatchNorm re-estimated on 3 batches" in fixed.to_markdown()
    assert SweepResult.from_dict(fixed.to_dict()).recalibration == fixed.recalibration


def test_sweep_restores_buffers_when_evaluation_raises():
    net = shifted_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def broken(model):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        prune_sweep(net, broken, [0.5], exclude_modules=["3"], progress=False,
                    recalibrate=BatchNormRecalibration([synthetic_batch(0)[0]]))
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="recalibrate"):
        prune_sweep(net, accuracy, [0.5], progress=False, recalibrate=3)


# ---------------------------------------------------------------------------------------------- Trainer

class TinyBNClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = conv_bn_net()
        self.head = nn.Linear(6, 3)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values).mean(dim=(2, 3)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class WholeDataset(torch.utils.data.Dataset):
    """32 fixed images; at batch size 32 every batch holds all of them (order does not change BN stats)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(32, 3, 6, 6, generator=g)
        self.y = torch.randint(0, 3, (32,), generator=g)

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("recalibrate", [True, False])
def test_callback_saves_a_td_bn_model_with_statistics_of_the_full_network(tmp_path, recalibrate):
    from transformers import Trainer, TrainingArguments

    model = TinyBNClassifier()
    patch_model(model, alpha=1.0, gamma=0.75, mode="weight", exclude_modules=["head"])
    callback = hf_tdrop.TargetedDropoutCallback(hf_tdrop.TargetingSchedule(alpha=1.0, gamma=0.75, kind="constant"),
                                                bn_recalibration_batches=4 if recalibrate else 0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=32,
                             learning_rate=0.05, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, remove_unused_columns=False)
    data = WholeDataset()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    # the statistics the evaluated (nothing dropped) network produces on the data
    reference = copy.deepcopy(model)
    hf_tdrop.unpatch_model(reference)
    recalibrate_batchnorm(reference, [data.x], None)
    bn, ref_bn = model.body[5], reference.body[5]
    close = torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-4) and \
        torch.allclose(bn.running_var, ref_bn.running_var, rtol=1e-3, atol=1e-4)
    assert close == recalibrate  # without re-estimation they are the dropped-out network's statistics


def test_callback_rejects_bad_batch_counts():
    schedule = hf_tdrop.TargetingSchedule(alpha=0.5, gamma=0.5, kind="constant")
    for bad in (-1, 1.5, "x"):
        with pytest.raises(ValueError, match="bn_recalibration_batches"):
            hf_tdrop.TargetedDropoutCallback(schedule, bn_recalibration_batches=bad)
