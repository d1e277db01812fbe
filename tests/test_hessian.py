"""examples/hessian_analysis.py: exact Hessian (checked by finite differences), θᵀ⊙H⊙θ, the
second-order |ΔE| of pruning, and the Table 1 / Figure 1 outputs."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from hf_tdrop.models import MLPConfig, MLPForImageClassification

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import hessian_analysis as ha  # noqa: E402


def _tiny():
    torch.manual_seed(0)
    model = MLPForImageClassification(MLPConfig(input_size=4, hidden_sizes=[3], num_labels=3))
    x = torch.randn(20, 4)
    y = torch.randint(0, 3, (20,))
    return model, x, y


def test_gradient_and_hessian_match_finite_differences():
    model, x, y = _tiny()
    theta, loss, g, h = ha.loss_gradient_hessian(model, "layers.0.weight", x, y)
    assert theta.shape == (12,) and g.shape == (12,) and h.shape == (12, 12)
    assert theta.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32  # model restored
    torch.testing.assert_close(theta.float(), model.layers[0].weight.detach().reshape(-1))
    f = ha.loss_fn_of(model.double(), "layers.0.weight", x.double(), y)
    assert f(theta).item() == pytest.approx(loss, rel=1e-12)
    eps = 1e-5
    eye = torch.eye(12, dtype=torch.float64)
    g_fd = torch.stack([(f(theta + eps * e) - f(theta - eps * e)) / (2 * eps) for e in eye])
    torch.testing.assert_close(g, g_fd, atol=1e-8, rtol=1e-6)
    grad_f = torch.func.grad(f)
    h_fd = torch.stack([(grad_f(theta + eps * e) - grad_f(theta - eps * e)) / (2 * eps) for e in eye])
    torch.testing.assert_close(h, h_fd, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(h, h.T)
    assert h.abs().max() > 1e-3  # not a trivially zero Hessian
    with pytest.raises(ValueError, match="param_name"):
        ha.loss_fn_of(model, "layers.0.kernel", x, y)


def test_saliency_matrix_orders_by_magnitude():
    theta = torch.tensor([0.5, -0.1, 2.0, 0.3], dtype=torch.float64)
    h = torch.arange(16, dtype=torch.float64).view(4, 4)
    h = h + h.T
    m = ha.saliency_matrix(theta, h)
    order = [1, 3, 0, 2]  # ascending |θ|
    for a, i in enumerate(order):
        for b, j in enumerate(order):
            assert m[a, b].item() == pytest.approx(theta[i].item() * h[i, j].item() * theta[j].item())
    with pytest.raises(ValueError, match="`h` must be"):
        ha.saliency_matrix(theta, h[:3, :3])


def test_pruning_delta_is_exact_for_a_quadratic_loss():
    torch.manual_seed(1)
    a = torch.randn(6, 6, dtype=torch.float64)
    a = a @ a.T
    b = torch.randn(6, dtype=torch.float64)
    theta = torch.randn(6, dtype=torch.float64)

    def f(t):
        return 0.5 * t @ a @ t + b @ t

    mask = torch.tensor([True, False, True, True, False, False])
    terms = ha.pruning_delta(theta, a @ theta + b, a, mask)
    pruned = torch.where(mask, torch.zeros_like(theta), theta)
    assert terms["taylor"] == pytest.approx((f(pruned) - f(theta)).item(), rel=1e-10)
    delta = torch.where(mask, -theta, torch.zeros_like(theta))
    assert terms["second_order"] == pytest.approx(0.5 * (delta @ a @ delta).item(), rel=1e-12)
    assert ha.pruning_delta(theta, b, a, torch.zeros(6, dtype=torch.bool)) == \
        {"first_order": 0.0, "second_order": 0.0, "taylor": 0.0}


def test_script_writes_table1_and_figure1(tmp_path):
    from PIL import Image

    out = tmp_path / "hessian"
    result = ha.main(["--epochs", "2", "--output_dir", str(out), "--disable_tqdm"])
    for name in ("table1.md", "table1.json", "figure1.png", "hessians.pt"):
        assert (out / name).stat().st_size > 0
    table = json.loads((out / "table1.json").read_text())
    rows = table["rows"]
    assert [r["run"] for r in rows] == ["no regularisation", "targeted dropout (weight, γ=0.75, α=0.5)"]
    assert rows[1]["targeted_dropout"] == {"mode": "weight", "alpha": 0.5, "gamma": 0.75}
    saved = torch.load(out / "hessians.pt")
    for row in rows:
        # 10 hidden units x 64 inputs; the lowest 75 % per unit = 48 of 64 weights per unit
        assert (row["layer_weights"], row["pruned_weights"], row["pruned_fraction"]) == (640, 480, 0.75)
        assert 0.0 <= row["pruned_accuracy"] <= 1.0 and 0.0 <= row["unpruned_accuracy"] <= 1.0
        t = saved[row["run"]]
        theta, h = t["theta"], t["hessian"]
        assert h.shape == (640, 640)
        # recompute the pruned set from θ alone (per-unit lowest |θ|) and the paper's estimate from H
        w = theta.view(10, 64)
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask.scatter_(1, torch.argsort(w.abs(), dim=1, stable=True)[:, :48], True)
        delta = torch.where(mask.reshape(-1), -theta, torch.zeros_like(theta))
        assert row["abs_delta_E_estimate"] == pytest.approx(abs(0.5 * (delta @ h @ delta).item()), rel=1e-9)
        sal = result["tensors"][row["run"]]["saliency"]
        assert sal.shape == (640, 640)
        assert sal.diagonal().sum().item() == pytest.approx((theta * h.diagonal() * theta).sum().item(), rel=1e-9)
    md = (out / "table1.md").read_text()
    assert md.count("\n| ") == 4 and "no regularisation" in md and "|ΔE|" in md
    with Image.open(out / "figure1.png") as img:
        assert img.format == "PNG" and img.width > 1.5 * img.height  # two side-by-side panels
    with pytest.raises(SystemExit, match="not empty"):
        ha.main(["--epochs", "1", "--output_dir", str(out)])
