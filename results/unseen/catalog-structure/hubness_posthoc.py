"""Issue 23: the text-hubness offset on trained models, post hoc on saved ``amazon-unseen`` runs.

    python results/unseen/catalog-structure/hubness_posthoc.py RUN_DIR [RUN_DIR ...] > hubness_posthoc.jsonl
    python results/unseen/catalog-structure/hubness_posthoc.py --table hubness_posthoc.jsonl

What a learned offset ``β · h(i)`` would reach, h the z-scored mean cosine of item i to its 50 nearest catalog
neighbours (from the model's own item features, so any catalog has it): each training client picks β on its own
validation users with its own saved model (``clients/<domain>``; grid ``BETAS``, best Recall@10, the smallest |β|
among equals), the held-out catalog gets the clients' mean, and every saved model of the run is scored on the
held-out test users without and with it. Data-isolated: a client ships one number; the held-out catalog is used only
through its public text. Each run prints one JSON line: the picked β and every model's Recall@10 / NDCG@10 × θ₀
(θ₀ without the offset, as the result tables), without and with. ``--table``: those lines as mean over seeds [95 %
t-interval] per held-out domain and model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedmerge.config import load_scenario
from fedmerge.data.domain import Domain
from fedmerge.metrics import counts_with_mask, evaluation_batches, metrics_from_ties, tie_inputs
from fedmerge.recommender import LoadedRecommender, load_recommender
from fedmerge.runners.aggregate import interval

BETAS = (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.5, -1.0, -2.0)
METRICS = ("recall@10", "ndcg@10")


def hubness(features: np.ndarray, k: int = 50, chunk: int = 2048) -> np.ndarray:
    """Per item, the z-scored mean cosine to its ``k`` nearest other items (chunks of ``chunk`` rows in memory)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    out = np.empty(len(unit))
    for start in range(0, len(unit), chunk):
        sims = unit[start : start + chunk] @ unit.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start : start + chunk] = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
    return (out - out.mean()) / out.std()


def metrics_per_beta(model: LoadedRecommender, domain: Domain, split: str, h: np.ndarray,
                     betas: tuple[float, ...]) -> dict[float, dict[str, float]]:
    """Unmasked Recall@K / NDCG@K (exact expected ties) of ``model`` + β·h for each β, scoring each batch once."""
    model = model.for_domain(domain.name)
    score = model.family.scorer(model.weights, model.features(domain.catalog))
    parts: dict[float, list] = {b: [] for b in betas}
    for batch in evaluation_batches(domain, split, max_len=model.family.max_len):
        scores = np.asarray(score(batch.inputs), dtype=np.float64)
        for b in betas:
            parts[b].append(tie_inputs(counts_with_mask(scores + b * h[None, :], batch.targets, None)[0], "expected"))
    return {b: metrics_from_ties(*(np.concatenate(c) for c in zip(*p))) for b, p in parts.items()}


def score_run(run: Path, scenario, domains: dict[str, Domain], hub: dict[str, np.ndarray]) -> dict:
    results = json.loads((run / "results.json").read_text())
    held = results["held_out"][0]

    def features_of(name: str, model: LoadedRecommender) -> np.ndarray:
        if name not in domains:
            domains[name] = scenario.load_domain(name)
            hub[name] = hubness(model.features(domains[name].catalog).numpy())
        return hub[name]

    picked = {}
    for path in sorted((run / "clients").glob("*.safetensors")):
        client = load_recommender(path)
        h = features_of(path.stem, client)
        m = metrics_per_beta(client, domains[path.stem], "val", h, BETAS)
        picked[path.stem] = max(BETAS, key=lambda b: (m[b]["recall@10"], -abs(b)))
    beta = float(np.mean(list(picked.values())))
    theta0 = load_recommender(run / "models" / "theta0.safetensors")
    h = features_of(held, theta0)
    base = metrics_per_beta(theta0, domains[held], "test", h, (0.0,))[0.0]
    models = {}
    for path in sorted((run / "models").glob("*.safetensors")) + sorted((run / "clients").glob("*.safetensors")):
        name = path.stem.removesuffix(f"_{held}") if path.parent.name == "models" else f"individual_{path.stem}"
        if name != "theta0":
            m = metrics_per_beta(load_recommender(path), domains[held], "test", h, (0.0, beta))
            models[name] = {k: [round(m[0.0][k] / base[k], 4), round(m[beta][k] / base[k], 4)] for k in METRICS}
    return {"run": str(run), "held_out": held, "seed": results["run"]["seed"], "picked": picked, "beta": beta,
            "theta0": {k: round(base[k], 4) for k in METRICS}, "x_theta0_without_with": models}


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for held in sorted({r["held_out"] for r in rows}):
        group = [r for r in rows if r["held_out"] == held]
        print(f"{held} held out, seeds {sorted(r['seed'] for r in group)}, β {[round(r['beta'], 3) for r in group]}")
        for name in group[0]["x_theta0_without_with"]:
            cells = []
            for k in METRICS:
                pairs = [r["x_theta0_without_with"][name][k] for r in group]
                without, with_ = interval([p[0] for p in pairs]), interval([p[1] for p in pairs])
                gain = interval([p[1] / p[0] for p in pairs])
                cells.append(f"{k} × θ₀ {without['mean']:.3f} → {with_['mean']:.3f} [{with_['low']:.3f}, "
                             f"{with_['high']:.3f}] (with × without {gain['mean']:.3f} [{gain['low']:.3f}, {gain['high']:.3f}])")
            print(f"  {name:20s} " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with --table: one JSON-lines file)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        table(args.runs[0])
        return
    scenario, domains, hub = load_scenario("amazon-unseen"), {}, {}
    for run in args.runs:
        print(json.dumps(score_run(run, scenario, domains, hub)), flush=True)


if __name__ == "__main__":
    main()
