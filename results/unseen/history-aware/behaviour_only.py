"""θ₀ with only the clients' learned behaviour weights: post hoc, on a finished run's saved models.

    python results/unseen/history-aware/behaviour_only.py RUN_DIR [RUN_DIR ...]

For each run (``fedmerge simulate`` output with ``merge.local_parameters``), θ₀'s saved weights get the shared
values of the local parameters from ``results.json`` (``merge_report.local_parameters.shared``: the clients'
median, their mean for two; what every merge serves a new catalog) and nothing else from any client; evaluated on
the held-out domain's test users with the run's metrics. Prints Recall@10 / NDCG@10 and their ratio to θ₀ and to
task arithmetic of the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fedmerge.config import load_scenario
from fedmerge.recommender import LoadedRecommender, load_recommender


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        results = json.loads((run / "results.json").read_text())
        held = results["held_out"][0]
        shared = results["merge_report"]["local_parameters"]["shared"]
        theta0 = load_recommender(run / "models" / "theta0.safetensors")
        weights = {**theta0.weights, **{n: torch.tensor(v, dtype=theta0.weights[n].dtype) for n, v in shared.items()}}
        model = LoadedRecommender(theta0.path, theta0.card, theta0.family, weights, theta0.encoder, theta0.cache_dir)
        domain = load_scenario("amazon-unseen").load_domain(held)
        m = model.evaluate(domain)
        base, ta = results["models"]["theta0"][held], results["models"]["task_arithmetic"][held]
        print(json.dumps({"run": str(run), "held_out": held, "shared": shared,
                          **{k: round(m[k], 4) for k in ("recall@10", "ndcg@10")},
                          **{f"{k} x theta0": round(m[k] / base[k], 3) for k in ("recall@10", "ndcg@10")},
                          **{f"{k} x task_arithmetic": round(m[k] / ta[k], 3) for k in ("recall@10", "ndcg@10")}}))


if __name__ == "__main__":
    main()
