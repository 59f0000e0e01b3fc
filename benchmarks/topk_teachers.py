"""MergeRec with dense teachers (the paper) against top-k teachers: objective, merged Recall@10, memory, time.

    python benchmarks/topk_teachers.py [--ks 0,200,50,10] [--seeds 0,1,2] [--items 1500] [--users 1500]
        [--steps 500] [--out results/merge/topk_teachers_synthetic.json]

Three seeded synthetic domains (``fedmerge.data.synthetic``, data seed 0), item text embedded by the hashing
encoder (64-d), sequential family (hidden 64, 2 layers, ≤ ``--epochs`` epochs each from one θ₀). For each
``teacher_top_k`` k (0 = dense) and MergeRec seed: MergeRec layer-wise at the paper's constants (task-arithmetic
init, T = 0.05, c = 1000) with fedmerge's default layer groups (``layer_groups = "family"``: 5 groups; the paper
preset's ``"transformer"`` has 3), then

* ``dense_objective``: the paper's (dense) objective over every pseudo-user at the learned λ - the loss the top-k
  run approximates, measured the same way for every k;
* ``recall@10``: the merged model's test Recall@10 averaged over the domains (unmasked);
* ``teacher_mb`` and the optimization time.

Prints a markdown table (mean ± std over seeds) and writes every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.merging import MergeRecConfig
from fedmerge.merging.mergerec import PseudoUserObjective, mergerec
from fedmerge.metrics import evaluate_scorer
from fedmerge.models import get_family
from fedmerge.text import encode_catalog, get_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="0,200,50,10")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("results/merge/topk_teachers_synthetic.json"))
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    domains = make_synthetic_domains(n_domains=3, n_users=args.users, n_items=args.items, seed=0)
    family = get_family("sequential", hidden=64, n_layers=2, max_epochs=args.epochs)
    encoder = get_encoder("hashing", dim=64)
    features = {d.name: family.item_features(encode_catalog(encoder, d.catalog, cache=False)) for d in domains}
    theta0 = family.initial_weights(int(next(iter(features.values())).shape[-1]), seed=0)
    start = time.perf_counter()
    models = {d.name: family.train(theta0, d, features[d.name], seed=k, progress=False)[0]
              for k, d in enumerate(domains)}
    print(f"trained {len(models)} domains in {time.perf_counter() - start:.0f} s", flush=True)

    def recall(weights: dict) -> float:
        return statistics.mean(evaluate_scorer(family.scorer(weights, features[d.name]), d, "test", ks=(10,),
                                               max_len=family.max_len)["recall@10"] for d in domains)

    dense_objective = PseudoUserObjective(family, theta0, models, features,
                                          MergeRecConfig(granularity="layer", progress=False))
    runs = [{"model": "individual (own domain)", "recall@10": statistics.mean(
        evaluate_scorer(family.scorer(models[d.name], features[d.name]), d, "test", ks=(10,),
                        max_len=family.max_len)["recall@10"] for d in domains)}]
    for k in ks:
        for seed in seeds:
            config = MergeRecConfig(granularity="layer", steps=args.steps, seed=seed, teacher_top_k=k, progress=False)
            merged, report = mergerec(family, theta0, models, features, config)
            lam = torch.tensor([[report.coefficients[d][g] for g in report.groups] for d in report.domains])
            run = {"teacher_top_k": k, "seed": seed, "recall@10": recall(merged),
                   "dense_objective": dense_objective.mean_loss(lam), "final_batch_loss": report.loss_curve[-1],
                   "teacher_mb": report.teacher_bytes / 2**20, "teacher_s": report.teacher_seconds,
                   "optimization_s": report.optimization_seconds}
            runs.append(run)
            print(json.dumps(run), flush=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    print(f"\n3 synthetic domains × {args.items} items / {args.users} users (data seed 0), sequential hidden 64, "
          f"≤ {args.epochs} epochs; MergeRec layer-wise, paper settings, {args.steps} steps, seeds {seeds}; "
          f"{os.cpu_count()} CPUs; {uptime_before} -> {uptime_after}\n")
    print(f"| teacher | dense objective at learned λ | merged Recall@10 | teacher memory | teacher + {args.steps} steps |")
    print("|---|---|---|---|---|")
    for k in ks:
        rows = [r for r in runs if r.get("teacher_top_k") == k]

        def stat(key: str, rows: list = rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}"

        seconds = statistics.mean(r["teacher_s"] + r["optimization_s"] for r in rows)
        print(f"| {'dense' if k == 0 else f'top-{k}'} | {stat('dense_objective')} | {stat('recall@10')} | "
              f"{rows[0]['teacher_mb']:.1f} MB | {seconds:.1f} s |")
    print(f"| individual models (own domain) | | {runs[0]['recall@10']:.4f} | | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "args": {k: str(v) for k, v in vars(args).items()},
                                    "uptime_before": uptime_before, "uptime_after": uptime_after,
                                    "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
