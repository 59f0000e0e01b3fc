"""Checks on a client's weight update before the server merges it.

A client ships a :data:`~fedmerge.models.base.StateDict`. Before it can touch the merged model the server checks
that it is an update *of the same model*: same family, exactly the parameter names of θ₀, the same shapes and
dtypes, finite values, and within a size budget. Any failure raises :class:`UpdateRejected` naming the problem,
so the server can drop (or report) that client instead of crashing deep inside a merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedmerge.errors import FedmergeError
from fedmerge.models.base import StateDict

_MAX_NAMES_SHOWN = 5


class UpdateRejected(FedmergeError):
    """A client's update was refused; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _names(names: set[str]) -> str:
    shown = sorted(names)[:_MAX_NAMES_SHOWN]
    more = len(names) - len(shown)
    return ", ".join(repr(n) for n in shown) + (f" (+{more} more)" if more > 0 else "")


def check_family(family: str, expected_family: str) -> None:
    """The update must come from the model family the server is merging."""
    if family != expected_family:
        raise UpdateRejected(f"model family {family!r} does not match the server's family {expected_family!r}")


def check_names(theta0: Mapping[str, torch.Tensor], update: Mapping[str, object]) -> None:
    """The update must have exactly θ₀'s parameter names (none missing, none extra)."""
    missing = set(theta0) - set(update)
    extra = set(update) - set(theta0)
    problems = []
    if missing:
        problems.append(f"missing parameters {_names(missing)}")
    if extra:
        problems.append(f"unexpected parameters {_names(extra)}")
    if problems:
        raise UpdateRejected("; ".join(problems))


def check_tensor(name: str, reference: torch.Tensor, value: object) -> None:
    """One parameter: a tensor with θ₀'s shape and dtype (a floating dtype), dense, and with only finite values."""
    if not isinstance(value, torch.Tensor):
        raise UpdateRejected(f"parameter {name!r} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise UpdateRejected(f"parameter {name!r} has layout {value.layout}, expected a dense tensor")
    if tuple(value.shape) != tuple(reference.shape):
        raise UpdateRejected(f"parameter {name!r} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
    if value.dtype != reference.dtype:
        raise UpdateRejected(f"parameter {name!r} has dtype {value.dtype}, expected {reference.dtype}")
    if not value.dtype.is_floating_point:
        raise UpdateRejected(f"parameter {name!r} has non-float dtype {value.dtype}")
    n_bad = int((~torch.isfinite(value)).sum())
    if n_bad:
        n_nan = int(torch.isnan(value).sum())
        raise UpdateRejected(
            f"parameter {name!r} has {n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} ±Inf)"
        )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Payload size: numel × element size."""
    return tensor.numel() * tensor.element_size()


def check_size(update: Mapping[str, torch.Tensor], max_bytes: int) -> None:
    """No single array and not the update as a whole may exceed ``max_bytes``."""
    total = 0
    for name, value in update.items():
        size = tensor_bytes(value)
        if size > max_bytes:
            raise UpdateRejected(f"parameter {name!r} is {size} bytes, over the limit of {max_bytes} bytes")
        total += size
    if total > max_bytes:
        raise UpdateRejected(f"update is {total} bytes in total, over the limit of {max_bytes} bytes")


def check_update(
    theta0: StateDict,
    update: StateDict,
    family: str,
    *,
    expected_family: str,
    max_bytes: int | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` is a well-formed set of weights for θ₀'s model.

    Checked in order: family, parameter names, then per parameter type/shape/dtype/finiteness, then sizes
    (``max_bytes`` bounds each array and the total; ``None`` disables the size check).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if not isinstance(update, Mapping):
        raise UpdateRejected(f"update is a {type(update).__name__}, not a mapping of parameter names to tensors")
    check_family(family, expected_family)
    check_names(theta0, update)
    for name, reference in theta0.items():
        check_tensor(name, reference, update[name])
    if max_bytes is not None:
        check_size(update, max_bytes)


def max_bytes_for(theta0: StateDict, slack: float = 1.0) -> int:
    """A size budget derived from θ₀: ``slack`` × its total bytes (a well-formed update is exactly that size)."""
    if slack < 1.0 or not math.isfinite(slack):
        raise ValueError(f"slack must be a finite number >= 1, got {slack}")
    return int(math.ceil(slack * sum(tensor_bytes(t) for t in theta0.values())))
