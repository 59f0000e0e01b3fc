"""In-domain effect of the text-conditioned last-item offset: each training domain's own test users, per model.

    python results/unseen/rebuy-text/in_domain.py NEW_DIR BEFORE_DIR   (each with seed-{0,1,2}.results.json)

Every model that a training domain evaluates (its individual model and each merge, served with that domain's own
local parameters), Recall@10 and NDCG@10 × the same model and seed before. Mean [95 % t-interval].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedmerge.runners.aggregate import interval


def load(folder: str) -> dict[int, dict]:
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("seed-*.results.json"))]
    return {r["run"]["seed"]: r for r in runs}


def main() -> None:
    new, before = load(sys.argv[1]), load(sys.argv[2])
    seeds = sorted(set(new) & set(before))
    first = new[seeds[0]]
    held = first["held_out"][0]
    trained = [d for d in first["models"]["individual"] if d not in (held, "average")]
    print(f"held out {held}; in-domain on {trained}; seeds {seeds}")
    for domain in trained:
        for model in ("individual", "average", "task_arithmetic", "ties", "mergerec_layerwise"):
            cells = []
            for metric in ("recall@10", "ndcg@10"):
                ratios = [new[s]["models"][model][domain][metric] / before[s]["models"][model][domain][metric]
                          for s in seeds]
                i = interval(ratios)
                cells.append(f"{metric} ×before {i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]")
            print(f"{domain:7s} {model:20s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
