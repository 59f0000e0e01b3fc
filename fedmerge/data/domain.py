"""The one domain abstraction: an item catalog plus chronological user sequences with a leave-one-out split.

For every user ``u`` the domain stores the training sequence ``train[u]`` (chronological item indices), the
validation target ``val_target[u]`` (the next item) and the test target ``test_target[u]`` (the item after it).
A missing target is ``-1``. Model selection uses ``inputs("val")`` (input = train); reporting uses
``inputs("test")`` (input = train + val target), as in MergeRec's protocol.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedmerge.errors import DataError

if TYPE_CHECKING:
    import scipy.sparse

Split = Literal["val", "test"]
SPLITS: tuple[str, ...] = typing.get_args(Split)  # what a split may be named (evaluation's target item)


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half of an emoji cut off: JSON's "\\ud83d" reads as one


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (for field names and values alike)."""
    return LONE_SURROGATE.sub("\ufffd", text)


def field_text(value: object) -> str:
    """The text of one catalog field value as JSON holds it: strings stripped, numbers and booleans as JSON writes
    them (every digit), (nested) lists joined with ", "; None, NaN, ±inf and empty values give "". TypeError for a
    JSON object. Nested lists are walked without recursion (any depth). A lone surrogate (``"\\ud83d"``, an emoji
    cut in half: no character, and no text encoder can take it) becomes U+FFFD, the replacement character."""
    if isinstance(value, list):
        parts: list[str] = []
        stack = [iter(value)]
        while stack:
            for inner in stack[-1]:
                if isinstance(inner, list):
                    stack.append(iter(inner))
                    break
                text = field_text(inner)
                if text:
                    parts.append(text)
            else:
                stack.pop()
        return ", ".join(parts)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, dict):
        raise TypeError("a JSON object")
    return valid_text(str(value)).strip()


def item_text(fields: Mapping[str, str]) -> str:
    """Render an item's text fields as one string: the title first, then every other field as ``"Key: value"`` in
    the record's order (``{"title": "T", "brand": "B", "category": "C"}`` → ``"T Brand: B Category: C"``).

    Empty fields are left out.
    """
    parts = [str(fields.get("title", "")).strip()]
    for key, value in fields.items():
        if key == "title":
            continue
        value = str(value).strip()
        if value:
            parts.append(f"{key.capitalize()}: {value}")
    return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class ItemCatalog:
    """The public side of a domain: item index -> external id and text fields."""

    ids: tuple[str, ...]
    fields: tuple[Mapping[str, str], ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.fields):
            raise DataError(f"catalog has {len(self.ids)} ids but {len(self.fields)} text records")
        if len(set(self.ids)) != len(self.ids):  # the loaders refuse them; one built in Python mapped an id to its last
            seen: set[str] = set()
            twice = [i for i in self.ids if i in seen or seen.add(i)]
            raise DataError(f"catalog lists {len(twice)} item id(s) more than once, e.g. {sorted(set(twice))[:3]}")
        texts = [item_text(f) for f in self.fields]
        empty = [self.ids[i] for i, text in enumerate(texts) if not text]
        if empty:
            raise DataError(f"{len(empty)} catalog items have no text, e.g. {empty[:3]}")
        broken = [self.ids[i] for i, text in enumerate(texts) if LONE_SURROGATE.search(text)]
        if broken:  # the loaders replace them (field_text); a catalog built in Python failed in the encoder
            raise DataError(f"{len(broken)} catalog items have a lone surrogate in their text (not a character; "
                            f"fedmerge.data.domain.field_text replaces it), e.g. {broken[:3]}")

    def __len__(self) -> int:
        return len(self.ids)

    def texts(self) -> list[str]:
        """One text string per item index (see :func:`item_text`)."""
        return [item_text(f) for f in self.fields]


@dataclass(frozen=True)
class Domain:
    """One domain's private interactions and public catalog, split leave-one-out."""

    name: str
    catalog: ItemCatalog
    train: tuple[np.ndarray, ...]
    val_target: np.ndarray
    test_target: np.ndarray
    user_ids: tuple[str, ...] = field(default=())
    dropped_users: int = 0  # users the loader's filters removed before the split (fewer than 3 interactions, k-core)

    def __post_init__(self) -> None:
        n_users = len(self.train)
        if n_users == 0:
            raise DataError(f"domain {self.name!r} has no users")
        if len(self.catalog) == 0:
            raise DataError(f"domain {self.name!r} has no items")
        for arr_name in ("val_target", "test_target"):
            arr = getattr(self, arr_name)
            if arr.shape != (n_users,):
                raise DataError(f"domain {self.name!r}: {arr_name} has shape {arr.shape}, expected ({n_users},)")
        if self.user_ids and len(self.user_ids) != n_users:
            raise DataError(f"domain {self.name!r}: {len(self.user_ids)} user ids for {n_users} users")
        n_items = len(self.catalog)
        lo, hi = self._index_range()
        if lo < 0 or hi >= n_items:
            bad = lo if lo < 0 else hi
            raise DataError(f"domain {self.name!r}: item index {bad} out of range 0..{n_items - 1}")
        for arr_name in ("val_target", "test_target"):
            arr = getattr(self, arr_name)
            if arr.size and (arr.min() < -1 or arr.max() >= n_items):
                raise DataError(f"domain {self.name!r}: {arr_name} holds an item index out of range 0..{n_items - 1}")

    def _index_range(self) -> tuple[int, int]:
        nonempty = [s for s in self.train if len(s)]
        if not nonempty:
            raise DataError(f"domain {self.name!r} has no training interactions")
        return min(int(s.min()) for s in nonempty), max(int(s.max()) for s in nonempty)

    @property
    def n_users(self) -> int:
        return len(self.train)

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    @property
    def n_interactions(self) -> int:
        """Number of training interactions (the count MergeRec's README reports)."""
        return int(sum(len(s) for s in self.train))

    def inputs(self, split: Split) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Evaluation inputs for ``split``: (input sequences, targets, user indices), users without a target skipped.

        ``val``: input = train, target = val item. ``test``: input = train + val item, target = test item.
        """
        if split == "val":
            targets = self.val_target
            users = np.flatnonzero(targets >= 0)
            seqs = [self.train[u] for u in users]
        elif split == "test":
            targets = self.test_target
            users = np.flatnonzero((targets >= 0) & (self.val_target >= 0))
            seqs = [np.append(self.train[u], self.val_target[u]) for u in users]
        else:
            raise ValueError(f"unknown split {split!r}; valid: 'val', 'test'")
        return seqs, targets[users].astype(np.int64), users

    def interactions_digest(self) -> str:
        """Short sha256 of the users' interactions (training sequences, validation and test targets) and the catalog
        size: equal for two domains that hold the same data, whatever their names."""
        import hashlib

        digest = hashlib.sha256(f"{len(self.catalog)}:{self.n_users}".encode())
        digest.update(np.asarray([len(s) for s in self.train], dtype=np.int64).tobytes())
        for part in (*self.train, self.val_target, self.test_target):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def train_with_val(self) -> list[np.ndarray]:
        """Training sequences extended by the validation item, for refitting after model selection."""
        return [np.append(s, v) if v >= 0 else s for s, v in zip(self.train, self.val_target)]

    def summary(self) -> dict[str, float | int | str]:
        """Counts and training-sequence length statistics."""
        lengths = np.array([len(s) for s in self.train])
        return {
            "domain": self.name,
            "users": self.n_users,
            "dropped_users": self.dropped_users,
            "items": self.n_items,
            "train_interactions": self.n_interactions,
            "seq_len_min": int(lengths.min()),
            "seq_len_median": float(np.median(lengths)),
            "seq_len_mean": round(float(lengths.mean()), 3),
            "seq_len_max": int(lengths.max()),
            "density": round(self.n_interactions / (self.n_users * self.n_items), 6),
        }


def as_sequences(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, ...]:
    """Convert nested int sequences to a tuple of int64 arrays."""
    return tuple(np.asarray(s, dtype=np.int64) for s in seqs)


def interaction_matrix(seqs: Sequence[np.ndarray], n_items: int) -> scipy.sparse.csr_matrix:
    """Binary user x item matrix X with X[u, i] = 1 iff item i occurs in sequence u (repeats count once)."""
    import scipy.sparse as sp

    rows = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if len(seqs) else np.zeros(0, np.int64)
    x = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(seqs), n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def domain_item_offsets(domains: Sequence[Domain]) -> np.ndarray:
    """Start index of each domain's items in the joint catalog, plus the total: ``[0, n_0, n_0 + n_1, ...]``."""
    return np.concatenate([[0], np.cumsum([d.n_items for d in domains])]).astype(np.int64)


def concat_domains(domains: Sequence[Domain], name: str = "joint") -> Domain:
    """The non-private joint domain for the joint-training oracle: union catalog, users concatenated.

    Domain ``d``'s item ``i`` becomes joint item ``offsets[d] + i`` (``offsets = domain_item_offsets(domains)``);
    item and user ids are prefixed with ``"<domain name>:"`` so they stay unique; missing targets stay ``-1``.
    """
    if not domains:
        raise ValueError("concat_domains needs at least one domain")
    offsets = domain_item_offsets(domains)

    def shifted(targets: np.ndarray, offset: int) -> np.ndarray:
        return np.where(targets >= 0, targets + offset, -1)

    catalog = ItemCatalog(
        ids=tuple(f"{d.name}:{item_id}" for d in domains for item_id in d.catalog.ids),
        fields=tuple(f for d in domains for f in d.catalog.fields),
    )
    return Domain(
        name=name,
        catalog=catalog,
        train=tuple(s + off for d, off in zip(domains, offsets) for s in d.train),
        val_target=np.concatenate([shifted(d.val_target, off) for d, off in zip(domains, offsets)]),
        test_target=np.concatenate([shifted(d.test_target, off) for d, off in zip(domains, offsets)]),
        user_ids=tuple(
            f"{d.name}:{uid}" for d in domains for uid in (d.user_ids or [str(u) for u in range(d.n_users)])
        ),
    )
