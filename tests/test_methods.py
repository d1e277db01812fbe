"""The training methods beside targeted dropout (hf_tdrop.methods): each mechanism against its
definition (L0 expected cost and hard-concrete samples, the variational KL approximation and local
reparameterisation, Smallify's permanent masking, the fixed random-target set, the L1 gradient), the
registry and configs, finalisation, and the learned pruning criteria."""

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_tdrop import (
    DropoutConfig,
    L0Config,
    L1Config,
    MethodConfig,
    RandomTargetConfig,
    SmallifyConfig,
    TargetedDropoutConfig,
    VariationalDropoutConfig,
    available_methods,
    config_from_dict,
    finalize_model,
    get_targeting,
    is_patched,
    method_config,
    method_parameters,
    patch_model,
    prune_model,
    prune_sweep,
    regularization_loss,
    set_targeting,
    targeted_layers,
    unpatch_model,
)
from hf_tdrop.methods import l0 as l0_mod
from hf_tdrop.methods import random_target, variational
from hf_tdrop.methods.base import learned_scores

N = 1000
CONFIGS = {
    "dropout_weight": DropoutConfig(rate=0.5),
    "dropout_unit": DropoutConfig(rate=0.25, mode="unit"),
    "random_target": RandomTargetConfig(alpha=0.5, gamma=0.5),
    "random_target_unit": RandomTargetConfig(alpha=0.5, gamma=0.5, mode="unit"),
    "l1": L1Config(l1=0.1),
    "l0_weight": L0Config(dataset_size=N),
    "l0_unit": L0Config(dataset_size=N, mode="unit"),
    "variational": VariationalDropoutConfig(dataset_size=N),
    "smallify": SmallifyConfig(l1=1e-3),
}


def mlp():
    """Two hidden layers ("0", "2") and an output head ("classifier", excluded by default)."""
    layers = [nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3)]
    return nn.Sequential(OrderedDict(zip(["0", "1", "2", "3", "classifier"], layers)))


def convnet():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten())


# ------------------------------------------------------------------------------ registry and configs
def test_registry_lists_every_method():
    assert available_methods() == ["targeted_dropout", "dropout", "l0", "l1", "random_target", "smallify",
                                   "variational_dropout"]
    assert isinstance(method_config("l0", dataset_size=5, mode="unit"), L0Config)
    assert isinstance(method_config("targeted_dropout", alpha=0.5, gamma=0.5), TargetedDropoutConfig)
    with pytest.raises(ValueError, match=r"`method` must be one of \['targeted_dropout'"):
        method_config("nope")


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_config_round_trips_through_dict_and_json(key):
    config = CONFIGS[key]
    data = config.to_dict()
    assert data["method"] == type(config).method
    assert config_from_dict(data) == config == MethodConfig.from_dict(data) == type(config).from_dict(data)
    import json

    assert config_from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_config_round_trips_through_save_pretrained(key, tmp_path):
    config = CONFIGS[key]
    config.save_pretrained(tmp_path)
    assert type(config).from_pretrained(tmp_path) == config == MethodConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not hold a valid TargetedDropoutConfig"):
        TargetedDropoutConfig.from_pretrained(tmp_path)


def test_config_from_dict_without_method_is_targeted_dropout():
    td = TargetedDropoutConfig(alpha=0.5, gamma=0.25)
    assert config_from_dict(td.to_dict()) == td


@pytest.mark.parametrize("cls, kwargs, message", [
    (L0Config, {}, r"`dataset_size` must be an integer >= 1, got 0"),
    (L0Config, dict(dataset_size=10, mode="nm"), r"`mode` must be one of \['weight', 'unit'\]"),
    (L0Config, dict(dataset_size=10, beta=0.0), r"`beta` must be in \(0, inf\]"),
    (L0Config, dict(dataset_size=10, zeta=1.0), r"`zeta` must be in \(1, inf\]"),
    (L0Config, dict(dataset_size=10, gamma=0.1), r"`gamma` must be in \[-inf, 0\)"),
    (VariationalDropoutConfig, dict(dataset_size=10, kl_warmup_steps=-1), r"`kl_warmup_steps` must be an integer >= 0"),
    (DropoutConfig, dict(rate=1.0), r"`rate` must be in \[0, 1\)"),
    (RandomTargetConfig, dict(gamma=1.5), r"`gamma` must be in \[0, 1\]"),
    (L1Config, dict(l1=True), r"`l1` must be a number"),
    (SmallifyConfig, dict(momentum=1.0), r"`momentum` must be in \[0, 1\)"),
    (L1Config, dict(target_modules=[]), r"`target_modules` must contain non-empty strings"),
])
def test_config_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_from_dict_rejects_unknown_fields_and_other_methods():
    with pytest.raises(ValueError, match=r"Unknown L1Config fields \['rate'\]"):
        L1Config.from_dict({"l1": 0.1, "rate": 0.5})
    with pytest.raises(ValueError, match="expected 'l1'"):
        L1Config.from_dict({"method": "l0", "l1": 0.1})


# ------------------------------------------------------------------------------ patching, all methods
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_patch_train_eval_finalize_keeps_eval_outputs(key):
    model = patch_model(mlp(), config=CONFIGS[key])
    assert is_patched(model) and model.tdrop_config is CONFIGS[key]
    layers = targeted_layers(model)
    assert list(layers) == ["0", "2"]  # the output head is excluded by default, as for targeted dropout
    assert layers["0"]["method"] == type(CONFIGS[key]).method and layers["0"]["type"] == "Linear"
    x = torch.randn(5, 12)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(x).pow(2).mean() + regularization_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(x)
    extra = set(model.state_dict()) - set(mlp().state_dict())
    assert finalize_model(model) is model
    assert not is_patched(model) and type(model[0]) is nn.Linear
    assert set(model.state_dict()) == set(mlp().state_dict()), f"left over: {extra}"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, shape", [(convnet, (2, 3, 6, 6)), (None, (2, 5, 7))])
@pytest.mark.parametrize("key", ["l0_weight", "l0_unit", "variational", "smallify", "random_target", "dropout_unit"])
def test_conv_and_transformers_conv1d_layers(make, shape, key):
    """ConvNd (out_in layout, units on dim 1) and transformers' Conv1D ([in, out] weight)."""
    model = make() if make else nn.Sequential(Conv1D(6, 7), nn.ReLU(), Conv1D(4, 6))
    reference = make() if make else nn.Sequential(Conv1D(6, 7), nn.ReLU(), Conv1D(4, 6))
    reference.load_state_dict(model.state_dict())
    patch_model(model, config=type(CONFIGS[key]).from_dict({**CONFIGS[key].to_dict(), "target_modules": ["0", "2"]}))
    x = torch.randn(*shape)
    model.train()
    out = model(x)
    (out.sum() + regularization_loss(model)).backward()
    assert out.shape == reference(x).shape
    model.eval()
    with torch.no_grad():
        before = model(x)
    finalize_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_patch_errors_leave_the_model_alone():
    model = patch_model(mlp(), config=L1Config())
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, config=L0Config(dataset_size=3))
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, alpha=0.5, gamma=0.5)
    with pytest.raises(ValueError, match="`config` must be a TargetedDropoutConfig or the config of a registered method"):
        patch_model(mlp(), config={"method": "l1"})
    with pytest.raises(ValueError, match="not both"):
        patch_model(mlp(), alpha=0.5, config=L1Config())
    with pytest.raises(ValueError, match="No layer matched"):
        patch_model(mlp(), config=L1Config(target_modules="nope"))


def test_set_targeting_drives_the_random_target_control_and_refuses_other_methods():
    model = patch_model(mlp(), config=RandomTargetConfig(alpha=0.2, gamma=0.3))
    set_targeting(model, alpha=0.9, gamma=0.6)
    assert get_targeting(model) == {"alpha": 0.9, "gamma": 0.6, "mode": "weight"}
    assert model.tdrop_config.alpha == 0.2  # the user's config object is not changed
    with pytest.raises(ValueError, match="patched with method 'l1', which has no α/γ"):
        set_targeting(patch_model(mlp(), config=L1Config()), alpha=0.5)


def test_method_parameters_and_unpatch_model_finalises():
    model = patch_model(mlp(), config=L0Config(dataset_size=N))
    assert sorted(method_parameters(model)) == ["0.l0_log_alpha", "2.l0_log_alpha"]
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in method_parameters(model).values()} <= ids
    unpatch_model(model)  # the same finalisation
    assert not hasattr(model[0], "l0_log_alpha") and model[0].tdrop_criterion.name == "gates"


# ------------------------------------------------------------------------------ L1
def test_l1_gradient_is_lambda_sign_over_n():
    model = patch_model(mlp(), config=L1Config(l1=0.3))
    regularization_loss(model).backward()
    for layer in (model[0], model[2]):
        w = layer.weight
        torch.testing.assert_close(w.grad, 0.3 * torch.sign(w.detach()) / w.numel())
    assert model[4].weight.grad is None  # output head not regularised
    expected = 0.3 * (model[0].weight.abs().mean() + model[2].weight.abs().mean())
    torch.testing.assert_close(regularization_loss(model), expected)


def test_regularization_loss_without_terms_is_zero_and_validates():
    assert float(regularization_loss(patch_model(mlp(), config=DropoutConfig()))) == 0.0
    with pytest.raises(ValueError, match="`step` must be an integer >= 0"):
        regularization_loss(mlp(), step=-1)


# ------------------------------------------------------------------------------ L0
@pytest.mark.parametrize("log_alpha", [-4.0, -1.0, 0.0, 2.5, 6.9])
@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_l0_expected_cost_matches_closed_form(log_alpha, mode):
    model = patch_model(mlp(), config=L0Config(dataset_size=N, mode=mode, l0=0.01))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.l0_log_alpha.fill_(log_alpha)
    beta, zeta, gamma = 2 / 3, 1.1, -0.1
    p = 1.0 / (1.0 + math.exp(-(log_alpha - beta * math.log(-gamma / zeta))))
    gates = 16 * 12 + 10 * 16  # one gate per weight, or per unit weighted by its fan-in: the same total
    assert float(regularization_loss(model).detach()) == pytest.approx(0.01 * p * gates / N, rel=1e-5)
    # and P(z != 0) is what the hard-concrete sampler gives
    z = l0_mod.sample_gates(torch.full((200_000,), log_alpha), beta, zeta, gamma)
    assert float((z > 0).float().mean()) == pytest.approx(p, abs=0.006)


def test_hard_concrete_samples_have_mass_at_exactly_0_and_1():
    torch.manual_seed(0)
    z = l0_mod.sample_gates(torch.zeros(100_000), 2 / 3, 1.1, -0.1)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    # closed form at log α = 0: P(z = 0) = P(s < 1/12) = sigmoid(β logit(1/12)), P(z = 1) the same by symmetry
    p_end = 1.0 / (1.0 + math.exp(-(2 / 3) * math.log((1 / 12) / (11 / 12))))
    assert float((z == 0).float().mean()) == pytest.approx(p_end, abs=0.006)
    assert float((z == 1).float().mean()) == pytest.approx(p_end, abs=0.006)
    assert 0.0 < float(((z > 0) & (z < 1)).float().mean()) < 1.0


def test_l0_init_eval_gate_and_training_forward():
    torch.manual_seed(0)
    model = patch_model(mlp(), config=L0Config(dataset_size=N))
    log_alpha = model[0].l0_log_alpha
    assert log_alpha.shape == model[0].weight.shape
    assert float(log_alpha.detach().mean()) == pytest.approx(0.0, abs=0.01)  # init_drop_rate 0.5
    assert log_alpha.dtype == torch.float32
    reference_start = patch_model(mlp(), config=L0Config(dataset_size=N, init_drop_rate=0.001))
    assert float(reference_start[0].l0_log_alpha.detach().mean()) == pytest.approx(math.log(0.999 / 0.001), abs=0.01)
    assert 0.005 < float(log_alpha.detach().std()) < 0.015
    with torch.no_grad():
        log_alpha.copy_(torch.linspace(-6, 6, log_alpha.numel()).view_as(log_alpha))
    expected = (torch.sigmoid(log_alpha) * 1.2 - 0.1).clamp(0, 1)
    x = torch.randn(4, 12)
    model.eval()
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].weight * expected, model[0].bias))
    model.train()
    a, b = model[0](x), model[0](x)
    assert not torch.equal(a, b)  # fresh gates at every training forward
    unit = patch_model(mlp(), config=L0Config(dataset_size=N, mode="unit"))
    assert unit[0].l0_log_alpha.shape == (16,)


# ------------------------------------------------------------------------------ variational dropout
@pytest.mark.parametrize("log_alpha", [-8.0, -3.0, -0.5, 0.0, 1.0, 4.0, 8.0])
def test_vd_kl_matches_published_approximation(log_alpha):
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    sig = 1.0 / (1.0 + math.exp(-(k2 + k3 * log_alpha)))
    neg_kl = k1 * sig - 0.5 * math.log1p(math.exp(-log_alpha)) - k1
    assert float(variational.kl_approximation(torch.tensor(log_alpha, dtype=torch.float64))) == pytest.approx(-neg_kl, rel=1e-12)


def test_vd_loss_log_alpha_clip_and_warmup():
    config = VariationalDropoutConfig(dataset_size=N, kl_scale=0.5, kl_warmup_steps=10)
    model = patch_model(mlp(), config=config)
    layer = model[0]
    assert torch.all(layer.vd_log_sigma2 == -10)
    la = variational.log_alpha(layer.weight, layer.vd_log_sigma2)
    torch.testing.assert_close(la, (layer.vd_log_sigma2 - torch.log(layer.weight ** 2 + 1e-8)).clamp(-8, 8))
    full = sum(variational.kl_approximation(variational.log_alpha(m.weight, m.vd_log_sigma2)).sum()
               for m in (model[0], model[2])) * 0.5 / N
    torch.testing.assert_close(regularization_loss(model, step=4), full * 0.4)
    torch.testing.assert_close(regularization_loss(model, step=25), full)
    assert float(regularization_loss(model, step=0).detach()) == 0.0
    with pytest.raises(ValueError, match="pass `step`"):
        regularization_loss(model)


def test_vd_local_reparameterisation_mean_and_variance():
    torch.manual_seed(0)
    layer = patch_model(nn.Sequential(nn.Linear(6, 3)), config=VariationalDropoutConfig(dataset_size=N, target_modules="0"))[0]
    with torch.no_grad():
        layer.vd_log_sigma2.copy_(torch.log(layer.weight ** 2) + torch.linspace(-2, 1, 18).view(3, 6))
    x = torch.randn(1, 6).expand(40_000, 6)
    layer.train()
    with torch.no_grad():
        out = layer(x)
    alpha = torch.exp(variational.log_alpha(layer.weight, layer.vd_log_sigma2))
    mean = nn.functional.linear(x[:1], layer.weight, layer.bias)[0]
    var = (x[0] ** 2 * alpha * layer.weight ** 2).sum(dim=1)
    torch.testing.assert_close(out.mean(0), mean.detach(), atol=4 * float(var.max().sqrt()) / 200, rtol=0)
    torch.testing.assert_close(out.var(0), var.detach(), rtol=0.05, atol=0)


def test_vd_eval_zeroes_weights_above_threshold():
    model = patch_model(mlp(), config=VariationalDropoutConfig(dataset_size=N))
    layer = model[0]
    with torch.no_grad():
        layer.vd_log_sigma2[:, :6] = 10.0  # log α clipped to 8 >= 3: dropped in eval
    x = torch.randn(3, 12)
    model.eval()
    keep = torch.ones_like(layer.weight)
    keep[:, :6] = 0
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight * keep, layer.bias))


# ------------------------------------------------------------------------------ Smallify
def test_smallify_masks_permanently_once_variance_reaches_threshold():
    model = patch_model(nn.Sequential(nn.Linear(4, 5)), config=SmallifyConfig(target_modules="0", momentum=0.9))
    layer = model[0]
    assert torch.all((layer.smallify_switch >= 0) & (layer.smallify_switch < 1))
    torch.testing.assert_close(layer.smallify_sign_avg, torch.sign(layer.smallify_switch.detach()))
    x = torch.randn(2, 4)
    layer.train()
    opt = torch.optim.SGD([layer.smallify_switch], lr=0.0)  # statistics move once per optimizer step
    flips = 0
    masked_at = None
    for step in range(40):
        opt.step()
        with torch.no_grad():
            if step < 12:  # unit 0 flips its sign at every step, then stays positive
                layer.smallify_switch[0] = (-1) ** (step + 1) * 0.5
            else:
                layer.smallify_switch[0] = 0.5
        var_before = float(layer.smallify_sign_var[0])
        layer(x)
        if var_before >= 0.5 and masked_at is None:
            masked_at = step
        if masked_at is not None:
            assert float(layer.smallify_mask[0]) == 0.0  # never un-masks
        else:
            assert float(layer.smallify_mask[0]) == 1.0
        flips += 1
    assert masked_at is not None and masked_at < 12
    assert float(layer.smallify_sign_var[0]) < 0.5  # the variance decayed again, the unit stays masked
    assert torch.all(layer.smallify_mask[1:] == 1)  # stable switches are never masked
    out = layer(x)
    assert torch.all(out[:, 0] == 0)


def test_smallify_variance_is_the_sign_moving_average_recursion():
    layer = patch_model(nn.Sequential(nn.Linear(4, 2)), config=SmallifyConfig(target_modules="0"))[0]
    with torch.no_grad():
        layer.smallify_switch.copy_(torch.tensor([0.3, -0.2]))
    avg, var = layer.smallify_sign_avg.clone(), layer.smallify_sign_var.clone()
    layer.train()
    layer(torch.randn(1, 4))
    sign = torch.tensor([1.0, -1.0])
    torch.testing.assert_close(layer.smallify_sign_var, 0.9 * var + 0.1 * (sign - avg) ** 2)
    torch.testing.assert_close(layer.smallify_sign_avg, 0.9 * avg + 0.1 * sign)


def test_smallify_loss_and_fold():
    model = patch_model(mlp(), config=SmallifyConfig(l1=0.01))
    expected = 0.01 * (model[0].smallify_switch.abs().sum() + model[2].smallify_switch.abs().sum())
    torch.testing.assert_close(regularization_loss(model), expected)
    switch = model[0].smallify_switch.detach().clone()
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    finalize_model(model)
    torch.testing.assert_close(model[0].weight, weight * switch[:, None])
    torch.testing.assert_close(model[0].bias, bias * switch)


# ------------------------------------------------------------------------------ random-target control
@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_random_target_set_is_fixed_and_magnitude_independent(mode):
    torch.manual_seed(0)
    model = patch_model(mlp(), config=RandomTargetConfig(alpha=1.0, gamma=0.5, mode=mode))
    layer = model[0]
    first = random_target.targeted_set(layer)
    assert int(first.sum()) == (16 * 6 if mode == "weight" else 8)  # floor(γ fan_in) per row / floor(γ n_out)
    if mode == "weight":
        assert torch.all(first.sum(dim=1) == 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(8, 12)
    model.train()
    for _ in range(3):
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # make the targeted weights the largest: magnitude targeting would move
        layer.weight.mul_(0.01)
        big = first if mode == "weight" else first[:, None].expand_as(layer.weight)
        layer.weight[big] = 100.0
    assert torch.equal(random_target.targeted_set(layer), first)
    # the set is not the lowest magnitudes, and α = 1 drops exactly it in training
    if mode == "weight":
        out = model[0](x)
        torch.testing.assert_close(out, nn.functional.linear(x, layer.weight * ~first, layer.bias))
    # a γ ramp grows the same set
    set_targeting(model, gamma=0.75)
    assert torch.all(random_target.targeted_set(layer)[first])


# ------------------------------------------------------------------------------ untargeted dropout
def test_untargeted_dropout_rates():
    torch.manual_seed(0)
    layer = patch_model(nn.Sequential(nn.Linear(200, 300)), config=DropoutConfig(rate=0.25, target_modules="0"))[0]
    layer.train()
    x = torch.eye(200)
    with torch.no_grad():
        layer.bias.zero_()
        out = layer(x)  # row i = column i of the effective weight
    eff = out.t()
    assert float((eff == 0).float().mean()) == pytest.approx(0.25, abs=0.01)
    kept = eff != 0
    torch.testing.assert_close(eff[kept], (layer.weight / 0.75)[kept])
    unit = patch_model(nn.Sequential(nn.Linear(20, 400)), config=DropoutConfig(rate=0.5, mode="unit", target_modules="0"))[0]
    unit.train()
    out = unit(torch.randn(3, 20))
    dropped = (out == 0).all(dim=0)
    assert float(dropped.float().mean()) == pytest.approx(0.5, abs=0.08)
    unit.eval()
    x = torch.randn(3, 20)
    torch.testing.assert_close(unit(x), nn.functional.linear(x, unit.weight, unit.bias))


# ------------------------------------------------------------------------------ learned criteria
@pytest.mark.parametrize("finalize", [False, True])
@pytest.mark.parametrize("key, criterion, mode", [("l0_weight", "gates", "weight"), ("l0_unit", "gates", "unit"),
                                                  ("variational", "log_alpha", "weight")])
def test_learned_criterion_prunes_exactly_the_requested_count(key, criterion, mode, finalize):
    torch.manual_seed(0)
    model = patch_model(mlp(), config=CONFIGS[key])
    with torch.no_grad():
        for layer in (model[0], model[2]):
            scores = layer.l0_log_alpha if "l0" in key else layer.vd_log_sigma2
            scores.copy_(torch.randn_like(scores) * 3)
    live = {name: learned_scores(model[int(name)], criterion) for name in ("0", "2")}
    if finalize:
        model.eval()
        finalize_model(model)
    before = {n: model[int(n)].weight.detach().clone() for n in ("0", "2")}
    report = prune_model(model, 0.3, mode=mode, method=criterion)
    assert report.method == criterion
    for info in report.layers:
        layer = model[int(info.name)]
        n_out, fan_in = layer.weight.shape
        if mode == "weight":
            assert info.pruned_weights == n_out * math.floor(0.3 * fan_in)
            pruned = (layer.weight == 0) & (before[info.name] != 0)
            # exactly the lowest-score entries of every row were zeroed
            order = live[info.name].scores.argsort(dim=1)[:, :math.floor(0.3 * fan_in)]
            expected = torch.zeros_like(pruned).scatter_(1, order, True)
            assert torch.equal(pruned | (expected & (before[info.name] == 0)), expected)
        else:
            k = math.floor(0.3 * n_out)
            assert info.pruned_units == k
            lowest = live[info.name].scores.argsort()[:k]
            assert torch.all(layer.weight[lowest] == 0) and torch.all(layer.bias[lowest] == 0)


def test_learned_criterion_errors_are_one_line_and_name_the_argument():
    with pytest.raises(ValueError, match=r"`method`='gates' needs learned l0 scores .* layer '0' has none") as err:
        prune_model(mlp(), 0.5, method="gates")
    assert "\n" not in str(err.value) and "['magnitude', 'random']" in str(err.value)
    with pytest.raises(ValueError, match=r"`method` must be one of \['magnitude', 'random', 'gates', 'log_alpha'\]"):
        prune_model(mlp(), 0.5, method="switches")
    model = patch_model(mlp(), config=L0Config(dataset_size=N))
    with pytest.raises(ValueError, match="ranks weights .* prune it with mode='weight'"):
        prune_model(model, 0.5, mode="unit", method="gates")
    with pytest.raises(ValueError, match="needs learned variational_dropout scores"):
        prune_model(model, 0.5, method="log_alpha")


def test_prune_sweep_with_a_learned_criterion():
    torch.manual_seed(0)
    model = patch_model(mlp(), config=L0Config(dataset_size=N))
    model.eval()
    x = torch.randn(16, 12)
    with torch.no_grad():
        full = model(x)
    sweep = prune_sweep(model, lambda m: float((m(x) - full).abs().mean()), [0.0, 0.5], method="gates", progress=False)
    assert sweep.method == "gates" and sweep.run_name == "L0 weight λ=0.001"
    assert sweep.metrics["metric"][0] == 0.0 and sweep.metrics["metric"][1] > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), full)  # restored


def test_cli_learned_criterion_on_a_plain_checkpoint_is_a_one_line_usage_error(tmp_path, capsys):
    from conftest import tiny_bert
    from hf_tdrop.cli import main

    tiny_bert().save_pretrained(tmp_path / "ckpt")
    code = main(["prune", str(tmp_path / "ckpt"), "--sparsity", "0.5", "--method", "gates",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--method gates needs the learned l0 scores" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_save_pruned_refuses_a_model_with_extra_tensors_until_finalised(tmp_path):
    from conftest import tiny_bert
    from hf_tdrop import save_pruned

    model = patch_model(tiny_bert(), config=L0Config(dataset_size=N))
    with pytest.raises(ValueError, match=r"call hf_tdrop.finalize_model\(model\) first"):
        save_pruned(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    finalize_model(model)
    save_pruned(model, tmp_path / "b")
    assert (tmp_path / "b" / "config.json").exists()
