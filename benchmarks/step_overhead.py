"""Step-time and memory overhead of targeted dropout.

Measures forward + backward + optimizer step of a patched model against the same unpatched model
(dropout off) and against the unpatched model with HF's standard dropout (p=0.1), in one run.
After warm-up, each timed step of a variant is paired with a step of the unpatched model run right
before or after it (random order); the "paired median" ratio is the median of those per-pair
ratios: the machine's slow and fast spells (on this VM the same step's time wanders by ±20 % over
seconds) hit both steps of a pair alike and cancel. The ratio of the minima is a second, less
robust, estimate. The order of the variants is shuffled in every trial (fixed seed). Two clocks:
the process's CPU time (``time.process_time``; with one thread it is the compute the step needed)
and wall time; ratios use CPU time. The default optimizer is AdamW at lr 1e-3, which moves every
weight at every step, so the magnitude ranking really changes between steps.

Models are built from configs (random weights, nothing downloaded):
- ``bert``: a BERT-base-sized encoder stack (hidden 768, FFN 3072, 12 heads), ``--layers`` layers;
- ``gpt2``: a GPT-2-small-sized block stack (n_embd 768, 12 heads, Conv1D layers), ``--layers`` blocks.

Memory: the bytes autograd keeps alive for backward (``saved_tensors_hooks``, exact and
deterministic) for patched vs unpatched, per targeted layer, in units of that layer's weight size.

Example::

    OMP_NUM_THREADS=1 python benchmarks/step_overhead.py --layers 1 --tokens 512 2048 8192 --trials 7
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import time

import torch
from torch import nn

from hf_tdrop import TargetedDropoutConfig, masking, native, patch_model, targeted_layers
from hf_tdrop.methods import targeted_dropout

logger = logging.getLogger("step_overhead")

ALPHA, GAMMA = 0.66, 0.75
NM_GAMMA = 1.0


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


RERANKED = "tdrop weight, ranked every micro-batch"
"""With --gradient_accumulation_steps > 1: weight mode with the targeted set ranked again at every
micro-batch (the library reuses it within an optimizer step); the difference is the saving."""


def other_selection_label(device: torch.device) -> str:
    """With --compare_selection: weight mode through the selection path the device does not use by
    default (sync-free on CPU, host-synchronising on an accelerator); see masking.selection.SYNC_FREE_DEVICE_TYPES."""
    path = "host-synchronising" if device.type in masking.selection.SYNC_FREE_DEVICE_TYPES else "sync-free"
    return f"tdrop weight, {path} selection"


TORCH_SELECTION = "tdrop weight, torch selection (compiled kernel off)"
"""With --compare_native: weight mode on CPU with the compiled selection kernel (hf_tdrop.native)
turned off, as on a machine without a C++ compiler; the difference is what the kernel saves."""


def make_variants(arch: str, layers: int, modes: list[str], refresh_every: int,
                  accumulation: int = 1, compare_selection: bool = False,
                  device: torch.device = torch.device("cpu"), compare_native: bool = False) -> dict[str, nn.Module]:
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
        # nm: every group of 4 inputs targeted (γ = 1), the setting of a 2:4 run
        gamma = NM_GAMMA if mode == "nm" else GAMMA
        patch_model(model, config=TargetedDropoutConfig(alpha=ALPHA, gamma=gamma, mode=mode, refresh_every=refresh))
        label = "tdrop nm 2:4" if mode == "nm" else f"tdrop {mode}"
        variants[label + (f" refresh_every={refresh}" if refresh > 1 else "")] = model
    if accumulation > 1 and "weight" in modes:
        model = build(arch, layers, 0.0)
        model.load_state_dict(base.state_dict())
        patch_model(model, config=TargetedDropoutConfig(alpha=ALPHA, gamma=GAMMA, mode="weight"))
        variants[RERANKED] = model
    if compare_selection and "weight" in modes:
        model = build(arch, layers, 0.0)
        model.load_state_dict(base.state_dict())
        patch_model(model, config=TargetedDropoutConfig(alpha=ALPHA, gamma=GAMMA, mode="weight"))
        variants[other_selection_label(device)] = model
    if compare_native and "weight" in modes:
        model = build(arch, layers, 0.0)
        model.load_state_dict(base.state_dict())
        patch_model(model, config=TargetedDropoutConfig(alpha=ALPHA, gamma=GAMMA, mode="weight"))
        variants[TORCH_SELECTION] = model
    for model in variants.values():
        model.to(device).train()
    return variants


@contextlib.contextmanager
def variant_context(name: str, device: torch.device):
    """Inside: the library behaves as the variant ``name`` needs. ``RERANKED``: patched layers rank
    their targeted set at every forward (no reuse within a step); the other-selection variant: the
    device type's selection path is switched (sync-free <-> host-synchronising); ``TORCH_SELECTION``:
    the compiled kernel is off (``HF_TDROP_NATIVE=0``)."""
    previous_reuse, previous_types = targeted_dropout.REUSE_WITHIN_STEP, masking.selection.SYNC_FREE_DEVICE_TYPES
    previous_switch = os.environ.get(native.ENV_SWITCH)
    if name == TORCH_SELECTION:
        os.environ[native.ENV_SWITCH] = "0"

    if name == RERANKED:
        targeted_dropout.REUSE_WITHIN_STEP = False
    if name == other_selection_label(device):
        masking.selection.SYNC_FREE_DEVICE_TYPES = previous_types ^ {device.type}
    try:
        yield
    finally:
        targeted_dropout.REUSE_WITHIN_STEP, masking.selection.SYNC_FREE_DEVICE_TYPES = previous_reuse, previous_types
        if previous_switch is None:
            os.environ.pop(native.ENV_SWITCH, None)
        else:
            os.environ[native.ENV_SWITCH] = previous_switch


def step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, accumulation: int = 1) -> None:
    """One optimizer step over ``accumulation`` micro-batches of ``ids`` each (on an accelerator,
    waited for, so that the clocks see the whole step)."""
    for _ in range(accumulation):
        out = model(input_ids=ids).last_hidden_state
        (out.float().square().mean() / accumulation).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)


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


def op_breakdown(variants: dict, opts: dict, ids: torch.Tensor, name: str, steps: int, arch: str, tokens: int) -> None:
    """Where a variant's extra time goes: torch.profiler self CPU time per op, per step, variant minus
    unpatched (ops whose difference is at least 0.5 ms/step)."""
    per_op = {}
    for which in ("unpatched", name):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(variants[which], opts[which], ids)
        per_op[which] = {e.key: (e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in prof.key_averages()}
    base, var = per_op["unpatched"], per_op[name]
    rows = []
    for op in set(base) | set(var):
        (tb, nb), (tv, nv) = base.get(op, (0.0, 0)), var.get(op, (0.0, 0))
        if abs(tv - tb) >= 0.5:
            rows.append((tv - tb, op, tb, nb, tv, nv))
    rows.sort(reverse=True)
    total_base, total_var = sum(t for t, _ in base.values()), sum(t for t, _ in var.values())
    print(f"\nOp breakdown, {arch} {tokens} tokens, {name} vs unpatched ({steps} profiled steps each; "
          f"total self CPU {total_base:.1f} -> {total_var:.1f} ms/step, difference {total_var - total_base:+.1f}):\n")
    print("| op | unpatched ms/step (calls) | variant ms/step (calls) | difference ms/step |")
    print("|---|---:|---:|---:|")
    for diff, op, tb, nb, tv, nv in rows:
        print(f"| `{op}` | {tb:.1f} ({nb:g}) | {tv:.1f} ({nv:g}) | {diff:+.1f} |")
    print(flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["bert", "gpt2"], help="Architectures: bert, gpt2.")
    parser.add_argument("--layers", type=int, default=2, help="Encoder layers / GPT-2 blocks per model.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192],
                        help="Tokens per batch (sequence length 128; batch = tokens / 128).")
    parser.add_argument("--modes", nargs="+", default=["weight", "unit", "nm"],
                        help="Targeting modes to measure (nm: 2:4 with gamma=1, every group targeted).")
    parser.add_argument("--trials", type=int, default=7,
                        help="Timed (unpatched, variant) pairs per variant; medians and minima over them are reported.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed warm-up steps per variant.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1, so CPU time measures the step's compute).")
    parser.add_argument("--refresh_every", type=int, default=10,
                        help="Also measure patched models that re-target every N optimizer steps (1 = skip).")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                        help="Optimizer of the timed step (AdamW moves every weight by about lr per step: "
                             "the weight ranking changes at every step).")
    parser.add_argument("--lr", type=float, default=1e-3, help="Learning rate of the timed steps.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1,
                        help="Micro-batches (of --tokens each) per optimizer step. Above 1, also measures weight "
                             "mode ranking its targeted set at every micro-batch instead of once per step.")
    parser.add_argument("--profile_ops", type=int, default=0,
                        help="After the timings of each token count, profile this many steps of 'tdrop weight' and "
                             "of the unpatched model and print where the extra time goes, op by op (0 = skip).")
    parser.add_argument("--device", default="cpu",
                        help="Where the models run: cpu, or cuda / cuda:N (on an accelerator the ratios use wall "
                             "time, since the process's CPU time no longer measures the step).")
    parser.add_argument("--compare_selection", action="store_true",
                        help="Add weight mode through the other selection path: sync-free on CPU, "
                             "host-synchronising on an accelerator (masking.selection.SYNC_FREE_DEVICE_TYPES).")
    parser.add_argument("--compare_native", action="store_true",
                        help="Add weight mode with the compiled CPU selection kernel (hf_tdrop.native) turned off, "
                             "as on a machine without a C++ compiler.")
    args = parser.parse_args(argv)
    if args.gradient_accumulation_steps < 1 or args.threads < 1:
        parser.error("--gradient_accumulation_steps and --threads must be >= 1.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: not a torch device: {args.device!r} (e.g. cpu, cuda, cuda:1).")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build or machine.")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    seq = 128
    clock = "CPU" if device.type == "cpu" else "wall"
    where = "" if device.type == "cpu" else f"{torch.cuda.get_device_name(device)}, "
    print(f"torch {torch.__version__}, {where}{torch.get_num_threads()} threads, {args.layers} layers, "
          f"alpha={ALPHA} gamma={GAMMA} (nm 2:4: gamma={NM_GAMMA:g}), {args.optimizer} lr={args.lr}, "
          f"{args.gradient_accumulation_steps} micro-batch(es) per step, {args.trials} timed (unpatched, variant) pairs "
          f"per variant; ratios of {clock} time")
    if device.type == "cpu":
        kernel = "on" if native.available() else f"off ({native.unavailable_reason()})"
        print(f"compiled CPU selection kernel (hf_tdrop.native): {kernel}")
    print()
    print(f"| model | tokens | variant | {clock} ms/step (median) | {clock} ms/step (min) | ratio (paired median) | "
          "ratio (min/min) | wall ms/step (median) | saved-for-backward MB | extra saved / targeted weight bytes |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    optimizer_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    for arch in args.archs:
        variants = make_variants(arch, args.layers, args.modes, args.refresh_every, args.gradient_accumulation_steps,
                                 args.compare_selection, device, args.compare_native)
        opts = {k: optimizer_cls(m.parameters(), lr=args.lr) for k, m in variants.items()}
        for tokens in args.tokens:
            ids = torch.randint(0, 1000, (max(1, tokens // seq), seq)).to(device)
            for name, model in variants.items():
                for _ in range(args.warmup):
                    with variant_context(name, device):
                        step(model, opts[name], ids, args.gradient_accumulation_steps)
            cpu = {k: [] for k in variants}
            wall = {k: [] for k in variants}
            ratios = {k: [] for k in variants}
            others = [k for k in variants if k != "unpatched"]
            rng = random.Random(0)
            timing = cpu if clock == "CPU" else wall  # the clock the ratios use

            def timed(name):
                with variant_context(name, device):
                    c0, t0 = time.process_time(), time.perf_counter()
                    step(variants[name], opts[name], ids, args.gradient_accumulation_steps)
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
                return timing[name][-1]

            for _ in range(args.trials):
                rng.shuffle(others)
                for name in others:
                    # a pair: the variant and the baseline back to back (in random order), so the
                    # machine's slow and fast spells, which last seconds, hit both alike
                    if rng.random() < 0.5:
                        base = timed("unpatched")
                        ratios[name].append(timed(name) / base)
                    else:
                        t = timed(name)
                        ratios[name].append(t / timed("unpatched"))
            ratios["unpatched"] = [1.0]
            base_min = min(timing["unpatched"])
            base_saved = saved_bytes(variants["unpatched"], ids)
            for name, model in variants.items():
                with variant_context(name, device):
                    saved = saved_bytes(model, ids)
                extra = ""
                if name.startswith("tdrop"):
                    weight_bytes = sum(dict(model.named_modules())[n].weight.nbytes for n in targeted_layers(model))
                    extra = f"{(saved - base_saved) / weight_bytes:.3f}"
                t_min = min(timing[name])
                print(f"| {arch} | {tokens} | {name} | {statistics.median(timing[name]) * 1e3:.1f} | {t_min * 1e3:.1f} | "
                      f"{statistics.median(ratios[name]):.3f} | {t_min / base_min:.3f} | "
                      f"{statistics.median(wall[name]) * 1e3:.1f} | {saved / 2**20:.1f} | {extra} |", flush=True)
            for profiled in ("tdrop weight", "tdrop unit"):
                if args.profile_ops and profiled in variants:
                    op_breakdown(variants, opts, ids, profiled, args.profile_ops, arch, tokens)

if __name__ == "__main__":
    main()
