"""θ₀ with only the clients' learned behaviour weights: post hoc, on a finished run's saved models.

    python results/unseen/history-aware/behaviour_only.py RUN_DIR [RUN_DIR ...] [--values-of DOMAIN]

For each run (``fedmerge simulate`` output with ``merge.local_parameters``), θ₀'s saved weights get the shared
values of the local parameters from ``results.json`` (``merge_report.local_parameters.shared``: the clients'
median, their mean for two; what every merge serves a new catalog) and nothing else from any client; evaluated on
the held-out domain's test users with the run's metrics. Prints Recall@10 / NDCG@10 and their ratio to θ₀ and to
task arithmetic of the same run. ``--values-of DOMAIN``: training domain DOMAIN's own values instead of the shared
ones (an oracle's choice for the held-out catalog, not something a new domain could pick without interactions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fedmerge.config import load_scenario
from fedmerge.merging.local_parameters import from_card, with_values
from fedmerge.recommender import load_recommender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--values-of", default=None, help="a training domain whose own values to use")
    args = parser.parse_args()
    scenario, domains = load_scenario("amazon-unseen"), {}  # one load per held-out domain
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        held = results["held_out"][0]
        report = results["merge_report"]["local_parameters"]
        shared = report["shared"] if args.values_of is None else report["local_parameters"][args.values_of]
        theta0 = load_recommender(run / "models" / "theta0.safetensors")
        model = dataclasses.replace(theta0, weights=with_values(theta0.weights, from_card(shared, theta0.weights)))
        if held not in domains:
            domains[held] = scenario.load_domain(held)
        m = model.evaluate(domains[held])
        base, ta = results["models"]["theta0"][held], results["models"]["task_arithmetic"][held]
        print(json.dumps({"run": str(run), "held_out": held, "values_of": args.values_of or "shared", "values": shared,
                          **{k: round(m[k], 4) for k in ("recall@10", "ndcg@10")},
                          **{f"{k} x theta0": round(m[k] / base[k], 3) for k in ("recall@10", "ndcg@10")},
                          **{f"{k} x task_arithmetic": round(m[k] / ta[k], 3) for k in ("recall@10", "ndcg@10")}}))


if __name__ == "__main__":
    main()
