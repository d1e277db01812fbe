"""``transformers.Trainer`` integration: a callback that drives α/γ from a :class:`TargetingSchedule`.

Step semantics: at ``on_step_begin`` ``state.global_step`` is the number of optimizer updates done
so far, and the callback sets every patched layer to ``schedule.at(state.global_step)``. The Trainer
calls ``on_step_begin`` once per optimizer update (not per gradient-accumulation micro-batch), so
gradient accumulation, ``max_steps`` and epochs all see the same α/γ per update. ``global_step`` is
restored from ``trainer_state.json`` on ``resume_from_checkpoint``, so a resumed run applies exactly
the values an uninterrupted run would.
"""

from __future__ import annotations

import logging
from typing import Optional

from transformers import TrainerCallback

from ._utils import unwrap_model
from .batchnorm import DEFAULT_RECALIBRATION_BATCHES, check_num_batches, has_batchnorm, recalibrate_batchnorm
from .config import TargetedDropoutConfig
from .patching import CONFIG_ATTR, is_patched, patch_model, set_targeting
from .schedules import TargetingSchedule, record_schedule

logger = logging.getLogger(__name__)

LOG_KEYS = ("tdrop_alpha", "tdrop_gamma")
"""Keys under which :class:`TargetedDropoutCallback` adds α and γ to the Trainer's training logs."""


class TargetedDropoutCallback(TrainerCallback):
    """Ramp targeted dropout's α and γ during ``Trainer`` / ``Seq2SeqTrainer`` training.

    - ``on_train_begin``: optionally patches the model from ``config``; raises ``ValueError`` if
      the model has no patched layer; resolves a ``ramp_fraction`` schedule from
      ``state.max_steps`` (see :attr:`resolved_schedule`); warns (``logger.warning``, with the
      numbers) if the targets are reached only after the last step; records the resolved schedule
      in ``model.tdrop_config.extra["schedule"]``; applies ``schedule.at(state.global_step)``.
    - ``on_step_begin``: applies ``schedule.at(state.global_step)`` — the values used by all the
      forward passes of that optimizer update.
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
      written during training keep the training statistics).

    The Trainer calls its ``report_to`` integrations (TensorBoard, W&B, ...) *before* callbacks
    passed as ``Trainer(callbacks=[...])``; for α/γ to reach them, add the callback with
    :meth:`attach`, which puts it ahead of them. ``trainer_state.json``'s ``log_history`` and the
    console logs get the keys either way.

    Args:
        schedule: the :class:`TargetingSchedule`.
        config: optional :class:`TargetedDropoutConfig`; if given, an unpatched model is patched
            with it at ``on_train_begin`` (a model already patched with an equal config is accepted).
        log_values: add ``tdrop_alpha``/``tdrop_gamma`` to the logs (default True).
        bn_recalibration_batches: training batches used to re-estimate BatchNorm statistics at the
            end of training (default 50; ``0`` turns it off; ignored for models without BatchNorm).
    """

    def __init__(self, schedule: TargetingSchedule, config: Optional[TargetedDropoutConfig] = None,
                 log_values: bool = True, bn_recalibration_batches: int = DEFAULT_RECALIBRATION_BATCHES):
        if not isinstance(schedule, TargetingSchedule):
            raise ValueError(f"`schedule` must be a TargetingSchedule, got {type(schedule).__name__}.")
        if config is not None and not isinstance(config, TargetedDropoutConfig):
            raise ValueError(f"`config` must be a TargetedDropoutConfig or None, got {type(config).__name__}.")
        if not isinstance(log_values, bool):
            raise ValueError(f"`log_values` must be True or False, got {log_values!r}.")
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
        self._last_values = values

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("TargetedDropoutCallback: the Trainer passed no model to on_train_begin.")
        model = unwrap_model(model)
        if self.config is not None:
            if not is_patched(model):
                patch_model(model, config=self.config)
            elif getattr(model, CONFIG_ATTR, None) != self.config:
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

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        if self._model is None:
            return
        self._apply(state.global_step)
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
    ``Trainer.train()`` creates it) and checkpointed with the model.

    Example::

        patch_model(model, config=L0Config(dataset_size=len(train_ds)))
        trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                          callbacks=[RegularizationCallback()])
        trainer.train()
        finalize_model(model)
    """

    def __init__(self, log_values: bool = True):
        if not isinstance(log_values, bool):
            raise ValueError(f"`log_values` must be True or False, got {log_values!r}.")
        self.log_values = log_values
        self._last: Optional[float] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .methods.base import method_layers

        if model is None or not method_layers(unwrap_model(model)):
            raise ValueError("RegularizationCallback: the model has no layer patched with a training method; "
                             "call hf_tdrop.patch_model(model, config=...) before Trainer.train().")

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        from .methods.base import regularization_loss

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
