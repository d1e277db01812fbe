#!/usr/bin/env python
"""Targeted dropout on WMT14 English->German (Gomez et al., 2019, Table 5), with 🤗 Accelerate.

Trains a Transformer translation model (from scratch by preset, or fine-tuning any seq2seq
checkpoint) with or without targeted dropout, then sweeps magnitude pruning (weight and/or unit
mode) and reports detokenised sacreBLEU and per-token accuracy at every pruning level, on the
validation and test splits. In the style of transformers' ``run_translation_no_trainer.py``.

The script reads top-down: :func:`main` parses the flags (``translation_presets.py``: presets,
flags, checks; ``run_specs.py``: ``--method``), then goes through five steps, each a function:
``load_data`` (read and check the splits, ``translation_data.py``), ``build_tokenizer_and_model``
(and patch it with targeted dropout), ``train``, ``run_sweeps`` (``translation_eval.py``) and
``export`` (push to the Hub). Bad flags and bad data stop the run in the first two steps, before
anything is written, with one line naming the flag and file and exit status 2.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

# Only what the command line needs: torch, datasets, accelerate, transformers' models and hf_tdrop are
# imported after the flags are parsed (below), so that --help and flag errors answer at once.
from translation_presets import (  # noqa: F401 - EXAMPLES, build_parser, parse_args: the command line, re-exported
    EXAMPLES,
    MODEL_PRESETS,
    TRAINING_PRESET_KEYS,
    InputError,
    build_parser,
    checkpoint_dirs,
    fail,
    parse_args,
)

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
from hf_tdrop import SweepResult, TargetingSchedule, TargetingScheduler, patch_model  # noqa: E402
from translation_data import (  # noqa: E402 - the helper module beside this script
    TokenBudgetBatchSampler,
    load_translation_splits,
    train_joint_tokenizer,
)
from translation_eval import combine_runs, make_eval_dataloader, run_sweeps, validation_metrics  # noqa: E402

logger = get_logger(__name__)


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


# --------------------------------------------------------------------------------------------------
# the steps of a run
# --------------------------------------------------------------------------------------------------


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


def get_tokenizer(args, raw):
    if args.tokenizer_name or args.model_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    # Deterministic: every process trains the same vocabulary on the same data.
    logger.info(f"Training a joint BPE vocabulary of {args.vocab_size} on {len(raw['train'])} pairs")
    return train_joint_tokenizer(raw["train"], [args.source_lang, args.target_lang], args.vocab_size)


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


def set_kl_warmup(model, steps: int) -> None:
    """Variational dropout's KL warm-up, in updates, on every patched layer (``--method vd:S:WARMUP``
    gives it as a fraction of the updates, known only once the data loader is built)."""
    from hf_tdrop.layers import METHOD_ATTR
    from hf_tdrop.methods.base import method_layers

    for _, layer in method_layers(model):
        getattr(layer, METHOD_ATTR).config.kl_warmup_steps = steps


def export(args, model, tokenizer, accelerator, output_dir: Path) -> None:
    """Step 5 (``--push_to_hub``): push the model pruned to ``--push_sparsity`` with the tokenizer and
    the sweeps in its model card."""
    if not (args.push_to_hub and accelerator.is_main_process):
        return
    unwrapped = accelerator.unwrap_model(model)
    report = hf_tdrop.prune_model(unwrapped, args.push_sparsity, mode=args.push_mode)
    sweeps = [SweepResult.from_json(f) for f in sorted((output_dir / "sweeps").glob("sweep-*.json"))] or None
    with no_transformers_progress_bars():
        info = hf_tdrop.push_pruned_to_hub(unwrapped, args.hub_model_id, tokenizer_or_processor=tokenizer,
                                           sweep=sweeps, prune_report=report, base_model=args.model_name_or_path)
    logger.info(f"Pushed to {info.commit_url}")


# --------------------------------------------------------------------------------------------------
# checkpoints and quiet saves
# --------------------------------------------------------------------------------------------------


def save_training_state(accelerator, model, path: Path) -> None:
    """``accelerator.save_state(path)`` (model, optimizer, LR and targeting schedules, RNG states),
    without the expected warning about tied weights (:func:`quiet_tied_weights_notice`)."""
    with quiet_tied_weights_notice(model):
        accelerator.save_state(str(path))


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


if __name__ == "__main__":
    main(args=ARGS)
