"""Domain data: the Domain abstraction and its loaders (MergeRec Amazon format, generic CSV/JSONL, synthetic)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedmerge.data.amazon import (
    AMAZON_FILES,
    is_tarball,
    load_amazon_catalog,
    load_amazon_domain,
    tarball_member_digests,
)
from fedmerge.data.domain import (
    Domain,
    ItemCatalog,
    Split,
    concat_domains,
    domain_item_offsets,
    interaction_matrix,
    item_text,
)
from fedmerge.data.generic import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    load_generic_catalog,
    load_generic_domain,
    save_generic_domain,
)
from fedmerge.errors import DataError

__all__ = [
    "Domain",
    "ItemCatalog",
    "Split",
    "concat_domains",
    "detect_format",
    "domain_files_digest",
    "domain_item_offsets",
    "interaction_matrix",
    "item_text",
    "load_amazon_catalog",
    "load_amazon_domain",
    "load_catalog",
    "load_domain",
    "load_generic_catalog",
    "load_generic_domain",
    "same_domain_files",
    "save_generic_domain",
]


def detect_format(path: str | Path) -> str:
    """``"amazon"`` for a ``.tar.gz``/``.tgz`` or a folder with ``train.json``; ``"generic"`` for a folder with
    ``interactions.csv`` or ``items.jsonl``; otherwise a DataError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() and is_tarball(path):
        return "amazon"
    if path.is_dir():
        if (path / "train.json").is_file() or (path / "smap.json").is_file():
            return "amazon"
        if (path / INTERACTIONS_FILE).is_file() or (path / ITEMS_FILE).is_file():
            return "generic"
    raise DataError(
        f"{path}: not a domain (expected an Amazon folder with train.json..., an Amazon .tar.gz, "
        f"or a folder with {INTERACTIONS_FILE} + {ITEMS_FILE})"
    )


def load_domain(path: str | Path, name: str | None = None) -> Domain:
    """Load a domain in either format (see :func:`detect_format`); ``name`` defaults to the folder/tarball stem."""
    if detect_format(path) == "amazon":
        return load_amazon_domain(path, name)
    return load_generic_domain(path, name)


def load_catalog(path: str | Path) -> ItemCatalog:
    """Only the public item catalog of a domain (Amazon: smap.json + meta_data.json; generic: items.jsonl)."""
    if detect_format(path) == "amazon":
        return load_amazon_catalog(path)
    return load_generic_catalog(path)


def domain_files_digest(path: str | Path) -> str:
    """sha256 of the files a domain is read from, by content: the name and sha256 of each of its Amazon or generic
    files in a fixed order, whether they lie in a folder or in a tarball (a tarball and its unpacked folder give one
    digest). What a resumed run, and ``evaluate`` of a run's model, compare to tell that the data changed since the
    run (:func:`same_domain_files`)."""
    path = Path(path)
    names = AMAZON_FILES if detect_format(path) == "amazon" else (INTERACTIONS_FILE, ITEMS_FILE)
    if path.is_file():
        contents = tarball_member_digests(path, names)
    else:
        contents = {}
        for name in (n for n in names if (path / n).is_file()):
            with (path / name).open("rb") as handle:
                contents[name] = hashlib.file_digest(handle, "sha256").digest()
    digest = hashlib.sha256()
    for name in (n for n in names if n in contents):
        digest.update(name.encode() + b"\0" + contents[name])
    return digest.hexdigest()


def same_domain_files(recorded: str, path: str | Path, current: str | None = None) -> bool:
    """Whether a recorded :func:`domain_files_digest` is that of the files at ``path`` (``current``: their digest,
    when the caller already has it). Runs before 2026-12-07 recorded a tarball by the digest of the tarball file
    itself (its name and sha256), which is accepted too."""
    path = Path(path)
    if recorded == (domain_files_digest(path) if current is None else current):
        return True
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        file_sha = hashlib.file_digest(handle, "sha256").digest()
    return recorded == hashlib.sha256(path.name.encode() + b"\0" + file_sha).hexdigest()
