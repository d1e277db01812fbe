#!/usr/bin/env python
"""Paper Table 1 and Figure 1: the Hessian view of why targeted dropout makes pruning cheap.

Gomez et al. (2019), section 3: a network with a single dense hidden layer of ten ReLU units is
trained without regularisation and with targeted dropout (γ=0.75, α=0.5). For each run this script

1. computes the exact Hessian ``H`` of the training loss with respect to the hidden layer's weights
   θ (``torch.func.hessian``; 640 weights for 8x8 digits) and the gradient ``g``;
2. orders the weights by magnitude and forms ``θᵀ ⊙ H ⊙ θ`` (entry ``(i, j)`` = ``θ_i H_ij θ_j``),
   the matrix whose block over the pruned set gives the loss change of pruning (Figure 1);
3. prunes the lowest 75 % (the library's weight criterion: the smallest-|w| 75 % of every unit's
   incoming weights, :func:`hf_tdrop.pruned`) and reports the second-order estimate
   ``|ΔE| ≈ |½ Δθᵀ H Δθ|`` with ``Δθ = -θ`` on the pruned set (the paper's estimate, which assumes
   ``g ≈ 0`` at convergence), the first-order term ``gᵀΔθ``, the measured change of the training
   loss, and the unpruned and pruned test accuracy (Table 1).

Outputs in ``--output_dir``: ``table1.md``, ``table1.json``, ``figure1.png`` (two heatmaps) and
``hessians.pt`` (θ, g, H per run). Runs offline on scikit-learn's digits by default; ``--dataset
cifar10`` (hub) or ``--train_file/--test_file`` use CIFAR-10 converted to gray and resized to
``--image_size`` (default 8) so the Hessian stays small.

Example::

    python examples/hessian_analysis.py                       # digits, ~1 minute on CPU
    python examples/hessian_analysis.py --dataset cifar10 --image_size 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from torch.func import functional_call, grad, hessian
from tqdm.auto import tqdm

from hf_tdrop import patch_model, pruned, unpatch_model
from hf_tdrop.models import MLPConfig, MLPForImageClassification

from image_data import prepare_data, tensors_of  # the data code shared with image_classification.py

logger = logging.getLogger("hessian_analysis")

LAYER = "layers.0"
"""The analysed (and targeted, and pruned) layer: the single hidden layer of the toy MLP."""


# --------------------------------------------------------------------------------------------------
# Hessian algebra (reusable, tested against finite differences)
# --------------------------------------------------------------------------------------------------


def loss_fn_of(model: torch.nn.Module, param_name: str, pixels: torch.Tensor, labels: torch.Tensor):
    """``f(theta_flat) -> mean cross-entropy`` of ``model`` on ``(pixels, labels)`` with parameter
    ``param_name`` replaced by ``theta_flat.view(shape)`` (every other parameter and buffer fixed).
    The model is evaluated in eval mode (no dropout of any kind)."""
    params = dict(model.named_parameters())
    if param_name not in params:
        raise ValueError(f"`param_name` must be one of {sorted(params)}, got {param_name!r}.")
    shape = params[param_name].shape
    fixed = {k: v.detach() for k, v in params.items() if k != param_name}
    fixed.update({k: v for k, v in model.named_buffers()})
    model.eval()

    def f(theta_flat: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, param_name: theta_flat.view(shape)}, (pixels,))
        logits = out.logits if hasattr(out, "logits") else out
        return torch.nn.functional.cross_entropy(logits, labels)

    return f


def loss_gradient_hessian(model, param_name: str, pixels: torch.Tensor, labels: torch.Tensor):
    """Exact ``(theta [P], loss, g [P], H [P, P])`` of the mean cross-entropy w.r.t. one parameter
    (flattened in row-major order), in float64. ``P`` must be small (``H`` has ``P²`` entries)."""
    model = model.double()
    f = loss_fn_of(model, param_name, pixels.double(), labels)
    theta = dict(model.named_parameters())[param_name].detach().reshape(-1).clone()
    with torch.no_grad():
        loss = f(theta)
    g = grad(f)(theta)
    h = hessian(f)(theta)
    model.float()
    return theta, loss.item(), g, 0.5 * (h + h.T)  # symmetrise round-off


def saliency_matrix(theta: torch.Tensor, h: torch.Tensor, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``θᵀ ⊙ H ⊙ θ``: entry ``(i, j)`` = ``θ_i · H_ij · θ_j``, rows/columns permuted by ``order``
    (default: ascending ``|θ|``, the paper's Figure 1 ordering). ``theta`` [P], ``h`` [P, P]."""
    if h.shape != (theta.numel(), theta.numel()):
        raise ValueError(f"`h` must be [{theta.numel()}, {theta.numel()}], got {list(h.shape)}.")
    if order is None:
        order = torch.argsort(theta.abs(), stable=True)
    m = theta[:, None] * h * theta[None, :]
    return m[order][:, order]


def pruning_delta(theta: torch.Tensor, g: torch.Tensor, h: torch.Tensor, pruned_mask: torch.Tensor) -> dict:
    """Taylor terms of the loss change when the entries in ``pruned_mask`` [P] are set to zero
    (``Δθ = -θ`` there, 0 elsewhere): ``first_order = gᵀΔθ``, ``second_order = ½ ΔθᵀHΔθ`` and their
    sum. The paper's estimate is ``|second_order|`` (gradient ≈ 0 at convergence)."""
    delta = torch.where(pruned_mask, -theta, torch.zeros_like(theta))
    first = float(g @ delta)
    second = float(0.5 * delta @ h @ delta)
    return {"first_order": first, "second_order": second, "taylor": first + second}


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def train(model, pixels, labels, args, generator_seed: int) -> None:
    """Mini-batch Adam on the training tensors (targeted dropout acts if the model is patched)."""
    torch.manual_seed(generator_seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    model.train()
    n = len(labels)
    for _ in tqdm(range(args.epochs), desc="train", unit="epoch", disable=args.disable_tqdm, leave=False):
        perm = torch.randperm(n)
        for start in range(0, n, args.batch_size):
            idx = perm[start:start + args.batch_size]
            loss = model(pixel_values=pixels[idx], labels=labels[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.inference_mode()
def accuracy(model, pixels, labels) -> float:
    model.eval()
    return float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())


def analyse_run(name: str, td: Optional[dict], data, train_xy, test_xy, args) -> tuple[dict, dict]:
    torch.manual_seed(args.seed)
    h_, w_ = data.image_size
    model = MLPForImageClassification(MLPConfig(input_size=data.num_channels * h_ * w_,
                                                hidden_sizes=[args.hidden_units], num_labels=data.num_labels))
    if td:
        patch_model(model, alpha=td["alpha"], gamma=td["gamma"], mode=td["mode"], target_modules=[LAYER])
    train(model, *train_xy, args, args.seed)
    if td:
        unpatch_model(model)
    param = f"{LAYER}.weight"
    theta, loss, g, h = loss_gradient_hessian(model, param, *train_xy)
    unpruned_acc = accuracy(model, *test_xy)
    weight = dict(model.named_parameters())[param]
    before = weight.detach().clone()
    with pruned(model, args.prune_fraction, mode="weight", target_modules=[LAYER]) as report:
        mask = (before.reshape(-1) != 0) & (weight.detach().reshape(-1) == 0)
        pruned_acc = accuracy(model, *test_xy)
        with torch.no_grad():
            pruned_loss = float(torch.nn.functional.cross_entropy(model(pixel_values=train_xy[0]).logits, train_xy[1]))
    terms = pruning_delta(theta, g, h, mask)
    row = {
        "run": name,
        "targeted_dropout": td,
        "abs_delta_E_estimate": abs(terms["second_order"]),
        "second_order_term": terms["second_order"],
        "first_order_term": terms["first_order"],
        "measured_delta_E": pruned_loss - loss,
        "train_loss": loss,
        "grad_norm": float(g.norm()),
        "unpruned_accuracy": unpruned_acc,
        "pruned_accuracy": pruned_acc,
        "pruned_weights": int(mask.sum()),
        "layer_weights": int(theta.numel()),
        "pruned_fraction": report.pruned_fraction,
    }
    logger.info("%s: %s", name, json.dumps({k: v for k, v in row.items() if k != "targeted_dropout"}))
    return row, {"theta": theta, "grad": g, "hessian": h, "saliency": saliency_matrix(theta, h)}


def table_markdown(rows: list[dict], args) -> str:
    head = (f"Toy network: one dense hidden layer of {args.hidden_units} ReLU units on {args.dataset_label}; "
            f"pruning the lowest {args.prune_fraction:.0%} of weights (per unit) of the hidden layer. "
            "|ΔE| = |½ Δθᵀ H Δθ| (the paper's second-order estimate); 'measured ΔE' is the actual change "
            "of the training loss.\n\n")
    lines = ["| Network | \\|ΔE\\| (2nd-order estimate) | gᵀΔθ | measured ΔE | unpruned accuracy | pruned accuracy |",
             "| :-- | --: | --: | --: | --: | --: |"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['abs_delta_E_estimate']:.4g} | {r['first_order_term']:.3g} | "
                     f"{r['measured_delta_E']:.4g} | {100 * r['unpruned_accuracy']:.2f} % | {100 * r['pruned_accuracy']:.2f} % |")
    return head + "\n".join(lines) + "\n"


def plot_figure1(mats: list[tuple[str, torch.Tensor]], path: Path, prune_fraction: float) -> Path:
    """Two-panel heatmap of ``θᵀ ⊙ H ⊙ θ`` (weights by ascending magnitude), each panel with its own
    symmetric colour scale clipped at the 99.5th percentile of its |entries| (the runs' curvatures
    differ by orders of magnitude); the pruned block is outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(5.8 * len(mats), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(mats))
    axes = np.atleast_1d(axes)
    for ax, (title, m) in zip(axes, mats):
        vmax = float(torch.quantile(m.abs().flatten().float(), 0.995)) or 1.0
        im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        k = int(round(prune_fraction * m.shape[0]))
        ax.add_patch(Rectangle((-0.5, -0.5), k, k, fill=False, edgecolor="k", linewidth=1.0, linestyle="--"))
        ax.set_title(title)
        ax.set_xlabel("weights, ascending |θ|")
        ax.set_ylabel("weights, ascending |θ|")
        fig.colorbar(im, ax=ax, shrink=0.8, label="θᵢ Hᵢⱼ θⱼ")
    fig.suptitle(f"θᵀ ⊙ H ⊙ θ of the hidden layer (dashed: lowest {prune_fraction:.0%} by magnitude)")
    fig.savefig(path, dpi=110)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Paper Table 1 / Figure 1: Hessian-based pruning analysis of a toy MLP.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=["digits", "cifar10"], default="digits",
                   help="digits: scikit-learn's 8x8 digits (offline); cifar10: the hub's uoft-cs/cifar10 (or "
                        "--train_file/--test_file), converted to gray and resized to --image_size.")
    p.add_argument("--dataset_name", default="uoft-cs/cifar10", help="Hub id for --dataset cifar10.")
    p.add_argument("--train_file", default=None, help="Local CIFAR-10-schema file (parquet/arrow/json) for training.")
    p.add_argument("--test_file", default=None, help="Local file for the test split.")
    p.add_argument("--image_size", type=int, default=8, help="Square size for --dataset cifar10 (Hessian has (size²·10)² entries).")
    p.add_argument("--max_train_samples", type=int, default=None, help="Keep only the first N training rows.")
    p.add_argument("--hidden_units", type=int, default=10, help="ReLU units of the hidden layer (paper: 10).")
    p.add_argument("--alpha", type=float, default=0.5, help="α of the targeted-dropout run (paper: 0.5).")
    p.add_argument("--gamma", type=float, default=0.75, help="γ of the targeted-dropout run (paper: 0.75).")
    p.add_argument("--tdrop_mode", choices=["weight", "unit"], default="weight", help="Targeting of the TD run.")
    p.add_argument("--prune_fraction", type=float, default=0.75, help="Fraction pruned (lowest magnitude, per unit).")
    p.add_argument("--epochs", type=int, default=30, help="Training epochs (Adam). Much longer training drives the unregularised training loss to ~0, where the Hessian vanishes and the quadratic estimate stops describing pruning (see docs/reproductions/hessian.md).")
    p.add_argument("--batch_size", type=int, default=64, help="Mini-batch size.")
    p.add_argument("--learning_rate", type=float, default=1e-2, help="Adam learning rate.")
    p.add_argument("--seed", type=int, default=0, help="Seed (same for both runs: same init and data order).")
    p.add_argument("--output_dir", default="outputs/hessian_analysis", help="Where table1.* and figure1.png go.")
    p.add_argument("--overwrite_output_dir", action="store_true", help="Allow a non-empty --output_dir.")
    p.add_argument("--disable_tqdm", action="store_true", help="Hide progress bars.")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)
    if (args.train_file is None) != (args.test_file is None):
        raise SystemExit("--train_file and --test_file must be given together.")
    if not 0.0 < args.prune_fraction < 1.0:
        raise SystemExit("--prune_fraction must be in (0, 1).")
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise SystemExit(f"--output_dir {out} is not empty; pass --overwrite_output_dir or choose another directory.")
    out.mkdir(parents=True, exist_ok=True)
    cifar = args.dataset == "cifar10"
    data_args = SimpleNamespace(
        dataset="cifar10" if cifar else "digits", dataset_name=args.dataset_name, train_file=args.train_file,
        test_file=args.test_file, data_dir=None, image_column=None, label_column="label",
        image_size=args.image_size if cifar else None, grayscale=cifar, augmentation="none",
        validation_fraction=0.0, max_train_samples=args.max_train_samples, max_eval_samples=None, seed=args.seed)
    args.dataset_label = (f"CIFAR-10 (gray, {args.image_size}x{args.image_size})" if cifar
                          else "scikit-learn digits (8x8)")
    data = prepare_data(data_args)
    train_xy, test_xy = tensors_of(data.train), tensors_of(data.test)
    runs = [("no regularisation", None),
            (f"targeted dropout ({args.tdrop_mode}, γ={args.gamma:g}, α={args.alpha:g})",
             {"mode": args.tdrop_mode, "alpha": args.alpha, "gamma": args.gamma})]
    rows, tensors = [], {}
    for name, td in runs:
        row, t = analyse_run(name, td, data, train_xy, test_xy, args)
        rows.append(row)
        tensors[name] = t
    text = table_markdown(rows, args)
    (out / "table1.md").write_text(text, encoding="utf-8")
    (out / "table1.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()}, "rows": rows},
                                                indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_figure1([(name, tensors[name]["saliency"]) for name, _ in runs], out / "figure1.png", args.prune_fraction)
    torch.save({name: {k: v for k, v in t.items() if k != "saliency"} for name, t in tensors.items()}, out / "hessians.pt")
    print(text)
    logger.info("Table 1 and Figure 1 written to %s", out)
    return {"rows": rows, "tensors": tensors}


if __name__ == "__main__":
    main()
