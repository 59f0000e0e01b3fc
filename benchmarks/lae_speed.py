"""EASE fit time and peak memory on one real domain, measured in a fresh subprocess.

Peak memory is the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (tracemalloc misses numpy/BLAS buffers);
the RSS after loading the data is printed too, so the solver's own share is visible.

    python benchmarks/lae_speed.py [--domain Toys] [--lam 50] [--amazon-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedmerge.data.amazon import default_amazon_root



def amazon_dir(explicit: str | None) -> Path:
    return Path(explicit) if explicit else default_amazon_root()


def child(path: str, lam: float) -> None:
    """Runs in the fresh process: load, build G, solve EASE; print one JSON line."""
    import resource

    from fedmerge.data import load_domain
    from fedmerge.models.lae import ease_weights, gram_matrix

    domain = load_domain(path)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    gram = gram_matrix(domain.train_with_val(), domain.n_items)
    gram_seconds = time.perf_counter() - start
    weights = ease_weights(gram, lam)
    fit_seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss_peak = usage.ru_maxrss
    print(json.dumps({"domain": domain.name, "items": domain.n_items, "lam": lam, "gram_seconds": gram_seconds,
                      "fit_seconds": fit_seconds, "rss_after_load_mb": rss_loaded / 1024,
                      "peak_rss_mb": rss_peak / 1024,
                      "process_cpu_seconds": usage.ru_utime + usage.ru_stime, "weights_shape": list(weights.shape)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="Toys")
    parser.add_argument("--lam", type=float, default=50.0)
    parser.add_argument("--amazon-dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.lam)
        return 0
    folder = amazon_dir(args.amazon_dir)
    path = folder / args.domain if (folder / args.domain).is_dir() else folder / f"{args.domain}.tar.gz"
    if not path.exists():
        print(f"domain {args.domain} not found under {folder}", file=sys.stderr)
        return 1
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--lam", str(args.lam)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"EASE on {result['domain']} ({result['items']} items, λ={result['lam']:g}): fit {result['fit_seconds']:.1f} s "
          f"(G = XᵀX {result['gram_seconds']:.1f} s), peak RSS {result['peak_rss_mb']:.0f} MB "
          f"({result['rss_after_load_mb']:.0f} MB after loading the data); process CPU time "
          f"{result['process_cpu_seconds']:.1f} s in all; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
