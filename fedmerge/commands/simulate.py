"""``fedmerge simulate [SCENARIO] [--out DIR] [--set key=value ...] [--engine flower|inprocess] [--resume|--overwrite]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmerge.config import DEFAULT_SCENARIO, SCENARIO_DIR, apply_overrides, load_scenario, parse_seeds
from fedmerge.runners.results import RESULTS_FILE
from fedmerge.runners.simulation import ENGINES, simulate


def simulation_scenarios() -> list[str]:
    """The bundled scenarios ``simulate`` runs (the privacy studies' run with ``fedmerge privacy run``)."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml") if "[privacy_study]" not in p.read_text("utf-8"))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate", help="run a scenario: local training, merges, FedAvg and baselines, evaluated per domain",
        description="Runs a scenario (scenarios/<name>.toml or a path) on Flower's simulation engine or in-process "
        "and writes results.json, results.csv and plots. A scenario is a TOML file of the sections [run], [data], "
        "[encoder], [model], [merge], [baselines], [federation], [privacy], [eval], [theta0]: copy one of "
        f"{SCENARIO_DIR} and change it, or give any key with --set (README, 'Running a federation'); an unknown "
        "key fails with the valid ones.",
    )
    parser.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO,
                        help=f"a bundled name ({', '.join(simulation_scenarios())}) or "
                        f"a .toml path (default {DEFAULT_SCENARIO})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/<run.name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a scenario key, value parsed as TOML (e.g. data.root=DIR); repeatable")
    parser.add_argument("--engine", choices=ENGINES, default="flower", help="simulation engine (default flower)")
    parser.add_argument("--resume", action="store_true",
                        help="re-merge and re-evaluate from the client weights saved in --out by an earlier run of the "
                        "same scenario (no training; FedAvg rounds are skipped; the old results.json is kept as "
                        "results.<UTC time>.json)")
    parser.add_argument("--seeds", default=None, metavar="SEEDS",
                        help="run once per seed (0-4, 0,2,5) into OUT/seed-<s>/ and aggregate means and 95 %% "
                        "intervals into OUT/aggregate.json (same as run.seeds); with --resume, complete seeds are kept")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete everything in --out (the files an earlier run left, and anything else there) "
                        "before this run; without it or --resume, a non-empty --out is refused")
    parser.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from fedmerge.runners.results import run_summary

    cfg = load_scenario(args.scenario, args.overrides)
    if args.seeds is not None:
        cfg = apply_overrides(cfg, [f"run.seeds={parse_seeds(args.seeds)}"])
    out_dir = args.out or Path("runs") / cfg.run.name
    results = simulate(cfg, out_dir, engine=args.engine, resume=args.resume, overwrite=args.overwrite)
    if cfg.run.seeds:
        from fedmerge.runners.multiseed import AGGREGATE_FILE, aggregate_summary

        print(aggregate_summary(results))
        print(f"aggregate: {out_dir / AGGREGATE_FILE} (per seed: {out_dir}/seed-<s>/)")
        return 0
    if "resumed" in results:
        print(f"resumed from the saved weights of {results['resumed']['clients']} in {results['resumed']['from']}")
    print(run_summary(results, cfg.eval.primary))
    print(f"results: {out_dir / RESULTS_FILE}")
    return 0
