"""Aggregate per-seed results.json files that came from separate runs (e.g. seeds run with different baselines or in
parallel folders) exactly as ``fedmerge simulate --seeds`` does: aggregate.json / .csv / per_domain.png and
summary.txt (both metrics at the primary cut-off), with the held-out comparisons.

    python benchmarks/aggregate_seeds.py OUT RUN/seed-0/results.json RUN-b/seed-1/results.json ... \
        [--drop fedavg] [--extra SUFFIX=FILE ...]

Each file's seed is read from its ``config.run.seed``; the files are copied to ``OUT/seed-<s>.results.json``.
``--drop`` leaves a model out (one that not every seed ran); ``--extra _paper=OUT/seed-{seed}.paper.json`` adds the
models of a second file per seed under ``<model>_paper`` (e.g. MergeRec re-merged with another preset via --resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fedmerge.merging import METHODS
from fedmerge.runners.aggregate import aggregate_runs, same_cutoff_metrics
from fedmerge.runners.multiseed import aggregate_summary, write_aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--drop", action="append", default=[], help="a model to leave out of every seed")
    parser.add_argument("--extra", action="append", default=[], metavar="SUFFIX=FILE",
                        help="per-seed file ({seed} is filled in) whose models join as <model><SUFFIX>")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for path in args.results:
        run = json.loads(path.read_text())
        seed = int(run["config"]["run"]["seed"])
        if (args.out / f"seed-{seed}.results.json").resolve() != path.resolve():
            shutil.copy(path, args.out / f"seed-{seed}.results.json")
        run["models"] = {m: v for m, v in run["models"].items() if m not in args.drop}
        for item in args.extra:
            suffix, _, pattern = item.partition("=")
            extra = json.loads(Path(pattern.format(seed=seed)).read_text())
            run["models"] |= {m + suffix: v for m, v in extra["models"].items()}
        runs[seed] = run
    runs = dict(sorted(runs.items()))
    primary = next(iter(runs.values()))["config"]["eval"]["primary"]
    aggregate = aggregate_runs(runs, primary, training_free=list(METHODS))
    first = next(iter(runs.values()))  # self-describing as `simulate --seeds` writes it: the runs' own records
    aggregate |= {"seed_files": {s: f"seed-{s}.results.json" for s in runs},
                  "config": first["config"], "config_note": "the first seed's (its run.seed is that seed's)",
                  "versions": first.get("versions", {})}
    write_aggregate(aggregate, args.out)
    summary = "\n\n".join(aggregate_summary(aggregate_runs(runs, metric, training_free=list(METHODS)))
                          for metric in same_cutoff_metrics(primary, runs))
    (args.out / "summary.txt").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
