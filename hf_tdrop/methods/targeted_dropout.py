"""Targeted dropout (Gomez et al., 2019): the config, the per-layer state and the handler.

At every training forward pass of a patched layer, the ``gamma`` fraction of lowest-magnitude
elements (weights of each w_o, whole units, or the N:M-prunable entries) is selected and each is
dropped with probability ``alpha``. Selection and sampling run inside :func:`sample_drop_mask`,
which layers call through a lazily created ``torch.compiler.disable`` wrapper: ``torch.compile``
does not trace it, so α and γ can change at every step without recompiling the model.

The targeted set is ranked once per optimizer step (:func:`hf_tdrop.layers.optimizer_steps`) and
reused by every forward pass of that step while the weight is unchanged; with ``refresh_every > 1``
it is kept for that many optimizer steps. The masked forward keeps only a bool mask for backward
(:class:`hf_tdrop.layers.MaskedLinearFunction`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import masking
from ..config import MODES, check_flag, check_fraction, check_int, check_mode, check_nm
from ..constants import METHOD_ATTR, TARGETED_DROPOUT
from ..layers import check_materialized
from ..tracking import held_zeros, optimizer_steps
from .base import Method, MethodConfig, register_method

__all__ = ["MODES", "REUSE_WITHIN_STEP", "TargetedDropout", "TargetedDropoutConfig", "TargetingState",
           "sample_drop_mask", "targeted_set"]


@dataclass
class TargetedDropoutConfig(MethodConfig):
    """Targeted dropout settings (Gomez et al., 2019, arXiv:1905.13678).

    At every training forward pass of a targeted layer, the ``gamma`` fraction of lowest-magnitude
    elements is selected and each selected element is dropped (zeroed) with probability ``alpha``.
    The expected fraction of weights kept is ``1 - gamma * alpha``. Entries held at zero by
    :func:`hf_tdrop.hold_pruned` are never targeted: the targeted set is chosen among the survivors.

    Args:
        alpha: drop probability of a targeted element, in [0, 1] (applied at a resolution of
            ``2**-16``: the draws are 16-bit random words, see ``masking.sample_drop``).
        gamma: targeted fraction, in [0, 1]. Weight mode targets ``floor(gamma * fan_in)`` entries of
            each output unit's weight vector w_o; unit mode targets ``floor(gamma * n_out)`` units;
            nm mode targets ``floor(gamma * T)`` of the ``T`` groups of each w_o that have entries
            to target (see ``n``/``m``), so ``gamma = 1`` targets every group and a γ ramp grows the
            N:M-targeted part of each row group by group.
        mode: ``"weight"``, ``"unit"`` or ``"nm"``.
        n, m: the N:M pattern of nm mode (integers, ``1 <= n < m``; default 2:4; validated in every
            mode, used only by nm). Each w_o (the ``[n_out, fan_in]`` view: Linear rows, the columns
            of transformers' ``Conv1D`` ``[in, out]`` weight, a ConvNd output channel's flattened
            ``in * kernel`` inputs) is cut into groups of ``m`` consecutive inputs; in a group its
            ``m - n`` smallest-|w| entries (ties: lowest index first, ranked in float32) are the
            group's targeted set, each dropped with probability α. When ``m`` does not divide
            ``fan_in`` the last group has ``r < m`` entries and is treated as zero-padded to ``m``:
            its ``max(0, r - n)`` smallest entries are targeted (``T`` counts this group only when
            ``r > n``). With ``gamma < 1`` the targeted groups of a row are the ``floor(gamma * T)``
            whose targeted entries have the smallest sum of |w| (summed in float64; ties: lowest group
            index first). The expected kept fraction is about ``1 - gamma * alpha * (m - n) / m``.
        target_modules: which layers to patch. ``None`` = every supported layer (``nn.Linear``,
            transformers' ``Conv1D``, ``nn.Conv1d/2d/3d``) except output heads and layers tied to
            embeddings. A string or list of strings; each pattern matches a module's full name
            exactly, as a dotted suffix (``"query"`` matches ``encoder.layer.0.attention.self.query``),
            or as a regex (``re.fullmatch``).
        exclude_modules: patterns (same rules) of layers never to patch.
        rescale: if True, scale kept weights by ``1 / (1 - gamma * alpha)`` during training
            (``1 / (1 - gamma * alpha * (m - n) / m)`` in nm mode; the reference implementation does
            not rescale; off by default).
        drop_targeted_at_eval: if True, the targeted set is removed (zeroed) in eval mode, as in the
            reference code's evaluation. Default False: in ``eval()`` a patched layer computes exactly
            what the unpatched layer computes.
        refresh_every: recompute the targeted set (the per-unit magnitude ranking) only every
            this many optimizer steps (``step()`` calls of the ``torch.optim`` optimizer holding the
            layer's weight, whatever its implementation; several forward passes per step, as with
            gradient accumulation or checkpointing, count once); the Bernoulli(α) draw is still
            fresh at every forward. 1 (default) re-targets at every forward, exactly as the paper;
            larger values trade exactness for speed, like the paper's Algorithm 1 which re-targets
            every few epochs. A change of γ always re-targets.
    """

    alpha: float
    gamma: float
    mode: str = "weight"
    rescale: bool = False
    drop_targeted_at_eval: bool = False
    refresh_every: int = 1
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = check_fraction("alpha", self.alpha)
        self.gamma = check_fraction("gamma", self.gamma)
        check_mode(self.mode)
        self.n, self.m = check_nm(self.n, self.m)
        check_flag("rescale", self.rescale)
        check_flag("drop_targeted_at_eval", self.drop_targeted_at_eval)
        check_int("refresh_every", self.refresh_every, 1)

    def to_dict(self) -> dict:
        """The fields as a JSON-friendly dict, without a ``"method"`` key (the format earlier
        versions wrote and read; a dict without ``"method"`` is a targeted-dropout config)."""
        return dataclasses.asdict(self)

    def run_label(self) -> str:
        return f"targeted α={self.alpha:g} γ={self.gamma:g}"

    def card_rows(self) -> list[tuple[str, object]]:
        return [("targeted dropout α (alpha)", self.alpha), ("targeted dropout γ (gamma)", self.gamma),
                ("targeted dropout mode", self.mode)]


@dataclass
class TargetingState:
    """Targeted-dropout settings of one patched layer (``layer.tdrop_method.config``, also readable
    as ``layer.tdrop_state``; not part of the ``state_dict``)."""

    mode: str
    alpha: float
    gamma: float
    layout: str = ""
    rescale: bool = False
    drop_targeted_at_eval: bool = False
    refresh_every: int = 1
    n: int = 2  # nm mode: keep n of every m consecutive inputs
    m: int = 4
    name: str = field(default="", compare=False)  # the layer's dotted name in the patched model, for messages
    # the last targeted set: (optimizer step of the weight when it was computed (see
    # optimizer_steps), the weight's version counter and storage address then, gamma, held-zeros
    # mask it was computed with, bool mask)
    cached_targeting: Optional[tuple] = field(default=None, repr=False, compare=False)
    # weight mode: where each row's threshold was at the last targeting (a hint that makes the next
    # exact selection cheaper; see masking.lowest_k_bracketed)
    threshold_bracket: Optional[masking.KthBracket] = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        out = {"mode": self.mode, "alpha": self.alpha, "gamma": self.gamma}
        if self.mode == "nm":
            out.update(n=self.n, m=self.m)
        return out

    @property
    def targeted_fraction(self) -> float:
        """Nominal fraction of a row targeted at γ (``γ``; ``γ (m - n) / m`` in nm mode)."""
        return self.gamma * (self.m - self.n) / self.m if self.mode == "nm" else self.gamma

    def __setstate__(self, state: dict) -> None:
        # a patched layer unpickled (or deep-copied) in a process that never called patch_model
        self.__dict__.update(state)
        _ensure_untraced_sample_drop_mask()


REUSE_WITHIN_STEP = True
"""Reuse a layer's targeted set between forward passes of one optimizer step when its weight did
not change (gradient accumulation). Only the step-overhead benchmark turns it off, to measure it."""


def targeted_set(module: nn.Module) -> torch.Tensor:
    """The current targeted set of a patched layer, on the ``[n_out, fan_in]`` view (weight and nm
    modes) or ``[n_out]`` (unit mode), computed from the detached weight (no autograd graph).

    Entries held at zero by :func:`hf_tdrop.hold_pruned` are left out: weight mode targets
    ``floor(γ s_o)`` of the ``s_o`` surviving entries of each w_o, unit mode ``floor(γ s)`` of the
    ``s`` units not entirely held, and nm mode counts a held entry as one of its group's ``m - n``.

    The set is computed once per optimizer step (:func:`hf_tdrop.layers.optimizer_steps`) and reused by every
    forward pass of that step while the weight is unchanged (same version counter and storage): the
    micro-batches of gradient accumulation and the recomputation of gradient checkpointing see the
    same set, ranked once. Any in-place change of the weight (an optimizer step, ``copy_``,
    ``load_state_dict``, pruning) triggers a new ranking; a change made through ``weight.data``
    outside an optimizer step is not seen until the next step. With ``refresh_every > 1`` the set
    is kept for ``refresh_every`` optimizer steps (recomputed at steps 0, N, 2N, ...). Either way it
    is recomputed at once when γ or the held entries changed."""
    state: TargetingState = module.__dict__[METHOD_ATTR].config
    weight = module.weight
    held = held_zeros(weight)
    step = optimizer_steps(weight)
    version = (weight._version, weight.data_ptr())
    if state.cached_targeting is not None:
        cached_step, cached_version, cached_gamma, cached_held, cached = state.cached_targeting
        if cached_gamma == state.gamma and cached_held is held:
            if state.refresh_every > 1 and 0 <= step - cached_step < state.refresh_every:
                return cached
            if REUSE_WITHIN_STEP and step == cached_step and version == cached_version:
                return cached
    w2d = masking.unit_matrix(weight.detach(), state.layout)
    held2d = None if held is None else masking.unit_matrix(held, state.layout)
    if state.mode == "weight":
        if held2d is None:
            targeted, state.threshold_bracket = masking.targeted_weights_bracketed(
                w2d, state.gamma, state.threshold_bracket)
        else:
            targeted, state.threshold_bracket = masking.targeted_weights_among_bracketed(
                w2d, state.gamma, held2d, state.threshold_bracket)
    elif state.mode == "nm":
        targeted = masking.targeted_nm(w2d, state.gamma, state.n, state.m, held=held2d)
    elif held2d is None:
        targeted = masking.targeted_units(w2d, state.gamma)
    else:
        targeted = masking.targeted_units_among(w2d, state.gamma, held2d.all(dim=1))
    state.cached_targeting = (step, version, state.gamma, held, targeted)
    return targeted


def sample_drop_mask(module: nn.Module, sample: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Which elements of a patched ``module`` to drop in this forward pass.

    Args:
        module: a layer patched with targeted dropout.
        sample: True in training: drop each targeted element with probability α (a fresh draw from
            torch's RNG). False: drop the whole targeted set (the reference code's evaluation).

    Returns:
        ``(drop, scale)``: ``drop`` is bool, True = zero it, contiguous; in weight and nm modes it
        has the weight's shape, in unit mode it is ``[n_out]``. ``scale`` is a 0-d tensor
        ``1 / (1 - γα)`` (``1 / (1 - γα (m - n) / m)`` in nm mode) when the layer rescales while
        sampling, else None. Their dtype, shape and strides depend
        only on the layer (and on whether it samples and rescales), never on α or γ.

    Patched layers call it through ``_untraced_sample_drop_mask``, which ``torch.compile``
    does not trace (selection needs a data-independent ``k``, and α/γ change during a schedule):
    the compiled graph only sees the returned tensors, whose kind never changes, so moving α or γ
    never triggers a recompilation.
    """
    state: TargetingState = module.__dict__[METHOD_ATTR].config
    check_materialized(module, state.name, "targeted dropout forward" if sample else "targeted dropout at eval")
    weight = module.weight
    alpha = state.alpha if sample else 1.0
    targeted = targeted_set(module)
    if state.mode != "unit":
        # drawn in the weight's own layout (one random word per weight, in storage order), so the
        # draw and every mask op after it run on memory in order, also for Conv1D's [in, out]
        targeted = masking.to_weight_layout(targeted, weight, state.layout)
    # contiguous whatever k is (an all-False/all-True selection and a partial one could otherwise
    # differ in strides, and the compiled graph would be re-specialised on them)
    drop = masking.sample_drop(targeted, alpha).contiguous()
    scale = None
    if sample and state.rescale:
        kept = 1.0 - state.targeted_fraction * alpha
        scale = torch.tensor(1.0 / kept if kept > 0.0 else 1.0, dtype=weight.dtype, device=weight.device)
    return drop, scale


_untraced_sample_drop_mask = None
"""``torch.compiler.disable(sample_drop_mask)``, made on first patch: wrapping at import time would
import ``torch._dynamo`` (seconds) for every user of hf_tdrop, even those who never patch (the CLI,
pruning)."""


def _ensure_untraced_sample_drop_mask() -> None:
    global _untraced_sample_drop_mask
    if _untraced_sample_drop_mask is None:
        _untraced_sample_drop_mask = torch.compiler.disable(sample_drop_mask)


@register_method
class TargetedDropout(Method):
    """Targeted dropout in a patched layer.

    - ``eval()`` (unless ``drop_targeted_at_eval``): the original forward, unchanged.
    - Unit mode: the original forward with the dropped output units zeroed (equivalent to zeroing
      their w_o and bias; ``layer.unit_masked_forward``, which keeps only an ``[n_out]`` mask for
      backward).
    - Weight and nm modes: the layer's computation with the masked weight
      (``layer.masked_weight_forward``, which keeps only the bool mask for backward).

    Finalising (``unpatch_model`` / ``finalize_model``) restores the layer exactly: nothing is folded.
    """

    name = TARGETED_DROPOUT
    config_class = TargetedDropoutConfig
    targeting = True
    needs_values = False  # the weights are read at the first forward pass, not at patching

    @classmethod
    def title(cls) -> str:
        return "targeted dropout"

    def layer_settings(self, config: TargetedDropoutConfig, name: str) -> TargetingState:
        return TargetingState(mode=config.mode, alpha=config.alpha, gamma=config.gamma, rescale=config.rescale,
                              drop_targeted_at_eval=config.drop_targeted_at_eval,
                              refresh_every=config.refresh_every, n=config.n, m=config.m, name=name)

    def describe(self, layer_settings: TargetingState) -> dict:
        return layer_settings.as_dict()

    def setup(self, module, config: TargetingState) -> None:
        config.layout = module.__dict__[METHOD_ATTR].layout
        _ensure_untraced_sample_drop_mask()

    def forward(self, module, input):  # noqa: A002
        state: TargetingState = module.__dict__[METHOD_ATTR].config
        if not module.training and not state.drop_targeted_at_eval:
            return module.original_forward(input)
        drop, scale = _untraced_sample_drop_mask(module, sample=module.training)
        if state.mode == "unit":
            out = module.unit_masked_forward(input, drop)
        else:
            out = module.masked_weight_forward(input, drop, scale)
            scale = None  # applied to the weight already
        return out if scale is None else out * scale
