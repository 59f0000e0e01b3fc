"""Full-ranking Recall@K and NDCG@K for leave-one-out targets: the one place metrics are computed.

Each evaluated user has one target item ``t`` ranked against all items of the domain.

* rank(t) = #{i : s_i > s_t} + #{i < t : s_i = s_t}  (0-based). Ties are broken deterministically in favour of
  the lower item index, so a constant scorer ranks items in index order.
* Recall@K = 1[rank < K] (one relevant item, so Recall@K = HitRate@K).
* NDCG@K = 1[rank < K] / log2(rank + 2).

Two variants are reported:

* unmasked (MergeRec's protocol, keys ``recall@K`` / ``ndcg@K``): items already in the input sequence stay in
  the ranking;
* masked (keys ``recall@K_masked`` / ``ndcg@K_masked``): items of the input sequence other than the target are
  removed from the ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedmerge.data.domain import Domain, Split

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
Scorer = Callable[[list[np.ndarray]], np.ndarray]
"""Maps a batch of input sequences to a (batch, n_items) score matrix over the domain's items."""


def target_ranks(scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """0-based rank of each target among all items (ties: lower index first); histories are masked if given."""
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
    lower_index = np.arange(n_items)[None, :] < targets[:, None]
    tied_before = ((scores == target_scores) & lower_index & ranked).sum(axis=1)
    return higher + tied_before


MASKED_SUFFIX = "_masked"
USERS = "users"  # evaluate_scorer's count of evaluated users


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, suffix: str = "") -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users from 0-based target ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}{suffix}"] = float(hit.mean())
        out[f"ndcg@{k}{suffix}"] = float((hit / np.log2(ranks + 2.0)).mean())
    return out


def evaluate_scorer(
    scorer: Scorer,
    domain: Domain,
    split: Split = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_len: int = 50,
    batch_size: int = 512,
) -> dict[str, float]:
    """Recall@K and NDCG@K, unmasked and masked, of ``scorer`` on ``domain``'s ``split`` users.

    The input sequence is truncated to its last ``max_len`` items before scoring (MergeRec keeps 50); masking
    uses the full input sequence. Also returns ``users``, the number of evaluated users.
    """
    if max_len < 1 or batch_size < 1:
        raise ValueError(f"max_len ({max_len}) and batch_size ({batch_size}) must be positive")
    seqs_full, targets, _ = domain.inputs(split)
    if len(targets) == 0:
        raise ValueError(f"no users to evaluate in domain {domain.name!r}, split {split!r}")
    ranks_unmasked, ranks_masked = [], []
    for start in range(0, len(targets), batch_size):
        batch = seqs_full[start : start + batch_size]
        scores = np.asarray(scorer([s[-max_len:] for s in batch]))
        if scores.shape != (len(batch), domain.n_items):
            raise ValueError(f"scorer returned shape {scores.shape}, expected ({len(batch)}, {domain.n_items})")
        batch_targets = targets[start : start + batch_size]
        ranks_unmasked.append(target_ranks(scores, batch_targets))
        ranks_masked.append(target_ranks(scores, batch_targets, histories=batch))
    result = metrics_from_ranks(np.concatenate(ranks_unmasked), ks)
    result.update(metrics_from_ranks(np.concatenate(ranks_masked), ks, suffix=MASKED_SUFFIX))
    result[USERS] = len(targets)
    return result


def evaluation_metric_names(ks: Sequence[int] = DEFAULT_KS) -> set[str]:
    """The names :func:`evaluate_scorer` reports for cutoffs ``ks`` (what a server expects from an evaluation)."""
    names = set(metrics_from_ranks(np.zeros(1), ks)) | set(metrics_from_ranks(np.zeros(1), ks, suffix=MASKED_SUFFIX))
    return names | {USERS}
