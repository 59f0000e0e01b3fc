"""Issue 23: the held-out catalog's last-item offset b from the training clients' own validation curves.

    python results/unseen/repeat-users/b_from_client_curves.py RUN_DIR [RUN_DIR ...] > b_from_client_curves.jsonl
    python results/unseen/repeat-users/b_from_client_curves.py --table b_from_client_curves.jsonl

Data-isolated rules for the one number that decides the held-out Recall@10 gap (README "Against issue 23's goal
now"): each training client scores its own validation users with its own saved model (``clients/<domain>``) at every
b of ``GRID`` (its other values as trained; users whose input repeats an item keep b_r) and reports the Recall@10
curve, a handful of aggregate numbers like the metrics clients already send. The server gives the new catalog, in
place of the mean of the trained b:
- ``minimax regret``: the b minimising the largest relative regret 1 − R_d(b) / max R_d over the clients;
- ``mean of the clients' best b``: each client's validation-best b (the smallest |b| among equals), averaged — what
  the mean becomes if every client calibrates its b on its validation users after training (as text-LAE picks λ).
Swapping b is exact on precomputed scores: the offset is b / τ added to the last item's logit of each row whose
input repeats no item (``TextSASRec.with_history_bias``). A run without ``repeat_user_bias`` (Pantry held out, from
before it) is scored with it added at 0, as ``gate_posthoc.py`` does (nothing in a Beauty + Toys run repeats an
item). Each run prints one JSON line: per rule the b and Recall@10 / NDCG@10 × θ₀ on the held-out test users of task
arithmetic, MergeRec layer-wise, the test-time merge and averaging (their trained shared b beside); the clients'
curves go to stderr. ``--table``: mean over seeds [95 % t-interval].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gate_posthoc import with_repeat_offsets_at_zero  # this folder is the script's own, first on sys.path

from fedmerge.config import load_scenario
from fedmerge.metrics import counts_with_mask, evaluation_batches, metrics_from_ties, tie_inputs
from fedmerge.recommender import load_recommender
from fedmerge.runners.aggregate import interval

GRID = np.round(np.arange(0.0, -1.0001, -0.02), 2)


def curves(model, domain, split, grid):
    """metrics at each b (the model's own last_item_bias swapped for b; rows whose input repeats an item keep b_r)."""
    model = model.for_domain(domain.name)
    b_own = float(model.weights["last_item_bias"].reshape(-1)[0])
    tau = model.family.temperature
    score = model.family.scorer(model.weights, model.features(domain.catalog))
    parts = {float(b): [] for b in grid}
    for batch in evaluation_batches(domain, split, max_len=model.family.max_len):
        s = np.asarray(score(batch.inputs), dtype=np.float64)
        last = np.array([x[-1] for x in batch.inputs])
        plain = np.array([len(np.unique(x)) == len(x) for x in batch.inputs])  # rows whose input repeats no item
        rows = np.flatnonzero(plain)
        for b in parts:
            shifted = s.copy()
            shifted[rows, last[plain]] += (b - b_own) / tau
            parts[b].append(tie_inputs(counts_with_mask(shifted, batch.targets, None)[0], "expected"))
    return {b: metrics_from_ties(*(np.concatenate(c) for c in zip(*p))) for b, p in parts.items()}, b_own


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for held in sorted({r["held_out"] for r in rows}):
        group = [r for r in rows if r["held_out"] == held]
        print(f"{held} held out, seeds {[r['seed'] for r in group]}; clients' trained and validation-best b: "
              f"{[r['clients'] for r in group]}")
        for rule in group[0]["rules"]:
            print(f"  {rule}: b {[r['rules'][rule]['b'] for r in group]}")
            for name in group[0]["rules"][rule]["x_theta0"]:
                cells = []
                for k in ("recall@10", "ndcg@10"):
                    i = interval([r["rules"][rule]["x_theta0"][name][k] for r in group])
                    cells.append(f"{k} × θ₀ {i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]")
                shared = [r["rules"][rule]["x_theta0"][name]["shared b"] for r in group]
                print(f"    {name.removesuffix('_' + held):20s} " + "  ".join(cells) + f"  (trained shared b {shared})")


def score_run(run: Path, scenario, domains: dict) -> dict:
    """One run's JSON line (see the module docstring); the clients' curves to stderr."""
    def domain(name: str):
        if name not in domains:
            domains[name] = scenario.load_domain(name)
        return domains[name]

    results = json.loads((run / "results.json").read_text())
    held = results["held_out"][0]
    regret, clients = {}, {}
    for path in sorted((run / "clients").glob("*.safetensors")):
        metrics, trained = curves(with_repeat_offsets_at_zero(load_recommender(path)), domain(path.stem), "val", GRID)
        recall = np.array([metrics[float(b)]["recall@10"] for b in GRID])
        regret[path.stem] = 1 - recall / recall.max()
        clients[path.stem] = {"trained b": round(trained, 3), "best b": float(GRID[recall.argmax()])}
        curve = {str(b): round(float(x), 4) for b, x in zip(GRID, recall)}
        print(json.dumps({"run": str(run), "client": path.stem, **clients[path.stem], "curve": curve}),
              file=sys.stderr, flush=True)
    worst = np.max(np.stack(list(regret.values())), axis=0)
    rules = {"minimax regret": float(GRID[worst.argmin()]),
             "mean of the clients' best b": round(float(np.mean([c["best b"] for c in clients.values()])), 3)}
    base = with_repeat_offsets_at_zero(load_recommender(run / "models" / "theta0.safetensors")).evaluate(domain(held))
    out = {rule: {"b": b, "x_theta0": {}} for rule, b in rules.items()}
    for name in ("task_arithmetic", "mergerec_layerwise", f"mergerec_testtime_{held}", "average"):
        model = with_repeat_offsets_at_zero(load_recommender(run / "models" / f"{name}.safetensors"))
        metrics, shared = curves(model, domain(held), "test", np.array(list(rules.values())))
        for rule, b in rules.items():
            out[rule]["x_theta0"][name] = {k: round(metrics[b][k] / base[k], 4) for k in ("recall@10", "ndcg@10")}
            out[rule]["x_theta0"][name]["shared b"] = round(shared, 3)
    out["minimax regret"]["max regret"] = round(float(worst.min()), 4)
    return {"run": str(run), "held_out": held, "seed": results["run"]["seed"], "clients": clients, "rules": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with --table: one JSON-lines file)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        table(args.runs[0])
        return
    scenario, domains = load_scenario("amazon-unseen"), {}
    for run in args.runs:
        print(json.dumps(score_run(run, scenario, domains)), flush=True)


if __name__ == "__main__":
    main()
