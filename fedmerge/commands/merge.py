"""``fedmerge merge``: merge saved client weights (safetensors) with a training-free method of the registry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmerge.config import parse_assignments, parse_params
from fedmerge.errors import FedmergeError


def describe() -> str:
    """The methods and their parameter defaults (imports the merging registry, hence torch: only for --help)."""
    from fedmerge.merging import METHODS

    methods = ", ".join(f"{m.name} ({', '.join(f'{k}={p.default}' for k, p in m.params.items())})" for m in METHODS.values())
    return f"Methods and their parameter defaults: {methods}."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge client weight files (safetensors) with a training-free method", description=describe,
    )
    parser.add_argument("--theta0", type=Path, required=True, help="shared initial weights θ₀ (.safetensors)")
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=FILE", help="client weights, one per domain")
    parser.add_argument("--method", required=True, help="merge method (see above; an unknown name lists the valid ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="params",
                        help="method parameter (TOML value, e.g. density=0.2, weights=[2,1]); repeatable")
    parser.add_argument("--out", type=Path, required=True, help="merged weights (.safetensors)")
    parser.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from fedmerge.merging import get_method, merge
    from fedmerge.storage import load_weights, save_weights

    try:
        get_method(args.method)  # before reading any weights
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    model_files = parse_assignments(args.models, "--models entry")
    params = parse_params(args.params)
    theta0 = load_weights(args.theta0)
    models = {name: load_weights(Path(file)) for name, file in model_files.items()}
    try:
        merged = merge(args.method, theta0, models, **params)
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    metadata = {"method": args.method, "params": json.dumps(params), "models": json.dumps(list(models))}
    save_weights(args.out, merged, metadata=metadata)
    print(f"merged {len(models)} models ({', '.join(models)}) with {args.method} {params or ''} -> {args.out}")
    return 0
