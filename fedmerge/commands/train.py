"""``fedmerge train``: train one recommender on one domain and report its test metrics.

In-domain recommenders (popularity, EASE, RLAE, RDLAE, L3AE) select their hyper-parameters on validation and refit
on train + validation; mergeable families (text-lae, sequential) train from θ₀ = ``family.initial_weights(dim,
seed)`` and also write their weights. ``DIR/metrics.json`` holds the test metrics of
:func:`fedmerge.metrics.evaluate_scorer` at its top level, the chosen hyper-parameters and the fit/eval seconds.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.config import parse_params
from fedmerge.errors import FedmergeError
from fedmerge.models import FAMILIES, RECOMMENDERS, get_family, get_recommender

if TYPE_CHECKING:  # numpy, torch and the data stack are imported by the functions that use them (fast --help)
    import numpy as np

    from fedmerge.data.domain import Domain

logger = logging.getLogger(__name__)

MODELS = tuple(RECOMMENDERS) + tuple(FAMILIES)
EMBEDDING_MODELS = ("l3ae", *FAMILIES)
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "weights.safetensors"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one recommender on one domain and evaluate it on test users")
    parser.add_argument("--data", type=Path, required=True, help="domain folder or .tar.gz (Amazon or generic format)")
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/train/<domain>-<model>)")
    parser.add_argument("--encoder", default="minilm", help="text encoder: minilm, hashing or a model folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of θ₀ and of training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="params",
                        help="model parameter, TOML value; a list is a validation grid (lam=[10,50]); repeatable")
    parser.set_defaults(func=run_train)


def item_embeddings(domain: Domain, encoder_name: str) -> np.ndarray:
    """The catalog's text embeddings from the shared on-disk cache (encoded and cached on a miss)."""
    from fedmerge.text import encode_catalog, get_encoder

    return encode_catalog(get_encoder(encoder_name), domain.catalog)


def train_recommender(name: str, params: dict[str, Any], domain: Domain, encoder: str) -> tuple[Any, dict[str, Any]]:
    """Fit an in-domain recommender; returns (scorer, report fields)."""
    model = get_recommender(name, **params)
    embeddings = item_embeddings(domain, encoder) if name in EMBEDDING_MODELS else None
    start = time.perf_counter()
    model.fit(domain, embeddings)
    report = {
        "fit_seconds": time.perf_counter() - start,
        "hyperparameters": getattr(model, "selected", {}),
        "validation": getattr(model, "validation", []),
    }
    return model.score, report


def train_family(
    name: str, params: dict[str, Any], domain: Domain, encoder: str, seed: int, out: Path
) -> tuple[Any, dict[str, Any]]:
    """Train a mergeable family from θ₀, save its weights; returns (scorer, report fields)."""
    import torch

    from fedmerge.storage import save_weights

    family = get_family(name, **params)
    features = family.catalog_features(domain.catalog, lambda: item_embeddings(domain, encoder))
    theta0 = family.initial_weights(features.shape[-1], seed, catalog_features=[features])
    torch.manual_seed(seed)
    start = time.perf_counter()
    weights, info = family.train(theta0, domain, features, seed=seed, progress=True)
    fit_seconds = time.perf_counter() - start
    save_weights(out / WEIGHTS_FILE, weights, metadata={"domain": domain.name, "family": name, "seed": str(seed)})
    report = {"fit_seconds": fit_seconds, "hyperparameters": family.config(), "training": info,
              "weights": str(out / WEIGHTS_FILE)}
    return family.scorer(weights, features), report


def run_train(args: argparse.Namespace) -> int:
    from fedmerge.data import load_domain
    from fedmerge.metrics import evaluate_scorer
    from fedmerge.storage import write_json_atomic

    if args.model not in MODELS:
        raise FedmergeError(f"unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    params = parse_params(args.params)
    domain = load_domain(args.data)
    out = args.out or Path("runs") / "train" / f"{domain.name}-{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    if args.model in FAMILIES:
        scorer, report = train_family(args.model, params, domain, args.encoder, args.seed, out)
    else:
        scorer, report = train_recommender(args.model, params, domain, args.encoder)
    start = time.perf_counter()
    metrics = evaluate_scorer(scorer, domain, split="test")
    report = {**metrics, "domain": domain.name, "model": args.model, "seed": args.seed, "encoder": args.encoder,
              **report, "eval_seconds": time.perf_counter() - start}
    write_json_atomic(out / METRICS_FILE, report)
    print(f"{domain.name} {args.model} {report['hyperparameters']}: test recall@10 {metrics['recall@10']:.4f} "
          f"ndcg@10 {metrics['ndcg@10']:.4f} (masked {metrics['recall@10_masked']:.4f} / "
          f"{metrics['ndcg@10_masked']:.4f}), {metrics['users']} users; fit {report['fit_seconds']:.1f}s, "
          f"eval {report['eval_seconds']:.1f}s -> {out / METRICS_FILE}")
    return 0
