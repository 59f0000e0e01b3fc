"""How far ranking by text similarity to the user's last item gets, with no training (issue 23's starting point).

    python benchmarks/text_similarity_baseline.py [--scenario amazon-unseen] [--domains Beauty Pantry Toys]

For each domain of the scenario (its data source and text encoder), every test user's items are ranked by
``cos(z_last, z_i)``, z the catalog-z-scored sentence embeddings (what the sequential family's adapter reads), and
the same with the last item's own score removed (the rule a learned ``last_item_bias`` can approach). Printed: test
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


def cosine_scorer(unit: np.ndarray, drop_last: bool) -> Scorer:
    def score(seqs: list[np.ndarray]) -> np.ndarray:
        last = np.array([int(s[-1]) for s in seqs])
        out = unit[last] @ unit.T
        if drop_last:
            out[np.arange(len(seqs)), last] = -np.inf
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
        rows = {"cosine of the last item": cosine_scorer(unit, False),
                "cosine, last item left out": cosine_scorer(unit, True)}
        features = base.encoder.item_features(domain.catalog, base.model.make_family())  # the same for both inits
        for init in ("random", "text_similarity"):
            cfg = apply_overrides(base, [f'model.params.theta0_init="{init}"', "model.params.last_item_bias=false"])
            rows[f"θ₀, theta0_init={init}"] = cfg.model.make_family().scorer(initial_weights(cfg), features)
        for label, scorer in rows.items():
            m = evaluate_scorer(scorer, domain, "test")
            print(f"{name:8s} {label:32s} recall@10 {m['recall@10']:.4f}  ndcg@10 {m['ndcg@10']:.4f}", flush=True)


if __name__ == "__main__":
    main()
