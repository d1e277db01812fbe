"""Physically remove dead feed-forward units of a unit-pruned model: a smaller dense model.

After unit pruning (``prune_model(model, s, mode="unit")``), the pruned units of a feed-forward
block are exact zeros: their row in the up projection (and gate projection of gated MLPs) and their
bias are 0. :func:`shrink_model` deletes those units -- the rows of the up/gate projections and the
matching input columns of the down projection -- and updates the config's width field
(``intermediate_size``, ``n_inner``, ``d_ff``, ``encoder_ffn_dim``/``decoder_ffn_dim``), so the
result is an ordinary, smaller checkpoint that stock ``transformers`` loads with ``from_pretrained``
and that computes the same outputs as the pruned model (up to float rounding of the shorter sums).

Only the intermediate FFN dimension is shrunk. Attention heads, hidden size and embeddings are out
of scope: pruned units elsewhere stay as zeros.

A unit ``i`` of a block ``y = down(act(up(x)))`` (gated: ``y = down(act(gate(x)) * up(x))``) is
*dead*, i.e. contributes exactly nothing to ``y`` for every input, when any of these holds:

* its up-projection row and bias are zero, and (non-gated blocks) ``act(0) == 0``;
* gated blocks: its gate-projection row and bias are zero and ``act(0) == 0``;
* its down-projection input column is zero.

A zero row with a non-zero bias is *not* dead (``act(b)`` may be non-zero). The activation is
checked numerically (``act(0.0)``); if a block has zero rows but ``act(0) != 0`` the function
refuses rather than change the model's outputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import masking
from .constants import CRITERION_ATTR
from .layers import patch_state
from .methods.base import method_layers
from .patching import is_patched
from .tracking import HELD_ZEROS

logger = logging.getLogger(__name__)

UNEVEN_POLICIES = ("pad", "raise")
"""What :func:`shrink_model` does when the layers sharing one config field would get different widths:
``"pad"`` keeps the widest (narrower layers keep some dead units as zeros), ``"raise"`` refuses."""


@dataclass(frozen=True)
class _MLPPattern:
    """Attribute paths, relative to an FFN container module, of one feed-forward block layout."""

    up: str
    down: str
    act: str
    gate: Optional[str] = None


_BERT = _MLPPattern(up="intermediate.dense", down="output.dense", act="intermediate.intermediate_act_fn")
_FC = _MLPPattern(up="fc1", down="fc2", act="activation_fn")
_GPT2 = _MLPPattern(up="c_fc", down="c_proj", act="act")
_T5 = _MLPPattern(up="wi", down="wo", act="act")
_T5_GATED = _MLPPattern(up="wi_1", gate="wi_0", down="wo", act="act")
_LLAMA = _MLPPattern(up="up_proj", gate="gate_proj", down="down_proj", act="act_fn")


def _field(name: str) -> Callable[[str], str]:
    return lambda block_name: name


def _encoder_decoder_field(block_name: str) -> str:
    parts = block_name.split(".")
    if "encoder" in parts:
        return "encoder_ffn_dim"
    if "decoder" in parts:
        return "decoder_ffn_dim"
    raise ValueError(f"Cannot tell whether FFN block {block_name!r} is in the encoder or the decoder.")


SUPPORTED_MODEL_TYPES: dict[str, tuple[tuple[_MLPPattern, ...], Callable[[str], str]]] = {
    "bert": ((_BERT,), _field("intermediate_size")),
    "roberta": ((_BERT,), _field("intermediate_size")),
    "vit": ((_FC, _BERT), _field("intermediate_size")),
    "gpt2": ((_GPT2,), _field("n_inner")),
    "t5": ((_T5, _T5_GATED), _field("d_ff")),
    "marian": ((_FC,), _encoder_decoder_field),
    "bart": ((_FC,), _encoder_decoder_field),
    "llama": ((_LLAMA,), _field("intermediate_size")),
    "mistral": ((_LLAMA,), _field("intermediate_size")),
    "qwen2": ((_LLAMA,), _field("intermediate_size")),
}
"""``config.model_type`` -> (FFN block layouts to look for, block name -> config width field)."""


@dataclass
class BlockShrink:
    """What happened to one feed-forward block."""

    name: str
    """Dotted name of the block's container module (e.g. ``bert.encoder.layer.0``)."""
    size_field: str
    """Config field holding this block's width."""
    width_before: int
    dead_units: int
    """Units found dead (contributing exactly zero)."""
    width_after: int
    """Kept width. ``width_after - (width_before - dead_units)`` dead units were kept as zeros so
    that every block sharing ``size_field`` has the same width."""

    @property
    def padded_units(self) -> int:
        return self.width_after - (self.width_before - self.dead_units)


@dataclass
class ShrinkReport:
    """Result of :func:`shrink_model`.

    ``params_*`` count unique parameters (tied weights once). ``tensor_bytes_*`` are the bytes of the
    unique ``state_dict`` tensors (an estimate of the checkpoint size); ``file_bytes_*`` are the
    measured sizes of the ``*.safetensors`` files written by ``save_pretrained`` to a temporary
    directory (None when ``measure_file_size=False``).
    """

    model_type: str
    params_before: int
    params_after: int
    tensor_bytes_before: int
    tensor_bytes_after: int
    file_bytes_before: Optional[int] = None
    file_bytes_after: Optional[int] = None
    config_changes: dict = field(default_factory=dict)
    """``{size_field: [before, after]}`` for every changed config field."""
    blocks: list = field(default_factory=list)
    """One :class:`BlockShrink` per feed-forward block, in model order."""

    @property
    def padded_blocks(self) -> list[str]:
        """Blocks that kept some dead units (as zeros) to match the widest block of their field."""
        return [b.name for b in self.blocks if b.padded_units > 0]

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        out = asdict(self)
        for block, raw in zip(self.blocks, out["blocks"]):
            raw["padded_units"] = block.padded_units
        out["params_removed"] = self.params_removed
        out["padded_blocks"] = self.padded_blocks
        return out

    def to_markdown(self) -> str:
        def ratio(a, b):
            return f"{a / b:.3f}" if a is not None and b else "n/a"

        lines = [
            "| | before | after | after / before |",
            "|---|---:|---:|---:|",
            f"| parameters | {self.params_before:,} | {self.params_after:,} | {ratio(self.params_after, self.params_before)} |",
        ]
        if self.file_bytes_before is not None:
            lines.append(
                f"| safetensors bytes (measured) | {self.file_bytes_before:,} | {self.file_bytes_after:,} | "
                f"{ratio(self.file_bytes_after, self.file_bytes_before)} |"
            )
        lines.append(
            f"| tensor bytes | {self.tensor_bytes_before:,} | {self.tensor_bytes_after:,} | "
            f"{ratio(self.tensor_bytes_after, self.tensor_bytes_before)} |"
        )
        for name, (before, after) in self.config_changes.items():
            lines.append(f"| `config.{name}` | {before} | {after} | {ratio(after, before)} |")
        text = "\n".join(lines)
        if self.padded_blocks:
            text += (
                f"\n\nLayers had different numbers of dead units; {len(self.padded_blocks)} narrower block(s) "
                f"kept some dead units as zeros to match the widest: {', '.join(self.padded_blocks)}."
            )
        return text

    def __str__(self) -> str:
        head = f"ShrinkReport ({self.model_type}): {len(self.blocks)} FFN blocks"
        widths = sorted({(b.size_field, b.width_before, b.width_after) for b in self.blocks})
        body = "; ".join(f"{f}: {b} -> {a}" for f, b, a in widths)
        return f"{head}; {body}\n{self.to_markdown()}"


# --------------------------------------------------------------------------------------------------


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layout(module: nn.Module, name: str) -> str:
    if type(module) is nn.Linear:
        return masking.LAYOUT_OUT_IN
    if type(module) is Conv1D:
        return masking.LAYOUT_IN_OUT
    raise ValueError(
        f"shrink_model: {name} is a {type(module).__name__}; only plain nn.Linear and transformers' "
        "Conv1D projections can be shrunk (patched, quantized or custom layers cannot)."
    )


@dataclass
class _Block:
    name: str
    size_field: str
    up: nn.Module
    down: nn.Module
    act: Callable
    gate: Optional[nn.Module]
    up_layout: str
    down_layout: str
    gate_layout: Optional[str]

    @property
    def width(self) -> int:
        return masking.unit_matrix(self.up.weight, self.up_layout).shape[0]


def _find_blocks(model: nn.Module, model_type: str) -> list[_Block]:
    patterns, field_of = SUPPORTED_MODEL_TYPES[model_type]
    blocks = []
    for name, module in model.named_modules():
        for pattern in patterns:
            up, down, act = _get(module, pattern.up), _get(module, pattern.down), _get(module, pattern.act)
            gate = _get(module, pattern.gate) if pattern.gate else None
            if up is None or down is None or act is None or (pattern.gate and gate is None):
                continue
            if not isinstance(up, nn.Module) or not isinstance(down, nn.Module):
                continue
            blocks.append(_Block(
                name=name, size_field=field_of(name), up=up, down=down, act=act, gate=gate,
                up_layout=_layout(up, f"{name}.{pattern.up}"), down_layout=_layout(down, f"{name}.{pattern.down}"),
                gate_layout=_layout(gate, f"{name}.{pattern.gate}") if gate is not None else None,
            ))
            break
    return blocks


def _zero_units(module: nn.Module, layout: str) -> torch.Tensor:
    """bool ``[n_out]``: output units whose weight row and bias are exactly zero."""
    w2d = masking.unit_matrix(module.weight.detach(), layout)
    zero = (w2d == 0).all(dim=1)
    if module.bias is not None:
        zero &= module.bias.detach() == 0
    return zero


def _zero_inputs(module: nn.Module, layout: str) -> torch.Tensor:
    """bool ``[fan_in]``: input features whose weight column is exactly zero."""
    w2d = masking.unit_matrix(module.weight.detach(), layout)
    return (w2d == 0).all(dim=0)


def _act_of_zero(act: Callable, like: torch.Tensor) -> float:
    with torch.no_grad():
        return float(act(torch.zeros(4, dtype=like.dtype, device=like.device)).abs().max())


def _dead_units(block: _Block) -> torch.Tensor:
    """bool ``[width]``: units of ``block`` that contribute exactly zero (see module docstring)."""
    zero_up = _zero_units(block.up, block.up_layout)
    zero_gate = _zero_units(block.gate, block.gate_layout) if block.gate is not None else None
    dead = _zero_inputs(block.down, block.down_layout).clone()
    act_zero_ok = _act_of_zero(block.act, block.up.weight) == 0.0
    needs_act = zero_up if block.gate is None else zero_gate
    if block.gate is not None:
        dead |= zero_up  # act(gate) * 0 == 0 whatever the activation
    if bool((needs_act & ~dead).any()):
        if not act_zero_ok:
            raise ValueError(
                f"shrink_model: block {block.name!r} has units with all-zero weights, but its activation "
                f"{type(block.act).__name__} gives act(0) != 0, so those units still output a constant; "
                "removing them would change the model's outputs. Refusing to shrink."
            )
        dead |= needs_act
    return dead


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the ``*.safetensors`` files ``model.save_pretrained`` writes (measured in a temp dir).

    Leaves the model as it was: ``save_pretrained`` records ``architectures`` and ``dtype`` in the
    model's config, so the attributes of ``model.config`` (and ``model.generation_config``) are put
    back afterwards, in place (modules that hold the config object keep holding it)."""
    configs = [c for c in (getattr(model, "config", None), getattr(model, "generation_config", None)) if c is not None]
    saved = [(c, dict(vars(c))) for c in configs]
    try:
        with tempfile.TemporaryDirectory(prefix="hf_tdrop_size_") as tmp:
            model.save_pretrained(tmp)
            return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".safetensors"))
    finally:
        for config, attributes in saved:
            vars(config).clear()
            vars(config).update(attributes)


def _new_param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous().clone(), requires_grad=old.requires_grad)


def _keep_outputs(module: nn.Module, layout: str, keep: torch.Tensor) -> None:
    if layout == masking.LAYOUT_OUT_IN:
        module.weight = _new_param(module.weight, module.weight.detach()[keep])
        module.out_features = int(keep.sum())
    else:  # Conv1D: weight [in, out]
        module.weight = _new_param(module.weight, module.weight.detach()[:, keep])
        module.nf = int(keep.sum())
    if module.bias is not None:
        module.bias = _new_param(module.bias, module.bias.detach()[keep])


def _keep_inputs(module: nn.Module, layout: str, keep: torch.Tensor) -> None:
    if layout == masking.LAYOUT_OUT_IN:
        module.weight = _new_param(module.weight, module.weight.detach()[:, keep])
        module.in_features = int(keep.sum())
    else:
        module.weight = _new_param(module.weight, module.weight.detach()[keep, :])
        module.nx = int(keep.sum())


def _slice_learned_criterion(module: nn.Module, keep: torch.Tensor, kept: str) -> None:
    """Keep a layer's learned pruning scores (``layer.tdrop_criterion``, left by ``finalize_model``)
    in step with its shrunk weight: the kept output units' rows, or the kept input columns."""
    learned = module.__dict__.get(CRITERION_ATTR)
    if learned is None:
        return
    scores = learned.scores
    keep = keep.to(scores.device)
    if kept == "outputs":
        scores = scores[keep]
    elif learned.granularity == "weight":  # [n_out, fan_in]: the kept inputs' columns
        scores = scores[:, keep]
    module.__dict__[CRITERION_ATTR] = type(learned)(learned.name, learned.granularity, scores.clone())


def _patched_message(model: nn.Module) -> str:
    """Why a patched model cannot be shrunk, naming its method and what unpatching keeps or drops."""
    handlers = [patch_state(m).handler for _, m in method_layers(model)]
    title = handlers[0].title() if handlers else "a training method"
    if not any(h.extra_tensors for h in handlers):
        return (f"shrink_model: the model is patched with {title}; call hf_tdrop.unpatch_model(model) "
                "first (its layers keep their state_dict, so nothing is lost).")
    return (f"shrink_model: the model is patched with {title}; call "
            "hf_tdrop.finalize_model(model) first. It folds the method's eval-time effect into the weights and "
            "removes the method's own tensors (learned gates / log σ² / switches; a learned pruning order stays "
            "on the layers for prune_model(method=...)), so the shrunk model computes what the patched one "
            "computes in eval.")


def shrink_model(
    model: nn.Module,
    *,
    on_uneven: str = "pad",
    measure_file_size: bool = True,
) -> ShrinkReport:
    """Remove the dead units of every feed-forward block of ``model``, in place.

    Args:
        model: a (unit-pruned) ``transformers`` model of a supported type
            (:data:`SUPPORTED_MODEL_TYPES`: BERT, RoBERTa, ViT, GPT-2, T5 incl. gated v1.1, Marian,
            BART, Llama, Mistral, Qwen2). Must not be patched (call ``unpatch_model`` first).
        on_uneven: ``"pad"`` (default) -- when the blocks sharing one config field would end up with
            different widths, keep the widest width everywhere: narrower blocks keep some of their dead
            units as zeros (outputs unchanged; listed in ``report.padded_blocks``). ``"raise"`` --
            refuse with a ``ValueError`` and leave the model untouched.
        measure_file_size: also save the model with ``save_pretrained`` (safetensors) to a temporary
            directory before and after and report the measured bytes (costs two saves). Measuring
            changes nothing: the config is left as shrinking alone leaves it.

    Returns:
        A :class:`ShrinkReport`. The model itself is modified in place: the up/gate projections lose
        the dead rows (``[width, d] -> [width', d]``; GPT-2 ``Conv1D`` ``[d, width] -> [d, width']``),
        the down projection the matching input columns, and ``model.config.<size_field>`` is set to
        the new width. Shrunk layers get new ``Parameter`` objects (re-create any optimizer).

    Raises:
        ValueError: unsupported model type (the message names it and lists the supported ones), patched
            model, a block whose width disagrees with the config, projections that are not plain
            ``nn.Linear``/``Conv1D``, zero units behind an activation with ``act(0) != 0``, uneven
            widths with ``on_uneven="raise"``, or a bad argument. Nothing is changed on error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if on_uneven not in UNEVEN_POLICIES:
        raise ValueError(f"`on_uneven` must be one of {list(UNEVEN_POLICIES)}, got {on_uneven!r}.")
    if not isinstance(measure_file_size, bool):
        raise ValueError(f"`measure_file_size` must be True or False, got {measure_file_size!r}.")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"shrink_model does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {sorted(SUPPORTED_MODEL_TYPES)}."
        )
    if is_patched(model):
        raise ValueError(_patched_message(model))
    blocks = _find_blocks(model, model_type)
    if not blocks:
        raise ValueError(f"shrink_model: found no feed-forward block in this {model_type} model ({type(model).__name__}).")

    held = [f"{b.name}.{part}" if b.name else part for b in blocks
            for part, module in (("up", b.up), ("gate", b.gate), ("down", b.down)) if module is not None
            for p in module.parameters(recurse=False) if p in HELD_ZEROS]
    if held:
        raise ValueError(
            f"shrink_model: {len(held)} projection(s) have weights held at zero by hold_pruned (e.g. {held[0]}); "
            "shrinking gives them new Parameters, which the hold would not follow. Call hold.remove() (or "
            "hf_tdrop.release_pruned(model)) first, shrink, then hold_pruned(model, ...) again if needed."
        )

    # ---- plan everything before touching the model --------------------------------------------
    dead = [_dead_units(b) for b in blocks]
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        groups.setdefault(b.size_field, []).append(i)
    targets: dict[str, int] = {}
    for size_field, members in groups.items():
        current = getattr(config, size_field, None)
        widths = {blocks[i].width for i in members}
        if size_field == "n_inner" and current is None:
            current = 4 * config.hidden_size
        if widths != {current}:
            raise ValueError(
                f"shrink_model: config.{size_field} is {current} but the blocks using it have widths "
                f"{sorted(widths)}; refusing to write a config that does not match the weights."
            )
        kept = {blocks[i].name: int(blocks[i].width - dead[i].sum()) for i in members}
        widest = max(max(kept.values()), 1)
        if len(set(kept.values())) > 1:
            narrow = sorted((n for n, k in kept.items() if k < widest))
            message = (
                f"Blocks sharing config.{size_field} would get different widths "
                f"(min {min(kept.values())}, max {widest}); "
            )
            if on_uneven == "raise":
                raise ValueError(
                    "shrink_model: " + message + "a single config field cannot describe them. "
                    "Prune every layer by the same fraction, or pass on_uneven='pad' to keep the widest."
                )
            logger.warning(message + "keeping the widest: %d narrower block(s) keep dead units as zeros (%s).",
                           len(narrow), ", ".join(narrow[:4]) + (" ..." if len(narrow) > 4 else ""))
        targets[size_field] = widest

    keeps = []
    for i, b in enumerate(blocks):
        keep = ~dead[i]
        missing = targets[b.size_field] - int(keep.sum())
        if missing > 0:  # re-insert the first dead units (zeros) to reach the common width
            keep[torch.nonzero(~keep).flatten()[:missing]] = True
        keeps.append(keep)

    params_before, bytes_before = _unique_params(model), _tensor_bytes(model)
    file_before = checkpoint_bytes(model) if measure_file_size else None

    # ---- apply ----------------------------------------------------------------------------------
    report_blocks = []
    for b, d, keep in zip(blocks, dead, keeps):
        width = b.width
        if int(keep.sum()) != width:
            _keep_outputs(b.up, b.up_layout, keep)
            if b.gate is not None:
                _keep_outputs(b.gate, b.gate_layout, keep)
            _keep_inputs(b.down, b.down_layout, keep)
            for module, kept in ((b.up, "outputs"), (b.gate, "outputs"), (b.down, "inputs")):
                if module is not None:
                    _slice_learned_criterion(module, keep, kept)
        report_blocks.append(BlockShrink(name=b.name, size_field=b.size_field, width_before=width,
                                         dead_units=int(d.sum()), width_after=int(keep.sum())))
    changes = {}
    for size_field, width in targets.items():
        before = getattr(config, size_field)
        if size_field == "n_inner" and before is None:
            before = 4 * config.hidden_size
        if width != before:
            setattr(config, size_field, width)
            changes[size_field] = [before, width]
    for b in blocks:  # modules that cache the width (e.g. LlamaMLP.intermediate_size)
        container = model.get_submodule(b.name) if b.name else model
        if isinstance(getattr(container, "intermediate_size", None), int):
            container.intermediate_size = targets[b.size_field]

    report = ShrinkReport(
        model_type=model_type,
        params_before=params_before,
        params_after=_unique_params(model),
        tensor_bytes_before=bytes_before,
        tensor_bytes_after=_tensor_bytes(model),
        file_bytes_before=file_before,
        file_bytes_after=checkpoint_bytes(model) if measure_file_size else None,
        config_changes=changes,
        blocks=report_blocks,
    )
    if not changes:
        logger.warning("shrink_model: no feed-forward block has removable dead units; the model is unchanged.")
    return report
