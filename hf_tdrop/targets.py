"""Which layers to target: supported-layer discovery, default exclusions and name matching.

Matching follows peft's ``target_modules`` spirit: a pattern matches a module's full dotted name
exactly, as a dotted suffix, or as a regular expression (``re.fullmatch``). Shared by patching and
pruning so both select the same layers.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from torch import nn

from .config import check_target_spec
from .layers import weight_layout

HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "heads", "proj_out"})
"""A module whose dotted name has one of these components is an output head, not targeted by default."""


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def matches_any(name: str, patterns: Optional[Sequence[str]]) -> bool:
    """True if ``name`` matches one of ``patterns`` (exact name, dotted suffix or regex)."""
    return bool(patterns) and any(_matches(name, p) for p in patterns)


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All ``(name, module)`` pairs of layers hf_tdrop can target (patched or not), in model order.

    A model that is itself a supported layer yields the name ``""``."""
    return [(name, m) for name, m in model.named_modules() if weight_layout(m) is not None]


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def output_head_names(model: nn.Module) -> set[str]:
    """Names of supported layers excluded by default: output heads (by name or
    ``get_output_embeddings()``) and layers whose weight is tied to an embedding."""
    excluded = set()
    output_embeddings = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            output_embeddings = get_out()
        except (NotImplementedError, AttributeError, TypeError):
            output_embeddings = None
    tied = _embedding_weights(model)
    for name, module in supported_layers(model):
        parts = set(name.split("."))
        if module is output_embeddings or parts & HEAD_NAMES or id(module.weight) in tied:
            excluded.add(name)
    return excluded


def select_layers(
    model: nn.Module,
    target_modules=None,
    exclude_modules=None,
) -> list[tuple[str, nn.Module]]:
    """The layers that ``target_modules``/``exclude_modules`` select, in model order.

    ``target_modules=None`` selects every supported layer except output heads and tied layers
    (:func:`output_head_names`); explicit patterns select exactly the supported layers they match
    (heads included). Raises ``ValueError`` listing candidate names when nothing is selected.
    """
    targets = check_target_spec("target_modules", target_modules)
    excludes = check_target_spec("exclude_modules", exclude_modules)
    candidates = supported_layers(model)
    if targets is None:
        heads = output_head_names(model)
        selected = [(n, m) for n, m in candidates if n not in heads]
    else:
        selected = [(n, m) for n, m in candidates if matches_any(n, targets)]
    selected = [(n, m) for n, m in selected if not matches_any(n, excludes)]
    if not selected:
        raise ValueError(nothing_selected_message(candidates, targets, excludes))
    return selected


def nothing_selected_message(candidates: Iterable[tuple[str, nn.Module]], targets, excludes) -> str:
    """The error message for patterns that select no layer, listing some ``candidates``."""
    names = [n or "<model itself>" for n, _ in candidates]
    if not names:
        return (
            "The model has no supported layer (nn.Linear, transformers' Conv1D, nn.Conv1d/2d/3d of "
            "exactly those types), so there is nothing to target."
        )
    shown = ", ".join(repr(n) for n in names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return (
        f"No layer matched target_modules={list(targets) if targets else None} "
        f"minus exclude_modules={list(excludes) if excludes else None}. "
        f"Supported layers in this model include: {shown}. Patterns match a full name, a dotted "
        "suffix (e.g. 'query') or a regex (re.fullmatch)."
    )
