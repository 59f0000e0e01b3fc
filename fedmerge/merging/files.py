"""Merging saved weight files (``fedmerge merge``): θ₀ and client weights from safetensors files, merged by a
training-free method of the registry, written back as safetensors with the method, its parameters and the model
names in the file's metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError


def merge_weight_files(
    method: str, theta0: str | Path, models: Mapping[str, str | Path], params: Mapping[str, Any], out: str | Path
) -> Path:
    """θ₀ + the merged task vectors of ``models`` (name → weight file) under ``method`` with ``params``, saved to
    ``out``; an unknown method is refused before any file is read, a parameter the method refuses names it
    (FedmergeError)."""
    from fedmerge.merging import get_method, merge
    from fedmerge.storage import load_weights, save_weights

    try:
        get_method(method)
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    base = load_weights(Path(theta0))
    weights = {name: load_weights(Path(file)) for name, file in models.items()}
    try:
        merged = merge(method, base, weights, **params)
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    metadata = {"method": method, "params": json.dumps(dict(params)), "models": json.dumps(list(weights))}
    return save_weights(Path(out), merged, metadata=metadata)
