"""``transformers.Trainer`` integration: a callback that drives α/γ from a :class:`TargetingSchedule`.

Step semantics: at ``on_step_begin`` ``state.global_step`` is the number of optimizer updates done
so far, and the callback sets every patched layer to ``schedule.at(state.global_step)``. The Trainer
calls ``on_step_begin`` once per optimizer update (not per gradient-accumulation micro-batch), so
gradient accumulation, ``max_steps`` and epochs all see the same α/γ per update. ``global_step`` is
restored from ``trainer_state.json`` on ``resume_from_checkpoint``, so a resumed run applies exactly
the values an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from transformers import TrainerCallback

from ._utils import unwrap_model
from .batchnorm import DEFAULT_RECALIBRATION_BATCHES, check_num_batches, has_batchnorm, recalibrate_batchnorm
from .constants import CONFIG_ATTR, TRAINING_CONFIG_NAME
from .methods.base import method_layers
from .methods.regularization import regularization_loss
from .methods.targeted_dropout import TargetedDropoutConfig
from .patching import is_patched, patch_model, set_targeting
from .schedules import (
    TargetingSchedule,
    check_config_agrees,
    record_schedule,
    record_targeting,
    warn_if_patched_differently,
)

logger = logging.getLogger(__name__)

LOG_KEYS = ("tdrop_alpha", "tdrop_gamma")
"""Keys under which :class:`TargetedDropoutCallback` adds α and γ to the Trainer's training logs."""

_PATCH_FIELDS_IGNORED = ("alpha", "gamma", "extra")
"""Config fields a schedule (or its record) changes; the others decide which layers are patched and how."""


def _same_patching(a, b) -> bool:
    """True if two configs patch the same layers the same way (α/γ and ``extra`` aside)."""
    if type(a) is not type(b):
        return False
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a)
               if f.name not in _PATCH_FIELDS_IGNORED)


def _save_training_config(model, directory: str, state) -> None:
    """Write the model's training config (``model.tdrop_config``) as ``tdrop_training_config.json``
    into ``directory``, on the main process; the command line reads its targets from there."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not directory or not getattr(state, "is_world_process_zero", True):
        return
    try:
        config.save_pretrained(directory)
    except OSError as err:  # a read-only or vanished directory must not fail the training run
        logger.warning("Could not write %s into %s: %s", TRAINING_CONFIG_NAME, directory, err)


def _checkpoint_dir(args, state) -> str:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class TargetedDropoutCallback(TrainerCallback):
    """Ramp targeted dropout's α and γ during ``Trainer`` / ``Seq2SeqTrainer`` training.

    One source of truth for α/γ: the schedule's targets are what is trained. ``config`` (which
    only says how to patch) must have the same α/γ (else ``ValueError`` at construction); a model
    already patched with other α/γ gets one warning at train start. Every time the callback applies
    α/γ it also writes them to ``model.tdrop_config.alpha``/``gamma``, so the config that
    :func:`hf_tdrop.save_pruned` and ``tdrop_training_config.json`` record holds the values actually
    applied (after training: the targets, or where the ramp stopped if it was cut short).

    - ``on_train_begin``: optionally patches the model from ``config``; raises ``ValueError`` if
      the model has no patched layer; resolves a ``ramp_fraction`` schedule from
      ``state.max_steps`` (see :attr:`resolved_schedule`); warns (``logger.warning``, with the
      numbers) if the targets are reached only after the last step; records the resolved schedule
      in ``model.tdrop_config.extra["schedule"]``; applies ``schedule.at(state.global_step)``.
    - ``on_step_begin``: applies ``schedule.at(state.global_step)`` — the values used by all the
      forward passes of that optimizer update.
    - ``on_save``: writes the training config (``tdrop_training_config.json``: mode, targets,
      α/γ, schedule) into the checkpoint directory just saved, so ``hf-tdrop prune`` prunes the
      layers that were trained.
    - ``on_log``: adds ``tdrop_alpha`` / ``tdrop_gamma`` — the values used by the update just
      finished, i.e. ``schedule.at(step - 1)`` for a log entry at ``step`` (like the Trainer's
      ``learning_rate``) — to every training log (the entries carrying ``loss``), both to the
      ``logs`` passed on to later callbacks and to ``state.log_history``.
    - ``on_train_end``: applies ``schedule.at(state.global_step)``, so after training the model
      holds the values of the next update (the targets once the ramp is done); then, if the model
      has BatchNorm layers, re-estimates their running statistics on ``bn_recalibration_batches``
      training batches with nothing dropped (:func:`hf_tdrop.recalibrate_batchnorm`): the
      statistics gathered during training are those of the thinned network, and a checkpoint saved
      with them evaluates far below its real accuracy. ``Trainer.save_model`` after ``train()``
      then saves statistics of the network as it is evaluated (the per-epoch resume checkpoints
      written during training keep the training statistics). Finally it writes
      ``tdrop_training_config.json`` into ``args.output_dir`` (with ``save_config``; when you save
      the model elsewhere, call ``model.tdrop_config.save_pretrained(that_dir)``).

    The Trainer calls its ``report_to`` integrations (TensorBoard, W&B, ...) *before* callbacks
    passed as ``Trainer(callbacks=[...])``; for α/γ to reach them, add the callback with
    :meth:`attach`, which puts it ahead of them. ``trainer_state.json``'s ``log_history`` and the
    console logs get the keys either way.

    Args:
        schedule: the :class:`TargetingSchedule`.
        config: optional :class:`TargetedDropoutConfig`; if given, an unpatched model is patched
            with it at ``on_train_begin`` (a model already patched the same way — same mode,
            targets and options — is accepted). Its ``alpha``/``gamma`` must equal the schedule's.
        log_values: add ``tdrop_alpha``/``tdrop_gamma`` to the logs (default True).
        bn_recalibration_batches: training batches used to re-estimate BatchNorm statistics at the
            end of training (default 50; ``0`` turns it off; ignored for models without BatchNorm).
        save_config: write ``tdrop_training_config.json`` into every checkpoint and, at the end of
            training, into ``args.output_dir`` (default True).

    Raises:
        ValueError: a bad argument, or ``config``'s α/γ differ from the schedule's targets.
    """

    def __init__(self, schedule: TargetingSchedule, config: Optional[TargetedDropoutConfig] = None,
                 log_values: bool = True, bn_recalibration_batches: int = DEFAULT_RECALIBRATION_BATCHES,
                 save_config: bool = True):
        if not isinstance(schedule, TargetingSchedule):
            raise ValueError(f"`schedule` must be a TargetingSchedule, got {type(schedule).__name__}.")
        if config is not None and not isinstance(config, TargetedDropoutConfig):
            raise ValueError(f"`config` must be a TargetedDropoutConfig or None, got {type(config).__name__}.")
        if config is not None:
            check_config_agrees(config, schedule, "TargetedDropoutCallback")
        for flag, value in (("log_values", log_values), ("save_config", save_config)):
            if not isinstance(value, bool):
                raise ValueError(f"`{flag}` must be True or False, got {value!r}.")
        self.save_config = save_config
        if bn_recalibration_batches != 0:
            check_num_batches(bn_recalibration_batches, "bn_recalibration_batches", allow_none=False)
        self.bn_recalibration_batches = bn_recalibration_batches
        self.schedule = schedule
        self.config = config
        self.log_values = log_values
        self.resolved_schedule: Optional[TargetingSchedule] = schedule if schedule.is_resolved else None
        self._attached = False
        self._model = None
        self._last_values: Optional[dict] = None

    # ------------------------------------------------------------------ placement
    def attach(self, trainer) -> "TargetedDropoutCallback":
        """Add this callback to ``trainer`` ahead of all its other callbacks (so the ``report_to``
        integrations see ``tdrop_alpha``/``tdrop_gamma``); moves it there if already added.
        Returns ``self``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return self

    # ------------------------------------------------------------------ events
    def _apply(self, step: int) -> None:
        values = self.resolved_schedule.at(step)
        set_targeting(self._model, alpha=values["alpha"], gamma=values["gamma"])
        record_targeting(self._model, values)
        self._last_values = values

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("TargetedDropoutCallback: the Trainer passed no model to on_train_begin.")
        model = unwrap_model(model)
        if self.config is not None:
            if not is_patched(model):
                patch_model(model, config=self.config)
            elif not _same_patching(getattr(model, CONFIG_ATTR, None), self.config):
                raise ValueError(
                    "TargetedDropoutCallback(config=...): the model is already patched with different settings "
                    f"({getattr(model, CONFIG_ATTR, None)}); drop `config` or call unpatch_model(model) first."
                )
        elif not is_patched(model):
            raise ValueError(
                f"TargetedDropoutCallback: the model ({type(model).__name__}) is not patched for targeted "
                "dropout. Call hf_tdrop.patch_model(model, ...) before training, or pass "
                "TargetedDropoutCallback(schedule, config=TargetedDropoutConfig(...)) to patch it at train start."
            )
        else:
            warn_if_patched_differently(model, self.schedule, "TargetedDropoutCallback")
        self._model = model
        self.resolved_schedule = self.schedule.resolve(state.max_steps)
        self.resolved_schedule.check_total_steps(state.max_steps)
        record_schedule(model, self.resolved_schedule)
        if args.report_to and not self._attached:
            logger.warning(
                "TargetedDropoutCallback: report_to=%s integrations run before callbacks passed to "
                "Trainer(callbacks=...), so they will not receive tdrop_alpha/tdrop_gamma; use "
                "TargetedDropoutCallback(...).attach(trainer) instead.", args.report_to,
            )
        self._apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_values or logs is None or "loss" not in logs or self._last_values is None:
            return
        values = dict(zip(LOG_KEYS, (self._last_values["alpha"], self._last_values["gamma"])))
        logs.update(values)
        # Trainer.log appended {**logs, "step": ...} to log_history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(values)

    def on_save(self, args, state, control, **kwargs):
        if self.save_config and self._model is not None and os.path.isdir(_checkpoint_dir(args, state)):
            _save_training_config(self._model, _checkpoint_dir(args, state), state)

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        if self._model is None:
            return
        self._apply(state.global_step)
        if self.save_config:
            _save_training_config(self._model, args.output_dir, state)
        if self.bn_recalibration_batches and has_batchnorm(self._model):
            if train_dataloader is None:
                logger.warning("TargetedDropoutCallback: the Trainer passed no train_dataloader to on_train_end; "
                               "BatchNorm statistics are left as trained (those of the dropped-out network).")
                return
            used = recalibrate_batchnorm(self._model, train_dataloader, self.bn_recalibration_batches)
            logger.info("TargetedDropoutCallback: BatchNorm statistics re-estimated on %d training batches "
                        "with nothing dropped.", used)


REGULARIZATION_LOG_KEY = "regularization_loss"
"""Key under which :class:`RegularizationCallback` adds the last regularisation term to the training logs."""


class RegularizationCallback(TrainerCallback):
    """Add :func:`hf_tdrop.regularization_loss` (L1, expected L0, variational KL, Smallify switch L1)
    to ``Trainer`` training, with no Trainer subclass.

    At every optimizer update (``on_pre_optimizer_step``, after the Trainer's backward passes of all
    its gradient-accumulation micro-batches) it computes ``regularization_loss(model,
    step=state.global_step)`` and back-propagates it once, so its gradient enters the update exactly
    once, whatever the gradient accumulation and loss normalisation. With a fp16 ``GradScaler`` the
    gradients are unscaled first. Differences from adding the term to the loss: the Trainer's
    gradient clipping (``max_grad_norm``) has already run and does not see this gradient, and the
    logged ``loss`` is the task loss; the term itself is logged as ``regularization_loss``.
    The method's extra parameters are trained by the Trainer's optimizer (patch the model before
    ``Trainer.train()`` creates it) and checkpointed with the model. With ``save_config`` (default
    True) the method's config is written as ``tdrop_training_config.json`` into every checkpoint and,
    at the end of training, into ``args.output_dir``: with it, ``hf-tdrop prune --method gates`` can
    prune a checkpoint saved during training (its weights still hold the learned scores).

    Example::

        patch_model(model, config=L0Config(dataset_size=len(train_ds)))
        trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                          callbacks=[RegularizationCallback()])
        trainer.train()
        finalize_model(model)
    """

    def __init__(self, log_values: bool = True, save_config: bool = True):
        for flag, value in (("log_values", log_values), ("save_config", save_config)):
            if not isinstance(value, bool):
                raise ValueError(f"`{flag}` must be True or False, got {value!r}.")
        self.log_values = log_values
        self.save_config = save_config
        self._last: Optional[float] = None
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not method_layers(unwrap_model(model)):
            raise ValueError("RegularizationCallback: the model has no layer patched with a training method; "
                             "call hf_tdrop.patch_model(model, config=...) before Trainer.train().")
        self._model = unwrap_model(model)

    def on_save(self, args, state, control, **kwargs):
        if self.save_config and self._model is not None and os.path.isdir(_checkpoint_dir(args, state)):
            _save_training_config(self._model, _checkpoint_dir(args, state), state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.save_config and self._model is not None:
            _save_training_config(self._model, args.output_dir, state)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        with torch.enable_grad():
            loss = regularization_loss(unwrap_model(model), step=state.global_step)
        self._last = float(loss.detach())
        if not loss.requires_grad:
            return
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer under fp16
        if scaler is not None and scaler.is_enabled():
            try:
                scaler.unscale_(optimizer.optimizer)
            except RuntimeError:  # already unscaled this step (by gradient clipping)
                pass
        loss.backward()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_values or logs is None or "loss" not in logs or self._last is None:
            return
        logs[REGULARIZATION_LOG_KEY] = self._last
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1][REGULARIZATION_LOG_KEY] = self._last
