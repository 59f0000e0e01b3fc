"""The routed adapter's unseen-item fallback on a held-out domain: how many items it catches, and what it changes.

    python benchmarks/unseen_fallback.py share --data-root DIR --held-out Toys [--experts 16] [--seed 0]
    python benchmarks/unseen_fallback.py ablate RUN_DIR [--mix T ...] [--models NAME ...]

``share``: for θ₀'s router clustered from the other Amazon domains' public catalogs, the fraction of each domain's
items whose nearest-centroid similarity falls below the q-quantile of the training catalogs' items (the items the
fallback sends to the frozen θ₀ expert with ``routed_unseen_quantile = q``). No training.

``ablate``: every saved model of a ``fedmerge simulate`` run made with ``routed_unseen="theta0"`` (``RUN_DIR/models``
and ``RUN_DIR/clients``), evaluated on the run's held-out domain(s) as saved (fallback) and with the fallback removed
(its θ₀ expert and threshold dropped: every item goes to its nearest expert), and with ``--mix T`` as
``routed_unseen="mix"`` at ``routed_mix_temperature=T`` (same weights: far items get the similarity-weighted mix of
the experts and the θ₀ expert). ``--models`` keeps only the named models (e.g. ``theta0 task_arithmetic
individual_Pantry``). Test Recall@10 / NDCG@10. A post-hoc look: in a run made with ``"mix"`` the training catalogs'
far items are mixed during training and MergeRec learns its coefficients with the mix.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.models.sequential import catalog_clusters, nearest_similarity
from fedmerge.runners.client import client_evaluate
from fedmerge.scenario import Scenario
from fedmerge.storage import load_weights

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25)
FALLBACK_KEYS = ("adapter.base.", "adapter.unseen_threshold")


def unseen_share(data_root: str, held_out: str, experts: int, seed: int) -> dict[float, dict[str, float]]:
    """{q: {domain: share of its items below the q-quantile of the training items' nearest similarity}}."""
    cfg = load_scenario("amazon-unseen", [f"data.root={data_root}", f'data.held_out=["{held_out}"]',
                                          'model.params.adapter="routed"', f"model.params.n_experts={experts}"])
    family = cfg.model.make_family()
    raw = {d: cfg.encoder.item_features(cfg.load_catalog(d), family) for d in cfg.data.domain_names()}
    half = next(iter(raw.values())).shape[1] // 2
    raw = {d: f[:, half:] for d, f in raw.items()}
    training = torch.cat([raw[d] for d in raw if d != held_out])
    centre, centroids = catalog_clusters(training.numpy(), experts, seed)
    similarity = {d: nearest_similarity(r, centre, centroids) for d, r in raw.items()}
    reference = torch.cat([similarity[d] for d in raw if d != held_out])
    return {q: {d: round(float((s < torch.quantile(reference, q)).float().mean()), 3) for d, s in similarity.items()}
            for q in QUANTILES}


def ablate(
    run_dir: Path, mix_temperatures: Sequence[float] = (), keep: Sequence[str] = ()
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{held-out domain: {model: {"fallback" | "nearest" | "mix T": [recall@10, ndcg@10]}}}."""
    cfg = Scenario.from_mapping(json.loads((run_dir / "results.json").read_text())["config"])
    variants = [("fallback", cfg), ("nearest", apply_overrides(cfg, ['model.params.routed_unseen="none"']))]
    variants += [(f"mix {t:g}", apply_overrides(cfg, ['model.params.routed_unseen="mix"',
                                                      f"model.params.routed_mix_temperature={t}"]))
                 for t in mix_temperatures]
    paths = {p.stem: p for p in sorted((run_dir / "models").glob("*.safetensors"))}
    paths |= {f"individual_{p.stem}": p for p in sorted((run_dir / "clients").glob("*.safetensors"))}
    if keep:
        paths = {name: path for name, path in paths.items() if name in keep}
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for held in cfg.data.held_out:
        domain = cfg.load_domain(held)
        for tag, run_cfg in variants:
            models = {name: load_weights(path) for name, path in paths.items()}
            if tag == "nearest":
                models = {name: {k: v for k, v in w.items() if not k.startswith(FALLBACK_KEYS)}
                          for name, w in models.items()}
            features = run_cfg.encoder.item_features(domain.catalog, run_cfg.model.make_family())
            for name, metrics in client_evaluate(domain, models, run_cfg, features).items():
                out.setdefault(held, {}).setdefault(name, {})[tag] = [round(metrics["recall@10"], 4),
                                                                      round(metrics["ndcg@10"], 4)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    share = sub.add_parser("share")
    share.add_argument("--data-root", required=True)
    share.add_argument("--held-out", required=True)
    share.add_argument("--experts", type=int, default=16)
    share.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("ablate")
    run.add_argument("run_dir", type=Path)
    run.add_argument("--mix", type=float, nargs="*", default=[], help="routed_mix_temperature values to evaluate")
    run.add_argument("--models", nargs="*", default=[], help="evaluate only these saved models")
    args = parser.parse_args()
    if args.command == "share":
        print(json.dumps(unseen_share(args.data_root, args.held_out, args.experts, args.seed), indent=1))
    else:
        print(json.dumps(ablate(args.run_dir, args.mix, args.models), indent=1))


if __name__ == "__main__":
    main()
