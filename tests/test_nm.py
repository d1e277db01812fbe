"""N:M targeted dropout and pruning: exact selection against a brute-force reference, tail groups,
layouts, the drop rate, check_nm_sparsity, to_semi_structured's errors, save_pruned metadata."""

from __future__ import annotations

import copy
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import TINY_MODELS, tiny_bert
from hf_tdrop import (
    TargetedDropoutConfig,
    check_nm_sparsity,
    patch_model,
    prune_model,
    pruned,
    save_pruned,
    set_targeting,
    targeted_layers,
    to_semi_structured,
    unpatch_model,
)
from hf_tdrop import masking
from hf_tdrop.layers import weight_layout
from hf_tdrop.methods.targeted_dropout import targeted_set
from hf_tdrop.targets import select_layers


def nm_reference(w2d: torch.Tensor, gamma: float, n: int, m: int, held: torch.Tensor | None = None) -> torch.Tensor:
    """Brute force, straight from the definition: per row, per group of m consecutive inputs (the last
    one shorter, as if zero-padded), the (m - n) - padding - held smallest surviving |w| (float32
    ranking, ties by index); of the groups with more than n entries, the floor(gamma * T) with the
    smallest float64 sum of their selected |w| (ties by group index)."""
    rows, fan_in = w2d.shape
    s = w2d.abs().double() if w2d.dtype == torch.float64 else w2d.abs().float()
    n_targetable = fan_in // m + (1 if fan_in % m > n else 0)
    k_groups = math.floor(Fraction(repr(float(gamma))) * n_targetable)
    out = torch.zeros(rows, fan_in, dtype=torch.bool)
    for r in range(rows):
        groups = []
        for gi, start in enumerate(range(0, fan_in, m)):
            idx = list(range(start, min(start + m, fan_in)))
            is_held = [bool(held[r, i]) if held is not None else False for i in idx]
            budget = max(0, (m - n) - (m - len(idx)) - sum(is_held))
            survivors = sorted((i for i, h in zip(idx, is_held) if not h), key=lambda i: (float(s[r, i]), i))
            chosen = survivors[:budget]
            if len(idx) > n:
                groups.append((sum(float(s[r, i]) for i in chosen), gi, chosen))
        for _, _, chosen in sorted(groups, key=lambda g: (g[0], g[1]))[:k_groups]:
            out[r, chosen] = True
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 5),
    fan_in=st.integers(1, 23),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8)]),
    gamma=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.99, 1.0]),
    n_distinct=st.sampled_from([2, 5, 1000]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    with_held=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nm_targeting_equals_brute_force_reference(rows, fan_in, nm, gamma, n_distinct, dtype, with_held, seed):
    """Exact selection, ties included (few distinct magnitudes), in every dtype, with and without
    held zeros, for every N:M and tail length."""
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, fan_in), generator=g) * 2 - 1
    w = (sign * torch.randint(0, n_distinct, (rows, fan_in), generator=g) / n_distinct).to(dtype)
    held = (torch.rand(rows, fan_in, generator=g) < 0.3) if with_held else None
    if held is not None:
        w = w.masked_fill(held, 0)
    expected = nm_reference(w, gamma, n, m, held)
    assert torch.equal(masking.targeted_nm(w, gamma, n, m, held=held), expected)
    # the transposed view (Conv1D's [in, out] storage) selects the same entries
    assert torch.equal(masking.targeted_nm(w.t().contiguous().t(), gamma, n, m, held=held), expected)


def test_tail_group_counts_as_zero_padded():
    w = torch.arange(1, 12, dtype=torch.float32).unsqueeze(0)  # |w| increasing: lowest index = smallest
    # 2:4, fan_in 11 = 4 + 4 + 3: the tail of 3 keeps 2, so its 1 smallest is targeted
    assert masking.targeted_nm(w, 1.0, 2, 4)[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 8]
    # fan_in 10 = 4 + 4 + 2: a tail of 2 <= n is left dense
    assert masking.targeted_nm(w[:, :10], 1.0, 2, 4)[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    # 1:4, tail of 3 keeps 1: its 2 smallest targeted
    assert masking.targeted_nm(w, 1.0, 1, 4)[0].nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    # a fan_in smaller than n: nothing to target
    assert not masking.targeted_nm(w[:, :2], 1.0, 2, 4).any()
    assert masking.nm_targetable_groups(11, 2, 4) == 3 and masking.nm_targetable_groups(10, 2, 4) == 2


def test_gamma_targets_the_cheapest_groups_and_skips_a_dense_tail():
    # groups of 4 (2:4): selected pairs sum to 0.3, 0.03, 3.0; a tail of 2 (nothing to target)
    w = torch.tensor([[0.1, 0.2, 5.0, 6.0, 0.01, 0.02, 5.0, 6.0, 1.0, 2.0, 5.0, 6.0, 0.0, 0.0]])
    assert masking.targeted_nm(w, 0.34, 2, 4)[0].nonzero().flatten().tolist() == [4, 5]
    assert masking.targeted_nm(w, 0.67, 2, 4)[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert masking.targeted_nm(w, 0.3, 2, 4).sum() == 0  # floor(0.3 * 3) = 0 groups


# ---------------------------------------------------------------------------------------- pruning


def _rows(module: nn.Module) -> torch.Tensor:
    return masking.unit_matrix(module.weight.detach(), weight_layout(module))


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet"])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_prune_nm_gives_an_exact_pattern_in_every_layout(name, method):
    model = TINY_MODELS[name]()
    originals = {n: _rows(mod).clone() for n, mod in select_layers(model)}
    assert not check_nm_sparsity(model).ok
    g = torch.Generator().manual_seed(0)
    report = prune_model(model, mode="nm", method=method, generator=g)
    assert report.mode == "nm" and (report.n, report.m) == (2, 4) and report.sparsity == 1.0
    check = check_nm_sparsity(model)
    assert check.ok and check.violating_groups == 0 and "exact" in str(check)
    for layer_name, mod in select_layers(model):
        before, after = originals[layer_name], _rows(mod)
        zeroed = (after == 0) & (before != 0)
        fan_in = before.shape[1]
        per_row = 2 * (fan_in // 4) + max(0, fan_in % 4 - 2)
        assert zeroed.sum(dim=1).tolist() == [per_row] * before.shape[0], layer_name
        if method == "magnitude":
            assert torch.equal(after == 0, nm_reference(before, 1.0, 2, 4) | (before == 0)), layer_name
        assert torch.equal(after[after != 0], before[after != 0])  # survivors untouched
    assert report.pruned_weights == sum(
        r.shape[0] * (2 * (r.shape[1] // 4) + max(0, r.shape[1] % 4 - 2)) for r in originals.values())


def test_prune_nm_random_is_reproducible_and_differs_from_magnitude():
    a, b, c = tiny_bert(), tiny_bert(), tiny_bert()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    prune_model(a, mode="nm", method="random", generator=torch.Generator().manual_seed(3))
    prune_model(b, mode="nm", method="random", generator=torch.Generator().manual_seed(3))
    prune_model(c, mode="nm")
    wa, wb, wc = (x.bert.encoder.layer[0].intermediate.dense.weight for x in (a, b, c))
    assert torch.equal(wa == 0, wb == 0) and not torch.equal(wa == 0, wc == 0)


def test_prune_nm_fraction_of_groups_and_other_patterns():
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    original = layer.weight.detach().clone()
    report = prune_model(layer, 0.5, mode="nm", n=1, m=4)
    assert report.to_dict()["n"] == 1 and report.to_dict()["m"] == 4 and "n:m=1:4" in str(report)
    zeros = layer.weight == 0
    assert zeros.sum(dim=1).tolist() == [2 * 3] * 6  # floor(0.5 * 4) groups, 3 entries each
    assert torch.equal(zeros, nm_reference(original, 0.5, 1, 4))
    assert check_nm_sparsity(layer, n=1, m=4).violating_groups == 6 * 2  # the untouched groups


def test_pruned_context_restores_nm_pruning():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pruned(model, mode="nm", n=2, m=4) as report:
        assert report.mode == "nm" and check_nm_sparsity(model).ok
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=0.5, mode="weight", n=2), r"`n`/`m` set the N:M pattern of mode='nm'"),
    (dict(mode="nm", n=4, m=4), r"`n` .* must be an integer in \[1, 3\]"),
    (dict(mode="nm", n=0), r"`n` .* in \[1, 3\]"),
    (dict(mode="nm", m=1, n=1), r"`m` .* >= 2"),
    (dict(mode="nm", n=2.0), r"`n` must be an integer"),
    (dict(mode="nm", sparsity=1.5), r"`sparsity` .* must be in \[0, 1\]"),
    (dict(mode="weight"), r"`sparsity` is required in mode 'weight'"),
])
def test_prune_nm_bad_arguments_change_nothing(kwargs, match):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_model(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------- targeted dropout


def _effective_linear_weight(layer: nn.Linear) -> torch.Tensor:
    out = layer(torch.eye(layer.in_features))
    return (out - layer.bias).t()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_nm_mode_zeroes_only_targeted_entries_at_rate_alpha(gamma):
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    original = layer.weight.detach().clone()
    patch_model(layer, alpha=0.4, gamma=gamma, mode="nm")
    targeted = masking.targeted_nm(original, gamma, 2, 4)
    assert targeted.sum(dim=1).tolist() == [2 * math.floor(gamma * 10)] * 30
    assert torch.equal(targeted_set(layer), targeted)
    layer.train()
    dropped_total, draws = 0, 200
    with torch.no_grad():
        for _ in range(draws):
            w_eff = _effective_linear_weight(layer)
            dropped = (w_eff == 0) & (original != 0)
            assert not (dropped & ~targeted).any(), "an untargeted weight was dropped"
            torch.testing.assert_close(w_eff[~dropped], original[~dropped], rtol=0, atol=1e-6)
            dropped_total += int(dropped.sum())
    trials = draws * int(targeted.sum())
    assert abs(dropped_total / trials - 0.4) < 6 * math.sqrt(0.4 * 0.6 / trials)


def test_nm_mode_on_gpt2_conv1d_groups_the_inputs_of_each_output_column():
    torch.manual_seed(0)
    layer = Conv1D(6, 8)  # weight [in=8, out=6]
    original = layer.weight.detach().clone()
    patch_model(layer, config=TargetedDropoutConfig(alpha=1.0, gamma=1.0, mode="nm"))
    layer.train()
    x = torch.eye(8)
    with torch.no_grad():
        w_eff = layer(x) - layer.bias  # [in, out]
    dropped = (w_eff == 0) & (original != 0)
    for o in range(6):
        for start in (0, 4):
            group = original[start:start + 4, o].abs()
            expected = torch.zeros(4, dtype=torch.bool)
            expected[group.argsort(stable=True)[:2]] = True
            assert torch.equal(dropped[start:start + 4, o], expected)


def test_nm_config_metadata_rescale_and_validation():
    config = TargetedDropoutConfig(alpha=0.5, gamma=1.0, mode="nm", n=1, m=4)
    assert TargetedDropoutConfig.from_dict(json.loads(config.to_json_string())) == config
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    patch_model(layer, alpha=0.5, gamma=1.0, mode="nm", n=1, m=4)
    assert targeted_layers(layer)[""] == {"type": "Linear", "mode": "nm", "alpha": 0.5, "gamma": 1.0, "n": 1, "m": 4}
    assert layer.tdrop_state.targeted_fraction == 0.75
    unpatch_model(layer)
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=1.0, mode="nm", rescale=True))
    layer.train()
    original = layer.weight.detach().clone()
    with torch.no_grad():
        w_eff = _effective_linear_weight(layer)
    kept = w_eff != 0
    torch.testing.assert_close(w_eff[kept], original[kept] / (1 - 0.5 * 0.5))
    for kwargs, match in ((dict(n=0), "`n`"), (dict(m=2, n=2), "`n`"), (dict(n=True), "`n` must be an integer")):
        with pytest.raises(ValueError, match=match):
            TargetedDropoutConfig(alpha=0.5, gamma=0.5, mode="nm", **kwargs)
    with pytest.raises(ValueError, match="`n`/`m` set the N:M pattern"):
        patch_model(nn.Linear(4, 4), alpha=0.5, gamma=0.5, n=2)


def test_nm_targeted_dropout_then_nm_pruning_keeps_the_trained_targets():
    """γ ramps group by group; at γ = 1 the targeted set is exactly what nm pruning removes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    patch_model(model, alpha=0.5, gamma=0.0, mode="nm", target_modules=["0"])
    sizes = []
    for gamma in (0.0, 0.25, 0.5, 1.0):
        set_targeting(model, gamma=gamma)
        sizes.append(int(targeted_set(model[0]).sum()))
    assert sizes == [0, 32 * 2 * 1, 32 * 2 * 2, 32 * 2 * 4]
    expected = targeted_set(model[0]).clone()
    prune_model(model, mode="nm", target_modules=["0"])
    assert torch.equal(model[0].weight == 0, expected)


# ---------------------------------------------------------------------------------------- check / export


def test_check_nm_sparsity_counts_violating_groups_per_layer():
    model = nn.Sequential(nn.Linear(10, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([
            [1, 1, 0, 0, 1, 0, 0, 1, 1, 1],  # ok, ok, tail [1, 1] ok
            [1, 1, 1, 0, 1, 1, 1, 1, 0, 0],  # 3 nonzeros, 4 nonzeros, tail ok
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ], dtype=torch.float32))
        model[2].weight.fill_(1.0)  # 3 inputs: one short group of 3 > 2 nonzeros per row
    report = check_nm_sparsity(model, target_modules=["0", "2"])
    assert not report.ok and report.failing_layers == ["0", "2"]
    first, second = report.layers
    assert (first.n_groups, first.violating_groups, first.max_nonzeros) == (9, 2, 4)
    assert (second.n_groups, second.violating_groups, second.max_nonzeros) == (2, 2, 3)
    assert report.to_dict()["violating_groups"] == 4
    text = str(report)
    assert "NOT exact in 2 layer(s)" in text and "2/9" in text
    assert report.to_markdown().count("\n") == 2 + 2
    assert check_nm_sparsity(model, n=3, m=4, target_modules=["0"]).violating_groups == 1
    for kwargs, match in ((dict(n=2, m=2), "`n`"), (dict(target_modules=["nope"]), "No layer matched")):
        with pytest.raises(ValueError, match=match):
            check_nm_sparsity(model, **kwargs)
    for function in (check_nm_sparsity, to_semi_structured):
        with pytest.raises(ValueError, match="`model` must be a torch.nn.Module"):
            function("model")


def _two_four_linear(dtype=torch.float16, shape=(32, 64)) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0]), nn.ReLU(), nn.Linear(shape[0], 4)).to(dtype)
    prune_model(model, mode="nm", target_modules=["0"])
    return model


def test_to_semi_structured_errors_are_clear_on_cpu():
    for model, error, match in (
        (_two_four_linear(torch.float32), ValueError, "dtype torch.float32 .*torch.float16 or torch.bfloat16"),
        (_two_four_linear(shape=(24, 64)), ValueError, r"weight shape \[24, 64\]"),
        (nn.Sequential(nn.Linear(64, 32).half()), ValueError, "not exactly 2:4"),
        (_two_four_linear(), RuntimeError if not torch.cuda.is_available() else None, "needs CUDA"),
    ):
        if error is None:
            continue
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(error, match=match):
            to_semi_structured(model, target_modules=["0"])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing converted
    patched = _two_four_linear()
    patch_model(patched, alpha=0.5, gamma=0.5, target_modules=["0"])
    with pytest.raises(ValueError, match="patched for training by hf_tdrop"):
        to_semi_structured(patched, target_modules=["0"])
    from hf_tdrop import L1Config

    with_method = _two_four_linear()
    patch_model(with_method, config=L1Config(target_modules=["0"]))  # patched with another method
    with pytest.raises(ValueError, match="0: patched for"):
        to_semi_structured(with_method, target_modules=["0"])
    with pytest.raises(ValueError, match="converts nn.Linear layers"):
        to_semi_structured(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 semi-structured sparse kernels need a CUDA GPU of compute capability 8.0+")
def test_to_semi_structured_on_cuda_matches_the_dense_pruned_model():
    model = _two_four_linear(torch.float16, (128, 128)).cuda().eval()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        dense = model(x)
        assert to_semi_structured(model, target_modules=["0"]) == ["0"]
        sparse = model(x)
    assert type(model[0].weight.data).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)


def test_save_pruned_records_nm_pattern(tmp_path):
    model = tiny_bert()
    report = prune_model(model, mode="nm", n=2, m=4)
    save_pruned(model, tmp_path / "out", prune_report=report)
    meta = json.loads((tmp_path / "out" / "tdrop_config.json").read_text())
    pruning = meta["pruning"]
    assert (pruning["mode"], pruning["n"], pruning["m"], pruning["sparsity"]) == ("nm", 2, 4, 1.0)
    assert pruning["nm_check"]["exact"] is True and pruning["nm_check"]["violating_groups"] == 0
    assert "2:4 (exact in every pruned layer)" in (tmp_path / "out" / "README.md").read_text()
    # settings without a report are validated like prune_model's
    save_pruned(model, tmp_path / "explicit", mode="nm", n=2, m=4)
    assert json.loads((tmp_path / "explicit" / "tdrop_config.json").read_text())["pruning"]["nm_check"]["exact"]
    with pytest.raises(ValueError, match="`n`/`m` record an N:M pattern"):
        save_pruned(model, tmp_path / "bad", mode="weight", sparsity=0.5, n=2)
    with pytest.raises(ValueError, match="`m`=8 disagrees"):
        save_pruned(model, tmp_path / "bad", prune_report=report, m=8)
