"""Cost of unit mode's output masking on one Linear layer, forward + backward, against the plain
layer: the earlier out-of-place multiply of the output by the uint8 keep mask (an autograd
``MulBackward`` node, a second activation-sized tensor in forward and the masked gradient in
backward) and the fused :class:`hf_tdrop.layers.UnitMaskedLinearFunction` (the output masked in
place inside the function, the gradient masked once). Both give the same values and gradients bit
for bit (checked here). Ratios are medians of per-trial CPU-time ratios to the plain layer, the
variants interleaved.

Example::

    OMP_NUM_THREADS=2 python benchmarks/unit_mode_linear.py --threads 2 --trials 25
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hf_tdrop.layers import UnitMaskedLinearFunction, keep_multiplier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=2048, help="Tokens per batch (4 sequences).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, {args.trials} trials")
    print("| layer (in -> out) | out-of-place uint8 multiply / plain | fused function / plain |")
    print("|---|---:|---:|")
    for fan_in, n_out in ((768, 768), (768, 3072), (3072, 768)):
        x = torch.randn(4, args.tokens // 4, fan_in, requires_grad=True)
        weight = torch.randn(n_out, fan_in, requires_grad=True)
        bias = torch.randn(n_out, requires_grad=True)
        drop = torch.rand(n_out) < 0.5
        grad = torch.randn(4, args.tokens // 4, n_out)
        reference = F.linear(x, weight, bias) * keep_multiplier(drop)
        assert torch.equal(UnitMaskedLinearFunction.apply(x, weight, bias, drop, False), reference)
        variants = {
            "plain": lambda: F.linear(x, weight, bias).backward(grad),
            "multiply": lambda: (F.linear(x, weight, bias) * keep_multiplier(drop)).backward(grad),
            "fused": lambda: UnitMaskedLinearFunction.apply(x, weight, bias, drop, False).backward(grad),
        }
        for run in variants.values():
            run(), run()
        ratios = {"multiply": [], "fused": []}
        for _ in range(args.trials):
            times = {}
            for name, run in variants.items():
                start = time.process_time()
                run()
                times[name] = time.process_time() - start
            for name in ratios:
                ratios[name].append(times[name] / times["plain"])
        print(f"| {fan_in} -> {n_out} | {statistics.median(ratios['multiply']):.3f} | "
              f"{statistics.median(ratios['fused']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
