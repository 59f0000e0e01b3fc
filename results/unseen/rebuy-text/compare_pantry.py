"""Held-out Pantry with the text-conditioned last-item offset against amazon-unseen as it shipped before it.

    python results/unseen/rebuy-text/compare_pantry.py NEW_DIR results/unseen/repeat-users/pantry_posthoc.jsonl

NEW_DIR: seed-*.results.json of the runs with ``last_item_text_bias``. The reference is each saved model of the
earlier Pantry-held-out runs scored with the repeating users' offsets (the "with" columns of
``pantry_posthoc.jsonl``, ``../repeat-users/``; its seed-0 figures agree with a real run to the last printed digit
but for TIES). Ratios per seed; mean [95 % t-interval] (fedmerge.runners.aggregate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedmerge.runners.aggregate import interval


def fmt(values: list[float]) -> str:
    i = interval(values)
    return f"{i['mean']:.2f} [{i['low']:.2f}, {i['high']:.2f}]"


def main() -> None:
    new = {json.loads(p.read_text())["config"]["run"]["seed"]: json.loads(p.read_text())
           for p in sorted(Path(sys.argv[1]).glob("seed-*.results.json"))}
    before = {row["seed"]: row["models"] for row in map(json.loads, Path(sys.argv[2]).read_text().splitlines())}
    seeds = sorted(set(new) & set(before))
    print(f"held out Pantry; seeds {seeds}")
    for model in new[seeds[0]]["models"]:
        if "Pantry" not in new[seeds[0]]["models"][model] or model not in before[seeds[0]]:
            continue
        cols = []
        for k, metric in enumerate(("recall@10", "ndcg@10")):
            val = [new[s]["models"][model]["Pantry"][metric] for s in seeds]
            theta = [v / new[s]["models"]["theta0"]["Pantry"][metric] for v, s in zip(val, seeds)]
            prev = [v / before[s][model]["with"][k] for v, s in zip(val, seeds)]
            cols.append(f"{metric} {sum(val) / len(val):.4f} ×θ₀ {fmt(theta)} ×before {fmt(prev)}")
        print(f"{model:22s} " + " | ".join(cols))


if __name__ == "__main__":
    main()
