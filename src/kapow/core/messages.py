"""
How a refusal's message names a value it refused (SPEC.md section 1's
details): shared by the route table, the control and data APIs, and the
history's queries, on the standard library alone.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["SHOWN_LENGTH", "quoted"]

#: The most characters of a value that :func:`quoted` shows.
SHOWN_LENGTH = 80


def quoted(value: object) -> str:
    """``value`` as a message names it: a string quoted as Python quotes it
    (``'/bad/{'``), a number as written, ``true``, ``false`` and ``null`` as
    in JSON, a list or an object by its kind. A string or number longer than
    :data:`SHOWN_LENGTH` characters is cut, ``...`` marking the cut.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOWN_LENGTH else repr(value[:SHOWN_LENGTH]) + "..."
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= SHOWN_LENGTH else text[:SHOWN_LENGTH] + "..."
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__
