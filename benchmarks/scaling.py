"""How fedmerge's cost grows with the number of domains and with catalog size, on seeded synthetic domains.

    python benchmarks/scaling.py [--out results/scaling] [--steps 500] [--top-k 200] [--quick]
        [--sweeps domains,catalog,target,large]

Three tasks, each measured in a fresh subprocess (time, and peak RSS of that process from ``resource.getrusage``,
which includes ≈ 0.3-0.4 GB of imported libraries; ``base_rss_mb`` is the RSS after imports, before any work):

* ``train`` - local training, one epoch (``family.train`` with ``max_epochs=1``) of every domain, one after another
  (what a one-machine simulation pays; each real client pays one domain's share);
* ``mergerec`` - MergeRec layer-wise, ``--steps`` steps from task arithmetic, teacher scores included, with dense
  teachers (the paper, ``teacher_top_k = 0``) and top-k teachers (``--top-k``);
* ``eval`` - every domain evaluates 3 models (:func:`fedmerge.runners.client.client_evaluate`).

Sweeps: domains D ∈ {2, 4, 8, 16} of 2,000 items and 1,000 users each; catalog size n ∈ {1,000, 2,000, 4,000,
8,000} items (2,000 users each) with 4 domains for MergeRec and 1 for training and evaluation; ``target``: MergeRec with
8 domains of 4,000 items (Σ n_d = 32k, about the ``amazon-8`` scenario's 29k), dense and top-k - the issue's
target is ≤ 120 s and ≤ 4 GB on 2 cores; ``large`` (not in the default sweeps): evaluation of 3 models, then 9, on
one domain of 35,598 users × 18,357 items (the size of the issue's larger Amazon domain), against evaluation on
2,000 users × 2,000 items - bounded memory means the peak does not grow with users or models. Client models are θ₀ plus
seeded noise (costs do not depend on what was learned); item features are seeded random 64-d embeddings (text
encoding is not measured here). Sequential family at its Amazon defaults (hidden 128, 2 layers, MLP adapter 512,
max_len 50), one torch thread. Writes ``scaling.json`` and ``domains.png`` / ``catalog.png`` under ``--out``, with
``uptime`` before and after (the machine's load) and the CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DOMAINS = (2, 4, 8, 16)
CATALOGS = (1000, 2000, 4000, 8000)
DOMAIN_SWEEP_ITEMS, DOMAIN_SWEEP_USERS = 2000, 1000
FEATURE_DIM = 64
EVAL_MODELS = 3
TARGET_ITEMS = 4000
LARGE_DOMAIN = (18357, 35598)  # items, users
CATALOG_SWEEP_USERS = 2000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(task: str, n_domains: int, n_items: int, n_users: int, steps: int, top_k: int,
            models: int = EVAL_MODELS) -> dict[str, Any]:
    """One measurement in this process (called in a fresh subprocess by :func:`run_one`)."""
    import torch

    from fedmerge.config import load_scenario
    from fedmerge.data.synthetic import make_synthetic_domains
    from fedmerge.merging import MergeRecConfig
    from fedmerge.merging.mergerec import mergerec
    from fedmerge.models import get_family
    from fedmerge.runners.client import client_evaluate

    torch.set_num_threads(1)
    domains = make_synthetic_domains(n_domains=n_domains, n_users=n_users, n_items=n_items, seed=0, max_len=30)
    family = get_family("sequential", max_epochs=1)
    gen = torch.Generator().manual_seed(0)
    features = {d.name: family.item_features(torch.nn.functional.normalize(
        torch.randn(d.n_items, FEATURE_DIM, generator=gen), dim=1).numpy()) for d in domains}
    dim = int(next(iter(features.values())).shape[-1])
    theta0 = family.initial_weights(dim, seed=0)

    def noisy(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {p: t + 0.02 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                for p, t in theta0.items()}

    base = peak_rss_mb()
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if task == "train":
        for k, domain in enumerate(domains):
            family.train(theta0, domain, features[domain.name], seed=k, progress=False)
    elif task == "mergerec":
        models = {d.name: noisy(k + 1) for k, d in enumerate(domains)}
        config = MergeRecConfig(granularity="layer", steps=steps, teacher_top_k=top_k, progress=False)
        _, report = mergerec(family, theta0, models, features, config)
        extra = {"teacher_s": round(report.teacher_seconds, 2), "teacher_mb": round(report.teacher_bytes / 2**20, 1)}
    elif task == "eval":
        cfg = load_scenario("quickstart", ["eval.ks=[10]", "model.params={max_epochs = 1}"])
        evaluated = {f"model{k}": noisy(100 + k) for k in range(models)}
        for domain in domains:
            client_evaluate(domain, evaluated, cfg, features=features[domain.name])
    else:
        raise SystemExit(f"unknown task {task!r}; valid: train, mergerec, eval")
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(peak_rss_mb()),
            "base_rss_mb": round(base), **extra}


def run_one(task: str, n_domains: int, n_items: int, n_users: int, steps: int, top_k: int,
            models: int = EVAL_MODELS) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process, so each peak RSS is that measurement's own."""
    spec = {"task": task, "n_domains": n_domains, "n_items": n_items, "n_users": n_users, "steps": steps,
            "top_k": top_k, "models": models}
    from fedmerge.paths import importable_env

    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          env=importable_env())
    if proc.returncode != 0:
        raise SystemExit(f"measurement {spec} failed:\n{proc.stderr[-3000:]}")
    row = {**spec, "sum_items": n_domains * n_items, **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)
    return row


def plot(rows: list[dict[str, Any]], sweep: str, x_key: str, x_label: str, path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["task"], r["top_k"]) for r in rows if r["sweep"] == sweep})
    for task, top_k in series:
        points = sorted((r[x_key], r["seconds"], r["peak_rss_mb"]) for r in rows
                        if r["sweep"] == sweep and (r["task"], r["top_k"]) == (task, top_k))
        label = task if task != "mergerec" else f"mergerec ({'dense' if not top_k else f'top-{top_k}'})"
        xs = [p[0] for p in points]
        axes[0].plot(xs, [p[1] for p in points], marker="o", label=label)
        axes[1].plot(xs, [p[2] / 1024 for p in points], marker="o", label=label)
    for ax, ylabel in zip(axes, ("seconds", "peak RSS of the process (GiB)")):
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/scaling"))
    parser.add_argument("--steps", type=int, default=500, help="MergeRec steps")
    parser.add_argument("--top-k", type=int, default=200, help="teacher_top_k of the sparse MergeRec runs")
    parser.add_argument("--quick", action="store_true", help="two points per sweep (a smoke run)")
    parser.add_argument("--sweeps", default="domains,catalog,target", help="which sweeps, comma-separated")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure(**spec)))
        return

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime_before}; {os.cpu_count()} CPUs", flush=True)
    domain_counts, catalogs = (DOMAINS[:2], CATALOGS[:2]) if args.quick else (DOMAINS, CATALOGS)
    start = time.perf_counter()
    sweeps = {s.strip() for s in args.sweeps.split(",") if s.strip()}
    if not sweeps or sweeps - {"domains", "catalog", "target", "large"}:
        raise SystemExit(f"--sweeps: unknown {sorted(sweeps - {'domains', 'catalog', 'target', 'large'})}; valid: "
                         "domains, catalog, target, large")
    rows = []
    for d in domain_counts if "domains" in sweeps else ():
        for task, top_k in (("train", 0), ("eval", 0), ("mergerec", args.top_k)):
            rows.append({"sweep": "domains", **run_one(task, d, DOMAIN_SWEEP_ITEMS, DOMAIN_SWEEP_USERS, args.steps,
                                                       top_k)})
    for n in catalogs if "catalog" in sweeps else ():
        for task, d, top_k in (("train", 1, 0), ("eval", 1, 0), ("mergerec", 4, args.top_k), ("mergerec", 4, 0)):
            rows.append({"sweep": "catalog", **run_one(task, d, n, CATALOG_SWEEP_USERS, args.steps, top_k)})
    for top_k in (args.top_k, 0) if "target" in sweeps else ():
        rows.append({"sweep": "target", **run_one("mergerec", 8, TARGET_ITEMS, DOMAIN_SWEEP_USERS, args.steps, top_k)})
    for (n_items, n_users), models in (((2000, 2000), EVAL_MODELS), (LARGE_DOMAIN, EVAL_MODELS),
                                        (LARGE_DOMAIN, 3 * EVAL_MODELS)) if "large" in sweeps else ():
        rows.append({"sweep": "large", **run_one("eval", 1, n_items, n_users, args.steps, 0, models)})
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    wall = time.perf_counter() - start
    note = (f"synthetic domains, seed 0, one run per point, {os.cpu_count()} CPUs, 1 torch thread; "
            f"load: {uptime_before.split('load average:')[-1].strip()} -> "
            f"{uptime_after.split('load average:')[-1].strip()}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({
        "rows": rows, "uptime_before": uptime_before, "uptime_after": uptime_after, "cpus": os.cpu_count(),
        "wall_s": round(wall, 1), "steps": args.steps, "top_k": args.top_k,
        "domain_sweep": {"items": DOMAIN_SWEEP_ITEMS, "users": DOMAIN_SWEEP_USERS}}, indent=2) + "\n")
    if "domains" in sweeps:
        plot(rows, "domains", "n_domains", f"domains ({DOMAIN_SWEEP_ITEMS:,} items, {DOMAIN_SWEEP_USERS:,} users each)",
             args.out / "domains.png", note)
    if "catalog" in sweeps:
        plot(rows, "catalog", "n_items", f"items per domain ({CATALOG_SWEEP_USERS:,} users; MergeRec: 4 domains)",
             args.out / "catalog.png", note)
    print(f"done in {wall:.0f} s; uptime after: {uptime_after}")


if __name__ == "__main__":
    main()
