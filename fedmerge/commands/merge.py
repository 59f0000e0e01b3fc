"""``fedmerge merge``: merge saved client weights (safetensors) with a training-free method of the registry."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmerge.config import parse_assignments, parse_params


def describe() -> str:
    """The methods and their parameter defaults (from the torch-free merging registry; computed only for --help)."""
    from fedmerge.merging import describe_methods

    methods = ", ".join(f"{m['name']} ({', '.join(f'{k}={v}' for k, v in m['params'].items())})" for m in describe_methods())
    return f"Methods and their parameter defaults: {methods}."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge client weight files (safetensors) with a training-free method", description=describe,
    )
    parser.add_argument("--theta0", type=Path, required=True, help="shared initial weights θ₀ (.safetensors)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FILE", help="client weights, one per domain")
    parser.add_argument("--method", required=True, help="merge method (see above; an unknown name lists the valid ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="params",
                        help="method parameter (TOML value, e.g. density=0.2, or weights=[2,1]: one per --models entry, in "
                             "that order); repeatable")
    parser.add_argument("--out", type=Path, required=True, help="merged weights (.safetensors); a new file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input file)")
    parser.add_argument("--include-rejected", action="store_true",
                        help="merge a model whose card says the run rejected it (refused otherwise)")
    parser.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from fedmerge.merging.files import merge_weight_files

    models = parse_assignments(args.models, "--models entry")
    params = parse_params(args.params)
    merge_weight_files(args.method, args.theta0, models, params, args.out, overwrite=args.overwrite,
                       include_rejected=args.include_rejected)
    from fedmerge.recommender import card_path

    card = card_path(args.out)
    print(f"merged {len(models)} models ({', '.join(models)}) with {args.method} {params or ''} -> {args.out}"
          + (f" (card {card}: fedmerge evaluate / recommend take it)" if card.is_file() else
             " (θ₀ has no model card, so neither has the merge)"))
    return 0
