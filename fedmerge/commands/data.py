"""``fedmerge data``: inspect domains (``info``), fetch the Amazon domains (``download``), write synthetic ones
(``synth``), split one into sub-domains by a catalog field (``split``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmerge.commands import seed
from fedmerge.data import load_domain, save_generic_domain
from fedmerge.data.download import AMAZON_SHA256, DEFAULT_AMAZON_SOURCE, download_amazon
from fedmerge.data.generic import check_domain_output
from fedmerge.data.split import save_split
from fedmerge.data.synthetic import SYNTHETIC_SIZES, make_synthetic_domains
from fedmerge.storage import check_output_folder


# `data synth` flag -> make_synthetic_domains / [data.synthetic] key (defaults: SYNTHETIC_SIZES)
SYNTH_FLAGS = {"domains": "n_domains", "users": "n_users", "items": "n_items", "topics": "n_topics",
               "min-len": "min_len", "max-len": "max_len"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect, download or generate domain data")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    info = actions.add_parser("info", help="counts and sequence-length statistics of one domain")
    info.add_argument("path", type=Path, help="Amazon folder or .tar.gz, or a folder with interactions.csv + items.jsonl")
    info.add_argument("--name", help="domain name (default: folder / tarball stem)")
    info.add_argument("--json", action="store_true", help="print exactly one JSON object")
    info.set_defaults(func=run_info)

    download = actions.add_parser("download", help="download, verify (sha256) and unpack published domains")
    download.add_argument("dataset", choices=["amazon"], help="dataset family")
    download.add_argument(
        "--domains", default=",".join(AMAZON_SHA256), help=f"comma-separated, of {', '.join(AMAZON_SHA256)} (default: all)"
    )
    download.add_argument("--dest", type=Path, required=True, help="folder receiving <Domain>/ subfolders")
    download.add_argument(
        "--source", help=f"folder holding <Domain>.tar.gz, or a URL prefix (default: {DEFAULT_AMAZON_SOURCE})"
    )
    download.add_argument("--force", action="store_true", help="replace domains already present in --dest")
    download.set_defaults(func=run_download)

    synth = actions.add_parser(
        "synth", help="write seeded synthetic domains in the generic format",
        description="Writes seeded synthetic domains synth-0, synth-1, ... as generic-format folders. To get exactly "
        "the domains a scenario's run trained and evaluated on (e.g. to `fedmerge evaluate` its saved models), give "
        "--scenario (its [data.synthetic] sizes and run.seed; a run with --seeds used seed s for its seed-<s>/).",
    )
    synth.add_argument("--out", type=Path, required=True, help="folder receiving synth-<d>/ subfolders")
    synth.add_argument("--scenario", metavar="NAME_OR_PATH",
                       help="start from this scenario's [data.synthetic] sizes and run.seed (the flags below override "
                       "them, e.g. a run's --set data.synthetic.n_users=30 as --users 30)")
    for flag, key in SYNTH_FLAGS.items():
        synth.add_argument(f"--{flag}", type=int, default=None,
                           help=f"default {SYNTHETIC_SIZES[key]} (or the scenario's data.synthetic.{key})")
    synth.add_argument("--seed", type=seed, default=None, help="an integer >= 0; default 0 (or the scenario's run.seed)")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace the files of domains already in --out (refused otherwise)")
    synth.set_defaults(func=run_synth)

    split = actions.add_parser("split", help="split a domain into sub-domains by a public catalog field "
                                             "(users follow their majority value)")
    split.add_argument("path", type=Path, help="the domain (Amazon folder or .tar.gz, or a generic folder)")
    split.add_argument("--by", required=True, metavar="FIELD", help="catalog text field, e.g. category or brand")
    split.add_argument("--out", type=Path, required=True,
                       help="folder receiving <name>-<k>/ generic-format folders and <name>-split.json")
    split.add_argument("--words", type=int, default=0,
                       help="use only the field's first N words (Amazon categories are paths; default 0: all)")
    split.add_argument("--groups", type=int, default=0,
                       help="pack the values into N sub-domains balanced by interactions (default 0: one per value)")
    split.add_argument("--min-users", type=int, default=1, help="drop sub-domains with fewer users (default 1)")
    split.add_argument("--name", help="domain name (default: folder / tarball stem)")
    split.add_argument("--overwrite", action="store_true",
                       help="replace sub-domains and a manifest already in --out (refused otherwise), and remove the "
                       "earlier split's sub-domains this one does not make")
    split.set_defaults(func=run_split)


def run_info(args: argparse.Namespace) -> int:
    summary = load_domain(args.path, args.name).summary()
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    for folder in download_amazon(args.domains, args.dest, source=args.source, force=args.force):
        print(folder)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from fedmerge.errors import FedmergeError

    given = {key: getattr(args, flag.replace("-", "_")) for flag, key in SYNTH_FLAGS.items()}
    given = {key: value for key, value in given.items() if value is not None}
    sizes, seed = dict(SYNTHETIC_SIZES), 0
    if args.scenario:
        from dataclasses import asdict

        from fedmerge.config import load_scenario

        cfg = load_scenario(args.scenario)
        if cfg.data.source != "synthetic":
            raise FedmergeError(f"scenario {args.scenario!r} reads data.source = {cfg.data.source!r}, not synthetic "
                                "domains")
        sizes, seed = asdict(cfg.data.synthetic), cfg.run.seed
    sizes.update(given)
    check_output_folder(args.out)
    domains = make_synthetic_domains(**sizes, seed=seed if args.seed is None else args.seed)
    check_domain_output([args.out / domain.name for domain in domains], args.overwrite)
    for domain in domains:
        print(save_generic_domain(domain, args.out / domain.name))
    return 0


def run_split(args: argparse.Namespace) -> int:
    check_output_folder(args.out)
    domain = load_domain(args.path, args.name)
    manifest = save_split(domain, args.by, args.out, args.groups, args.words, args.min_users, source=str(args.path),
                          overwrite=args.overwrite)
    for row in manifest:
        status = "dropped" if row.get("dropped") else str(args.out / row["name"])
        print(f"{row['name']}\t{row['users']} users\t{row['items']} items\t{status}")
    return 0
