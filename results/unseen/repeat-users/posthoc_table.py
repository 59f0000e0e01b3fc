"""Per-seed ratios of ``gate_posthoc.py``'s JSON lines: each model on the held-out domain with the repeating users'
offsets and without, × θ₀, × the best single-domain model (of the same seed and variant), × itself without.

    python results/unseen/repeat-users/posthoc_table.py results/unseen/repeat-users/pantry_posthoc.jsonl

Mean over seeds [95 % t-interval] (fedmerge.runners.aggregate.interval).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedmerge.runners.aggregate import interval

METRICS = ("recall@10", "ndcg@10")


def fmt(values: list[float]) -> str:
    i = interval(values)
    return f"{i['mean']:.2f} [{i['low']:.2f}, {i['high']:.2f}]"


def main() -> None:
    runs = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    print(f"held out {runs[0]['held_out']}; seeds {[r['seed'] for r in runs]}")
    singles = [n for n in runs[0]["models"] if n.startswith("individual_")]
    for name in runs[0]["models"]:
        cells = []
        for k, metric in enumerate(METRICS):
            row = []
            for variant in ("with", "without"):
                values = [r["models"][name][variant][k] for r in runs]
                theta0 = [v / r["models"]["theta0"][variant][k] for v, r in zip(values, runs)]
                best = [v / max(r["models"][s][variant][k] for s in singles) for v, r in zip(values, runs)]
                row.append(f"{variant} {sum(values) / len(values):.4f} ×θ₀ {fmt(theta0)} ×best-single {fmt(best)}")
            gain = [r["models"][name]["with"][k] / r["models"][name]["without"][k] for r in runs]
            cells.append(f"{metric}: " + "; ".join(row) + f"; with × without {fmt(gain)}")
        print(f"{name:20s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
