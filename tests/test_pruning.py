"""prune_model / pruned / sparsity_report: exact counts, which weights, layouts, restore, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import TINY_MODELS, tiny_bert, tiny_gpt2, tiny_inputs, tiny_resnet
from hf_tdrop import PruneReport, patch_model, prune_model, pruned, sparsity_report
from hf_tdrop.layers import weight_layout
from hf_tdrop.masking import unit_matrix
from hf_tdrop.targets import output_head_names, select_layers


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor: equality is bit-for-bit (-0.0 != 0.0, NaN == same NaN)."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_equal(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        if v.is_floating_point():
            assert torch.equal(_bits(state[k]), _bits(v)), k
        else:
            assert torch.equal(state[k], v), k


def _rows(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[n_out, fan_in] view of ``weight`` (default: the module's) in the module's layout."""
    return unit_matrix(module.weight.detach() if weight is None else weight, weight_layout(module))


def _lowest_by_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference selection: stable sort, first k indices of each row (ties -> lowest index)."""
    idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, idx, True)


# ---------------------------------------------------------------------------------------- weight mode


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet", "t5"])
def test_weight_mode_zeroes_exactly_the_smallest_entries_of_each_unit(name):
    model = TINY_MODELS[name]()
    before = _snapshot(model)
    originals = {n: _rows(m).clone() for n, m in select_layers(model)}
    report = prune_model(model, 0.5, mode="weight")

    targeted = select_layers(model)
    assert [layer.name for layer in report.layers] == [n for n, _ in targeted]
    for n, module in targeted:
        w0 = originals[n]
        n_out, fan_in = w0.shape
        k = math.floor(0.5 * fan_in)
        expected = _lowest_by_sort(w0.abs(), k)
        zero = _rows(module) == 0
        assert torch.equal(zero, expected), n                        # exactly the k smallest |w| per w_o
        assert torch.equal(zero.sum(dim=1), torch.full((n_out,), k)), n
        assert torch.equal(_rows(module)[~zero], w0[~zero]), n       # the rest untouched
        info = next(layer for layer in report.layers if layer.name == n)
        assert (info.pruned_weights, info.pruned_units, info.n_weights) == (n_out * k, 0, n_out * fan_in)
        if getattr(module, "bias", None) is not None:                 # weight mode never touches biases
            assert torch.equal(module.bias, before[f"{n}.bias"]), n
    # every other tensor (heads, embeddings, norms) untouched
    pruned_keys = {f"{n}.weight" for n, _ in targeted}
    state = model.state_dict()
    for key, value in before.items():
        if key not in pruned_keys:
            assert torch.equal(state[key], value), key
    assert report.pruned_weights == sum(layer.pruned_weights for layer in report.layers)
    assert report.pruned_fraction == report.pruned_weights / report.n_weights <= 0.5


def test_gpt2_conv1d_prunes_per_output_column():
    model = tiny_gpt2()
    fc = model.transformer.h[0].mlp.c_fc                    # Conv1D weight is [in=32, out=128]
    assert isinstance(fc, Conv1D) and fc.weight.shape == (32, 128)
    w0 = fc.weight.detach().clone()
    prune_model(model, 0.25)
    zero = fc.weight == 0
    assert torch.equal(zero.sum(dim=0), torch.full((128,), 8))        # floor(0.25 * 32) per output column
    assert torch.equal(zero, _lowest_by_sort(w0.abs().t(), 8).t())
    assert model.lm_head.weight.eq(0).sum() == 0                       # tied head untouched


def test_conv2d_prunes_per_output_channel_over_in_and_kernel():
    model = tiny_resnet()
    convs = [(n, m) for n, m in select_layers(model) if isinstance(m, nn.Conv2d)]
    assert convs
    originals = {n: m.weight.detach().clone() for n, m in convs}
    prune_model(model, 0.3)
    for n, conv in convs:
        out_ch, in_ch, kh, kw = conv.weight.shape
        fan_in = in_ch * kh * kw
        k = math.floor(0.3 * fan_in)
        zero = conv.weight == 0
        assert torch.equal(zero.flatten(1).sum(dim=1), torch.full((out_ch,), k)), n
        assert torch.equal(zero, _lowest_by_sort(originals[n].abs().flatten(1), k).view_as(zero)), n
    assert model.classifier[1].weight.eq(0).sum() == 0


def test_floor_count_and_tied_magnitudes_are_deterministic():
    layer = nn.Linear(5, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([
            [3.0, 1.0, -1.0, 2.0, 1.0],      # |w| ties at 1: positions 1, 2, 4
            [1.0, -1.0, 1.0, -1.0, 1.0],     # all tied
            [0.5, 4.0, -0.25, 0.5, 9.0],     # tie at 0.5 after the single smallest
        ]))
    model = nn.Sequential(layer)
    twin = copy.deepcopy(model)
    report = prune_model(model, 0.45)                                  # floor(0.45 * 5) = 2
    assert report.layers[0].pruned_weights == 6
    expected = torch.tensor([
        [False, True, True, False, False],
        [True, True, False, False, False],
        [True, False, True, False, False],
    ])
    assert torch.equal(layer.weight == 0, expected)
    prune_model(twin, 0.45)
    assert torch.equal(twin[0].weight, layer.weight)


def test_small_sparsity_prunes_nothing_below_one_element():
    model = nn.Sequential(nn.Linear(4, 6))
    w0 = model[0].weight.detach().clone()
    report = prune_model(model, 0.2)                                   # floor(0.2 * 4) = 0
    assert report.pruned_weights == 0 and torch.equal(model[0].weight, w0)
    report = prune_model(model, 0.2, mode="unit")                      # floor(0.2 * 6) = 1
    assert report.pruned_units == 1 and (model[0].weight == 0).all(dim=1).sum() == 1


# ------------------------------------------------------------------------------------------ unit mode


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet"])
def test_unit_mode_zeroes_the_lowest_norm_units_and_their_bias(name):
    model = TINY_MODELS[name]()
    with torch.no_grad():                          # HF initialises biases to zero: make them visible
        for _, m in select_layers(model):
            if m.bias is not None:
                m.bias.uniform_(0.5, 1.0)
    before = _snapshot(model)
    originals = {n: _rows(m).clone() for n, m in select_layers(model)}
    report = prune_model(model, 0.5, mode="unit")
    for (n, module), info in zip(select_layers(model), report.layers):
        w0 = originals[n]
        n_out, fan_in = w0.shape
        k = math.floor(0.5 * n_out)
        expected_units = _lowest_by_sort(torch.linalg.vector_norm(w0, dim=1), k)
        rows = _rows(module)
        assert torch.equal((rows == 0).all(dim=1), expected_units), n
        assert torch.equal(rows[~expected_units], w0[~expected_units]), n
        if module.bias is not None:
            b0 = before[f"{n}.bias"]
            assert (module.bias[expected_units] == 0).all(), n
            assert torch.equal(module.bias[~expected_units], b0[~expected_units]), n
            assert info.pruned_biases == k
        assert (info.pruned_units, info.pruned_weights) == (k, k * fan_in)
    heads = output_head_names(model)
    for n, m in model.named_modules():
        if n in heads:
            assert torch.equal(m.weight, before[f"{n}.weight"]), n


def test_unit_mode_conv1d_zeroes_columns():
    model = tiny_gpt2()
    attn = model.transformer.h[1].attn.c_attn                # [32, 96]
    with torch.no_grad():
        attn.bias.uniform_(0.5, 1.0)                          # GPT-2 initialises biases to zero
    prune_model(model, 0.5, mode="unit")
    dead_cols = (attn.weight == 0).all(dim=0)
    assert dead_cols.sum() == 48 and (attn.weight == 0).all(dim=1).sum() == 0
    assert torch.equal(attn.bias == 0, dead_cols)


# -------------------------------------------------------------------------------------------- random


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_random_method_counts_and_differs_from_magnitude(mode):
    model = tiny_bert()
    twin = copy.deepcopy(model)
    rand = prune_model(model, 0.5, mode=mode, method="random", generator=torch.Generator().manual_seed(1))
    mag = prune_model(twin, 0.5, mode=mode)
    assert rand.pruned_weights == mag.pruned_weights and rand.pruned_units == mag.pruned_units
    assert rand.method == "random"
    differs = False
    for (n, m), (_, t) in zip(select_layers(model), select_layers(twin)):
        zero = _rows(m) == 0
        if mode == "weight":
            assert torch.equal(zero.sum(dim=1), torch.full((zero.shape[0],), zero.shape[1] // 2)), n
        else:
            assert zero.all(dim=1).sum() == zero.shape[0] // 2, n
        differs |= not torch.equal(zero, _rows(t) == 0)
    assert differs


def test_random_method_is_reproducible_with_a_generator():
    a, b = tiny_bert(), tiny_bert()
    b.load_state_dict(a.state_dict())
    prune_model(a, 0.4, method="random", generator=torch.Generator().manual_seed(7))
    prune_model(b, 0.4, method="random", generator=torch.Generator().manual_seed(7))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


# ------------------------------------------------------------------------------------ targets, patched


def test_explicit_targets_can_prune_a_head_only():
    model = tiny_bert()
    before = _snapshot(model)
    report = prune_model(model, 0.5, target_modules="classifier")
    assert [layer.name for layer in report.layers] == ["classifier"]
    assert (model.classifier.weight == 0).sum() == 3 * 16
    for key, value in before.items():
        if key != "classifier.weight":
            assert torch.equal(model.state_dict()[key], value), key


def test_exclude_modules_leaves_those_layers_alone():
    model = tiny_bert()
    report = prune_model(model, 0.5, exclude_modules=r".*\.attention\..*")
    names = [layer.name for layer in report.layers]
    assert names and not any(".attention." in n for n in names)
    assert (model.bert.encoder.layer[0].attention.self.query.weight == 0).sum() == 0


def test_pruning_a_patched_model_prunes_its_parameters():
    model = tiny_bert()
    plain = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    patch_model(model, alpha=0.66, gamma=0.75)
    prune_model(model, 0.5)
    prune_model(plain, 0.5)
    assert {n: p for n, p in model.named_parameters()} == params_before     # same Parameter objects
    for (k, v), w in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(v, w), k
    inputs = tiny_inputs("bert")
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain(**inputs).logits)


def test_a_patched_model_prunes_only_the_layers_it_was_trained_with():
    """GPT-2 trained with unit targeted dropout on its MLPs only: pruning without target_modules
    leaves the attention (c_attn's Q/K/V units) alone; explicit targets still win."""
    model = tiny_gpt2()
    patch_model(model, alpha=0.5, gamma=0.5, mode="unit", target_modules=r".*\.mlp\..*")
    attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    report = prune_model(model, 0.5, mode="unit")
    names = [layer.name for layer in report.layers]
    assert names == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, attn)
    assert (report.target_source, report.target_modules) == ("patched layers", None)
    assert "patched layers" in str(report).splitlines()[1]
    # exclude_modules still applies; explicit target_modules win over the patched layers
    report = prune_model(model, 0.5, mode="unit", exclude_modules="c_proj")
    assert [layer.name for layer in report.layers] == [f"transformer.h.{i}.mlp.c_fc" for i in range(2)]
    assert report.exclude_modules == ["c_proj"]
    report = prune_model(model, 0.5, mode="unit", target_modules="c_attn")
    assert report.target_source == "argument" and report.target_modules == ["c_attn"]
    assert (_rows(model.transformer.h[0].attn.c_attn).abs().sum(1) == 0).sum() == 48
    with pytest.raises(ValueError, match="excludes every one of the 4 patched layers"):
        prune_model(model, 0.5, exclude_modules=r".*mlp.*")
    # pruned() follows the same default
    with pruned(model, 0.5) as report:
        assert [layer.name for layer in report.layers] == names


def test_a_finalised_model_prunes_by_its_learned_scores_where_it_has_them():
    from hf_tdrop import L0Config, finalize_model

    model = patch_model(tiny_bert(), config=L0Config(dataset_size=10, target_modules="intermediate.dense"))
    finalize_model(model)
    report = prune_model(model, 0.5, method="gates")
    assert [layer.name for layer in report.layers] == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    assert report.target_source == "layers with learned scores"
    assert prune_model(model, 0.5).target_source == "default selection"  # magnitude: every default layer


# ------------------------------------------------------------------------------------------- pruned()


def test_pruned_restores_bit_exact_weights_and_parameter_objects():
    model = tiny_gpt2()
    with torch.no_grad():                 # -0.0 entries are among the smallest: restored as -0.0
        model.transformer.h[0].mlp.c_fc.weight[0, :5] = -0.0
        model.transformer.h[0].mlp.c_fc.bias[:3] = -0.0
    before = _snapshot(model)
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    for mode in ("weight", "unit"):
        with pruned(model, 0.6, mode=mode) as report:
            assert isinstance(report, PruneReport) and report.mode == mode
            fc = model.transformer.h[0].mlp.c_fc
            if mode == "weight":
                assert torch.equal((fc.weight == 0).sum(dim=0), torch.full((128,), 19))
            else:
                assert (fc.weight == 0).all(dim=0).sum() == 76
        _assert_bit_equal(model, before)
    assert {n: (p, p.data_ptr()) for n, p in model.named_parameters()} == params


def test_pruned_restores_after_an_exception_in_the_body():
    model = tiny_bert()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with pruned(model, 0.5, mode="unit"):
            assert sparsity_report(model).total_excluding_heads["unit_sparsity"] == pytest.approx(0.5)
            raise RuntimeError("boom")
    _assert_bit_equal(model, before)


def test_pruned_saves_only_the_pruned_entries():
    """The undo log holds exactly the pruned values (weights and, in unit mode, biases), no model copy."""
    from hf_tdrop.pruning import _prune

    for mode in ("weight", "unit"):
        model = tiny_bert()
        report, saved = _prune(model, 0.5, mode, "magnitude", None, None, None, save=True)
        assert sum(values.numel() for _, _, values in saved) == report.pruned_weights + sum(
            layer.pruned_biases for layer in report.layers)
        params = {id(p) for p in model.parameters()}
        assert all(id(param) in params and values.numel() == int(mask.sum()) for param, mask, values in saved)


def test_low_precision_weights_prune_exact_counts():
    layer = nn.Linear(64, 8).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-3, 4, (8, 64)).to(torch.bfloat16) * 0.5)   # many exact ties
    with pruned(nn.Sequential(layer), 0.5):
        counts = (layer.weight == 0).sum(dim=1)
        assert (counts >= 32).all()                        # pre-existing zeros may add to the 32 pruned
    model = nn.Sequential(layer)
    before = layer.weight.detach().clone()
    prune_model(model, 0.5)
    nonzero_before = before != 0
    assert ((layer.weight == 0) & nonzero_before).sum() == (32 - (~nonzero_before).sum(dim=1)).clamp(min=0).sum()


# ---------------------------------------------------------------------------------------- bad input


BAD_ARGS = [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": float("nan")}, "sparsity"),
    ({"sparsity": True}, "sparsity"), ({"sparsity": "0.5"}, "sparsity"), ({"sparsity": None}, "sparsity"),
    ({"mode": "row"}, "mode"), ({"method": "l1"}, "method"), ({"target_modules": "nothing_like_this"}, "target_modules"),
    ({"target_modules": 3}, "target_modules"), ({"target_modules": []}, "target_modules"),
    ({"exclude_modules": 5}, "exclude_modules"), ({"exclude_modules": ".*"}, "exclude_modules"),
    ({"generator": 3}, "generator"),
    ({"n": 2}, "`n`/`m` set the N:M pattern of mode='nm'"), ({"mode": "nm", "m": 3, "n": 3}, "`n`"),
    ({"mode": "nm", "sparsity": 1.01}, "sparsity"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_them_and_change_nothing(kwargs, name):
    model = tiny_bert()
    before = _snapshot(model)
    args = {"sparsity": 0.5, **kwargs}
    sparsity = args.pop("sparsity")
    with pytest.raises(ValueError, match=name):
        prune_model(model, sparsity, **args)
    _assert_bit_equal(model, before)
    entered = []
    with pytest.raises(ValueError, match=name):
        with pruned(model, sparsity, **args):
            entered.append(True)
    assert not entered
    _assert_bit_equal(model, before)


def test_sparsity_error_states_the_range():
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        prune_model(tiny_bert(), 1.0)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        prune_model("bert", 0.5)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_meta_device_is_a_clear_error_before_anything_is_pruned(method):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with torch.device("meta"):
        model.append(nn.Linear(8, 4))
    before = model[0].weight.detach().clone()
    for call in (lambda: prune_model(model, 0.5, method=method, target_modules=["0", "2"]),
                 lambda: pruned(model, 0.5, method=method, mode="unit", target_modules=["0", "2"]).__enter__()):
        with pytest.raises(ValueError, match=r"(?s)layer '2' \(Linear\).*meta device.*to_empty"):
            call()
        assert torch.equal(model[0].weight, before)  # the materialised layer was not pruned either
    with pytest.raises(ValueError, match=r"(?s)sparsity_report: layer '2' \(Linear\).*meta device"):
        sparsity_report(model)


# ------------------------------------------------------------------------------------ sparsity_report


def test_sparsity_report_counts_zero_weights_units_and_flags_heads():
    model = tiny_bert()
    report = sparsity_report(model)
    names = [layer.name for layer in report.layers]
    assert "classifier" in names and report.weight_sparsity == 0.0 and report.unit_sparsity == 0.0
    assert {layer.name for layer in report.layers if layer.is_head} == {"classifier"}
    prune_model(model, 0.5, mode="unit")
    report = sparsity_report(model)
    for layer in report.layers:
        if layer.is_head:
            assert (layer.zero_weights, layer.zero_units) == (0, 0)
        else:
            assert layer.zero_units == layer.n_units // 2
            assert layer.zero_weights == (layer.n_units // 2) * (layer.n_weights // layer.n_units)
    total = report.total_excluding_heads
    assert total["unit_sparsity"] == pytest.approx(0.5) and total["weight_sparsity"] == pytest.approx(0.5)
    assert report.total["n_weights"] == sum(layer.n_weights for layer in report.layers)
    d = report.to_dict()
    assert d["total"]["zero_units"] == report.total["zero_units"] and len(d["layers"]) == len(names)
    md = report.to_markdown()
    assert md.count("\n") == len(names) + 4 and "`classifier`" in md and "| yes" in md
    assert str(report) == md


def test_sparsity_report_unit_needs_zero_bias_too():
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight[0] = 0.0
        layer.weight[1] = 0.0
        layer.bias[0] = 0.0
        layer.bias[1] = 0.5                  # unit 1: zero w_o but live bias -> not an all-zero unit
        layer.weight[2, 0] = 0.0
    report = sparsity_report(nn.Sequential(layer))
    (info,) = report.layers
    assert (info.zero_weights, info.n_weights, info.zero_units, info.n_units) == (7, 12, 1, 4)
    nobias = nn.Conv1d(2, 3, 2, bias=False)
    with torch.no_grad():
        nobias.weight[1] = 0.0
    (info,) = sparsity_report(nn.Sequential(nobias)).layers
    assert (info.zero_weights, info.zero_units) == (4, 1)


def test_sparsity_report_selection_and_bad_patterns():
    model = tiny_gpt2()
    report = sparsity_report(model, target_modules="c_attn")
    assert [layer.name for layer in report.layers] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert "lm_head" not in [layer.name for layer in sparsity_report(model, exclude_modules="lm_head").layers]
    for kwargs, name in [({"target_modules": "nope"}, "target_modules"), ({"exclude_modules": 1}, "exclude_modules"),
                         ({"exclude_modules": ".*"}, "exclude_modules")]:
        with pytest.raises(ValueError, match=name):
            sparsity_report(model, **kwargs)


def test_prune_report_str_and_dict():
    model = tiny_bert()
    report = prune_model(model, 0.5, mode="unit")
    d = report.to_dict()
    assert d["mode"] == "unit" and d["sparsity"] == 0.5 and d["method"] == "magnitude"
    assert d["total"]["pruned_units"] == sum(layer["pruned_units"] for layer in d["layers"])
    assert d["total"]["n_layers"] == len(select_layers(model))
    text = str(report)
    assert text.splitlines()[0].startswith("PruneReport(sparsity=0.5, mode='unit'")
    assert text.splitlines()[1] == f"targets: {len(report.layers)} layers, default selection"
    assert len(text.splitlines()) == 4 + len(report.layers) + 1
    assert (d["target_source"], d["target_modules"], d["exclude_modules"]) == ("default selection", None, None)
    assert f"{report.pruned_units}/{report.n_units}" in text.splitlines()[-1]
