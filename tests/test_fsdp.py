"""Patched models under FSDP2 (``torch.distributed.fsdp.fully_shard``), 2 gloo ranks on CPU.

Between forwards the weights are sharded DTensors; FSDP2 all-gathers them for each forward, so a patched
layer ranks full weight rows. Tested here: the targeted set (and its size) comes from the full weight;
the same seed gives the same masks on every rank; FSDP2 training equals single-process training on the
global batch; ``refresh_every`` counts optimizer steps; ``hold_pruned`` refuses sharded models; a DCP
checkpoint resumes the schedule exactly; the gathered full state dict saves as a plain HF checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from transformers.pytorch_utils import Conv1D

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.6
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available", allow_module_level=True)

from hf_tdrop import (TargetedDropoutConfig, TargetingSchedule, TargetingScheduler, get_targeting, hold_pruned,
                      layers, masking, patch_model, prune_model)
from hf_tdrop.methods import targeted_dropout

WORLD = 2
SCHEDULE = TargetingSchedule(alpha=0.7, gamma=0.6, kind="linear", ramp_steps=4)


class Net(nn.Module):
    """Uneven shards (31 rows over 2 ranks) and a GPT-2 ``Conv1D``, whose ``[in, out]`` weight FSDP2
    shards along the fan-in: a layer that ranked its local shard would get wrong rows and counts."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 31)
        self.proj = Conv1D(24, 31)  # weight [31, 24]
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 4)  # an output head: not targeted by default

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.proj(torch.relu(self.fc1(x)))))))


TARGETED = ("fc1", "proj", "fc2")


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _shard(model: nn.Module) -> nn.Module:
    for child in model.children():
        fully_shard(child)
    fully_shard(model)
    return model


def _batch(step: int, rank: int | None = None, size: int = 8) -> torch.Tensor:
    """Step ``step``'s global batch (a generator of its own, not torch's global RNG), or rank ``rank``'s half."""
    x = torch.randn(size, 16, generator=torch.Generator().manual_seed(1000 + step))
    return x if rank is None else x.chunk(WORLD)[rank]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _full_state(model: nn.Module) -> dict:
    return {name: _full(p).clone() for name, p in model.named_parameters()}


def _run(rank: int, worker, init_file: str, out_dir: str, *args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        worker(rank, out_dir, *args)
    finally:
        dist.destroy_process_group()


_SPAWNS = itertools.count()


def _done(out_dir: str, what: str, rank: int) -> None:
    """Mark that rank ``rank`` ran every check of ``what`` (the checks themselves assert in the worker)."""
    open(os.path.join(out_dir, f"{what}-ok{rank}"), "w").close()


def _assert_done(tmp_path, what: str) -> None:
    assert all((tmp_path / f"{what}-ok{rank}").exists() for rank in range(WORLD))


def _spawn(tmp_path, worker, *args) -> None:
    init = tmp_path / f"init-{next(_SPAWNS)}"  # a fresh rendezvous file for every group
    mp.spawn(_run, args=(worker, str(init), str(tmp_path), *args), nprocs=WORLD, join=True)


class _Spy:
    """Records, for every targeted-dropout forward, the weight the layer saw, the targeted set it used
    and the drop mask it drew (by wrapping ``targeted_dropout.targeted_set`` and the untraced mask sampler)."""

    def __init__(self):
        self.calls: list[dict] = []
        self._targeted_set, self._sample = targeted_dropout.targeted_set, targeted_dropout._untraced_sample_drop_mask
        targeted_dropout.targeted_set = self._spy_targeted_set
        targeted_dropout._untraced_sample_drop_mask = self._spy_sample

    def _spy_targeted_set(self, module):
        targeted = self._targeted_set(module)
        weight = module.weight
        self.calls.append({"module": module, "weight": weight.detach().clone(), "dtensor": isinstance(weight, DTensor),
                           "targeted": targeted.clone(), "steps": layers.optimizer_steps(weight)})
        return targeted

    def _spy_sample(self, module, sample):
        drop, scale = self._sample(module, sample)
        self.calls[-1]["drop"] = drop.clone()
        return drop, scale

    def close(self):
        targeted_dropout.targeted_set, targeted_dropout._untraced_sample_drop_mask = self._targeted_set, self._sample


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- (a) full rows
def _full_rows_worker(rank: int, out_dir: str) -> None:
    # patch first, shard after: fully_shard gives each layer a new class (FSDPLinear, ...), which
    # patch_model refuses to take for a supported layer, leaving the sharded model as it was
    sharded = _shard(_net())
    classes = {name: type(m) for name, m in sharded.named_modules()}
    with pytest.raises(ValueError, match="no supported layer"):
        patch_model(sharded, alpha=0.5, gamma=0.5)
    assert {name: type(m) for name, m in sharded.named_modules()} == classes

    for mode in ("weight", "unit", "nm"):
        model = _net()
        config = TargetedDropoutConfig(alpha=0.5, gamma=0.6, mode=mode)
        patch_model(model, config=config)
        _shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        spy = _Spy()
        try:
            for step in range(3):
                full = {name: _full(getattr(model, name).weight).clone() for name in TARGETED}  # collective
                spy.calls.clear()
                model(_batch(step, rank)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                assert [c["module"] for c in spy.calls] == [getattr(model, n) for n in TARGETED]
                for name, call in zip(TARGETED, spy.calls):
                    weight, state = full[name], getattr(call["module"], layers.STATE_ATTR)
                    # the layer saw the whole gathered weight, not its shard
                    assert not call["dtensor"] and call["weight"].shape == weight.shape, (mode, name)
                    assert torch.equal(call["weight"], weight), (mode, name)
                    w2d = masking.unit_matrix(weight, state.layout)
                    n_out, fan_in = w2d.shape
                    if mode == "weight":
                        expected = masking.targeted_weights(w2d, 0.6)
                        counts = set(call["targeted"].sum(dim=1).tolist())
                        assert counts == {masking.fraction_count(0.6, fan_in)}, (name, counts)  # floor(γ·full fan_in)
                    elif mode == "unit":
                        expected = masking.targeted_units(w2d, 0.6)
                        assert int(call["targeted"].sum()) == masking.fraction_count(0.6, n_out)
                    else:
                        expected = masking.targeted_nm(w2d, 0.6, 2, 4)
                    assert torch.equal(call["targeted"], expected), (mode, name, step)
                    # the drop mask is a subset of the targeted set, in the weight's own layout
                    targeted = expected if mode == "unit" else masking.to_weight_layout(expected, weight, state.layout)
                    assert call["drop"].shape == targeted.shape and not (call["drop"] & ~targeted).any()
                    assert call["drop"].any()
        finally:
            spy.close()
        for name in TARGETED:  # and between forwards the layers hold shards again
            assert isinstance(getattr(model, name).weight, DTensor)
    _done(out_dir, "full_rows", rank)


def test_targeted_set_is_computed_on_the_full_unsharded_rows(tmp_path):
    """Weight, unit and N:M modes, a Linear with uneven row shards and a GPT-2 Conv1D sharded along its
    fan-in: inside each forward the layer sees the full gathered weight and targets exactly what the
    full weight gives (floor(γ·fan_in) per row of the FULL fan_in in weight mode), and draws its drop
    mask inside that set. (Patching must come before sharding: patch_model refuses a sharded model.)"""
    _spawn(tmp_path, _full_rows_worker)
    _assert_done(tmp_path, "full_rows")


# ---------------------------------------------------------------------------------------- (b) same masks
def _same_masks_worker(rank: int, out_dir: str) -> None:
    result = {}
    for seeding in ("shared", "per_rank"):
        model = _net()
        patch_model(model, alpha=0.5, gamma=0.6)
        _shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(7 if seeding == "shared" else 7 + rank)
        spy = _Spy()
        try:
            for step in range(3):
                model(_batch(step, rank)).square().mean().backward()  # each rank its own half of the batch
                opt.step()
                opt.zero_grad()
        finally:
            spy.close()
        digests = {"targeted": _digest(c["targeted"] for c in spy.calls), "drop": _digest(c["drop"] for c in spy.calls)}
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, digests)
        result[seeding] = gathered
    if rank == 0:
        with open(os.path.join(out_dir, "digests.json"), "w") as f:
            json.dump(result, f)


def test_masks_are_identical_on_every_rank_for_the_same_seed(tmp_path):
    """Same seed on both ranks (and different data): every drop mask of every layer and step is
    identical across ranks. Different seeds per rank: the targeted sets still agree (they come from
    the same gathered weights), the Bernoulli draws do not (each rank draws from its own RNG)."""
    _spawn(tmp_path, _same_masks_worker)
    result = json.loads((tmp_path / "digests.json").read_text())
    shared, per_rank = result["shared"], result["per_rank"]
    assert shared[0] == shared[1]
    assert per_rank[0]["targeted"] == per_rank[1]["targeted"]
    assert per_rank[0]["drop"] != per_rank[1]["drop"]


# ---------------------------------------------------------------------------------------- (c) = single process
STEPS = 5


def _train_steps(model, opt, batch_of, scheduler) -> list[float]:
    losses = []
    for step in range(STEPS):
        loss = model(batch_of(step)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        losses.append(loss.detach())
    return losses


def _single_process_reference():
    model = _net()
    patch_model(model, config=TargetedDropoutConfig(alpha=0.7, gamma=0.6, refresh_every=2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    scheduler = TargetingScheduler(model, SCHEDULE)
    torch.manual_seed(11)
    losses = _train_steps(model, opt, _batch, scheduler)
    return [float(x) for x in losses], {k: v.detach().clone() for k, v in model.named_parameters()}


def _match_worker(rank: int, out_dir: str) -> None:
    model = _net()
    patch_model(model, config=TargetedDropoutConfig(alpha=0.7, gamma=0.6, refresh_every=2))
    _shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    scheduler = TargetingScheduler(model, SCHEDULE)
    torch.manual_seed(11)  # the same seed on every rank: the same masks (see the test above)
    losses = _train_steps(model, opt, lambda step: _batch(step, rank), scheduler)
    losses = torch.stack(losses)
    dist.all_reduce(losses)  # mean of the two half-batch losses = the global batch's loss
    state = _full_state(model)
    if rank == 0:
        torch.save({"losses": (losses / WORLD).tolist(), "state": state}, os.path.join(out_dir, "fsdp.pt"))


def test_fsdp_training_equals_single_process_training_on_the_global_batch(tmp_path):
    """Each rank trains on its half of the batch, with the same seed: FSDP2 averages the gradients, the
    masks agree, so 5 AdamW steps (α/γ ramped by a TargetingScheduler, targeted sets refreshed every
    2 steps) give the loss trajectory and weights of one process training on the whole batch."""
    _spawn(tmp_path, _match_worker)
    fsdp = torch.load(tmp_path / "fsdp.pt")
    losses, state = _single_process_reference()
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert fsdp["state"].keys() == state.keys()
    for name in state:
        torch.testing.assert_close(fsdp["state"][name], state[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(state["fc1.weight"], _net().fc1.weight)


# ---------------------------------------------------------------------------------------- (d) refresh, hold
def _refresh_and_hold_worker(rank: int, out_dir: str) -> None:
    model = _net()
    patch_model(model, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=3))
    _shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.manual_seed(3)
    spy = _Spy()
    full_at_step, seen = [], []
    try:
        for step in range(7):
            full_at_step.append(_full(model.fc1.weight).clone())
            spy.calls.clear()
            for micro in range(2):  # gradient accumulation: both forwards of a step share the set
                model(_batch(10 * step + micro, rank)).square().mean().backward()
            calls = [c for c in spy.calls if c["module"] is model.fc1]
            assert len(calls) == 2 and torch.equal(calls[0]["targeted"], calls[1]["targeted"])
            # the forward's (gathered) weight is held by no optimizer: every optimizer step counts
            assert [c["steps"] for c in calls] == [step, step]
            state = getattr(model.fc1, layers.STATE_ATTR)
            seen.append((state.cached_targeting[0], calls[0]["targeted"]))
            opt.step()
            opt.zero_grad()
    finally:
        spy.close()
    assert [cached for cached, _ in seen] == [0, 0, 0, 3, 3, 3, 6]
    for step, (cached, targeted) in enumerate(seen):
        expected = masking.targeted_weights(full_at_step[cached], 0.5)  # from the weight at the refresh step
        assert torch.equal(targeted, expected), step
    assert not torch.equal(full_at_step[3], full_at_step[0])
    assert not torch.equal(masking.targeted_weights(full_at_step[2], 0.5), seen[0][1])  # a refresh was due

    # hold_pruned on a sharded model: refused, nothing held
    pruned = _net()
    prune_model(pruned, 0.5)
    patch_model(pruned, alpha=0.5, gamma=0.5)
    _shard(pruned)
    with pytest.raises(ValueError, match=r"sharded .*DTensor.*does not support sharded parameters"):
        hold_pruned(pruned)
    from hf_tdrop import held_entries
    assert held_entries(pruned) == {}

    # hold first, shard after: the first optimizer step raises instead of silently training the zeros
    pruned = _net()
    prune_model(pruned, 0.5)
    hold = hold_pruned(pruned)
    patch_model(pruned, alpha=0.5, gamma=0.5)
    _shard(pruned)
    opt = torch.optim.AdamW(pruned.parameters(), lr=0.05)
    pruned(_batch(0, rank)).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"fc1.weight was sharded after the hold was made"):
        opt.step()
    with pytest.raises(RuntimeError, match="sharded after the hold"):
        hold.nonzero_held()
    hold.remove()
    opt.step()  # a released hold no longer checks
    _done(out_dir, "refresh", rank)


def test_refresh_every_counts_optimizer_steps_and_hold_pruned_refuses_sharded_models(tmp_path):
    """refresh_every=3 under FSDP2: the forward sees the gathered weight, which no optimizer holds (it
    steps the DTensor shards), so every optimizer step counts: the set is recomputed at steps 0, 3 and
    6 from the full weight of that step, and shared by both accumulated micro-batches. hold_pruned
    cannot track sharded weights: it refuses a sharded model (ValueError, nothing held), and a model
    sharded after the hold makes the next optimizer step raise (RuntimeError)."""
    _spawn(tmp_path, _refresh_and_hold_worker)
    _assert_done(tmp_path, "refresh")


# ---------------------------------------------------------------------------------------- (e) DCP resume
RESUME_AT, TOTAL = 3, 7


def _setup_resumable():
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _net()
    patch_model(model, alpha=0.7, gamma=0.6)
    _shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    scheduler = TargetingScheduler(model, SCHEDULE)

    class AppState:  # the DCP "Stateful" recipe: model + optimizer + targeting schedule
        def state_dict(self):
            model_sd, optim_sd = get_state_dict(model, opt)
            return {"model": model_sd, "optim": optim_sd, "tdrop": scheduler.state_dict()}

        def load_state_dict(self, state):
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            scheduler.load_state_dict(state["tdrop"])

    return model, opt, scheduler, AppState()


def _train_range(model, opt, scheduler, rank, start, stop) -> list:
    values = []
    for step in range(start, stop):
        values.append((scheduler.last_step, get_targeting(model)["alpha"], get_targeting(model)["gamma"]))
        model(_batch(step, rank)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    return values


def _resume_worker(rank: int, out_dir: str, phase: str) -> None:
    import torch.distributed.checkpoint as dcp

    ckpt = os.path.join(out_dir, "ckpt")
    model, opt, scheduler, app = _setup_resumable()
    if phase == "first":
        torch.manual_seed(5)
        values = _train_range(model, opt, scheduler, rank, 0, TOTAL)  # uninterrupted
        full = _full_state(model)
        if rank == 0:
            torch.save({"values": values, "state": full}, os.path.join(out_dir, "uninterrupted.pt"))
        model, opt, scheduler, app = _setup_resumable()
        torch.manual_seed(5)
        _train_range(model, opt, scheduler, rank, 0, RESUME_AT)
        dcp.save({"app": app}, checkpoint_id=ckpt)
        torch.save(torch.get_rng_state(), os.path.join(out_dir, f"rng{rank}.pt"))  # the masks' RNG, per rank
    else:  # a fresh process group, model, optimizer and scheduler
        assert scheduler.last_step == 0
        dcp.load({"app": app}, checkpoint_id=ckpt)
        assert scheduler.last_step == RESUME_AT and get_targeting(model)["gamma"] == SCHEDULE.gamma_at(RESUME_AT)
        torch.set_rng_state(torch.load(os.path.join(out_dir, f"rng{rank}.pt")))
        values = _train_range(model, opt, scheduler, rank, RESUME_AT, TOTAL)
        full = _full_state(model)
        if rank == 0:
            torch.save({"values": values, "state": full}, os.path.join(out_dir, "resumed.pt"))


def test_sharded_dcp_checkpoint_resumes_the_schedule_exactly(tmp_path):
    """Save at step 3 of 7 with torch.distributed.checkpoint (sharded model and optimizer state dicts,
    the TargetingScheduler's state, each rank's RNG), resume in fresh processes: α/γ at every later
    step and the final weights equal those of the uninterrupted run."""
    _spawn(tmp_path, _resume_worker, "first")
    assert (tmp_path / "ckpt" / ".metadata").exists()
    _spawn(tmp_path, _resume_worker, "resume")
    full, resumed = torch.load(tmp_path / "uninterrupted.pt"), torch.load(tmp_path / "resumed.pt")
    assert resumed["values"] == full["values"][RESUME_AT:]
    assert [v[0] for v in resumed["values"]] == list(range(RESUME_AT, TOTAL))
    assert len({v[1:] for v in resumed["values"]}) > 1  # still ramping after the resume
    assert resumed["state"].keys() == full["state"].keys()
    for name in full["state"]:
        torch.testing.assert_close(resumed["state"][name], full["state"][name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------- (f) full state dict
def _save_pretrained_worker(rank: int, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from conftest import tiny_bert

    torch.manual_seed(0)
    model = tiny_bert()
    patch_model(model, alpha=0.5, gamma=0.5)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(3, 99, (4, 7), generator=g)
        model(input_ids=ids, labels=torch.randint(0, 3, (4,), generator=g)).loss.backward()
        opt.step()
        opt.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        assert state and not any(isinstance(v, DTensor) for v in state.values())
        torch.save(state, os.path.join(out_dir, "gathered.pt"))
        model.save_pretrained(os.path.join(out_dir, "saved"), state_dict=state)  # (empties `state` as it writes)
    else:
        assert state == {}  # cpu_offload: only rank 0 holds the gathered dict
    dist.barrier()


LOAD_WITHOUT_HF_TDROP = textwrap.dedent("""
    import sys
    import torch
    from transformers import AutoModelForSequenceClassification
    model, info = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], output_loading_info=True)
    assert "hf_tdrop" not in sys.modules
    torch.save({"state": model.state_dict(), "info": info, "class": type(model).__name__,
                "architectures": model.config.architectures}, sys.argv[2])
""")


def test_gathered_full_state_dict_saves_a_plain_checkpoint_stock_transformers_loads(tmp_path):
    """A patched tiny BERT trained under FSDP2 (each BertLayer and the root sharded): the full state
    dict gathered with get_model_state_dict(full_state_dict=True, cpu_offload=True), saved with
    save_pretrained(state_dict=...), loads with stock AutoModelForSequenceClassification in a process
    that never imports hf_tdrop: the unpatched model's keys, no missing or unexpected key, the trained
    values."""
    from conftest import tiny_bert

    _spawn(tmp_path, _save_pretrained_worker)
    out = tmp_path / "loaded.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HF_TDROP, str(tmp_path / "saved"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded, gathered = torch.load(out, weights_only=False), torch.load(tmp_path / "gathered.pt")
    assert loaded["class"] == "BertForSequenceClassification"
    assert loaded["architectures"] == ["BertForSequenceClassification"]
    info = loaded["info"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(loaded["state"]) == set(tiny_bert().state_dict()) == set(gathered)
    for key, value in gathered.items():
        assert torch.equal(loaded["state"][key], value), key
    initial = tiny_bert().state_dict()  # seeded by conftest's autouse fixture, as the worker was
    assert not torch.equal(gathered["bert.encoder.layer.0.intermediate.dense.weight"],
                           initial["bert.encoder.layer.0.intermediate.dense.weight"])
