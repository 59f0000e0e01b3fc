"""``fedmerge evaluate``: full-ranking metrics of any saved model (client or merged) on any domain."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmerge.checks import MAX_CUTOFF, too_large_cutoffs
from fedmerge.commands.recommend import add_saved_model_options, load_saved_model
from fedmerge.data.domain import SPLITS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="Recall@K/NDCG@K (masked and unmasked; K as the model's run reported) of a saved model on a domain",
        description="Evaluates a model saved by a run (<run>/models/<name>.safetensors or <run>/clients/<domain>"
        ".safetensors, with its .json card) on a domain folder or tarball, with the same full-ranking metrics as "
        "the run (fedmerge.metrics.evaluate_scorer). The domain may be one the model never saw.",
    )
    add_saved_model_options(parser)
    parser.add_argument("--data", type=Path, required=True, help="domain folder or .tar.gz (Amazon or generic format)")
    parser.add_argument("--split", choices=sorted(SPLITS, reverse=True), default=None,
                        help="users' target (default: the split the model's run evaluated, from its card; else test)")
    parser.add_argument("--ks", type=cutoffs, default=None, metavar="K,K,...",
                        help="cut-offs K (default: those the model's run reported, from its card; else 5,10,20,50)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.set_defaults(func=run_evaluate)


def cutoffs(text: str) -> list[int]:
    """An argparse type: ``"5,10"`` -> [5, 10], each K an integer >= 1."""
    try:
        ks = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected cut-offs like 5,10,20, got {text!r}") from None
    if not all(k >= 1 for k in ks):
        raise argparse.ArgumentTypeError(f"every cut-off K must be >= 1, got {text!r}")
    if too_large_cutoffs(ks):
        raise argparse.ArgumentTypeError(f"the largest cut-off is {MAX_CUTOFF}, got {text!r}")
    return ks


def run_evaluate(args: argparse.Namespace) -> int:
    from fedmerge.data import load_domain

    model = load_saved_model(args)
    domain = load_domain(args.data)
    args.split = args.split or model.default_split
    metrics = model.evaluate(domain, split=args.split, ks=args.ks, files=args.data)
    if args.json:
        print(json.dumps({"model": model.name, "domain": domain.name, "split": args.split, "metrics": metrics}))
        return 0
    print(f"{model.name} on {domain.name} ({args.split}, {metrics['users']} users, full ranking over "
          f"{domain.n_items} items)")
    ks = sorted({int(key.split("@")[1]) for key in metrics if key.startswith("recall@") and "_" not in key})
    print(f"{'K':>4}  {'Recall':>8}  {'NDCG':>8}  {'Recall(m)':>9}  {'NDCG(m)':>8}")
    for k in ks:
        print(f"{k:>4}  {metrics[f'recall@{k}']:8.4f}  {metrics[f'ndcg@{k}']:8.4f}  "
              f"{metrics[f'recall@{k}_masked']:9.4f}  {metrics[f'ndcg@{k}_masked']:8.4f}")
    print("(m) = masked: items of the input sequence other than the target removed from the ranking")
    return 0
