"""Is the held-out gain of the text-conditioned last-item offset text-specific, or a larger push-down? Post hoc.

    FEDMERGE_AMAZON_DIR=... python results/unseen/rebuy-text/text_specificity.py [--own] RUN_DIR/seed-0 [...]

For each saved run of ``amazon-unseen`` with ``last_item_text_bias`` (kept per domain), the held-out catalog's task
arithmetic merge with the shared values a new catalog gets (the clients' mean for two), scored three ways:
``as run`` (b̄ + v̄·x̂_i per last item i); ``no v`` (v̄ = 0: the shared b alone); ``flat`` (v̄ = 0 and b set to
b̄ + the mean of v̄·x̂ over the last items of the held-out test users whose history (the last ``max_len`` items)
repeats nothing, the users b + v·x̂ applies to: the same average push-down for every item, no text; a diagnostic that reads the held-out users' last items, which serving reads anyway). JSON lines, × the run's
θ₀ on the held-out catalog. ``--own``: instead, each training domain on its own test users with its own values
(what it is served), × the run's θ₀ on that domain.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from offsets import last_item_units  # this folder is the script's own, first on sys.path

from fedmerge.config import load_scenario
from fedmerge.merging.local_parameters import from_card, with_values
from fedmerge.recommender import load_recommender
from fedmerge.text import EmbeddingCache


def main() -> None:
    scenario = load_scenario("amazon-unseen")
    encoder = scenario.encoder.text_encoder()
    cache = EmbeddingCache(scenario.encoder.cache_dir) if scenario.encoder.cache_dir else None
    domains: dict[str, object] = {}
    units: dict[str, np.ndarray] = {}  # per domain: x̂ of the last items of the users b + v·x̂ applies to
    own = "--own" in sys.argv[1:]
    for run in (Path(a) for a in sys.argv[1:] if a != "--own"):
        results = json.loads((run / "results.json").read_text())
        held, seed = results["held_out"][0], results["run"]["seed"]
        report = results["merge_report"]["local_parameters"]
        targets = report["local_parameters"] if own else {held: report["shared"]}
        model = load_recommender(run / "models" / "task_arithmetic.safetensors")
        for name, values in targets.items():
            if name not in domains:
                domains[name] = scenario.load_domain(name)
                units[name] = last_item_units(domains[name], encoder, cache, model.family.max_len)
            domain, unit = domains[name], units[name]
            v = np.asarray(values["last_item_text_bias"], np.float64)
            mean_text = float((unit @ v).mean())
            variants = {"as run": {}, "no v": {"last_item_text_bias": [0.0] * len(v)},
                        "flat": {"last_item_text_bias": [0.0] * len(v),
                                 "last_item_bias": float(values["last_item_bias"]) + mean_text}}
            theta = results["models"]["theta0"][name]
            for label, changed in variants.items():
                weights = with_values(model.weights, from_card({**values, **changed}, model.weights))
                # the card's per-domain values cleared: evaluate would put the domain's own back over the variant
                m = dataclasses.replace(model, weights=weights, card={**model.card, "local_parameters": {}}) \
                    .evaluate(domain)
                print(json.dumps({"held_out" if not own else "domain": name, "seed": seed, "values": label,
                                  "mean_text_offset": round(mean_text, 4),
                                  **{f"{k} x theta0": round(m[k] / theta[k], 4) for k in ("recall@10", "ndcg@10")}}),
                      flush=True)

if __name__ == "__main__":
    main()
