"""Schedules that ramp targeted dropout's α and γ during training, and a step-based scheduler.

The paper's best results anneal the targeting from 0 to its targets ("ramp targ", Gomez et al.,
2019, Tables 6-7). A :class:`TargetingSchedule` is a pure function of the global step (the number
of optimizer updates done so far), so resuming from a checkpoint needs nothing but that step.

:class:`TargetingScheduler` applies a schedule to a patched model in a plain PyTorch / accelerate
loop, like an LR scheduler; the Trainer integration lives in :mod:`hf_tdrop.callback`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from ._utils import unwrap_model
from .config import check_fraction
from .constants import CONFIG_ATTR
from .patching import set_targeting

logger = logging.getLogger(__name__)

SCHEDULE_KINDS = ("constant", "linear", "cosine", "piecewise")
"""Ramp shapes of :class:`TargetingSchedule`."""


def _check_steps(name: str, value: Any, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    return int(value)


@dataclass(frozen=True)
class TargetingSchedule:
    """α(step) and γ(step): targeted dropout ramped from start values to targets.

    ``step`` is the number of optimizer updates done so far (0 for the first update). Let
    ``s = max(0, step - delay_steps)``, ``N = ramp_steps`` and ``f(s)`` the ramp fraction in [0, 1];
    then ``value(step) = start + (target - start) * f(s)`` (exactly ``target`` once ``f = 1``, and
    exactly ``start`` during the delay). The kinds:

    - ``"constant"``: ``f = 1`` (the target at every step from ``delay_steps`` on; the ramp
      arguments are ignored).
    - ``"linear"``: ``f = min(1, s / N)`` for both α and γ.
    - ``"cosine"``: ``f = (1 - cos(π · min(1, s / N))) / 2`` for both α and γ.
    - ``"piecewise"``: the reference code's ramp. γ: ``f = 0.95 · s / N`` for ``s < N``,
      ``f = 0.95 + 0.05 · (s - N) / N`` for ``N <= s < 2N``, then 1 (95 % of the target after
      ``N`` steps, 100 % after ``2N``). α: ``f = min(1, s / (2N))``. With zero starts this is
      ``γ = 0.95·γ_t·s/N``, ``γ_t·(0.95 + 0.05·(s-N)/N)``, ``γ_t``; ``α = α_t·min(1, s/(2N))``.

    ``N = 0`` means no ramp (``f = 1``). The ramp length is given either in steps (``ramp_steps``)
    or as a fraction of the total number of training steps (``ramp_fraction``); a fractional
    schedule must be :meth:`resolve`-d against the total before use (the Trainer callback and
    :class:`TargetingScheduler` do it), giving ``ramp_steps = max(1, round(ramp_fraction · total))``
    (0 for a zero fraction). For ``"piecewise"`` this ``N`` is the reference's ramp parameter, so the
    targets are reached at ``2N``.

    Args:
        alpha: target drop probability α_t, in [0, 1].
        gamma: target targeted fraction γ_t, in [0, 1].
        kind: one of :data:`SCHEDULE_KINDS`.
        ramp_steps: ramp length N in optimizer steps (non-negative integer).
        ramp_fraction: ramp length as a fraction of the total training steps, in [0, 1].
            Non-constant kinds need exactly one of ``ramp_steps`` / ``ramp_fraction``.
        delay_steps: warm-up steps held at the start values before the ramp begins.
        alpha_start, gamma_start: values at the start of the ramp (default 0, as in the paper).

    Raises:
        ValueError: unknown ``kind``, negative or non-integer steps, values outside [0, 1], or a
            missing / doubly given ramp length (naming the argument and the allowed values).
    """

    alpha: float
    gamma: float
    kind: str = "linear"
    ramp_steps: Optional[int] = None
    ramp_fraction: Optional[float] = None
    delay_steps: int = 0
    alpha_start: float = 0.0
    gamma_start: float = 0.0

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in ("alpha", "gamma", "alpha_start", "gamma_start"):
            put(name, check_fraction(name, getattr(self, name)))
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"`kind` must be one of {list(SCHEDULE_KINDS)}, got {self.kind!r}.")
        put("ramp_steps", _check_steps("ramp_steps", self.ramp_steps, allow_none=True))
        put("delay_steps", _check_steps("delay_steps", self.delay_steps))
        if self.ramp_fraction is not None:
            put("ramp_fraction", check_fraction("ramp_fraction", self.ramp_fraction))
        if self.kind != "constant":
            given = [n for n in ("ramp_steps", "ramp_fraction") if getattr(self, n) is not None]
            if len(given) != 1:
                raise ValueError(
                    f"kind={self.kind!r} needs exactly one of `ramp_steps` (steps) or `ramp_fraction` "
                    f"(fraction of the total training steps), got {given or 'neither'}."
                )

    # ------------------------------------------------------------------ resolution / metadata
    @property
    def is_resolved(self) -> bool:
        """False while the ramp length is a fraction of a yet unknown total (see :meth:`resolve`)."""
        return self.kind == "constant" or self.ramp_fraction is None

    def resolve(self, total_steps: int) -> "TargetingSchedule":
        """A copy whose ramp is in steps: ``ramp_steps = max(1, round(ramp_fraction · total_steps))``
        (0 for a zero fraction) and ``ramp_fraction = None``. Schedules already in steps (and
        ``"constant"`` ones) are returned unchanged (as an equal copy)."""
        total_steps = _check_steps("total_steps", total_steps)
        if self.is_resolved:
            return dataclasses.replace(self)
        n = 0 if self.ramp_fraction == 0 else max(1, round(self.ramp_fraction * total_steps))
        return dataclasses.replace(self, ramp_steps=n, ramp_fraction=None)

    @property
    def target_step(self) -> int:
        """First step at which both α and γ equal their targets (needs a resolved schedule):
        ``delay_steps`` for ``"constant"``, ``delay_steps + N`` for ``"linear"``/``"cosine"``,
        ``delay_steps + 2N`` for ``"piecewise"``."""
        self._require_resolved("target_step")
        if self.kind == "constant":
            return self.delay_steps
        return self.delay_steps + (2 if self.kind == "piecewise" else 1) * self.ramp_steps

    def check_total_steps(self, total_steps: int) -> bool:
        """Log a warning (and return False) if the targets are reached only after ``total_steps``
        optimizer steps, i.e. :attr:`target_step` ``> total_steps``: training never uses them."""
        reached = self.target_step
        if reached > total_steps:
            end = self.at(max(total_steps - 1, 0))
            logger.warning(
                "Targeted-dropout schedule (%s) reaches its targets alpha=%g, gamma=%g only at step %d, but "
                "training has %d steps: the targets will never be reached (the last step uses "
                "alpha=%.4g, gamma=%.4g). Shorten the ramp (ramp_steps/ramp_fraction/delay_steps) or train longer.",
                self.kind, self.alpha, self.gamma, reached, total_steps, end["alpha"], end["gamma"],
            )
            return False
        return True

    def to_dict(self) -> dict:
        """JSON-friendly fields (e.g. for ``TargetedDropoutConfig.extra`` / export metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TargetingSchedule":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown TargetingSchedule fields {unknown}; allowed: {sorted(known)}.")
        return cls(**data)

    # ------------------------------------------------------------------ values
    def _require_resolved(self, caller: str) -> None:
        if not self.is_resolved:
            raise ValueError(
                f"TargetingSchedule.{caller}: the ramp is given as ramp_fraction={self.ramp_fraction}; "
                "call schedule.resolve(total_steps) first (the Trainer callback and TargetingScheduler "
                "do it from the number of training steps)."
            )

    def _fractions(self, step: int) -> tuple[float, float]:
        """(f_alpha, f_gamma) in [0, 1] at ``step``."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"`step` must be a non-negative integer, got {step!r}.")
        self._require_resolved("at")
        if step < self.delay_steps:
            return 0.0, 0.0
        s, n = int(step) - self.delay_steps, self.ramp_steps
        if self.kind == "constant" or n == 0:
            return 1.0, 1.0
        if self.kind == "linear":
            f = min(1.0, s / n)
            return f, f
        if self.kind == "cosine":
            f = 0.5 * (1.0 - math.cos(math.pi * min(1.0, s / n)))
            return f, f
        # piecewise (reference code)
        if s < n:
            f_gamma = 0.95 * s / n
        elif s < 2 * n:
            f_gamma = 0.95 + 0.05 * (s - n) / n
        else:
            f_gamma = 1.0
        return min(1.0, s / (2 * n)), f_gamma

    @staticmethod
    def _interp(start: float, target: float, f: float) -> float:
        if f >= 1.0:
            return target
        if f <= 0.0:
            return start
        return min(1.0, max(0.0, start + (target - start) * f))

    def at(self, step: int) -> dict:
        """``{"alpha": α(step), "gamma": γ(step)}``."""
        fa, fg = self._fractions(step)
        return {"alpha": self._interp(self.alpha_start, self.alpha, fa),
                "gamma": self._interp(self.gamma_start, self.gamma, fg)}

    def alpha_at(self, step: int) -> float:
        """α after ``step`` optimizer updates."""
        return self.at(step)["alpha"]

    def gamma_at(self, step: int) -> float:
        """γ after ``step`` optimizer updates."""
        return self.at(step)["gamma"]


def record_schedule(model: nn.Module, schedule: TargetingSchedule) -> None:
    """Store ``schedule.to_dict()`` under ``extra["schedule"]`` of the model's
    ``TargetedDropoutConfig`` (set by ``patch_model``), so exported metadata records the ramp."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is not None:
        config.extra["schedule"] = schedule.to_dict()


def record_targeting(model: nn.Module, values: dict) -> None:
    """Set ``alpha``/``gamma`` of the model's config (``model.tdrop_config``, set by ``patch_model``)
    to ``values``, the α/γ just applied to its layers: the recorded config says what was trained,
    whatever α/γ the model was patched with."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is not None and hasattr(config, "alpha") and hasattr(config, "gamma"):
        config.alpha, config.gamma = values["alpha"], values["gamma"]


def check_config_agrees(config: Any, schedule: TargetingSchedule, caller: str) -> None:
    """Raise a one-line ``ValueError`` if ``config``'s α/γ differ from the schedule's targets: the
    schedule sets α/γ during training, so two different values for the same setting is a mistake."""
    if (config.alpha, config.gamma) != (schedule.alpha, schedule.gamma):
        raise ValueError(
            f"{caller}: `config` has alpha={config.alpha:g}, gamma={config.gamma:g} but the schedule's targets are "
            f"alpha={schedule.alpha:g}, gamma={schedule.gamma:g}; the schedule sets alpha/gamma during training, "
            "so give the config the schedule's targets."
        )


def warn_if_patched_differently(model: nn.Module, schedule: TargetingSchedule, caller: str) -> bool:
    """Log one warning (and return True) if the model was patched with α/γ other than the
    schedule's targets; the schedule wins, and the recorded config follows what it applies. A model
    a schedule has already driven (``extra["schedule"]`` recorded) is not warned about again."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not hasattr(config, "alpha") or not hasattr(config, "gamma"):
        return False
    if "schedule" in config.extra:  # already driven by a schedule: its α/γ are that schedule's, not the patch's
        return False
    if (config.alpha, config.gamma) == (schedule.alpha, schedule.gamma):
        return False
    logger.warning(
        "%s: the model was patched with alpha=%g, gamma=%g, but the schedule's targets are alpha=%g, gamma=%g; "
        "the schedule sets alpha/gamma during training, and model.tdrop_config (what save_pruned records) "
        "follows the values it applies.", caller, config.alpha, config.gamma, schedule.alpha, schedule.gamma,
    )
    return True


class TargetingScheduler:
    """Apply a :class:`TargetingSchedule` to a patched model in a plain PyTorch / accelerate loop.

    The schedule's targets are what is trained: a model patched with other α/γ gets one warning,
    and ``model.tdrop_config.alpha``/``gamma`` follow the values applied (what
    :func:`hf_tdrop.save_pruned` records).

    Works like an LR scheduler: the constructor applies step 0 (α(0), γ(0)) to every patched layer;
    each :meth:`step` — call it once per optimizer update, after ``optimizer.step()`` — increments
    :attr:`last_step` and applies α/γ at the new step. So the forward passes of update ``k`` (all
    its gradient-accumulation micro-batches) use ``schedule.at(k)``, as with
    :class:`~hf_tdrop.TargetedDropoutCallback`.

    :meth:`state_dict` / :meth:`load_state_dict` hold the step, so
    ``accelerator.register_for_checkpointing(scheduler)`` + ``save_state`` / ``load_state`` resume
    exactly (``load_state_dict`` re-applies the restored step to the model).

    Args:
        model: a patched model (possibly wrapped by DDP / accelerate).
        schedule: the schedule; one given by ``ramp_fraction`` needs ``total_steps``.
        total_steps: number of optimizer updates of the run; resolves ``ramp_fraction`` and warns
            (``logger.warning``) if the targets would be reached only after training ends.

    Raises:
        ValueError: the model has no patched layer, ``schedule`` is not a ``TargetingSchedule``,
            or a fractional ramp without ``total_steps``.
    """

    def __init__(self, model: nn.Module, schedule: TargetingSchedule, total_steps: Optional[int] = None):
        if not isinstance(schedule, TargetingSchedule):
            raise ValueError(f"`schedule` must be a TargetingSchedule, got {type(schedule).__name__}.")
        total_steps = _check_steps("total_steps", total_steps, allow_none=True)
        if not schedule.is_resolved and total_steps is None:
            raise ValueError(
                f"The schedule's ramp is ramp_fraction={schedule.ramp_fraction}: pass `total_steps` "
                "(number of optimizer updates) to TargetingScheduler, or give `ramp_steps` instead."
            )
        self.schedule = schedule.resolve(total_steps) if total_steps is not None else schedule
        self.total_steps = total_steps
        self.model = model
        self.last_step = 0
        self._apply(check=True)  # raises ValueError if the model is not patched
        if total_steps is not None:
            self.schedule.check_total_steps(total_steps)
        record_schedule(unwrap_model(model), self.schedule)

    def _apply(self, check: bool = False) -> None:
        values = self.schedule.at(self.last_step)
        set_targeting(self.model, alpha=values["alpha"], gamma=values["gamma"])
        if check:
            warn_if_patched_differently(unwrap_model(self.model), self.schedule, "TargetingScheduler")
        record_targeting(unwrap_model(self.model), values)
        self._last_values = values

    def step(self) -> None:
        """One optimizer update done: ``last_step += 1`` and apply α/γ at the new step."""
        self.last_step += 1
        self._apply()

    def get_last_targeting(self) -> dict:
        """``{"alpha", "gamma"}`` currently applied (``schedule.at(last_step)``), e.g. to log."""
        return dict(self._last_values)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "schedule": self.schedule.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :attr:`last_step` and apply its α/γ. A saved schedule that differs from this
        scheduler's is reported with a warning; this scheduler's own schedule is kept."""
        step = _check_steps("state_dict['last_step']", state_dict.get("last_step"))
        saved = state_dict.get("schedule")
        if saved is not None and saved != self.schedule.to_dict():
            logger.warning("TargetingScheduler.load_state_dict: the checkpoint was saved with schedule %s, "
                           "this scheduler uses %s; continuing with the latter.", saved, self.schedule.to_dict())
        self.last_step = step
        self._apply()

    def __repr__(self) -> str:
        return f"TargetingScheduler(last_step={self.last_step}, schedule={self.schedule})"
