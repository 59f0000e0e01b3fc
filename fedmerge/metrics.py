"""Full-ranking Recall@K and NDCG@K for leave-one-out targets: the one place metrics are computed.

Each evaluated user has one target item ``t`` with score s_t, ranked against all items of the domain. Let
g = #{i : s_i > s_t} and m = #{i ≠ t : s_i = s_t} (ranked items only). Ties among the m + 1 items scoring s_t are
resolved by one of two rules (``ties`` of :func:`evaluate_scorer`):

* ``"expected"`` (default): the expected metric under a uniformly random order of the tied items. The 1-based
  rank r is then uniform on {g+1, …, g+m+1}, so, exactly and deterministically,
  Recall@K = P(r ≤ K) = clip(K - g, 0, m+1) / (m+1) and
  NDCG@K = E[1[r ≤ K] / log2(r + 1)] = (H(min(g+m+1, K)) - H(min(g, K))) / (m+1), with H(j) = Σ_{r≤j} 1/log2(r+1).
  The result does not depend on item ids: a scorer that ties many items (popularity, exact-zero LAE scores of
  cold items) gets what a random order of them would give on average.
* ``"lower_index"``: ties broken towards the lower item index, rank(t) = g + #{i < t : s_i = s_t} (0-based),
  Recall@K = 1[rank < K], NDCG@K = 1[rank < K] / log2(rank + 2). Deterministic but optimistic or pessimistic
  depending on arbitrary ids; the rule used before the expected one became the default.

With no ties both rules agree. Recall@K equals HitRate@K (one relevant item).

Two variants are reported:

* unmasked (MergeRec's protocol, keys ``recall@K`` / ``ndcg@K``): items already in the input sequence stay in
  the ranking;
* masked (keys ``recall@K_masked`` / ``ndcg@K_masked``): items of the input sequence other than the target are
  removed from the ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from fedmerge.data.domain import Domain, Split

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
Scorer = Callable[[list[np.ndarray]], np.ndarray]
"""Maps a batch of input sequences to a (batch, n_items) score matrix over the domain's items."""


TIE_RULES: tuple[str, ...] = ("expected", "lower_index")
TieRule = Literal["expected", "lower_index"]


def rank_counts(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (#ranked items scoring above the target, #other ranked items tied with it, #of those with a lower
    index). Histories (items other than the target) are removed from the ranking if given."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores shape {scores.shape} does not match {targets.shape[0]} targets")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_items = scores.shape[1]
    if targets.size and (targets.min() < 0 or targets.max() >= n_items):
        raise ValueError(f"target index out of range 0..{n_items - 1}")
    rows = np.arange(len(targets))
    ranked = np.ones(scores.shape, dtype=bool)  # False: removed from the ranking (masked history item)
    if histories is not None:
        if len(histories) != len(targets):
            raise ValueError(f"{len(histories)} histories for {len(targets)} targets")
        for r, hist in enumerate(histories):
            hist = np.asarray(hist, dtype=np.int64)
            if hist.size and (hist.min() < 0 or hist.max() >= n_items):
                raise ValueError(f"history of row {r} holds an item index out of range 0..{n_items - 1}")
            ranked[r, hist[hist != targets[r]]] = False
    target_scores = scores[rows, targets][:, None]
    higher = ((scores > target_scores) & ranked).sum(axis=1)
    tied = (scores == target_scores) & ranked
    tied[rows, targets] = False
    lower_index = np.arange(n_items)[None, :] < targets[:, None]
    return higher, tied.sum(axis=1), (tied & lower_index).sum(axis=1)


def target_ranks(scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """0-based rank of each target among all items (ties: lower index first); histories are masked if given."""
    higher, _, tied_lower = rank_counts(scores, targets, histories)
    return higher + tied_lower


def metrics_from_ties(
    higher: np.ndarray, tied: np.ndarray, ks: Sequence[int] = DEFAULT_KS, suffix: str = ""
) -> dict[str, float]:
    """Mean over users of the exact expected Recall@K and NDCG@K when the target and its ``tied`` equals take a
    uniformly random order behind ``higher`` items (see the module docstring); ``tied`` = 0 gives the plain rank."""
    higher = np.asarray(higher, dtype=np.int64)
    tied = np.asarray(tied, dtype=np.int64)
    if higher.size == 0:
        raise ValueError("no users to evaluate")
    if higher.shape != tied.shape:
        raise ValueError(f"higher {higher.shape} and tied {tied.shape} counts differ in shape")
    top = max(ks)
    gains = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, top + 1) + 1.0))])  # H(0..top)
    out: dict[str, float] = {}
    for k in ks:
        first, last = np.minimum(higher, k), np.minimum(higher + tied + 1, k)  # ranks g+1..g+m+1 within 1..K
        out[f"recall@{k}{suffix}"] = float(((last - first) / (tied + 1)).mean())
        out[f"ndcg@{k}{suffix}"] = float(((gains[last] - gains[first]) / (tied + 1)).mean())
    return out


MASKED_SUFFIX = "_masked"
USERS = "users"  # evaluate_scorer's count of evaluated users


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, suffix: str = "") -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users from 0-based target ranks."""
    ranks = np.asarray(ranks)
    return metrics_from_ties(ranks, np.zeros_like(ranks), ks, suffix)


def tie_metrics(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray] | None, ties: TieRule
) -> tuple[np.ndarray, np.ndarray]:
    """(items ahead, tied items) per row under rule ``ties``: the inputs of :func:`metrics_from_ties`."""
    higher, tied, tied_lower = rank_counts(scores, targets, histories)
    if ties == "expected":
        return higher, tied
    return higher + tied_lower, np.zeros_like(tied)


def evaluate_scorer(
    scorer: Scorer,
    domain: Domain,
    split: Split = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_len: int = 50,
    batch_size: int = 512,
    ties: TieRule = "expected",
) -> dict[str, float]:
    """Recall@K and NDCG@K, unmasked and masked, of ``scorer`` on ``domain``'s ``split`` users.

    The input sequence is truncated to its last ``max_len`` items before scoring (MergeRec keeps 50); masking
    uses the full input sequence. ``ties``: ``"expected"`` (exact expectation over random orders of tied items)
    or ``"lower_index"`` (see the module docstring). Also returns ``users``, the number of evaluated users.
    """
    if max_len < 1 or batch_size < 1:
        raise ValueError(f"max_len ({max_len}) and batch_size ({batch_size}) must be positive")
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; valid: {list(TIE_RULES)}")
    seqs_full, targets, _ = domain.inputs(split)
    if len(targets) == 0:
        raise ValueError(f"no users to evaluate in domain {domain.name!r}, split {split!r}")
    unmasked: list[tuple[np.ndarray, np.ndarray]] = []
    masked: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(targets), batch_size):
        batch = seqs_full[start : start + batch_size]
        scores = np.asarray(scorer([s[-max_len:] for s in batch]))
        if scores.shape != (len(batch), domain.n_items):
            raise ValueError(f"scorer returned shape {scores.shape}, expected ({len(batch)}, {domain.n_items})")
        batch_targets = targets[start : start + batch_size]
        unmasked.append(tie_metrics(scores, batch_targets, None, ties))
        masked.append(tie_metrics(scores, batch_targets, batch, ties))
    result = metrics_from_ties(*(np.concatenate(parts) for parts in zip(*unmasked)), ks)
    result.update(metrics_from_ties(*(np.concatenate(parts) for parts in zip(*masked)), ks, suffix=MASKED_SUFFIX))
    result[USERS] = len(targets)
    return result


def evaluation_metric_names(ks: Sequence[int] = DEFAULT_KS) -> set[str]:
    """The names :func:`evaluate_scorer` reports for cutoffs ``ks`` (what a server expects from an evaluation)."""
    names = set(metrics_from_ranks(np.zeros(1), ks)) | set(metrics_from_ranks(np.zeros(1), ks, suffix=MASKED_SUFFIX))
    return names | {USERS}
