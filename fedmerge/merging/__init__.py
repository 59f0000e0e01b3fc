"""Server-side model merging: training-free methods (:mod:`.methods`) and MergeRec (:mod:`.mergerec`).

The registry (:mod:`.registry`) and MergeRec's settings (:mod:`.mergerec_config`) are torch-free and imported here;
the names of :mod:`.methods` that compute on tensors are imported on first use, so that validating a scenario does
not import torch. MergeRec itself is imported from :mod:`.mergerec` (``from fedmerge.merging.mergerec import
mergerec``): the function shares its module's name, which a package that imports the module lazily cannot export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedmerge.merging.mergerec_config import MERGEREC_METHODS, MergeRecConfig
from fedmerge.merging.registry import (
    METHODS,
    ROBUST_METHODS,
    MergeMethod,
    Param,
    describe_methods,
    get_method,
    register_method,
    resolve_params,
)

if TYPE_CHECKING:
    from fedmerge.merging.methods import ProcessedTaskVectors, apply_delta, merge, processed_task_vectors, task_vectors

TENSOR_NAMES = ("ProcessedTaskVectors", "apply_delta", "merge", "processed_task_vectors", "task_vectors")


def __getattr__(name: str) -> Any:
    """The :data:`TENSOR_NAMES` of :mod:`.methods`, imported (with torch) on first access."""
    if name in TENSOR_NAMES:
        from fedmerge.merging import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'fedmerge.merging' has no attribute {name!r}")


__all__ = [
    "MERGEREC_METHODS",
    "MergeRecConfig",
    "METHODS",
    "ROBUST_METHODS",
    "MergeMethod",
    "Param",
    "ProcessedTaskVectors",
    "apply_delta",
    "describe_methods",
    "get_method",
    "merge",
    "processed_task_vectors",
    "register_method",
    "resolve_params",
    "task_vectors",
]
