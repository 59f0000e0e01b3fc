"""Loader for the MergeRec Amazon format, from a folder or a ``.tar.gz`` read in place (nothing is unpacked).

Files (all JSON): ``train.json`` / ``val.json`` / ``test.json`` map a user index to item indices, ``smap.json`` maps
ASIN -> item index (0..n_items-1), ``umap.json`` maps reviewer id -> user index, ``meta_data.json`` maps ASIN -> text
fields. Every inconsistency is a :class:`DataError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmerge.checks import is_integer
from fedmerge.data.domain import Domain, ItemCatalog, as_sequences, field_text, item_text, valid_text
from fedmerge.data.generic import INTERACTIONS_FILE, ITEMS_FILE, DuplicateKey, unique_keys
from fedmerge.errors import DataError

logger = logging.getLogger(__name__)

SEQUENCE_FILES = ("train.json", "val.json", "test.json")
CATALOG_FILES = ("smap.json", "meta_data.json")
AMAZON_FILES = SEQUENCE_FILES + ("umap.json",) + CATALOG_FILES
GENERIC_FILES = (INTERACTIONS_FILE, ITEMS_FILE)  # named in the error for a tarball of a generic-format domain
TARBALL_SUFFIXES = (".tar.gz", ".tgz")
# One JSON file is parsed in memory (several times its size): a bound against a crafted or corrupt tarball member
# (a gzip bomb) exhausting the client's memory. The real members are 2-3 MB.
MAX_FILE_BYTES = 256 * 2**20
AMAZON_ROOT_ENV = "FEDMERGE_AMAZON_DIR"


def default_amazon_root() -> Path:
    """Where downloaded Amazon domains live: ``$FEDMERGE_AMAZON_DIR``, else ``data/amazon`` (working folder).

    ``fedmerge data download amazon --dest data/amazon`` fills the default location.
    """
    return Path(os.environ.get(AMAZON_ROOT_ENV) or "data/amazon").expanduser()


def is_tarball(path: Path) -> bool:
    return path.name.endswith(TARBALL_SUFFIXES)


def source_stem(path: Path) -> str:
    """Folder name (of the folder itself for ``.`` or ``..``), or the tarball's name without ``.tar.gz`` / ``.tgz``:
    the default domain name."""
    if path.name in ("", ".."):  # Path(".").name is "": the domain had no name
        return path.resolve().name
    for suffix in TARBALL_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _parse_json(raw: bytes, label: str) -> Any:
    try:
        return json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise DataError(f"{label}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, a 5,000-digit int
        raise DataError(f"{label}: invalid JSON: {exc or 'nested too deeply'}") from None


def _check_size(label: str, size: int) -> None:
    """DataError when one file (or tarball member) is larger than :data:`MAX_FILE_BYTES` (it is parsed in memory)."""
    if size > MAX_FILE_BYTES:
        raise DataError(f"{label}: {size} bytes, more than the {MAX_FILE_BYTES} bytes one data file may hold "
                        "(fedmerge.data.amazon.MAX_FILE_BYTES)")


def _read_folder(folder: Path, names: Iterable[str]) -> dict[str, Any]:
    parsed = {}
    for name in names:
        file = folder / name
        if not file.is_file():
            raise DataError(f"{file}: missing (an Amazon domain folder needs {', '.join(AMAZON_FILES)})")
        _check_size(str(file), file.stat().st_size)
        parsed[name] = _parse_json(file.read_bytes(), str(file))
    return parsed


def _tarball_members(tarball: Path, wanted: set[str], seen: set[str]) -> Iterator[tuple[str, str, bytes]]:
    """(file name, label for messages, bytes) of each wanted file member of the tarball, at the top level or one
    folder deep, in one streaming pass; each name once (a second copy is refused). ``seen`` collects every member's
    file name."""
    found: dict[str, tuple[str, ...]] = {}  # file name -> the folder it came from
    try:
        # gzip read through to its end, not tarfile's "r|gz": that stream never checks the gzip trailer, so a
        # flipped bit that still inflates (to other JSON) or a cut-off trailer loaded without an error
        with gzip.open(tarball, "rb") as compressed, tarfile.open(fileobj=compressed, mode="r|") as archive:
            for member in archive:
                parts = Path(member.name).parts
                seen.update(parts[-1:])
                if len(parts) > 2 or parts[-1] not in wanted:
                    continue
                if member.name.startswith("/") or ".." in parts:
                    raise DataError(f"{tarball}: member {member.name!r} points outside the tarball's folder")
                if member.issym() or member.islnk():
                    raise DataError(f"{tarball}: {member.name} is a link, not a file")
                if not member.isfile():
                    continue
                if parts[-1] in found:
                    raise DataError(f"{tarball}: holds {parts[-1]} twice")
                other = next(iter(found.items()), None)
                if other is not None and other[1] != parts[:-1]:
                    raise DataError(f"{tarball}: {member.name} and {'/'.join((*other[1], other[0]))} are in different "
                                    "folders: one domain's files must share one folder")
                found[parts[-1]] = parts[:-1]
                _check_size(f"{tarball}:{member.name}", member.size)  # extractfile reads exactly member.size bytes
                data = archive.extractfile(member).read()
                yield parts[-1], f"{tarball}:{member.name}", data
            while compressed.read(1 << 20):  # the rest, to the trailer: its CRC-32 and length are checked there
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{tarball}: unreadable or truncated tarball ({type(exc).__name__}: {exc})") from None


def tarball_member_digests(tarball: Path, names: Iterable[str]) -> dict[str, bytes]:
    """sha256 of each named file member of the tarball (at the top level or one folder deep), by file name."""
    return {name: hashlib.sha256(data).digest() for name, _, data in _tarball_members(tarball, set(names), set())}


def _read_tarball(tarball: Path, names: Iterable[str]) -> dict[str, Any]:
    """Parse the wanted JSON members (at the top level or one folder deep) in one streaming pass."""
    wanted: set[str] = set(names)
    seen: set[str] = set()
    parsed = {name: _parse_json(data, label) for name, label, data in _tarball_members(tarball, wanted, seen)}
    generic_members = seen & set(GENERIC_FILES)
    missing = sorted(wanted - parsed.keys())
    if missing and generic_members:
        raise DataError(f"{tarball}: holds {', '.join(sorted(generic_members))} of a generic-format domain; a tarball "
                        "is read in MergeRec's Amazon format only: unpack it into a folder (tar xzf) and pass the "
                        "folder")
    if missing:
        raise DataError(f"{tarball}: missing {', '.join(missing)}")
    return parsed


def read_amazon_files(path: str | Path, names: Iterable[str] = AMAZON_FILES) -> tuple[dict[str, Any], str]:
    """Parsed JSON of the named files from a folder or tarball, plus a label for messages (``<path>``)."""
    path = Path(path)
    if is_tarball(path) and not path.is_dir():
        if not path.is_file():
            raise DataError(f"{path}: no such tarball")
        return _read_tarball(path, names), str(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder or .tar.gz file")
    return _read_folder(path, names), str(path)


def _index_map(mapping: Any, file: str, what: str) -> dict[str, int]:
    """Validate a ``{id: index}`` map whose indices are exactly 0..n-1."""
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{file}: expected a non-empty JSON object of {what} id -> index")
    bad = [k for k, v in mapping.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise DataError(f"{file}: {what} index of {bad[0]!r} is not an integer")
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise DataError(f"{file}: {what} indices are not exactly 0..{len(mapping) - 1} (duplicates or gaps)")
    return mapping


def _catalog(smap: Any, meta: Any, label: str) -> ItemCatalog:
    smap = _index_map(smap, f"{label}/smap.json", "item")
    if not isinstance(meta, dict):
        raise DataError(f"{label}/meta_data.json: expected a JSON object of ASIN -> text fields")
    ids = [""] * len(smap)
    for asin, index in smap.items():
        ids[index] = asin
    fields = []
    for asin in ids:  # values as the generic format reads them (field_text): no "nan", "True" or "['a', 'b']"
        record = meta.get(asin)
        try:
            texts = ({valid_text(str(k)): field_text(v) for k, v in record.items()} if isinstance(record, Mapping)
                     else {})
            fields.append({k: t for k, t in texts.items() if t})  # empty values left out, as the generic reader does
        except TypeError:
            raise DataError(f"{label}/meta_data.json: item {asin!r}: a field is a JSON object; give text, a number "
                            "or a list of them") from None
    missing = [a for a, f in zip(ids, fields) if not item_text(f)]
    if missing:
        raise DataError(
            f"{label}/meta_data.json: {len(missing)} items of smap.json have no text, e.g. {missing[:3]}"
        )
    return ItemCatalog(ids=tuple(ids), fields=tuple(fields))


def _user_index(key: str, file: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise DataError(f"{file}: user key {key!r} is not an integer index") from None


def _item_list(value: Any, file: str, user: str, n_items: int) -> list[int]:
    if not isinstance(value, list) or not all(is_integer(i) for i in value):
        raise DataError(f"{file}: user {user}: expected a list of integer item indices, got {value!r:.60}")
    out_of_range = [i for i in value if not 0 <= i < n_items]
    if out_of_range:
        raise DataError(f"{file}: user {user}: item index {out_of_range[0]} out of range 0..{n_items - 1}")
    return value


def _targets(data: Any, file: str, users: dict[int, int], n_items: int) -> np.ndarray:
    """Per-user target item (``-1`` where the user has no entry); every listed user must be a training user."""
    if not isinstance(data, dict):
        raise DataError(f"{file}: expected a JSON object of user index -> [item index]")
    targets = np.full(len(users), -1, dtype=np.int64)
    for key, value in data.items():
        row = users.get(_user_index(key, file))
        if row is None:
            raise DataError(f"{file}: user {key} is not in train.json")
        items = _item_list(value, file, key, n_items)
        if len(items) != 1:
            raise DataError(f"{file}: user {key}: expected exactly one target item, got {len(items)}")
        if targets[row] >= 0:
            raise DataError(f"{file}: user {key} is listed twice (another key names the same user index)")
        targets[row] = items[0]
    return targets


def load_amazon_catalog(path: str | Path) -> ItemCatalog:
    """The public catalog only (``smap.json`` + ``meta_data.json``): item index -> ASIN and text fields."""
    parsed, label = read_amazon_files(path, CATALOG_FILES)
    return _catalog(parsed["smap.json"], parsed["meta_data.json"], label)


def load_amazon_domain(path: str | Path, name: str | None = None) -> Domain:
    """A MergeRec Amazon domain from a folder or ``.tar.gz``; ``name`` defaults to the folder / tarball stem.

    Users are ordered by their integer index; ``user_ids`` are the reviewer ids of ``umap.json``. Users without a
    val/test entry get target ``-1``.
    """
    parsed, label = read_amazon_files(path)
    catalog = _catalog(parsed["smap.json"], parsed["meta_data.json"], label)
    n_items = len(catalog)
    train = parsed["train.json"]
    if not isinstance(train, dict):
        raise DataError(f"{label}/train.json: expected a JSON object of user index -> [item index, ...]")
    if not train:
        raise DataError(f"{label}/train.json: the domain has no users")
    user_keys = sorted(train, key=lambda k: _user_index(k, f"{label}/train.json"))
    users = {int(k): row for row, k in enumerate(user_keys)}
    if len(users) != len(user_keys):
        raise DataError(f"{label}/train.json: a user index occurs twice")
    sequences = [_item_list(train[k], f"{label}/train.json", k, n_items) for k in user_keys]
    empty = [k for k, s in zip(user_keys, sequences) if not s]
    if empty:
        raise DataError(f"{label}/train.json: {len(empty)} users have an empty training sequence, e.g. user {empty[0]}")

    umap = _index_map(parsed["umap.json"], f"{label}/umap.json", "user")
    if set(umap.values()) != users.keys():
        raise DataError(
            f"{label}/umap.json: its {len(umap)} user indices do not match the {len(users)} users of train.json"
        )
    reviewer = {index: rid for rid, index in umap.items()}
    domain = Domain(
        name=name or source_stem(Path(path)),
        catalog=catalog,
        train=as_sequences(sequences),
        val_target=_targets(parsed["val.json"], f"{label}/val.json", users, n_items),
        test_target=_targets(parsed["test.json"], f"{label}/test.json", users, n_items),
        user_ids=tuple(reviewer[int(k)] for k in user_keys),
    )
    logger.debug("loaded Amazon domain %s from %s: %s", domain.name, label, domain.summary())
    return domain
