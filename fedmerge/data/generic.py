"""Generic domain format: ``interactions.csv`` (``user,item,timestamp``) plus ``items.jsonl`` (``id`` + text fields).

Header names are matched without case or surrounding spaces; a timestamp is a number (e.g. Unix seconds) or an
ISO 8601 date or date-time (one without a zone counts as UTC). Rows repeating another row exactly (same user, item
and timestamp) are dropped with a warning; the same item at another time is a repeat interaction and kept.
Sequences are built per user by a stable sort on timestamp (ties keep file order), users with fewer than
``min_interactions`` interactions are dropped (default 3, so that train keeps >= 1 item), an optional k-core filter
is applied, and each sequence is split leave-one-out: last item = test target, second last = validation target,
the rest = train.

In ``items.jsonl`` ids are stripped of surrounding spaces as the CSV's are; a text value may be a string, a number,
a boolean or a (nested) list of them (joined with ", "); null, NaN and empty values count as absent.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences, field_text, item_text, valid_text
from fedmerge.errors import DataError

logger = logging.getLogger(__name__)

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.jsonl"
REQUIRED_COLUMNS = ("user", "item", "timestamp")
MAX_LINE_BYTES = 1 << 20  # one items.jsonl line; CSV fields are bounded by csv.field_size_limit() (128 KiB)
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark (spreadsheet exports) is dropped from the start of a file
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode as UTF-8


def split_leave_one_out(
    name: str, catalog: ItemCatalog, sequences: Sequence[Sequence[int]], user_ids: Sequence[str] = (),
    dropped_users: int = 0,
) -> Domain:
    """Domain from full chronological sequences: train = s[:-2], val target = s[-2], test target = s[-1].

    Every sequence needs >= 3 items so that train keeps at least one; ``dropped_users``: how many the caller's
    filters removed (recorded in :attr:`Domain.dropped_users`).
    """
    short = [i for i, s in enumerate(sequences) if len(s) < 3]
    if short:
        raise DataError(f"domain {name!r}: {len(short)} users have fewer than 3 interactions (e.g. user #{short[0]})")
    return Domain(
        name=name,
        catalog=catalog,
        train=as_sequences([s[:-2] for s in sequences]),
        val_target=np.array([s[-2] for s in sequences], dtype=np.int64),
        test_target=np.array([s[-1] for s in sequences], dtype=np.int64),
        user_ids=tuple(user_ids),
        dropped_users=dropped_users,
    )


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (``json.loads`` would keep the last copy silently)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: the pairs as a dict, :class:`DuplicateKey` for a key named twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"key {key!r} occurs twice in one object")
        out[key] = value
    return out


def read_items_jsonl(file: Path) -> ItemCatalog:
    """Catalog in file order from a JSONL file: one object per line with ``id`` plus text fields."""
    if not file.is_file():
        raise DataError(f"{file}: missing (a generic domain folder needs {INTERACTIONS_FILE} and {ITEMS_FILE})")
    ids: list[str] = []
    fields: list[dict[str, str]] = []
    seen: set[str] = set()
    with file.open("rb") as handle:
        for line_no, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{file}:{line_no}: line longer than {MAX_LINE_BYTES} bytes")
            line = _utf8(raw[len(BOM):] if line_no == 1 and raw.startswith(BOM) else raw, file, line_no)
            if not line.strip():
                continue
            try:
                record = json.loads(line, object_pairs_hook=unique_keys)  # {"id": "i1", "id": "i2"} was item i2
            except DuplicateKey as exc:
                raise DataError(f"{file}:{line_no}: {exc}") from None
            except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, a 5,000-digit int
                raise DataError(f"{file}:{line_no}: invalid JSON: {exc or 'nested too deeply'}") from None
            raw_id = record.pop("id", None) if isinstance(record, dict) else None
            item_id = field_text(raw_id) if isinstance(raw_id, str | int | float) else ""
            if not item_id:
                raise DataError(f"{file}:{line_no}: expected a JSON object with an 'id' field")
            if item_id in seen:
                raise DataError(f"{file}:{line_no}: item id {item_id!r} occurs twice")
            text_fields = {}
            for key, value in record.items():
                try:
                    text = field_text(value)
                except TypeError:
                    raise DataError(f"{file}:{line_no}: item {item_id!r}: field {key!r} is a JSON object; give text, "
                                    "a number or a list of them") from None
                if text:
                    text_fields[valid_text(str(key))] = text
            if not item_text(text_fields):
                raise DataError(f"{file}:{line_no}: item {item_id!r} has no text fields (every record is an item each "
                                "model ranks, used or not: give it some text or remove the line)")
            seen.add(item_id)
            ids.append(item_id)
            fields.append(text_fields)
    if not ids:
        raise DataError(f"{file}: no items")
    return ItemCatalog(ids=tuple(ids), fields=tuple(fields))


def parse_timestamp(text: str) -> float:
    """Seconds of a CSV timestamp: a number as it is, an ISO 8601 date or date-time as Unix seconds (no zone: UTC);
    ValueError otherwise."""
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.strip())
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def read_interactions_csv(file: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(users, items, timestamps) columns of a CSV with a header holding at least ``user,item,timestamp``."""
    if not file.is_file():
        raise DataError(f"{file}: missing (a generic domain folder needs {INTERACTIONS_FILE} and {ITEMS_FILE})")
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    # utf-8-sig drops a leading byte-order mark; surrogateescape keeps undecodable bytes as U+DC80..U+DCFF so the
    # row (and its line number) that holds them is reported instead of an error somewhere in a read-ahead block
    with file.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        rows = _checked_rows(reader, file)
        header = next(rows, None)
        if header is None:
            raise DataError(f"{file}: empty file (expected a header {','.join(REQUIRED_COLUMNS)})")
        header = [h.strip().lower() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            other = next((name for sep, name in ((";", "';'"), ("\t", "a tab"), ("|", "'|'")) if sep in header[0]), "")
            hint = (f" (it looks separated by {other}; the file must be comma-separated)"
                    if len(header) == 1 and other else "")
            raise DataError(f"{file}:1: header {header} lacks column(s) {', '.join(missing)}{hint}")
        u_col, i_col, t_col = (header.index(c) for c in REQUIRED_COLUMNS)
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{file}:{reader.line_num}: {len(row)} fields, expected {len(header)}")
            user, item = row[u_col].strip(), row[i_col].strip()
            if not user or not item:
                raise DataError(f"{file}:{reader.line_num}: empty user or item")
            try:
                timestamp = parse_timestamp(row[t_col])
            except ValueError:
                raise DataError(f"{file}:{reader.line_num}: timestamp {row[t_col]!r} is neither a number nor an ISO "
                                "8601 date") from None
            if not np.isfinite(timestamp):
                raise DataError(f"{file}:{reader.line_num}: timestamp {row[t_col]!r} is not finite")
            users.append(user)
            items.append(item)
            times.append(timestamp)
    if not users:
        raise DataError(f"{file}: no interactions")
    return users, items, np.asarray(times, dtype=np.float64)


def _utf8(raw: bytes, file: Path, line_no: int) -> str:
    """``raw`` decoded as UTF-8; a DataError naming the file, line and offending byte otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}:{line_no}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "save the file as UTF-8") from None


def _checked_rows(reader: Any, file: Path) -> Iterator[list[str]]:
    """The rows of a csv reader over a surrogateescape text stream; DataError naming the file and line for a row
    with undecodable bytes, a field over the csv module's size limit or any other csv error."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{file}:{reader.line_num}: unreadable CSV ({exc})") from None
        bad = next((m for m in map(_UNDECODABLE.search, row) if m), None)
        if bad is not None:
            raise DataError(f"{file}:{reader.line_num}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x}); "
                            "save the file as UTF-8")
        yield row


def core_filter(user_codes: np.ndarray, item_codes: np.ndarray, min_user: int, min_item: int,
                keep: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of interactions kept by iterated filtering until every kept user has >= ``min_user`` and every
    kept item >= ``min_item`` interactions (repeats count; ``min_item <= 1`` filters users only), starting from the
    rows ``keep`` marks (default: all)."""
    keep = np.ones(len(user_codes), dtype=bool) if keep is None else keep.copy()
    while True:
        user_count = np.bincount(user_codes[keep], minlength=user_codes.max() + 1)
        item_count = np.bincount(item_codes[keep], minlength=item_codes.max() + 1)
        new_keep = keep & (user_count[user_codes] >= min_user) & (item_count[item_codes] >= min_item)
        if np.array_equal(new_keep, keep):
            return keep
        keep = new_keep


def load_generic_catalog(path: str | Path) -> ItemCatalog:
    """The public catalog only, from ``<path>/items.jsonl``."""
    return read_items_jsonl(Path(path) / ITEMS_FILE)


def load_generic_domain(
    path: str | Path, name: str | None = None, min_interactions: int = 3, k_core: int | None = None
) -> Domain:
    """A domain from ``<path>/interactions.csv`` and ``<path>/items.jsonl``; ``name`` defaults to the folder name.

    The catalog is all of ``items.jsonl`` in file order (the same as :func:`load_generic_catalog`, so a server that
    sees only the public file indexes items identically). Users are ordered by first appearance in the CSV; each
    sequence is sorted by timestamp (stable: ties keep file order). Users with fewer than ``min_interactions``
    (>= 3) interactions are dropped; ``k_core`` additionally iterates user/item filtering until every kept user and
    item has >= k interactions.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3 for a leave-one-out split, got {min_interactions}")
    if k_core is not None and k_core < 1:
        raise ValueError(f"k_core must be >= 1, got {k_core}")
    catalog = read_items_jsonl(folder / ITEMS_FILE)
    csv_file = folder / INTERACTIONS_FILE
    users, items, times = read_interactions_csv(csv_file)

    item_index = {item_id: i for i, item_id in enumerate(catalog.ids)}
    unknown = sorted({i for i in items if i not in item_index})
    if unknown:
        as_float = next((f"{i}.0" for i in unknown if f"{i}.0" in item_index), None)
        hint = (f"; {ITEMS_FILE} holds {as_float!r} (a JSON number written as a float): write the ids as strings"
                if as_float else "")
        raise DataError(f"{csv_file}: {len(unknown)} items have no text record in {ITEMS_FILE}, e.g. {unknown[:3]}"
                        f"{hint}")
    user_ids, user_codes = np.unique(np.asarray(users, dtype=object), return_inverse=True)
    item_codes = np.fromiter((item_index[i] for i in items), dtype=np.int64, count=len(items))
    first_rows = np.unique(np.stack([user_codes, item_codes, times.view(np.int64)], axis=1), axis=0,
                           return_index=True)[1]
    unique = np.zeros(len(items), dtype=bool)
    unique[first_rows] = True
    if not unique.all():
        logger.warning("%s: dropped %d exact duplicate rows (same user, item and timestamp as an earlier row)",
                       csv_file, int((~unique).sum()))
    keep = core_filter(user_codes, item_codes, max(min_interactions, k_core or 0), k_core or 0, unique)
    if not keep.any():
        raise DataError(f"{csv_file}: no user has >= {max(min_interactions, k_core or 0)} interactions after filtering")
    rows = np.flatnonzero(keep)
    order = rows[np.lexsort((rows, times[rows], user_codes[rows]))]  # by user, then timestamp, then file order
    bounds = np.flatnonzero(np.diff(user_codes[order])) + 1
    groups = np.split(order, bounds)
    if not keep.all():
        logger.info("%s: kept %d of %d interactions and %d of %d users after filtering", csv_file, keep.sum(),
                    len(keep), len(groups), len(user_ids))
    groups.sort(key=lambda g: g.min())  # users in order of their first (kept) appearance in the file
    sequences = [item_codes[g] for g in groups]
    name = name or (folder.name if folder.name not in ("", "..") else folder.resolve().name)  # a link: its own name
    return split_leave_one_out(name, catalog, sequences, [str(user_ids[user_codes[g[0]]]) for g in groups],
                               dropped_users=len(user_ids) - len(groups))


AMAZON_MARKERS = ("train.json", "smap.json")  # what makes load_domain read a folder as an Amazon domain


def check_domain_output(folders: Sequence[str | Path], overwrite: bool = False, files: Sequence[str | Path] = ()) -> None:
    """Before generic-format domains are written into ``folders`` (and the other output ``files``): a DataError
    naming each folder that already holds a domain's files (``items.jsonl``, ``interactions.csv``) and each of
    ``files`` that exists, unless ``overwrite`` (they are replaced then, with a warning; other files in the folders
    are left as they are). A folder that is a file, or holds an Amazon-format domain (``train.json``/``smap.json``:
    the generic files written beside them would never be read), is refused whatever ``overwrite``."""
    held = []
    for folder in map(Path, folders):
        if not folder.exists() and not folder.is_symlink():
            continue
        if not folder.is_dir():
            raise DataError(f"{folder} exists and is not a folder: a domain cannot be written there")
        amazon = [name for name in AMAZON_MARKERS if (folder / name).exists()]
        if amazon:
            raise DataError(f"{folder} holds an Amazon-format domain ({', '.join(amazon)}): a generic-format domain "
                            "written there would not be read; choose another --out")
        present = [name for name in (ITEMS_FILE, INTERACTIONS_FILE) if (folder / name).exists()]
        if present:
            held.append(f"{folder} ({', '.join(present)})")
    held += [str(path) for path in map(Path, files) if path.exists()]
    if held and not overwrite:
        raise DataError(f"already written: {'; '.join(held)}; pass --overwrite to replace them, or choose another "
                        "--out")
    for entry in held:
        logger.warning("--overwrite: replacing %s", entry)


def save_generic_domain(domain: Domain, folder: str | Path) -> Path:
    """Write ``domain`` (train + val + test, timestamps = positions) in the generic format; returns the folder.

    The format's loader splits each user's sequence leave-one-out, so a user without a val or test target (Pantry
    has two) cannot be written as it is — their last training items would come back as targets: such users are left
    out, with a warning. Each file is written whole or not at all (a temporary file renamed into place).
    """
    from fedmerge.storage import write_bytes_atomic

    named_id = [item for item, fields in zip(domain.catalog.ids, domain.catalog.fields) if "id" in fields]
    if named_id:
        raise DataError(f"{len(named_id)} items of {domain.name!r} have a text field named 'id', e.g. {named_id[:3]}: "
                        f"the generic format's {ITEMS_FILE} holds the item id under that key; rename the field")
    folder = Path(folder)
    user_ids = domain.user_ids or tuple(f"u{u}" for u in range(domain.n_users))
    untargeted = [u for u in range(domain.n_users) if domain.val_target[u] < 0 or domain.test_target[u] < 0]
    if untargeted:
        logger.warning("%s: %d users without a val/test target left out of %s (e.g. %s): reloaded, their last "
                       "training items would become targets", domain.name, len(untargeted), folder,
                       [user_ids[u] for u in untargeted[:3]])
    items = "".join(json.dumps({"id": item_id, **fields}, ensure_ascii=False) + "\n"
                    for item_id, fields in zip(domain.catalog.ids, domain.catalog.fields))
    interactions = io.StringIO(newline="")
    writer = csv.writer(interactions)
    writer.writerow(REQUIRED_COLUMNS)
    skip = set(untargeted)
    for u, (user, train, val, test) in enumerate(zip(user_ids, domain.train, domain.val_target, domain.test_target)):
        if u not in skip:
            sequence = [*train.tolist(), int(val), int(test)]
            writer.writerows((user, domain.catalog.ids[i], t) for t, i in enumerate(sequence))
    write_bytes_atomic(folder / ITEMS_FILE, items.encode("utf-8"))
    write_bytes_atomic(folder / INTERACTIONS_FILE, interactions.getvalue().encode("utf-8"))
    return folder
