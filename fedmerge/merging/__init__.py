"""Server-side model merging: training-free methods (:mod:`.methods`) and MergeRec (:mod:`.mergerec`)."""

from fedmerge.merging.methods import (
    METHODS,
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
from fedmerge.merging.mergerec import MergeRecConfig, MergeRecReport, mergerec

__all__ = [
    "MergeRecConfig",
    "MergeRecReport",
    "mergerec",
    "METHODS",
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
