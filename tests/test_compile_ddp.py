"""Patched models under torch.compile (no recompiles when α/γ change) and DDP (gloo, 2 ranks)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_tdrop import TargetedDropoutConfig, hold_pruned, patch_model, prune_model, set_targeting


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_schedule_changes_do_not_recompile_and_match_eager():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _mlp()
    eager = _mlp()
    patch_model(model, alpha=0.0, gamma=0.0)
    patch_model(eager, alpha=0.0, gamma=0.0)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(8, 16)
    frames_after_warmup = None
    for step in range(14):
        value = min(1.0, max(0.0, step - 2) / 8)  # two warm-up steps at 0, then a ramp to 1
        set_targeting(model, alpha=value, gamma=value * 0.9)
        set_targeting(eager, alpha=value, gamma=value * 0.9)
        torch.manual_seed(step)
        out = compiled(x)
        out.sum().backward()
        torch.manual_seed(step)
        assert torch.equal(out, eager(x))
        if step == 1:  # first forward/backward done twice (grads now exist): the graphs are built
            frames_after_warmup = counter.frame_count
    assert frames_after_warmup >= 1
    assert counter.frame_count == frames_after_warmup, "changing α/γ recompiled the model"
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


LAYERS = {
    "linear": (lambda: nn.Linear(16, 12), (8, 16)),
    "conv1d_gpt2": (lambda: Conv1D(12, 16), (2, 4, 16)),  # nf=12 outputs, nx=16 inputs: weight [16, 12]
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), (2, 4, 7, 7)),
}

# (α, γ) from exactly 0 to exactly 1: k = 0, 0 < k < fan_in / n_out, k = fan_in / n_out, and back
RAMP = [(0.0, 0.0), (0.0, 0.0), (0.5, 0.0), (0.05, 0.05), (0.1, 0.1), (0.3, 0.3), (0.5, 0.5), (0.8, 0.8),
        (0.95, 0.95), (1.0, 1.0), (0.5, 1.0), (0.0, 1.0), (1.0, 0.5), (0.3, 0.0)]


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale"])
@pytest.mark.parametrize("mode", ["weight", "unit", "nm"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_full_ramp_from_zero_never_recompiles_any_layer_or_mode(layer, mode, rescale):
    """The mask tensors the compiled graph receives keep their dtype, shape and strides over a whole
    0 -> 1 ramp of α and γ (including k = 0 and k = fan_in), for every layer type and mode: one frame
    compiled, no recompilation, the same outputs and gradients as eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    model = make()
    patch_model(model, config=TargetedDropoutConfig(alpha=0.0, gamma=0.0, mode=mode, rescale=rescale))
    eager = copy.deepcopy(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(*shape)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, (alpha, gamma) in enumerate(RAMP):
            set_targeting(model, alpha=alpha, gamma=gamma)
            set_targeting(eager, alpha=alpha, gamma=gamma)
            torch.manual_seed(step)
            out = compiled(x)
            out.square().sum().backward()
            torch.manual_seed(step)
            ref = eager(x)
            ref.square().sum().backward()
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
            torch.testing.assert_close(model.weight.grad, eager.weight.grad, rtol=1e-6, atol=1e-6)
            assert counter.frame_count == 1, f"step {step} (alpha={alpha}, gamma={gamma}) compiled another frame"


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _mlp()
        patch_model(model, alpha=0.75, gamma=0.9)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)  # each rank its own data and masks
        for _ in range(3):
            x = torch.randn(8, 16)
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_stay_in_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    initial = _mlp().state_dict()
    assert r0.keys() == initial.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert any(not torch.equal(r0[k], initial[k]) for k in r0)


def _ddp_hold_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _mlp()
        prune_model(model, 0.75, target_modules=["0", "4"])
        prune_model(model, mode="nm", target_modules=["2"])
        hold = hold_pruned(model, target_modules=["0", "2", "4"])
        patch_model(model, alpha=0.5, gamma=0.5)  # targeted dropout among the survivors, per-rank masks
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
        torch.manual_seed(100 + rank)
        for _ in range(2):  # two micro-batches per step, the first without all-reduce
            with ddp.no_sync():
                ddp(torch.randn(8, 16)).square().mean().backward()
            ddp(torch.randn(8, 16)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        moments = {name: opt.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
        torch.save({"state": state, "masks": hold.masks(), "moments": moments, "nonzero_held": hold.nonzero_held()},
                   os.path.join(out_dir, f"hold{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_keep_held_zeros_in_sync(tmp_path):
    """hold_pruned under DDP (gloo, 2 ranks, gradient accumulation with no_sync, AdamW with weight
    decay, targeted dropout on top): every held entry is zero on both ranks, in the weights and in
    the first moments, and the ranks agree bit for bit."""
    mp.spawn(_ddp_hold_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"hold{rank}.pt") for rank in (0, 1))
    initial = _mlp().state_dict()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
        assert not torch.equal(r0["state"][key], initial[key]), key
    assert r0["nonzero_held"] == r1["nonzero_held"] == 0
    assert set(r0["masks"]) == {"0.weight", "2.weight", "4.weight"}
    for name, mask in r0["masks"].items():
        assert mask.any() and (r0["state"][name][mask] == 0).all() and (r0["moments"][name][mask] == 0).all()
