"""Weight-mode selection on CPU: the compiled kernel (hf_tdrop.native) against the torch path.

Times one re-ranking of every targeted weight of a BERT-base-sized layer (four 768 x 768 and the
3072 x 768 / 768 x 3072 FFN weights) or a GPT-2-small-sized block (the same shapes as ``Conv1D``
``[in, out]`` weights, ranked through their transposed ``[out, in]`` view), at γ = 0.75, after every
weight moved by an AdamW-sized step (so each call re-ranks through the previous call's bracket, as in
training). Both paths run interleaved, in alternating order, on their own copies of the weights, and
their masks are checked equal at every round. Prints median ms per ranking of the whole layer and the
ratio kernel / torch. With ``--held_fraction f``, the ``f`` lowest-|w| of every row are held at zero
(as after ``prune_model`` + ``hold_pruned``) and the ranking is the one among the survivors
(``masking.targeted_weights_among_bracketed``; the torch path ranks the same scores with the held
entries at +inf).

Example::

    python benchmarks/selection_kernel.py --threads 1 2 --rounds 25
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_tdrop import masking, native

SHAPES = {
    "bert": [(768, 768)] * 4 + [(3072, 768), (768, 3072)],  # [out, in], nn.Linear
    "gpt2": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],  # [in, out], Conv1D
}
GAMMA = 0.75


def layer_weights(arch: str, seed: int = 0) -> list[torch.Tensor]:
    """The layer's weights as the ``[n_out, fan_in]`` views the library ranks."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=g) * 0.02 for shape in SHAPES[arch]]
    return [w.t() if arch == "gpt2" else w for w in weights]


def rank(path: str, w: torch.Tensor, held, bracket):
    """One ranking of ``w`` (``[n_out, fan_in]``) by ``path``: (mask, bracket for the next call)."""
    if held is None:
        if path == "torch":
            return masking.lowest_k_bracketed(w.abs(), masking.fraction_count(GAMMA, w.shape[1]), bracket)
        return masking.targeted_weights_bracketed(w, GAMMA, bracket)
    if path == "torch":
        k = masking.fraction_count(GAMMA, w.shape[1] - int(held[0].sum()))
        return masking.lowest_k_bracketed(w.abs().masked_fill(held, float("inf")), k, bracket)
    return masking.targeted_weights_among_bracketed(w, GAMMA, held, bracket)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["bert", "gpt2"], choices=sorted(SHAPES),
                        help="Layer shapes to rank.")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()],
                        help="torch.set_num_threads values to measure (the kernel uses the same count).")
    parser.add_argument("--rounds", type=int, default=25, help="Timed rounds per path (after 3 untimed ones).")
    parser.add_argument("--held_fraction", type=float, default=0.0,
                        help="Fraction of every row held at zero (0 = no hold); ranks among the survivors.")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.threads) < 1:
        parser.error("--rounds and --threads must be >= 1.")
    if not 0.0 <= args.held_fraction < 1.0:
        parser.error(f"--held_fraction must be in [0, 1), got {args.held_fraction}.")
    if not native.available():
        parser.error(f"the compiled kernel is unavailable: {native.unavailable_reason()}")
    previous = torch.get_num_threads()
    held_note = f", {args.held_fraction:g} of every row held at zero" if args.held_fraction else ""
    print(f"torch {torch.__version__}, gamma={GAMMA}{held_note}, {args.rounds} rounds per path; "
          "ms per ranking of the whole layer\n")
    print("| layer | threads | torch path, median ms | kernel, median ms | ratio kernel / torch |")
    print("|---|---:|---:|---:|---:|")
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for arch in args.archs:
                weights = {path: layer_weights(arch) for path in ("torch", "kernel")}
                held = [masking.weight_prune_mask(w, args.held_fraction) if args.held_fraction else None
                        for w in weights["torch"]]
                brackets = {path: [None] * len(SHAPES[arch]) for path in weights}
                noise = torch.Generator().manual_seed(1)
                times = {path: [] for path in weights}
                for round_ in range(args.rounds + 3):
                    steps = [torch.randn(w.shape, generator=noise) * 1e-3 for w in weights["torch"]]
                    masks = {}
                    for path in (("torch", "kernel") if round_ % 2 else ("kernel", "torch")):
                        for w, step in zip(weights[path], steps):
                            w.add_(step)
                        start = time.perf_counter()
                        masks[path] = []
                        for i, w in enumerate(weights[path]):
                            mask, brackets[path][i] = rank(path, w, held[i], brackets[path][i])
                            masks[path].append(mask)
                        if round_ >= 3:
                            times[path].append(time.perf_counter() - start)
                    if not all(torch.equal(a, b) for a, b in zip(masks["torch"], masks["kernel"])):
                        raise AssertionError(f"{arch}: the kernel's masks differ from the torch path's")
                t_torch, t_kernel = (statistics.median(times[p]) * 1e3 for p in ("torch", "kernel"))
                print(f"| {arch} | {threads} | {t_torch:.1f} | {t_kernel:.1f} | {t_kernel / t_torch:.2f} |", flush=True)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
