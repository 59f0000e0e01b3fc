"""How far ranking by text similarity to the user's last item gets, with no training (issue 23's starting point).

    python benchmarks/text_similarity_baseline.py [--scenario amazon-unseen] [--domains Beauty Pantry Toys]

For each domain of the scenario (its data source and text encoder), every test user's items are ranked by
``cos(z_last, z_i)``, z the catalog-z-scored sentence embeddings (what the sequential family's adapter reads), and
the same with the last item's own score removed (the rule a learned ``last_item_bias`` can approach), with every
history item's removed (``history_bias``; and the same except for users whose history holds an item twice,
``repeat_user_bias``), and with the query the last 5 items' embeddings at weights 0.5^k (``history_pooling``) and
every history item removed. Printed: test
Recall@10 / NDCG@10 (unmasked, as the result tables), next to the scenario's θ₀ with ``theta0_init`` "random" and
"text_similarity" (the seeded models: no training either). Reads the data through the scenario, so set
``FEDMERGE_AMAZON_DIR`` for Amazon.
"""

from __future__ import annotations

import argparse

import numpy as np

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.metrics import Scorer, evaluate_scorer
from fedmerge.models.sequential import SequentialFamily
from fedmerge.runners.server import initial_weights


def cosine_scorer(unit: np.ndarray, drop: str = "none", recent: int = 1, decay: float = 0.5) -> Scorer:
    """``cos(Σ_{k<recent} decay^k · ẑ_{t−k}, z_i)``, ẑ unit vectors, ``drop``: "none", "last" (the last item's own
    score removed), "history" (every history item's) or "history-unless-repeat" (every history item's, except for a
    user whose history holds some item twice: ``repeat_user_bias``'s signal)."""
    def score(seqs: list[np.ndarray]) -> np.ndarray:
        window = np.full((len(seqs), recent), -1)
        for r, s in enumerate(seqs):
            tail = np.asarray(s[-recent:])[::-1]
            window[r, : len(tail)] = tail
        weights = decay ** np.arange(recent) * (window >= 0)
        out = np.einsum("rk,rkd->rd", weights, unit[window.clip(min=0)]) @ unit.T
        if drop == "last":
            out[np.arange(len(seqs)), window[:, 0]] = -np.inf
        elif drop in ("history", "history-unless-repeat"):
            kept = [s if drop == "history" or len(np.unique(s)) == len(s) else s[:0] for s in seqs]
            rows = np.concatenate([np.full(len(s), r) for r, s in enumerate(kept)])
            out[rows, np.concatenate(kept).astype(np.int64)] = -np.inf
        return out
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="amazon-unseen")
    parser.add_argument("--domains", nargs="*", default=None, help="default: every domain of the scenario")
    args = parser.parse_args()
    base = load_scenario(args.scenario)
    for name in args.domains or list(base.data.domains):
        domain = base.load_domain(name)
        z = base.encoder.item_features(domain.catalog, SequentialFamily()).numpy()  # catalog-z-scored embeddings
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        rows = {"cosine of the last item": cosine_scorer(unit),
                "cosine, last item left out": cosine_scorer(unit, "last"),
                "cosine, history left out": cosine_scorer(unit, "history"),
                "cosine, history left out unless it repeats": cosine_scorer(unit, "history-unless-repeat"),
                "last 5 at 0.5^k, history left out": cosine_scorer(unit, "history", recent=5)}
        features = base.encoder.item_features(domain.catalog, base.model.make_family())  # the same for both inits
        for init in ("random", "text_similarity"):
            cfg = apply_overrides(base, [f'model.params.theta0_init="{init}"'])  # b, b_h, w: 0 at θ₀
            rows[f"θ₀, theta0_init={init}"] = cfg.model.make_family().scorer(initial_weights(cfg), features)
        for label, scorer in rows.items():
            m = evaluate_scorer(scorer, domain, "test")
            print(f"{name:8s} {label:44s} recall@10 {m['recall@10']:.4f}  ndcg@10 {m['ndcg@10']:.4f}", flush=True)


if __name__ == "__main__":
    main()
