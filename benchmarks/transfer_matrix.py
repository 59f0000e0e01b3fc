"""Cross-domain transfer of individually trained models: each source domain's model evaluated on every target domain.

    python benchmarks/transfer_matrix.py --sources Pantry --family-set max_epochs=6 --proximal-mu 0,0.0001,0.001,0.01

Every source model is trained from the same seeded θ₀ (``family.train``, cached under ``<cache>/merge_amazon/`` with
the merge benchmark's keys, so its models are reused) once per proximal coefficient μ (FedProx's μ/2·‖θ − θ₀‖²,
the family's ``proximal_mu``). Prints test Recall@10 / NDCG@10 (unmasked) of θ₀ and of every (μ, source) model on
every target, and the squared task-vector norm ‖τ‖² = ‖θ − θ₀‖². A model below θ₀ outside its own domain is
negative transfer: what a merge of several domains' task vectors has to undo.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from fedmerge.config import parse_params
from fedmerge.data import load_domain
from fedmerge.data.amazon import default_amazon_root
from fedmerge.models import get_family
from fedmerge.validation import task_vector_norm
from fedmerge.text import default_cache_root, encode_catalog, get_encoder
from merge_amazon import evaluate, locate, trained_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sequential", choices=["sequential", "text-lae"])
    parser.add_argument("--sources", default="Beauty,Pantry,Toys", help="domains whose models are trained")
    parser.add_argument("--targets", default="Beauty,Pantry,Toys", help="domains every model is evaluated on")
    parser.add_argument("--proximal-mu", default="0", help="comma-separated μ values (sequential family)")
    parser.add_argument("--data", type=Path, default=None, help="folder with <Domain>/ or <Domain>.tar.gz")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--cache", type=Path, default=None, help="trained-weight cache (default: the merge benchmark's)")
    parser.add_argument("--family-set", action="append", default=[], metavar="KEY=VALUE",
                        help="family constructor parameter (TOML value), e.g. max_epochs=6 (default: the family's epochs + early stopping); repeatable")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    sources = [n.strip() for n in args.sources.split(",") if n.strip()]
    targets = [n.strip() for n in args.targets.split(",") if n.strip()]
    mus = [float(v) for v in args.proximal_mu.split(",")]
    root = args.data or default_amazon_root()
    cache = args.cache or default_cache_root().parent / "merge_amazon"
    params = parse_params(args.family_set, "--family-set")
    if "proximal_mu" in params:
        raise SystemExit("give μ with --proximal-mu, not --family-set proximal_mu=...")
    encoder = get_encoder(args.encoder)
    domains = {n: load_domain(locate(root, n), name=n) for n in dict.fromkeys(sources + targets)}
    family = get_family(args.family, **params)
    features = {n: family.catalog_features(d.catalog, lambda d=d: encode_catalog(encoder, d.catalog))
                for n, d in domains.items()}
    theta0 = family.initial_weights(int(next(iter(features.values())).shape[-1]), seed=args.seed,
                                    catalog_features=[features[n] for n in sources])

    lines = ["| model | ‖τ‖² | " + " | ".join(f"{t} R@10 / N@10" for t in targets) + " |",
             "|---" * (len(targets) + 2) + "|"]

    def row(label: str, weights: dict, tau2: str) -> None:
        cells = [evaluate(family, weights, domains[t], features[t]) for t in targets]
        lines.append(f"| {label} | {tau2} | " + " | ".join(f"{r:.4f} / {n:.4f}" for r, n in cells) + " |")
        logging.info(lines[-1])

    row("θ₀", theta0, "0")
    for mu in mus:
        trained_family = get_family(args.family, **{**params, **({"proximal_mu": mu} if mu else {})})
        for source in sources:
            weights, summary = trained_weights(trained_family, theta0, domains[source], features[source], cache,
                                               args.seed)
            tau2 = task_vector_norm(theta0, weights) ** 2
            row(f"{source} (μ = {mu:g}, {summary.get('epochs', '?')} epochs)", weights, f"{tau2:.0f}")
    theta0_norm2 = task_vector_norm({k: torch.zeros_like(t) for k, t in theta0.items()}, theta0) ** 2
    lines += ["", f"- ‖θ₀‖² = {theta0_norm2:.0f} (seed {args.seed})",
              f"- family `{args.family}` settings: `{params}`; torch threads {torch.get_num_threads()}",
              f"- arguments: `{' '.join(sys.argv[1:])}`"]
    text = "\n".join(lines)
    print(text)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
