"""Wall time of one scenario on the in-process engine vs Flower's simulation engine, end to end.

Each run is a fresh ``fedmerge simulate`` process (imports, Ray start-up and shutdown included), so neither engine
profits from the other's warm caches; the text-embedding disk cache is warmed once before timing. Engines alternate
(inprocess, flower, inprocess, ...) so a change in machine load hits both alike. Prints each run, the median wall
per engine, the ratio flower / inprocess (target ≤ 1.15), the peak memory of each run's whole process tree (PSS
summed over the ``fedmerge simulate`` process and its descendants, Ray workers included, sampled every second;
the JSON also splits the peak sample by process) and the load average; writes the same as JSON.

    python benchmarks/flower_overhead.py [--scenario quickstart] [--set KEY=VALUE ...] [--repeats 1] [--out DIR]
        [--no-warmup]          # the embedding cache is already warm (the warm-up run trains every client once)
        [--engines flower]     # time one engine only (no ratio)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedmerge.memory import pss_bytes
from fedmerge.storage import write_json_atomic

ENGINES = ("inprocess", "flower")
CLI = "from fedmerge.cli import main; raise SystemExit(main())"


def tree_pss(root: int) -> dict[str, int]:
    """Memory of process ``root`` and each of its descendants (Ray's workers included): ``{"PID NAME": PSS bytes}``,
    PSS splitting shared pages between the processes that map them, read from /proc (Linux; empty elsewhere).
    NAME is the process's title (Ray renames its workers, e.g. ``ray::ClientAppActor``), cut to 60 characters."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            children.setdefault(parent, []).append(int(entry.name))
    sizes, stack = {}, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            pss = pss_bytes(pid)
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        sizes[f"{pid} {name[:60]}"] = pss
    return sizes


def simulate(scenario: str, overrides: list[str], engine: str, out_dir: Path) -> dict[str, float]:
    """One ``fedmerge simulate`` subprocess: wall seconds, peak memory of its process tree (sampled every second),
    the phase timings it reports and the load around it."""
    argv = [sys.executable, "-c", CLI, "simulate", scenario, "--engine", engine, "--out", str(out_dir), "--overwrite",
            *[item for o in overrides for item in ("--set", o)]]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    peak, peak_processes, peak_at = 0, {}, 0.0
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        stderr_tail: list[str] = []
        reader = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True)
        reader.start()
        while True:  # sample once a second; wait() returns as soon as the run ends, so wall time is not padded
            sizes = tree_pss(proc.pid)
            if sum(sizes.values()) > peak:
                peak, peak_processes, peak_at = sum(sizes.values()), sizes, time.perf_counter() - start
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        reader.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{engine} run failed (exit {proc.returncode}):\n{''.join(stderr_tail)[-3000:]}")
    results = json.loads((out_dir / "results.json").read_text())
    if results.get("status") != "ok":
        raise SystemExit(f"{engine} run reported status {results.get('status')}: {results.get('errors')}")
    return {"wall_s": round(wall, 2), "peak_tree_pss_gib": round(peak / 2**30, 2), "peak_at_s": round(peak_at, 1),
            "peak_processes_gib": {name: round(size / 2**30, 3)
                                   for name, size in sorted(peak_processes.items(), key=lambda kv: -kv[1])},
            "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
            **{f"phase_{k}_s": v for k, v in results["timings_s"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="quickstart")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per engine (median reported)")
    parser.add_argument("--out", type=Path, default=Path("runs/flower_overhead"))
    parser.add_argument("--no-warmup", action="store_true", help="skip the cache-warming run (cache already warm)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="engines to time, comma-separated")
    args = parser.parse_args()

    if not args.no_warmup:
        print(f"warming the embedding cache ({args.scenario}, inprocess) ...", flush=True)
        simulate(args.scenario, [*args.overrides, "baselines.fedavg_rounds=0", "merge.methods=['average']",
                                 "baselines.joint=false"], "inprocess", args.out / "warmup")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        raise SystemExit(f"--engines: unknown {unknown or 'none given'}; valid: {list(ENGINES)}")
    runs: dict[str, list[dict[str, float]]] = {engine: [] for engine in engines}
    for repeat in range(args.repeats):
        for engine in engines:
            run = simulate(args.scenario, args.overrides, engine, args.out / f"{engine}-{repeat}")
            runs[engine].append(run)
            print(f"{engine:9s} run {repeat}: wall {run['wall_s']:6.1f} s, peak memory (PSS of the process tree) "
                  f"{run['peak_tree_pss_gib']:.2f} GiB  (load {run['load_1min_before']:.1f} -> "
                  f"{run['load_1min_after']:.1f})", flush=True)
    median = {engine: statistics.median(r["wall_s"] for r in runs[engine]) for engine in engines}
    ratio = median["flower"] / median["inprocess"] if len(median) == len(ENGINES) else None
    print("median wall: " + ", ".join(f"{e} {w:.1f} s" for e, w in median.items())
          + (f", ratio flower / inprocess {ratio:.2f} (target <= 1.15)" if ratio is not None else "")
          + f"; {os.cpu_count()} CPUs")
    write_json_atomic(args.out / "flower_overhead.json", {
        "scenario": args.scenario, "overrides": args.overrides, "runs": runs, "median_wall_s": median,
        "ratio_flower_over_inprocess": None if ratio is None else round(ratio, 3), "cpus": os.cpu_count(),
        "warmup": not args.no_warmup,
    })


if __name__ == "__main__":
    main()
