"""The command line of ``wmt_en_de.py``: its presets, flags, defaults and checks.

Imports neither torch, datasets, accelerate nor ``hf_tdrop``: ``--help`` and a bad flag answer at
once (``--method`` is parsed by ``run_specs.py``, which is as light). The script imports the heavy
modules after :func:`parse_args` has returned.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

from transformers import HfArgumentParser

from cli_args import HELP_WIDTH, OneSpellingHelp, arg

DESCRIPTION = "Targeted dropout on WMT14 English->German (Gomez et al., 2019, Table 5), with 🤗 Accelerate."
"""The first line of the script's docstring, the start of --help."""

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


class _HelpFormatter(OneSpellingHelp, argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks; wraps to the terminal, at most :data:`HELP_WIDTH` columns; shows
    each flag in one spelling, the snake_case one (the kebab-case alias that HfArgumentParser adds,
    e.g. ``--td-mode``, is still accepted); shows a flag's default unless it is None (then the help
    text says what is used instead); a ``--no_*`` switch is described as its flag set to false."""

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
    p = _Parser(ARGUMENT_CLASSES, prog=PROG, usage=USAGE, description=DESCRIPTION, epilog=EXAMPLES,
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
    from run_specs import RunSpecError, parse_run_spec  # beside this script; as light as this module

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
