"""Small helpers shared by several modules of the package (no torch import: the command line uses
them before loading torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:
    from torch import nn

PathLike = Union[str, os.PathLike]


def unwrap_model(model: "nn.Module") -> "nn.Module":
    """``model`` without its DDP / FSDP / ``torch.compile`` wrappers (accelerate's ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def check_output_dir(output_dir: Any, overwrite: Any) -> Path:
    """``output_dir`` as a ``Path`` if it can be written (missing, or empty unless ``overwrite``), else ``ValueError``."""
    if not isinstance(overwrite, bool):
        raise ValueError(f"`overwrite` must be True or False, got {overwrite!r}.")
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ValueError(f"`output_dir` must be a non-empty path, got {output_dir!r}.")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`output_dir` {str(path)!r} exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"`output_dir` {str(path)!r} is not empty; pass overwrite=True (CLI: --overwrite) to write into it."
        )
    return path


def write_json(path: PathLike, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON (floats at full precision); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_json(path: PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class JsonFileMixin:
    """``to_json(path)`` / ``from_json(path)`` for a class with ``to_dict()`` / ``from_dict(data)``."""

    def to_json(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (floats at full precision); returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: PathLike):
        """Read a file written by :meth:`to_json`."""
        return cls.from_dict(read_json(path))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[Sequence[str]] = None) -> str:
    """A GitHub Markdown table with padded columns; ``align`` per column: ``"l"``, ``"r"`` or ``"c"``
    (default: first column left, the others right)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths = [max(w, 4) for w in widths]

    def line(cells):
        return "| " + " | ".join(
            str(c).rjust(w) if a == "r" else str(c).ljust(w) for c, w, a in zip(cells, widths, align)) + " |"

    def rule(a: str, w: int) -> str:
        return {"l": ":" + "-" * (w - 1), "r": "-" * (w - 1) + ":", "c": ":" + "-" * (w - 2) + ":"}[a]

    sep = "| " + " | ".join(rule(a, w) for a, w in zip(align, widths)) + " |"
    return "\n".join([line(header), sep, *(line(r) for r in rows)]) + "\n"
