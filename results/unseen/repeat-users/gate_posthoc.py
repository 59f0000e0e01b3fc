"""A finished run's saved models scored with ``repeat_user_bias`` on at θ₀'s 0: post hoc, no new training.

    python results/unseen/repeat-users/gate_posthoc.py RUN_DIR [RUN_DIR ...]

For runs whose training domains never repeat an item (Amazon Beauty and Toys, Pantry held out), a run with
``repeat_user_bias = true`` trains the same weights: the offsets (b_r, b_hr) get no gradient from any training window,
from θ₀ distillation (one-item pseudo-users) or from MergeRec (rollouts never repeat an item), so every client keeps
θ₀'s zeros and the clients' median is 0. Scoring each saved model with them added is then that run's figure (TIES
differs in the fourth digit on Pantry seed 0, presumably as its trim also counts the two zero entries); it
differs from the run without them only for held-out users whose history repeats an item. Prints one JSON line per
run: each saved model's (``models/``, and ``clients/`` as ``individual_<domain>``) Recall@10 / NDCG@10 on the
held-out domain, with the offsets and as the run scored it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from fedmerge.config import load_scenario
from fedmerge.recommender import LoadedRecommender, load_recommender

METRICS = ("recall@10", "ndcg@10")


def with_repeat_offsets_at_zero(model: LoadedRecommender) -> LoadedRecommender:
    """``model`` with ``repeat_user_bias`` switched on at θ₀'s (0, 0); ``model`` itself when it already has it."""
    if "repeat_user_bias" in model.weights:
        return model
    return dataclasses.replace(model, family=dataclasses.replace(model.family, repeat_user_bias=True),
                               weights={**model.weights, "repeat_user_bias": torch.zeros(2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    scenario, domains = load_scenario("amazon-unseen"), {}
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        held = results["held_out"][0]
        if held not in domains:
            domains[held] = scenario.load_domain(held)
        report = {}
        paths = sorted((run / "models").glob("*.safetensors")) + sorted((run / "clients").glob("*.safetensors"))
        for path in paths:
            model = load_recommender(path)
            if "repeat_user_bias" in model.weights:
                raise SystemExit(f"{path} already has repeat_user_bias: nothing to add")
            gated = with_repeat_offsets_at_zero(model)
            # mergerec_testtime_<held> is the run's mergerec_testtime; clients/<domain> its individual_<domain>
            name = path.stem.removesuffix(f"_{held}") if path.parent.name == "models" else f"individual_{path.stem}"
            m, before = gated.evaluate(domains[held]), results["models"][name][held]
            report[name] = {"with": [round(m[k], 4) for k in METRICS], "without": [round(before[k], 4) for k in METRICS]}
        print(json.dumps({"run": str(run), "seed": results["run"]["seed"], "held_out": held, "models": report}),
              flush=True)


if __name__ == "__main__":
    main()
