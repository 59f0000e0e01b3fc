"""Merging benchmark on the Amazon domains: individuals, θ₀, training-free merges and MergeRec, Recall/NDCG@10.

    python benchmarks/merge_amazon.py --family text-lae [--holdout Toys] [--domains Beauty,Pantry,Toys]
    python benchmarks/merge_amazon.py --family sequential --family-set max_epochs=8 --markdown-out results/merge/x.md
    python benchmarks/merge_amazon.py --family sequential --family-set max_epochs=8 --seeds 0-4 --json-out x.json

Every domain's model is trained from the same θ₀ with ``family.train`` and cached as safetensors under
``<cache>/merge_amazon/`` (re-runs skip training). Merges use the non-held-out domains only; a held-out domain's
catalog is used only at test time (zero-shot). Prints a markdown table of test Recall@10 / NDCG@10 (unmasked,
MergeRec's protocol) per domain and averaged over the merged domains, and MergeRec's optimization time and the
process's peak resident memory (``resource.getrusage``), with every setting needed to reproduce the run.

``--seeds 0-4`` runs the benchmark once per seed (θ₀, training, DARE's masks and MergeRec's sampling follow it),
each in a fresh process of this script writing ``<json-out>.seed-<s>.json``, then prints the mean ± 95 % interval
table and the paired ratios of every merge to the per-seed best training-free merge and to the individuals, computed
by :mod:`fedmerge.runners.aggregate` like ``fedmerge simulate --seeds``; ``--json-out`` then holds that aggregate.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedmerge.config import parse_params
from fedmerge.data import load_domain
from fedmerge.data.amazon import default_amazon_root
from fedmerge.data.domain import Domain
from fedmerge.merging import METHODS, MergeRecConfig, merge, task_vectors
from fedmerge.merging.mergerec import PseudoUserObjective, group_index, merged_weights, mergerec
from fedmerge.metrics import evaluate_scorer
from fedmerge.models import ModelFamily, StateDict, get_family
from fedmerge.runners.server import fedavg_aggregate
from fedmerge.storage import load_weights, read_metadata, save_weights, weights_digest
from fedmerge.text import default_cache_root, encode_catalog, get_encoder

logger = logging.getLogger("merge_amazon")
# each with its registry defaults
TRAINING_FREE = ("average", "task_arithmetic", "ties", "ties_global", "dare", "pcb", "pcb_released")


def locate(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.tar.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"domain {name} not found under {root} (folder or .tar.gz)")


def trained_weights(
    family: ModelFamily, theta0: StateDict, domain: Domain, features: torch.Tensor, cache: Path, seed: int
) -> tuple[StateDict, dict]:
    """(weights, training summary) of ``family.train`` from θ₀ on ``domain``, cached on disk keyed by family config,
    θ₀ (layout and digest), domain and seed; the summary (scalars of the training info) is kept in the file's metadata."""
    layout = {name: list(t.shape) for name, t in theta0.items()}
    key = json.dumps({"family": family.name, "config": family.config(), "layout": layout,
                      "theta0": weights_digest(theta0), "domain": domain.name,
                      "dim": int(features.shape[-1]), "seed": seed, "users": domain.n_users}, sort_keys=True, default=str)
    path = cache / f"{family.name}-{domain.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        logger.info("cached weights %s", path)
        summary = json.loads(read_metadata(path).get("summary", '{"cached": "no summary stored"}'))
        return load_weights(path), summary
    start = time.perf_counter()
    weights, info = family.train(theta0, domain, features, seed=seed)
    logger.info("trained %s on %s in %.1f s: %s", family.name, domain.name, time.perf_counter() - start, info)
    summary = {k: v for k, v in info.items() if isinstance(v, (int, float, bool, str))}
    save_weights(path, weights, metadata={"key": key, "summary": json.dumps(summary)})
    return weights, summary


def warm_start(
    family: ModelFamily, theta0: StateDict, domains: dict[str, Domain], features: dict[str, torch.Tensor],
    rounds: int, epochs: int, cache: Path, seed: int,
) -> StateDict:
    """θ₀ after ``rounds`` FedAvg rounds (every domain trains ``epochs`` epochs from the current global weights; the
    server averages weighted by users). Local training from it puts the domains' task vectors in one basin."""
    if not hasattr(family, "max_epochs"):
        raise SystemExit(f"--warm-start-rounds needs an iteratively trained family, not {family.name!r}")
    local = dataclasses.replace(family, max_epochs=epochs, max_seconds=None)
    theta = theta0
    for r in range(1, rounds + 1):
        updates = {n: trained_weights(local, theta, domains[n], features[n], cache, seed)[0] for n in domains}
        theta = fedavg_aggregate(updates, {n: float(domains[n].n_users) for n in domains})
        logger.info("warm start: FedAvg round %d of %d done", r, rounds)
    return theta


def coefficient_tensor(coefficients: dict[str, dict[str, float]], domains: list[str], groups: list[str]) -> torch.Tensor:
    """(domains × groups) tensor of a ``{domain: {group: λ}}`` table; SystemExit naming what is missing."""
    missing = [(d, g) for d in domains for g in groups if g not in coefficients.get(d, {})]
    if missing:
        raise SystemExit(f"coefficients lack {missing[:5]} (domains {domains}, groups {groups})")
    return torch.tensor([[float(coefficients[d][g]) for g in groups] for d in domains])


def oracle_coefficients(
    family: ModelFamily, theta0: StateDict, models: dict[str, StateDict], domains: dict[str, Domain],
    features: dict[str, torch.Tensor], grid: list[float], sweeps: int, granularity: str,
) -> tuple[StateDict, dict[str, dict[str, float]], float]:
    """Coordinate search of λ in θ₀ + Σ_k λ_k,g(p) τ_k[p] for the best mean validation Recall@10 over the merged
    domains' real users. Not data-isolated (it reads every domain's validation users): a diagnostic upper bound for
    what MergeRec's coefficients can reach. Starts at λ = 0.3 (task arithmetic); ``sweeps`` passes over one λ per
    domain, then, for ``layer`` or ``tensor`` granularity, ``sweeps`` more over each (domain, group) cell."""
    names, stacks = task_vectors(theta0, models)
    groups, column = group_index(family, list(theta0), granularity)

    def score(lam: torch.Tensor) -> float:
        weights = merged_weights(theta0, stacks, lam, column)
        return float(np.mean([evaluate_scorer(family.scorer(weights, features[n]), domains[n], "val", ks=(10,))
                              ["recall@10"] for n in names]))

    rows, cols = range(len(names)), range(len(groups))
    stages = [("task", [[(k, g) for g in cols] for k in rows])]
    if granularity != "task":
        stages.append((granularity, [[(k, g)] for k in rows for g in cols]))
    best = torch.full((len(names), len(groups)), 0.3)
    best_score = score(best)
    for stage, coordinates in stages:
        for sweep in range(sweeps):
            for cells in coordinates:
                for value in grid:
                    trial = best.clone()
                    for cell in cells:
                        trial[cell] = value
                    if not torch.equal(trial, best) and (trial_score := score(trial)) > best_score:
                        best, best_score = trial, trial_score
                k, g = cells[0]
                logger.info("oracle %s sweep %d, %s: λ %s, val R@10 %.4f", stage, sweep + 1,
                            names[k] if stage == "task" else f"{names[k]}/{groups[g]}",
                            [[round(v, 2) for v in row] for row in best.tolist()], best_score)
    coefficients = {n: dict(zip(groups, best[k].tolist())) for k, n in enumerate(names)}
    return merged_weights(theta0, stacks, best, column), coefficients, best_score


def evaluate(family: ModelFamily, weights: StateDict, domain: Domain, features: torch.Tensor) -> tuple[float, float]:
    result = evaluate_scorer(family.scorer(weights, features), domain, split="test", ks=(10,))
    return result["recall@10"], result["ndcg@10"]


def as_run(saved: dict, merged_names: list[str]) -> dict:
    """One seed's ``--json-out`` as a results.json-like dict for :func:`fedmerge.runners.aggregate.aggregate_runs`:
    ``individual`` on each merged domain is that domain's own model; on a held-out domain each merged domain's
    model is ``individual_<name>`` (zero-shot, the single-domain references); the held-out domain's own model
    (trained on its private data: not a zero-shot figure) is left out; ``average`` is over the merged domains."""
    from fedmerge.runners.aggregate import HELD_OUT_INDIVIDUAL_PREFIX

    models: dict[str, dict] = {}
    for label, cells in saved["results"].items():
        if label.startswith("individual "):
            own = label.removeprefix("individual ")
            for domain, (recall, ndcg) in cells.items():
                cell = {"recall@10": recall, "ndcg@10": ndcg}
                if own not in merged_names:  # the held-out domain's own model: not zero-shot, left out
                    continue
                if domain == own:
                    models.setdefault("individual", {})[domain] = cell
                elif domain not in merged_names:  # a merged domain's model on the held-out domain
                    models.setdefault(HELD_OUT_INDIVIDUAL_PREFIX + own, {})[domain] = cell
            continue
        models["theta0" if label == "θ₀" else label] = {d: {"recall@10": r, "ndcg@10": n} for d, (r, n) in cells.items()}
    for per_domain in models.values():
        if all(d in per_domain for d in merged_names):
            per_domain["average"] = {k: float(np.mean([per_domain[d][k] for d in merged_names]))
                                     for k in ("recall@10", "ndcg@10")}
    domains = list(next(iter(saved["results"].values())))
    return {"domains": domains, "held_out": [d for d in domains if d not in merged_names], "models": models}


def run_seeds(args: argparse.Namespace) -> None:
    """The benchmark once per seed of ``--seeds`` (fresh processes), then the aggregate over seeds."""
    import subprocess

    from fedmerge.config import parse_seeds
    from fedmerge.runners.aggregate import aggregate_runs
    from fedmerge.runners.multiseed import aggregate_summary

    if args.json_out is None:
        raise SystemExit("--seeds needs --json-out (the per-seed results go next to it)")
    argv, skip = [], False
    for item in sys.argv[1:]:  # this run's arguments without --seeds/--seed/--json-out/--markdown-out
        if skip:
            skip = False
        elif item in ("--seeds", "--seed", "--json-out", "--markdown-out"):
            skip = True
        elif not item.startswith(("--seeds=", "--seed=", "--json-out=", "--markdown-out=")):
            argv.append(item)
    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    merged_names = [n for n in names if n != args.holdout]
    runs = {}
    for seed in parse_seeds(args.seeds):
        path = args.json_out.with_name(f"{args.json_out.stem}.seed-{seed}.json")
        subprocess.run([sys.executable, __file__, *argv, "--seed", str(seed), "--json-out", str(path)], check=True)
        runs[seed] = as_run(json.loads(path.read_text()), merged_names)
    aggregate = aggregate_runs(runs, "recall@10", training_free=TRAINING_FREE)
    text = aggregate_summary(aggregate) + f"\n- arguments: `{' '.join(sys.argv[1:])}`"
    print(text)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(text + "\n")
    args.json_out.write_text(json.dumps(aggregate, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="text-lae", choices=["text-lae", "sequential"])
    parser.add_argument("--domains", default="Beauty,Pantry,Toys")
    parser.add_argument("--holdout", default=None, help="domain left out of merging, evaluated zero-shot")
    parser.add_argument("--data", type=Path, default=None, help="folder with <Domain>/ or <Domain>.tar.gz")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--cache", type=Path, default=None, help="trained-weight cache (default: <fedmerge cache>/merge_amazon)")
    parser.add_argument("--steps", type=int, default=None, help="MergeRec optimization steps (default: the preset's)")
    parser.add_argument("--presets", default="paper,fedmerge",
                        help="MergeRec presets to run, comma-separated: 'paper' (the official scripts' constants), "
                        "'fedmerge' (this project's setting), 'none' (MergeRecConfig defaults); --mergerec-set keys "
                        "override every preset"),
    parser.add_argument("--inits", default="task_arithmetic", help="MergeRec initializations, comma-separated "
                        "(training-free method names, e.g. task_arithmetic,ties)")
    parser.add_argument("--granularities", default="task,layer", help="MergeRec coefficient granularities")
    parser.add_argument("--mergerec-set", action="append", default=[], metavar="KEY=VALUE",
                        help="MergeRecConfig field, e.g. exclude_input_item=true, sampling='domain', item_refresh=25, "
                        "temperature=0.1; repeatable")
    parser.add_argument("--baselines", default=",".join(TRAINING_FREE),
                        help="training-free methods to evaluate, comma-separated ('' for none)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, metavar="SEEDS",
                        help="run once per seed (0-4 or 0,2,5; each in a fresh process) and report mean and 95 %% "
                        "interval over them (needs --json-out for the per-seed files)")
    parser.add_argument("--family-set", action="append", default=[], metavar="KEY=VALUE",
                        help="family constructor parameter (TOML value), e.g. max_epochs=8 (default: the family's epochs + early stopping); repeatable")
    parser.add_argument("--warm-start-rounds", type=int, default=0,
                        help="FedAvg rounds on the merged domains before local training; their result is θ₀")
    parser.add_argument("--warm-start-epochs", type=int, default=1, help="local epochs per warm-start round")
    parser.add_argument("--oracle-grid", default="",
                        help="comma-separated λ values: also run a coordinate search of merge coefficients on the "
                        "real validation users (a non-private upper bound for MergeRec), e.g. 0,0.25,0.5,0.75,1")
    parser.add_argument("--oracle-sweeps", type=int, default=2, help="oracle passes per stage")
    parser.add_argument("--oracle-granularity", default="task", choices=["task", "layer", "tensor"],
                        help="oracle coefficients: one per domain, or then refined per domain and parameter group")
    parser.add_argument("--coefficients", type=Path, default=None,
                        help='JSON {label: {"granularity": "task|layer|tensor", "coefficients": {domain: {group: λ}}}}: '
                        "also evaluate θ₀ + Σ_k λ_k τ_k (raw task vectors) for each entry")
    parser.add_argument("--objective", action="store_true",
                        help="report MergeRec's pseudo-user objective (mean over every pseudo-user, --mergerec-set "
                        "settings) at every coefficient set of the run: MergeRec's learned λ, the oracle's, --coefficients'")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--markdown-out", type=Path, default=None, help="also write the printed report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.seeds is not None:
        run_seeds(args)
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    names = [n.strip() for n in args.domains.split(",") if n.strip()]
    if args.holdout and args.holdout not in names:
        names.append(args.holdout)
    merged_names = [n for n in names if n != args.holdout]
    root = args.data or default_amazon_root()
    cache = args.cache or default_cache_root().parent / "merge_amazon"
    family_params = parse_params(args.family_set, "--family-set")
    mergerec_params = parse_params(args.mergerec_set, "--mergerec-set")
    family = get_family(args.family, **family_params)
    encoder = get_encoder(args.encoder)

    domains = {n: load_domain(locate(root, n), name=n) for n in names}
    features = {n: family.catalog_features(d.catalog, lambda d=d: encode_catalog(encoder, d.catalog))
                for n, d in domains.items()}
    dim = int(next(iter(features.values())).shape[-1])
    theta0 = family.initial_weights(dim, seed=args.seed, catalog_features=[features[n] for n in merged_names])
    if args.warm_start_rounds:
        theta0 = warm_start(family, theta0, {n: domains[n] for n in merged_names}, features,
                            args.warm_start_rounds, args.warm_start_epochs, cache, args.seed)
    trained = {n: trained_weights(family, theta0, domains[n], features[n], cache, args.seed) for n in names}
    individuals = {n: weights for n, (weights, _) in trained.items()}
    training_info = {n: summary for n, (_, summary) in trained.items()}
    to_merge = {n: individuals[n] for n in merged_names}

    candidates: dict[str, StateDict] = {"θ₀": theta0}
    candidates.update({f"individual {n}": w for n, w in individuals.items()})
    for method in (m.strip() for m in args.baselines.split(",") if m.strip()):
        seeded = {"seed": args.seed} if "seed" in METHODS[method].params else {}  # DARE's masks follow the seed
        candidates[method] = merge(method, theta0, to_merge, **seeded)
    def mergerec_config(preset: str | None, init: str, granularity: str) -> MergeRecConfig:
        keys = {**mergerec_params, "init_method": init, "granularity": granularity, "seed": args.seed}
        if args.steps is not None:
            keys["steps"] = args.steps
        return MergeRecConfig.from_keys({**keys, "preset": preset} if preset else keys)

    presets = [None if p.strip() == "none" else p.strip() for p in args.presets.split(",") if p.strip()]
    # label -> (preset, init method, granularity, {domain: {group: λ}}) of every coefficient set, for --objective
    coefficient_sets: dict[str, tuple[str | None, str, str, dict[str, dict[str, float]]]] = {}
    if args.coefficients:
        names_tv, stacks = task_vectors(theta0, to_merge)
        for label, entry in json.loads(args.coefficients.read_text()).items():
            groups, column = group_index(family, list(theta0), entry["granularity"])
            lam = coefficient_tensor(entry["coefficients"], names_tv, groups)
            candidates[label] = merged_weights(theta0, stacks, lam, column)
            coefficient_sets[label] = (None, "task_arithmetic", entry["granularity"], entry["coefficients"])
    timings: dict[str, dict] = {}
    for label, config in {
        f"MergeRec {granularity}-wise ({init} init{f', {preset} preset' if preset else ''})": mergerec_config(
            preset, init, granularity)
        for preset in presets
        for init in (name.strip() for name in args.inits.split(",") if name.strip())
        for granularity in (g.strip() for g in args.granularities.split(",") if g.strip())
    }.items():
        weights, report = mergerec(family, theta0, to_merge, {n: features[n] for n in merged_names}, config)
        candidates[label] = weights
        coefficient_sets[label] = (config.preset, config.init_method, config.granularity, report.coefficients)
        timings[label] = {
            "steps": config.steps,
            "optimization_seconds": round(report.optimization_seconds, 2),
            "teacher_seconds": round(report.teacher_seconds, 2),
            "coefficients": report.coefficients,
            "loss_first_last": [report.loss_curve[0], report.loss_curve[-1]] if report.loss_curve else [],
            "chosen_start": report.chosen_start,
            "start_objectives": report.start_objectives,
        }
        logger.info("%s: %s", label, timings[label])
    oracle: dict[str, dict] = {}
    if args.oracle_grid:
        grid = [float(v) for v in args.oracle_grid.split(",")]
        label = f"oracle {args.oracle_granularity}-wise λ (real val users; not private)"
        candidates[label], coefficients, val_recall = oracle_coefficients(
            family, theta0, to_merge, domains, features, grid, args.oracle_sweeps, args.oracle_granularity)
        oracle[label] = {"coefficients": coefficients, "val_recall@10": round(val_recall, 4)}
        coefficient_sets[label] = (None, "task_arithmetic", args.oracle_granularity, coefficients)
    objective: dict[str, float] = {}
    if args.objective:
        for preset, init, granularity in sorted({(p or "", i, g) for p, i, g, _ in coefficient_sets.values()}):
            evaluator = PseudoUserObjective(
                family, theta0, to_merge, {n: features[n] for n in merged_names},
                mergerec_config(preset or None, init, granularity))
            for label, (p, i, g, coefficients) in coefficient_sets.items():
                if (p or "", i, g) == (preset, init, granularity):
                    lam = coefficient_tensor(coefficients, evaluator.domains, evaluator.groups)
                    objective[label] = evaluator.mean_loss(lam)
                    logger.info("pseudo-user objective of %s: %.4f", label, objective[label])
            del evaluator  # its teacher tables are n_d x n_d per domain
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    results: dict[str, dict[str, tuple[float, float]]] = {}
    for label, weights in candidates.items():
        own = label.removeprefix("individual ") if label.startswith("individual ") else None
        results[label] = {}
        for n in names:
            if own is not None and n != own and n != args.holdout:
                continue  # individuals: in-domain, plus zero-shot on the held-out domain
            results[label][n] = evaluate(family, weights, domains[n], features[n])
        logger.info("%s: %s", label, results[label])
    in_domain = {n: results[f"individual {n}"][n] for n in merged_names}

    header = [f"{n}{' (held out)' if n == args.holdout else ''} R@10 / N@10" for n in names]
    lines = ["| model | " + " | ".join(header) + " | avg merged R@10 / N@10 |", "|---" * (len(names) + 2) + "|"]

    def row(label: str, cells: dict[str, tuple[float, float]]) -> str:
        shown = [f"{cells[n][0]:.4f} / {cells[n][1]:.4f}" if n in cells else "–" for n in names]
        merged_cells = [cells[n] for n in merged_names if n in cells]
        avg = (f"{np.mean([c[0] for c in merged_cells]):.4f} / {np.mean([c[1] for c in merged_cells]):.4f}"
               if len(merged_cells) == len(merged_names) else "–")
        return f"| {label} | " + " | ".join(shown) + f" | {avg} |"

    lines.append(row("individual (in-domain)", in_domain))
    for label, cells in results.items():
        lines.append(row(label, cells))
    lines.append("")
    for label, t in timings.items():
        starts = (f"; objective per start {json.dumps(t['start_objectives'])}, kept {t['chosen_start']!r}"
                  if t["start_objectives"] else "")
        lines.append(f"- {label}: {t['steps']} steps in {t['optimization_seconds']} s "
                     f"(teacher scores {t['teacher_seconds']} s){starts}; coefficients `{json.dumps(t['coefficients'])}`")
    for label, o in oracle.items():
        lines.append(f"- {label}: coefficients `{json.dumps(o['coefficients'])}`, mean val R@10 {o['val_recall@10']}")
    for label, value in objective.items():
        lines.append(f"- pseudo-user objective (mean over every pseudo-user) of {label}: {value:.4f}")
    lines.append(f"- peak resident memory of the process: {peak_mib:.0f} MiB; torch threads: {torch.get_num_threads()}; "
                 f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    lines.append(f"- family `{args.family}` settings: `{json.dumps(family.config(), default=str)}`")
    lines.append(f"- individual training: {json.dumps(training_info, default=str)}")
    lines.append(f"- arguments: `{' '.join(sys.argv[1:])}`")
    report_text = "\n".join(lines)
    print(report_text)
    if args.markdown_out:
        args.markdown_out.parent.mkdir(parents=True, exist_ok=True)
        args.markdown_out.write_text(report_text + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": results, "timings": timings, "oracle": oracle, "objective": objective,
                                             "peak_mib": peak_mib,
                                             "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
