"""What limits user-level DP-SGD's utility (issue 24): the noise, the clipping, the step budget or the weights trained.

DP-SGD adds noise of norm z·C·√d to the summed clipped gradients of the d trained weights (``model.params.trainable``
narrows d), at a budget of epochs fixed by ε's accounting; the non-private reference trains with early stopping.

    python benchmarks/dp_trainable.py [--domain Pantry] [--seed 0] [--epsilon 8] [--dp-epochs 1] [--sample-rate 0.02]
        [--subsets all adapter ...] [--runs non-private dp] [--set model.params.max_epochs=8] [--out rows.jsonl]
    python benchmarks/dp_trainable.py --summary rows.jsonl [more.jsonl ...]

For each named subset of ``model.params.trainable`` (see SUBSETS), on one domain of ``privacy-seq``: the non-private
local training (the scenario's budget, early stopping on validation) and DP-SGD at ε (one release, the scenario's
per-user clip, rate and δ; noise calibrated by the RDP accountant). Printed: test Recall@10 / NDCG@10 of θ₀, of each
model, the trained weight count, the seconds (one JSON line each with ``--out``); ``--epsilon inf`` runs DP-SGD's
clipping without noise. Reads the data through the scenario: set ``FEDMERGE_AMAZON_DIR``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmerge.metrics import evaluate_scorer
from fedmerge.models.sequential import trainable_names
from fedmerge.privacy.dpsgd import UserLevelDP, train_user_level, user_noise_multiplier
from fedmerge.privacy.study import load_study, study_noise_base
from fedmerge.runners.aggregate import interval
from fedmerge.runners.client import noise_seed
from fedmerge.runners.server import initial_weights

SUBSETS: dict[str, list[str] | None] = {
    "all": None,
    "adapter": ["adapter.*"],
    "blocks": ["blocks.*", "final_norm.*", "position.*"],
    "adapter-out": ["adapter.mlp.2.*", "final_norm.*"],
    "biases-norms": ["*.bias", "*norm.*", "*in_proj_bias"],
    "last-block": ["blocks.1.*", "final_norm.*"],
}


def row_label(row: dict[str, Any]) -> str:
    if row["model"] == "theta0":
        return "θ₀"
    if row["model"] == "non-private":
        return f"non-private {row['subset']}, {row['max_epochs']} epochs, lr {row['lr']:g}"
    return (f"DP-SGD ε={row['epsilon']:g} δ={row['delta']:g} C={row['clip']:g} {row['subset']}, "
            f"{row['dp_epochs']:g} epochs, q {row['q']:g}, lr {row['lr']:g}")


LABELLED_OVERRIDES = ("model.params.max_epochs", "model.params.lr")  # --set keys that row_label shows


def summarize(paths: list[str], reference: str = "non-private all, 20 epochs, lr 0.002") -> None:
    """One table per domain and ``--set`` overrides (those the row labels show aside); per model (label of :func:`row_label`): mean test Recall@10
    over seeds, and the per-seed ratios to θ₀ and to ``reference``, each with its 95 % Student-t interval
    (:func:`fedmerge.runners.aggregate.interval`). A row of a later file replaces an earlier one of the same
    domain, overrides, model and seed (a rerun)."""
    tables: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            overrides = [o for o in row.get("overrides", []) if o.partition("=")[0] not in LABELLED_OVERRIDES]
            setting = (row["domain"], " ".join(overrides))
            tables.setdefault(setting, {}).setdefault(row_label(row), {})[row["seed"]] = row["recall@10"]

    def show(values: list[float]) -> str:
        i = interval(values)
        return f"{i['mean']:.4f}" + (f" [{i['low']:.4f}, {i['high']:.4f}]" if i["n"] > 1 else "")

    for (domain, overrides), by in tables.items():
        print(f"\n{domain}{f' (--set {overrides})' if overrides else ''}")
        print(f"{'model':64s} seeds  recall@10  × θ₀  × {reference}")
        for label, values in by.items():
            seeds = sorted(values)

            def ratio(base: str) -> str:
                ref = by.get(base, {})
                return show([values[s] / ref[s] for s in seeds]) if all(s in ref for s in seeds) else "–"

            print(f"{label:64s} {','.join(map(str, seeds)):6s} {show([values[s] for s in seeds])}  {ratio('θ₀')}  "
                  f"{ratio(reference)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="privacy-seq")
    parser.add_argument("--domain", default="Pantry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilon", type=float, default=8.0, help="inf: clipping only (z = 0)")
    parser.add_argument("--dp-epochs", type=float, default=1.0)
    parser.add_argument("--sample-rate", type=float, default=None, help="default: the scenario's privacy.sample_rate")
    parser.add_argument("--lr", type=float, default=None, help="default: the scenario's model lr")
    parser.add_argument("--subsets", nargs="*", default=list(SUBSETS), choices=list(SUBSETS))
    parser.add_argument("--runs", nargs="*", default=["non-private", "dp"], choices=["non-private", "dp"])
    parser.add_argument("--set", action="append", default=[], help="scenario override KEY=VALUE (repeatable)")
    parser.add_argument("--out", default=None, help="append one JSON line per model to this file")
    parser.add_argument("--summary", nargs="+", default=None, metavar="ROWS",
                        help="only summarize the JSON lines of these files over seeds (ratios with t-intervals)")
    args = parser.parse_args()
    if args.summary:
        summarize(args.summary)
        return
    cfg, _ = load_study(args.scenario, [f"run.seed={args.seed}", *args.set])
    domain = cfg.load_domain(args.domain)
    family = cfg.model.make_family()
    features = cfg.encoder.item_features(domain.catalog, family)
    theta0 = initial_weights(cfg)
    privacy = cfg.privacy
    # the noise seed a privacy study (privacy.noise_seed = 0) gives this domain's client at seed S
    study_cell = replace(cfg, privacy=replace(privacy, noise_seed=study_noise_base(0, args.seed)))
    q = args.sample_rate or privacy.sample_rate
    probe = UserLevelDP(0.0, 1.0, q, args.dp_epochs)
    z = user_noise_multiplier(args.epsilon, privacy.delta, q, probe.steps, privacy.accountant)
    settings = UserLevelDP(z, privacy.max_grad_norm, q, args.dp_epochs)
    base = {"domain": args.domain, "seed": args.seed, "machine": platform.node(), "overrides": args.set}

    def report(row: dict[str, Any], weights: dict[str, Any], fam: Any) -> None:
        m = evaluate_scorer(fam.scorer(weights, features), domain, "test")
        row = {**base, **row, "recall@10": m["recall@10"], "ndcg@10": m["ndcg@10"]}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                       if k not in ("machine", "overrides", "val_recall@10")), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    report({"model": "theta0"}, theta0, family)
    for name in args.subsets:
        fam = cfg.model.make_family({"trainable": SUBSETS[name], **({} if args.lr is None else {"lr": args.lr})})
        count = sum(v.numel() for k, v in theta0.items()
                    if SUBSETS[name] is None or k in trainable_names(SUBSETS[name], list(theta0)))
        row = {"subset": name, "trained_weights": count, "lr": fam.lr}
        if "non-private" in args.runs:
            start = time.perf_counter()
            weights, info = fam.train(theta0, domain, features, seed=args.seed, progress=False)
            report({"model": "non-private", **row, "max_epochs": fam.max_epochs, "epochs": info["epochs"],
                    "best_epoch": info["best_epoch"], "seconds": time.perf_counter() - start,
                    "val_recall@10": [c["val_recall@10"] for c in info["curve"]]}, weights, fam)
        if "dp" in args.runs:
            start = time.perf_counter()
            weights, info = train_user_level(fam, theta0, domain, features, settings, seed=args.seed,
                                             noise_seed=noise_seed(study_cell, domain.name, 0))
            report({"model": "dp-sgd", **row, "epsilon": args.epsilon, "delta": privacy.delta, "z": z,
                    "dp_epochs": args.dp_epochs, "steps": settings.steps, "q": q, "clip": privacy.max_grad_norm,
                    "clipped_fraction": info["dp_clipped_fraction"], "seconds": time.perf_counter() - start},
                   weights, fam)


if __name__ == "__main__":
    main()
