"""Value checks shared by scenario loading, the merge registry, update validation, model cards and aggregation
(no heavy imports): what counts as a number, a finite number and an integer wherever fedmerge reads one from TOML,
JSON or a client's reply."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_number(value: Any) -> bool:
    """A real number (Python or NumPy, finite or not), never a bool: ``True`` is not 1 in a scenario or a reply."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """:func:`is_number` and finite (no NaN, no ±inf; any integer, also one too large for a float)."""
    return is_number(value) and (isinstance(value, numbers.Integral) or math.isfinite(value))


def is_integer(value: Any) -> bool:
    """An integer (Python or NumPy), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# a value's expected type in words, for the messages that refuse it
TYPE_WORDS: dict[Any, str] = {bool: "true or false", float: "a number", int: "an integer", str: "a string",
                              list: "a list", dict: "a table", type(None): "None"}
