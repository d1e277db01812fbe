"""Configuration of targeted dropout: a validated dataclass, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

MODES = ("weight", "unit", "nm")
"""Targeting granularities: ``"weight"`` targets the lowest-|w| entries of each output unit's
incoming weight vector w_o; ``"unit"`` targets whole output units with the lowest ||w_o||_2;
``"nm"`` targets the M-N lowest-|w| entries of every group of M consecutive inputs of each w_o
(the entries an N:M sparsity pattern removes)."""

TargetSpec = Optional[Union[str, Sequence[str]]]

TRAINING_CONFIG_NAME = "tdrop_training_config.json"
"""File name under which ``save_pretrained`` writes a training config."""

_Config = TypeVar("_Config", bound="ConfigSerializationMixin")


def check_fraction(name: str, value: Any, meaning: Optional[str] = None) -> float:
    """Return ``value`` as a float if it is a real number in [0, 1], else raise ``ValueError``
    naming ``name`` (and what it means, if given) and the allowed range. ``bool`` and NaN are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r} ({type(value).__name__}).")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        what = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{name}`{what} must be in [0, 1], got {value!r}.")
    return value


def check_mode(mode: Any, name: str = "mode") -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise ``ValueError`` listing them."""
    if mode not in MODES:
        raise ValueError(f"`{name}` must be one of {list(MODES)}, got {mode!r}.")
    return mode


def check_nm(n: Any, m: Any) -> tuple[int, int]:
    """Return ``(n, m)`` as ints if they are integers with ``1 <= n < m``, else raise ``ValueError``
    naming the argument and the allowed range (N nonzeros kept in every group of M)."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    if m < 2:
        raise ValueError(f"`m` (the N:M group size) must be an integer >= 2, got {m!r}.")
    if not 1 <= n < m:
        raise ValueError(f"`n` (nonzeros kept per group of m={m}) must be an integer in [1, {m - 1}], got {n!r}.")
    return int(n), int(m)


def check_target_spec(name: str, value: Any) -> Optional[tuple[str, ...]]:
    """Normalise a ``target_modules``/``exclude_modules`` value to a tuple of patterns (or None).

    Accepts ``None``, one string, or a non-empty list/tuple/set of non-empty strings."""
    if value is None:
        return None
    if isinstance(value, str):
        items: tuple = (value,)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    else:
        raise ValueError(
            f"`{name}` must be None, a string (name, suffix or regex) or a list of strings, "
            f"got {type(value).__name__}."
        )
    if not items or any(not isinstance(p, str) or not p for p in items):
        raise ValueError(f"`{name}` must contain non-empty strings only, got {value!r}.")
    return items


class ConfigSerializationMixin:
    """JSON round trip of a config dataclass, in the style of peft's ``PeftConfig``: :meth:`to_dict` /
    :meth:`from_dict`, :meth:`to_json_string`, :meth:`save_pretrained` / :meth:`from_pretrained`."""

    def to_dict(self) -> dict:
        """The fields as a JSON-friendly dict; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[_Config], data: Mapping) -> _Config:
        """Build a config from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        """Write the config as JSON to ``save_directory/tdrop_training_config.json`` (the directory
        is created if missing); returns the file's path."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"`save_directory` {str(directory)!r} exists and is not a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TRAINING_CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls: type[_Config], path_or_dir: Union[str, os.PathLike]) -> _Config:
        """Read a config saved by :meth:`save_pretrained`: its directory or the JSON file itself.

        A directory without ``tdrop_training_config.json`` that :func:`hf_tdrop.save_pruned` wrote
        gives the training config recorded in its ``tdrop_config.json``.

        Raises:
            FileNotFoundError: no such file, or no config in the directory.
            ValueError: the file is not valid JSON or does not hold a valid config of this class.
        """
        data, path = _read_config_file(Path(path_or_dir))
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{str(path)!r} does not hold a valid {cls.__name__}: {err}") from None


def _read_config_file(path: Path) -> tuple[dict, Path]:
    """The config dict stored at ``path`` (a directory or a file) and the file it came from."""
    from ._utils import read_json
    from .hub import TDROP_CONFIG_NAME, TDROP_FORMAT, TRAINING_CONFIG_KEY

    in_directory = path.is_dir()
    if in_directory:
        if (path / TRAINING_CONFIG_NAME).is_file():
            path = path / TRAINING_CONFIG_NAME
        elif (path / TDROP_CONFIG_NAME).is_file():
            path = path / TDROP_CONFIG_NAME
        else:
            raise FileNotFoundError(f"No {TRAINING_CONFIG_NAME} or {TDROP_CONFIG_NAME} in {str(path)!r}.")
    elif not path.is_file():
        raise FileNotFoundError(f"No such config file or directory: {str(path)!r}.")
    try:
        data = read_json(path)
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("format") == TDROP_FORMAT:  # save_pruned's record
        data = data.get(TRAINING_CONFIG_KEY)
        if data is None:  # in a directory: as if there were no config file
            raise (FileNotFoundError if in_directory else ValueError)(f"{str(path)!r} records no training config.")
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a config (a JSON object), got {type(data).__name__}.")
    return data, path


@dataclass
class TargetedDropoutConfig(ConfigSerializationMixin):
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
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    rescale: bool = False
    drop_targeted_at_eval: bool = False
    refresh_every: int = 1
    n: int = 2
    m: int = 4
    extra: dict = field(default_factory=dict)
    """Free-form metadata kept with the config (e.g. the schedule used); written to JSON as is."""

    def __post_init__(self) -> None:
        self.alpha = check_fraction("alpha", self.alpha)
        self.gamma = check_fraction("gamma", self.gamma)
        check_mode(self.mode)
        self.n, self.m = check_nm(self.n, self.m)
        for spec in ("target_modules", "exclude_modules"):
            patterns = check_target_spec(spec, getattr(self, spec))
            if patterns is not None and not isinstance(getattr(self, spec), str):
                setattr(self, spec, list(patterns))  # JSON-friendly
        for flag in ("rescale", "drop_targeted_at_eval"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"`{flag}` must be True or False, got {getattr(self, flag)!r}.")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(f"`refresh_every` must be an integer >= 1, got {self.refresh_every!r}.")
        if not isinstance(self.extra, dict):
            raise ValueError(f"`extra` must be a dict, got {type(self.extra).__name__}.")
