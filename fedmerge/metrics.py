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
from dataclasses import dataclass

import numpy as np

from fedmerge.data.domain import Domain, Split

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
Scorer = Callable[[list[np.ndarray]], np.ndarray]
"""Maps a batch of input sequences to a (batch, n_items) score matrix over the domain's items."""


def history_pairs(
    histories: Sequence[np.ndarray], targets: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, items) of the distinct (row, history item) pairs whose item is not the row's target: the entries that
    masking removes from the ranking. Computed once per batch of users, shared by every evaluated model."""
    if len(histories) != len(targets):
        raise ValueError(f"{len(histories)} histories for {len(targets)} targets")
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
    items = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(histories) else rows
    bad = np.flatnonzero((items < 0) | (items >= n_items))
    if bad.size:
        raise ValueError(f"history of row {rows[bad[0]]} holds an item index out of range 0..{n_items - 1}")
    keep = items != targets[rows]
    codes = np.unique(rows[keep] * n_items + items[keep])
    return codes // n_items, codes % n_items


def target_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """0-based rank of each target among all items (ties: lower index first); histories are masked if given."""
    pairs = None if histories is None else history_pairs(histories, targets, np.shape(scores)[-1])
    unmasked, masked = ranks_with_mask(scores, targets, pairs)
    return unmasked if masked is None else masked


def ranks_with_mask(
    scores: np.ndarray, targets: np.ndarray, pairs: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(unmasked ranks, masked ranks or None) of the targets, from one pass over the scores.

    Unmasked: rank = #{i : s_i > s_t} + #{i < t : s_i = s_t}. Masked: minus those of the removed history items
    (:func:`history_pairs`) that count in that sum, so masking costs O(history) per row, not another pass over the
    catalog.
    """
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores shape {scores.shape} does not match {targets.shape[0]} targets")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_items = scores.shape[1]
    if targets.size and (targets.min() < 0 or targets.max() >= n_items):
        raise ValueError(f"target index out of range 0..{n_items - 1}")
    target_scores = scores[np.arange(len(targets)), targets]
    column = target_scores[:, None]
    ranks = np.count_nonzero(scores > column, axis=1)
    tied = np.flatnonzero(np.count_nonzero(scores >= column, axis=1) - ranks > 1)  # rows with ties besides t
    if tied.size:
        lower_index = np.arange(n_items)[None, :] < targets[tied, None]
        ranks[tied] += np.count_nonzero((scores[tied] == column[tied]) & lower_index, axis=1)
    if pairs is None:
        return ranks, None
    pair_rows, pair_items = pairs
    pair_scores, pair_targets = scores[pair_rows, pair_items], target_scores[pair_rows]
    ahead = (pair_scores > pair_targets) | ((pair_scores == pair_targets) & (pair_items < targets[pair_rows]))
    return ranks, ranks - np.bincount(pair_rows[ahead], minlength=len(targets))


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


@dataclass(frozen=True)
class EvalBatch:
    """One batch of evaluation users, prepared once and shared by every model: truncated inputs, targets and the
    history pairs that masking removes."""

    inputs: list[np.ndarray]
    targets: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray]


def evaluation_batches(
    domain: Domain, split: Split = "test", max_len: int = 50, batch_size: int = 512
) -> list[EvalBatch]:
    """``domain``'s ``split`` users in batches of ``batch_size``: inputs truncated to their last ``max_len`` items
    (MergeRec keeps 50), masks from the full input sequences."""
    if max_len < 1 or batch_size < 1:
        raise ValueError(f"max_len ({max_len}) and batch_size ({batch_size}) must be positive")
    seqs_full, targets, _ = domain.inputs(split)
    if len(targets) == 0:
        raise ValueError(f"no users to evaluate in domain {domain.name!r}, split {split!r}")
    batches = []
    for start in range(0, len(targets), batch_size):
        batch, batch_targets = seqs_full[start : start + batch_size], targets[start : start + batch_size]
        batches.append(EvalBatch([s[-max_len:] for s in batch], batch_targets,
                                 history_pairs(batch, batch_targets, domain.n_items)))
    return batches


def evaluate_batches(
    scorer: Scorer, batches: Sequence[EvalBatch], n_items: int, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@K and NDCG@K, unmasked and masked, of ``scorer`` on prepared :func:`evaluation_batches` of a domain
    with ``n_items`` items; also ``users``. Memory: one batch's (batch, n_items) scores at a time."""
    ranks_unmasked, ranks_masked = [], []
    for batch in batches:
        scores = np.asarray(scorer(batch.inputs))
        if scores.shape != (len(batch.targets), n_items):
            raise ValueError(f"scorer returned shape {scores.shape}, expected ({len(batch.targets)}, {n_items})")
        unmasked, masked = ranks_with_mask(scores, batch.targets, batch.pairs)
        ranks_unmasked.append(unmasked)
        ranks_masked.append(masked)
    result = metrics_from_ranks(np.concatenate(ranks_unmasked), ks)
    result.update(metrics_from_ranks(np.concatenate(ranks_masked), ks, suffix="_masked"))
    result["users"] = sum(len(b.targets) for b in batches)
    return result


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
    uses the full input sequence. Also returns ``users``, the number of evaluated users. Several models of one
    domain: prepare :func:`evaluation_batches` once and call :func:`evaluate_batches` per model.
    """
    return evaluate_batches(scorer, evaluation_batches(domain, split, max_len, batch_size), domain.n_items, ks)
