"""Weight-mode selection on CPU: the compiled kernel (hf_tdrop.native) against the torch path.

Times one re-ranking of every targeted weight of a BERT-base-sized layer (four 768 x 768 and the
3072 x 768 / 768 x 3072 FFN weights) or a GPT-2-small-sized block (the same shapes as ``Conv1D``
``[in, out]`` weights, ranked through their transposed ``[out, in]`` view), at γ = 0.75, after every
weight moved by an AdamW-sized step (so each call re-ranks through the previous call's bracket, as in
training). Both paths run interleaved, in alternating order, on their own copies of the weights, and
their masks are checked equal at every round. Prints median ms per ranking of the whole layer and the
ratio kernel / torch.

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["bert", "gpt2"], choices=sorted(SHAPES),
                        help="Layer shapes to rank.")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, torch.get_num_threads()],
                        help="torch.set_num_threads values to measure (the kernel uses the same count).")
    parser.add_argument("--rounds", type=int, default=25, help="Timed rounds per path (after 3 untimed ones).")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.threads) < 1:
        parser.error("--rounds and --threads must be >= 1.")
    if not native.available():
        parser.error(f"the compiled kernel is unavailable: {native.unavailable_reason()}")
    previous = torch.get_num_threads()
    print(f"torch {torch.__version__}, gamma={GAMMA}, {args.rounds} rounds per path; ms per ranking of the whole layer\n")
    print("| layer | threads | torch path, median ms | kernel, median ms | ratio kernel / torch |")
    print("|---|---:|---:|---:|---:|")
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for arch in args.archs:
                weights = {path: layer_weights(arch) for path in ("torch", "kernel")}
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
                            if path == "torch":
                                k = masking.fraction_count(GAMMA, w.shape[1])
                                mask, brackets[path][i] = masking.lowest_k_bracketed(w.abs(), k, brackets[path][i])
                            else:
                                mask, brackets[path][i] = masking.targeted_weights_bracketed(w, GAMMA, brackets[path][i])
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
