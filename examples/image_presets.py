"""The command line of ``image_classification.py``: its presets, flags, defaults and checks.

Imports neither torch nor transformers' models (nor ``hf_tdrop``): ``--help`` and a bad flag answer at
once, and a valid ``--runs`` value is parsed by ``run_specs.py``, which is as light. The script
imports the heavy modules after :func:`parse_args` has returned.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from transformers import HfArgumentParser

from cli_args import HELP_WIDTH, OneSpellingHelp, arg

DESCRIPTION = "Train image classifiers with targeted dropout, then sweep weight and unit pruning (paper §5.1)."
"""The first line of the script's docstring, the start of --help."""
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
    # its budget) with ramped weight and unit targeted dropout, lr 0.05 cosine without warm-up (the
    # validation split's choice for weight TD among 0.02 and 0.05; for unit TD it chooses 0.1 among
    # 0.02, 0.05 and 0.1: --runs unit:0.9:0.75 --learning_rate 0.1), the rest as cifar10-cpu. Point
    # --model_name_or_path at your own checkpoint.
    "cifar10-cpu-finetune": dict(
        dataset="cifar10", model_name_or_path=str(FINETUNE_BASE), runs="weight:0.75:0.9,unit:0.9:0.75",
        num_train_epochs=3.0, per_device_train_batch_size=128, learning_rate=0.05, lr_scheduler_type="cosine",
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
"""Defaults of the flags the presets fill in, for what a preset leaves unset."""


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------

PROG = "image_classification.py"
RUN_GRAMMAR = ("none | MODE:ALPHA:GAMMA[:SCHEDULE] | random:MODE:ALPHA:GAMMA[:SCHEDULE] | dropout:MODE:RATE | "
               "l1:LAMBDA | l0:MODE:LAMBDA | vd[:KL_SCALE[:WARMUP]] | smallify:LAMBDA | randinit:MODE:SPARSITY, "
               "each optionally LABEL=SPEC; MODE weight|unit, SCHEDULE constant|linear|cosine|piecewise|ramp")
"""The run-spec grammar of ``run_specs.py`` (its ``GRAMMAR``; a test checks they are equal), spelled out
here so that --help does not import run_specs."""
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
                                            "<dir>/<run>; wins over --model_name_or_path (default: "
                                            "--model_name_or_path, else --output_dir).")
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


class PresetDefaultsHelpFormatter(OneSpellingHelp, argparse.ArgumentDefaultsHelpFormatter):
    """Shows, for flags that presets fill in, the value each preset gives instead of "(default: None)";
    a ``--no_*`` switch as its flag set to false; each flag in one spelling, the snake_case one (the
    kebab-case alias that HfArgumentParser adds, e.g. ``--prune-modes``, is still accepted); wraps to the
    terminal, at most :data:`HELP_WIDTH` columns."""

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
        description=DESCRIPTION + " Every flag has a default; with no flag at all the "
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
    # last: the run specs (run_specs.py checks their numbers against the method configs' ranges, no torch)
    from run_specs import RunSpecError  # beside this script

    try:
        args.run_specs = parse_runs(args)
    except RunSpecError as err:
        parser.error(f"--runs: {err}")


def parse_runs(args: argparse.Namespace) -> list:
    """Runs from --tdrop_mode (single run) or --runs (the grammar of :mod:`run_specs`); raises
    :class:`run_specs.RunSpecError` with a one-line message. Returns :class:`run_specs.RunSpec`'s."""
    from run_specs import parse_runs as parse_run_specs  # beside this script; as light as this module

    if args.tdrop_mode is not None:
        text = "none" if args.tdrop_mode == "none" else f"{args.tdrop_mode}:{args.alpha}:{args.gamma}"
        return parse_run_specs(text, default_schedule=args.schedule)
    return parse_run_specs(args.runs or DEFAULT_RUNS, default_schedule=args.schedule)

