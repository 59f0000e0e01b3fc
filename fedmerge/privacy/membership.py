"""A loss-threshold membership-inference probe against one client's shipped weights.

The attacker holds the weights a client shipped, the public catalog (hence the item features) and a user's
sequence, and guesses "member" when the model's next-item loss on that sequence is low (Yeom et al., CSF 2018):

    loss(s) = −log softmax(f(s_<t))[s_t]      at t = |s|−1 (``positions="last"``) or averaged over t ≥ 1 (``"all"``)

Members are the users a client trained on, non-members are held-out users of the same domain (split with
:func:`split_members` *before* training). The probe's quality is the ROC AUC of the score −loss, computed from
ranks (Mann–Whitney U / (n_m·n_n), ties counting one half); 0.5 means the weights reveal nothing to this attack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import rankdata

from fedmerge.data.domain import Domain
from fedmerge.errors import DataError
from fedmerge.models.base import ModelFamily, StateDict

logger = logging.getLogger(__name__)

Positions = Literal["last", "all"]


def subset_users(domain: Domain, users: Sequence[int] | np.ndarray, name: str) -> Domain:
    """A domain holding only ``users`` (indices into ``domain``), same catalog."""
    users = np.asarray(users, dtype=np.int64)
    return Domain(
        name=name,
        catalog=domain.catalog,
        train=tuple(domain.train[u] for u in users),
        val_target=domain.val_target[users],
        test_target=domain.test_target[users],
        user_ids=tuple(domain.user_ids[u] for u in users) if domain.user_ids else (),
    )


def union_users(parts: Sequence[Domain], name: str) -> Domain:
    """One domain holding the users of every part, in order; the parts must share one catalog."""
    if not parts:
        raise DataError("a union of users needs at least one domain")
    catalog = parts[0].catalog
    if any(part.catalog is not catalog and part.catalog != catalog for part in parts[1:]):
        raise DataError(f"domains {[part.name for part in parts]} have different catalogs: their users cannot be joined")
    with_ids = all(part.user_ids for part in parts)
    return Domain(
        name=name,
        catalog=catalog,
        train=tuple(seq for part in parts for seq in part.train),
        val_target=np.concatenate([part.val_target for part in parts]),
        test_target=np.concatenate([part.test_target for part in parts]),
        user_ids=tuple(uid for part in parts for uid in part.user_ids) if with_ids else (),
    )


def split_members(domain: Domain, member_fraction: float = 0.5, seed: int = 0) -> tuple[Domain, Domain]:
    """(members, non-members): a seeded random user split; the client trains on members only.

    The member domain keeps ``domain.name`` (it is the client's data); the non-members are named ``<name>-heldout``.
    """
    if not 0 < member_fraction < 1:
        raise ValueError(f"member_fraction must lie in (0, 1), got {member_fraction}")
    return split_users(domain, int(round(member_fraction * domain.n_users)), seed)


def split_users(domain: Domain, n_first: int, seed: int = 0) -> tuple[Domain, Domain]:
    """(``n_first`` seeded random users, the others): the first keeps ``domain.name``, the others are named
    ``<name>-heldout``; each keeps the users in ``domain``'s order."""
    if not 0 < n_first < domain.n_users:
        raise DataError(f"domain {domain.name!r} has too few users ({domain.n_users}) to split off {n_first}")
    order = np.random.default_rng(seed).permutation(domain.n_users)
    first, others = np.sort(order[:n_first]), np.sort(order[n_first:])
    return subset_users(domain, first, domain.name), subset_users(domain, others, f"{domain.name}-heldout")


def prediction_pairs(seqs: Sequence[np.ndarray], positions: Positions) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(prefixes, next items, owning sequence index) for every scored position."""
    if positions not in ("last", "all"):
        raise ValueError(f"unknown positions {positions!r}; valid: 'last', 'all'")
    prefixes, targets, owners = [], [], []
    for row, seq in enumerate(seqs):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < 2:
            raise ValueError(f"sequence {row} has {len(seq)} item(s); the probe needs at least 2 (prefix + target)")
        steps = range(1, len(seq)) if positions == "all" else (len(seq) - 1,)
        for t in steps:
            prefixes.append(seq[:t])
            targets.append(int(seq[t]))
            owners.append(row)
    return prefixes, np.asarray(targets, dtype=np.int64), np.asarray(owners, dtype=np.int64)


def position_losses(
    family: ModelFamily,
    weights: StateDict,
    item_features: torch.Tensor,
    seqs: Sequence[np.ndarray],
    positions: Positions = "last",
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """(loss per scored position −log softmax(scores)[target], index of the sequence it belongs to)."""
    prefixes, targets, owners = prediction_pairs(seqs, positions)
    n_items = item_features.shape[0]
    if targets.size and targets.max() >= n_items:
        raise ValueError(f"sequence item index {int(targets.max())} out of range 0..{n_items - 1}")
    score = family.scorer(weights, item_features, batch_size=batch_size)
    losses = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), batch_size):
        scores = np.asarray(score(prefixes[start : start + batch_size]), dtype=np.float64)
        batch_targets = targets[start : start + batch_size]
        losses[start : start + batch_size] = logsumexp(scores, axis=1) - scores[np.arange(len(batch_targets)), batch_targets]
    return losses, owners


def per_sequence_mean(values: np.ndarray, owners: np.ndarray, n_seqs: int) -> np.ndarray:
    """Mean of the per-position ``values`` of each sequence (``owners`` from :func:`position_losses`)."""
    return np.bincount(owners, weights=values, minlength=n_seqs) / np.bincount(owners, minlength=n_seqs)


def sequence_losses(
    family: ModelFamily,
    weights: StateDict,
    item_features: torch.Tensor,
    seqs: Sequence[np.ndarray],
    positions: Positions = "last",
    batch_size: int = 512,
) -> np.ndarray:
    """Per-sequence next-item cross-entropy −log softmax(scores)[target] (mean over positions for ``"all"``)."""
    losses, owners = position_losses(family, weights, item_features, seqs, positions, batch_size)
    return per_sequence_mean(losses, owners, len(seqs))


def rank_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(score_member > score_nonmember) + ½·P(tie) = (R_m − n_m(n_m+1)/2)/(n_m·n_n), R_m the members' rank sum."""
    member_scores, nonmember_scores = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    n_m, n_n = len(member_scores), len(nonmember_scores)
    if n_m == 0 or n_n == 0:
        raise ValueError(f"AUC needs both groups non-empty, got {n_m} members and {n_n} non-members")
    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))
    return float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0) / (n_m * n_n))


def membership_auc(
    family: ModelFamily,
    weights: StateDict,
    item_features: torch.Tensor,
    member_seqs: Sequence[np.ndarray],
    nonmember_seqs: Sequence[np.ndarray],
    positions: Positions = "last",
) -> float:
    """ROC AUC of the loss-threshold attack (score = −loss) separating members from non-members.

    Sequences shorter than 2 items carry no prediction and are left out (logged).
    """
    groups = {"member": list(member_seqs), "non-member": list(nonmember_seqs)}
    for group, seqs in groups.items():
        kept = [s for s in seqs if len(s) >= 2]
        if len(kept) < len(seqs):
            logger.info("membership probe: left out %d %s sequence(s) shorter than 2 items", len(seqs) - len(kept), group)
        groups[group] = kept
    member_losses = sequence_losses(family, weights, item_features, groups["member"], positions)
    nonmember_losses = sequence_losses(family, weights, item_features, groups["non-member"], positions)
    return rank_auc(-member_losses, -nonmember_losses)
