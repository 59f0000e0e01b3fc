"""θ₀ pretrained on the public catalogs only (``[theta0] pretrain = true``): no interaction of any domain is read.

Pseudo-sequences come from catalog structure: in each training domain's public catalog, the items that share a
non-empty value of the field ``group_by`` (``"brand"`` by default) form a group; every item i of a group of at least 3
items starts ``per_item`` pseudo-sequences [i, j_1, …, j_{k-1}] of k = min(``length``, group size) distinct items, the
j drawn uniformly without replacement from the rest of its group (seeded). The family's own local training then runs
once on the union of these pseudo-users (each one's last item is its validation target), from the seeded θ₀, with
the scenario's ``model.params`` (epochs, early stopping): every client starts from a backbone that already ranks
same-group items together and fine-tunes it.

A held-out domain's catalog is not used (it is known only at test time). The pretraining is deterministic given the
run seed, so every party can rebuild the same θ₀ — unless ``model.params.max_seconds`` cuts it (the shipped Amazon
scenarios set 1200 s as a safety net): a cut depends on the machine, and the run records it in its warnings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences
from fedmerge.errors import FedmergeError
from fedmerge.models import ModelFamily, StateDict
from fedmerge.models.base import reported_training
from fedmerge.scenario import Theta0Settings

MIN_GROUP = 3  # a pseudo-user needs two items to train on and one validation target


def pseudo_sequences(
    catalog: ItemCatalog, group_by: str, length: int, per_item: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Item-index pseudo-sequences of one catalog (see the module docstring), groups and items in catalog order."""
    groups: dict[str, list[int]] = {}
    for i, fields in enumerate(catalog.fields):
        value = str(fields.get(group_by, "")).strip().lower()
        if value:
            groups.setdefault(value, []).append(i)
    out = []
    for members in groups.values():
        if len(members) < MIN_GROUP:
            continue
        k = min(length, len(members))
        for i in members:
            others = np.array([j for j in members if j != i])
            for _ in range(per_item):
                out.append(np.concatenate([[i], rng.choice(others, size=k - 1, replace=False)]))
    return out


def pseudo_domain(
    catalogs: Mapping[str, ItemCatalog], group_by: str, length: int, per_item: int, seed: int
) -> Domain:
    """One domain over the stacked catalogs (in the given order) whose users are every catalog's pseudo-sequences,
    item indices offset into the stack; FedmergeError when no catalog has a group of ``MIN_GROUP`` items."""
    rng = np.random.default_rng(seed)
    seqs, offset = [], 0
    for catalog in catalogs.values():
        seqs += [s + offset for s in pseudo_sequences(catalog, group_by, length, per_item, rng)]
        offset += len(catalog)
    if not seqs:
        raise FedmergeError(f"theta0.pretrain: no catalog of {sorted(catalogs)} has {MIN_GROUP} or more items sharing "
                            f"a {group_by!r} value; set theta0.group_by to a field the catalogs fill")
    union = ItemCatalog(ids=tuple(f"{d}/{i}" for d, c in catalogs.items() for i in c.ids),
                        fields=tuple(f for c in catalogs.values() for f in c.fields))
    targets = np.array([s[-1] for s in seqs])
    return Domain("public-catalogs", union, as_sequences([s[:-1] for s in seqs]), targets, targets)


def pretrained_theta0(
    family: ModelFamily, theta0: StateDict, catalogs: Mapping[str, ItemCatalog], features: Sequence[torch.Tensor],
    settings: Theta0Settings, seed: int,
) -> tuple[StateDict, dict[str, Any]]:
    """(θ₀ after ``family.train`` on the catalogs' pseudo-users, the training info); ``features`` are the catalogs'
    item features in the same order, ``settings`` the ``[theta0]`` table. The family's ``behaviour_parameters``
    (how users re-buy and how far back they look) keep θ₀'s values: the pseudo-users' behaviour is made up."""
    domain = pseudo_domain(catalogs, settings.group_by, settings.length, settings.per_item, seed)
    weights, info = family.train(theta0, domain, torch.cat(list(features)), seed=seed, progress=False)
    weights.update({n: theta0[n].clone() for n in family.behaviour_parameters if n in theta0})
    return weights, {"pseudo_users": domain.n_users, **reported_training(info)}
