"""Validation of settings and the JSON round trip shared by every method's config.

The configs themselves live with their methods (:mod:`hf_tdrop.methods`; targeted dropout's
:class:`hf_tdrop.TargetedDropoutConfig` in :mod:`hf_tdrop.methods.targeted_dropout`). This module
imports no torch, so the command line validates its arguments before loading torch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar, Union

from ._utils import read_json
from .constants import TDROP_CONFIG_NAME, TDROP_FORMAT, TRAINING_CONFIG_KEY, TRAINING_CONFIG_NAME

MODES = ("weight", "unit", "nm")
"""Targeting granularities: ``"weight"`` targets the lowest-|w| entries of each output unit's
incoming weight vector w_o; ``"unit"`` targets whole output units with the lowest ||w_o||_2;
``"nm"`` targets the M-N lowest-|w| entries of every group of M consecutive inputs of each w_o
(the entries an N:M sparsity pattern removes)."""

TargetSpec = Optional[Union[str, Sequence[str]]]


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


def check_number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number in the given range, else raise
    ``ValueError`` naming ``name`` and the range. ``bool`` and NaN are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isinf(value):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be in {lo}{low:g}, {high:g}{hi}, got {value!r}.")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def check_flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is True or False, else raise ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


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
        data, path = read_config_file(Path(path_or_dir))
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{str(path)!r} does not hold a valid {cls.__name__}: {err}") from None


def read_config_file(path: Path) -> tuple[dict, Path]:
    """The config dict stored at ``path`` (a directory or a file: its ``tdrop_training_config.json``,
    else the training config recorded in a ``tdrop_config.json``) and the file it came from."""
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
