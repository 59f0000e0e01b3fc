"""Value checks shared by scenario loading, the merge registry, update validation, model cards and aggregation
(no heavy imports): what counts as a number, a finite number and an integer wherever fedmerge reads one from TOML,
JSON or a client's reply."""

from __future__ import annotations

import collections.abc
import math
import numbers
import types
import typing
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


def is_finite_float(value: Any) -> bool:
    """:func:`is_number` and finite as a float (an integer too large for a float, such as 10**400, is not)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


# the largest Recall@K / NDCG@K cut-off K: the metrics build a table of K + 1 gains (8 MB at the bound)
MAX_CUTOFF = 1_000_000


def too_large_cutoffs(ks: collections.abc.Iterable[Any]) -> list[Any]:
    """The integer cut-offs of ``ks`` above :data:`MAX_CUTOFF` (which a metric could not allocate)."""
    return [k for k in ks if is_integer(k) and k > MAX_CUTOFF]


# a value's expected type in words, for the messages that refuse it
TYPE_WORDS: dict[Any, str] = {bool: "true or false", float: "a number", int: "an integer", str: "a string",
                              list: "a list", dict: "a table", type(None): "None"}


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as TOML or JSON gives it, or a NumPy scalar) fits an annotation: ``int`` (not a bool),
    ``float`` (an int too), ``bool``, ``str``, ``None``, ``Literal[...]`` (one of its values), unions of these,
    ``tuple[X, ...]`` / ``Sequence[X]`` (a list or tuple of X) and ``Mapping`` / ``dict`` (a table); any other
    annotation (and an unevaluated string one) accepts every value."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(hint))
    if origin in (tuple, collections.abc.Sequence):
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_integer(value)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    return True


def describe_type(hint: Any) -> str:
    """``hint`` in words, e.g. ``int | None`` -> "an integer or None"."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in typing.get_args(hint))
    if origin in (tuple, collections.abc.Sequence):
        args = typing.get_args(hint)
        return f"a list of {describe_type(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return TYPE_WORDS.get(hint, str(hint))
