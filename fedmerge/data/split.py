"""Split one domain into sub-domains by a public catalog field, for federations of many clients on real data.

* Each item's **value** is its text field ``field`` (e.g. ``category``), cut to its first ``words`` words when
  ``words`` > 0 (Amazon categories are paths such as ``"Beauty Skin Care Face Cleansers"``: 2 words give
  ``"Beauty Skin"``); an item without the field has the value ``""``.
* **Groups**: one per distinct value (``groups`` = 0), or the values packed into ``groups`` groups, largest first
  (by their interactions), each into the group with the fewest interactions so far (ties: lower index) — balanced
  sub-domains from a field with many small values.
* **Items** follow their value's group: sub-domain g's catalog is every item of g, in the original order.
* **Users** follow their majority group: over the user's whole sequence (train, validation and test items), the
  group holding most of its interactions (ties: lower group index). The user's sequence is then restricted to
  that group's items (order and repeats kept) and split leave-one-out again; users left with fewer than 3 items
  are dropped (their interactions outside the majority group are dropped as well).
* A sub-domain left with fewer than ``min_users`` users (e.g. a value held by a handful of items) is dropped and
  listed as such in the manifest.

Sub-domain g is named ``<domain>-<g>``, groups ordered by the interactions on their items (most first), numbered
before dropping; :func:`split_domain`
also returns a manifest (values, items, users, interactions per sub-domain) that ``fedmerge data split`` writes
next to the folders.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import logging

import numpy as np

from fedmerge.data.domain import Domain, ItemCatalog
from fedmerge.data.generic import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    check_domain_output,
    save_generic_domain,
    split_leave_one_out,
)
from fedmerge.errors import DataError

logger = logging.getLogger(__name__)


def item_values(catalog: ItemCatalog, field: str, words: int = 0) -> list[str]:
    """Each item's value of text field ``field`` (first ``words`` words if ``words`` > 0; missing: ``""``)."""
    if words < 0:
        raise ValueError(f"words must be >= 0 (0: the whole value), got {words}")
    if not any(field in fields for fields in catalog.fields):
        present = sorted({key for fields in catalog.fields for key in fields})
        raise DataError(f"no item has the field {field!r}; fields of this catalog: {present}")
    values = [" ".join(str(fields.get(field, "")).split()) for fields in catalog.fields]
    return [" ".join(v.split()[:words]) for v in values] if words else values


def full_sequences(domain: Domain) -> list[np.ndarray]:
    """Every user's whole chronological sequence: train items, then the validation and test targets if present."""
    return [np.concatenate([train, [t for t in (int(v), int(x)) if t >= 0]]).astype(np.int64)
            for train, v, x in zip(domain.train, domain.val_target, domain.test_target)]


def pack_values(weights: Counter[str], groups: int) -> list[list[str]]:
    """Values packed into ``groups`` groups: largest weight first, each into the currently lightest group (ties:
    lower index); ``groups`` = 0 keeps one group per value. Groups come back heaviest first."""
    ordered = sorted(weights, key=lambda v: (-weights[v], v))
    if groups == 0:
        return [[v] for v in ordered]
    if groups > len(ordered):
        raise DataError(f"cannot make {groups} groups from {len(ordered)} distinct value(s) {ordered[:10]}")
    packed: list[list[str]] = [[] for _ in range(groups)]
    load = [0] * groups
    for value in ordered:
        g = min(range(groups), key=lambda k: (load[k], k))
        packed[g].append(value)
        load[g] += weights[value]
    return sorted(packed, key=lambda members: -sum(weights[v] for v in members))


def split_domain(
    domain: Domain, field: str, groups: int = 0, words: int = 0, min_users: int = 1
) -> tuple[list[Domain], list[dict[str, Any]]]:
    """(sub-domains, manifest rows) of ``domain`` split by catalog field ``field`` (see the module docstring)."""
    if groups < 0 or min_users < 1:
        raise ValueError(f"need groups >= 0 (0: one sub-domain per value) and min_users >= 1, got {groups}, "
                         f"{min_users}")
    values = item_values(domain.catalog, field, words)
    sequences = full_sequences(domain)
    counts = np.bincount(np.concatenate(sequences), minlength=domain.n_items)
    weights: Counter[str] = Counter()
    for item, value in enumerate(values):
        weights[value] += int(counts[item])
    if len(weights) < 2:
        raise DataError(f"field {field!r} of domain {domain.name!r} has {len(weights)} distinct value(s) "
                        f"{list(weights)[:3]}: nothing to split (try another field, or more --words)")
    packed = pack_values(weights, groups)
    group_of_value = {v: g for g, members in enumerate(packed) for v in members}
    item_group = np.array([group_of_value[v] for v in values], dtype=np.int64)

    members: list[list[tuple[int, np.ndarray]]] = [[] for _ in packed]  # (user, restricted sequence) per group
    assigned = np.zeros(len(packed), dtype=np.int64)  # users sent to each group, before the >= 3 filter
    for user, sequence in enumerate(sequences):
        g = int(np.bincount(item_group[sequence], minlength=len(packed)).argmax())  # ties: lower group index
        assigned[g] += 1
        kept = sequence[item_group[sequence] == g]
        if len(kept) >= 3:
            members[g].append((user, kept))

    user_ids = domain.user_ids or tuple(str(u) for u in range(domain.n_users))
    subdomains, manifest = [], []
    for g, (group_values, users) in enumerate(zip(packed, members)):
        items = np.flatnonzero(item_group == g)
        name = f"{domain.name}-{g}"
        if len(users) < min_users:
            logger.warning("dropped sub-domain %s (values %s): %d user(s) with >= 3 interactions, fewer than %d",
                           name, group_values[:3], len(users), min_users)
            manifest.append({"name": name, "values": group_values, "items": len(items), "users": len(users),
                             "dropped": True})
            continue
        local = np.full(domain.n_items, -1, dtype=np.int64)
        local[items] = np.arange(len(items))
        catalog = ItemCatalog(ids=tuple(domain.catalog.ids[i] for i in items),
                              fields=tuple(domain.catalog.fields[i] for i in items))
        sub = split_leave_one_out(name, catalog, [local[s] for _, s in users], [user_ids[u] for u, _ in users],
                                  dropped_users=int(assigned[g]) - len(users))
        subdomains.append(sub)
        manifest.append({"name": name, "values": group_values, "items": sub.n_items, "users": sub.n_users,
                         "interactions": int(sum(len(s) for _, s in users))})
    if not subdomains:
        raise DataError(f"no sub-domain of {domain.name!r} keeps {min_users} user(s); lower --min-users")
    return subdomains, manifest


def save_split(
    domain: Domain, field: str, out: Path, groups: int = 0, words: int = 0, min_users: int = 1, source: str = "",
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """:func:`split_domain`, each kept sub-domain saved as ``out/<name>/`` (generic format) and the manifest as
    ``out/<domain>-split.json`` (with the split's settings and ``source``, where the domain was read); returns the
    manifest's rows.

    Sub-domain folders already holding a domain's files, or an existing manifest, are refused (nothing is written)
    unless ``overwrite``. Then a folder ``<domain>-<k>/`` that this split does not write is a stale sub-domain of
    an earlier split: it is removed when the earlier manifest lists it as written and it holds nothing but the
    two files the split wrote there; any other such folder is left in place, with a warning naming it."""
    from fedmerge.storage import write_json_atomic

    subdomains, manifest = split_domain(domain, field, groups, words, min_users)
    manifest_path = out / f"{domain.name}-split.json"
    check_domain_output([out / sub.name for sub in subdomains], overwrite, files=[manifest_path])
    earlier = earlier_split_groups(manifest_path)  # read before the new manifest replaces it
    for sub in subdomains:
        save_generic_domain(sub, out / sub.name)
    write_json_atomic(manifest_path, {
        "source": source, "domain": domain.name, "field": field, "words": words, "groups": groups,
        "min_users": min_users, "subdomains": manifest})
    remove_stale_groups(out, domain.name, {sub.name for sub in subdomains}, earlier)
    return manifest


def earlier_split_groups(manifest_path: Path) -> set[str]:
    """The sub-domains an earlier split's manifest lists as written (not dropped); empty when there is none or it
    cannot be read."""
    if not manifest_path.is_file():
        return set()
    try:
        rows = json.loads(manifest_path.read_text(encoding="utf-8"))["subdomains"]
        return {row["name"] for row in rows if not row.get("dropped")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s cannot be read (%s): no folder of the earlier split is removed", manifest_path, exc)
        return set()


def remove_stale_groups(out: Path, name: str, kept: set[str], earlier: set[str]) -> None:
    """Remove each folder ``out/<name>-<k>/`` outside ``kept`` that the earlier split wrote (listed in ``earlier``,
    holding only regular ``items.jsonl``/``interactions.csv`` files); warn about any other such folder."""
    pattern = re.compile(re.escape(name) + r"-\d+")
    for folder in sorted(out.iterdir()):
        if folder.name in kept or not pattern.fullmatch(folder.name) or not folder.is_dir():
            continue
        entries = sorted(folder.iterdir())
        foreign = [p.name for p in entries if p.name not in (ITEMS_FILE, INTERACTIONS_FILE) or p.is_symlink()
                   or not p.is_file()]
        if folder.name in earlier and not folder.is_symlink() and not foreign:
            for entry in entries:
                entry.unlink()
            folder.rmdir()
            logger.warning("removed %s: a sub-domain of the earlier split of %r that this split does not make",
                           folder, name)
            continue
        why = ("it is a link" if folder.is_symlink()
               else f"the earlier {name}-split.json does not list it" if folder.name not in earlier
               else f"it holds files the split did not write: {foreign[:5]}")
        logger.warning("%s is not a sub-domain of this split of %r but left in place (%s): remove it if no scenario "
                       "should read it as a domain", folder, name, why)
