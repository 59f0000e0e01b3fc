"""Per-seed ratios for the history-aware runs against θ₀, the best single-domain model and the runs before them.

    python results/unseen/history-aware/compare.py NEW_DIR BEFORE_DIR   (each with seed-{0,1,2}.results.json)

Held-out catalog: every model's Recall@10 / NDCG@10, × θ₀, × the best single-domain model of each seed and metric,
× the same model before. Merged domains (mean of the two): MergeRec layer-wise × the individuals, × the best
training-free merge of each seed, × before. Ratios per seed; mean [95 % t-interval] (fedmerge.runners.aggregate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedmerge.runners.aggregate import interval

METRICS = ("recall@10", "ndcg@10")
FREE = ("average", "task_arithmetic", "ties")


def load(folder: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("seed-*.results.json"))]


def fmt(values: list[float]) -> str:
    i = interval(values)
    return f"{i['mean']:.2f} [{i['low']:.2f}, {i['high']:.2f}]"


def main() -> None:
    new, before = load(sys.argv[1]), load(sys.argv[2])
    held = new[0]["held_out"][0]
    trained = [d for d in new[0]["models"]["theta0"] if d not in (held, "average")]
    names = [m for m in new[0]["models"] if held in new[0]["models"][m] and m != "individual"]
    print(f"held out {held}; merged {trained}; seeds {len(new)}")
    for m in names:
        cols = []
        for metric in METRICS:
            val = [r["models"][m][held][metric] for r in new]
            theta = [v / r["models"]["theta0"][held][metric] for v, r in zip(val, new)]
            best = [v / max(r["models"][f"individual_{d}"][held][metric] for d in trained) for v, r in zip(val, new)]
            prev = [v / b["models"][m][held][metric] for v, b in zip(val, before) if m in b["models"]]
            cols.append((sum(val) / len(val), fmt(theta), fmt(best), fmt(prev) if len(prev) == len(val) else "-"))
        print(f"{m:22s} " + " | ".join(f"{metric} {c[0]:.4f} ×θ₀ {c[1]} ×best-single {c[2]} ×before {c[3]}"
                                        for metric, c in zip(METRICS, cols)))
    def merged(r: dict, m: str, metric: str) -> float:
        return sum(r["models"][m][d][metric] for d in trained) / len(trained)
    for metric in METRICS:
        mr = [merged(r, "mergerec_layerwise", metric) for r in new]
        ind = [v / merged(r, "individual", metric) for v, r in zip(mr, new)]
        free = [v / max(merged(r, f, metric) for f in FREE) for v, r in zip(mr, new)]
        prev = [v / merged(b, "mergerec_layerwise", metric) for v, b in zip(mr, before)]
        print(f"merged domains, MergeRec layer-wise {metric} {sum(mr) / len(mr):.4f}: × individuals {fmt(ind)}, "
              f"× best training-free {fmt(free)}, × before {fmt(prev)}")
    for r in new:
        shared = r.get("merge_report", {}).get("local_parameters", {})
        print("seed", r.get("config", {}).get("run", {}).get("seed"), "local parameters:", json.dumps(shared)[:400])


if __name__ == "__main__":
    main()
