"""The optimised masking path against straightforward reference implementations."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_tdrop import TargetedDropoutConfig, masking, native, patch_model
from hf_tdrop.layers import MaskedLinearFunction
from hf_tdrop.methods.targeted_dropout import targeted_set


def reference_targeted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Stable full sort: the k smallest per row, ties to the lowest index."""
    order = torch.argsort(scores.float(), dim=-1, stable=True)
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask.scatter_(-1, order[..., :k], True)
    return mask


def reference_drop(w2d: torch.Tensor, gamma: float, alpha: float, mode: str) -> torch.Tensor:
    """The paper's procedure written plainly: rank by a full stable sort, target, then Bernoulli(α) on a
    full-size draw."""
    if mode == "weight":
        k = math.floor(Fraction(repr(gamma)) * w2d.shape[1])
        targeted = reference_targeted(w2d.abs(), k)
    else:
        k = math.floor(Fraction(repr(gamma)) * w2d.shape[0])
        targeted = reference_targeted(w2d.float().norm(dim=1), k)
    if alpha <= 0:
        return torch.zeros_like(targeted)
    if alpha >= 1:
        return targeted
    # one uniform 16-bit word per element (the documented draw), dropped iff below α's share of 2**16
    words = masking.random_words(targeted.shape).int() + 32768  # uniform in [0, 65536)
    return targeted & (words < round(alpha * 65536))


@pytest.mark.parametrize("mode", ["weight", "unit"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("gamma,alpha", [(0.75, 0.66), (0.9, 0.75), (0.5, 1.0), (0.3, 0.0)])
def test_patched_layer_masks_equal_reference_from_same_rng_state(mode, ties, gamma, alpha):
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=False)
    if ties:
        with torch.no_grad():
            layer.weight.copy_(torch.randint(-3, 4, layer.weight.shape) / 4)
    w = layer.weight.detach().clone()
    patch_model(layer, alpha=alpha, gamma=gamma, mode=mode)
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            w_eff = layer(torch.eye(48)).t()
        torch.manual_seed(seed)
        expected = reference_drop(w, gamma, alpha, mode)
        if mode == "unit":
            expected = expected[:, None].expand_as(w)
        assert torch.equal(w_eff == 0, expected | (w == 0))


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_masked_linear_function_matches_autograd(autocast, transposed):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    weight = torch.randn(16, 12, requires_grad=True) if transposed else torch.randn(12, 16, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    drop = torch.rand(weight.shape) < 0.5
    w_view = weight.t() if transposed else weight
    d_view = drop.t() if transposed else drop
    g = torch.randn(3, 5, 12)

    def run(fn):
        for t in (x, weight, bias):
            t.grad = None
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            out = fn()
        out.backward(g.to(out.dtype))
        return out.detach(), x.grad.clone(), weight.grad.clone(), bias.grad.clone()

    ours = run(lambda: MaskedLinearFunction.apply(x, w_view, bias, d_view))
    plain = run(lambda: F.linear(x, w_view.masked_fill(d_view, 0.0), bias))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    assert (weight.grad[drop] == 0).all()


def test_conv1d_weight_mode_gradients_match_plain_masking():
    torch.manual_seed(0)
    layer = Conv1D(nf=10, nx=6)
    patch_model(layer, alpha=0.5, gamma=0.5)
    x = torch.randn(4, 6)
    torch.manual_seed(9)
    layer(x).square().sum().backward()
    grad = layer.weight.grad.clone()
    torch.manual_seed(9)
    from hf_tdrop.methods.targeted_dropout import sample_drop_mask

    drop, _ = sample_drop_mask(layer, sample=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    torch.addmm(layer.bias.detach(), x, w.masked_fill(drop, 0.0)).square().sum().backward()
    torch.testing.assert_close(grad, w.grad)


def test_refresh_every_reuses_targeted_set_until_k_updates_or_gamma_change():
    torch.manual_seed(0)
    layer = nn.Linear(20, 8)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=3))
    opt = torch.optim.SGD(layer.parameters(), lr=10.0)  # big steps: the ranking changes
    first = targeted_set(layer)
    assert first is targeted_set(layer)  # no update yet: cached
    sets = [first]
    for _ in range(3):
        layer(torch.randn(4, 20)).sum().backward()
        opt.step()
        opt.zero_grad()
        sets.append(targeted_set(layer))
    assert sets[1] is first and sets[2] is first  # 1 and 2 updates: reused
    assert sets[3] is not first  # 3 updates: re-targeted from the current weights
    from hf_tdrop import masking

    assert torch.equal(sets[3], masking.targeted_weights(layer.weight, 0.5))
    layer.tdrop_state.gamma = 0.25
    assert targeted_set(layer).sum(dim=1).tolist() == [5] * 8  # γ change re-targets at once


def _refresh_pattern(layer, opt, steps, forwards_per_step=1):
    """Train ``layer`` for ``steps`` optimizer steps; per forward, whether the targeted set was
    recomputed (a new tensor) rather than reused from the cache. Every recomputed set is checked to
    be the exact targeting of the weights at that moment."""
    recomputed, previous = [], None
    for _ in range(steps):
        for _ in range(forwards_per_step):
            layer(torch.randn(4, layer.in_features)).square().sum().backward()
            current = layer.tdrop_state.cached_targeting[-1]
            recomputed.append(current is not previous)
            if current is not previous:
                assert torch.equal(current, masking.targeted_weights(layer.weight, layer.tdrop_state.gamma))
            previous = current
        opt.step()
        opt.zero_grad()
    return recomputed


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True), id="adamw-fused"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1, foreach=True), id="adamw-foreach-wd"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1, foreach=False), id="adamw-forloop-wd"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1, foreach=False), id="sgd-forloop-wd"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.1, foreach=True), id="adam-foreach"),
])
@pytest.mark.parametrize("forwards_per_step", [1, 2])
def test_refresh_every_counts_optimizer_steps_for_every_optimizer(make_opt, forwards_per_step):
    """refresh_every=4 re-targets at optimizer steps 0, 4, 8, whatever the optimizer does to the
    weight tensor (fused AdamW never bumps its version counter, AdamW with weight decay bumps it
    twice per step), and with gradient accumulation (several forwards per step) only at a step."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=4))
    layer.train()
    recomputed = _refresh_pattern(layer, make_opt(layer.parameters()), 12, forwards_per_step)
    steps = [i // forwards_per_step for i, r in enumerate(recomputed) if r]
    assert steps == [0, 4, 8]


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True), id="adamw-fused"),
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1, foreach=False), id="sgd-forloop-wd"),
])
def test_gradient_accumulation_ranks_once_per_optimizer_step(make_opt):
    """refresh_every=1 (the default): the micro-batches of one optimizer step share one targeted set
    (ranked at the first), and every optimizer step ranks again, also for fused AdamW, which does
    not bump the weight's version counter. Each recomputed set is the exact targeting then."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5))
    layer.train()
    recomputed = _refresh_pattern(layer, make_opt(layer.parameters()), 5, forwards_per_step=4)
    assert [i for i, r in enumerate(recomputed) if r] == [0, 4, 8, 12, 16]


def test_weight_changed_between_forwards_is_ranked_again():
    """Without an optimizer step, any in-place change of the weight (copy_, load_state_dict,
    pruning) or a new weight tensor makes the next forward rank again; the masks keep being drawn
    fresh every forward."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5))
    layer.train()
    x = torch.randn(4, 32)
    layer(x)
    first = layer.tdrop_state.cached_targeting[-1]
    layer(x)
    assert layer.tdrop_state.cached_targeting[-1] is first  # unchanged weight: reused
    with torch.no_grad():
        layer.weight.copy_(-layer.weight.flip(1))
    layer(x)
    second = layer.tdrop_state.cached_targeting[-1]
    assert second is not first and torch.equal(second, masking.targeted_weights(layer.weight, 0.5))
    layer.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.zeros(16)})
    layer(x)
    third = layer.tdrop_state.cached_targeting[-1]
    assert third is not second and torch.equal(third, masking.targeted_weights(layer.weight, 0.5))
    layer.weight = nn.Parameter(torch.randn(16, 32))
    layer(x)
    assert torch.equal(layer.tdrop_state.cached_targeting[-1], masking.targeted_weights(layer.weight, 0.5))
    # fresh Bernoulli draws on a reused set
    from hf_tdrop.methods.targeted_dropout import sample_drop_mask

    draws = {tuple(sample_drop_mask(layer, sample=True)[0].flatten().tolist()) for _ in range(4)}
    assert len(draws) == 4


def test_refresh_every_counts_only_the_steps_of_the_optimizer_holding_the_weight():
    torch.manual_seed(0)
    layer, other = nn.Linear(32, 16), nn.Linear(4, 4)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=3))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    recomputed, previous = [], None
    for _ in range(7):
        layer(torch.randn(4, 32)).square().sum().backward()
        other(torch.randn(2, 4)).sum().backward()
        current = layer.tdrop_state.cached_targeting[-1]
        recomputed.append(current is not previous)
        previous = current
        opt.step()
        for _ in range(5):  # an unrelated optimizer stepping more often does not advance the layer's clock
            other_opt.step()
    assert [i for i, r in enumerate(recomputed) if r] == [0, 3, 6]


def test_refresh_every_under_trainer_with_accumulation_and_checkpointing(tmp_path):
    """Trainer (accelerate, its default fused AdamW), 2 micro-batches per optimizer step and gradient
    checkpointing (every forward recomputed in backward): all forwards of one optimizer step see the
    same targeted set, and it is recomputed exactly every ``refresh_every`` optimizer steps."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_bert

    model = tiny_bert()
    patch_model(model, config=TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=2,
                                                    target_modules="intermediate.dense"))
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(3, 99, (48, 8), generator=g).tolist(),
                              "labels": torch.randint(0, 3, (48,), generator=g).tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=6, activation_checkpointing=True, learning_rate=0.05,
        save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    layer = model.bert.encoder.layer[0].intermediate.dense
    seen = []  # (optimizer step, targeted set) at every training forward of the layer
    layer.register_forward_hook(
        lambda m, a, o: seen.append((trainer.state.global_step, m.tdrop_state.cached_targeting[-1])) if m.training else None)
    trainer.train()
    assert [step for step, _ in seen] == [s for s in range(6) for _ in range(4)]  # 2 micro-batches x recompute
    by_step = {}
    for step, targeted in seen:
        by_step.setdefault(step, []).append(targeted)
    for step, sets in by_step.items():
        assert all(t is sets[0] for t in sets), f"step {step}: the forwards of one step saw different sets"
    firsts = [by_step[s][0] for s in range(6)]
    assert [firsts[s] is not firsts[s - 1] for s in range(1, 6)] == [False, True, False, True, False]


def test_refresh_every_validation():
    with pytest.raises(ValueError, match="`refresh_every` must be an integer >= 1"):
        TargetedDropoutConfig(alpha=0.5, gamma=0.5, refresh_every=0)


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_backward_keeps_no_weight_sized_float_copy(mode):
    """Weight mode keeps the parameter itself plus a bool mask; unit mode an [n_out] multiplier only."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    patch_model(layer, alpha=0.5, gamma=0.5, mode=mode)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    weight_ptr = layer.weight.untyped_storage().data_ptr()
    extra = [t for t in saved if t.untyped_storage().data_ptr() != weight_ptr and t.numel() >= layer.weight.numel()]
    if mode == "weight":
        assert [t.dtype for t in extra] == [torch.bool]
    else:
        assert extra == []
        assert any(t.numel() == 128 and not t.requires_grad for t in saved)  # the [n_out] keep multiplier


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_bracketed_targeting_equals_full_sort_over_training(layer_type):
    """The layer re-ranks every step through the bracket of the previous step; over an Adam run with a
    γ ramp and a weight reload, its targeted set is the full stable sort's at every step."""
    torch.manual_seed(0)
    layer = nn.Linear(96, 64) if layer_type == "linear" else Conv1D(nf=64, nx=96)
    patch_model(layer, alpha=0.5, gamma=0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    w2d = (lambda: layer.weight.detach()) if layer_type == "linear" else (lambda: layer.weight.detach().t())
    for step in range(25):
        gamma = 0.5 + 0.01 * step
        layer.tdrop_state.gamma = gamma
        if step == 15:  # weights replaced wholesale: the old bracket is useless, the set still exact
            layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        targeted = targeted_set(layer)
        k = math.floor(Fraction(repr(gamma)) * 96)
        assert torch.equal(targeted, reference_targeted(w2d().abs(), k)), step
        assert layer.tdrop_state.threshold_bracket is not None
        layer(torch.randn(8, 96)).square().mean().backward()
        opt.step()
        opt.zero_grad()


# --------------------------------------------------------------------------------------------------
# the accelerator path: selection without host synchronisation
# --------------------------------------------------------------------------------------------------

HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero")  # .item()/bool()/int() and nonzero read back


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def host_syncs(self):
        return [op for op in self.ops if op.startswith(HOST_SYNC_OPS)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_sync_free_selection_equals_stable_sort(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        rows, n = int(torch.randint(1, 7, (), generator=g)), int(torch.randint(1, 50, (), generator=g))
        if trial % 2:  # heavy ties, negative values and a -0.0
            scores = torch.randint(-3, 3, (rows, n), generator=g).to(dtype)
            scores[:, 0] = -0.0
        else:
            scores = torch.randn(rows, n, generator=g).to(dtype)
        for k in range(0, n + 1):
            got = masking.lowest_k_sync_free(scores, k)
            assert torch.equal(got, reference_targeted(scores.double(), k)), (trial, k)
            assert torch.equal(got, masking.lowest_k(scores, k))
    # the mask keeps the layout of the scores (Conv1D's [n_out, fan_in] view is transposed)
    scores = torch.randn(16, 8).t()
    for k in (0, 3, 8):
        assert masking.lowest_k_sync_free(scores, k).stride() == masking.lowest_k(scores, k).stride() == scores.stride()


def _patched_stack(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), Conv1D(32, 16), nn.Conv1d(32, 8, 1))
    gamma = 1.0 if mode == "nm" else 0.5
    patch_model(model, config=TargetedDropoutConfig(mode=mode, alpha=0.5, gamma=gamma))
    return model.train()


def _train_steps(model, steps=3):
    """Targeted sets (per layer, per step) and the host syncs seen in the forward/backward passes."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sets, syncs = [], []
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        with RecordOps() as rec:
            y = model[1](model[0](x))
            y = model[2](y.unsqueeze(-1)).squeeze(-1)
            y.square().sum().backward()
        syncs += rec.host_syncs()
        sets.append([layer.tdrop_state.cached_targeting[-1].clone() for layer in model])
        opt.step()
        opt.zero_grad()
    return sets, syncs


@pytest.mark.parametrize("mode", ["weight", "unit", "nm"])
def test_accelerator_dispatch_selects_the_same_sets_without_host_syncs(mode, monkeypatch):
    """On the device types of SYNC_FREE_DEVICE_TYPES a training step reads nothing back to the host.
    Checked on CPU by declaring "cpu" such a type; the CPU path itself does read values back (so the
    recorder would see a sync), and both give the same targeted sets. (The torch implementation of
    the CPU path: the compiled kernel of hf_tdrop.native, which reads nothing back through torch
    ops, is off.)"""
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    host_sets, host_syncs = _train_steps(_patched_stack(mode))
    assert host_syncs, "the CPU path is expected to read values back (bracketed counting / tie checks)"
    monkeypatch.setattr(masking.selection, "SYNC_FREE_DEVICE_TYPES", frozenset({"cpu"}))
    free_sets, free_syncs = _train_steps(_patched_stack(mode))
    assert free_syncs == []
    for host_step, free_step in zip(host_sets, free_sets):
        for a, b in zip(host_step, free_step):
            assert torch.equal(a, b)
    assert masking.uses_sync_free_selection(torch.empty(1, device="meta")) is False
    monkeypatch.setattr(masking.selection, "SYNC_FREE_DEVICE_TYPES", frozenset({"meta"}))
    assert masking.uses_sync_free_selection(torch.empty(1, device="meta"))


def test_step_overhead_benchmark_compares_both_selection_paths(capsys):
    from conftest import run_benchmark

    step_overhead, out = run_benchmark("step_overhead", [
        "--archs", "bert", "--layers", "1", "--tokens", "128", "--modes", "weight", "--trials", "1",
        "--warmup", "0", "--refresh_every", "1", "--compare_selection"], capsys)
    rows = [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| bert | 128 |")]
    assert rows == ["unpatched", "nn.Dropout p=0.1", "tdrop weight", "tdrop weight, sync-free selection"]
    assert "ratios of CPU time" in out
    assert masking.selection.SYNC_FREE_DEVICE_TYPES == frozenset({"cuda", "xpu", "mps"})  # restored after the variant
    with pytest.raises(SystemExit) as exc:
        step_overhead.main(["--device", "nonsense"])
    assert exc.value.code == 2 and "--device: not a torch device: 'nonsense'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_mode_masks_the_output_in_place_with_the_values_and_gradients_of_the_plain_multiply(kind, dtype):
    """Unit mode's fused path (UnitMaskedLinearFunction) gives bit for bit the output and the input,
    weight and bias gradients of ``original forward * keep``, and keeps no activation-sized tensor
    of its own for backward (only the [n_out] bool mask besides what the plain layer keeps)."""
    import copy

    from transformers.pytorch_utils import Conv1D

    from hf_tdrop.methods.targeted_dropout import sample_drop_mask

    torch.manual_seed(0)
    plain = (nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)).to(dtype)
    model = nn.Sequential(copy.deepcopy(plain))
    patch_model(model, 0.9, 0.75, mode="unit")
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(1)
        out = model(x)
    torch.manual_seed(1)
    drop, _ = sample_drop_mask(model[0], True)
    assert 0 < int(drop.sum()) < 24
    expected = plain(x_ref) * (~drop).to(dtype)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(model[0].weight.grad, plain.weight.grad) and torch.equal(model[0].bias.grad, plain.bias.grad)
    # the input, the weight and the [n_out] mask: no activation-sized tensor of the output's size
    assert sorted(tuple(t.shape) for t in saved) == sorted([tuple(x.shape), tuple(plain.weight.shape), (24,)])
    assert [t.dtype for t in saved if t.dim() == 1] == [torch.bool]
