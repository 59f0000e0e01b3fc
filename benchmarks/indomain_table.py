"""In-domain test table: each model trained by ``fedmerge train`` on each Amazon domain, as a markdown table.

Every (domain, model) cell runs ``fedmerge train`` in-process into ``OUT/<domain>-<model>/metrics.json``; a cell
whose metrics.json already exists is read back instead of retrained (so an interrupted run resumes) when its
``command.json`` records the same ``fedmerge train`` arguments (the output folder aside) and the same package code
(``fedmerge_source``, a digest of its ``.py`` files); any other cell is trained again.

    python benchmarks/indomain_table.py [--domains Beauty Pantry Toys] [--models ease l3ae ...] [--out DIR]
    python benchmarks/indomain_table.py --models text-lae sequential --seeds 0-4   # OUT/seed-<s>/..., mean ± 95 %

With ``--seeds`` every cell runs once per seed (``fedmerge train --seed s``; seed-free models such as EASE give the
same number each time) and the table shows the mean ± the 95 % t-interval half-width over the seeds
(:func:`fedmerge.runners.aggregate.interval`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmerge.cli import main as fedmerge_main
from fedmerge.config import parse_seeds
from fedmerge.data.amazon import default_amazon_root
from fedmerge.models import FAMILIES, RECOMMENDERS
from fedmerge.provenance import source_digest

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("Beauty", "Pantry", "Toys")
MODELS = ("popularity", "ease", "rlae", "rdlae", "l3ae", "text-lae", "sequential")
COLUMNS = ("recall@10", "ndcg@10", "recall@10_masked", "ndcg@10_masked")


def domain_path(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).is_dir() else folder / f"{name}.tar.gz"


def cell(path: Path, model: str, out: Path, encoder: str, settings: list[str], seed: int | None = None) -> dict:
    metrics_file, command_file = out / "metrics.json", out / "command.json"
    extra = [arg for item in settings if item.startswith(f"{model}.") for arg in ("--set", item[len(model) + 1 :])]
    seeded = [] if seed is None else ["--seed", str(seed)]
    train_args = ["train", "--data", str(path), "--model", model, "--out", str(out), "--encoder", encoder, *extra,
                  *seeded]
    command = {"args": [a for a in train_args if a not in ("--out", str(out))], "fedmerge_source": source_digest()}
    recorded = json.loads(command_file.read_text()) if command_file.is_file() else None
    if metrics_file.is_file() and recorded == command:
        return json.loads(metrics_file.read_text())
    if metrics_file.is_file():
        why = "no command.json records how" if recorded is None else f"trained with {recorded}, now {command}"
        print(f"{out}: its metrics.json is stale ({why}); training again", file=sys.stderr)
    if fedmerge_main([*train_args, "--overwrite"]) != 0:  # the cell is stale or new: its folder is this script's
        raise SystemExit(f"fedmerge train failed for {path} / {model}")
    command_file.write_text(json.dumps(command))
    return json.loads(metrics_file.read_text())


def markdown(results: dict[tuple[str, str], dict], domains: list[str], models: list[str]) -> str:
    header = "| model | " + " | ".join(f"{d} R@10 | {d} N@10 | {d} R@10 m | {d} N@10 m" for d in domains) + " |"
    lines = [header, "|" + "---|" * (1 + 4 * len(domains))]
    for model in models:
        row = [f"{results[(d, model)][c]:.4f}" if (d, model) in results else "–" for d in domains for c in COLUMNS]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_intervals(runs: dict[tuple[str, str], list[dict]], domains: list[str], models: list[str]) -> str:
    """Like :func:`markdown`, each cell the mean ± 95 % t-interval half-width over the seeds' metrics."""
    from fedmerge.runners.aggregate import interval

    def shown(values: list[float]) -> str:
        stats = interval(values)
        return f"{stats['mean']:.4f}" + ("" if stats["half_width"] is None else f" ± {stats['half_width']:.4f}")

    header = "| model | " + " | ".join(f"{d} R@10 | {d} N@10 | {d} R@10 m | {d} N@10 m" for d in domains) + " |"
    lines = [header, "|" + "---|" * (1 + 4 * len(domains))]
    for model in models:
        row = [shown([r[c] for r in runs[(d, model)]]) if (d, model) in runs else "–" for d in domains for c in COLUMNS]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS))
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m in RECOMMENDERS or m in FAMILIES])
    parser.add_argument("--amazon-dir", default=str(default_amazon_root()))
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "indomain")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE", dest="settings",
                        help="fix a model parameter instead of its default grid, e.g. ease.lam=50; repeatable")
    parser.add_argument("--seeds", default=None, metavar="SEEDS",
                        help="run every cell once per seed (0-4 or 0,2,5) into OUT/seed-<s>/ and show mean ± 95 %% "
                        "interval")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds) if args.seeds else [None]
    per_seed: dict[tuple[str, str], list[dict]] = {}
    for domain in args.domains:
        path = domain_path(Path(args.amazon_dir), domain)
        if not path.exists():
            print(f"skipping {domain}: {path} not found", file=sys.stderr)
            continue
        for model in args.models:
            for seed in seeds:
                out = (args.out if seed is None else args.out / f"seed-{seed}") / f"{domain}-{model}"
                per_seed.setdefault((domain, model), []).append(
                    cell(path, model, out, args.encoder, args.settings, seed))
    results = {key: runs[0] for key, runs in per_seed.items()}
    print("Test Recall@10 / NDCG@10, unmasked (MergeRec protocol) and masked (m); hyper-parameters chosen on "
          "validation NDCG@10, refit on train+val.")
    if args.seeds:
        print(f"Mean ± 95 % t-interval half-width over seeds {seeds}; the details below are seed {seeds[0]}'s.")
        print(markdown_intervals(per_seed, args.domains, args.models))
    else:
        print(markdown(results, args.domains, args.models))
    print()
    print("| domain | model | chosen | fit s | eval s |\n|---|---|---|---|---|")
    for (domain, model), r in results.items():
        chosen = r.get("training", {}).get("lam", r["hyperparameters"]) if model in FAMILIES else r["hyperparameters"]
        print(f"| {domain} | {model} | {chosen} | {r['fit_seconds']:.1f} | {r['eval_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
