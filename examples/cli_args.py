"""Flag helpers shared by the example scripts: light (argparse and dataclasses only), so that
``--help`` and flag errors answer before torch is imported."""

from __future__ import annotations

import argparse
import copy
import shutil
from dataclasses import field

HELP_WIDTH = 100
"""Help is wrapped to the terminal, at most this many columns."""


def arg(default=None, help="", **metadata):  # noqa: A002 - argparse's own name
    """A dataclass field that is a command-line flag (``help`` and argparse extras in its metadata)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


class OneSpellingHelp(argparse.HelpFormatter):
    """Help wrapped to at most :data:`HELP_WIDTH` columns that shows each flag in one spelling
    (``HfArgumentParser`` also accepts the kebab-case one)."""

    def __init__(self, prog, indent_increment=2, max_help_position=32, width=None):
        width = min(width or shutil.get_terminal_size().columns - 2, HELP_WIDTH)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_action_invocation(self, action):
        if len(action.option_strings) > 1:
            kebab = "--" + action.option_strings[0][2:].replace("_", "-")
            action = copy.copy(action)
            action.option_strings = [action.option_strings[0]] + [
                o for o in action.option_strings[1:] if o != kebab]
        return super()._format_action_invocation(action)
