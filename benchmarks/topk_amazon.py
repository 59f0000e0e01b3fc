"""MergeRec with dense teachers (the paper) against top-k teachers on real client models: merged metrics, teacher
memory, peak RSS and time, paired over seeds.

    FEDMERGE_AMAZON_DIR=/work/shared/datasets/amazon python benchmarks/topk_amazon.py OUT \\
        SEED_RUN_0 SEED_RUN_1 ... [--scenario amazon-seq-routed] [--ks 0,200] [--json OUT/topk_amazon.json]

Each ``SEED_RUN`` is the folder of one seed of a finished ``fedmerge simulate`` run (``clients/`` and
``models/theta0.*``; its seed is read from its results.json). For every k in ``--ks`` (0 = dense) the client models
and θ₀ are copied to ``OUT/k<k>-s<seed>`` and re-merged there by ``fedmerge simulate SCENARIO --resume`` with
``merge.mergerec.teacher_top_k = k``, MergeRec task- and layer-wise only (no training, no FedAvg, no baselines): the
product path, so dense reproduces the original run's MergeRec figures exactly. A folder that already holds a
finished ``results.json`` is reused. Per run: wall seconds and the peak RSS of the ``fedmerge simulate`` process
(``os.wait4``; the in-process engine runs in that one process), written to ``OUT/k<k>-s<seed>.run.json``.

Prints, per k and MergeRec variant, average Recall@10 / NDCG@10 (mean and 95 % t-interval over seeds), the paired
difference to dense, the largest coefficient difference to dense, teacher bytes, MergeRec seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedmerge.runners.aggregate import interval
from fedmerge.storage import write_json_atomic

CLI = "from fedmerge.cli import main; raise SystemExit(main())"
VARIANTS = ("mergerec_taskwise", "mergerec_layerwise")
METRICS = ("recall@10", "ndcg@10")


def prepare(source: Path, folder: Path) -> None:
    """Copy a finished run's client models and θ₀ into ``folder`` (what ``--resume`` re-merges from)."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "clients", folder / "clients", dirs_exist_ok=True)
    for path in (source / "models").glob("theta0.*"):
        shutil.copy(path, folder / "models" / path.name)


def remerge(scenario: str, folder: Path, seed: int, k: int) -> dict[str, float]:
    """``fedmerge simulate --resume`` with top-k teachers ``k``: wall seconds and peak RSS (GiB) of that process."""
    argv = [sys.executable, "-c", CLI, "simulate", scenario, "--engine", "inprocess", "--out", str(folder),
            "--resume", "--set", f"run.seed={seed}", "--set", "run.progress=false",
            "--set", f"merge.mergerec.teacher_top_k={k}", "--set", f"merge.methods={json.dumps(list(VARIANTS))}",
            "--set", "baselines.fedavg_rounds=0", "--set", "baselines.individual=false",
            "--set", "baselines.theta0=false"]
    start = time.perf_counter()
    with open(folder.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"re-merge in {folder} failed (exit {proc.returncode}); see {folder.with_suffix('.log')}")
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "load_1min_after": os.getloadavg()[0]}


def max_coefficient_gap(a: Any, b: Any) -> float:
    """Largest absolute difference between two (nested) coefficient records."""
    if isinstance(a, dict):
        return max(max_coefficient_gap(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return max(max_coefficient_gap(x, y) for x, y in zip(a, b, strict=True))
    return abs(float(a) - float(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="+", type=Path, help="one finished seed folder per seed")
    parser.add_argument("--scenario", default="amazon-seq-routed")
    parser.add_argument("--ks", default="0,200", help="teacher_top_k values, 0 (dense) first")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if ks[0] != 0:
        raise SystemExit("--ks must start with 0 (dense): every other k is compared with it")

    rows: dict[int, dict[int, dict[str, Any]]] = {k: {} for k in ks}
    for source in args.runs:
        seed = int(json.loads((source / "results.json").read_text())["config"]["run"]["seed"])
        for k in ks:
            folder = args.out / f"k{k}-s{seed}"
            record = folder.with_suffix(".run.json")
            if not (folder / "results.json").is_file():
                prepare(source, folder)
                write_json_atomic(record, remerge(args.scenario, folder, seed, k))
                print(f"seed {seed} k {k}: {json.loads(record.read_text())}", flush=True)
            run = json.loads((folder / "results.json").read_text())
            report = run["merge_report"]
            rows[k][seed] = {
                "process": json.loads(record.read_text()),
                **{variant: {**{m: run["models"][variant]["average"][m] for m in METRICS},
                             "seconds": report["seconds"][variant],
                             "teacher_seconds": report[variant]["teacher_seconds"],
                             "teacher_bytes": report[variant]["teacher_bytes"],
                             "coefficients": report[variant]["coefficients"]} for variant in VARIANTS},
            }

    seeds = sorted(rows[0])
    summary: dict[str, Any] = {"seeds": seeds, "scenario": args.scenario, "cpus": os.cpu_count(),
                               "machine": platform.processor() or platform.machine(), "per_k": {}}
    print(f"seeds {seeds}; mean and 95 % t-interval; paired difference to dense (k = 0)")
    for k in ks:
        entry: dict[str, Any] = {"peak_rss_gib": interval([rows[k][s]["process"]["peak_rss_gib"] for s in seeds])}
        for variant in VARIANTS:
            per_seed = [rows[k][s][variant] for s in seeds]
            dense = [rows[0][s][variant] for s in seeds]
            entry[variant] = {
                **{m: interval([r[m] for r in per_seed]) for m in METRICS},
                **{f"{m}_minus_dense": interval([r[m] - d[m] for r, d in zip(per_seed, dense)]) for m in METRICS},
                "max_coefficient_gap_to_dense": max(max_coefficient_gap(r["coefficients"], d["coefficients"])
                                                    for r, d in zip(per_seed, dense)),
                "teacher_mb": round(per_seed[0]["teacher_bytes"] / 2**20, 1),
                "seconds": interval([r["seconds"] for r in per_seed]),
            }
            e = entry[variant]
            spread = "" if e["recall@10"]["half_width"] is None else f" ± {e['recall@10']['half_width']:.4f}"
            print(f"k={k:4d} {variant:19s} R@10 {e['recall@10']['mean']:.4f}{spread} "
                  f"(Δ {e['recall@10_minus_dense']['mean']:+.5f}) N@10 {e['ndcg@10']['mean']:.4f} "
                  f"(Δ {e['ndcg@10_minus_dense']['mean']:+.5f}) max|Δλ| {e['max_coefficient_gap_to_dense']:.1e} "
                  f"teachers {e['teacher_mb']:.0f} MB, {e['seconds']['mean']:.0f} s; "
                  f"peak RSS {entry['peak_rss_gib']['mean']:.2f} GiB")
        summary["per_k"][str(k)] = entry
    summary["runs"] = {str(k): {str(s): {key: value for key, value in rows[k][s].items()} for s in seeds} for k in ks}
    write_json_atomic(args.json or args.out / "topk_amazon.json", summary)


if __name__ == "__main__":
    main()
