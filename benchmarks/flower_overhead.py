"""Wall time of one scenario on the in-process engine vs Flower's simulation engine, end to end.

Each run is a fresh ``fedmerge simulate`` process (imports, Ray start-up and shutdown included), so neither engine
profits from the other's warm caches; the text-embedding disk cache is warmed once before timing. Engines alternate
(inprocess, flower, inprocess, ...) so a change in machine load hits both alike. Prints each run, the median wall
per engine, the ratio flower / inprocess (target ≤ 1.15) and the load average; writes the same as JSON.

    python benchmarks/flower_overhead.py [--scenario quickstart] [--set KEY=VALUE ...] [--repeats 1] [--out DIR]
        [--no-warmup]   # the embedding cache is already warm (the warm-up run trains every client once)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedmerge.storage import write_json_atomic

ENGINES = ("inprocess", "flower")
CLI = "from fedmerge.cli import main; raise SystemExit(main())"


def simulate(scenario: str, overrides: list[str], engine: str, out_dir: Path) -> dict[str, float]:
    """One ``fedmerge simulate`` subprocess: wall seconds, the phase timings it reports and the load around it."""
    argv = [sys.executable, "-c", CLI, "simulate", scenario, "--engine", engine, "--out", str(out_dir),
            *[item for o in overrides for item in ("--set", o)]]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads((out_dir / "results.json").read_text())
    if results.get("status") != "ok":
        raise SystemExit(f"{engine} run reported status {results.get('status')}: {results.get('errors')}")
    return {"wall_s": round(wall, 2), "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
            **{f"phase_{k}_s": v for k, v in results["timings_s"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per engine (median reported)")
    parser.add_argument("--out", type=Path, default=Path("runs/flower_overhead"))
    parser.add_argument("--no-warmup", action="store_true", help="skip the cache-warming run (cache already warm)")
    args = parser.parse_args()

    if not args.no_warmup:
        print(f"warming the embedding cache ({args.scenario}, inprocess) ...", flush=True)
        simulate(args.scenario, [*args.overrides, "baselines.fedavg_rounds=0", "merge.methods=['average']",
                                 "baselines.joint=false"], "inprocess", args.out / "warmup")
    runs: dict[str, list[dict[str, float]]] = {engine: [] for engine in ENGINES}
    for repeat in range(args.repeats):
        for engine in ENGINES:
            run = simulate(args.scenario, args.overrides, engine, args.out / f"{engine}-{repeat}")
            runs[engine].append(run)
            print(f"{engine:9s} run {repeat}: wall {run['wall_s']:6.1f} s  (load {run['load_1min_before']:.1f} -> "
                  f"{run['load_1min_after']:.1f})", flush=True)
    median = {engine: statistics.median(r["wall_s"] for r in runs[engine]) for engine in ENGINES}
    ratio = median["flower"] / median["inprocess"]
    print(f"median wall: inprocess {median['inprocess']:.1f} s, flower {median['flower']:.1f} s, "
          f"ratio {ratio:.2f} (target <= 1.15); {os.cpu_count()} CPUs")
    write_json_atomic(args.out / "flower_overhead.json", {
        "scenario": args.scenario, "overrides": args.overrides, "runs": runs, "median_wall_s": median,
        "ratio_flower_over_inprocess": round(ratio, 3), "cpus": os.cpu_count(), "warmup": not args.no_warmup,
    })


if __name__ == "__main__":
    main()
