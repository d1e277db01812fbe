#!/usr/bin/env python
"""Shrinking benchmark: a BERT-base-sized encoder with 50 % / 75 % of its FFN units removed vs the dense original.

For each fraction, the FFN up projections (``intermediate.dense``) of a randomly initialised
``BertModel`` (built from a config; nothing downloaded) are unit-pruned by magnitude with
``hf_tdrop.prune_model`` and the model is shrunk with ``hf_tdrop.shrink_model``. Measured in one run:

* parameters (unique),
* checkpoint bytes (``save_pretrained`` safetensors files in a temporary directory),
* CPU inference latency: median of ``--trials`` timed forward passes under ``torch.inference_mode``
  after ``--warmup`` untimed ones; trials of the variants are interleaved (round robin) so that load
  changes on a shared machine hit all variants alike,

each as a ratio to the dense model, beside the ideal latency ratio from FLOPs (matmul FLOPs of the
encoder: Q/K/V/O projections, attention scores and values, FFN; layer norms, softmax, GELU and
embeddings ignored). Also checks that the shrunk model's output equals the pruned, unshrunk one.

Example::

    OMP_NUM_THREADS=1 python benchmarks/shrink_benchmark.py --batch 4 --seq 128 --trials 10
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel

from hf_tdrop import prune_model
from hf_tdrop.shrink import checkpoint_bytes, shrink_model

logger = logging.getLogger("shrink_benchmark")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=768, help="hidden size")
    p.add_argument("--layers", type=int, default=12, help="number of encoder layers")
    p.add_argument("--heads", type=int, default=12, help="attention heads")
    p.add_argument("--ffn", type=int, default=3072, help="FFN (intermediate) width of the dense model")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.75],
                   help="fractions of FFN units to remove (unit pruning of intermediate.dense, then shrink)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the timed forward pass")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the timed forward pass")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes per model before timing")
    p.add_argument("--trials", type=int, default=10, help="timed forward passes per model (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    args = p.parse_args(argv)
    for name in ("hidden", "layers", "heads", "ffn", "batch", "seq", "trials"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if any(not 0.0 < f < 1.0 for f in args.fractions):
        p.error("--fractions must be in (0, 1)")
    return args


def encoder_flops(hidden: int, ffn: int, layers: int, batch: int, seq: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the encoder's matmuls for one forward pass."""
    per_token = 2 * (4 * hidden * hidden + 2 * seq * hidden + 2 * hidden * ffn)
    return float(layers * batch * seq * per_token)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=args.ffn, max_position_embeddings=max(512, args.seq))
    dense = BertModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    attention_mask = torch.ones_like(input_ids)

    variants = [("dense", dense, 0.0)]
    max_diff = {"dense": 0.0}
    for fraction in args.fractions:
        name = f"shrunk {fraction:.0%}"
        model = copy.deepcopy(dense)
        prune_model(model, fraction, mode="unit", target_modules="intermediate.dense")
        with torch.inference_mode():
            pruned_out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        report = shrink_model(model, measure_file_size=False)
        logger.info("%s: %s", name, report.config_changes)
        with torch.inference_mode():
            shrunk_out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        max_diff[name] = (shrunk_out - pruned_out).abs().max().item()
        variants.append((name, model, fraction))

    sizes = {name: checkpoint_bytes(model) for name, model, _ in variants}
    params = {name: n_params(model) for name, model, _ in variants}

    times = {name: [] for name, _, _ in variants}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for name, model, _ in variants:
                model(input_ids=input_ids, attention_mask=attention_mask)
        for _ in tqdm(range(args.trials), desc="timing (round robin)", unit="round"):
            for name, model, _ in variants:
                start = time.perf_counter()
                model(input_ids=input_ids, attention_mask=attention_mask)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}

    base_flops = encoder_flops(args.hidden, args.ffn, args.layers, args.batch, args.seq)
    print()
    print(f"BERT encoder (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.ffn}; "
          f"random weights), CPU fp32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
          f"(torch threads {torch.get_num_threads()}), batch {args.batch} x seq {args.seq}, latency = median of "
          f"{args.trials} interleaved trials after {args.warmup} warm-up; ratios vs dense measured in this run.")
    print()
    print("| model | FFN width | parameters | params ratio | checkpoint MB | bytes ratio | median latency (ms) "
          "| latency ratio (measured) | latency ratio (ideal, FLOPs) | max abs diff vs pruned |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, model, fraction in variants:
        width = model.config.intermediate_size
        ideal = encoder_flops(args.hidden, width, args.layers, args.batch, args.seq) / base_flops
        print(f"| {name} | {width} | {params[name]:,} | {params[name] / params['dense']:.3f} "
              f"| {sizes[name] / 1e6:.1f} | {sizes[name] / sizes['dense']:.3f} | {median[name] * 1e3:.0f} "
              f"| {median[name] / median['dense']:.3f} | {ideal:.3f} | {max_diff[name]:.1e} |")


if __name__ == "__main__":
    main()
