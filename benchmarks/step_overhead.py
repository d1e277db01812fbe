"""Step-time and memory overhead of targeted dropout (issue 7).

Measures forward + backward + optimizer step of a patched model against the same unpatched model
(dropout off) and against the unpatched model with HF's standard dropout (p=0.1), in one run:
every trial runs all variants back to back (interleaved), after warm-up, and the table reports the
median and minimum time and the ratios to the unpatched baseline. The order of the variants is
shuffled in every trial (fixed seed), so no variant always follows the same one (the allocator
state a variant leaves behind affects the next). Two clocks: the process's CPU time
(``time.process_time``; with one thread it is the compute the step needed, and moves less than wall
time when other processes share the machine) and wall time. Ratios are computed from CPU time; the
one from the minimum is the least sensitive to interference (as ``timeit`` recommends).

Models are built from configs (random weights, nothing downloaded):
- ``bert``: a BERT-base-sized encoder stack (hidden 768, FFN 3072, 12 heads), ``--layers`` layers;
- ``gpt2``: a GPT-2-small-sized block stack (n_embd 768, 12 heads, Conv1D layers), ``--layers`` blocks.

Memory: the bytes autograd keeps alive for backward (``saved_tensors_hooks``, exact and
deterministic) for patched vs unpatched, per targeted layer, in units of that layer's weight size.

Example::

    python benchmarks/step_overhead.py --tokens 512 2048 8192 --trials 7
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

import torch
from torch import nn

from hf_tdrop import TargetedDropoutConfig, patch_model, targeted_layers

logger = logging.getLogger("step_overhead")


def build(arch: str, layers: int, dropout: float) -> nn.Module:
    if arch == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, vocab_size=1000,
                         max_position_embeddings=2048)
        return BertModel(cfg, add_pooling_layer=False)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2Model

        cfg = GPT2Config(n_embd=768, n_layer=layers, n_head=12, vocab_size=1000, n_positions=2048,
                         resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
        return GPT2Model(cfg)
    raise ValueError(f"--archs: unknown architecture {arch!r}; allowed: bert, gpt2")


def make_variants(arch: str, layers: int, modes: list[str], refresh_every: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = build(arch, layers, 0.0)
    variants = {"unpatched": base, "nn.Dropout p=0.1": build(arch, layers, 0.1)}
    variants["nn.Dropout p=0.1"].load_state_dict(base.state_dict())
    settings = [(mode, 1) for mode in modes]
    if refresh_every > 1:
        settings += [(mode, refresh_every) for mode in modes]
    for mode, refresh in settings:
        model = build(arch, layers, 0.0)
        model.load_state_dict(base.state_dict())
        patch_model(model, config=TargetedDropoutConfig(alpha=0.66, gamma=0.75, mode=mode, refresh_every=refresh))
        variants[f"tdrop {mode}" + (f" refresh_every={refresh}" if refresh > 1 else "")] = model
    for model in variants.values():
        model.train()
    return variants


def step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    out = model(input_ids=ids).last_hidden_state
    out.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids).last_hidden_state
    del out
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["bert", "gpt2"], help="Architectures: bert, gpt2.")
    parser.add_argument("--layers", type=int, default=2, help="Encoder layers / GPT-2 blocks per model.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192],
                        help="Tokens per batch (sequence length 128; batch = tokens / 128).")
    parser.add_argument("--modes", nargs="+", default=["weight", "unit"], help="Targeting modes to measure.")
    parser.add_argument("--trials", type=int, default=5, help="Timed trials per variant (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed warm-up steps per variant.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1, so CPU time measures the step's compute).")
    parser.add_argument("--refresh_every", type=int, default=10,
                        help="Also measure patched models that re-target every N optimizer steps (1 = skip).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    seq = 128
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers, "
          f"alpha=0.66 gamma=0.75, {args.trials} trials per variant in shuffled interleaved order (median and min reported)\n")
    print("| model | tokens | variant | CPU ms/step (median) | ratio (median) | CPU ms/step (min) | ratio (min) | wall ms/step (median) | saved-for-backward MB | extra saved / targeted weight bytes |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        variants = make_variants(arch, args.layers, args.modes, args.refresh_every)
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in variants.items()}
        for tokens in args.tokens:
            ids = torch.randint(0, 1000, (max(1, tokens // seq), seq))
            for name, model in variants.items():
                for _ in range(args.warmup):
                    step(model, opts[name], ids)
            cpu = {k: [] for k in variants}
            wall = {k: [] for k in variants}
            order = list(variants)
            rng = random.Random(0)
            for _ in range(args.trials):
                rng.shuffle(order)
                for name in order:
                    model = variants[name]
                    c0, t0 = time.process_time(), time.perf_counter()
                    step(model, opts[name], ids)
                    cpu[name].append(time.process_time() - c0)
                    wall[name].append(time.perf_counter() - t0)
            base_t = statistics.median(cpu["unpatched"])
            base_min = min(cpu["unpatched"])
            base_saved = saved_bytes(variants["unpatched"], ids)
            for name, model in variants.items():
                t = statistics.median(cpu[name])
                saved = saved_bytes(model, ids)
                extra = ""
                if name.startswith("tdrop"):
                    weight_bytes = sum(dict(model.named_modules())[n].weight.nbytes for n in targeted_layers(model))
                    extra = f"{(saved - base_saved) / weight_bytes:.3f}"
                t_min = min(cpu[name])
                print(f"| {arch} | {tokens} | {name} | {t * 1e3:.1f} | {t / base_t:.3f} | {t_min * 1e3:.1f} | "
                      f"{t_min / base_min:.3f} | {statistics.median(wall[name]) * 1e3:.1f} | {saved / 2**20:.1f} | {extra} |",
                      flush=True)


if __name__ == "__main__":
    main()
