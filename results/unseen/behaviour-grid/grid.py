"""Issue 23: θ₀ with fixed behaviour values on each catalog, no training — which (b, b_h, w) a new catalog could get.

    python results/unseen/behaviour-grid/grid.py run RUN_DIR [RUN_DIR ...] > grid.jsonl
    python results/unseen/behaviour-grid/grid.py table grid.jsonl > table.txt

``run``: the θ₀ of each run folder (an ``amazon-unseen`` run whose ``models/theta0.safetensors`` has the behaviour
weights; θ₀ with ``theta0_init = "text_similarity"`` is the same function whatever is held out, so one run's θ₀
serves all three catalogs) with b (``last_item_bias``) ∈ {0, -0.2, -0.36, -0.6}, b_h (``history_bias``) ∈ {0, -0.6}
and w (``history_pooling``) ∈ {0, (0.30, 0.18, 0.15, 0.12) (the clients' shared w of a seed-0 run), 0.5^k}, every
other behaviour weight at 0 (a user who repeats an item gets θ₀'s scoring), scored on the test users of Toys, Beauty
and Pantry; one JSON line per (θ₀ seed, catalog, values). ``table``: Recall@10 × θ₀ per catalog, mean over the θ₀
seeds [95 % t-interval], rows sorted by their worst catalog.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
from pathlib import Path

from fedmerge.config import load_scenario
from fedmerge.merging.local_parameters import from_card, with_values
from fedmerge.recommender import load_recommender
from fedmerge.runners.aggregate import interval

CATALOGS = ("Toys", "Beauty", "Pantry")
POOLING = {"0": [0.0] * 4, "learned": [0.30, 0.18, 0.15, 0.12], "0.5^k": [0.5, 0.25, 0.125, 0.0625]}
GRID = list(itertools.product([0.0, -0.2, -0.36, -0.6], [0.0, -0.6], list(POOLING)))


def run(folders: list[Path]) -> None:
    scenario = load_scenario("amazon-unseen")
    domains = {name: scenario.load_domain(name) for name in CATALOGS}
    for folder in folders:
        theta0 = load_recommender(folder / "models" / "theta0.safetensors")
        seed = json.loads((folder / "results.json").read_text())["run"]["seed"]
        behaviour = {n: w for n, w in theta0.weights.items() if n in theta0.family.behaviour_parameters}
        for name, (b, b_h, w) in itertools.product(CATALOGS, GRID):
            values = {n: [0.0] * t.numel() if t.ndim else 0.0 for n, t in behaviour.items()}
            values.update(last_item_bias=b, history_bias=b_h, history_pooling=POOLING[w])
            model = dataclasses.replace(theta0, weights=with_values(theta0.weights, from_card(values, theta0.weights)))
            m = model.evaluate(domains[name])
            print(json.dumps({"theta0_seed": seed, "domain": name, "b": b, "bh": b_h, "w": w,
                              "recall@10": round(m["recall@10"], 5), "ndcg@10": round(m["ndcg@10"], 5)}), flush=True)


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    theta0 = {(r["theta0_seed"], r["domain"]): r["recall@10"] for r in rows if r["b"] == r["bh"] == 0 and r["w"] == "0"}
    ratios: dict[tuple, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        ratios[(r["b"], r["bh"], r["w"])][r["domain"]].append(r["recall@10"] / theta0[(r["theta0_seed"], r["domain"])])
    cells = {key: {d: interval(per[d]) for d in CATALOGS} for key, per in ratios.items()}
    print("b      b_h    w        " + "".join(f"{d:24s}" for d in CATALOGS) + "(Recall@10 x θ₀, θ₀ seeds 0-2)")
    for (b, b_h, w), cell in sorted(cells.items(), key=lambda kc: -min(c["mean"] for c in kc[1].values())):
        print(f"{b:<6g} {b_h:<6g} {w:8s} "
              + "  ".join(f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" for c in cell.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["run", "table"])
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    run(args.paths) if args.mode == "run" else table(args.paths[0])


if __name__ == "__main__":
    main()
