"""Aggregate per-seed results.json files that came from separate runs (e.g. seeds run with different baselines or in
parallel folders) exactly as ``fedmerge simulate --seeds`` does: aggregate.json / .csv / per_domain.png and
summary.txt (both metrics at the primary cut-off), with the held-out comparisons.

    python benchmarks/aggregate_seeds.py OUT RUN/seed-0/results.json RUN-b/seed-1/results.json ... \
        [--drop fedavg] [--extra SUFFIX=FILE ...]

Each file's seed is read from its ``config.run.seed``; the files are copied to ``OUT/seed-<s>.results.json``.
``--drop`` leaves a model out (one that not every seed ran); ``--extra _paper=OUT/seed-{seed}.paper.json`` adds the
models of a second file per seed under ``<model>_paper`` (e.g. MergeRec re-merged with another preset via --resume).
A file whose run did not end ``ok`` and a second file of one seed are refused; settings that differ from the first
file's (beyond the seed and the result-neutral ones) are allowed — what this script is for — but listed in the
aggregate's warnings, as is every --extra file's own warnings.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fedmerge.config import settings_differences
from fedmerge.merging import METHODS
from fedmerge.runners.aggregate import aggregate_runs, same_cutoff_metrics
from fedmerge.runners.multiseed import aggregate_summary, without_result_neutral, write_aggregate


def read_ok_run(path: Path) -> dict:
    """``path``'s results, refused unless the run ended ``ok`` (a failed run's partial figures are not a seed)."""
    run = json.loads(path.read_text())
    if run.get("status") != "ok":
        raise SystemExit(f"{path}: the run ended {run.get('status')!r}, not 'ok': not aggregated")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--drop", action="append", default=[], help="a model to leave out of every seed")
    parser.add_argument("--extra", action="append", default=[], metavar="SUFFIX=FILE",
                        help="per-seed file ({seed} is filled in) whose models join as <model><SUFFIX>")
    args = parser.parse_args()
    runs, sources, notes = {}, {}, []
    for path in args.results:
        run = read_ok_run(path)
        seed = int(run["config"]["run"]["seed"])
        if seed in runs:
            raise SystemExit(f"{path}: seed {seed} again (already {sources[seed]}): one file per seed")
        runs[seed], sources[seed] = run, path
        run["models"] = {m: v for m, v in run["models"].items() if m not in args.drop}
        for item in args.extra:
            suffix, _, pattern = item.partition("=")
            extra_path = Path(pattern.format(seed=seed))
            extra = read_ok_run(extra_path)
            run["models"] |= {m + suffix: v for m, v in extra["models"].items()}
            notes += [f"{extra_path}: {w}" for w in extra.get("warnings", [])]
    runs = dict(sorted(runs.items()))
    first_seed = next(iter(runs))
    for seed, run in runs.items():
        _, differing = settings_differences(without_result_neutral(runs[first_seed]["config"]),
                                            without_result_neutral(run["config"]))
        differing = [k for k in differing if k != "run.seed"]
        if differing:
            notes.append(f"seed {seed} ({sources[seed]}) differs from seed {first_seed} in {', '.join(differing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, path in sources.items():
        if (args.out / f"seed-{seed}.results.json").resolve() != path.resolve():
            shutil.copy(path, args.out / f"seed-{seed}.results.json")
    primary = next(iter(runs.values()))["config"]["eval"]["primary"]
    aggregate = aggregate_runs(runs, primary, training_free=list(METHODS))
    aggregate["warnings"] = [*notes, *aggregate["warnings"]]
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
