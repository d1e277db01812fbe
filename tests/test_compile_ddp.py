"""Patched models under torch.compile (no recompiles when α/γ change) and DDP (gloo, 2 ranks)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hf_tdrop import patch_model, set_targeting


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
