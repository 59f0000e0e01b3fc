"""Public-catalog pretraining measured zero-shot on a held-out Amazon domain: θ₀ against θ₀ trained on brand
pseudo-users (``fedmerge.runners.pretrain``) of the held-out catalog itself and/or of the training catalogs.

    python benchmarks/catalog_pretrain.py --held-out Toys --seed 0 [--source held-out|training|both] [--adapter mlp]

The catalogs are public text, so pretraining on the held-out catalog at test time is still data-isolated: no
interaction of any domain is read. Prints test Recall@10 / NDCG@10 of θ₀ and the pretrained θ₀ on the held-out
domain, and the pretraining's size and time. Data: ``$FEDMERGE_AMAZON_DIR`` or ``data/amazon``.
"""

from __future__ import annotations

import argparse
import json
import time

from fedmerge.config import load_scenario
from fedmerge.runners.client import client_evaluate
from fedmerge.runners.pretrain import pretrained_theta0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", default="Toys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("held-out", "training", "both"), default="held-out")
    parser.add_argument("--adapter", choices=("mlp", "routed"), default="mlp")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cfg = load_scenario("amazon-unseen", [f'data.held_out=["{args.held_out}"]', f"run.seed={args.seed}",
                                          f'model.params.adapter="{args.adapter}"', 'model.params.routed_unseen="none"',
                                          f"model.params.max_epochs={args.epochs}"])
    family = cfg.model.make_family()
    held = cfg.load_domain(args.held_out)
    held_features = cfg.encoder.item_features(held.catalog, family)
    training = {d: cfg.load_catalog(d) for d in cfg.data.training_domains()}
    training_features = {d: cfg.encoder.item_features(c, family) for d, c in training.items()}
    extra = {"catalog_features": list(training_features.values())} if family.init_reads_catalogs else {}
    theta0 = family.initial_weights(held_features.shape[1], args.seed, **extra)
    catalogs, features = {}, []
    if args.source in ("training", "both"):
        catalogs |= training
        features += list(training_features.values())
    if args.source in ("held-out", "both"):
        catalogs[args.held_out] = held.catalog
        features.append(held_features)
    start = time.perf_counter()
    pretrained, info = pretrained_theta0(family, theta0, catalogs, features, cfg.theta0, args.seed)
    info["pretrain_seconds"] = round(time.perf_counter() - start, 1)
    metrics = client_evaluate(held, {"theta0": theta0, "theta0_pretrained": pretrained}, cfg, held_features)
    print(json.dumps({"held_out": args.held_out, "seed": args.seed, "source": args.source, "adapter": args.adapter,
                      "pretraining": info,
                      "test": {m: {k: round(v[k], 4) for k in ("recall@10", "ndcg@10")} for m, v in metrics.items()}},
                     indent=1))


if __name__ == "__main__":
    main()
