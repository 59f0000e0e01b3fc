"""Rerun some seeds of one unit of this study and put them into privacy.json / privacy.md / privacy.png, with the
study's own functions (``utility_sweep``, ``attack_sweep``, ``interval``, ``markdown_table``, ``plot_study``).

    export FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon
    S=results/privacy/amazon-text-lae/rerun_seeds.py
    PYTHONPATH=$PWD python $S run utility --unit user --seeds 1 2 --parts DIR   # the two halves may run side by side
    PYTHONPATH=$PWD python $S run attacks --unit user --seeds 1 2 --parts DIR
    PYTHONPATH=$PWD python $S merge --unit user --seeds 1 2 --parts DIR        # rewrites privacy.json/.md/.png here

``run`` computes the unit's finite-ε cells for the given seeds (run folders under DIR/runs); ``merge`` replaces
those seeds' values in the unit's rows of privacy.json (other seeds kept), recomputes each interval, records
``rerun_seeds`` (and, for utility rows, ``rerun_seconds``), and rewrites the table and the plot.
"""
import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from fedmerge.privacy.study import (attack_sweep, epsilon_label, interval, load_study, markdown_table, plot_study,
                                    utility_sweep)
from fedmerge.storage import write_json_atomic

HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser()
parser.add_argument("action", choices=["run", "merge"])
parser.add_argument("part", nargs="?", choices=["utility", "attacks"])
parser.add_argument("--unit", required=True, choices=["domain", "user"])
parser.add_argument("--seeds", type=int, nargs="+", required=True)
parser.add_argument("--parts", type=Path, required=True, help="folder of the run's outputs")
args = parser.parse_args()

cfg, full = load_study(str(HERE / "scenario.toml"))
study = replace(full, units=(args.unit,), epsilons=tuple(e for e in full.epsilons if not math.isinf(e)),
                seeds=tuple(args.seeds))
if args.action == "run":
    start = time.perf_counter()
    result = (utility_sweep(cfg, study, args.parts / "runs", overwrite=True) if args.part == "utility"
              else attack_sweep(cfg, study))
    write_json_atomic(args.parts / f"{args.part}.json", {"result": result, "wall_s": time.perf_counter() - start})
    raise SystemExit(0)


def replaced(old: dict, new: dict, seeds: list[int]) -> dict:
    """The interval over ``old`` with the values of ``seeds`` taken from ``new`` (its values in ``args.seeds`` order)."""
    values = dict(zip(seeds, old["values"]))
    values.update(zip(args.seeds, new["values"]))
    return interval([values[s] for s in seeds])


saved = json.loads((HERE / "privacy.json").read_text())
seeds = saved["study"]["seeds"]
utility = json.loads((args.parts / "utility.json").read_text())["result"]
probe = json.loads((args.parts / "attacks.json").read_text())["result"]
for row in saved["utility"]:
    new = next((r for r in utility if (r["unit"], r["epsilon"]) == (row["unit"], row["epsilon"])), None)
    if new is None:
        continue
    row["metric"] = {m: replaced(v, new["metric"][m], seeds) for m, v in row["metric"].items()}
    row["rerun_seeds"], row["rerun_seconds"] = list(args.seeds), new["seconds"]
    assert row["noise_multiplier"] == new["noise_multiplier"]
for row in saved["probe"]["rows"]:
    new = next((r for r in probe["rows"] if (r["unit"], r["epsilon"]) == (row["unit"], row["epsilon"])), None)
    if new is None:
        continue
    row["attacks"] = {a: {k: replaced(v, new["attacks"][a][k], seeds) for k, v in scores.items()}
                      for a, scores in row["attacks"].items()}
    row["rerun_seeds"] = list(args.seeds)
write_json_atomic(HERE / "privacy.json", saved)
(HERE / "privacy.md").write_text(markdown_table(saved["utility"], saved["probe"], full, cfg))
plot_study(saved["utility"], saved["probe"], full, HERE / "privacy.png")
print("merged", args.unit, args.seeds, [epsilon_label(e) for e in study.epsilons])
