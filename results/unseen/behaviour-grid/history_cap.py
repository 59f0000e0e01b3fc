"""Issue 23: a cap on how many of the user's own history items a top-10 may hold, on θ₀ with fixed behaviour values.

    python results/unseen/behaviour-grid/history_cap.py run SEED CATALOG [CATALOG ...] >> history_cap.jsonl
    python results/unseen/behaviour-grid/history_cap.py table history_cap.jsonl > history_cap.txt

``run``: the ``amazon-unseen`` θ₀ of run seed SEED (``theta0_init = "text_similarity"``: the same function whatever
is held out) with b (``last_item_bias``) ∈ {0, -0.2, -0.36}, b_h (``history_bias``) ∈ {0, -0.6}, w
(``history_pooling``) ∈ {0, 0.5^k}, every other behaviour weight 0, scored on each catalog's test users; each user's
top 10 is then cut to at most ``cap`` ∈ {0, 1, 2, 3, ∞} items of the user's history (the next items by score fill
the freed slots). A rank-based hedge of the re-buy bet: a catalog whose users re-buy keeps its best history item(s),
one whose users do not loses only the slots the cap leaves. One JSON line per (seed, catalog, values, cap).
``table``: Recall@10 × θ₀ (b = b_h = 0, w = 0, no cap) per catalog, mean over seeds [95 % t-interval].
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from fedmerge.config import load_scenario
from fedmerge.merging.local_parameters import from_card, with_values
from fedmerge.runners.aggregate import interval
from fedmerge.runners.server import initial_weights

CATALOGS = ("Toys", "Beauty", "Pantry")
POOLING = {"0": [0.0] * 4, "0.5^k": [0.5, 0.25, 0.125, 0.0625]}
GRID = list(itertools.product([0.0, -0.2, -0.36], [0.0, -0.6], list(POOLING)))
CAPS = (0, 1, 2, 3, None)  # None: no cap
TOP = 10


def capped_top(scores: np.ndarray, history: set[int], cap: int | None) -> list[int]:
    """The ``TOP`` best items by score, at most ``cap`` of them from ``history`` (ties within the best
    ``TOP + len(history)``: lower index first)."""
    k = min(TOP + len(history), len(scores) - 1)
    best = np.argpartition(-scores, k)[: k + 1]
    ranked = best[np.lexsort((best, -scores[best]))]
    out, from_history = [], 0
    for item in ranked.tolist():
        if item in history:
            if cap is not None and from_history >= cap:
                continue
            from_history += 1
        out.append(item)
        if len(out) == TOP:
            break
    return out


def run(seed: int, catalogs: list[str]) -> None:
    scenario = load_scenario("amazon-unseen")
    scenario = dataclasses.replace(scenario, run=dataclasses.replace(scenario.run, seed=seed))
    family, theta0 = scenario.model.make_family(), initial_weights(scenario)
    behaviour = [n for n in theta0 if n in family.behaviour_parameters]
    for name in catalogs:
        domain = scenario.load_domain(name)
        features = scenario.encoder.item_features(domain.catalog, family)
        seqs, targets, _ = domain.inputs("test")
        inputs, histories = [s[-family.max_len:] for s in seqs], [set(s.tolist()) for s in seqs]
        for b, b_h, w in GRID:
            values = {n: [0.0] * theta0[n].numel() if theta0[n].ndim else 0.0 for n in behaviour}
            values.update(last_item_bias=b, history_bias=b_h, history_pooling=POOLING[w])
            score = family.scorer(with_values(theta0, from_card(values, theta0)), features)
            gains: dict[int | None, list[float]] = {cap: [] for cap in CAPS}
            for start in range(0, len(targets), 512):
                batch = np.asarray(score(inputs[start:start + 512]))
                for row, target in enumerate(targets[start:start + 512]):
                    for cap in CAPS:
                        top = capped_top(batch[row], histories[start + row], cap)
                        gains[cap].append(1 / np.log2(top.index(target) + 2) if target in top else 0.0)
            for cap in CAPS:
                print(json.dumps({"seed": seed, "domain": name, "b": b, "bh": b_h, "w": w, "cap": cap,
                                  "recall@10": round(float(np.mean(np.asarray(gains[cap]) > 0)), 5),
                                  "ndcg@10": round(float(np.mean(gains[cap])), 5)}), flush=True)


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    theta0 = {(r["seed"], r["domain"]): r["recall@10"] for r in rows
              if r["b"] == r["bh"] == 0 and r["w"] == "0" and r["cap"] is None}
    ratios: dict[tuple, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        ratios[(r["b"], r["bh"], r["w"], r["cap"])][r["domain"]].append(
            r["recall@10"] / theta0[(r["seed"], r["domain"])])
    seeds = sorted({r["seed"] for r in rows})
    print("b      b_h    w      cap  " + "".join(f"{d:24s}" for d in CATALOGS) + f"(Recall@10 x θ₀, seeds {seeds})")
    for (b, b_h, w, cap), per in sorted(ratios.items(), key=lambda kv: -min(np.mean(v) for v in kv[1].values())):
        cells = [interval(per[d]) for d in CATALOGS]
        print(f"{b:<6g} {b_h:<6g} {w:6s} {'∞' if cap is None else cap!s:4s} "
              + "  ".join(f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("seed", type=int)
    run_parser.add_argument("catalogs", nargs="+", choices=CATALOGS)
    sub.add_parser("table").add_argument("path", type=Path)
    args = parser.parse_args()
    run(args.seed, args.catalogs) if args.mode == "run" else table(args.path)


if __name__ == "__main__":
    main()
