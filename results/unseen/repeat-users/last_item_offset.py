"""Where the held-out Recall gap sits: θ₀ with the clients' shared behaviour values, post hoc on saved runs.

    python results/unseen/repeat-users/last_item_offset.py swap RUN_DIR [RUN_DIR ...]
    python results/unseen/repeat-users/last_item_offset.py sweep RUN_DIR [RUN_DIR ...] [--values -0.1 -0.2 ...]
    python results/unseen/repeat-users/last_item_offset.py table OUTPUT.jsonl

``swap``: one of b (``last_item_bias``), b_h (``history_bias``), w (``history_pooling``) replaced by the own value of
the training domain whose users never re-buy (Beauty's for held-out Toys, Toys' for held-out Beauty; an oracle's
pick), or all of them. ``sweep``: the shared values with b set to each of ``--values`` (for every user; a user whose
history repeats an item keeps the run's b_r). Each prints JSON lines: held-out Recall@10 / NDCG@10 × the run's θ₀.
Runs of ``amazon-unseen`` with ``merge.local_parameters`` (``results.json`` holds the values); a run without
``repeat_user_bias`` gets it at 0 (as ``gate_posthoc.py``). ``table``: those lines as mean over seeds [95 %
t-interval] per held-out domain and variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from gate_posthoc import with_repeat_offsets_at_zero  # this folder is the script's own, first on sys.path

from fedmerge.config import load_scenario
from fedmerge.merging.local_parameters import from_card, with_values
from fedmerge.recommender import load_recommender
from fedmerge.runners.aggregate import interval

NEVER_REBUYS = {"Toys": "Beauty", "Beauty": "Toys"}
SWAPPED = ("last_item_bias", "history_bias", "history_pooling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["swap", "sweep", "table"])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (table: one JSON-lines file)")
    parser.add_argument("--values", nargs="+", type=float, default=[0.0, -0.1, -0.2, -0.36, -0.6, -1.0])
    args = parser.parse_args()
    if args.mode == "table":
        table(args.runs[0])
        return
    scenario, domains = load_scenario("amazon-unseen"), {}
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        held, seed = results["held_out"][0], results["run"]["seed"]
        report = results["merge_report"]["local_parameters"]
        theta0 = with_repeat_offsets_at_zero(load_recommender(run / "models" / "theta0.safetensors"))
        if held not in domains:
            domains[held] = scenario.load_domain(held)
        if args.mode == "swap":
            own = report["local_parameters"][NEVER_REBUYS[held]]
            variants = {"shared": {}, **{f"own {n}": {n: own[n]} for n in SWAPPED},
                        "own all": {n: own[n] for n in SWAPPED}}
        else:
            variants = {f"b = {b:g}": {"last_item_bias": b} for b in args.values}
        theta = results["models"]["theta0"][held]
        for label, changed in variants.items():
            values = {**report["shared"], **changed}
            model = dataclasses.replace(theta0, weights=with_values(theta0.weights, from_card(values, theta0.weights)))
            m = model.evaluate(domains[held])
            print(json.dumps({"held_out": held, "seed": seed, "values": label,
                              **{f"{k} x theta0": round(m[k] / theta[k], 4) for k in ("recall@10", "ndcg@10")}}),
                  flush=True)


def table(path: Path) -> None:
    rows: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault((row["held_out"], row["values"]), []).append(row)
    for (held, label), group in rows.items():
        cells = []
        for key in ("recall@10 x theta0", "ndcg@10 x theta0"):
            i = interval([r[key] for r in group])
            cells.append(f"{key} {i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]")
        print(f"{held:7s} {label:22s} seeds {sorted(r['seed'] for r in group)}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
