"""Learned pruning scores beside a checkpoint: :func:`save_learned_criteria` writes the scores a
finalised (or still patched) model carries as ``tdrop_criteria.safetensors``, and
:func:`load_learned_criteria` puts them back on a reloaded model, so ``prune_model(method="gates")``
(or ``"log_alpha"``) and ``hf-tdrop prune --method ...`` work on it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import __version__, masking
from ._utils import PathLike
from .constants import CRITERIA_NAME, CRITERION_ATTR, LEGACY_CRITERIA_NAME, METHOD_ATTR, TDROP_FORMAT
from .layers import weight_layout
from .methods.base import GRANULARITIES, LearnedCriterion, learned_criteria, learned_scores
from .targets import supported_layers

__all__ = ["criteria_file", "load_learned_criteria", "save_learned_criteria"]

logger = logging.getLogger(__name__)


def _criterion_shape(module: nn.Module, granularity: str) -> tuple[int, ...]:

    n_out, fan_in = masking.unit_matrix(module.weight.detach(), weight_layout(module)).shape
    return (n_out, fan_in) if granularity == "weight" else (n_out,)


def _learned_criteria_of(model: nn.Module, strict: bool = True) -> dict:
    """``{layer name: LearnedCriterion}`` of every layer carrying learned scores: recorded by
    ``finalize_model`` or live from a layer still patched with a method that learns them. Scores
    whose shape no longer fits their layer (e.g. after ``shrink_model``) raise ``ValueError``, or
    with ``strict=False`` are left out with a warning."""

    out = {}
    for name, module in supported_layers(model):
        state = module.__dict__.get(METHOD_ATTR)
        if state is not None and state.handler.criterion is not None:
            found = learned_scores(module, state.handler.criterion)
        else:
            found = module.__dict__.get(CRITERION_ATTR)
        if found is None:
            continue
        expected = _criterion_shape(module, found.granularity)
        if tuple(found.scores.shape) != expected:
            message = (f"layer {name or '<model itself>'!r}: its learned {found.name!r} scores have shape "
                       f"{tuple(found.scores.shape)}, the layer needs {expected} (was it shrunk after training?)")
            if strict:
                raise ValueError(message + ".")
            logger.warning("Not saving learned scores of %s.", message)
            continue
        out[name] = found
    return out


def _write_criteria(criteria: dict, path: Path) -> Path:
    from safetensors.torch import save_file


    tensors = {name: c.scores.detach().float().contiguous().cpu() for name, c in criteria.items()}
    layers = {name: {"name": c.name, "granularity": c.granularity} for name, c in criteria.items()}
    save_file(tensors, str(path), metadata={"format": TDROP_FORMAT, "hf_tdrop_version": __version__,
                                             "criteria": json.dumps(layers)})
    return path


def save_learned_criteria(model: nn.Module, save_directory: PathLike) -> Optional[Path]:
    """Write the learned pruning scores of ``model`` beside its weights, as
    ``save_directory/tdrop_criteria.safetensors``; returns the file's path, or None (nothing
    written) when no layer carries learned scores.

    The scores are those :func:`hf_tdrop.finalize_model` leaves on each layer
    (``layer.tdrop_criterion``: L0 ``log α`` for ``method="gates"``, variational dropout's ``log α``
    for ``method="log_alpha"``), or the live ones of a layer still patched with such a method. A
    plain ``save_pretrained`` checkpoint does not carry them; with this file,
    :func:`load_learned_criteria` (and ``hf-tdrop prune --method gates``) can prune the reloaded
    model by them. :func:`save_pruned` writes it automatically.

    File format: one float32 tensor per layer, keyed by the layer's dotted name (``[n_out, fan_in]``
    for per-weight scores, ``[n_out]`` for per-unit scores; lowest pruned first), and the metadata
    entry ``"criteria"``: JSON ``{layer: {"name": criterion, "granularity": "weight" | "unit"}}``.

    Raises:
        ValueError: ``save_directory`` exists and is not a directory, or scores do not fit their
            layer's shape (e.g. a model shrunk after training).
    """

    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory):
        raise ValueError(f"`save_directory` must be a non-empty path, got {save_directory!r}.")
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"`save_directory` {str(directory)!r} exists and is not a directory.")
    criteria = _learned_criteria_of(model)
    if not criteria:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return _write_criteria(criteria, directory / CRITERIA_NAME)


def criteria_file(directory: PathLike) -> Optional[Path]:
    """The learned-scores sidecar in ``directory`` (``tdrop_criteria.safetensors``, else the older
    ``learned_criterion.pt``), or None."""
    for name in (CRITERIA_NAME, LEGACY_CRITERIA_NAME):
        path = Path(directory) / name
        if path.is_file():
            return path
    return None


def _read_criteria(path: Path) -> dict:
    """``{layer: (criterion name, granularity, scores)}`` read from a sidecar file."""

    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            try:
                layers = json.loads(meta["criteria"])
            except (KeyError, ValueError):
                raise ValueError(f"{str(path)!r} has no 'criteria' metadata; it was not written by "
                                 "hf_tdrop.save_learned_criteria.") from None
            keys = set(handle.keys())
            missing = sorted(set(layers) - keys)
            if missing:
                raise ValueError(f"{str(path)!r} lists layer {missing[0]!r} in its metadata but holds no scores for it.")
            return {name: (info.get("name"), info.get("granularity"), handle.get_tensor(name))
                    for name, info in layers.items()}
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{str(path)!r} does not hold {{layer: {{'name', 'granularity', 'scores'}}}}.")
    return {name: (c.get("name"), c.get("granularity"), c.get("scores")) for name, c in data.items()}


def load_learned_criteria(model: nn.Module, directory: PathLike, *, missing_ok: bool = False) -> dict:
    """Put the learned pruning scores saved beside a checkpoint back on ``model``'s layers, in place,
    so ``prune_model(model, ..., method="gates")`` (or ``"log_alpha"``) works on a reloaded model.

    Reads ``directory/tdrop_criteria.safetensors`` (written by :func:`save_learned_criteria` and
    :func:`save_pruned`), or else an older ``learned_criterion.pt`` (``torch.save`` of
    ``{layer: {"name", "granularity", "scores"}}``). Every entry is checked before any layer
    changes: the layer exists and is supported, the criterion is a registered one, and the scores
    have the layer's shape.

    Args:
        model: the reloaded model (the same architecture and sizes as the one saved).
        directory: the checkpoint directory.
        missing_ok: return ``{}`` when the directory has no such file, instead of raising.

    Returns:
        ``{layer name: LearnedCriterion}`` of the layers set.

    Raises:
        FileNotFoundError: no sidecar in ``directory`` (unless ``missing_ok``).
        ValueError: the file does not fit the model (unknown layer, criterion or shape).
    """


    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    path = criteria_file(directory)
    if path is None:
        if missing_ok:
            return {}
        raise FileNotFoundError(f"No {CRITERIA_NAME} (or {LEGACY_CRITERIA_NAME}) in {str(directory)!r}.")
    layers = dict(supported_layers(model))
    known = learned_criteria()
    found = {}
    for name, (criterion, granularity, scores) in _read_criteria(path).items():
        where = f"{str(path)!r}, layer {name or '<model itself>'!r}"
        if name not in layers:
            raise ValueError(f"{where}: the model has no such supported layer (is it the model the scores "
                             "were saved with?).")
        if criterion not in known:
            raise ValueError(f"{where}: unknown criterion {criterion!r}; known: {sorted(known)}.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"{where}: granularity must be one of {list(GRANULARITIES)}, got {granularity!r}.")
        module = layers[name]
        expected = _criterion_shape(module, granularity)
        if not hasattr(scores, "shape") or tuple(scores.shape) != expected:
            raise ValueError(f"{where}: scores of shape {tuple(getattr(scores, 'shape', ()))}, the layer needs {expected}.")
        found[name] = LearnedCriterion(criterion, granularity, scores.detach().float().to(module.weight.device))
    for name, criterion in found.items():
        setattr(layers[name], CRITERION_ATTR, criterion)
    return found
