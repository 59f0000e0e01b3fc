"""Benchmark: epoch time and quality of the sequential family's training variants on one real Amazon domain.

Every variant (a name and :class:`~fedmerge.models.sequential.SequentialFamily` overrides) is trained from the same
θ₀ for the same epoch budget, once per seed, all in this one process and interleaved seed by seed (seed 0: every
variant, then seed 1, ...), so a shared machine's load hits them alike. Per run: the mean wall time of an epoch's
optimizer steps (validation excluded, curve key ``step_seconds``), validation NDCG@10 of the returned (best)
epoch, and test NDCG@10 / Recall@10. Per variant over the seeds: mean and 95 % Student-t interval
(:func:`fedmerge.runners.aggregate.interval`) of each, and of the per-seed epoch-time ratio and NDCG difference to
the first variant (paired: same seed, same θ₀).

    FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon nice python benchmarks/train_speed.py --domain Beauty \\
        --variant full: --variant sampled-uniform:n_negatives=1024 \\
        --variant sampled-popularity:n_negatives=1024,negative_sampling=\\"popularity\\" --seeds 0 1 2 \\
        --json results/speed/beauty.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmerge.config import parse_params
from fedmerge.data.amazon import default_amazon_root, load_amazon_domain
from fedmerge.metrics import evaluate_scorer
from fedmerge.models.sequential import SequentialFamily
from fedmerge.runners.aggregate import interval
from fedmerge.text import encode_catalog, get_encoder


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` (TOML values) -> (name, overrides); ``name:`` is the family's defaults."""
    name, _, settings = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value,... (NAME: for the defaults)")
    return name, parse_params([s for s in settings.split(",") if s])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_amazon_root())
    parser.add_argument("--domain", default="Beauty")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,...; the first is the reference")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="parameter of every variant (default: max_epochs=3, the amazon scenarios' budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (validation; steps run on one)")
    parser.add_argument("--json", type=Path, help="also write every run and the summary to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    source = args.data / args.domain
    domain = load_amazon_domain(source if source.is_dir() else args.data / f"{args.domain}.tar.gz", name=args.domain)
    common = {"max_epochs": 3, **parse_params(args.overrides)}
    variants = dict(parse_variant(v) for v in args.variant)
    families = {name: SequentialFamily(**{**common, **params}) for name, params in variants.items()}
    reference = next(iter(families.values()))
    features = reference.catalog_features(domain.catalog,
                                          lambda: encode_catalog(get_encoder(args.encoder), domain.catalog))
    print(f"{domain.name}: {domain.n_users} users, {domain.n_items} items; load {os.getloadavg()[0]:.1f}", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in families}
    for seed in args.seeds:
        theta0 = reference.initial_weights(features.shape[-1], seed=seed, catalog_features=[features])
        for name, family in families.items():
            load = os.getloadavg()[0]
            weights, info = family.train(theta0, domain, features, seed=seed, progress=False)
            test = evaluate_scorer(family.scorer(weights, features), domain, "test", max_len=family.max_len)
            run = {"seed": seed, "epoch_seconds": float(np.mean([r["step_seconds"] for r in info["curve"]])),
                   "val_ndcg@10": info["best_val_ndcg@10"], "test_ndcg@10": test["ndcg@10"],
                   "test_recall@10": test["recall@10"], "best_epoch": info["best_epoch"], "epochs": info["epochs"],
                   "load_before": load, "load_after": os.getloadavg()[0], "curve": info["curve"]}
            runs[name].append(run)
            print(f"seed {seed} {name:>20}: epoch {run['epoch_seconds']:6.1f} s  val ndcg@10 {run['val_ndcg@10']:.4f}"
                  f"  test ndcg@10 {run['test_ndcg@10']:.4f} recall@10 {run['test_recall@10']:.4f}"
                  f"  (best epoch {run['best_epoch']}, load {load:.1f} -> {run['load_after']:.1f})", flush=True)

    base = runs[next(iter(runs))]
    summary: dict[str, Any] = {}
    for name, found in runs.items():
        summary[name] = {key: interval([r[key] for r in found])
                         for key in ("epoch_seconds", "val_ndcg@10", "test_ndcg@10", "test_recall@10")}
        summary[name]["epoch_time_ratio"] = interval([r["epoch_seconds"] / b["epoch_seconds"] for r, b in zip(found, base)])
        for key in ("val_ndcg@10", "test_ndcg@10"):
            summary[name][f"{key}_minus_reference"] = interval([r[key] - b[key] for r, b in zip(found, base)])

    def show(stat: dict[str, Any], digits: int) -> str:
        half = "" if stat["half_width"] is None else f" ± {stat['half_width']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}{half}"

    print(f"\nmean ± 95 % t-interval over seeds {args.seeds}; reference: {next(iter(runs))}")
    print("variant               epoch s        ratio          val ndcg@10      test ndcg@10     Δ val ndcg@10")
    for name, s in summary.items():
        print(f"{name:20}  {show(s['epoch_seconds'], 1):13}  {show(s['epoch_time_ratio'], 3):13}  "
              f"{show(s['val_ndcg@10'], 4):15}  {show(s['test_ndcg@10'], 4):15}  {show(s['val_ndcg@10_minus_reference'], 4)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "threads": args.threads}
        configs = {name: family.config() for name, family in families.items()}
        args.json.write_text(json.dumps({"domain": domain.name, "seeds": args.seeds, "machine": machine,
                                         "configs": configs, "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
