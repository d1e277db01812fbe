#!/usr/bin/env python
"""Train image classifiers with targeted dropout, then sweep weight and unit pruning (paper §5.1).

Reproduces the image experiments of Gomez et al. (2019), "Learning Sparse Networks Using Targeted
Dropout" (ResNet-32 on CIFAR-10; weight- and unit-pruning tables), with ``transformers.Trainer``:

1. For every run (e.g. ``none``, ``weight:0.75:0.9``, ``unit:0.9:0.75``, or a baseline such as
   ``l0:unit:1e-3``; grammar in ``run_specs.py``): build the model, patch it with
   :func:`hf_tdrop.patch_model` (unless ``none``), train it with ``Trainer`` and
   :class:`hf_tdrop.TargetedDropoutCallback` (α/γ schedule) or :class:`hf_tdrop.RegularizationCallback`
   (loss terms), finalise a method run (:func:`hf_tdrop.finalize_model`), save it (a plain HF checkpoint).
2. Sweep pruning 0..90 % (weight and unit; magnitude, or the run's learned criterion) of every run on the test split with
   :func:`hf_tdrop.prune_sweep` and write per-run tables plus the combined, paper-shaped tables
   (rows = prune %, columns = runs) as Markdown/CSV/JSON and a plot into ``--output_dir``.

Examples::

    # embedded default (offline, a few minutes on 2 CPU cores): digits, MLP, none vs weight-TD vs unit-TD
    python examples/image_classification.py

    # the paper's baselines side by side on digits (dropout, L1, L0, variational dropout, Smallify, the
    # random-target control, ramped TD, random pruning before training; about 3 minutes on 2 CPU cores)
    python examples/image_classification.py --preset digits-baselines

    # any methods as run specs, each swept by its own pruning criterion
    python examples/image_classification.py --runs none,l1:0.01,l0:unit:1e-3,vd,weight:0.99:0.99:ramp,randinit:weight:0.9

    # CIFAR-10 from a local copy in the hub's schema, ResNet-32, a short CPU schedule
    python examples/image_classification.py --preset cifar10-cpu \\
        --train_file ../shared/data/cifar10/train.parquet --test_file ../shared/data/cifar10/test.parquet

    # the paper's schedule on the hub's CIFAR-10, 4 GPUs
    accelerate launch --num_processes 4 examples/image_classification.py --preset paper

    # DDP on CPU (gloo): accelerate 1.15's `launch --cpu --num_processes N` starts a single process,
    # `--multi_gpu` with ACCELERATE_USE_CPU=1 starts N workers
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/image_classification.py

    # your own images (imagefolder layout: DIR/train/<class>/*.png, DIR/test/<class>/*.png)
    python examples/image_classification.py --dataset imagefolder --data_dir DIR --model resnet32 --image_size 32

Run ``--help`` for every flag. Works under ``python`` and ``accelerate launch`` (DDP): training is
distributed by ``Trainer``; the pruning sweep runs on the main process.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

# Only what the command line needs: torch, transformers' Trainer and models, hf_tdrop and the data
# helpers are imported after the flags are parsed (below), so that --help and flag errors answer at once.
from transformers import HfArgumentParser

logger = logging.getLogger("image_classification")

DEFAULT_OUTPUT_DIR = "outputs/image_classification"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
FINETUNE_BASE = Path(__file__).resolve().parents[1] / "results/image_classification/cifar10-cpu/models/none"
"""The cifar10-cpu-finetune preset's starting point: the committed unregularised ResNet-20."""
DEFAULT_RUNS = "none,weight:0.75:0.9,unit:0.9:0.75"
TABLE7_WEIGHT_LEVELS = (0.5, 0.75, 0.9, 0.99)
TABLE7_UNIT_LEVELS = (0.75, 0.85, 0.9, 0.95)
BASELINE_RUNS = ",".join([
    "none", "dropout:weight:0.5", "dropout:unit:0.5", "l1:0.1", "l0:weight:0.1", "l0:unit:0.1", "vd:1",
    "smallify:1e-4", "random:weight:0.75:0.9", "weight:0.75:0.9", "unit:0.9:0.75", "weight:0.99:0.99:ramp",
    "unit:0.99:0.95:ramp", *(f"randinit:weight:{s:g}" for s in TABLE7_WEIGHT_LEVELS),
    *(f"randinit:unit:{s:g}" for s in TABLE7_UNIT_LEVELS),
])
"""The digits-baselines preset's runs: every method next to targeted dropout, plus the Table 7 runs."""

# Presets fill in defaults; any flag given on the command line wins.
PRESETS = {
    # The embedded default: offline, finishes in a few minutes on 2 CPU cores.
    "cpu-small": dict(
        dataset="digits", model="mlp", mlp_hidden_sizes="256,256", runs=DEFAULT_RUNS,
        num_train_epochs=30.0, per_device_train_batch_size=32, learning_rate=0.05, lr_scheduler_type="cosine",
        weight_decay=2e-4, optim="sgd", momentum=0.9, warmup_steps=0.0,
    ),
    # The paper's baselines side by side on digits (cpu-small's model, optimiser and 30 epochs; about
    # 3 minutes on 2 CPU cores): none, untargeted weight/unit dropout, L1, L0 weight/unit, variational
    # dropout, Smallify, the random-target control, weight/unit targeted dropout, ramped targeted
    # dropout, and random pruning before training at the paper's Table 7 levels.
    "digits-baselines": dict(
        dataset="digits", model="mlp", mlp_hidden_sizes="256,256", runs=BASELINE_RUNS,
        num_train_epochs=30.0, per_device_train_batch_size=32, learning_rate=0.05, lr_scheduler_type="cosine",
        weight_decay=2e-4, optim="sgd", momentum=0.9, warmup_steps=0.0, schedule="constant", ramp_fraction=0.25,
        method_learning_rate=0.01,
    ),
    # A ResNet-20 of the paper's family on CIFAR-10 that converges within about 45 minutes a run on a
    # 2-core CPU (12 epochs, 4,692 steps): one-cycle-like schedule (linear warm-up over the first
    # quarter, cosine decay), Nesterov SGD, label smoothing, gradient clipping, channels-last;
    # targeted-dropout runs ramp α/γ with the reference's piecewise schedule, targets reached at 25 %.
    "cifar10-cpu": dict(
        dataset="cifar10", model="resnet32", resnet_blocks_per_stage=3, runs="none,weight:0.75:0.9,unit:0.9:0.75",
        num_train_epochs=12.0, per_device_train_batch_size=128, learning_rate=0.2, lr_scheduler_type="cosine",
        weight_decay=5e-4, optim="sgd", momentum=0.9, nesterov=True, warmup_steps=0.25,
        label_smoothing_factor=0.1, max_grad_norm=1.0, channels_last=True, schedule="piecewise",
        ramp_fraction=0.125, method_learning_rate=0.01,
    ),
    # Targeted dropout as a fine-tuning step for a trained model (the recommended route when you have
    # one): the committed unregularised cifar10-cpu ResNet-20 fine-tuned for 3 epochs (a quarter of
    # its budget) with ramped weight and unit targeted dropout, lr 0.02 cosine without warm-up, the
    # rest as cifar10-cpu. Point --model_name_or_path at your own checkpoint.
    "cifar10-cpu-finetune": dict(
        dataset="cifar10", model_name_or_path=str(FINETUNE_BASE), runs="weight:0.75:0.9,unit:0.9:0.75",
        num_train_epochs=3.0, per_device_train_batch_size=128, learning_rate=0.02, lr_scheduler_type="cosine",
        weight_decay=5e-4, optim="sgd", momentum=0.9, nesterov=True, warmup_steps=0.0,
        label_smoothing_factor=0.1, max_grad_norm=1.0, channels_last=True, schedule="piecewise",
        ramp_fraction=0.125, method_learning_rate=0.01,
    ),
    # The CPU recipe's GPU counterpart: 30 epochs at batch 512, the decoded images kept on the GPU and
    # augmented there, bf16 autocast, channels-last; sized for three runs in minutes on one H100.
    "cifar10-gpu": dict(
        dataset="cifar10", model="resnet32", resnet_blocks_per_stage=3, runs="none,weight:0.75:0.9,unit:0.9:0.75",
        num_train_epochs=30.0, per_device_train_batch_size=512, learning_rate=0.4, lr_scheduler_type="cosine",
        weight_decay=5e-4, optim="sgd", momentum=0.9, nesterov=True, warmup_steps=0.15,
        label_smoothing_factor=0.1, max_grad_norm=1.0, channels_last=True, bf16=True, data_on_device=True,
        schedule="piecewise", ramp_fraction=0.125, per_device_eval_batch_size=1000,
    ),
    # The paper's schedule (reference code's ResNet hparams): ResNet-32, batch 128, SGD momentum 0.9,
    # weight decay 2e-4, label smoothing 0.1, gradient clipping 1.0, 256 epochs (cosine decay here
    # instead of the reference's x0.1 steps). Meant for GPUs.
    "paper": dict(
        dataset="cifar10", model="resnet32", resnet_blocks_per_stage=5, runs="none,weight:0.75:0.9,unit:0.9:0.75",
        num_train_epochs=256.0, per_device_train_batch_size=128, learning_rate=0.1, lr_scheduler_type="cosine",
        weight_decay=2e-4, optim="sgd", momentum=0.9, nesterov=False, warmup_steps=0.0,
        label_smoothing_factor=0.1, max_grad_norm=1.0, schedule="piecewise", ramp_fraction=0.125,
    ),
}
FALLBACK_DEFAULTS = dict(
    dataset=None, model="resnet32", mlp_hidden_sizes="256,256", runs=None, num_train_epochs=3.0,
    per_device_train_batch_size=128, learning_rate=0.1, lr_scheduler_type="cosine", weight_decay=2e-4,
    optim="sgd", momentum=0.9, warmup_steps=0.0, nesterov=False, label_smoothing_factor=0.0, max_grad_norm=1.0,
    channels_last=False, resnet_blocks_per_stage=5, bf16=False, data_on_device=False, per_device_eval_batch_size=500,
    schedule="constant", ramp_fraction=None, method_learning_rate=None,
)



# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------

PROG = "image_classification.py"
RUN_GRAMMAR = ("none | MODE:ALPHA:GAMMA[:SCHEDULE] | random:MODE:ALPHA:GAMMA[:SCHEDULE] | dropout:MODE:RATE | "
               "l1:LAMBDA | l0:MODE:LAMBDA | vd[:KL_SCALE[:WARMUP]] | smallify:LAMBDA | randinit:MODE:SPARSITY, "
               "each optionally LABEL=SPEC; MODE weight|unit, SCHEDULE constant|linear|cosine|piecewise|ramp")
"""The run-spec grammar of ``run_specs.py`` (its ``GRAMMAR``; a test checks they are equal), spelled out
here so that --help does not import hf_tdrop."""
HELP_WIDTH = 100
"""--help is wrapped to the terminal's width, at most this many columns."""
PresetName = Literal[tuple(sorted(PRESETS))]
DatasetKind = Literal["digits", "cifar10", "imagefolder", "files"]
Augmentation = Literal["auto", "none", "crop_flip"]
ModelKind = Literal["resnet32", "mlp"]
Shortcut = Literal["projection", "zero_pad"]
TDropMode = Literal["weight", "unit", "none"]
ScheduleKind = Literal["constant", "linear", "cosine", "piecewise"]
SaveStrategy = Literal["no", "steps", "epoch"]
PruneMode = Literal["weight", "unit"]
SweepSplit = Literal["test", "validation"]


def arg(default=None, help="", **metadata):  # noqa: A002 - argparse's own name
    """A dataclass field that is a command-line flag (``help`` and argparse extras in its metadata)."""
    return field(default=default, metadata={"help": help, **metadata})


def tristate(help: str):  # noqa: A002 - argparse's own name
    """An ``Optional[bool]`` flag left at None unless given (None = the preset decides): ``--flag``,
    ``--flag true|false`` and ``--no_flag`` / ``--no-flag``."""
    return arg(None, help, nargs="?", const=True)


@dataclass
class PresetArguments:
    """The preset: defaults for every flag it names (an explicit flag wins)."""

    preset: PresetName = arg("cpu-small", "Defaults for data/model/optimisation: 'cpu-small' (digits + MLP, minutes on "
                             "CPU), 'digits-baselines' (the same model, every baseline method and the Table 7 runs, under 10 minutes on "
                             "2 CPU cores), 'cifar10-cpu' (ResNet-20, 12 epochs, about 45 minutes a run on 2 CPU cores), "
                             "'cifar10-cpu-finetune' (targeted dropout as a 3-epoch fine-tuning step of a trained "
                             "model, by default the committed unregularised cifar10-cpu ResNet-20; the recommended "
                             "route for a trained model), "
                             "'cifar10-gpu' (ResNet-20, 30 epochs, data on the GPU, bf16), 'paper' (ResNet-32, "
                             "256 epochs, the reference code's ResNet recipe). Explicit flags override the preset; "
                             "each flag's help lists what every preset sets.")


@dataclass
class DataArguments:
    """Which images to train and test on, and how to prepare them."""

    _argument_group_name = "data"
    dataset: Optional[DatasetKind] = arg(None, "'digits': scikit-learn's 8x8 digits (offline, fixed stratified 75/25 "
                                         "train/test split, seed 0). 'cifar10': the hub's uoft-cs/cifar10 (or "
                                         "--train_file/--test_file in its schema) with pad-4 random crop + horizontal "
                                         "flip. 'imagefolder': the datasets imagefolder builder on --data_dir. "
                                         "'files': --train_file/--test_file without augmentation. Default: the "
                                         "preset's ('digits' for cpu-small), or 'files' when --train_file is given.")
    dataset_name: str = arg(CIFAR10_HUB_ID, "Hub dataset id used by --dataset cifar10.")
    train_file: Optional[str] = arg(None, "Local parquet/arrow/json(l)/csv file with the training split (columns "
                                    "--image_column, --label_column). Replaces the hub download; the preprocessing "
                                    "is the same.")
    test_file: Optional[str] = arg(None, "Local file with the test split (same format as --train_file).")
    data_dir: Optional[str] = arg(None, "Image folder for --dataset imagefolder (DIR/train/<class>/*.png and "
                                  "DIR/test/<class>/*.png; without test/ a stratified 20%% of train is held out).")
    image_column: Optional[str] = arg(None, "Image column (default: the first of img, image, pixel_values).")
    label_column: str = arg("label", "Integer/ClassLabel label column.")
    image_size: Optional[int] = arg(None, "Resize every image to this square size (default: keep; all images must "
                                    "then share a size).")
    grayscale: bool = arg(False, "Convert every image to one gray channel.")
    augmentation: Augmentation = arg("auto", "Training augmentation: 'crop_flip' pads 4 px, random-crops back and "
                                     "flips horizontally; 'auto' = crop_flip for cifar10, none otherwise.")
    validation_fraction: float = arg(0.0, "Fraction of the training split held out (stratified, seeded) as a "
                                     "validation split, evaluated every epoch. Use it (never the test split) to "
                                     "tune α/γ/lr.")
    max_train_samples: Optional[int] = arg(None, "Keep only the first N training rows.")
    max_eval_samples: Optional[int] = arg(None, "Keep only the first N test rows for the pruning sweep (CIFAR rows "
                                          "are pre-shuffled).")


@dataclass
class ModelArguments:
    """The network: a built-in architecture or any HF image-classification checkpoint."""

    _argument_group_name = "model"
    model: Optional[ModelKind] = arg(None, "'resnet32': CIFAR ResNet-32 "
                                     "(hf_tdrop.models.CifarResNetForImageClassification); 'mlp': "
                                     "hf_tdrop.models.MLPForImageClassification. Ignored with --model_name_or_path.")
    model_name_or_path: Optional[str] = arg(None, "Any HF image-classification checkpoint or config (local dir or hub "
                                            "id); its weights are loaded, or with --from_config only its config.")
    from_config: bool = arg(False, "With --model_name_or_path: random init from its config.")
    mlp_hidden_sizes: Optional[str] = arg(None, "Comma-separated hidden widths of --model mlp.")
    resnet_blocks_per_stage: Optional[int] = arg(None, "Blocks per stage (5 = ResNet-32, 3 = ResNet-20; default: the "
                                                 "preset's, else 5).")
    channels_last: Optional[bool] = tristate("Train and evaluate in channels-last memory format (faster convolutions "
                                             "on CPU and GPU).")
    bf16: Optional[bool] = tristate("bf16 autocast for training (TrainingArguments.bf16; meant for GPUs).")
    data_on_device: Optional[bool] = tristate("Keep the decoded images on the training device and augment them there "
                                              "(no host-to-device copies; meant for GPUs).")
    resnet_shortcut: Shortcut = arg("projection", "ResNet shortcut where the shape changes: 1x1 conv + BN, or "
                                    "zero-padded identity.")


@dataclass
class TargetedDropoutArguments:
    """The compared runs and their targeted dropout."""

    _argument_group_name = "targeted dropout"
    runs: Optional[str] = arg(None, "Comma-separated runs compared in one invocation, one table column each: "
                              f"{RUN_GRAMMAR}. Examples: '{DEFAULT_RUNS}'; 'none,dropout:weight:0.5,l1:0.01,"
                              "l0:unit:1e-3,vd,smallify:1e-4,random:weight:0.75:0.9,weight:0.99:0.99:ramp,"
                              "randinit:weight:0.9'. Targeted-dropout runs without a SCHEDULE follow the schedule flag below; "
                              "randinit runs go to the Table 7 comparison (random pruning before training) "
                              "instead of the sweep tables. Ignored when --tdrop_mode is given.")
    tdrop_mode: Optional[TDropMode] = arg(None, "Single run with this targeting ('none' = no targeted dropout) and "
                                          "--alpha/--gamma.")
    alpha: float = arg(0.75, "Drop probability α of a targeted weight/unit (single run).")
    gamma: float = arg(0.9, "Targeted fraction γ (single run).")
    schedule: Optional[ScheduleKind] = arg(None, "α/γ schedule of hf_tdrop.TargetingSchedule; non-constant kinds ramp "
                                           "from 0 over --ramp_fraction of training.")
    ramp_fraction: Optional[float] = arg(None, "Fraction of the training steps over which a non-constant schedule "
                                         "ramps (default 0.5; 'piecewise' reaches its targets at twice this "
                                         "fraction).")
    include_stem: bool = arg(False, "Also target and prune the network's first convolution (the stem over the input "
                             "channels). By default it is left dense, as in the reference implementation, for "
                             "training and pruning alike.")
    bn_recalibration_batches: int = arg(50, "Models with BatchNorm: re-estimate the running statistics on this many "
                                        "training batches at the end of targeted-dropout training (the saved "
                                        "checkpoint then has statistics of the network as evaluated) and at every "
                                        "pruning level of the sweeps, next to the paper's protocol without "
                                        "re-estimation. 0 = off.")


@dataclass
class TrainArguments:
    """What reaches ``transformers.TrainingArguments`` (one ``Trainer`` per run)."""

    _argument_group_name = "training (transformers.TrainingArguments)"
    output_dir: str = arg(DEFAULT_OUTPUT_DIR, "Where runs, checkpoints and tables go.")
    overwrite_output_dir: bool = arg(False, "Allow writing into a non-empty --output_dir.")
    resume_from_checkpoint: Optional[str] = arg(None, "'true': resume each run from its last checkpoint in "
                                                "--output_dir/<run>; a path: resume the (single) run from that "
                                                "checkpoint.")
    num_train_epochs: Optional[float] = arg(None, "Training epochs (per run).")
    max_steps: int = arg(-1, "If > 0, total optimisation steps (overrides epochs).")
    per_device_train_batch_size: Optional[int] = arg(None, "Batch size per process.")
    per_device_eval_batch_size: Optional[int] = arg(None, "Evaluation batch size.")
    learning_rate: Optional[float] = arg(None, "Peak learning rate.")
    lr_scheduler_type: Optional[str] = arg(None, "transformers scheduler: cosine, linear, constant, ...")
    warmup_steps: Optional[float] = arg(None, "Warm-up steps (int) or ratio of total steps (<1).")
    optim: Optional[str] = arg(None, "transformers optimizer name (sgd, adamw_torch, ...).")
    momentum: Optional[float] = arg(None, "SGD momentum (with --optim sgd).")
    nesterov: Optional[bool] = tristate("Nesterov momentum (with --optim sgd).")
    label_smoothing_factor: Optional[float] = arg(None, "Label smoothing of the training loss.")
    max_grad_norm: Optional[float] = arg(None, "Gradient-norm clipping (0 = off).")
    weight_decay: Optional[float] = arg(None, "Weight decay.")
    method_learning_rate: Optional[float] = arg(None, "Adam learning rate of the methods' own parameters (L0 gates, "
                                                "variational log σ², Smallify switches), in groups of their own "
                                                "without weight decay (hf_tdrop.method_optimizer); default: each "
                                                "method's (1e-3, the papers').")
    seed: int = arg(42, "Seed of model init, data order, masks (same for every run).")
    logging_steps: int = arg(50, "Log every N steps.")
    save_strategy: SaveStrategy = arg("epoch", "Checkpointing.")
    save_steps: int = arg(500, "With --save_strategy steps.")
    save_total_limit: int = arg(1, "Checkpoints kept per run.")
    dataloader_num_workers: int = arg(0, "DataLoader workers.")
    disable_tqdm: bool = arg(False, "Hide progress bars.")


@dataclass
class SweepArguments:
    """Training or loading every run, the pruning sweep, and the pruned export."""

    _argument_group_name = "pruning sweep and export"
    do_train: bool = arg(True, "Train every run. --no_do_train evaluates trained models instead: the single run's "
                         "--model_name_or_path, or each run's directory <run> in --trained_models_dir.")
    trained_models_dir: Optional[str] = arg(None, "With --no_do_train: where each run's trained model is, as "
                                            "<dir>/<run> (default: --output_dir).")
    do_sweep: bool = arg(True, "Sweep pruning levels after training (--no_do_sweep: train and save only).")
    sweep_split: SweepSplit = arg("test", "Split the sweeps and unpruned numbers are measured on: 'validation' (with "
                                  "--validation_fraction) to choose settings, 'test' to report.")
    sparsities: str = arg("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "Comma-separated pruning levels in [0, 1).")
    prune_modes: str = arg("weight,unit", "Comma-separated pruning modes swept for every run.")
    export_sparsity: Optional[float] = arg(None, "Also save every run pruned at this level with hf_tdrop.save_pruned "
                                           "into <run>/pruned.")
    export_mode: PruneMode = arg("weight", "Pruning mode of the export.")
    push_to_hub: bool = arg(False, "Push the pruned export (--export_sparsity, default 0.5) of the last run with "
                            "hf_tdrop.push_pruned_to_hub to --hub_model_id.")
    hub_model_id: Optional[str] = arg(None, "Repository id for --push_to_hub.")


ARGUMENT_CLASSES = (PresetArguments, DataArguments, ModelArguments, TargetedDropoutArguments, TrainArguments,
                    SweepArguments)


class _Parser(HfArgumentParser):
    """Bad flags end in one line naming the flag and what is allowed (exit status 2), not the full usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    @staticmethod
    def _parse_dataclass_field(parser, dc_field):
        # HfArgumentParser gives a bool flag `--x [bool]` and, when it defaults to True, `--no_x` /
        # `--no-x` (hyphens for underscores). Also: that off switch for the tri-state flags (default None)
        # and, hidden, the `--no-x_y` spelling of argparse's BooleanOptionalAction these flags had before.
        HfArgumentParser._parse_dataclass_field(parser, dc_field)
        name, default = dc_field.name, dc_field.default
        if dc_field.type not in (bool, Optional[bool]):
            return
        if default is None:
            parser.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", action="store_false", dest=name,
                                default=None, help=dc_field.metadata.get("help"))
        if default is not False and "_" in name:
            parser.add_argument(f"--no-{name}", action="store_false", dest=name, default=default,
                                help=argparse.SUPPRESS)


class PresetDefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows, for flags that presets fill in, the value each preset gives instead of "(default: None)";
    a ``--no_*`` switch as its flag set to false; each flag in one spelling, the snake_case one (the
    kebab-case alias that HfArgumentParser adds, e.g. ``--prune-modes``, is still accepted); wraps to the
    terminal, at most :data:`HELP_WIDTH` columns."""

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
        dest = action.dest
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            return f"Same as --{dest} false."
        if action.default is None and (dest in FALLBACK_DEFAULTS or any(dest in p for p in PRESETS.values())):
            values = {name: preset.get(dest, FALLBACK_DEFAULTS.get(dest)) for name, preset in PRESETS.items()}
            shown = "; ".join(f"{name}: {value}" for name, value in values.items())
            return f"{action.help} (default by preset: {shown})".replace("%", "%%")
        return super()._get_help_string(action)


def build_parser() -> _Parser:
    """The command line: one :class:`~transformers.HfArgumentParser` over :data:`ARGUMENT_CLASSES`."""
    return _Parser(
        ARGUMENT_CLASSES, prog=PROG, usage="%(prog)s [options]",
        description=__doc__.split("\n\n")[0] + " Every flag has a default; with no flag at all the "
        "'cpu-small' preset runs (digits, offline, minutes on 2 CPU cores).",
        formatter_class=PresetDefaultsHelpFormatter,
    )


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the flags into the argument dataclasses and return them merged in one namespace: the
    preset's values as defaults (a pre-pass reads ``--preset``), then :data:`FALLBACK_DEFAULTS` for
    what is still unset, every flag checked (one line and exit 2 otherwise)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[pre.preset])
    *parts, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                         look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args = argparse.Namespace(**{k: v for part in parts for k, v in vars(part).items()})
    for key, value in FALLBACK_DEFAULTS.items():
        if getattr(args, key) is None and value is not None:
            setattr(args, key, value)
    # explicit local files replace the download; without a dataset recipe they are plain 'files'
    if args.train_file and "dataset" not in _explicit(argv) and args.dataset in (None, "digits"):
        args.dataset = "files"
    if args.dataset is None:
        args.dataset = "digits"
    validate_args(parser, args)
    return args


def _explicit(argv) -> set[str]:
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0] for a in argv if a.startswith("--")}


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.train_file is None) != (args.test_file is None):
        parser.error("--train_file and --test_file must be given together.")
    if args.dataset == "files" and not args.train_file:
        parser.error("--dataset files needs --train_file and --test_file.")
    if args.dataset == "imagefolder" and not args.data_dir:
        parser.error("--dataset imagefolder needs --data_dir.")
    for flag in ("train_file", "test_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            parser.error(f"--{flag} {path}: no such file.")
    if args.data_dir and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir {args.data_dir}: no such directory.")
    if args.bn_recalibration_batches < 0:
        parser.error(f"--bn_recalibration_batches must be >= 0 (0 = off), got {args.bn_recalibration_batches}.")
    if args.dataset == "digits" and args.train_file:
        parser.error("--dataset digits is built in; drop --train_file/--test_file or pick --dataset cifar10/files.")
    if not 0.0 <= args.validation_fraction < 1.0:
        parser.error(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}.")
    if args.sweep_split == "validation" and not args.validation_fraction:
        parser.error("--sweep_split validation needs --validation_fraction > 0 (the held-out part of the training split).")
    try:
        args.sparsity_list = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sparsities must be comma-separated numbers in [0, 1), got {args.sparsities!r}.")
    if not args.sparsity_list or any(not 0.0 <= s < 1.0 for s in args.sparsity_list):
        parser.error(f"--sparsities must be comma-separated numbers in [0, 1), got {args.sparsities!r}.")
    args.prune_mode_list = [m.strip() for m in args.prune_modes.split(",") if m.strip()]
    if not args.prune_mode_list or any(m not in ("weight", "unit") for m in args.prune_mode_list):
        parser.error(f"--prune_modes must be a comma-separated subset of weight,unit, got {args.prune_modes!r}.")
    if args.mlp_hidden_sizes:
        try:
            args.hidden_list = [int(h) for h in args.mlp_hidden_sizes.split(",") if h.strip()]
        except ValueError:
            parser.error(f"--mlp_hidden_sizes must be comma-separated ints, got {args.mlp_hidden_sizes!r}.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    if args.export_sparsity is not None and not 0.0 <= args.export_sparsity < 1.0:
        parser.error("--export_sparsity must be in [0, 1).")
    if args.ramp_fraction is not None and not 0.0 < args.ramp_fraction <= 1.0:
        parser.error("--ramp_fraction must be in (0, 1].")
    # last: the run specs are checked by hf_tdrop's method configs (the first import of torch)
    from run_specs import RunSpecError  # beside this script

    try:
        args.run_specs = parse_runs(args)
    except RunSpecError as err:
        parser.error(f"--runs: {err}")


def parse_runs(args: argparse.Namespace) -> list[RunSpec]:
    """Runs from --tdrop_mode (single run) or --runs (the grammar of :mod:`run_specs`); raises
    :class:`run_specs.RunSpecError` with a one-line message."""
    from run_specs import parse_runs as parse_run_specs  # beside this script; imports hf_tdrop (and torch)

    if args.tdrop_mode is not None:
        text = "none" if args.tdrop_mode == "none" else f"{args.tdrop_mode}:{args.alpha}:{args.gamma}"
        return parse_run_specs(text, default_schedule=args.schedule)
    return parse_run_specs(args.runs or DEFAULT_RUNS, default_schedule=args.schedule)


if __name__ == "__main__":
    # The flags first: --help and flag errors answer here, before the heavy imports below.
    ARGS = parse_args()

import numpy as np  # noqa: E402 - after the command line, see above
import torch  # noqa: E402

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

import hf_tdrop  # noqa: E402
from hf_tdrop import combine_sweeps, patch_model, plot_sweeps, prune_sweep  # noqa: E402
from hf_tdrop.models import CifarResNetConfig, MLPConfig  # noqa: E402
from image_data import ImageCollator, ImageData, prepare_data, tensors_of  # noqa: E402
from run_specs import GRAMMAR, RunSpec, RunSpecError  # noqa: E402, F401 - the names of the run specs


# --------------------------------------------------------------------------------------------------
# Model, evaluation, training
# --------------------------------------------------------------------------------------------------


def build_model(args, data: ImageData):
    id2label = {int(k): v for k, v in data.id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    if args.model_name_or_path:
        if args.from_config:
            config = AutoConfig.from_pretrained(args.model_name_or_path, num_labels=data.num_labels,
                                                id2label=id2label, label2id=label2id)
            return AutoModelForImageClassification.from_config(config)
        return AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, num_labels=data.num_labels, id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True)
    if args.model == "mlp":
        h, w = data.image_size
        config = MLPConfig(input_size=data.num_channels * h * w, hidden_sizes=args.hidden_list,
                           id2label=id2label, label2id=label2id)
    else:
        config = CifarResNetConfig(num_channels=data.num_channels, blocks_per_stage=args.resnet_blocks_per_stage,
                                   shortcut=args.resnet_shortcut, id2label=id2label, label2id=label2id)
    return AutoModelForImageClassification.from_config(config)


def stem_layer_names(model) -> list[str]:
    """The network's first convolution (the stem over the input channels), as a one-name list, or
    ``[]`` if the model has no convolution. Excluded from targeting and pruning unless
    ``--include_stem``, like the reference implementation."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            return [name]
    return []


def excluded_layers(args, model) -> Optional[list[str]]:
    """``exclude_modules`` for patching and pruning: the stem unless ``--include_stem``."""
    names = [] if args.include_stem else stem_layer_names(model)
    return names or None


def make_evaluate_fn(pixels: torch.Tensor, labels: torch.Tensor, batch_size: int, channels_last: bool = False):
    """``evaluate_fn(model) -> {"accuracy", "loss"}`` on the given tensors, in eval mode, no grad."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.inference_mode()
    def evaluate(model) -> dict:
        model.eval()
        device = next(model.parameters()).device
        correct, loss = 0, 0.0
        for start in range(0, len(labels), batch_size):
            x = pixels[start:start + batch_size].to(device).contiguous(memory_format=memory_format)
            y = labels[start:start + batch_size].to(device)
            logits = model(pixel_values=x).logits
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
        return {"accuracy": correct / len(labels), "loss": loss / len(labels)}

    return evaluate


def compute_metrics(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def make_schedule(args, spec: RunSpec):
    kind = spec.schedule or args.schedule
    return hf_tdrop.TargetingSchedule(alpha=spec.alpha, gamma=spec.gamma, kind=kind,
                                      ramp_fraction=None if kind == "constant" else (args.ramp_fraction or 0.5))


def run_weight_decay(args, spec: RunSpec) -> float:
    """Weight decay of a run: off for variational dropout (the reference's setting: it would pull
    log σ² towards 0), ``--weight_decay`` otherwise."""
    return 0.0 if spec.method == "variational_dropout" else args.weight_decay


class MethodTrainer(Trainer):
    """``Trainer`` whose optimizer trains the methods' own parameters (L0 gates, variational log σ²,
    Smallify switches) the way their papers do: Adam at the method's learning rate, no weight decay,
    in groups of their own (:func:`hf_tdrop.method_optimizer`); the network's weights keep the
    ``TrainingArguments`` optimizer."""

    method_learning_rate: Optional[float] = None

    def create_optimizer(self, model=None):
        if self.optimizer is None and hf_tdrop.method_parameters(self.model):
            self.optimizer = hf_tdrop.method_optimizer(self.model, self.args, method_lr=self.method_learning_rate)
        return super().create_optimizer(model)


def total_updates(args, training_args: TrainingArguments, n_train: int) -> int:
    """Optimizer updates of a run, as ``Trainer`` counts them (for the KL warm-up fraction)."""
    if args.max_steps > 0:
        return args.max_steps
    batch = args.per_device_train_batch_size * training_args.world_size
    per_epoch = max(1, math.ceil(n_train / batch) // training_args.gradient_accumulation_steps)
    return math.ceil(args.num_train_epochs * per_epoch)


LEARNED_CRITERION_FILE = "learned_criterion.pt"
"""Beside a method run's checkpoint: the learned pruning order of every layer (L0 gates, variational
log α), which a plain checkpoint does not carry; read back by ``--no-do_train``."""


def save_learned_criterion(model, run_dir: Path) -> None:
    from hf_tdrop.methods.base import CRITERION_ATTR

    learned = {name: getattr(m, CRITERION_ATTR) for name, m in model.named_modules() if hasattr(m, CRITERION_ATTR)}
    if learned:
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({name: {"name": c.name, "granularity": c.granularity, "scores": c.scores.cpu()}
                    for name, c in learned.items()}, run_dir / LEARNED_CRITERION_FILE)


def load_learned_criterion(model, path: Path) -> None:
    from hf_tdrop.methods.base import CRITERION_ATTR, LearnedCriterion

    file = path / LEARNED_CRITERION_FILE
    if not file.is_file():
        return
    modules = dict(model.named_modules())
    for name, c in torch.load(file, weights_only=True).items():
        setattr(modules[name], CRITERION_ATTR, LearnedCriterion(c["name"], c["granularity"], c["scores"]))


def sweep_criterion(model, mode: str) -> str:
    """The pruning criterion of a sweep: the learned criterion the model carries for ``mode``
    (``"gates"`` for L0, ``"log_alpha"`` for variational dropout; a per-unit criterion only in unit
    mode, a per-weight one only in weight mode), else ``"magnitude"``."""
    from hf_tdrop.methods.base import CRITERION_ATTR

    for module in model.modules():
        learned = module.__dict__.get(CRITERION_ATTR)
        if learned is not None and learned.granularity == mode:
            return learned.name
    return "magnitude"


def training_arguments(args, run_dir: Path, has_validation: bool, weight_decay: Optional[float] = None) -> TrainingArguments:
    optim_args = None
    if args.optim == "sgd" and args.momentum:
        optim_args = f"momentum={args.momentum}" + (",nesterov=True" if args.nesterov else "")
    return TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        optim=args.optim,
        optim_args=optim_args,
        weight_decay=args.weight_decay if weight_decay is None else weight_decay,
        label_smoothing_factor=args.label_smoothing_factor,
        bf16=bool(args.bf16),
        dataloader_pin_memory=not args.data_on_device,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="epoch" if has_validation else "no",
        dataloader_num_workers=args.dataloader_num_workers,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=args.disable_tqdm,
        use_cpu=not torch.cuda.is_available(),
    )


def checkpoint_for(args, run_dir: Path, n_runs: int):
    value = args.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no", "0"):
        return None
    if value.lower() in ("true", "yes", "1"):
        return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if n_runs > 1:
        raise ValueError("--resume_from_checkpoint PATH needs a single run; use 'true' to resume every run.")
    return value


def train_run(args, spec: RunSpec, data: ImageData, run_dir: Path, n_runs: int):
    """Train one run; returns the trained model (finalised for a method run, patched for targeted
    dropout, held-at-zero pruned for randinit), the Trainer and the training metrics."""
    set_seed(args.seed)
    model = build_model(args, data)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    training_args = training_arguments(args, run_dir, data.validation is not None, run_weight_decay(args, spec))
    exclude = excluded_layers(args, model)
    callbacks, hold = [], None
    if spec.kind == "randinit":
        # Table 7: a random subnetwork chosen at initialisation; the pruned weights (and the biases of
        # pruned units) stay exactly zero through training, optimizer state included
        report = hf_tdrop.prune_model(model, spec.sparsity, mode=spec.mode, method="random", exclude_modules=exclude,
                                      generator=torch.Generator().manual_seed(args.seed))
        hold = hf_tdrop.hold_pruned(model, report)
        logger.info("run %s: random %s pruning at initialisation, %.1f%% of the weights held at zero", spec.name,
                    spec.mode, 100 * report.pruned_fraction)
    elif spec.kind != "none":
        config = spec.config(dataset_size=len(data.train), exclude_modules=exclude,
                             total_updates=total_updates(args, training_args, len(data.train)))
        patch_model(model, config=config)
        if spec.has_targeting:
            callbacks.append(hf_tdrop.TargetedDropoutCallback(make_schedule(args, spec),
                                                              bn_recalibration_batches=args.bn_recalibration_batches))
        else:
            callbacks.append(hf_tdrop.RegularizationCallback())
        logger.info("run %s: %d layers patched with %s (%s), weight decay %g", spec.name,
                    len(hf_tdrop.targeted_layers(model)), spec.method, spec.label, training_args.weight_decay)
    else:
        logger.info("run %s: no method", spec.name)
    train_set, validation_set = data.train, data.validation
    if args.data_on_device:
        train_set = train_set.to(training_args.device)
        validation_set = validation_set.to(training_args.device) if validation_set is not None else None
    trainer = MethodTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=validation_set,
        data_collator=ImageCollator(torch.tensor(data.mean), torch.tensor(data.std), args.channels_last),
        compute_metrics=compute_metrics if data.validation is not None else None,
    )
    trainer.method_learning_rate = args.method_learning_rate
    for callback in callbacks:
        if isinstance(callback, hf_tdrop.TargetedDropoutCallback):
            callback.attach(trainer)  # ahead of report_to integrations, so they log tdrop_alpha/tdrop_gamma
        else:
            trainer.add_callback(callback)
    checkpoint = checkpoint_for(args, run_dir, n_runs)
    logger.info("run %s: %d process(es) (%s), %d examples per step", spec.name, trainer.args.world_size,
                trainer.args.parallel_mode.value, trainer.args.world_size * args.per_device_train_batch_size)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if hold is not None:
        result.metrics["held_zero_weights"] = hold.n_held
        result.metrics["held_weights_nonzero_after_training"] = hold.nonzero_held()
        hold.remove()
    if spec.kind in ("targeted_dropout", "method") and spec.method != "targeted_dropout":
        # fold gates / log σ² / switches into the weights, keep the learned pruning order, strip the
        # extra tensors: the saved checkpoint is plain, and the sweep prunes the model as deployed
        hf_tdrop.finalize_model(trainer.model)
        if trainer.is_world_process_zero():
            save_learned_criterion(trainer.model, run_dir)
    trainer.save_model(str(run_dir))  # a plain checkpoint (targeted dropout leaves the state_dict untouched)
    if trainer.is_world_process_zero():
        image_processor(data).save_pretrained(str(run_dir))
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    return trainer.model, trainer, result.metrics


def image_processor(data: ImageData):
    """The preprocessing as a transformers image processor saved beside every checkpoint, so
    ``AutoImageProcessor`` + ``AutoModelForImageClassification`` on the directory alone evaluate it:
    rescale to [0, 1], normalise with the training split's mean/std (no resizing)."""
    from transformers import ViTImageProcessor

    h, w = data.image_size
    return ViTImageProcessor(do_resize=False, size={"height": h, "width": w}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=data.mean, image_std=data.std)


def trained_model_path(args, spec: RunSpec) -> Optional[Path]:
    """Where a run's trained model is read from: ``--model_name_or_path``, or with ``--no-do_train``
    ``<--trained_models_dir or --output_dir>/<run>``; None when a run is trained from scratch."""
    if getattr(args, "model_name_or_path", None):
        return Path(args.model_name_or_path)
    if not getattr(args, "do_train", True):
        return Path(args.trained_models_dir or args.output_dir) / spec.name
    return None


def load_trained(args, spec: RunSpec, data: ImageData, run_dir: Path):
    """A trained run for ``--no-do_train`` (see :func:`trained_model_path`)."""
    path = trained_model_path(args, spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--no-do_train: no trained model for run {spec.name!r} at {path} (expected a "
                         "save_pretrained directory); pass --model_name_or_path DIR or train first.")
    model = AutoModelForImageClassification.from_pretrained(str(path))
    load_learned_criterion(model, path)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    logger.info("run %s: evaluating the trained model in %s", spec.name, path)
    return model.eval()


def recalibration_batches(args, data: ImageData, model) -> Optional[hf_tdrop.BatchNormRecalibration]:
    """Fixed training batches (augmented like training, seeded) for BatchNorm re-estimation in the sweeps,
    or None when the model has no BatchNorm or --bn_recalibration_batches is 0."""
    if not args.bn_recalibration_batches or not hf_tdrop.has_batchnorm(model):
        return None
    generator = torch.Generator().manual_seed(args.seed)
    collator = ImageCollator(torch.tensor(data.mean), torch.tensor(data.std), args.channels_last)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.per_device_train_batch_size, shuffle=True,
                                         generator=generator, collate_fn=collator)
    state = torch.get_rng_state()
    torch.manual_seed(args.seed)  # the augmentation draws
    batches = [b for _, b in zip(range(args.bn_recalibration_batches), loader)]
    torch.set_rng_state(state)
    return hf_tdrop.BatchNormRecalibration(batches, num_batches=len(batches))


def sweep_run(args, spec: RunSpec, model, data: ImageData, evaluate, run_dir: Path, sweeps: dict) -> dict:
    """Prune sweeps of one run, per mode, by the run's own criterion (:func:`sweep_criterion`): the
    paper's protocol (as pruned) and, for BatchNorm models, with the statistics re-estimated at every
    level. A randinit run is not swept (it is already pruned); it is evaluated as trained. Returns the
    run's unpruned numbers for the summary, and for the Table 7 comparison the accuracy of no-method
    and targeted-dropout runs pruned after training at the levels of the randinit runs."""
    numbers = {"unpruned": evaluate(model)}
    exclude = excluded_layers(args, model)
    # weights already exactly zero in the prunable layers (randinit's held zeros, variational dropout's
    # log α >= 3, L0's closed gates, Smallify's masked units, folded in by finalize_model)
    report = hf_tdrop.sparsity_report(model, exclude_modules=exclude)
    numbers["zero_fraction"] = report.total_excluding_heads["weight_sparsity"]
    if spec.kind == "randinit":
        numbers["pruned_fraction"] = numbers["zero_fraction"]
        return numbers
    recalibrate = recalibration_batches(args, data, model)
    numbers["criterion"] = {}
    for mode in args.prune_mode_list:
        criterion = sweep_criterion(model, mode)
        numbers["criterion"][mode] = criterion
        label = spec.label if criterion == "magnitude" else f"{spec.label} ({criterion})"
        for protocol, recal in (("", None), ("_bn", recalibrate)):
            if protocol and recal is None:
                continue
            result = prune_sweep(model, evaluate, args.sparsity_list, mode=mode, method=criterion, run_name=label,
                                 exclude_modules=exclude, recalibrate=recal, progress=not args.disable_tqdm)
            result.save(run_dir, prefix=f"sweep-{mode}{protocol}")
            sweeps.setdefault(f"{mode}{protocol}", []).append(result)
            logger.info("run %s, %s pruning by %s%s:\n%s", spec.name, mode, criterion,
                        " (BatchNorm re-estimated)" if recal else "", result.to_markdown("accuracy"))
    if spec.method == "targeted_dropout":
        # the reference implementation's evaluation: the whole targeted set (the floor(γ·n) lowest) removed
        with hf_tdrop.pruned(model, spec.gamma, mode=spec.mode, exclude_modules=exclude):
            numbers["targeted_set_removed"] = evaluate(model)
    levels = table7_levels(args)
    if spec.kind == "none" or spec.method == "targeted_dropout":
        for mode, mode_levels in levels.items():
            if spec.kind == "none" or spec.mode == mode:
                numbers.setdefault("pruned_after_training", {})[mode] = {}
                for level in mode_levels:
                    with hf_tdrop.pruned(model, level, mode=mode, exclude_modules=exclude):
                        numbers["pruned_after_training"][mode][str(level)] = evaluate(model)["accuracy"]
    return numbers


def table7_levels(args) -> dict[str, list[float]]:
    """``{mode: sorted sparsities}`` of the randinit runs (the rows of the Table 7 comparison)."""
    levels: dict[str, list[float]] = {}
    for spec in args.run_specs:
        if spec.kind == "randinit":
            levels.setdefault(spec.mode, []).append(spec.sparsity)
    return {mode: sorted(set(v)) for mode, v in levels.items()}


def check_output_dir(args) -> None:
    out = Path(args.output_dir)
    resuming = args.resume_from_checkpoint not in (None, "false", "False", "no", "0") or not args.do_train
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or resuming):
        raise SystemExit(f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir (or "
                         "--resume_from_checkpoint true) or choose another directory.")


CRITERIA_NOTE = ("Pruning criterion: magnitude (smallest |w| per w_o in weight pruning, smallest ||w_o|| in unit "
                 "pruning) unless the column names a learned one: (gates) = L0's learned log α, lowest first; "
                 "(log_alpha) = variational dropout's log α, highest first. A learned criterion is used only in "
                 "the mode it was learned in (per-weight gates and log α in weight pruning, per-unit gates in unit "
                 "pruning).")


def write_combined(output_dir: Path, sweeps: dict[str, list], labels: Optional[list[str]] = None,
                   unpruned: Optional[dict] = None, runs: Optional[list] = None) -> dict[str, str]:
    """Combined tables (rows = prune %, columns = runs, labelled with their pruning criterion when it
    is not magnitude) per pruning mode and protocol (``weight``, ``weight_bn`` = BatchNorm re-estimated
    at every level, ...): .md/.csv/.json and a .png; plus, in ``results.md``, every run's unpruned
    accuracy as saved and with its targeted set removed, and the Table 7 comparison when there are
    randinit runs (also ``table7.md/.csv/.json``)."""
    written = {}
    texts = []
    if unpruned and runs:
        rows = ["| run | unpruned, as saved | weights already zero | targeted set removed (reference eval) |",
                "|---|---|---|---|"]
        for spec in runs:
            numbers = unpruned.get(spec.name)
            if numbers is None:
                continue
            removed = numbers.get("targeted_set_removed")
            zero = numbers.get("zero_fraction")
            rows.append(f"| {spec.label} | {numbers['unpruned']['accuracy']:.4f} | "
                        f"{'-' if zero is None else format(zero, '.1%')} | "
                        f"{'-' if removed is None else format(removed['accuracy'], '.4f')} |")
        texts.append("### Unpruned test accuracy\n\n" + "\n".join(rows) + "\n")
    for key, results in sweeps.items():
        if not results:
            continue
        mode, _, protocol = key.partition("_")
        how = ", BatchNorm statistics re-estimated at every level" if protocol == "bn" else ", as pruned"
        columns = [r.run_name for r in results]
        table = combine_sweeps(results, "accuracy", labels=columns)
        stem = output_dir / f"{key}_pruning"
        note = f"\n{CRITERIA_NOTE}\n"
        text = f"### {mode.capitalize()} pruning{how}: test accuracy (rows = fraction pruned, columns = runs)\n\n" \
               + table.to_markdown(float_format=".4f") + "\n" + note
        stem.with_suffix(".md").write_text(text, encoding="utf-8")
        table.to_csv(stem.with_suffix(".csv"))
        table.to_json(stem.with_suffix(".json"))
        (output_dir / f"{key}_pruning_criteria.json").write_text(
            json.dumps({r.run_name: r.method for r in results}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        plot_sweeps(results, stem.with_suffix(".png"), metric="accuracy", labels=columns,
                    title=f"{mode} pruning{how}")
        written[key] = str(stem.with_suffix(".md"))
        texts.append(text)
    if unpruned and runs and any(s.kind == "randinit" for s in runs):
        text = write_table7(output_dir, unpruned, runs)
        written["table7"] = str(output_dir / "table7.md")
        texts.append(text)
    (output_dir / "results.md").write_text("\n".join(texts), encoding="utf-8")
    return written


def write_table7(output_dir: Path, unpruned: dict, runs: list) -> str:
    """The paper's Table 7: random pruning before training (each randinit run, evaluated as trained)
    vs. the no-method and targeted-dropout runs magnitude-pruned after training at the same level.
    Writes ``table7.md``, ``table7.csv`` (mode, sparsity, one column per run) and ``table7.json``;
    returns the Markdown."""
    data, parts = {}, []
    for mode in MODES_ORDER:
        randinit = {s.sparsity: unpruned[s.name] for s in runs if s.kind == "randinit" and s.mode == mode
                    and s.name in unpruned}
        if not randinit:
            continue
        levels = sorted(randinit)
        columns = {"random pruning before training": [randinit[level]["unpruned"]["accuracy"] for level in levels]}
        for spec in runs:
            after = unpruned.get(spec.name, {}).get("pruned_after_training", {}).get(mode)
            if after is not None:
                columns[f"{spec.label}, pruned after training"] = [after.get(str(level)) for level in levels]
        data[mode] = {"sparsities": levels, "columns": columns,
                      "random_init_pruned_fraction": [randinit[level]["pruned_fraction"] for level in levels]}
        names = list(columns)
        rows = [f"| {mode} sparsity | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, level in enumerate(levels):
            cells = ["-" if columns[n][i] is None else f"{columns[n][i]:.4f}" for n in names]
            rows.append(f"| {level:.0%} | " + " | ".join(cells) + " |")
        parts.append("\n".join(rows))
    text = ("### Table 7: random pruning before training vs. pruning after training (test accuracy)\n\n"
            "Random pruning before training: a random subnetwork (per w_o in weight mode, per layer in unit "
            "mode) is pruned at initialisation and held at exactly zero throughout training. The other "
            "columns are trained dense and magnitude-pruned to the same level afterwards.\n\n"
            + "\n\n".join(parts) + "\n")
    (output_dir / "table7.md").write_text(text, encoding="utf-8")
    (output_dir / "table7.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(output_dir / "table7.csv", "w", encoding="utf-8", newline="") as f:
        import csv

        writer = csv.writer(f)
        for mode, table in data.items():
            writer.writerow(["mode", "sparsity", *table["columns"]])
            for i, level in enumerate(table["sparsities"]):
                writer.writerow([mode, level, *(table["columns"][n][i] for n in table["columns"])])
    return text


MODES_ORDER = ("weight", "unit")


def main(argv=None, args=None) -> dict:
    """Run the script on the command line ``argv`` (default: ``sys.argv``), or on ``args`` already
    parsed by :func:`parse_args`."""
    if args is None:
        args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # no "Writing model shards" bar at every checkpoint: in a log file it cuts into the training bar
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return run(args)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def run(args) -> dict:
    """Train (or load) every run, sweep it and write the tables; returns ``{"sweeps", "model"}``."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        check_output_dir(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    data = prepare_data(args, normalization_from=trained_model_path(args, args.run_specs[0]))
    test_pixels, test_labels = tensors_of(data.validation if args.sweep_split == "validation" else data.test)
    evaluate = make_evaluate_fn(test_pixels, test_labels, args.per_device_eval_batch_size, args.channels_last)
    sweeps: dict[str, list] = {}
    summary = {"args": {k: v for k, v in vars(args).items() if k != "run_specs"},
               "runs": [s.to_dict() for s in args.run_specs], "train_metrics": {}, "unpruned": {}}
    summary["args"]["sparsity_list"] = args.sparsity_list
    last_model = None
    for spec in args.run_specs:
        run_dir = output_dir / spec.name
        if not args.do_train:
            model = load_trained(args, spec, data, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if args.do_sweep:
                summary["unpruned"][spec.name] = sweep_run(args, spec, model, data, evaluate, run_dir, sweeps)
            last_model = model
            continue
        model, trainer, metrics = train_run(args, spec, data, run_dir, len(args.run_specs))
        summary["train_metrics"][spec.name] = metrics
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(model)
            if args.do_sweep:
                summary["unpruned"][spec.name] = sweep_run(args, spec, model, data, evaluate, run_dir, sweeps)
                if args.export_sparsity is not None or args.push_to_hub:
                    export(args, model, spec, run_dir, [sweeps[m][-1] for m in args.prune_mode_list])
        trainer.accelerator.wait_for_everyone()
        last_model = model

    if int(os.environ.get("RANK", "0")) == 0:
        write_combined(output_dir, sweeps, None, summary["unpruned"], args.run_specs)
        (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        print((output_dir / "results.md").read_text(encoding="utf-8"))
        logger.info("tables, plots and per-run outputs written to %s", output_dir)
    return {"sweeps": sweeps, "model": last_model}


def export(args, model, spec: RunSpec, run_dir: Path, sweeps: list) -> None:
    """Save (and with --push_to_hub push) the run pruned at --export_sparsity through the library's
    Hub export: a plain checkpoint + tdrop_config.json + a model card with the sweep tables."""
    sparsity = 0.5 if args.export_sparsity is None else args.export_sparsity
    # one column per pruning mode in the model card (the run's sweeps share its run name)
    sweeps = [dataclasses.replace(r, run_name=f"{r.run_name} ({r.mode} pruning)") for r in sweeps]
    with hf_tdrop.pruned(model, sparsity, mode=args.export_mode) as report:
        if args.export_sparsity is not None:
            path = hf_tdrop.save_pruned(model, run_dir / "pruned", sweep=sweeps, prune_report=report, overwrite=True)
            logger.info("run %s pruned at %.0f%% (%s) saved to %s", spec.name, 100 * sparsity, args.export_mode, path)
        if args.push_to_hub and spec is args.run_specs[-1]:
            info = hf_tdrop.push_pruned_to_hub(model, args.hub_model_id, sweep=sweeps, prune_report=report)
            logger.info("pushed to %s", getattr(info, "commit_url", info))


if __name__ == "__main__":
    main(args=ARGS)
