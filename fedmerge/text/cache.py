"""On-disk embedding cache keyed by encoder identity and text, safe for concurrent processes.

Layout: ``<root>/<sha256(identity)[:24]>/shard-<uuid>.npz``; each shard holds ``keys`` (n, 32) uint8 (the
sha256 of ``identity + NUL + text``), ``vectors`` (n, dim) float32 and ``identity``. Every encode call that
computes new embeddings writes one shard to a temporary file and renames it into place (``os.replace``), so
readers never see a half-written shard. A shard that cannot be read is renamed ``*.corrupt`` with a warning and
its texts are encoded again. The key index is loaded lazily per identity and refreshed from the directory
listing on every lookup, so shards written by other processes are picked up.

The default root is ``$FEDMERGE_CACHE_DIR/embeddings`` or ``~/.cache/fedmerge/embeddings``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmerge.data.domain import ItemCatalog
from fedmerge.errors import FedmergeError
from fedmerge.text.encoder import TextEncoder

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_SHARD_GLOB = "shard-*.npz"
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def cache_base() -> Path:
    """fedmerge's cache folder: ``$FEDMERGE_CACHE_DIR``, else ``~/.cache/fedmerge`` (embeddings, ONNX graphs)."""
    return Path(os.environ.get("FEDMERGE_CACHE_DIR") or "~/.cache/fedmerge").expanduser()


def default_cache_root() -> Path:
    """``$FEDMERGE_CACHE_DIR/embeddings``, else ``~/.cache/fedmerge/embeddings``."""
    return cache_base() / "embeddings"


def text_key(identity: str, text: str) -> bytes:
    """Cache key of one text under one encoder: sha256(identity + NUL + text)."""
    return hashlib.sha256(identity.encode("utf-8") + b"\x00" + text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embedding rows stored on disk under ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self._index: dict[str, dict[bytes, tuple[Path, int]]] = {}
        self._known_shards: dict[str, set[Path]] = {}
        self._vectors: dict[Path, np.ndarray] = {}

    def folder(self, identity: str) -> Path:
        """The folder holding the shards of one encoder identity."""
        return self.root / hashlib.sha256(identity.encode("utf-8")).hexdigest()[:24]

    def _quarantine(self, shard: Path, reason: str) -> None:
        logger.warning("embedding cache shard %s is unreadable (%s); its texts will be encoded again", shard, reason)
        try:
            os.replace(shard, shard.with_suffix(".corrupt"))
        except OSError:  # another process may have moved it already
            pass
        self._vectors.pop(shard, None)
        for index in self._index.values():
            for key in [k for k, (where, _) in index.items() if where == shard]:
                del index[key]

    def _refresh(self, identity: str) -> dict[bytes, tuple[Path, int]]:
        """Add the keys of shards not indexed yet (written by us or by another process) to the index."""
        index = self._index.setdefault(identity, {})
        known = self._known_shards.setdefault(identity, set())
        folder = self.folder(identity)
        if not folder.is_dir():
            return index
        for shard in sorted(folder.glob(_SHARD_GLOB)):
            if shard in known:
                continue
            known.add(shard)
            try:
                with np.load(shard, allow_pickle=False) as data:
                    keys = data["keys"]
                    stored_identity = str(data["identity"])
            except _UNREADABLE as exc:
                self._quarantine(shard, f"{type(exc).__name__}: {exc}")
                continue
            if stored_identity != identity or keys.ndim != 2 or keys.shape[1] != KEY_BYTES:
                self._quarantine(shard, "identity or key layout does not match")
                continue
            for row, key in enumerate(keys):
                index.setdefault(key.tobytes(), (shard, row))
        return index

    def _shard_vectors(self, shard: Path, n_rows_needed: int, dim: int) -> np.ndarray | None:
        if shard not in self._vectors:
            try:
                with np.load(shard, allow_pickle=False) as data:
                    vectors = data["vectors"]
            except _UNREADABLE as exc:
                self._quarantine(shard, f"{type(exc).__name__}: {exc}")
                return None
            self._vectors[shard] = vectors
        vectors = self._vectors[shard]
        if vectors.ndim != 2 or vectors.shape[0] < n_rows_needed or vectors.shape[1] != dim:
            self._quarantine(shard, f"vectors have shape {vectors.shape}, expected (>= {n_rows_needed}, {dim})")
            return None
        return vectors

    def get(self, identity: str, keys: Sequence[bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached rows for ``keys``: (float32 (n, dim) array with zeros where missing, boolean found mask)."""
        out = np.zeros((len(keys), dim), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        index = self._refresh(identity)
        by_shard: dict[Path, tuple[list[int], list[int]]] = {}
        for pos, key in enumerate(keys):
            hit = index.get(key)
            if hit is not None:
                positions, rows = by_shard.setdefault(hit[0], ([], []))
                positions.append(pos)
                rows.append(hit[1])
        for shard, (positions, rows) in by_shard.items():
            vectors = self._shard_vectors(shard, max(rows) + 1, dim)
            if vectors is None:
                continue
            out[positions] = vectors[rows]
            found[positions] = True
        return out, found

    def count_missing(self, identity: str, texts: Sequence[str]) -> int:
        """How many distinct ``texts`` have no cached row under ``identity`` (reads the key index, no vector)."""
        index = self._refresh(identity)
        return len({key for key in (text_key(identity, t) for t in texts) if key not in index})

    def put(self, identity: str, keys: Sequence[bytes], vectors: np.ndarray) -> Path:
        """Store rows as one new shard, written to a temporary file and renamed into place."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but vectors of shape {vectors.shape}")
        folder = self.folder(identity)
        folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        shard = folder / f"shard-{name}.npz"
        tmp = folder / f".tmp-{name}.npz"
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=key_array, vectors=vectors, identity=np.array(identity))
            os.replace(tmp, shard)
        finally:
            if tmp.exists():
                tmp.unlink()
        index = self._index.setdefault(identity, {})
        self._known_shards.setdefault(identity, set()).add(shard)
        self._vectors[shard] = vectors
        for row, key in enumerate(keys):
            index.setdefault(key, (shard, row))
        return shard


def _check_embeddings(encoder: TextEncoder, vectors: np.ndarray, n_texts: int) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (n_texts, encoder.dim):
        raise FedmergeError(
            f"encoder {encoder.identity!r} returned shape {vectors.shape} for {n_texts} texts, "
            f"expected ({n_texts}, {encoder.dim})"
        )
    if not np.isfinite(vectors).all():
        raise FedmergeError(f"encoder {encoder.identity!r} returned non-finite embeddings")
    return vectors


def encode_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    cache: EmbeddingCache | Literal[False] | None = None,
) -> np.ndarray:
    """Embeddings of ``texts`` in order, float32 (n, dim); only texts missing from ``cache`` are encoded.

    ``cache=None`` uses the default :class:`EmbeddingCache`; ``cache=False`` encodes everything and stores nothing.
    Duplicate texts are encoded once. A failed cache write is logged and the embeddings are still returned.
    """
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if cache is False:
        return _check_embeddings(encoder, encoder.encode(texts), len(texts))
    cache = cache if cache is not None else EmbeddingCache()
    keys = [text_key(encoder.identity, t) for t in texts]
    out, found = cache.get(encoder.identity, keys, encoder.dim)
    missing: dict[bytes, str] = {}
    for key, text, hit in zip(keys, texts, found):
        if not hit:
            missing.setdefault(key, text)
    logger.info("embeddings for %d texts: %d cached, %d to encode", len(texts), int(found.sum()), len(missing))
    if missing:
        new_keys = list(missing)
        new_vectors = _check_embeddings(encoder, encoder.encode(list(missing.values())), len(new_keys))
        try:
            cache.put(encoder.identity, new_keys, new_vectors)
        except OSError as exc:
            logger.warning("could not write the embedding cache under %s: %s", cache.root, exc)
        row_of = {key: row for row, key in enumerate(new_keys)}
        positions = np.flatnonzero(~found)
        out[positions] = new_vectors[[row_of[keys[p]] for p in positions]]
    return out


def encode_catalog(
    encoder: TextEncoder, catalog: ItemCatalog, cache: EmbeddingCache | Literal[False] | None = None
) -> np.ndarray:
    """Embeddings of a catalog's item texts (``catalog.texts()``), one row per item index."""
    return encode_texts(encoder, catalog.texts(), cache=cache)


def warm_cache_worker() -> None:
    """A :func:`warm_cache` worker process: reads ``{"encoder", "params", "root", "texts"}`` as JSON from stdin and
    encodes the texts missing from the cache at ``root`` with one torch thread."""
    import json
    import sys

    import torch

    from fedmerge.text.encoder import get_encoder

    spec = json.load(sys.stdin)
    torch.set_num_threads(1)
    encode_texts(get_encoder(spec["encoder"], **spec["params"]), spec["texts"], cache=EmbeddingCache(spec["root"]))


def _run_worker(encoder_name: str, params: Mapping[str, Any], root: Path, texts: list[str]) -> None:
    import json
    import subprocess
    import sys

    from fedmerge.paths import importable_env

    spec = json.dumps({"encoder": encoder_name, "params": dict(params), "root": str(root), "texts": texts})
    done = subprocess.run([sys.executable, "-c", "from fedmerge.text.cache import warm_cache_worker; warm_cache_worker()"],
                          input=spec, text=True, capture_output=True, env=importable_env())
    if done.returncode != 0:
        raise FedmergeError(f"a parallel encoding worker for {len(texts)} texts failed (exit {done.returncode}): "
                            f"{done.stderr.strip()[-2000:]}")


def warm_cache(
    encoder_name: str, params: Mapping[str, Any], cache: EmbeddingCache, catalogs: Sequence[Sequence[str]], workers: int
) -> int:
    """Encode several catalogs' texts into ``cache`` in parallel: one worker process (a fresh interpreter, one torch
    thread, so no OpenMP threads wait on each other when the machine is busy) per catalog with missing texts, at most
    ``workers`` at a time. Returns how many catalogs were encoded here: none when fewer than two miss texts or
    ``workers`` < 2 (one catalog gains nothing; the caller's own encoding then does the work). Reading the cache
    afterwards gives the rows the caller would have encoded (same encoder, same identity). A failed worker raises
    FedmergeError with its error output; what the others stored stays cached."""
    from concurrent.futures import ThreadPoolExecutor

    from fedmerge.text.encoder import get_encoder

    identity = get_encoder(encoder_name, **params).identity
    todo = [list(texts) for texts in catalogs if cache.count_missing(identity, texts)]
    if workers < 2 or len(todo) < 2:
        return 0
    logger.info("encoding %d catalogs in %d parallel processes into %s", len(todo), min(workers, len(todo)), cache.root)
    with ThreadPoolExecutor(min(workers, len(todo))) as pool:
        list(pool.map(lambda texts: _run_worker(encoder_name, params, cache.root, texts), todo))
    return len(todo)
