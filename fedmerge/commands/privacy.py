"""``fedmerge privacy run`` / ``pool``: parse the arguments and run (or pool the seeds, ε or units of) the privacy study of
:mod:`fedmerge.privacy.study`."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("runs/privacy")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("privacy", help="differential privacy on shipped weights: utility and membership attacks")
    actions = parser.add_subparsers(dest="privacy_action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run the privacy study of a scenario (metric per unit, ε and method; attacks)")
    run.add_argument("--scenario", default="privacy", help="scenario name under scenarios/ or a .toml path")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                     help="override a scenario key, e.g. privacy.clip_norm=0.5 or privacy_study.units=['user']")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the runs, attack scores and privacy.json/.md/.png an earlier study left in "
                          "--out (refused otherwise)")
    run.add_argument("--resume", action="store_true",
                     help="keep what an earlier, interrupted run of this study finished in --out (complete runs and "
                          "attack scores of the same configuration) and run the rest; a complete run of another "
                          "configuration is refused, not replaced")
    run.add_argument("--only", choices=("utility", "attacks"), default=None,
                     help="run one half of the study (its run folders or attack files), e.g. in two processes side by "
                          "side on the same --out; a last run with --resume and without --only writes the study")
    run.set_defaults(func=run_privacy)
    pool = actions.add_parser("pool", help="one study from several runs of the same study, run apart (e.g. on "
                                           "separate machines): over disjoint seeds (intervals over all seeds), "
                                           "or over the same seeds and other ε or units (the union of the cells)")
    pool.add_argument("studies", nargs="+", type=Path, metavar="PRIVACY_JSON",
                      help="privacy.json of each study (same settings and scenario; disjoint seeds, or the same "
                           "seeds and other epsilons or units)")
    pool.add_argument("--out", type=Path, required=True, help="folder for the pooled privacy.json, .md and .png")
    pool.add_argument("--overwrite", action="store_true",
                      help="replace a privacy.json/.md/.png already in --out (refused otherwise)")
    pool.set_defaults(func=pool_privacy)


def run_privacy(args: argparse.Namespace) -> int:
    from fedmerge.privacy.study import load_study, run_study

    cfg, study = load_study(args.scenario, args.overrides)
    print(run_study(cfg, study, args.out, overwrite=args.overwrite, resume=args.resume, part=args.only or "all"))
    if args.only is None:
        print(f"wrote {args.out / 'privacy.json'}, privacy.md and privacy.png")
    return 0


def pool_privacy(args: argparse.Namespace) -> int:
    from fedmerge.privacy.study import write_pooled_study

    print(write_pooled_study(args.studies, args.out, overwrite=args.overwrite))
    print(f"wrote {args.out / 'privacy.json'}, privacy.md and privacy.png")
    return 0
