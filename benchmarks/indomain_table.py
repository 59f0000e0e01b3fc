"""In-domain test table: each model trained by ``fedmerge train`` on each Amazon domain, as a markdown table.

Every (domain, model) cell runs ``fedmerge train`` in-process into ``OUT/<domain>-<model>/metrics.json``; a cell
whose metrics.json already exists is read back instead of retrained (so an interrupted run resumes).

    python benchmarks/indomain_table.py [--domains Beauty Pantry Toys] [--models ease l3ae ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmerge.cli import main as fedmerge_main
from fedmerge.data.amazon import default_amazon_root
from fedmerge.models import FAMILIES, RECOMMENDERS

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("Beauty", "Pantry", "Toys")
MODELS = ("popularity", "ease", "rlae", "rdlae", "l3ae", "text-lae", "sequential")
COLUMNS = ("recall@10", "ndcg@10", "recall@10_masked", "ndcg@10_masked")


def domain_path(folder: Path, name: str) -> Path:
    return folder / name if (folder / name).is_dir() else folder / f"{name}.tar.gz"


def cell(path: Path, model: str, out: Path, encoder: str, settings: list[str]) -> dict:
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        extra = [arg for item in settings if item.startswith(f"{model}.") for arg in ("--set", item[len(model) + 1 :])]
        code = fedmerge_main(["train", "--data", str(path), "--model", model, "--out", str(out), "--encoder", encoder,
                              *extra])
        if code != 0:
            raise SystemExit(f"fedmerge train failed for {path} / {model}")
    return json.loads(metrics_file.read_text())


def markdown(results: dict[tuple[str, str], dict], domains: list[str], models: list[str]) -> str:
    header = "| model | " + " | ".join(f"{d} R@10 | {d} N@10 | {d} R@10 m | {d} N@10 m" for d in domains) + " |"
    lines = [header, "|" + "---|" * (1 + 4 * len(domains))]
    for model in models:
        row = [f"{results[(d, model)][c]:.4f}" if (d, model) in results else "–" for d in domains for c in COLUMNS]
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
    args = parser.parse_args()
    results = {}
    for domain in args.domains:
        path = domain_path(Path(args.amazon_dir), domain)
        if not path.exists():
            print(f"skipping {domain}: {path} not found", file=sys.stderr)
            continue
        for model in args.models:
            results[(domain, model)] = cell(path, model, args.out / f"{domain}-{model}", args.encoder, args.settings)
    print("Test Recall@10 / NDCG@10, unmasked (MergeRec protocol) and masked (m); hyper-parameters chosen on "
          "validation NDCG@10, refit on train+val.")
    print(markdown(results, args.domains, args.models))
    print()
    print("| domain | model | chosen | fit s | eval s |\n|---|---|---|---|---|")
    for (domain, model), r in results.items():
        chosen = r.get("training", {}).get("lam", r["hyperparameters"]) if model in FAMILIES else r["hyperparameters"]
        print(f"| {domain} | {model} | {chosen} | {r['fit_seconds']:.1f} | {r['eval_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
