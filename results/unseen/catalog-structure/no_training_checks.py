"""Issue 23, levers from the public catalog's structure, checked with no training before building any of them.

    FEDMERGE_AMAZON_DIR=... python results/unseen/catalog-structure/no_training_checks.py > checks.txt

A lever of this kind would be one more behaviour weight β per domain: each client learns its β on private data,
the server ships the clients' mean to a new catalog, whose own public catalog gives the feature. Before building
it, the same question with no training: on top of the best no-training rule of ``benchmarks/text_similarity_baseline.py``
(query = last 5 items at 0.5^k, history left out unless it repeats an item; cosine of catalog-z-scored MiniLM
embeddings, what the sequential family's adapter reads), add ``β · feature`` for

- ``same brand``: 1 for an item whose brand is that of one of the user's last 5 items (``category`` likewise);
- ``brand size``: the z-scored log number of catalog items of the item's brand (a public popularity proxy);
- ``text hubness``: the z-scored mean cosine of the item to its 10 (50) nearest catalog neighbours, so a negative
  β demotes items close to many others (the hubness correction of CSLS, Conneau et al. 2018, in its simplest form);
- ``near-duplicate demotion``: scores r = s / max s per user, lowered by γ·max(0, r − 0.8) (γ in the β column).

Each domain's best β on its validation users (the smallest |β| among equal Recall@10) stands for what its client would learn; for each held-out split the
new catalog gets the mean of the two other domains' β and is scored on its test users. Ratios: test Recall@10 /
NDCG@10 with that β over β = 0, with a paired bootstrap 95 % interval over test users (2,000 resamples, seed 0).
Deterministic otherwise (no training, no seed).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from text_similarity_baseline import cosine_scorer  # noqa: E402

from fedmerge.config import load_scenario  # noqa: E402
from fedmerge.metrics import counts_with_mask, evaluation_batches, metrics_from_ties, tie_inputs  # noqa: E402
from fedmerge.models.sequential import SequentialFamily  # noqa: E402

DOMAINS = ("Beauty", "Pantry", "Toys")
BETAS = {"same brand": (0.0, 0.02, 0.05, 0.1, 0.2, 0.4), "same category": (0.0, 0.02, 0.05, 0.1, 0.2),
         "brand size": (-0.05, -0.02, 0.0, 0.02, 0.05), "text hubness": (-0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05),
         "text hubness (k = 50)": (-0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05),
         "near-duplicate demotion": (0.0, 1.0, 1.5, 2.0)}
Scorer = Callable[[list[np.ndarray]], np.ndarray]


def shares_field(seqs: list[np.ndarray], item_value: sp.csr_matrix, recent: int = 5) -> np.ndarray:
    """(users, items) bool: the item has a field value (brand, category) of one of the user's last ``recent`` items."""
    rows = np.concatenate([np.full(min(len(s), recent), r) for r, s in enumerate(seqs)])
    items = np.concatenate([np.asarray(s[-recent:]) for s in seqs]).astype(np.int64)
    user_item = sp.csr_matrix((np.ones(len(items)), (rows, items)), shape=(len(seqs), item_value.shape[0]))
    return ((user_item @ item_value) @ item_value.T).toarray() > 0


def field_matrix(values: list[str]) -> sp.csr_matrix:
    """Items × distinct non-empty values, one-hot."""
    codes = {v: k for k, v in enumerate(sorted(set(values)))}
    has = np.array([bool(v) for v in values], dtype=float)
    return sp.csr_matrix((has, (np.arange(len(values)), [codes[v] for v in values])), shape=(len(values), len(codes)))


def zscored(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def lever_scorer(lever: str, beta: float, base: Scorer, catalog: dict[str, object]) -> Scorer:
    if beta == 0.0:
        return base
    def score(seqs: list[np.ndarray]) -> np.ndarray:
        s = base(seqs)
        if lever in ("same brand", "same category"):
            return s + beta * shares_field(seqs, catalog[lever], 5)
        if lever in ("brand size", "text hubness", "text hubness (k = 50)"):
            return s + beta * catalog[lever][None, :]
        finite = np.isfinite(s)
        r = np.where(finite, s, -1.0)
        r = r / r.max(axis=1, keepdims=True)
        return np.where(finite, r - beta * np.maximum(0.0, r - 0.8), s)
    return score


def tie_counts(scorer: Scorer, batches: list, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per test user (items ahead, tied items), unmasked, exact expected ties: what the result tables report."""
    parts = [tie_inputs(counts_with_mask(np.asarray(scorer(b.inputs)), b.targets, None)[0], "expected") for b in batches]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def paired_ratio(new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray], metric: str) -> str:
    point = metrics_from_ties(*new)[metric] / metrics_from_ties(*old)[metric]
    rng = np.random.default_rng(0)
    n = len(new[0])
    draws = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        draws.append(metrics_from_ties(new[0][i], new[1][i])[metric] / metrics_from_ties(old[0][i], old[1][i])[metric])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    scenario = load_scenario("amazon-unseen")
    data = {}
    for name in DOMAINS:
        domain = scenario.load_domain(name)
        z = scenario.encoder.item_features(domain.catalog, SequentialFamily()).numpy()
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        brands = [f.get("brand", "") for f in domain.catalog.fields]
        size = collections.Counter(brands)
        catalog = {"same brand": field_matrix(brands),
                   "same category": field_matrix([f.get("category", "") for f in domain.catalog.fields]),
                   "brand size": zscored(np.array([np.log(size[b]) if b else 0.0 for b in brands])),
                   "text hubness": zscored(np.sort(sims, axis=1)[:, -10:].mean(axis=1)),
                   "text hubness (k = 50)": zscored(np.sort(sims, axis=1)[:, -50:].mean(axis=1))}
        del sims
        base = cosine_scorer(unit, "history-unless-repeat", recent=5)
        data[name] = (domain, base, catalog, {s: evaluation_batches(domain, s) for s in ("val", "test")})
    best: dict[tuple[str, str], float] = {}
    print("validation Recall@10 / NDCG@10 per β (unmasked)")
    for lever, betas in BETAS.items():
        for name, (domain, base, catalog, batches) in data.items():
            rows = []
            for beta in betas:
                m = metrics_from_ties(*tie_counts(lever_scorer(lever, beta, base, catalog), batches["val"], domain.n_items))
                rows.append((m["recall@10"], beta, m["ndcg@10"]))
            best[lever, name] = max(rows, key=lambda row: (row[0], -abs(row[1])))[1]
            cells = "  ".join(f"{b:+.2f}: {r:.4f}/{n:.4f}" for r, b, n in rows)
            print(f"{lever:24s} {name:7s} {cells}  best β {best[lever, name]:+.2f}", flush=True)
    print("\nheld-out catalog, β = the mean of the two other domains' best β; test × β = 0 (paired bootstrap 95 %)")
    for lever in BETAS:
        for name, (domain, base, catalog, batches) in data.items():
            beta = float(np.mean([best[lever, other] for other in DOMAINS if other != name]))
            old = tie_counts(base, batches["test"], domain.n_items)
            new = tie_counts(lever_scorer(lever, beta, base, catalog), batches["test"], domain.n_items)
            print(f"{lever:24s} {name:7s} β {beta:+.3f}  Recall@10 {paired_ratio(new, old, 'recall@10')}"
                  f"  NDCG@10 {paired_ratio(new, old, 'ndcg@10')}", flush=True)


if __name__ == "__main__":
    main()
