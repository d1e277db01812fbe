"""Behaviours an audit found unguarded: finalising keeps every method's eval outputs, shrinking
neither drops a hold nor breaks learned scores, Smallify counts once per optimizer step, the error
messages name what they mean, BatchNorm re-estimation weights batches by size, and the boundary
cases of the methods' thresholds."""

from collections import OrderedDict

import pytest
import torch
from conftest import TINY_MODELS
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_tdrop import (
    L0Config,
    RandomTargetConfig,
    SmallifyConfig,
    VariationalDropoutConfig,
    finalize_model,
    hold_pruned,
    patch_model,
    prune_model,
    recalibrate_batchnorm,
    shrink_model,
)
from hf_tdrop.methods.base import learned_scores


def mlp():
    layers = [nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3)]
    return nn.Sequential(OrderedDict(zip(["0", "1", "2", "3", "classifier"], layers)))


# ------------------------------------------------------------------------- finalising the random target
@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_finalize_keeps_random_target_eval_that_drops_the_targeted_set(mode):
    torch.manual_seed(0)
    model = patch_model(mlp(), config=RandomTargetConfig(alpha=0.5, gamma=0.5, mode=mode, drop_targeted_at_eval=True))
    model.eval()
    x = torch.randn(8, 12)
    with torch.no_grad():
        expected = model(x)
        plain = mlp()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (plain(x) - expected).abs().max() > 1e-3  # the targeted set matters in eval
    finalize_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- shrinking and its state
def test_shrink_refuses_while_a_hold_is_active_and_names_the_way_out():
    model = TINY_MODELS["bert"]()
    report = prune_model(model, 0.5, mode="unit")
    hold = hold_pruned(model, report)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"held at zero by hold_pruned .*hold\.remove\(\)"):
        shrink_model(model, measure_file_size=False)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # nothing changed
    assert hold.nonzero_held() == 0
    hold.remove()
    assert shrink_model(model, measure_file_size=False).params_after < sum(w.numel() for w in weights.values())


@pytest.mark.parametrize("mode", ["weight", "unit"])
def test_learned_scores_follow_the_shrunk_weights(mode):
    torch.manual_seed(0)
    model = TINY_MODELS["bert"]()
    patch_model(model, config=L0Config(dataset_size=100, mode=mode, target_modules=r".*(intermediate|output)\.dense"))
    finalize_model(model)
    prune_model(model, 0.5, mode="unit", target_modules=r".*intermediate\.dense")
    up = model.bert.encoder.layer[0].intermediate.dense
    down = model.bert.encoder.layer[0].output.dense
    keep = up.weight.detach().abs().sum(1) != 0
    up_scores, down_scores = learned_scores(up, "gates").scores.clone(), learned_scores(down, "gates").scores.clone()
    shrink_model(model, measure_file_size=False)
    assert torch.equal(learned_scores(up, "gates").scores, up_scores[keep])
    expected_down = down_scores[:, keep] if mode == "weight" else down_scores
    assert torch.equal(learned_scores(down, "gates").scores, expected_down)
    # pruning by the learned scores works on the shrunk model (was a raw size-mismatch RuntimeError)
    report = prune_model(model, 0.25, mode=mode, method="gates", target_modules=r".*(intermediate|output)\.dense")
    assert report.pruned_fraction > 0


def test_shrink_on_a_model_patched_with_another_method_names_it_and_what_is_lost():
    model = TINY_MODELS["bert"]()
    patch_model(model, config=L0Config(dataset_size=100))
    with pytest.raises(ValueError, match=r"'l0' training method; call hf_tdrop\.finalize_model") as err:
        shrink_model(model, measure_file_size=False)
    assert "nothing is lost" not in str(err.value)
    td = TINY_MODELS["bert"]()
    patch_model(td, alpha=0.5, gamma=0.5, mode="unit")
    with pytest.raises(ValueError, match="targeted dropout; call hf_tdrop.unpatch_model"):
        shrink_model(td, measure_file_size=False)


# ------------------------------------------------------------------ Smallify: once per optimizer step
def smallify_layer():
    layer = patch_model(nn.Sequential(nn.Linear(4, 3)), config=SmallifyConfig(target_modules="0"))[0]
    with torch.no_grad():
        layer.smallify_switch.copy_(torch.tensor([0.5, 0.5, 0.5]))
        layer.smallify_sign_avg.fill_(1.0)
        layer.smallify_sign_var.zero_()
    return layer.train()


def test_smallify_statistics_move_once_per_optimizer_step():
    layer = smallify_layer()
    opt = torch.optim.SGD([layer.smallify_switch], lr=0.0)
    with torch.no_grad():
        layer.smallify_switch[0] = -0.5  # one sign flip
    x = torch.randn(2, 4)
    layer(x)
    layer(x)  # a second micro-batch / a recomputation within the same optimizer step
    torch.testing.assert_close(layer.smallify_sign_var[0], torch.tensor(0.4))  # not 0.684 (counted twice)
    torch.testing.assert_close(layer.smallify_sign_avg[0], torch.tensor(0.8))
    opt.step()
    layer(x)
    torch.testing.assert_close(layer.smallify_sign_var[0], torch.tensor(0.9 * 0.4 + 0.1 * 1.8**2))


def test_smallify_under_activation_checkpointing_recomputes_the_same_mask_and_counts_once():
    torch.manual_seed(0)
    layer = smallify_layer()
    with torch.no_grad():  # the variance reaches the threshold at this step's update: masked from the next
        layer.smallify_sign_var[1] = 0.5
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    x = torch.randn(2, 4, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()  # recomputes the forward
    assert float(layer.smallify_mask[1]) == 0.0
    torch.testing.assert_close(layer.smallify_sign_var[0], torch.tensor(0.0))  # updated once: 0.9 * 0 + 0
    torch.testing.assert_close(layer.smallify_sign_var[1], torch.tensor(0.45))
    opt.step()


# -------------------------------------------------------------------- thresholds at exact equality
def test_variational_dropout_zeroes_a_weight_exactly_at_the_threshold():
    layer = patch_model(nn.Sequential(nn.Linear(2, 1, bias=False)),
                        config=VariationalDropoutConfig(dataset_size=10, target_modules="0"))[0]
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.vd_log_sigma2.copy_(torch.tensor([[3.0, 2.0]]))  # log α = 3 - log(1) = 3 exactly, and 2
    layer.eval()
    assert torch.equal(layer(torch.tensor([[1.0, 10.0]])), torch.tensor([[10.0]]))  # log α >= 3 is dropped


def test_smallify_masks_a_unit_whose_variance_equals_the_threshold():
    layer = smallify_layer()
    with torch.no_grad():
        layer.smallify_sign_var[2] = 0.5
    layer(torch.randn(1, 4))
    assert layer.smallify_mask.tolist() == [1.0, 1.0, 0.0]


def test_random_target_rescale_divides_by_one_minus_gamma_alpha():
    torch.manual_seed(0)
    layer = patch_model(nn.Sequential(nn.Linear(8, 64, bias=False)),
                        config=RandomTargetConfig(alpha=0.5, gamma=0.5, rescale=True, target_modules="0"))[0]
    with torch.no_grad():
        layer.weight.fill_(1.0)
    layer.train()
    out = layer(torch.ones(1, 8))
    # every output is its kept weights (4 to 8 of 8: floor(γ·8) = 4 targeted) times 1 / (1 - γα) = 4/3
    kept = out / (4.0 / 3.0)
    torch.testing.assert_close(kept, kept.round(), atol=1e-4, rtol=0)
    assert kept.min() >= 4 - 1e-4 and kept.max() <= 8 + 1e-4 and kept.max() > 7.5


def test_hold_with_partial_row_masks_holds_only_fully_masked_units_biases():
    layer = nn.Linear(4, 3)
    model = nn.Sequential(layer)
    mask = torch.tensor([[True, True, True, True],    # a dead unit: its bias is held too
                         [True, False, False, False],  # partly masked: its bias trains
                         [False, False, False, False]])
    with torch.no_grad():
        layer.weight[mask] = 0.0
        layer.bias[:2] = 0.0  # zero biases: only the dead unit's may be held
    hold = hold_pruned(model, masks={"0": mask})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert hold.nonzero_held() == 0
    assert float(layer.bias[0]) == 0.0
    assert float(layer.bias[1]) != 0.0  # trained: its unit still has weights
    hold.remove()


# ------------------------------------------------------------------------- BatchNorm re-estimation
def test_batchnorm_recalibration_weights_a_ragged_last_batch_by_its_size():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = torch.randn(10, 3) * 3 + 1
    batches = [data[:8], data[8:]]  # 8 and 2 rows
    recalibrate_batchnorm(net, batches)
    with torch.no_grad():
        features = [net[0](b) for b in batches]
    bn = net[1]
    # the mean over all 10 rows (equal batch weights would give the 2-row batch 5 rows' weight)
    torch.testing.assert_close(bn.running_mean, torch.cat(features).mean(0), atol=1e-5, rtol=0)
    expected_var = (8 * features[0].var(0) + 2 * features[1].var(0)) / 10  # size-weighted per-batch variances
    torch.testing.assert_close(bn.running_var, expected_var, atol=1e-5, rtol=0)
    assert bn.momentum == 0.1  # restored
