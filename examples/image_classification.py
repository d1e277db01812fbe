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
        --train_file path/to/cifar10/train.parquet --test_file path/to/cifar10/test.parquet

    # the paper's schedule on the hub's CIFAR-10, 4 GPUs
    accelerate launch --num_processes 4 examples/image_classification.py --preset paper

    # DDP on CPU (gloo): accelerate 1.15's `launch --cpu --num_processes N` starts a single process,
    # `--multi_gpu` with ACCELERATE_USE_CPU=1 starts N workers
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/image_classification.py

    # your own images (imagefolder layout: DIR/train/<class>/*.png, DIR/test/<class>/*.png)
    python examples/image_classification.py --dataset imagefolder --data_dir DIR --model resnet32 --image_size 32

Run ``--help`` for every flag. Works under ``python`` and ``accelerate launch`` (DDP): training is
distributed by ``Trainer``; the pruning sweep runs on the main process.

The script reads top-down: :func:`main` parses the flags (``image_presets.py``: presets, flags,
checks; ``run_specs.py``: the run grammar), then :func:`run` goes through the steps of each run,
a function each: the data (``image_data.py``), the model, training (or loading a trained model),
the sweep, the export; and last the tables (``image_tables.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional

# Only what the command line needs: torch, transformers' Trainer and models, hf_tdrop and the data
# helpers are imported after the flags are parsed (below), so that --help and flag errors answer at once.
from image_presets import RUN_GRAMMAR, build_parser, parse_args  # noqa: F401 - the command line, re-exported

logger = logging.getLogger("image_classification")

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
from hf_tdrop import patch_model, prune_sweep  # noqa: E402
from hf_tdrop.models import CifarResNetConfig, MLPConfig  # noqa: E402
from image_data import ImageCollator, ImageData, prepare_data, tensors_of  # noqa: E402
from image_tables import write_combined  # noqa: E402
from run_specs import RunSpec  # noqa: E402


# --------------------------------------------------------------------------------------------------
# main: the flags, then the steps of every run
# --------------------------------------------------------------------------------------------------


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
    output_dir = prepare_output_dir(args)
    data = prepare_data(args, normalization_from=trained_model_path(args, args.run_specs[0]))
    evaluate = make_evaluate_fn(*tensors_of(data.validation if args.sweep_split == "validation" else data.test),
                                args.per_device_eval_batch_size, args.channels_last)
    sweeps: dict[str, list] = {}
    summary = {"args": {k: v for k, v in vars(args).items() if k != "run_specs"},
               "runs": [s.to_dict() for s in args.run_specs], "train_metrics": {}, "unpruned": {}}
    summary["args"]["sparsity_list"] = args.sparsity_list
    model = None
    for spec in args.run_specs:
        run_dir = output_dir / spec.name
        model, trainer = train_or_load(args, spec, data, run_dir, summary)
        if trainer is None or trainer.is_world_process_zero():
            if args.do_sweep:
                summary["unpruned"][spec.name] = sweep_run(args, spec, model, data, evaluate, run_dir, sweeps)
                if trainer is not None and (args.export_sparsity is not None or args.push_to_hub):
                    export(args, model, spec, run_dir, [sweeps[m][-1] for m in args.prune_mode_list])
        if trainer is not None:
            trainer.accelerator.wait_for_everyone()
    if is_main_process():
        write_outputs(args, output_dir, sweeps, summary)
    return {"sweeps": sweeps, "model": model}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(args) -> Path:
    """``--output_dir``, created; a non-empty one is refused unless overwriting, resuming or only evaluating."""
    out = Path(args.output_dir)
    resuming = args.resume_from_checkpoint not in (None, "false", "False", "no", "0") or not args.do_train
    if is_main_process() and out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or resuming):
        raise SystemExit(f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir (or "
                         "--resume_from_checkpoint true) or choose another directory.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train_or_load(args, spec: RunSpec, data: ImageData, run_dir: Path, summary: dict):
    """The run's model: trained (:func:`train_run`; returns it with its ``Trainer``, unwrapped on the
    main process), or with ``--no-do_train`` loaded (:func:`load_trained`; no ``Trainer``)."""
    if not args.do_train:
        model = load_trained(args, spec, data, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return model, None
    model, trainer, metrics = train_run(args, spec, data, run_dir, len(args.run_specs))
    summary["train_metrics"][spec.name] = metrics
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(model)
    return model, trainer


def write_outputs(args, output_dir: Path, sweeps: dict, summary: dict) -> None:
    """The last step: the combined tables and plots (``image_tables.write_combined``), the run
    summary, and ``results.md`` printed."""
    write_combined(output_dir, sweeps, None, summary["unpruned"], args.run_specs)
    (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    print((output_dir / "results.md").read_text(encoding="utf-8"))
    logger.info("tables, plots and per-run outputs written to %s", output_dir)


# --------------------------------------------------------------------------------------------------
# The model and its training
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
            # the learned pruning order (L0 gates, variational log α), which a plain checkpoint lacks,
            # beside it (tdrop_criteria.safetensors): --no-do_train sweeps by it again
            hf_tdrop.save_learned_criteria(trainer.model, run_dir)
    trainer.save_model(str(run_dir))  # a plain checkpoint (targeted dropout leaves the state_dict untouched)
    if trainer.is_world_process_zero():
        image_processor(data).save_pretrained(str(run_dir))
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    return trainer.model, trainer, result.metrics


# --------------------------------------------------------------------------------------------------
# A trained model, its sweep and its export
# --------------------------------------------------------------------------------------------------


def image_processor(data: ImageData):
    """The preprocessing as a transformers image processor saved beside every checkpoint, so
    ``AutoImageProcessor`` + ``AutoModelForImageClassification`` on the directory alone evaluate it:
    rescale to [0, 1], normalise with the training split's mean/std (no resizing)."""
    from transformers import ViTImageProcessor

    h, w = data.image_size
    return ViTImageProcessor(do_resize=False, size={"height": h, "width": w}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=data.mean, image_std=data.std)


def trained_model_path(args, spec: RunSpec) -> Optional[Path]:
    """Where a run's trained model is read from. With ``--no-do_train``: ``<--trained_models_dir>/<run>``
    when that is given (it wins over a ``--model_name_or_path``, which may be a preset's starting
    point), else ``--model_name_or_path``, else ``<--output_dir>/<run>``. When training:
    ``--model_name_or_path`` (fine-tuning), or None (from scratch)."""
    evaluate_only = not getattr(args, "do_train", True)
    if evaluate_only and getattr(args, "trained_models_dir", None):
        return Path(args.trained_models_dir) / spec.name
    if getattr(args, "model_name_or_path", None):
        return Path(args.model_name_or_path)
    if evaluate_only:
        return Path(args.output_dir) / spec.name
    return None


def load_trained(args, spec: RunSpec, data: ImageData, run_dir: Path):
    """A trained run for ``--no-do_train`` (see :func:`trained_model_path`)."""
    path = trained_model_path(args, spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--no-do_train: no trained model for run {spec.name!r} at {path} (expected a "
                         "save_pretrained directory); pass --model_name_or_path DIR or train first.")
    model = AutoModelForImageClassification.from_pretrained(str(path))
    # the learned pruning order saved beside it (tdrop_criteria.safetensors, or the learned_criterion.pt
    # of runs trained by earlier versions of this script), if any
    hf_tdrop.load_learned_criteria(model, path, missing_ok=True)
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



def sweep_criterion(model, mode: str) -> str:
    """The pruning criterion of a sweep: the learned criterion the model carries for ``mode``
    (``"gates"`` for L0, ``"log_alpha"`` for variational dropout; a per-unit criterion only in unit
    mode, a per-weight one only in weight mode), else ``"magnitude"``."""
    for module in model.modules():
        for value in vars(module).values():  # finalize_model leaves a LearnedCriterion on each such layer
            if isinstance(value, hf_tdrop.LearnedCriterion) and value.granularity == mode:
                return value.name
    return "magnitude"


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
