"""``fedmerge train``: parse the arguments and train one recommender on one domain with
:func:`fedmerge.runners.indomain.train_and_evaluate` (which writes ``metrics.json``, and weights for families)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmerge.commands import seed
from fedmerge.config import parse_params
from fedmerge.runners.indomain import model_names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one recommender on one domain and evaluate it on test users")
    parser.add_argument("--data", type=Path, required=True, help="domain folder or .tar.gz (Amazon or generic format)")
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(model_names())}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/train/<domain>-<model>)")
    parser.add_argument("--encoder", default="minilm", help="text encoder: minilm, hashing or a model folder")
    parser.add_argument("--seed", type=seed, default=0, help="seed of θ₀ and of training (an integer >= 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="params",
                        help="model parameter, TOML value; a list is a validation grid (lam=[10,50]); repeatable")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier training left in --out first; a non-empty --out is refused "
                        "otherwise, and a folder no fedmerge run held (no .fedmerge.lock) whatever the flags")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fedmerge.runners.indomain import train_and_evaluate

    params = parse_params(args.params)
    report, path = train_and_evaluate(args.model, params, args.data, args.encoder, args.seed, args.out,
                                      overwrite=args.overwrite)
    print(f"{report['domain']} {args.model} {report['hyperparameters']}: test recall@10 {report['recall@10']:.4f} "
          f"ndcg@10 {report['ndcg@10']:.4f} (masked {report['recall@10_masked']:.4f} / "
          f"{report['ndcg@10_masked']:.4f}), {report['users']} users; fit {report['fit_seconds']:.1f}s, "
          f"eval {report['eval_seconds']:.1f}s -> {path}")
    return 0
