"""Crash-safe result files: atomic JSON/bytes writes and per-client weight files (safetensors).

Every write goes to a temporary file in the target folder, is flushed to disk, and is renamed into place with
``os.replace``, so a reader (or a crash) sees either the old file or the complete new one, never half a file.

Client weights live at ``<out_dir>/clients/<file-safe domain>.safetensors`` with the real domain name in the
safetensors metadata, so a run can re-merge from saved weights without retraining (``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from fedmerge.errors import DataError, FedmergeError
from fedmerge.models.base import StateDict

logger = logging.getLogger(__name__)

CLIENTS_DIR = "clients"
WEIGHTS_SUFFIX = ".safetensors"
DOMAIN_KEY = "domain"


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary sibling file, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically (NaN/Inf are refused rather than written as invalid JSON)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default)
    except ValueError as exc:
        raise FedmergeError(f"cannot write {path}: {exc}") from exc
    return write_bytes_atomic(path, (text + "\n").encode("utf-8"))


def _json_default(value: Any) -> Any:
    """numpy/torch scalars and arrays, and paths, as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def safe_file_stem(name: str) -> str:
    """A file name for ``name``: characters other than letters, digits, ``.-_`` become ``_``; never empty/hidden."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if not stem:
        raise ValueError(f"cannot make a file name from {name!r}")
    return stem


def save_weights(path: str | Path, weights: StateDict, metadata: Mapping[str, str] | None = None) -> Path:
    """Weights as a safetensors file (contiguous CPU copies), written atomically, with string metadata."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    return write_bytes_atomic(path, save(tensors, metadata=dict(metadata or {})))


def load_weights(path: str | Path) -> StateDict:
    """Weights from a safetensors file; a clear DataError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weight file {path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"weight file {path} is not a readable safetensors file: {exc}") from exc


def weights_digest(weights: StateDict) -> str:
    """Short sha256 over every tensor's name, dtype, shape and bytes (sorted by name): the weights' identity."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a weight file; a clear DataError when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"weight file {path} is not a readable safetensors file: {exc}") from exc


def client_weights_path(out_dir: str | Path, domain: str) -> Path:
    """``<out_dir>/clients/<file-safe domain>.safetensors``."""
    return Path(out_dir) / CLIENTS_DIR / f"{safe_file_stem(domain)}{WEIGHTS_SUFFIX}"


def save_client_weights(
    out_dir: str | Path, domain: str, weights: StateDict, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save one client's trained weights atomically; the domain name (and ``metadata``) go into the file."""
    meta = {**dict(metadata or {}), DOMAIN_KEY: domain}
    path = save_weights(client_weights_path(out_dir, domain), weights, meta)
    logger.debug("saved weights of %s to %s", domain, path)
    return path


def load_client_weights(out_dir: str | Path) -> dict[str, StateDict]:
    """Every saved client's weights, keyed by domain name (sorted); a DataError when none were saved."""
    folder = Path(out_dir) / CLIENTS_DIR
    files = sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")) if folder.is_dir() else []
    if not files:
        raise DataError(f"no saved client weights under {folder}; run without --resume first")
    weights: dict[str, StateDict] = {}
    for file in files:
        domain = read_metadata(file).get(DOMAIN_KEY)
        if not domain:
            raise DataError(f"weight file {file} has no '{DOMAIN_KEY}' metadata entry")
        if domain in weights:
            raise DataError(f"two weight files under {folder} claim domain {domain!r}")
        weights[domain] = load_weights(file)
    return dict(sorted(weights.items()))


def client_metadata(out_dir: str | Path) -> dict[str, dict[str, str]]:
    """The metadata of every saved client weight file, keyed by domain name."""
    folder = Path(out_dir) / CLIENTS_DIR
    result: dict[str, dict[str, str]] = {}
    for file in sorted(folder.glob(f"*{WEIGHTS_SUFFIX}")) if folder.is_dir() else []:
        meta = read_metadata(file)
        result[meta.get(DOMAIN_KEY, file.stem)] = meta
    return result

