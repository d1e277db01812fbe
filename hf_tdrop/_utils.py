"""Small helpers shared by several modules of the package."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn

PathLike = Union[str, os.PathLike]


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / FSDP / ``torch.compile`` wrappers (accelerate's ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


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
