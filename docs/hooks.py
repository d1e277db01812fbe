"""MkDocs hook: render the Sphinx roles of hf_tdrop's docstrings (:func:`x`, :class:`~a.B`, ...)
as plain code spans in the generated API pages."""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj|const):<code>~?([^<]*)</code>")


def _code(match: re.Match) -> str:
    return f"<code>{match.group(1)}</code>"


def on_page_content(html, page, config, files):
    return _ROLE.sub(_code, html)
