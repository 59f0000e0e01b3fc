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
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedmerge.data.domain import Domain, Split

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)
Scorer = Callable[[list[np.ndarray]], np.ndarray]
"""Maps a batch of input sequences to a (batch, n_items) score matrix over the domain's items."""


TIE_RULES: tuple[str, ...] = ("expected", "lower_index")
TieRule = Literal["expected", "lower_index"]
MASKED_SUFFIX = "_masked"
USERS = "users"  # evaluate_scorer's count of evaluated users
Counts = tuple[np.ndarray, np.ndarray, np.ndarray]
"""Per row: (#ranked items scoring above the target g, #other ranked items tied with it m, #of those m with a lower
item index)."""


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
    keep = items != np.asarray(targets, dtype=np.int64)[rows]
    codes = np.unique(rows[keep] * n_items + items[keep])
    return codes // n_items, codes % n_items


def counts_with_mask(
    scores: np.ndarray, targets: np.ndarray, pairs: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[Counts, Counts | None]:
    """(unmasked :data:`Counts`, masked Counts or None) of the targets, from one pass over the scores.

    Unmasked: g = #{i : s_i > s_t}, m = #{i ≠ t : s_i = s_t}. Masked: minus the removed history items
    (:func:`history_pairs`) that count in them, so masking costs O(history) per row, not another pass over the
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
    higher = np.count_nonzero(scores > column, axis=1)
    tied = np.count_nonzero(scores >= column, axis=1) - higher - 1
    tied_lower = np.zeros_like(tied)
    rows_tied = np.flatnonzero(tied > 0)
    if rows_tied.size:
        lower_index = np.arange(n_items)[None, :] < targets[rows_tied, None]
        tied_lower[rows_tied] = np.count_nonzero((scores[rows_tied] == column[rows_tied]) & lower_index, axis=1)
    if pairs is None:
        return (higher, tied, tied_lower), None
    pair_rows, pair_items = pairs
    pair_scores, pair_targets = scores[pair_rows, pair_items], target_scores[pair_rows]
    above, level = pair_scores > pair_targets, pair_scores == pair_targets
    level_lower = level & (pair_items < targets[pair_rows])
    size = len(targets)
    masked = (higher - np.bincount(pair_rows[above], minlength=size),
              tied - np.bincount(pair_rows[level], minlength=size),
              tied_lower - np.bincount(pair_rows[level_lower], minlength=size))
    return (higher, tied, tied_lower), masked


def rank_counts(scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray] | None = None) -> Counts:
    """:data:`Counts` per row; histories (items other than the target) are removed from the ranking if given."""
    pairs = None if histories is None else history_pairs(histories, targets, np.shape(scores)[-1])
    unmasked, masked = counts_with_mask(scores, targets, pairs)
    return unmasked if masked is None else masked


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


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, suffix: str = "") -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users from 0-based target ranks."""
    ranks = np.asarray(ranks)
    return metrics_from_ties(ranks, np.zeros_like(ranks), ks, suffix)


def tie_inputs(counts: Counts, ties: TieRule) -> tuple[np.ndarray, np.ndarray]:
    """(items ahead, tied items) per row under rule ``ties``: the inputs of :func:`metrics_from_ties`."""
    higher, tied, tied_lower = counts
    if ties == "expected":
        return higher, tied
    return higher + tied_lower, np.zeros_like(tied)


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
    scorer: Scorer, batches: Sequence[EvalBatch], n_items: int, ks: Sequence[int] = DEFAULT_KS,
    ties: TieRule = "expected",
) -> dict[str, float]:
    """Recall@K and NDCG@K, unmasked and masked, of ``scorer`` on prepared :func:`evaluation_batches` of a domain
    with ``n_items`` items under tie rule ``ties``; also ``users``. Memory: one batch's (batch, n_items) scores at a
    time. ValueError when the batches hold no user (none, or only empty ones)."""
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; valid: {list(TIE_RULES)}")
    if sum(len(b.targets) for b in batches) == 0:
        raise ValueError(f"no users to evaluate: {len(batches)} batch(es), none with a user")
    unmasked: list[tuple[np.ndarray, np.ndarray]] = []
    masked: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in batches:
        scores = np.asarray(scorer(batch.inputs))
        if scores.shape != (len(batch.targets), n_items):
            raise ValueError(f"scorer returned shape {scores.shape}, expected ({len(batch.targets)}, {n_items})")
        plain, removed = counts_with_mask(scores, batch.targets, batch.pairs)
        unmasked.append(tie_inputs(plain, ties))
        masked.append(tie_inputs(removed, ties))
    result = metrics_from_ties(*(np.concatenate(parts) for parts in zip(*unmasked)), ks)
    result.update(metrics_from_ties(*(np.concatenate(parts) for parts in zip(*masked)), ks, suffix=MASKED_SUFFIX))
    result[USERS] = sum(len(b.targets) for b in batches)
    return result


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
    or ``"lower_index"`` (see the module docstring). Also returns ``users``, the number of evaluated users. Several
    models of one domain: prepare :func:`evaluation_batches` once and call :func:`evaluate_batches` per model.
    """
    return evaluate_batches(scorer, evaluation_batches(domain, split, max_len, batch_size), domain.n_items, ks, ties)


def evaluation_metric_names(ks: Sequence[int] = DEFAULT_KS) -> set[str]:
    """The names :func:`evaluate_scorer` reports for cutoffs ``ks`` (what a server expects from an evaluation)."""
    names = set(metrics_from_ranks(np.zeros(1), ks)) | set(metrics_from_ranks(np.zeros(1), ks, suffix=MASKED_SUFFIX))
    return names | {USERS}
