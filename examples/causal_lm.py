#!/usr/bin/env python
"""Causal-LM walkthrough: unit targeted dropout on the MLPs of a decoder LM, then prune, shrink, reload.

A toy-scale, offline walkthrough of the path most users take with hf-tdrop today:

1. read the English side of Multi30K and train a small BPE tokenizer on it (``tokenizers``, offline);
2. build a tiny decoder LM from a config: GPT-2 (transformers' ``Conv1D`` layers) or a Llama-style
   model (``LlamaConfig``: gated ``nn.Linear`` gate/up/down MLP), selected by ``--model_type``;
3. train it with ``transformers.Trainer`` and :class:`hf_tdrop.TargetedDropoutCallback`: unit
   targeted dropout on the MLP up projections only (``--td_target_modules``, a regex), with α and γ
   ramped linearly from 0;
4. prune the same MLP layers by unit magnitude (:func:`hf_tdrop.prune_model`, ``mode="unit"``);
5. shrink the pruned MLPs into a smaller dense model (:func:`hf_tdrop.shrink_model`), save it with
   :func:`hf_tdrop.save_pruned` and reload it with stock ``AutoModelForCausalLM.from_pretrained``;
6. report held-out perplexity before pruning, after pruning and after shrinking, parameters and
   checkpoint bytes before and after shrinking, and CPU latency per forward before and after.

The same steps run for a model trained without targeted dropout (``--runs targeted none``), the
comparison. Results go to ``results.md`` and ``results.json`` in ``--output_dir``, each run's shrunk
model (with its tokenizer, ``tdrop_config.json`` and a model card) to ``--output_dir/<run>/shrunk``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from tqdm.auto import tqdm

import transformers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import OneSpellingHelp, arg  # noqa: E402  (helper modules beside this script)
from translation_data import read_lines, train_joint_tokenizer  # noqa: E402

from hf_tdrop import (  # noqa: E402
    TargetedDropoutCallback,
    TargetedDropoutConfig,
    TargetingSchedule,
    prune_model,
    save_pruned,
    shrink_model,
    sparsity_report,
    targeted_layers,
    unpatch_model,
)

logger = logging.getLogger("causal_lm")

PROG = "causal_lm.py"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = os.environ.get("HF_TDROP_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data"))
"""The project's offline data folder (``shared/data`` beside the repository checkout), or
``$HF_TDROP_SHARED_DATA``."""

MLP_TARGETS = {"gpt2": r".*\.mlp\.c_fc", "llama": r".*\.mlp\.up_proj"}
"""Default ``--td_target_modules`` per model type: the layer whose output units are the MLP's
hidden units. Zeroing unit i of GPT-2's ``c_fc`` (row and bias) or of Llama's ``up_proj`` silences
hidden unit i of the MLP (gelu(0) = 0; silu(gate)·0 = 0), which ``shrink_model`` then removes."""
MLP_WIDTH_FIELD = {"gpt2": "n_inner", "llama": "intermediate_size"}
ATTENTION_LAYERS = {"gpt2": r".*\.attn\..*", "llama": r".*\.self_attn\..*"}
RUN_NAMES = ("targeted", "none")

EXAMPLES = """examples:
  # the walkthrough on the guide page: tiny GPT-2 (4 layers, hidden 256), 300 steps per run
  python examples/causal_lm.py --model_type gpt2 --output_dir outputs/causal_lm/gpt2

  # the same with a Llama-style model (gated MLP, nn.Linear)
  python examples/causal_lm.py --model_type llama --output_dir outputs/causal_lm/llama

  # a smoke test in seconds
  python examples/causal_lm.py --hidden_size 32 --num_layers 2 --num_heads 2 --vocab_size 200 \\
      --max_train_samples 500 --max_eval_samples 100 --block_size 32 --max_steps 10 --output_dir outputs/smoke
"""


@dataclass
class DataArguments:
    """Multi30K's English side, read at run time; blocks of --block_size tokens."""

    _argument_group_name = "data"
    data_dir: str = arg(DEFAULT_DATA_DIR, "Folder holding multi30k/: the project's shared data folder "
                        "beside the repository, or $HF_TDROP_SHARED_DATA.")
    train_file: str = arg("multi30k/train.en.gz", "Training text, one sentence a line (optionally .gz); relative "
                          "paths are under --data_dir.")
    eval_file: str = arg("multi30k/test_2016_flickr.en.gz", "Held-out text for perplexity and latency.")
    max_train_samples: Optional[int] = arg(None, "Keep the first N training sentences.")
    max_eval_samples: Optional[int] = arg(None, "Keep the first N held-out sentences.")
    vocab_size: int = arg(2000, "BPE vocabulary trained on the training sentences.")
    block_size: int = arg(64, "Tokens per training / evaluation block (sentences joined with </s>, then cut).")


@dataclass
class ModelArguments:
    """The decoder LM, built from a config (random initialisation, nothing downloaded)."""

    _argument_group_name = "model"
    model_type: Literal["gpt2", "llama"] = arg("gpt2", "GPT-2 (Conv1D layers, gelu MLP) or Llama-style "
                                               "(nn.Linear, gated silu MLP, RMSNorm, rotary positions).")
    hidden_size: int = arg(256, "Model width.")
    num_layers: int = arg(4, "Decoder blocks.")
    num_heads: int = arg(4, "Attention heads.")
    intermediate_size: Optional[int] = arg(None, "MLP width (default: 4 x hidden for gpt2, 8/3 x hidden rounded "
                                           "up to a multiple of 32 for llama).")


@dataclass
class TrainArguments:
    """Training with transformers.Trainer (AdamW, linear warm-up, cosine decay)."""

    _argument_group_name = "training"
    runs: list[str] = arg(list(RUN_NAMES), "Runs, each trained from the same initialisation on the same batches: "
                          "'targeted' (unit targeted dropout on the MLPs) and 'none' (the comparison).",
                          choices=list(RUN_NAMES))
    max_steps: int = arg(300, "Optimizer updates per run.")
    batch_size: int = arg(16, "Blocks per update.")
    learning_rate: float = arg(1e-3, "Peak learning rate.")
    warmup_steps: int = arg(30, "Linear warm-up updates.")
    weight_decay: float = arg(0.01, "AdamW weight decay.")
    logging_steps: int = arg(25, "Log loss, learning rate and α/γ every N updates.")
    seed: int = arg(0, "Seed of the initialisation, the batch order and the dropout masks.")
    threads: int = arg(1, "torch.set_num_threads for training, evaluation and timing (0: torch's default). One "
                       "thread keeps timings steady on a machine shared with other jobs.")
    progress: bool = arg(True, "Progress bars (--no_progress: off).")


@dataclass
class TargetedDropoutArguments:
    """Unit targeted dropout on the MLP layers of the 'targeted' run."""

    _argument_group_name = "targeted dropout"
    td_alpha: float = arg(0.66, "Drop probability α of a targeted unit (the ramp's end value).")
    td_gamma: float = arg(0.5, "Targeted fraction γ: the lowest-norm units of each layer (the ramp's end value).")
    td_ramp_fraction: float = arg(0.5, "α and γ ramp linearly from 0 over this fraction of the updates.")
    td_target_modules: Optional[str] = arg(None, "Regex of the layers to target and to prune (default: the MLP up "
                                           f"projections, {MLP_TARGETS['gpt2']!r} for gpt2, "
                                           f"{MLP_TARGETS['llama']!r} for llama).")


@dataclass
class PruneArguments:
    """Pruning, shrinking and measuring."""

    _argument_group_name = "pruning and measuring"
    sparsity: float = arg(0.5, "Fraction of the units of every targeted MLP layer to prune (smallest L2 norm).")
    eval_batch_size: int = arg(32, "Blocks per forward when computing perplexity.")
    latency_batch_size: int = arg(8, "Blocks in the fixed batch timed for latency.")
    latency_trials: int = arg(20, "Timed forwards per model (interleaved; the median is reported).")
    latency_warmup: int = arg(3, "Untimed forwards per model before timing.")


@dataclass
class OutputArguments:
    _argument_group_name = "output"
    output_dir: str = arg("outputs/causal_lm", "Where results.md, results.json and <run>/shrunk go.")
    overwrite_output_dir: bool = arg(False, "Write into a non-empty --output_dir.")


ARGUMENT_CLASSES = (DataArguments, ModelArguments, TrainArguments, TargetedDropoutArguments, PruneArguments,
                    OutputArguments)


class _Parser(HfArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line, no usage block


class _HelpFormatter(OneSpellingHelp, argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks, one spelling per flag, wrapped; shows a flag's default unless
    it is None (the help says what is used instead) or the flag is a ``--no_*`` switch."""

    def _get_help_string(self, action):
        if action.default is None or action.option_strings[0].startswith("--no_"):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    """The flags of every argument dataclass in one namespace, checked (one line and exit 2 otherwise)."""
    p = _Parser(ARGUMENT_CLASSES, prog=PROG, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                formatter_class=_HelpFormatter)
    *parts, unknown = p.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                    look_for_args_file=False)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args = argparse.Namespace(**{k: v for part in parts for k, v in vars(part).items()})
    for name in ("vocab_size", "block_size", "hidden_size", "num_layers", "num_heads", "max_steps", "batch_size",
                 "logging_steps", "eval_batch_size", "latency_batch_size", "latency_trials"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}.")
    for name in ("max_train_samples", "max_eval_samples", "intermediate_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.block_size < 2 or args.vocab_size < 16:
        p.error("--block_size must be >= 2 and --vocab_size >= 16.")
    if args.hidden_size % args.num_heads:
        p.error(f"--hidden_size ({args.hidden_size}) must be a multiple of --num_heads ({args.num_heads}).")
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}.")
    for name in ("td_alpha", "td_gamma"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name} must be in [0, 1], got {getattr(args, name)}.")
    if not 0.0 < args.td_ramp_fraction <= 1.0:
        p.error(f"--td_ramp_fraction must be in (0, 1], got {args.td_ramp_fraction}.")
    if args.warmup_steps < 0 or args.latency_warmup < 0:
        p.error("--warmup_steps and --latency_warmup must be >= 0.")
    if len(set(args.runs)) != len(args.runs):
        p.error(f"--runs must not repeat a run, got {args.runs}.")
    args.td_target_modules = args.td_target_modules or MLP_TARGETS[args.model_type]
    args.intermediate_size = args.intermediate_size or default_intermediate_size(args)
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        p.error(f"--output_dir {args.output_dir!r} is not empty; pass --overwrite_output_dir to write into it.")
    return args


def default_intermediate_size(args) -> int:
    if args.model_type == "gpt2":
        return 4 * args.hidden_size
    return 32 * math.ceil(8 * args.hidden_size / 3 / 32)


# --------------------------------------------------------------------------------------------------
# main: the steps, top down
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Run the walkthrough; returns what ``results.json`` holds."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    setup_logging()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)
        if bars:  # in-process callers (tests, notebooks) get their progress bars back
            transformers.utils.logging.enable_progress_bar()


def run(args, argv: list) -> dict:
    """The steps, top down."""
    t_start = time.time()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    texts = load_texts(args)                                                # step 1
    tokenizer = train_tokenizer(args, texts["train"])
    train_blocks, eval_blocks = make_blocks(tokenizer, texts, args.block_size)
    runs = {}
    for name in args.runs:
        run_dir = output_dir / name
        model = build_model(args, tokenizer)                                # step 2 (same seed: same init)
        training, td_config = train(args, model, train_blocks, targeted=(name == "targeted"),
                                    run_dir=run_dir)                        # step 3
        ppl = {"before_pruning": perplexity(model, eval_blocks, args, "perplexity, trained")}
        prune_report = prune(args, model)                                   # step 4
        ppl["after_pruning"] = perplexity(model, eval_blocks, args, "perplexity, pruned")
        pruned = copy.deepcopy(model)                                       # dense, kept for the comparisons
        shrink_report, reload_check = shrink_save_reload(args, model, pruned, tokenizer, eval_blocks,
                                                         prune_report, td_config, run_dir)       # step 5
        ppl["after_shrinking"] = perplexity(model, eval_blocks, args, "perplexity, shrunk")
        latency = time_forwards({"before_shrinking": pruned, "after_shrinking": model},
                                eval_blocks[: args.latency_batch_size], args)                    # step 6
        runs[name] = summarize_run(args, model, name, ppl, prune_report, shrink_report, reload_check, latency,
                                   training)
    results = {
        "command": " ".join(["python", "examples/causal_lm.py", *argv]),
        "args": {**vars(args), "data_dir": shown_path(args.data_dir)},
        "data": {"train_sentences": len(texts["train"]), "eval_sentences": len(texts["eval"]),
                 "train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks),
                 "eval_predicted_tokens": eval_blocks.numel() - len(eval_blocks),
                 "vocab_size": len(tokenizer)},
        "machine": machine_info(),
        "runs": runs,
        "wall_seconds": round(time.time() - t_start, 1),
    }
    write_results(results, output_dir)                                      # step 7
    return results


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)
    logger.setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars at every save


# --------------------------------------------------------------------------------------------------
# step 1: data and tokenizer
# --------------------------------------------------------------------------------------------------


def resolve(path: str, data_dir: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else Path(data_dir) / p


def load_texts(args) -> dict[str, list[str]]:
    """The non-empty lines of --train_file and --eval_file (capped by --max_*_samples)."""
    texts = {}
    for split, path, limit in (("train", args.train_file, args.max_train_samples),
                               ("eval", args.eval_file, args.max_eval_samples)):
        file = resolve(path, args.data_dir)
        if not file.is_file():
            raise SystemExit(f"{PROG}: error: --{split}_file: file not found: {str(file)!r} (see --data_dir).")
        lines = [line.strip() for line in read_lines(file) if line.strip()][:limit]
        if not lines:
            raise SystemExit(f"{PROG}: error: --{split}_file: {str(file)!r} has no text.")
        texts[split] = lines
        logger.info(f"{split}: {len(lines)} sentences from {file.name}")
    return texts


def train_tokenizer(args, sentences: list[str]):
    """A BPE vocabulary of --vocab_size trained on the training sentences with ``tokenizers``
    (offline): ``<pad>``=0, ``</s>``=1 (appended to every sentence), ``<unk>``=2."""
    from datasets import Dataset

    logger.info(f"Training a BPE vocabulary of {args.vocab_size} on {len(sentences)} sentences")
    rows = Dataset.from_dict({"translation": [{"en": s} for s in sentences]})
    return train_joint_tokenizer(rows, ["en"], args.vocab_size)


def make_blocks(tokenizer, texts: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each split's sentences, each ending in ``</s>``, joined into one token stream and cut into
    ``[n_blocks, block_size]`` (the last partial block dropped), as transformers' ``run_clm.py``
    does."""
    out = []
    for split in ("train", "eval"):
        ids = [i for seq in tokenizer(texts[split])["input_ids"] for i in seq]
        n = len(ids) // block_size
        if n == 0:
            raise SystemExit(f"{PROG}: error: the {split} text has {len(ids)} tokens, fewer than --block_size "
                             f"{block_size}.")
        out.append(torch.tensor(ids[: n * block_size]).view(n, block_size))
        logger.info(f"{split}: {len(ids)} tokens -> {n} blocks of {block_size}")
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# step 2: the model
# --------------------------------------------------------------------------------------------------


def build_model(args, tokenizer):
    """A randomly initialised GPT-2 or Llama-style LM (seeded by --seed), input and output
    embeddings tied."""
    set_seed(args.seed)
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   tie_word_embeddings=True)
    if args.model_type == "gpt2":
        config = GPT2Config(n_positions=args.block_size, n_embd=args.hidden_size, n_layer=args.num_layers,
                            n_head=args.num_heads, n_inner=args.intermediate_size, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **special)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                             num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                             num_key_value_heads=args.num_heads, max_position_embeddings=args.block_size,
                             **special)
        model = LlamaForCausalLM(config)
    logger.info(f"{args.model_type}: {args.num_layers} layers, hidden {args.hidden_size}, {args.num_heads} heads, "
                f"MLP width {args.intermediate_size}, {count_params(model):,} parameters")
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------------------------------
# step 3: training with Trainer + TargetedDropoutCallback
# --------------------------------------------------------------------------------------------------


def train(args, model, blocks: torch.Tensor, *, targeted: bool, run_dir: Path):
    """Train ``model`` for --max_steps updates with ``transformers.Trainer``; the 'targeted' run adds
    :class:`TargetedDropoutCallback`, which patches the --td_target_modules layers for unit targeted
    dropout at train start and ramps α/γ. Leaves the model unpatched, in eval mode. Returns the
    training summary and the run's :class:`TargetedDropoutConfig` (None for the 'none' run)."""
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    training_args = TrainingArguments(
        output_dir=str(run_dir / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, lr_scheduler_type="cosine",
        weight_decay=args.weight_decay, logging_steps=args.logging_steps, save_strategy="no", report_to="none",
        seed=args.seed, use_cpu=True, disable_tqdm=not args.progress, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    info, td_config = {"targeted_dropout": None, "patched_layers": []}, None
    if targeted:
        config = TargetedDropoutConfig(alpha=args.td_alpha, gamma=args.td_gamma, mode="unit",
                                       target_modules=[args.td_target_modules])
        schedule = TargetingSchedule(alpha=args.td_alpha, gamma=args.td_gamma, kind="linear",
                                     ramp_fraction=args.td_ramp_fraction)
        TargetedDropoutCallback(schedule, config=config).attach(trainer)  # patches the model at train start
    logger.info(f"Training run '{'targeted' if targeted else 'none'}': {args.max_steps} updates of "
                f"{args.batch_size} x {args.block_size} tokens")
    t0 = time.time()
    output = trainer.train()
    seconds = time.time() - t0
    with contextlib.suppress(OSError):
        (run_dir / "trainer").rmdir()             # the Trainer's output_dir: nothing is saved there
    if targeted:
        td_config = model.tdrop_config            # the settings and the resolved schedule, for save_pruned
        info["targeted_dropout"] = td_config.to_dict()
        info["patched_layers"] = list(targeted_layers(model))
        unpatch_model(model)                      # shrink_model refuses patched models; weights are unchanged
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    info.update(steps=trainer.state.global_step, seconds=round(seconds, 1), train_loss=round(output.training_loss, 4),
                last_logged_loss=losses[-1] if losses else None)
    model.eval()
    return info, td_config


# --------------------------------------------------------------------------------------------------
# steps 4-6: prune, shrink, save and reload, measure
# --------------------------------------------------------------------------------------------------


def prune(args, model):
    """Unit-prune --sparsity of the units of the --td_target_modules layers (the MLP up projections,
    the layers targeted dropout trained), by L2 norm. Explicit targets: by default ``prune_model``
    would prune every supported layer but the head, attention included."""
    report = prune_model(model, args.sparsity, mode="unit", target_modules=[args.td_target_modules])
    logger.info(f"Pruned {report.pruned_units} of {report.n_units} units in {len(report.layers)} MLP layers")
    return report


def shrink_save_reload(args, model, pruned, tokenizer, eval_blocks: torch.Tensor, prune_report, td_config,
                       run_dir: Path):
    """Shrink ``model`` in place (``pruned`` is its dense copy), save it with ``save_pruned`` and
    reload it with stock ``AutoModelForCausalLM``; compare the logits of a fixed batch. Returns the
    :class:`ShrinkReport` and the comparison."""
    shrink_report = shrink_model(model)
    saved = save_pruned(model, run_dir / "shrunk", tokenizer_or_processor=tokenizer, prune_report=prune_report,
                        shrink_report=shrink_report, training_config=td_config, overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    batch = eval_blocks[: args.latency_batch_size]
    with torch.no_grad():
        shrunk_logits = model(input_ids=batch).logits
        pruned_logits = pruned(input_ids=batch).logits
        reloaded_logits = reloaded(input_ids=batch).logits
    check = {"shrunk_vs_pruned_max_abs_logit_diff": (shrunk_logits - pruned_logits).abs().max().item(),
             "reloaded_vs_shrunk_max_abs_logit_diff": (reloaded_logits - shrunk_logits).abs().max().item(),
             "reloaded_class": type(reloaded).__name__, "saved_to": str(saved)}
    logger.info(f"Shrunk and saved to {saved}; reloaded with AutoModelForCausalLM ({check['reloaded_class']}): "
                f"logits differ from the shrunk model's by at most {check['reloaded_vs_shrunk_max_abs_logit_diff']:.1e}")
    return shrink_report, check


def summarize_run(args, model, name: str, ppl: dict, prune_report, shrink_report, reload_check: dict,
                  latency: dict, training: dict) -> dict:
    """One run's entry of ``results.json`` (and a log line)."""
    width_field = MLP_WIDTH_FIELD[args.model_type]
    width_before = shrink_report.config_changes.get(width_field, [getattr(model.config, width_field)])[0]
    attention = sparsity_report(model, target_modules=[ATTENTION_LAYERS[args.model_type]]).total
    result = {
        "perplexity": ppl,
        "pruned_layers": [layer.name for layer in prune_report.layers],
        "pruned_units": prune_report.pruned_units,
        "attention_zero_units": attention["zero_units"],
        "mlp_width": {"before_shrinking": width_before, "after_shrinking": getattr(model.config, width_field)},
        "params": {"before_shrinking": shrink_report.params_before, "after_shrinking": shrink_report.params_after},
        "file_bytes": {"before_shrinking": shrink_report.file_bytes_before,
                       "after_shrinking": shrink_report.file_bytes_after},
        "latency_ms": latency,
        **reload_check,
        "shrink_report": shrink_report.to_dict(),
        "training": training,
    }
    logger.info(f"{name}: perplexity {ppl['before_pruning']:.2f} trained, {ppl['after_pruning']:.2f} pruned, "
                f"{ppl['after_shrinking']:.2f} shrunk; MLP width {width_before} -> {result['mlp_width']['after_shrinking']}; "
                f"latency {latency['before_shrinking']['median']:.2f} -> {latency['after_shrinking']['median']:.2f} ms")
    return result


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, args, desc: str = "perplexity") -> float:
    """exp(mean negative log-likelihood) of every token of ``blocks`` after the first of its block."""
    model.eval()
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), args.eval_batch_size), desc=desc, leave=False,
                      disable=not args.progress):
        batch = blocks[start: start + args.eval_batch_size]
        logits = model(input_ids=batch).logits[:, :-1].double()
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                 reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count)


@torch.no_grad()
def time_forwards(models: dict, batch: torch.Tensor, args) -> dict:
    """Median (and min, max) milliseconds per forward of ``batch`` for every model, after
    --latency_warmup untimed forwards each; trials are interleaved so that every model sees the same
    machine load."""
    for model in models.values():
        model.eval()
        for _ in range(args.latency_warmup):
            model(input_ids=batch)
    times = {name: [] for name in models}
    for _ in tqdm(range(args.latency_trials), desc="latency", leave=False, disable=not args.progress):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(input_ids=batch)
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "trials": len(t),
                   "batch": list(batch.shape)} for name, t in times.items()}


# --------------------------------------------------------------------------------------------------
# step 7: results
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    return {"processor": cpu_model(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def shown_path(path) -> str:
    """``path`` relative to the working directory when it is below or beside it, for the records."""
    with contextlib.suppress(ValueError):
        return os.path.relpath(Path(path).resolve())
    return str(path)


def run_label(name: str, args) -> str:
    if name == "targeted":
        return f"unit TD α={args['td_alpha']:g} γ={args['td_gamma']:g}"
    return "no targeted dropout"


def results_markdown(results: dict) -> str:
    args, runs, data, machine = results["args"], results["runs"], results["data"], results["machine"]
    names = list(runs)
    width_field = MLP_WIDTH_FIELD[args["model_type"]]
    sparsity = f"{100 * args['sparsity']:g} %"

    def row(label, get, fmt="{:.2f}"):
        return f"| {label} | " + " | ".join(fmt.format(get(runs[n])) for n in names) + " |"

    def ratio(d):
        return d["after_shrinking"] / d["before_shrinking"]

    lines = [
        f"# Causal LM: unit targeted dropout on the MLPs, {sparsity} pruned and shrunk ({args['model_type']})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model: {args['model_type']}, {args['num_layers']} layers, hidden {args['hidden_size']}, "
        f"{args['num_heads']} heads, MLP width {args['intermediate_size']}, BPE vocabulary {data['vocab_size']}, "
        f"embeddings tied. Data: Multi30K English, {data['train_sentences']:,} training sentences "
        f"({data['train_blocks']:,} blocks of {args['block_size']} tokens), held-out "
        f"`{Path(args['eval_file']).name}` ({data['eval_sentences']:,} sentences, "
        f"{data['eval_predicted_tokens']:,} predicted tokens). Training: {args['max_steps']} updates of "
        f"{args['batch_size']} blocks, AdamW lr {args['learning_rate']:g}, seed {args['seed']}. Targeted "
        f"dropout and pruning on `{args['td_target_modules']}` (unit mode); α/γ ramped linearly from 0 over "
        f"the first {100 * args['td_ramp_fraction']:g} % of the updates.",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
        f"thread{'' if machine['torch_threads'] == 1 else 's'}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}. Wall time "
        f"{results['wall_seconds']:.0f} s.",
        "",
        "| | " + " | ".join(run_label(n, args) for n in names) + " |",
        "|---|" + "---:|" * len(names),
        row("perplexity, trained (before pruning)", lambda r: r["perplexity"]["before_pruning"]),
        row(f"perplexity, {sparsity} of MLP units pruned", lambda r: r["perplexity"]["after_pruning"]),
        row("perplexity, shrunk", lambda r: r["perplexity"]["after_shrinking"]),
        row("max abs logit difference, shrunk vs pruned", lambda r: r["shrunk_vs_pruned_max_abs_logit_diff"],
            "{:.1e}"),
        row("max abs logit difference, reloaded (`AutoModelForCausalLM`) vs shrunk",
            lambda r: r["reloaded_vs_shrunk_max_abs_logit_diff"], "{:.1e}"),
        row(f"`config.{width_field}` before → after shrinking",
            lambda r: f"{r['mlp_width']['before_shrinking']} → {r['mlp_width']['after_shrinking']}", "{}"),
        row("parameters before → after shrinking",
            lambda r: f"{r['params']['before_shrinking']:,} → {r['params']['after_shrinking']:,} "
                      f"({ratio(r['params']):.3f})", "{}"),
        row("safetensors bytes before → after shrinking",
            lambda r: f"{r['file_bytes']['before_shrinking']:,} → {r['file_bytes']['after_shrinking']:,} "
                      f"({ratio(r['file_bytes']):.3f})", "{}"),
        row(f"CPU latency, ms per forward of {args['latency_batch_size']} × {args['block_size']} tokens "
            f"(median of {args['latency_trials']}), before → after shrinking",
            lambda r: f"{r['latency_ms']['before_shrinking']['median']:.2f} → "
                      f"{r['latency_ms']['after_shrinking']['median']:.2f} "
                      f"({r['latency_ms']['after_shrinking']['median'] / r['latency_ms']['before_shrinking']['median']:.3f})",
            "{}"),
        row("training loss (mean over the run)", lambda r: r["training"]["train_loss"]),
        row("training time (s)", lambda r: r["training"]["seconds"], "{:.0f}"),
        "",
        f"Pruned layers: {', '.join('`' + n + '`' for n in runs[names[0]]['pruned_layers'])}; all-zero units "
        "in the attention layers after pruning: "
        + ", ".join(f"{run_label(n, args)}: {runs[n]['attention_zero_units']}" for n in names) + ".",
        "",
    ]
    return "\n".join(lines)


def write_results(results: dict, output_dir: Path) -> None:
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    text = results_markdown(results)
    (output_dir / "results.md").write_text(text, encoding="utf-8")
    print("\n" + text)
    logger.info(f"Results written to {output_dir / 'results.md'} and results.json")


if __name__ == "__main__":
    main()
