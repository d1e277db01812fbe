#!/usr/bin/env python
"""Targeted dropout on WMT14 English->German (Gomez et al., 2019, Table 5), with 🤗 Accelerate.

Trains a Transformer translation model (from scratch by preset, or fine-tuning any seq2seq
checkpoint) with or without targeted dropout, then sweeps magnitude pruning (weight and/or unit
mode) and reports detokenised sacreBLEU and per-token accuracy at every pruning level, on the
validation and test splits. In the style of transformers' ``run_translation_no_trainer.py``.

The run goes through five steps, each a function below: ``load_data`` (read and check the
splits), ``build_tokenizer_and_model`` (and patch it with targeted dropout), ``train``,
``run_sweeps`` and ``export`` (push to the Hub). Bad flags and bad data stop the run in the first
two steps, before anything is written, with one line naming the flag and file and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

# Only what the command line needs: torch, datasets, accelerate, transformers' models and hf_tdrop are
# imported after the flags are parsed (below), so that --help and flag errors answer at once.
from transformers import HfArgumentParser

EXAMPLES = """examples:
  # CPU, offline, local parallel text (plain, gzipped or JSON lines), e.g. Multi30K's train.en.gz /
  # train.de.gz / val.* / test_2016_flickr.* (github.com/multi30k/dataset, data/task1/raw) in a
  # folder of yours, D=path/to/multi30k: the multi30k preset, about 45 minutes on 2 cores
  python examples/wmt_en_de.py --model_preset multi30k \\
      --train_files $D/train.en.gz $D/train.de.gz --validation_files $D/val.en.gz $D/val.de.gz \\
      --td_mode weight --td_alpha 0.66 --td_gamma 0.75 --td_schedule piecewise \\
      --td_ramp_fraction 0.125 --save_dtype float16 --checkpointing_steps epoch --no_do_sweep \\
      --output_dir runs/m30k-td

  # sweep it: BLEU (beam 4) and token accuracy at 0-90 % weight and unit pruning on a test set
  python examples/wmt_en_de.py --no_do_train --model_name_or_path runs/m30k-td \\
      --test_files $D/test_2016_flickr.en.gz $D/test_2016_flickr.de.gz --eval_splits test \\
      --sweep_modes weight unit --output_dir runs/m30k-td-test2016

  # targeted dropout as a fine-tuning step of any trained seq2seq checkpoint
  python examples/wmt_en_de.py --model_name_or_path runs/m30k-none \\
      --train_files $D/train.en.gz $D/train.de.gz --validation_files $D/val.en.gz $D/val.de.gz \\
      --td_mode weight --td_alpha 0.66 --td_gamma 0.75 --td_schedule piecewise \\
      --td_ramp_fraction 0.125 --max_train_steps 605 --max_tokens_per_batch 2048 \\
      --learning_rate 3e-4 --lr_scheduler_type constant --output_dir runs/m30k-none-td-finetuned

  # the paper's setting, on the hub's WMT14 (needs network), any number of GPUs:
  accelerate launch examples/wmt_en_de.py --model_preset transformer-base \\
      --td_mode weight --td_alpha 0.66 --td_gamma 0.75 --output_dir runs/wmt14-td

  # put several finished sweeps side by side (paper-shaped tables and plots):
  python examples/wmt_en_de.py --combine_runs runs/m30k-none-test2016 runs/m30k-td-test2016 \\
      --output_dir runs/tables
"""

# Presets: a MarianMTModel architecture (post-norm Transformer, sinusoidal positions, shared
# source/target/output embeddings) plus the training settings it was sized with. "transformer-base"
# is Vaswani et al.'s base model used in the paper; "multi30k" is sized so that a run on Multi30K
# (29,000 pairs) trains in about an hour on two CPU cores; "tiny" is for smoke tests. A flag given
# on the command line overrides the preset's value.
MODEL_PRESETS = {
    "transformer-base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                             decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                             dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                             learning_rate=7e-4, num_warmup_steps=4000, vocab_size=32000,
                             max_tokens_per_batch=4096, num_train_epochs=1),
    "multi30k": dict(d_model=192, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=768, decoder_ffn_dim=768,
                     dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                     learning_rate=1e-3, num_warmup_steps=400, vocab_size=5000,
                     max_tokens_per_batch=2048, num_train_epochs=12),
    "tiny": dict(d_model=128, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512,
                 dropout=0.1, attention_dropout=0.0, activation_dropout=0.0,
                 learning_rate=1e-3, num_warmup_steps=200, vocab_size=8000,
                 max_tokens_per_batch=None, num_train_epochs=1),
}
TRAINING_PRESET_KEYS = ("learning_rate", "num_warmup_steps", "vocab_size", "max_tokens_per_batch",
                        "num_train_epochs")
"""Preset entries that are training settings (defaults of the flags of the same name), not
``MarianConfig`` fields."""
FALLBACK_DEFAULTS = dict(learning_rate=5e-5, num_warmup_steps=0, vocab_size=8000, max_tokens_per_batch=None,
                         num_train_epochs=1)
"""Defaults of those flags when fine-tuning a checkpoint (``--model_name_or_path``): no preset applies."""
# The choices of some flags, spelled out here so that parsing them imports neither torch nor hf_tdrop
# (tests check that they equal hf_tdrop.MODES, hf_tdrop.schedules.SCHEDULE_KINDS and transformers'
# SchedulerType values).
MODES = ("weight", "unit", "nm")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "piecewise")
LR_SCHEDULER_TYPES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                      "warmup_stable_decay", "greedy")
SAVE_DTYPES = ("float32", "float16", "bfloat16")
"""``--save_dtype`` choices: names of torch dtypes."""
TD_MODES = ("none",) + MODES
HELP_WIDTH = 100
"""--help is wrapped to the terminal's width, at most this many columns."""
PROG = "wmt_en_de.py"
SWEEP_FILE = "sweep-{split}-{mode}"


class InputError(Exception):
    """A bad flag or bad data, found before anything is written: reported as one line, exit status 2."""


def describe_preset(name: str) -> str:
    """One line for --help: the architecture and training settings of a preset."""
    c = MODEL_PRESETS[name]
    batch = (f"batches of {c['max_tokens_per_batch']} tokens" if c["max_tokens_per_batch"]
             else "batches of --per_device_train_batch_size pairs")
    return (f"{c['encoder_layers']}+{c['decoder_layers']} layers, d_model {c['d_model']}, FFN {c['encoder_ffn_dim']}, "
            f"{c['encoder_attention_heads']} heads, dropout {c['dropout']:g}, BPE {c['vocab_size']}, {batch}, "
            f"LR {c['learning_rate']:g} after {c['num_warmup_steps']} warm-up updates, {c['num_train_epochs']} epoch(s)")


PresetName = Literal[tuple(MODEL_PRESETS)]
TDMode = Literal[TD_MODES]
ScheduleKind = Literal[SCHEDULE_KINDS]
SaveDtype = Literal[SAVE_DTYPES]
PruneMode = Literal[MODES]


def arg(default=None, help="", **metadata):  # noqa: A002 - argparse's own name
    """A dataclass field that is a command-line flag (``help`` and argparse extras in its metadata)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DataArguments:
    """Which data to train and evaluate on, and how to cut it."""

    _argument_group_name = "data"
    dataset_name: Optional[str] = arg("wmt14", "`datasets` hub id (ignored when local files are given).")
    dataset_config_name: Optional[str] = arg("de-en", "Config of --dataset_name.")
    train_files: Optional[list[str]] = arg(None, "Local training data: one JSON lines file in the HF translation "
                                           "schema ({'translation': {'en': ..., 'de': ...}}), or two parallel "
                                           "plain-text files (optionally .gz; language from the name, e.g. "
                                           "train.en.gz, else source first).", nargs="+")
    validation_files: Optional[list[str]] = arg(None, "Local validation data (same formats as --train_files).",
                                                nargs="+")
    test_files: Optional[list[str]] = arg(None, "Local test data, e.g. newstest2014.en.gz newstest2014.de.gz.",
                                          nargs="+")
    source_lang: str = arg("en", "Source language code.")
    target_lang: str = arg("de", "Target language code.")
    source_prefix: str = arg("", "Text prepended to every source (e.g. 'translate English to German: ' for T5).")
    max_train_samples: Optional[int] = arg(None, "Keep the first N training pairs (debugging / CPU runs).")
    max_eval_samples: Optional[int] = arg(None, "Evaluate on the first N validation pairs.")
    max_test_samples: Optional[int] = arg(None, "Evaluate on the first N test pairs.")
    max_source_length: int = arg(128, "Truncate sources to this many tokens.")
    max_target_length: int = arg(128, "Truncate training targets to this many tokens; also the generation length limit.")
    preprocessing_num_workers: Optional[int] = arg(None, "Processes for tokenising the data.")
    cache_dir: Optional[str] = arg(None, "`datasets` cache directory.")


@dataclass
class ModelArguments:
    """The tokenizer and the model: a preset built from scratch, or a checkpoint to fine-tune."""

    _argument_group_name = "tokenizer and model"
    model_name_or_path: Optional[str] = arg(None, "Fine-tune this seq2seq checkpoint (e.g. Helsinki-NLP/opus-mt-en-de, "
                                            "t5-small, or a previous --output_dir) instead of building "
                                            "--model_preset from scratch.")
    model_preset: PresetName = arg("transformer-base", "Architecture and training settings of a from-scratch model. "
                                   + "; ".join(f"{name}: {describe_preset(name)}" for name in MODEL_PRESETS) + ".")
    tokenizer_name: Optional[str] = arg(None, "Pretrained tokenizer (default: the one of --model_name_or_path, else a "
                                        "joint BPE vocabulary trained on the training data with `tokenizers`).")
    vocab_size: Optional[int] = arg(None, "Size of the trained joint BPE vocabulary (default: the preset's).")
    dropout: Optional[float] = arg(None, "Override the preset's (standard) dropout rate.")


@dataclass
class TrainArguments:
    """The training loop (🤗 Accelerate; any number of processes)."""

    _argument_group_name = "training"
    do_train: bool = arg(True, "Train (--no_do_train: only evaluate --model_name_or_path).")
    per_device_train_batch_size: int = arg(64, "Sentence pairs per device per step, when batches are not made by "
                                           "--max_tokens_per_batch.")
    max_tokens_per_batch: Optional[int] = arg(None, "Batch by length instead: similar-length pairs, at most this many "
                                              "padded tokens (batch size x longest source or target) per device "
                                              "per step (default: the preset's; none when fine-tuning).")
    per_device_eval_batch_size: int = arg(64, "Sentences per device in evaluation.")
    learning_rate: Optional[float] = arg(None, "Peak learning rate (default: the preset's; 5e-5 when fine-tuning).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    adam_beta2: float = arg(0.98, "Adam β2 (Vaswani et al.: 0.98).")
    label_smoothing: float = arg(0.1, "Label smoothing of the cross-entropy.")
    max_grad_norm: float = arg(1.0, "Gradient clipping (0 = off).")
    num_train_epochs: Optional[int] = arg(None, "Epochs (default: the preset's; 1 when fine-tuning; overridden by "
                                          "--max_train_steps).")
    max_train_steps: Optional[int] = arg(None, "Total optimizer updates.")
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer update.")
    lr_scheduler_type: str = arg("inverse_sqrt", "LR schedule (the paper's: inverse_sqrt with warm-up), a "
                                 "transformers SchedulerType: %(choices)s.", choices=list(LR_SCHEDULER_TYPES),
                                 metavar="TYPE")
    num_warmup_steps: Optional[int] = arg(None, "LR warm-up updates (default: the preset's; 0 when fine-tuning).")
    mixed_precision: Optional[str] = arg(None, "Mixed precision (default: accelerate config).",
                                         choices=["no", "fp16", "bf16"])
    seed: int = arg(42, "Random seed.")
    checkpointing_steps: Optional[str] = arg(None, "Save the full training state every N updates, or 'epoch'.")
    resume_from_checkpoint: Optional[str] = arg(None, "A state folder written by --checkpointing_steps, or 'latest'.")
    logging_steps: int = arg(50, "Log loss / lr / α, γ every N updates.")
    epoch_validation: bool = arg(True, "At the end of every epoch, log the validation split's loss and token accuracy "
                                 "(teacher-forced, a few seconds; the history is in train_history.json).")


@dataclass
class TargetedDropoutArguments:
    """Targeted dropout during training (``--td_mode none``: off)."""

    _argument_group_name = "targeted dropout"
    td_mode: TDMode = arg("none", "Targeted dropout granularity ('none' = off).")
    td_alpha: float = arg(0.66, "Drop probability α of a targeted weight/unit.")
    td_gamma: float = arg(0.75, "Targeted fraction γ.")
    td_schedule: ScheduleKind = arg("constant", "How α and γ reach their targets (hf_tdrop.TargetingSchedule kind).")
    td_ramp_fraction: Optional[float] = arg(None, "Ramp length as a fraction of the training updates.")
    td_ramp_steps: Optional[int] = arg(None, "Ramp length in updates.")
    td_delay_steps: int = arg(0, "Updates without targeted dropout before the ramp.")
    td_target_modules: Optional[list[str]] = arg(None, "Layers to target (names, dotted suffixes or regexes; default "
                                                 "every Linear except the output head).", nargs="+")


METHOD_KINDS = ("dropout", "l1", "l0", "variational_dropout")
"""The training methods ``--method`` accepts: the weight-level baselines that apply to a Transformer's
Linear layers."""
METHOD_FORMS = "none | dropout:MODE:RATE | l1:LAMBDA | l0:weight:LAMBDA | vd[:KL_SCALE[:WARMUP]] (MODE weight|unit)"


@dataclass
class MethodArguments:
    """A baseline training method instead of targeted dropout (the paper's comparisons)."""

    _argument_group_name = "training method"
    method: str = arg("none", f"Train with one of the paper's baselines: {METHOD_FORMS}. E.g. 'l0:weight:1e-3', "
                      "'vd:1:0.1' (variational dropout, KL scale 1, KL warm-up over the first 10%% of the updates), "
                      "'l1:0.01', 'dropout:weight:0.25'. Its loss term is added to the training loss "
                      "(hf_tdrop.regularization_loss), its extra tensors are folded into the weights before the save "
                      "(hf_tdrop.finalize_model: the checkpoint is plain) and the sweeps prune by its learned "
                      "criterion where it has one (L0: gates, variational dropout: log_alpha; magnitude otherwise). "
                      "Variational dropout trains without weight decay. Layers: --td_target_modules. Not together "
                      "with --td_mode.")


@dataclass
class SweepArguments:
    """Evaluation (sacreBLEU, token accuracy) at every pruning level."""

    _argument_group_name = "evaluation and pruning sweep"
    do_sweep: bool = arg(True, "After training, evaluate at every pruning level of --sweep_sparsities "
                         "(--no_do_sweep: skip).")
    sweep_modes: list[str] = arg(["weight"], "Pruning modes to sweep.", choices=list(MODES))
    sweep_sparsities: list[float] = arg([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "Pruning levels.")
    eval_splits: list[str] = arg(["validation", "test"], "Splits to evaluate.")
    num_beams: int = arg(4, "Beam size (1 = greedy).")
    length_penalty: float = arg(0.6, "Beam search length penalty.")
    max_length_a: float = arg(1.5, "Generation length budget per batch: at most a x (longest source in the batch) + b "
                              "new tokens, and never more than --max_target_length. Keeps beam search affordable on "
                              "heavily pruned models, which otherwise babble to the limit.")
    max_length_b: int = arg(10, "See --max_length_a.")


@dataclass
class OutputArguments:
    """Where results go, and the Hub export."""

    _argument_group_name = "output"
    output_dir: str = arg(None, "Where the model, tokenizer, sweeps and translations go.", required=True)
    save_dtype: SaveDtype = arg("float32", "Dtype of the saved model. With float16/bfloat16 the trained weights are "
                                "rounded to it before the sweeps, so the sweeps measure exactly the saved model.")
    run_name: Optional[str] = arg(None, "Column label in the sweep tables (default: 'none' or 'targeted α=… γ=…').")
    push_to_hub: bool = arg(False, "Push the model pruned to --push_sparsity to the Hub.")
    hub_model_id: Optional[str] = arg(None, "Hub repo id for --push_to_hub.")
    push_sparsity: float = arg(0.0, "Sparsity of the pushed model.")
    push_mode: PruneMode = arg("weight", "Pruning mode of the pushed model.")
    combine_runs: Optional[list[str]] = arg(None, "Only combine the sweeps of these finished --output_dir's into "
                                            "paper-shaped tables and plots in --output_dir (no training, no "
                                            "evaluation).", nargs="+")


ARGUMENT_CLASSES = (DataArguments, ModelArguments, TrainArguments, TargetedDropoutArguments, MethodArguments,
                    SweepArguments, OutputArguments)


class _Parser(HfArgumentParser):
    def error(self, message):
        # one line (no usage block), like every other bad-input error of the script
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks; wraps to the terminal, at most :data:`HELP_WIDTH` columns; shows
    each flag in one spelling, the snake_case one (the kebab-case alias that HfArgumentParser adds,
    e.g. ``--td-mode``, is still accepted); shows a flag's default unless it is None (then the help
    text says what is used instead); a ``--no_*`` switch is described as its flag set to false."""

    def __init__(self, prog, indent_increment=2, max_help_position=32, width=None):
        width = min(width or shutil.get_terminal_size().columns - 2, HELP_WIDTH)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action):
        if len(action.option_strings) > 1:
            kebab = "--" + action.option_strings[0][2:].replace("_", "-")
            action = copy.copy(action)
            action.option_strings = [action.option_strings[0]] + [
                o for o in action.option_strings[1:] if o != kebab]
        return super()._format_action_invocation(action)

    def _get_help_string(self, action):
        if action.option_strings[0].startswith("--no_"):
            return f"Same as --{action.dest} false."
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


USAGE = """%(prog)s [options] --output_dir DIR
       %(prog)s --combine_runs DIR [DIR ...] --output_dir DIR"""


def fail(message: str) -> None:
    """Stop with ``wmt_en_de.py: error: <message>`` on one line and exit status 2."""
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def build_parser() -> _Parser:
    """The command line: one :class:`~transformers.HfArgumentParser` over :data:`ARGUMENT_CLASSES`."""
    p = _Parser(ARGUMENT_CLASSES, prog=PROG, usage=USAGE, description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                formatter_class=_HelpFormatter)
    for cls in ARGUMENT_CLASSES:  # also accept --no-do_train, the spelling of argparse's BooleanOptionalAction
        for f in fields(cls):
            if f.type in (bool, "bool") and f.default is True:
                p.add_argument(f"--no-{f.name}", action="store_false", dest=f.name, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    """Parse the flags into the argument dataclasses and return them merged in one namespace, the
    preset's training defaults filled in and every flag checked (one line and exit 2 otherwise)."""
    p = build_parser()
    *parts, unknown = p.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                    look_for_args_file=False)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args = argparse.Namespace(**{k: v for part in parts for k, v in vars(part).items()})
    apply_preset_defaults(args)
    validate_args(p, args)
    return args


def apply_preset_defaults(args) -> None:
    """Fill the training flags left unset from ``--model_preset`` (from-scratch runs) or from
    :data:`FALLBACK_DEFAULTS` (fine-tuning ``--model_name_or_path``)."""
    source = FALLBACK_DEFAULTS if args.model_name_or_path else MODEL_PRESETS[args.model_preset]
    for key in TRAINING_PRESET_KEYS:
        if getattr(args, key, None) is None:
            setattr(args, key, source[key])


def validate_args(parser, args):
    """Flag errors: every check that needs no data, so a bad command line stops before anything runs."""
    if args.combine_runs:
        for run_dir in args.combine_runs:
            if not any(Path(run_dir).glob("sweeps/sweep-*.json")):
                parser.error(f"--combine_runs: no sweeps/sweep-*.json in {run_dir!r} (is the run finished?).")
        return
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_beams", "max_source_length", "max_target_length", "num_train_epochs", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("max_train_samples", "max_eval_samples", "max_test_samples", "max_train_steps", "td_ramp_steps",
                 "preprocessing_num_workers", "max_tokens_per_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_length_a < 0 or args.max_length_b < 0:
        parser.error(f"--max_length_a and --max_length_b must be >= 0, got {args.max_length_a} and {args.max_length_b}.")
    if args.vocab_size < 16:
        parser.error(f"--vocab_size must be >= 16, got {args.vocab_size}.")
    if args.learning_rate is not None and not args.learning_rate > 0:
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if (args.num_warmup_steps is not None and args.num_warmup_steps < 0) or args.td_delay_steps < 0:
        parser.error("--num_warmup_steps and --td_delay_steps must be >= 0.")
    for name in ("td_alpha", "td_gamma"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name} must be in [0, 1], got {getattr(args, name)}.")
    if any(not 0.0 <= s < 1.0 for s in args.sweep_sparsities):
        parser.error(f"--sweep_sparsities must be in [0, 1), got {args.sweep_sparsities}.")
    if len(set(args.sweep_sparsities)) != len(args.sweep_sparsities):
        parser.error(f"--sweep_sparsities must be distinct, got {args.sweep_sparsities}.")
    if not 0.0 <= args.push_sparsity < 1.0:
        parser.error(f"--push_sparsity must be in [0, 1), got {args.push_sparsity}.")
    if args.td_ramp_fraction is not None and not 0.0 < args.td_ramp_fraction <= 1.0:
        parser.error(f"--td_ramp_fraction must be in (0, 1], got {args.td_ramp_fraction}.")
    if args.td_schedule != "constant" and (args.td_ramp_fraction is None) == (args.td_ramp_steps is None):
        parser.error(f"--td_schedule {args.td_schedule} needs exactly one of --td_ramp_fraction / --td_ramp_steps.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    args.method_spec = parse_method(parser, args)
    if not args.do_train and not args.model_name_or_path:
        parser.error("--no-do_train needs --model_name_or_path (a trained model to evaluate).")
    steps = args.checkpointing_steps
    if steps is not None and steps != "epoch" and (not steps.isdigit() or int(steps) < 1):
        parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {steps!r}.")
    if args.resume_from_checkpoint:
        if not args.do_train:
            parser.error("--resume_from_checkpoint needs training (drop --no-do_train).")
        if args.resume_from_checkpoint == "latest":
            if not checkpoint_dirs(Path(args.output_dir)):
                parser.error(f"--resume_from_checkpoint latest: no step_*/epoch_* folder in {args.output_dir!r}.")
        elif not Path(args.resume_from_checkpoint).is_dir():
            parser.error(f"--resume_from_checkpoint: no such folder {args.resume_from_checkpoint!r}.")


def parse_method(parser, args):
    """``--method`` as a :class:`run_specs.RunSpec` (None for 'none'); a bad or unsupported spec is a
    one-line flag error."""
    if args.method.strip() == "none":
        return None
    from run_specs import RunSpecError, parse_run_spec  # beside this script; imports hf_tdrop (and torch)

    try:
        spec = parse_run_spec(args.method)
    except RunSpecError as err:
        parser.error(f"--method: {' '.join(str(err).split('; allowed:')[0].split())}; allowed: {METHOD_FORMS}.")
    if spec.method not in METHOD_KINDS or (spec.method == "l0" and spec.mode != "weight"):
        parser.error(f"--method {args.method!r}: not a weight-level method for a Transformer here; allowed: "
                     f"{METHOD_FORMS} (targeted dropout: --td_mode).")
    if args.td_mode != "none":
        parser.error(f"--method {args.method!r} and --td_mode {args.td_mode}: choose one training method.")
    return spec


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The ``step_N`` / ``epoch_N`` state folders written by ``--checkpointing_steps``."""
    return [d for d in output_dir.glob("*_*") if d.is_dir() and d.name.split("_")[0] in ("step", "epoch")
            and d.name.split("_", 1)[1].isdigit()]


if __name__ == "__main__":
    # The flags first: --help and flag errors answer here, before the heavy imports below.
    ARGS = parse_args()

import datasets  # noqa: E402 - after the command line, see above
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import DataLoaderConfiguration, id_tensor_storage, set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    MarianConfig,
    MarianMTModel,
    get_scheduler,
)

import hf_tdrop  # noqa: E402
from hf_tdrop import (  # noqa: E402
    TargetingSchedule,
    TargetingScheduler,
    SweepResult,
    combine_sweeps,
    patch_model,
    plot_sweeps,
    prune_sweep,
)
from translation_data import (  # noqa: E402 - the helper module beside this script
    TokenBudgetBatchSampler,
    load_translation_splits,
    train_joint_tokenizer,
)

logger = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# model and tokenizer
# --------------------------------------------------------------------------------------------------


def build_model(args, tokenizer):
    """Pretrained seq2seq model, or a MarianMTModel built from ``args.model_preset``."""
    if args.model_name_or_path:
        # float32 whatever the checkpoint's dtype (a float16 save is trained and evaluated in float32)
        return AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    preset = {k: v for k, v in MODEL_PRESETS[args.model_preset].items() if k not in TRAINING_PRESET_KEYS}
    if args.dropout is not None:
        preset["dropout"] = args.dropout
    config = MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), max_position_embeddings=max(
            args.max_source_length, args.max_target_length) + 2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        activation_function="relu", **preset)
    model = MarianMTModel(config)
    model.generation_config.bad_words_ids = None
    return model


def get_tokenizer(args, raw):
    if args.tokenizer_name or args.model_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    # Deterministic: every process trains the same vocabulary on the same data.
    logger.info(f"Training a joint BPE vocabulary of {args.vocab_size} on {len(raw['train'])} pairs")
    return train_joint_tokenizer(raw["train"], [args.source_lang, args.target_lang], args.vocab_size)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def make_eval_dataloader(dataset, collator, args, accelerator):
    """Length-sorted (fast generation) eval loader; ``idx`` keeps the original order."""
    dataset = dataset.sort("src_len", reverse=True)
    loader = DataLoader(dataset.remove_columns(["src_len"]), collate_fn=collator, batch_size=args.per_device_eval_batch_size)
    return accelerator.prepare(loader)


def generation_budget(attention_mask, args) -> int:
    """New-token limit for one batch, ``min(max_target_length, floor(a * longest source) + b)`` (fairseq's
    ``--max-len-a/--max-len-b``). ``attention_mask``: (batch, source_len)."""
    longest = int(attention_mask.sum(dim=1).max()) if attention_mask.numel() else 0
    return max(1, min(args.max_target_length, int(args.max_length_a * longest) + args.max_length_b))


@torch.no_grad()
def evaluate(model, loader, tokenizer, references, sources, args, accelerator, translations_path=None):
    """Corpus sacreBLEU (detokenised) and teacher-forced per-token accuracy on one split.

    Returns ``{"bleu": ..., "token_accuracy": ...}`` on every process; the main process writes
    ``translations_path`` (TSV: source, reference, hypothesis in the split's order)."""
    import sacrebleu

    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    hyps: dict[int, str] = {}
    correct = total = 0
    gen_kwargs = dict(num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=True)
    for batch in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
        labels = batch["labels"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=unwrapped.prepare_decoder_input_ids_from_labels(labels=labels))
        mask = labels.ne(-100)
        per_example = torch.stack([(out.logits.argmax(-1).eq(labels) & mask).sum(1), mask.sum(1)], dim=1)
        per_example = accelerator.gather_for_metrics(per_example)
        correct += int(per_example[:, 0].sum())
        total += int(per_example[:, 1].sum())
        generated = unwrapped.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=generation_budget(batch["attention_mask"], args), **gen_kwargs)
        generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
        generated, idx = accelerator.gather_for_metrics((generated, batch["idx"]))
        for i, text in zip(idx.tolist(), tokenizer.batch_decode(generated, skip_special_tokens=True)):
            hyps[i] = text.strip()
    if len(hyps) != len(references):
        raise RuntimeError(f"Got {len(hyps)} translations for {len(references)} references.")
    ordered = [hyps[i] for i in range(len(references))]
    bleu = sacrebleu.BLEU()
    score = bleu.corpus_score(ordered, [references])
    if translations_path is not None and accelerator.is_main_process:
        Path(translations_path).parent.mkdir(parents=True, exist_ok=True)
        with open(translations_path, "w", encoding="utf-8") as f:
            f.write("source\treference\thypothesis\n")
            for s, r, h in zip(sources, references, ordered):
                f.write(f"{s}\t{r}\t{h}\n")
    return {"bleu": score.score, "token_accuracy": correct / max(total, 1)}, bleu.get_signature()


@torch.no_grad()
def validation_metrics(model, loader, args, accelerator) -> dict:
    """Teacher-forced loss (label-smoothed, as in training, and plain) and per-token accuracy on one
    split: a cheap learning curve, logged at the end of every epoch."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=unwrapped.prepare_decoder_input_ids_from_labels(labels=labels)).logits.float()
        flat, target = logits.view(-1, logits.size(-1)), labels.view(-1)
        mask = labels.ne(-100)
        smoothed = torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="none",
                                                     label_smoothing=args.label_smoothing).view_as(labels)
        nll = torch.nn.functional.cross_entropy(flat, target, ignore_index=-100, reduction="none").view_as(labels)
        correct = logits.argmax(-1).eq(labels) & mask
        per_example = torch.stack([smoothed.sum(1), nll.sum(1), correct.sum(1).float(), mask.sum(1).float()], dim=1)
        totals += accelerator.gather_for_metrics(per_example).double().sum(0).cpu()  # each example once
    n = max(float(totals[3]), 1.0)
    return {"validation_loss": round(float(totals[0]) / n, 4), "validation_nll": round(float(totals[1]) / n, 4),
            "validation_token_accuracy": round(float(totals[2]) / n, 4)}


def run_name_of(args):
    if args.run_name:
        return args.run_name
    if getattr(args, "method_spec", None) is not None:
        return args.method_spec.label
    return "none" if args.td_mode == "none" else f"targeted α={args.td_alpha:g} γ={args.td_gamma:g}"


def combine_runs(args):
    """Write paper-shaped tables (rows = prune %, columns = runs) for every split/mode/metric."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    found: dict[str, list] = {}
    for run_dir in args.combine_runs:
        files = sorted(Path(run_dir).glob("sweeps/sweep-*.json"))
        if not files:
            raise FileNotFoundError(f"--combine_runs: no sweeps/sweep-*.json in {run_dir!r} (is the run finished?).")
        for f in files:
            found.setdefault(f.stem, []).append(SweepResult.from_json(f))
    names = [SweepResult.from_json(next(Path(d).glob("sweeps/sweep-*.json"))).run_name for d in args.combine_runs]
    if len(set(names)) != len(names):  # same run names: label the columns by run folder (then by position)
        names = [f"{Path(d).name}: {n}" for d, n in zip(args.combine_runs, names)]
        if len(set(names)) != len(names):
            names = [f"{i + 1}. {n}" for i, n in enumerate(names)]
    summary = {}
    for stem, results in sorted(found.items()):
        if len(results) != len(args.combine_runs):
            # no Accelerator here (combining runs starts none): the standard library's logger
            logging.getLogger(__name__).warning(f"{stem}: only {len(results)} of {len(args.combine_runs)} runs have it; "
                                                "skipped")
            continue
        for metric in results[0].metric_names():
            table = combine_sweeps(results, metric, labels=names)
            name = f"{stem.replace('sweep-', 'table-')}-{metric}"
            (out / f"{name}.md").write_text(table.to_markdown(float_format=".2f" if metric == "bleu" else ".4f") + "\n")
            table.to_csv(out / f"{name}.csv")
            table.to_json(out / f"{name}.json")
            summary[name] = table.to_dict()
        plot_sweeps(results, out / f"{stem.replace('sweep-', 'plot-')}.png", labels=names, title=stem.replace("sweep-", ""))
        print(f"\n## {stem}\n")
        for metric in results[0].metric_names():
            print(combine_sweeps(results, metric, labels=names).to_markdown(float_format=".2f" if metric == "bleu" else ".4f"), "\n")
    return summary


# --------------------------------------------------------------------------------------------------
# the steps of a run
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_transformers_progress_bars():
    """Hide transformers' own progress bars inside the block, e.g. the "Writing model shards" bar of
    ``save_pretrained``, which would otherwise interleave with the training / sweep bars in a log
    file. The script's own bars (``tqdm.auto``) are not affected; the previous setting comes back
    afterwards."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def tied_tensor_names(model) -> set[str]:
    """Names of the ``state_dict`` entries that share their storage with another entry: tied weights,
    e.g. a Marian model's shared source / target embeddings and output head."""
    groups: dict = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            groups.setdefault(id_tensor_storage(tensor), []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}


class _TiedWeightsNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" warning when every tensor it
    names is one of ``tied`` (see :func:`quiet_tied_weights_notice`); lets everything else through."""

    PATTERN = re.compile(r"Removed shared tensor (\{.*?\}) while saving")

    def __init__(self, tied: set[str]):
        super().__init__()
        self.tied = tied

    def filter(self, record: logging.LogRecord) -> bool:
        match = self.PATTERN.search(record.getMessage())  # after accelerate's "[RANK 0] " prefix
        if match is None:
            return True
        try:
            removed = ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError):
            return True
        return not set(removed) <= self.tied


@contextlib.contextmanager
def quiet_tied_weights_notice(model):
    """Inside the block, no "Removed shared tensor ... check by verifying that you don't receive any
    warning while reloading" from accelerate for ``model``'s tied weights.

    ``Accelerator.save_state`` writes safetensors, which hold one name per tensor: of each group of
    tied weights it keeps one name and warns about the others, at every checkpoint. For weights tied
    in the model that is expected: ``load_state`` ties them again (the resume test checks that a
    resumed run matches an uninterrupted one). The warning still shows when it names any other
    tensor."""
    notice = _TiedWeightsNotice(tied_tensor_names(model))
    accelerate_logger = logging.getLogger("accelerate.utils.other")  # where save_state's warning comes from
    accelerate_logger.addFilter(notice)
    try:
        yield
    finally:
        accelerate_logger.removeFilter(notice)


def save_training_state(accelerator, model, path: Path) -> None:
    """``accelerator.save_state(path)`` (model, optimizer, LR and targeting schedules, RNG states),
    without the expected warning about tied weights (:func:`quiet_tied_weights_notice`)."""
    with quiet_tied_weights_notice(model):
        accelerator.save_state(str(path))


def setup_accelerator(args) -> Accelerator:
    # A seedable sampler makes the shuffling a function of (seed, epoch), so a resumed run sees the
    # same batches as an uninterrupted one.
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def load_data(args) -> datasets.DatasetDict:
    """Step 1: the raw splits, checked (files exist, parallel files align, languages present, splits
    non-empty, a train split when training or training a tokenizer). Raises :class:`InputError`."""
    try:
        raw = load_translation_splits(
            source_lang=args.source_lang, target_lang=args.target_lang, dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name, train_files=args.train_files,
            validation_files=args.validation_files, test_files=args.test_files, cache_dir=args.cache_dir,
            max_samples={"train": args.max_train_samples, "validation": args.max_eval_samples,
                         "test": args.max_test_samples})
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    except ConnectionError as err:  # the hub's data set, offline or unreachable
        raise InputError(f"--dataset_name {args.dataset_name}: {err}. Give local files with --train_files / "
                         "--validation_files / --test_files.") from None
    if args.do_train and "train" not in raw:
        raise InputError("training needs a train split: give --train_files (or a --dataset_name with a train "
                         "split), or evaluate only with --no-do_train --model_name_or_path DIR.")
    if not (args.tokenizer_name or args.model_name_or_path) and "train" not in raw:
        raise InputError("training a tokenizer needs training data: give --train_files (or a --dataset_name with "
                         "a train split) or a pretrained --tokenizer_name.")
    if args.do_sweep and not any(s in raw for s in args.eval_splits):
        raise InputError(f"--eval_splits {' '.join(args.eval_splits)}: the data has only {sorted(raw)}; give "
                         "--validation_files / --test_files, other --eval_splits, or --no-do_sweep.")
    missing = [s for s in args.eval_splits if s not in raw] if args.do_sweep else []
    if missing:
        logger.warning(f"No data for eval split(s) {missing}; they are skipped")
    return raw


def build_tokenizer_and_model(args, raw):
    """Step 2: the tokenizer (pretrained, or a joint BPE vocabulary trained on the training text) and
    the model, patched with targeted dropout unless ``--td_mode none``. Raises :class:`InputError`."""
    try:
        tokenizer = get_tokenizer(args, raw)
    except OSError as err:
        flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
        raise InputError(f"{flag} {args.tokenizer_name or args.model_name_or_path}: cannot load a tokenizer "
                         f"({err}).") from None
    try:
        model = build_model(args, tokenizer)
    except OSError as err:
        raise InputError(f"--model_name_or_path {args.model_name_or_path}: cannot load a seq2seq model ({err}).") from None
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"Model: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    if args.td_mode != "none":
        try:
            patch_model(model, alpha=args.td_alpha, gamma=args.td_gamma, mode=args.td_mode,
                        target_modules=args.td_target_modules)
        except ValueError as err:
            raise InputError(f"--td_target_modules: {err}" if args.td_target_modules else str(err)) from None
    if args.method_spec is not None and args.do_train:
        # dataset_size: L0's expected-L0 cost and the variational KL are divided by the training-set size
        config = args.method_spec.config(dataset_size=len(raw["train"]), target_modules=args.td_target_modules)
        try:
            patch_model(model, config=config)
        except ValueError as err:
            raise InputError(f"--method {args.method}: {err}") from None
    return tokenizer, model


def prepare_output_dir(args, accelerator) -> Path:
    """The first write of a run: ``--output_dir`` and its ``args.json``."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        saved = {k: v for k, v in vars(args).items() if k != "method_spec"}  # --method is the spec
        (output_dir / "args.json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return output_dir


def tokenize_splits(args, raw, tokenizer, accelerator):
    """Token ids of every split (``idx`` keeps each example's position, ``src_len`` sorts eval batches)."""
    src, tgt, prefix = args.source_lang, args.target_lang, args.source_prefix

    def preprocess(examples, indices):
        sources = [prefix + ex[src] for ex in examples["translation"]]
        targets = [ex[tgt] for ex in examples["translation"]]
        enc = tokenizer(sources, text_target=targets, max_length=args.max_source_length, truncation=True)
        if args.max_target_length != args.max_source_length:
            labels = tokenizer(text_target=targets, max_length=args.max_target_length, truncation=True)
            enc["labels"] = labels["input_ids"]
        enc["idx"] = indices
        enc["src_len"] = [len(x) for x in enc["input_ids"]]
        return enc

    with accelerator.main_process_first():
        processed = {
            split: raw[split].map(preprocess, batched=True, with_indices=True, remove_columns=["translation"],
                                  num_proc=args.preprocessing_num_workers, desc=f"Tokenising {split}")
            for split in raw}
    collator = DataCollatorForSeq2Seq(tokenizer, model=None, label_pad_token_id=-100,
                                      pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    return processed, collator


def resume_position(args, accelerator, output_dir: Path, updates_per_epoch: int):
    """Load ``--resume_from_checkpoint``'s state; returns (completed updates, epoch, micro-batches to skip)."""
    path = args.resume_from_checkpoint
    if path == "latest":
        path = str(max(checkpoint_dirs(output_dir), key=os.path.getmtime))
    accelerator.print(f"Resumed from checkpoint: {path}")
    accelerator.load_state(path)
    name = Path(path).name
    if name.startswith("epoch_"):
        starting_epoch = int(name.split("_")[1]) + 1
        return starting_epoch * updates_per_epoch, starting_epoch, None
    completed_steps = int(name.split("_")[1])
    return (completed_steps, completed_steps // updates_per_epoch,
            (completed_steps % updates_per_epoch) * args.gradient_accumulation_steps)


def train(args, model, tokenizer, processed, collator, accelerator, output_dir: Path):
    """Step 3: train with the targeting schedule, checkpoint, save the final (unpruned) model.

    Returns the model prepared by ``accelerator``."""
    lr, warmup = args.learning_rate, args.num_warmup_steps  # the preset's unless given (apply_preset_defaults)
    n_params = sum(p.numel() for p in model.parameters())
    train_set = processed["train"]
    # Own generator: starting an epoch's iterator must not draw from the global RNG (which drives
    # dropout / targeted-dropout masks and is restored exactly by load_state).
    generator = torch.Generator().manual_seed(args.seed)
    batch_sampler = None
    if args.max_tokens_per_batch:
        lengths = [max(s, len(t)) for s, t in zip(train_set["src_len"], train_set["labels"])]
        batch_sampler = TokenBudgetBatchSampler(lengths, args.max_tokens_per_batch, seed=args.seed)
        train_set = train_set.remove_columns(["idx", "src_len"])
        train_loader = DataLoader(train_set, batch_sampler=batch_sampler, collate_fn=collator, generator=generator)
    else:
        train_set = train_set.remove_columns(["idx", "src_len"])
        train_loader = DataLoader(train_set, shuffle=True, collate_fn=collator,
                                  batch_size=args.per_device_train_batch_size, generator=generator)
    valid_loader = None
    if args.epoch_validation and "validation" in processed:
        valid_loader = make_eval_dataloader(processed["validation"], collator, args, accelerator)
    spec = args.method_spec
    # gates, log σ², switches: groups of their own (the method's learning rate, never weight-decayed)
    method_groups = hf_tdrop.method_parameter_groups(model)
    extra = {id(p) for group in method_groups for p in group["params"]}
    decay = 0.0 if spec is not None and spec.method == "variational_dropout" else args.weight_decay  # the reference's
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in extra]}, *method_groups],
                                  lr=lr, betas=(0.9, args.adam_beta2), eps=1e-9, weight_decay=decay)
    # Like run_translation_no_trainer: count updates after sharding across processes.
    updates_per_epoch = math.ceil(math.ceil(len(train_loader) / accelerator.num_processes)
                                  / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if spec is not None and spec.kl_warmup_fraction:
        set_kl_warmup(model, max(1, round(spec.kl_warmup_fraction * max_train_steps)))
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=warmup * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_loader, lr_scheduler = accelerator.prepare(model, optimizer, train_loader, lr_scheduler)
    updates_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    td_scheduler = None
    if args.td_mode != "none":
        schedule = TargetingSchedule(alpha=args.td_alpha, gamma=args.td_gamma, kind=args.td_schedule,
                                     ramp_steps=args.td_ramp_steps if args.td_schedule != "constant" else None,
                                     ramp_fraction=args.td_ramp_fraction if args.td_schedule != "constant" else None,
                                     delay_steps=args.td_delay_steps)
        td_scheduler = TargetingScheduler(model, schedule, total_steps=max_train_steps)
        accelerator.register_for_checkpointing(td_scheduler)
    checkpointing_steps = args.checkpointing_steps
    if checkpointing_steps is not None and checkpointing_steps != "epoch":
        checkpointing_steps = int(checkpointing_steps)  # validated by validate_args

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_set)}")
    logger.info(f"  Num Epochs = {num_epochs}")
    if batch_sampler is None:
        logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
        logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}")
    else:
        logger.info(f"  Batches by length: at most {args.max_tokens_per_batch} padded tokens per device, "
                    f"{len(batch_sampler)} batches per epoch")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {max_train_steps}")
    logger.info(f"  Targeted dropout: {args.td_mode}" + (
        "" if td_scheduler is None else f" ({td_scheduler.schedule.to_dict()})"))

    completed_steps, starting_epoch, resume_step = 0, 0, None
    if args.resume_from_checkpoint:
        completed_steps, starting_epoch, resume_step = resume_position(args, accelerator, output_dir, updates_per_epoch)

    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process, desc="train")
    progress_bar.update(completed_steps)
    history, validation_history = [], []
    running, running_n, running_reg = 0.0, 0, 0.0
    t_train = time.time()
    for epoch in range(starting_epoch, num_epochs):
        if completed_steps >= max_train_steps:  # resumed from a state at (or past) the last update
            break
        model.train()
        loader = train_loader
        if resume_step is not None and epoch == starting_epoch:
            loader = accelerator.skip_first_batches(train_loader, resume_step)
        if batch_sampler is not None:  # the epoch's batches are a function of (seed, epoch), also when resumed
            batch_sampler.set_epoch(epoch)
            loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                labels = batch["labels"]
                decoder_input_ids = accelerator.unwrap_model(model).prepare_decoder_input_ids_from_labels(labels=labels)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               decoder_input_ids=decoder_input_ids).logits
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1),
                                                         ignore_index=-100, label_smoothing=args.label_smoothing)
                if spec is not None:  # the method's loss term; accelerate divides each micro-batch's by the accumulation
                    regularization = hf_tdrop.regularization_loss(model, step=completed_steps)
                    running_reg += regularization.detach().float().item()
                    accelerator.backward(loss + regularization)
                else:
                    accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            running += loss.detach().float().item()
            running_n += 1
            if accelerator.sync_gradients:
                completed_steps += 1
                progress_bar.update(1)
                if td_scheduler is not None:
                    td_scheduler.step()
                if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                    mean = accelerator.gather(torch.tensor([running / max(running_n, 1)],
                                                           device=accelerator.device)).mean().item()
                    entry = {"step": completed_steps, "epoch": epoch, "loss": round(mean, 4),
                             "lr": lr_scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t_train, 1)}
                    if td_scheduler is not None:
                        entry.update(td_scheduler.get_last_targeting())
                    if spec is not None:
                        entry["regularization_loss"] = round(running_reg / max(running_n, 1), 6)
                    history.append(entry)
                    logger.info(json.dumps(entry))
                    progress_bar.set_postfix(loss=f"{mean:.3f}")
                    running, running_n, running_reg = 0.0, 0, 0.0
                if isinstance(checkpointing_steps, int) and completed_steps % checkpointing_steps == 0:
                    save_training_state(accelerator, model, output_dir / f"step_{completed_steps}")
            if completed_steps >= max_train_steps:
                break
        if valid_loader is not None:
            entry = {"epoch": epoch, "step": completed_steps, **validation_metrics(model, valid_loader, args, accelerator),
                     "elapsed_s": round(time.time() - t_train, 1)}
            validation_history.append(entry)
            logger.info(json.dumps(entry))
            model.train()
        if checkpointing_steps == "epoch":
            save_training_state(accelerator, model, output_dir / f"epoch_{epoch}")
        if completed_steps >= max_train_steps:
            break
    progress_bar.close()
    train_seconds = time.time() - t_train
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if spec is not None:
        # fold the method's extra tensors into the weights and keep its learned pruning order (for
        # the sweeps): the saved checkpoint is plain, and the sweeps prune the model as saved
        hf_tdrop.finalize_model(unwrapped)
    if args.save_dtype != "float32":
        # round to the saved dtype (and back) so that the sweeps measure exactly the saved model
        with torch.no_grad():
            for p in unwrapped.parameters():
                p.copy_(p.to(getattr(torch, args.save_dtype)))
    if accelerator.is_main_process:
        with no_transformers_progress_bars():
            if args.save_dtype == "float32":
                unwrapped.save_pretrained(output_dir, save_function=accelerator.save)
            else:
                unwrapped.to(getattr(torch, args.save_dtype)).save_pretrained(output_dir, save_function=accelerator.save)
                unwrapped.to(torch.float32)
            tokenizer.save_pretrained(output_dir)
        (output_dir / "train_history.json").write_text(json.dumps(
            {"history": history, "epoch_validation": validation_history, "train_seconds": train_seconds, "completed_steps": completed_steps,
             "num_processes": accelerator.num_processes, "parameters": n_params}, indent=2) + "\n")
    logger.info(f"Training done in {train_seconds:.0f}s ({completed_steps} updates); model saved to {output_dir}")
    return model


def set_kl_warmup(model, steps: int) -> None:
    """Variational dropout's KL warm-up, in updates, on every patched layer (``--method vd:S:WARMUP``
    gives it as a fraction of the updates, known only once the data loader is built)."""
    from hf_tdrop.layers import METHOD_ATTR
    from hf_tdrop.methods.base import method_layers

    for _, layer in method_layers(model):
        getattr(layer, METHOD_ATTR).config.kl_warmup_steps = steps


def sweep_criterion(model, mode: str) -> str:
    """The pruning criterion of a sweep: the learned one the finalised model carries for ``mode``
    (L0 ``gates``, variational ``log_alpha``; weight mode), else ``magnitude``."""
    from hf_tdrop.methods.base import CRITERION_ATTR

    for module in model.modules():
        learned = module.__dict__.get(CRITERION_ATTR)
        if learned is not None and learned.granularity == mode:
            return learned.name
    return "magnitude"


def run_sweeps(args, model, tokenizer, raw, processed, collator, accelerator, output_dir: Path) -> dict:
    """Step 4: at every level of ``--sweep_sparsities``, for every ``--sweep_modes`` and eval split:
    sacreBLEU and token accuracy; writes sweeps/ and translations/. Returns the summary."""
    run_name = run_name_of(args)
    src, tgt = args.source_lang, args.target_lang
    summary = {"run_name": run_name, "sweeps": {}}
    eval_splits = [s for s in args.eval_splits if s in raw] if args.do_sweep else []
    for split in eval_splits:
        loader = make_eval_dataloader(processed[split], collator, args, accelerator)
        references = [ex[tgt] for ex in raw[split]["translation"]]
        sources = [ex[src] for ex in raw[split]["translation"]]
        for mode in args.sweep_modes:
            levels = list(args.sweep_sparsities)
            calls = iter(levels)
            signature = {}

            def evaluate_fn(m, split=split, mode=mode, loader=loader, references=references, sources=sources,
                            calls=calls, signature=signature):
                level = next(calls)
                path = output_dir / "translations" / f"{split}-{mode}-{round(100 * level):02d}.tsv"
                metrics, sig = evaluate(model, loader, tokenizer, references, sources, args, accelerator, path)
                signature["sacrebleu"] = sig
                logger.info(f"[{split}] {mode} pruning {100 * level:.0f}%: BLEU {metrics['bleu']:.2f}, "
                            f"token accuracy {metrics['token_accuracy']:.4f}")
                return metrics

            t0 = time.time()
            criterion = sweep_criterion(accelerator.unwrap_model(model), mode)
            result = prune_sweep(accelerator.unwrap_model(model), evaluate_fn, levels, mode=mode, run_name=run_name,
                                 method=criterion, progress=accelerator.is_local_main_process)
            seconds = time.time() - t0
            logger.info(f"sacreBLEU signature: {signature.get('sacrebleu')}")
            if accelerator.is_main_process:
                result.save(output_dir / "sweeps", prefix=SWEEP_FILE.format(split=split, mode=mode))
                accelerator.print(f"\n[{split}, {len(references)} sentences, {mode} pruning, {run_name}]\n{result}\n")
            summary["sweeps"][f"{split}-{mode}"] = {"n_sentences": len(references), "seconds": round(seconds, 1),
                                                    "sacrebleu_signature": signature.get("sacrebleu"),
                                                    **result.to_dict()}
        accelerator.wait_for_everyone()
    return summary


def export(args, model, tokenizer, accelerator, output_dir: Path) -> None:
    """Step 5 (``--push_to_hub``): push the model pruned to ``--push_sparsity`` with the tokenizer and
    the sweeps in its model card."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return
    from hf_tdrop import prune_model
    from hf_tdrop.hub import push_pruned_to_hub

    unwrapped = accelerator.unwrap_model(model)
    report = prune_model(unwrapped, args.push_sparsity, mode=args.push_mode)
    sweeps = [SweepResult.from_json(f) for f in sorted((output_dir / "sweeps").glob("sweep-*.json"))] or None
    with no_transformers_progress_bars():
        info = push_pruned_to_hub(unwrapped, args.hub_model_id, tokenizer_or_processor=tokenizer, sweep=sweeps,
                                  prune_report=report, base_model=args.model_name_or_path)
    logger.info(f"Pushed to {info.commit_url}")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv=None, args=None):
    """Run the script on the command line ``argv`` (default: ``sys.argv``), or on ``args`` already
    parsed by :func:`parse_args`."""
    if args is None:
        args = parse_args(argv)  # flag errors: one line, exit status 2
    if args.combine_runs:
        logging.basicConfig(format="%(message)s", level=logging.INFO)
        combine_runs(args)
        return
    accelerator = setup_accelerator(args)
    set_seed(args.seed)
    t_start = time.time()
    try:  # data and model errors: one line, exit status 2, nothing written yet
        raw = load_data(args)
        tokenizer, model = build_tokenizer_and_model(args, raw)
    except InputError as err:
        fail(str(err))
    logger.info(accelerator.state, main_process_only=False)
    output_dir = prepare_output_dir(args, accelerator)
    processed, collator = tokenize_splits(args, raw, tokenizer, accelerator)
    if args.do_train:
        model = train(args, model, tokenizer, processed, collator, accelerator, output_dir)
    else:
        model = accelerator.prepare(model)
    summary = run_sweeps(args, model, tokenizer, raw, processed, collator, accelerator, output_dir)
    summary["total_seconds"] = round(time.time() - t_start, 1)
    if accelerator.is_main_process:
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    export(args, model, tokenizer, accelerator, output_dir)
    accelerator.end_training()


if __name__ == "__main__":
    main(args=ARGS)
