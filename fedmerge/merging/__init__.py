"""Server-side model merging: training-free methods (:mod:`.methods`) and MergeRec (:mod:`.mergerec`)."""

from fedmerge.merging.methods import (
    METHODS,
    ROBUST_METHODS,
    MergeMethod,
    ProcessedTaskVectors,
    apply_delta,
    describe_methods,
    get_method,
    merge,
    processed_task_vectors,
    resolve_params,
    task_vectors,
)
from fedmerge.merging.mergerec import MERGEREC_METHODS, MergeRecConfig, MergeRecReport, mergerec

__all__ = [
    "MERGEREC_METHODS",
    "MergeRecConfig",
    "MergeRecReport",
    "mergerec",
    "METHODS",
    "ROBUST_METHODS",
    "MergeMethod",
    "ProcessedTaskVectors",
    "apply_delta",
    "describe_methods",
    "get_method",
    "merge",
    "processed_task_vectors",
    "resolve_params",
    "task_vectors",
]
