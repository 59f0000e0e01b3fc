"""Benchmark: peak memory of one process training the sequential family on a real Amazon domain, per variant.

Each variant (``NAME:key=value,...`` family overrides, as in ``benchmarks/train_speed.py``) trains in a fresh
subprocess from the same seeded θ₀ for ``--epochs`` epochs (validation included) while a thread samples the
process's proportional set size (PSS, /proc/self/smaps_rollup) every 10 ms. Printed per variant: PSS before
training (imports, domain, cached embeddings), the peak during training and the peak's growth over that baseline,
the mean seconds of an epoch's optimizer steps and the validation NDCG@10 of the returned epoch. Variants run one
after another: compare memory freely, but times only as ratios within one invocation on a quiet machine.

    FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon python benchmarks/train_memory.py --domain Beauty \\
        --variant whole:n_negatives=1024 --variant micro128:n_negatives=1024,micro_batch_size=128 \\
        --json results/speed/train_memory_beauty.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedmerge.memory import pss_bytes
from fedmerge.storage import write_json_atomic


def pss_gib() -> float:
    """This process's PSS in GiB (Linux)."""
    return pss_bytes() / 2**30


def train_once(data: Path, domain_name: str, overrides: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """Train one variant in this process and report its memory (the subprocess side of :func:`main`)."""
    import torch

    from fedmerge.data.amazon import load_amazon_domain
    from fedmerge.models.sequential import SequentialFamily
    from fedmerge.text import encode_catalog, get_encoder

    torch.set_num_threads(1)
    source = data / f"{domain_name}.tar.gz"
    domain = load_amazon_domain(source if source.exists() else data / domain_name, domain_name)
    family = SequentialFamily(**{**overrides, "max_epochs": epochs, "patience": epochs})
    features = family.item_features(encode_catalog(get_encoder("minilm"), domain.catalog))
    theta0 = family.initial_weights(features.shape[1], seed=seed)
    baseline, peak, done = pss_gib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], pss_gib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, metrics = family.train(theta0, domain, features, seed=seed, progress=False)
    done.set()
    sampler.join()
    curve = metrics["curve"]
    return {"baseline_pss_gib": round(baseline, 3), "peak_pss_gib": round(peak[0], 3),
            "peak_growth_gib": round(peak[0] - baseline, 3),
            "step_seconds_mean": round(sum(c["step_seconds"] for c in curve) / len(curve), 2),
            "val_ndcg@10": metrics["best_val_ndcg@10"],
            "epochs": len(curve), "load_1min_after": os.getloadavg()[0]}


def main() -> None:
    from fedmerge.config import parse_params
    from fedmerge.data.amazon import default_amazon_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_amazon_root())
    parser.add_argument("--domain", default="Beauty")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (NAME: for defaults)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one variant's overrides as JSON: run it here
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(train_once(args.data, args.domain, json.loads(args.child), args.epochs, args.seed)))
        return
    if not args.variant:
        parser.error("give at least one --variant NAME:key=value,...")
    runs: dict[str, Any] = {}
    for text in args.variant:
        name, _, settings = text.partition(":")
        overrides = parse_params([s for s in settings.split(",") if s])
        argv = [sys.executable, __file__, "--data", str(args.data), "--domain", args.domain, "--epochs",
                str(args.epochs), "--seed", str(args.seed), "--child", json.dumps(overrides)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"variant {name!r} failed:\n{done.stderr[-3000:]}")
        runs[name] = {"overrides": overrides, **json.loads(done.stdout.strip().splitlines()[-1])}
        run = runs[name]
        print(f"{name:12s} PSS before {run['baseline_pss_gib']:.3f} GiB, peak {run['peak_pss_gib']:.3f} "
              f"(+{run['peak_growth_gib']:.3f}), steps {run['step_seconds_mean']:.1f} s/epoch, val NDCG@10 "
              f"{run['val_ndcg@10']:.4f}, load {run['load_1min_after']:.1f}", flush=True)
    if args.json:
        write_json_atomic(args.json, {"domain": args.domain, "epochs": args.epochs, "seed": args.seed,
                                      "cpus": os.cpu_count(), "runs": runs})


if __name__ == "__main__":
    main()
