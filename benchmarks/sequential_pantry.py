"""Benchmark: train the text-based sequential family on one real Amazon domain (default Pantry) and report.

Prints the validation curve, the time to the best epoch (plateau), and test Recall/NDCG@10 (unmasked and masked).
Item text embeddings come from the shared embedding cache (``fedmerge.text.encode_catalog``; MiniLM by default),
so a warm cache is needed for the run to be cheap.

    nice python benchmarks/sequential_pantry.py                       # Pantry, the family's defaults
    nice python benchmarks/sequential_pantry.py --domain Toys --set hidden=64 --set temperature=0.05
    python benchmarks/sequential_pantry.py --set encoder_layers=2     # CUDA: also tune MiniLM's top 2 layers
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from fedmerge.config import parse_params
from fedmerge.data.amazon import default_amazon_root, load_amazon_domain
from fedmerge.metrics import evaluate_scorer
from fedmerge.models.sequential import SequentialFamily
from fedmerge.text import encode_catalog, get_encoder



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_amazon_root())
    parser.add_argument("--domain", default="Pantry")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="SequentialFamily parameter, TOML value (n_negatives=1024, adapter=\"linear\"); repeatable")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    source = args.data / args.domain
    if not source.is_dir():
        source = args.data / f"{args.domain}.tar.gz"
    domain = load_amazon_domain(source, name=args.domain)
    family = SequentialFamily(**parse_params(args.overrides))
    t0 = time.perf_counter()
    features = family.catalog_features(domain.catalog, lambda: encode_catalog(get_encoder(args.encoder), domain.catalog))
    print(f"{domain.name}: {domain.n_users} users, {domain.n_items} items; item features {tuple(features.shape)} "
          f"in {time.perf_counter() - t0:.1f}s; training on {family.resolved_device()}")
    theta0 = family.initial_weights(features.shape[-1], seed=args.seed, catalog_features=[features])
    weights, info = family.train(theta0, domain, features, seed=args.seed, progress=True)

    print("epoch  loss    val_ndcg@10  val_recall@10  wall_s  cpu_s")
    for row in info["curve"]:
        print(f"{row['epoch']:5d}  {row['loss']:.4f}  {row['val_ndcg@10']:.4f}       {row['val_recall@10']:.4f}"
              f"         {row['seconds']:6.0f}  {row['cpu_seconds']:5.0f}")
    best = info["curve"][info["best_epoch"] - 1]
    plateau = best["seconds"]
    test = evaluate_scorer(family.scorer(weights, features), domain, "test", max_len=family.max_len)
    print(f"best epoch {info['best_epoch']} reached after {plateau:.0f}s wall ({best['cpu_seconds']:.0f}s CPU); "
          f"total {info['train_seconds']:.0f}s wall ({info['train_cpu_seconds']:.0f}s CPU)")
    print(f"test recall@10 {test['recall@10']:.4f}  ndcg@10 {test['ndcg@10']:.4f}  "
          f"masked recall@10 {test['recall@10_masked']:.4f}  ndcg@10 {test['ndcg@10_masked']:.4f}")
    if args.json:
        result = {"domain": domain.name, "config": family.config(), "train": info, "test": test,
                  "seconds_to_best": plateau, "cpu_seconds_to_best": best["cpu_seconds"], "threads": args.threads}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
