"""patch_model and the patched layers: semantics, gradients, state_dict, HF round trips, errors."""

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import TINY_MODELS, tiny_inputs
from hf_tdrop import (
    TargetedDropoutConfig,
    get_targeting,
    is_patched,
    patch_model,
    set_targeting,
    targeted_layers,
    unpatch_model,
)
from hf_tdrop import masking


def effective_linear_weight(layer: nn.Linear) -> torch.Tensor:
    """The [out, in] weight a Linear used in one forward: feed the identity, remove the bias."""
    eye = torch.eye(layer.in_features)
    out = layer(eye)  # [in, out] = I @ W_eff^T + b_eff
    bias = layer.bias if layer.bias is not None else 0
    return (out - bias).t()


def test_weight_mode_zeroes_only_targeted_entries_at_rate_alpha():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    original = layer.weight.detach().clone()
    patch_model(layer, alpha=0.4, gamma=0.5)
    targeted = masking.targeted_weights(original, 0.5)
    assert targeted.sum(dim=1).tolist() == [20] * 30
    layer.train()
    dropped_total = 0
    draws = 200
    with torch.no_grad():
        for _ in range(draws):
            w_eff = effective_linear_weight(layer)
            dropped = (w_eff == 0) & (original != 0)
            assert not (dropped & ~targeted).any(), "an untargeted weight was dropped"
            kept = ~dropped
            torch.testing.assert_close(w_eff[kept], original[kept], rtol=0, atol=1e-6)
            dropped_total += int(dropped.sum())
    rate = dropped_total / (draws * int(targeted.sum()))
    n = draws * int(targeted.sum())
    assert abs(rate - 0.4) < 6 * math.sqrt(0.4 * 0.6 / n)


def test_unit_mode_drops_whole_low_norm_units_with_bias():
    torch.manual_seed(0)
    layer = nn.Linear(12, 20)
    with torch.no_grad():
        layer.bias.uniform_(0.5, 1.0)  # non-zero biases, so a dropped bias is visible
    original = layer.weight.detach().clone()
    patch_model(layer, alpha=0.5, gamma=0.5, mode="unit")
    targeted_units = masking.targeted_units(original, 0.5)
    assert int(targeted_units.sum()) == 10
    eye = torch.eye(12)
    counts = torch.zeros(20)
    draws = 300
    with torch.no_grad():
        for _ in range(draws):
            out = layer(eye)  # [12, 20]
            dead = (out == 0).all(dim=0)
            assert not (dead & ~targeted_units).any()
            alive = ~dead
            torch.testing.assert_close(out[:, alive], eye @ original[alive].t() + layer.bias[alive])
            counts += dead.float()
    assert (counts[~targeted_units] == 0).all()
    rate = counts[targeted_units].sum().item() / (draws * 10)
    assert abs(rate - 0.5) < 6 * math.sqrt(0.25 / (draws * 10))


def test_conv1d_gpt2_orientation_targets_columns():
    torch.manual_seed(0)
    layer = Conv1D(nf=6, nx=10)  # weight [in=10, out=6]
    original = layer.weight.detach().clone()
    patch_model(layer, alpha=1.0, gamma=0.3)
    layer.train()
    with torch.no_grad():
        w_eff = layer(torch.eye(10)) - layer.bias  # [in, out]
    zeros_per_output = (w_eff == 0).sum(dim=0)
    assert zeros_per_output.tolist() == [3] * 6
    for o in range(6):
        col = original[:, o].abs()
        dropped = w_eff[:, o] == 0
        assert col[dropped].max() <= col[~dropped].min()


@pytest.mark.parametrize("conv_cls,shape", [(nn.Conv1d, (2, 3, 9)), (nn.Conv2d, (2, 3, 7, 7)), (nn.Conv3d, (2, 3, 5, 5, 5))])
def test_conv_weight_mode_gradients_zero_exactly_on_dropped(conv_cls, shape):
    torch.manual_seed(0)
    conv = conv_cls(3, 8, kernel_size=3)
    original = conv.weight.detach().clone()
    patch_model(conv, alpha=0.5, gamma=0.75)
    conv.train()
    x = torch.randn(shape)
    torch.manual_seed(7)
    conv(x).square().sum().backward()
    torch.manual_seed(7)
    expected_drop = masking.sample_drop(masking.targeted_weights(masking.unit_matrix(original, "out_in"), 0.75), 0.5)
    expected_drop = expected_drop.view_as(original)
    grad = conv.weight.grad
    assert (grad[expected_drop] == 0).all()
    assert (grad[~expected_drop] != 0).all()
    fan_in = original[0].numel()
    assert masking.targeted_weights(masking.unit_matrix(original, "out_in"), 0.75).sum(1).tolist() == [math.floor(0.75 * fan_in)] * 8


def test_unit_mode_on_conv2d_drops_output_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, 3, padding=1)
    patch_model(conv, alpha=1.0, gamma=0.4, mode="unit")
    targeted = masking.targeted_units(masking.unit_matrix(conv.weight, "out_in"), 0.4)
    conv.train()
    out = conv(torch.randn(2, 3, 6, 6))
    dead = (out == 0).flatten(2).all(-1).all(0)
    assert torch.equal(dead, targeted)


def test_training_masks_reproducible_with_seed_and_fresh_each_forward():
    layer = nn.Linear(32, 32)
    patch_model(layer, alpha=0.5, gamma=0.5)
    x = torch.randn(4, 32)
    torch.manual_seed(3)
    a, b = layer(x), layer(x)
    torch.manual_seed(3)
    c = layer(x)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_hf_models_train_eval_and_state_dict(name, tmp_path):
    model = TINY_MODELS[name]()
    inputs = tiny_inputs(name)
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: id(p) for n, p in model.named_parameters()}
    patch_model(model, alpha=0.66, gamma=0.75)
    assert len(targeted_layers(model)) > 0
    assert list(model.state_dict()) == list(state_before)
    assert {n: id(p) for n, p in model.named_parameters()} == params_before
    # a training step runs and changes weights
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    opt.zero_grad()
    # eval: exactly what the unpatched model computes with the same weights
    model.eval()
    with torch.no_grad():
        patched_out = model(**inputs).logits
    unpatched = TINY_MODELS[name]()
    unpatched.load_state_dict(model.state_dict())
    unpatched.eval()
    with torch.no_grad():
        assert torch.equal(patched_out, unpatched(**inputs).logits)
    # save_pretrained of the patched model -> stock from_pretrained, same outputs
    model.save_pretrained(tmp_path)
    reloaded = type(unpatched).from_pretrained(tmp_path)
    assert not is_patched(reloaded)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, patched_out)
    assert reference.shape == patched_out.shape


def test_unpatch_restores_original_behaviour_bit_for_bit():
    model = TINY_MODELS["bert"]()
    inputs = tiny_inputs("bert")
    classes = {n: type(m) for n, m in model.named_modules()}
    model.train()
    torch.manual_seed(1)
    before = model(**inputs).logits
    patch_model(model, alpha=0.9, gamma=0.9)
    unpatch_model(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not is_patched(model) and not hasattr(model, "tdrop_config")
    torch.manual_seed(1)
    assert torch.equal(model(**inputs).logits, before)


def test_default_targets_exclude_heads_and_tied_layers():
    gpt2 = TINY_MODELS["gpt2"]()
    patch_model(gpt2, alpha=0.5, gamma=0.5)
    names = set(targeted_layers(gpt2))
    assert "lm_head" not in names and "transformer.h.0.mlp.c_fc" in names
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # still tied, never cloned
    bert = TINY_MODELS["bert"]()
    patch_model(bert, alpha=0.5, gamma=0.5)
    assert "classifier" not in targeted_layers(bert)
    t5 = TINY_MODELS["t5"]()
    patch_model(t5, alpha=0.5, gamma=0.5)
    assert "lm_head" not in targeted_layers(t5)
    resnet = TINY_MODELS["resnet"]()
    patch_model(resnet, alpha=0.5, gamma=0.5)
    assert not any(n.startswith("classifier") for n in targeted_layers(resnet))


def test_explicit_target_of_tied_head_keeps_tie():
    gpt2 = TINY_MODELS["gpt2"]()
    patch_model(gpt2, alpha=0.5, gamma=0.5, target_modules=["lm_head"])
    assert list(targeted_layers(gpt2)) == ["lm_head"]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight


def test_target_and_exclude_patterns_names_suffixes_regexes():
    model = TINY_MODELS["bert"]()
    patch_model(model, alpha=0.5, gamma=0.5, target_modules="query")
    assert list(targeted_layers(model)) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    unpatch_model(model)
    patch_model(model, alpha=0.5, gamma=0.5, target_modules=r".*\.(intermediate|output)\.dense",
                exclude_modules=["attention.output.dense"])
    assert sorted(targeted_layers(model)) == sorted(
        f"bert.encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("intermediate", "output"))
    unpatch_model(model)
    patch_model(model, alpha=0.5, gamma=0.5, target_modules=["bert.encoder.layer.1.attention.self.key"])
    assert list(targeted_layers(model)) == ["bert.encoder.layer.1.attention.self.key"]


def _assert_untouched(model, classes):
    assert not is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=1.5, gamma=0.5), r"`alpha` must be in \[0, 1\]"),
    (dict(alpha=0.5, gamma=-0.1), r"`gamma` must be in \[0, 1\]"),
    (dict(alpha=float("nan"), gamma=0.5), r"`alpha` must be in \[0, 1\]"),
    (dict(alpha="0.5", gamma=0.5), r"`alpha` must be a number in \[0, 1\]"),
    (dict(alpha=True, gamma=0.5), r"`alpha` must be a number"),
    (dict(alpha=0.5, gamma=0.5, mode="channel"), r"`mode` must be one of \['weight', 'unit', 'nm'\]"),
    (dict(alpha=0.5, gamma=0.5, mode="nm", n=4, m=4), r"`n` \(nonzeros kept per group of m=4\) must be an integer in \[1, 3\]"),
    (dict(alpha=0.5, gamma=0.5, mode="nm", n=1, m=1), r"`m` \(the N:M group size\) must be an integer >= 2"),
    (dict(alpha=0.5, gamma=0.5, m=8), r"`n`/`m` set the N:M pattern of mode='nm'"),
    (dict(n=2, config=TargetedDropoutConfig(0.5, 0.5)), r"either `config` or keyword settings, not both \(got config and \['n'\]\)"),
    (dict(alpha=0.5, gamma=0.5, target_modules=5), r"`target_modules` must be None, a string"),
    (dict(alpha=0.5, gamma=0.5, target_modules=[]), r"`target_modules` must contain non-empty strings"),
    (dict(alpha=0.5, gamma=0.5, exclude_modules=[""]), r"`exclude_modules` must contain non-empty strings"),
    (dict(alpha=0.5, gamma=0.5, target_modules="nonexistent"), r"No layer matched.*'bert\.encoder\.layer\.0\.attention\.self\.query'"),
    (dict(alpha=0.5, gamma=0.5, exclude_modules=".*"), r"No layer matched"),
    (dict(alpha=0.5), r"missing: \['gamma'\]"),
    (dict(gamma=0.5), r"missing: \['alpha'\]"),
    (dict(alpha=0.5, gamma=0.5, config=TargetedDropoutConfig(0.5, 0.5)), r"either `config` or keyword"),
    (dict(config={"alpha": 0.5}), r"`config` must be a TargetedDropoutConfig"),
])
def test_bad_arguments_raise_and_leave_model_unpatched(kwargs, match):
    model = TINY_MODELS["bert"]()
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        patch_model(model, **kwargs)
    _assert_untouched(model, classes)


def test_non_module_and_layerless_models_rejected():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        patch_model("bert", alpha=0.5, gamma=0.5)
    with pytest.raises(ValueError, match="no supported layer"):
        patch_model(nn.Sequential(nn.ReLU(), nn.Embedding(3, 4)), alpha=0.5, gamma=0.5)


def test_patching_twice_is_refused_without_double_mask():
    model = TINY_MODELS["gpt2"]()
    patch_model(model, alpha=0.5, gamma=0.5)
    layers = targeted_layers(model)
    with pytest.raises(ValueError, match="already patched.*set_targeting"):
        patch_model(model, alpha=0.9, gamma=0.9)
    assert targeted_layers(model) == layers
    # disjoint second patch with another mode is allowed
    model2 = TINY_MODELS["bert"]()
    patch_model(model2, alpha=0.5, gamma=0.5, target_modules="query")
    patch_model(model2, alpha=0.2, gamma=0.3, mode="unit", target_modules="key")
    with pytest.raises(ValueError, match="disagree"):
        get_targeting(model2)
    per_layer = get_targeting(model2, per_layer=True)
    assert per_layer["bert.encoder.layer.0.attention.self.key"] == {"type": "Linear", "mode": "unit", "alpha": 0.2, "gamma": 0.3}


def test_set_and_get_targeting():
    model = TINY_MODELS["bert"]()
    with pytest.raises(ValueError, match="no patched layer"):
        set_targeting(model, alpha=0.1)
    with pytest.raises(ValueError, match="no patched layer"):
        get_targeting(model)
    with pytest.raises(ValueError, match="no patched layer"):
        unpatch_model(model)
    patch_model(model, alpha=0.5, gamma=0.5, mode="unit")
    set_targeting(model, gamma=0.25)
    assert get_targeting(model) == {"alpha": 0.5, "gamma": 0.25, "mode": "unit"}
    set_targeting(model, alpha=0.0, gamma=1.0)
    assert get_targeting(model) == {"alpha": 0.0, "gamma": 1.0, "mode": "unit"}
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0, 1\]"):
        set_targeting(model, alpha=0.3, gamma=2.0)
    assert get_targeting(model)["alpha"] == 0.0  # nothing changed on error
    with pytest.raises(ValueError, match="needs `alpha` and/or `gamma`"):
        set_targeting(model)


def test_config_object_and_metadata():
    cfg = TargetedDropoutConfig(alpha=0.66, gamma=0.75, mode="unit", target_modules=("query", "value"))
    assert cfg.target_modules == ["query", "value"]
    assert TargetedDropoutConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown TargetedDropoutConfig fields"):
        TargetedDropoutConfig.from_dict({"alpha": 0.1, "gamma": 0.1, "beta": 1})
    with pytest.raises(ValueError, match="`rescale` must be True or False"):
        TargetedDropoutConfig(0.1, 0.1, rescale="yes")
    model = TINY_MODELS["bert"]()
    patch_model(model, config=cfg)
    assert model.tdrop_config is cfg
    assert get_targeting(model) == {"alpha": 0.66, "gamma": 0.75, "mode": "unit"}


def test_config_save_pretrained_round_trip(tmp_path):
    import json

    cfg = TargetedDropoutConfig(alpha=0.66, gamma=0.75, mode="nm", n=1, m=4, target_modules=["query"],
                                refresh_every=3, extra={"schedule": {"kind": "linear", "ramp_steps": 10}})
    path = cfg.save_pretrained(tmp_path / "run")
    assert path == tmp_path / "run" / "tdrop_training_config.json"
    assert json.loads(path.read_text()) == cfg.to_dict()
    assert TargetedDropoutConfig.from_pretrained(tmp_path / "run") == cfg
    assert TargetedDropoutConfig.from_pretrained(str(path)) == cfg


def test_config_from_pretrained_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tdrop_training_config.json").write_text("{not json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"alpha": 1.5, "gamma": 0.5}')
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text('{"gamma": 0.5}')
    for path, error, message in [
        (missing, FileNotFoundError, "No such config file or directory"),
        (empty, FileNotFoundError, "No tdrop_training_config.json or tdrop_config.json in"),
        (bad, ValueError, "is not valid JSON"),
        (listed, ValueError, "does not hold a config"),
        (invalid, ValueError, r"does not hold a valid TargetedDropoutConfig: `alpha` must be in \[0, 1\]"),
        (incomplete, ValueError, "does not hold a valid TargetedDropoutConfig"),
    ]:
        with pytest.raises(error, match=message) as info:
            TargetedDropoutConfig.from_pretrained(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="exists and is not a directory"):
        TargetedDropoutConfig(alpha=0.1, gamma=0.1).save_pretrained(listed)


def test_drop_targeted_at_eval_and_rescale():
    torch.manual_seed(0)
    layer = nn.Linear(10, 4, bias=False)
    original = layer.weight.detach().clone()
    patch_model(layer, config=TargetedDropoutConfig(alpha=0.5, gamma=0.6, drop_targeted_at_eval=True))
    layer.eval()
    with torch.no_grad():
        w_eff = effective_linear_weight(layer)
    assert torch.equal(w_eff == 0, masking.targeted_weights(original, 0.6))
    layer2 = nn.Linear(10, 4, bias=False)
    w2 = layer2.weight.detach().clone()
    patch_model(layer2, config=TargetedDropoutConfig(alpha=1.0, gamma=0.5, rescale=True))
    with torch.no_grad():
        w_eff = effective_linear_weight(layer2)
    kept = ~masking.targeted_weights(w2, 0.5)
    torch.testing.assert_close(w_eff[kept], w2[kept] / 0.5)


def test_pickle_and_deepcopy_of_patched_model():
    model = TINY_MODELS["gpt2"]()
    patch_model(model, alpha=0.5, gamma=0.5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert targeted_layers(clone) == targeted_layers(model)
        assert clone.lm_head.weight is clone.transformer.wte.weight
        clone.eval(), model.eval()
        x = tiny_inputs("gpt2")
        with torch.no_grad():
            assert torch.equal(clone(**x).logits, model(**x).logits)


def test_gradient_checkpointing_recomputes_the_same_mask():
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = TINY_MODELS["bert"]()
        patch_model(model, alpha=0.7, gamma=0.7)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *a: calls.append(1))
        model.train()
        torch.manual_seed(42)
        model(**tiny_inputs("bert")).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # the forward really was recomputed
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_low_precision_weights(dtype):
    model = TINY_MODELS["bert"]()
    patch_model(model, alpha=0.66, gamma=0.75)
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(**tiny_inputs("bert")).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    layer = nn.Linear(64, 16, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape).to(dtype))  # many ties
    targeted = masking.targeted_weights(layer.weight, 0.5)
    assert targeted.sum(dim=1).tolist() == [32] * 16  # exactly k despite ties
    patch_model(layer, alpha=1.0, gamma=0.5)
    with torch.no_grad():
        w_eff = layer(torch.eye(64, dtype=dtype)).t()
    assert torch.equal(w_eff == 0, targeted | (layer.weight == 0))
    assert torch.isfinite(w_eff).all()


def test_patched_layer_unpickles_in_a_fresh_process(tmp_path):
    """The compile-safe mask function is created lazily; unpickling alone must set it up."""
    import subprocess
    import sys

    layer = patch_model(nn.Linear(6, 5), alpha=1.0, gamma=0.5)
    (tmp_path / "layer.pkl").write_bytes(pickle.dumps(layer))
    code = (
        "import pickle, sys, torch\n"
        f"layer = pickle.loads(open({str(tmp_path / 'layer.pkl')!r}, 'rb').read())\n"
        "w = (layer(torch.eye(6)) - layer.bias).t()\n"
        "assert (w == 0).sum(dim=1).tolist() == [3] * 5, w\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _meta_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        return GPT2LMHeadModel(config)


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_meta_device_training_forward_is_a_clear_error(mode):
    model = _meta_gpt2()
    patch_model(model, alpha=0.5, gamma=0.5, mode=mode)  # patching needs no values
    model.train()
    ids = torch.randint(3, 99, (2, 7), device="meta")
    with pytest.raises(ValueError, match=r"(?s)'transformer\.h\.0\.attn\.c_attn'.*meta device.*to_empty") as err:
        model(input_ids=ids)
    assert "from_pretrained" in str(err.value)
    state = model.transformer.h[0].attn.c_attn.tdrop_state
    assert state.threshold_bracket is None and state.cached_targeting is None  # nothing was computed
    model.eval()
    set_targeting(model, alpha=0.5, gamma=0.5)
    model.transformer.h[0].attn.c_attn.tdrop_state.drop_targeted_at_eval = True
    with pytest.raises(ValueError, match="meta device"):
        model(input_ids=ids)
    # the advice works: materialise, load real weights, train
    reference = TINY_MODELS["gpt2"]()
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    model.tie_weights()
    model.train()
    assert torch.isfinite(model(**tiny_inputs("gpt2")).loss)


@pytest.mark.parametrize("make,x_shape,unit_shape", [
    (lambda: nn.Linear(10, 8), (3, 10), (1, 8)),
    (lambda: Conv1D(8, 10), (2, 3, 10), (1, 1, 8)),
    (lambda: nn.Conv2d(3, 8, 3), (2, 3, 6, 6), (1, 8, 1, 1)),
], ids=["linear", "conv1d_gpt2", "conv2d"])
@pytest.mark.parametrize("alpha,gamma", [(1.0, 0.5), (0.5, 0.5), (0.66, 0.75)])
def test_unit_mode_rescale_multiplies_the_output_by_inverse_keep_rate(make, x_shape, unit_shape, alpha, gamma):
    """Unit mode with rescale=True: the training output is the unpatched output with the dropped units
    zeroed, times 1 / (1 - γα) (bias included); without rescale, and in eval, no factor."""
    torch.manual_seed(0)
    plain = make()
    x = torch.randn(*x_shape)
    layout = masking.LAYOUT_IN_OUT if isinstance(plain, Conv1D) else masking.LAYOUT_OUT_IN
    with torch.no_grad():
        reference = plain(x)
    for rescale in (True, False):
        layer = copy.deepcopy(plain)
        patch_model(layer, config=TargetedDropoutConfig(alpha=alpha, gamma=gamma, mode="unit", rescale=rescale))
        layer.train()
        torch.manual_seed(123)
        with torch.no_grad():
            out = layer(x)
        torch.manual_seed(123)  # the same draw, written out by hand
        targeted = masking.targeted_units(masking.unit_matrix(plain.weight.detach(), layout), gamma)
        keep = (~masking.sample_drop(targeted, alpha)).to(reference.dtype).view(unit_shape)
        factor = 1.0 / (1.0 - gamma * alpha) if rescale else 1.0
        torch.testing.assert_close(out, reference * keep * factor, rtol=1e-6, atol=1e-6)
        if alpha == 1.0:
            assert torch.equal(keep.flatten() == 0, targeted)  # α = 1: exactly the targeted units
        layer.eval()
        with torch.no_grad():
            assert torch.equal(layer(x), reference)
