"""``fedmerge privacy run``: utility of merged models under client-side DP, and a membership-inference probe.

For every ε of ``[privacy_study] epsilons`` (``inf`` = no DP: no clipping, no noise) the scenario runs in process
(:func:`fedmerge.runners.run_scenario`) with ``privacy.noise_multiplier`` = the smallest z making every client's
releases (the one-shot update plus ``baselines.fedavg_rounds`` FedAvg updates) (ε, δ)-DP at the domain level
(:mod:`fedmerge.privacy.dp`). The table reports Recall@10 of the chosen merges, averaged over the training domains.

The probe: one domain (``probe_domain``, default the first training domain) is split into members and held-out
users before training; its client trains on the members only (same family and seed as the run), and the
loss-threshold attack of :mod:`fedmerge.privacy.membership` is scored on the weights it would ship at every ε
(privatized with the same clip norm and noise multiplier). Training data of a member = train + validation items
(what the families fit on).

Writes ``DIR/privacy.json``, ``DIR/privacy.md`` (the table), ``DIR/privacy.png`` and each ε's run under
``DIR/eps-<ε>/``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.storage import write_json_atomic

logger = logging.getLogger(__name__)

STUDY_SECTION = "privacy_study"
STUDY_DEFAULTS: dict[str, Any] = {
    "epsilons": [math.inf, 8.0, 4.0, 1.0],
    "delta": 1e-5,
    "methods": ["average", "ties", "mergerec_taskwise"],
    "metric": "recall@10",
    "probe_domain": "",
    "member_fraction": 0.5,
    "probe_max_users": 2000,
    "probe_positions": "last",
}
DEFAULT_OUT = Path("runs/privacy")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("privacy", help="differential privacy on shipped weights: utility table and membership probe")
    actions = parser.add_subparsers(dest="privacy_action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run the privacy study of a scenario (Recall@10 per ε and method, probe AUC)")
    run.add_argument("--scenario", default="privacy", help="scenario name under scenarios/ or a .toml path")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                     help="override a scenario key, e.g. privacy.clip_norm=0.5 or privacy_study.epsilons=[inf,1]")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the per-ε runs (eps-*/) an earlier study left in --out (refused otherwise)")
    run.set_defaults(func=run_privacy)


def load_study(scenario: str, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(resolved scenario config, study settings): the ``[privacy_study]`` table is this command's, the rest is a scenario."""
    from fedmerge.config import apply_overrides, merge_into_defaults, parse_value, scenario_path

    path = scenario_path(scenario)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FedmergeError(f"scenario {path}: invalid TOML: {exc}") from exc
    study = dict(STUDY_DEFAULTS)
    prefix = f"{STUDY_SECTION}."
    items = [(k, v, str(path)) for k, v in raw.pop(STUDY_SECTION, {}).items()]
    for item in overrides:
        if item.startswith(prefix):
            key, sep, text = item[len(prefix):].partition("=")
            if not sep:
                raise FedmergeError(f"override {item!r} must look like {prefix}key=value")
            items.append((key.strip(), parse_value(text.strip()), f"override {item!r}"))
    for key, value, source in items:
        if key not in STUDY_DEFAULTS:
            raise FedmergeError(f"{source}: unknown key {prefix}{key}; valid: {sorted(STUDY_DEFAULTS)}")
        study[key] = value
    cfg = merge_into_defaults(raw, source=str(path))
    cfg = apply_overrides(cfg, [o for o in overrides if not o.startswith(prefix)])
    validate_study(study, cfg)
    return cfg, study


def validate_study(study: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Clear errors for study settings the sweep cannot run with."""
    from fedmerge.config import training_domains

    eps = study["epsilons"]
    if not isinstance(eps, list) or not eps or not all(isinstance(e, (int, float)) and e > 0 for e in eps):
        raise FedmergeError(f"{STUDY_SECTION}.epsilons must be a non-empty list of numbers > 0 (inf allowed), got {eps!r}")
    if not 0 < float(study["delta"]) < 1:
        raise FedmergeError(f"{STUDY_SECTION}.delta must lie in (0, 1), got {study['delta']!r}")
    unknown = [m for m in study["methods"] if m not in cfg["merge"]["methods"]]
    if unknown:
        raise FedmergeError(f"{STUDY_SECTION}.methods {unknown} are not in merge.methods {cfg['merge']['methods']}")
    if study["probe_domain"] and study["probe_domain"] not in training_domains(cfg):
        raise FedmergeError(f"{STUDY_SECTION}.probe_domain {study['probe_domain']!r} is not a training domain "
                            f"{training_domains(cfg)}")
    if not 0 < float(study["member_fraction"]) < 1:
        raise FedmergeError(f"{STUDY_SECTION}.member_fraction must lie in (0, 1), got {study['member_fraction']!r}")
    if int(study["probe_max_users"]) < 2:
        raise FedmergeError(f"{STUDY_SECTION}.probe_max_users must be >= 2, got {study['probe_max_users']!r}")
    if study["probe_positions"] not in ("last", "all"):
        raise FedmergeError(f"{STUDY_SECTION}.probe_positions must be 'last' or 'all', got {study['probe_positions']!r}")
    if cfg["privacy"]["clip_norm"] <= 0:
        raise FedmergeError(f"privacy.clip_norm must be > 0, got {cfg['privacy']['clip_norm']}")


def releases_per_client(cfg: Mapping[str, Any]) -> int:
    """Updates each client ships in a run: the one-shot update plus one per FedAvg round (composed in the accounting)."""
    return 1 + int(cfg["baselines"]["fedavg_rounds"])


def dp_config(cfg: Mapping[str, Any], epsilon: float, delta: float) -> tuple[dict[str, Any], float]:
    """(config with client-side DP calibrated to (ε, δ) over the run's releases, noise multiplier z); ε = ∞: DP off."""
    from fedmerge.privacy import noise_multiplier_for

    out = copy.deepcopy(dict(cfg))
    if math.isinf(epsilon):
        out["privacy"] = {**out["privacy"], "enabled": False, "noise_multiplier": 0.0}
        return out, 0.0
    z = noise_multiplier_for(epsilon, delta, rounds=releases_per_client(cfg))
    out["privacy"] = {**out["privacy"], "enabled": True, "noise_multiplier": z}
    return out, z


def epsilon_label(epsilon: float) -> str:
    """"inf" or the number (results are JSON, which has no infinity)."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def utility_sweep(
    cfg: Mapping[str, Any], study: Mapping[str, Any], out_dir: Path, overwrite: bool = False
) -> list[dict[str, Any]]:
    """One in-process run per ε (``overwrite``: replace an earlier study's ``eps-*/`` run folders); per ε the metric of every study method (average over training domains and per domain)."""
    from fedmerge.runners import run_scenario

    rows = []
    for epsilon in study["epsilons"]:
        run_cfg, z = dp_config(cfg, float(epsilon), float(study["delta"]))
        start = time.perf_counter()
        logger.info("privacy study: ε=%s, noise multiplier %.4g, clip norm %g", epsilon_label(epsilon), z,
                    cfg["privacy"]["clip_norm"])
        results = run_scenario(run_cfg, engine="inprocess", out_dir=out_dir / f"eps-{epsilon_label(epsilon)}",
                               overwrite=overwrite)
        metric = study["metric"]
        models = results["models"]
        row: dict[str, Any] = {
            "epsilon": epsilon_label(epsilon),
            "noise_multiplier": z,
            "noise_std": z * cfg["privacy"]["clip_norm"],
            "seconds": round(time.perf_counter() - start, 1),
            "metric": {m: models[m]["average"].get(metric) for m in study["methods"] if m in models},
            "per_domain": {m: {d: v.get(metric) for d, v in models[m].items() if d != "average" and isinstance(v, Mapping)}
                           for m in study["methods"] if m in models},
        }
        for reference in ("theta0", "individual"):
            if reference in models:
                row["metric"][reference] = models[reference]["average"].get(metric)
        coefficients = {m: results["merge_report"][m].get("coefficients") for m in study["methods"]
                        if isinstance(results.get("merge_report", {}).get(m), Mapping)}
        if coefficients:
            row["mergerec_coefficients"] = coefficients
        rows.append(row)
    return rows


def _subsample(seqs: Sequence[np.ndarray], limit: int, seed: int) -> list[np.ndarray]:
    if len(seqs) <= limit:
        return list(seqs)
    keep = np.sort(np.random.default_rng(seed).choice(len(seqs), size=limit, replace=False))
    return [seqs[i] for i in keep]


def membership_sweep(cfg: Mapping[str, Any], study: Mapping[str, Any]) -> dict[str, Any]:
    """Probe AUC against the member-trained client's weights at every ε (and against θ₀ as a chance-level control)."""
    from fedmerge.config import training_domains
    from fedmerge.privacy import membership_auc, privatize_update, split_members, task_vector_norm
    from fedmerge.runners.client import client_train, family_of, item_features, load_named_domain
    from fedmerge.runners.server import initial_weights

    name = study["probe_domain"] or training_domains(cfg)[0]
    seed = int(cfg["run"]["seed"])
    domain = load_named_domain(cfg, name)
    members, nonmembers = split_members(domain, float(study["member_fraction"]), seed=seed)
    family = family_of(cfg)
    features = item_features(cfg, domain.catalog, family)
    theta0 = initial_weights(cfg)
    no_dp = {**cfg, "privacy": {**cfg["privacy"], "enabled": False}}
    start = time.perf_counter()
    trained, _ = client_train(members, theta0, no_dp, features=features)
    train_seconds = time.perf_counter() - start
    limit = int(study["probe_max_users"])
    member_seqs = _subsample(members.train_with_val(), limit, seed)
    nonmember_seqs = _subsample(nonmembers.train_with_val(), limit, seed + 1)
    positions = study["probe_positions"]
    clip = float(cfg["privacy"]["clip_norm"])

    def auc(weights: Mapping[str, Any]) -> float:
        return membership_auc(family, dict(weights), features, member_seqs, nonmember_seqs, positions=positions)

    rows = []
    for epsilon in study["epsilons"]:
        _, z = dp_config(cfg, float(epsilon), float(study["delta"]))
        shipped = trained if math.isinf(epsilon) else privatize_update(theta0, trained, clip, z, seed=seed)
        rows.append({"epsilon": epsilon_label(epsilon), "noise_multiplier": z, "auc": auc(shipped)})
        logger.info("membership probe on %s, ε=%s: AUC %.4f", name, epsilon_label(epsilon), rows[-1]["auc"])
    return {
        "domain": name,
        "members": members.n_users,
        "nonmembers": nonmembers.n_users,
        "probed_per_group": [len(member_seqs), len(nonmember_seqs)],
        "positions": positions,
        "update_norm": task_vector_norm(theta0, trained),
        "train_seconds": round(train_seconds, 1),
        "theta0_auc": auc(theta0),
        "rows": rows,
    }


def markdown_table(
    utility: Sequence[Mapping[str, Any]], probe: Mapping[str, Any], study: Mapping[str, Any], clip_norm: float,
    releases: int,
) -> str:
    """The study table: one row per ε; noise, the metric of each method and reference, the probe's AUC."""
    columns = list(dict.fromkeys(c for row in utility for c in row["metric"]))
    auc_by_eps = {row["epsilon"]: row["auc"] for row in probe["rows"]}
    header = ["ε", "z = σ/C", *[f"{study['metric']} {c}" for c in columns], f"probe AUC ({probe['domain']})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in utility:
        cells = ["∞ (no DP)" if row["epsilon"] == "inf" else row["epsilon"], f"{row['noise_multiplier']:.3f}"]
        cells += ["-" if row["metric"].get(c) is None else f"{row['metric'][c]:.4f}" for c in columns]
        probe_auc = auc_by_eps.get(row["epsilon"])
        cells.append("-" if probe_auc is None else f"{probe_auc:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = (
        f"\nδ = {study['delta']:g}, clip norm C = {clip_norm:g}, {releases} release(s) per client composed; "
        f"domain-level DP (unit: a client's whole data set, add/remove). Probe: loss-threshold attack on "
        f"{probe['domain']} ({probe['probed_per_group'][0]} members vs {probe['probed_per_group'][1]} held-out users, "
        f"'{probe['positions']}' position(s)); AUC against θ₀ = {probe['theta0_auc']:.3f}; "
        f"‖τ‖ of the member-trained update = {probe['update_norm']:.3g}."
    )
    return "\n".join(lines) + "\n" + notes + "\n"


def plot_study(utility: Sequence[Mapping[str, Any]], probe: Mapping[str, Any], metric: str, path: Path) -> None:
    """Left: metric vs ε per method; right: probe AUC vs ε (ε axis categorical, ∞ first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["∞" if r["epsilon"] == "inf" else r["epsilon"] for r in utility]
    x = np.arange(len(labels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(c for row in utility for c in row["metric"]):
        values = [np.nan if r["metric"].get(method) is None else r["metric"][method] for r in utility]
        left.plot(x, values, "o-" if method not in ("theta0", "individual") else "x--", label=method)
    left.set(xticks=x, xticklabels=labels, xlabel="ε (domain-level, δ fixed)", ylabel=f"{metric} (avg over domains)")
    left.legend(fontsize=8)
    auc_by_eps = {r["epsilon"]: r["auc"] for r in probe["rows"]}
    right.plot(x, [auc_by_eps.get(r["epsilon"], np.nan) for r in utility], "o-", label=f"loss attack on {probe['domain']}")
    right.axhline(0.5, color="grey", linestyle=":", label="chance")
    right.axhline(probe["theta0_auc"], color="grey", linestyle="--", linewidth=0.8, label="against θ₀")
    right.set(xticks=x, xticklabels=labels, xlabel="ε", ylabel="membership AUC")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_privacy(args: argparse.Namespace) -> int:
    cfg, study = load_study(args.scenario, args.overrides)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = float(cfg["privacy"]["clip_norm"])
    releases = releases_per_client(cfg)
    utility = utility_sweep(cfg, study, out_dir, overwrite=args.overwrite)
    study_json = {**study, "epsilons": [epsilon_label(e) for e in study["epsilons"]]}
    write_json_atomic(out_dir / "privacy.json", {"study": study_json, "utility": utility})  # kept if the probe fails
    probe = membership_sweep(cfg, study)
    report = {"study": study_json, "clip_norm": clip, "releases_per_client": releases, "utility": utility, "probe": probe,
              "scenario": cfg}
    write_json_atomic(out_dir / "privacy.json", report)
    table = markdown_table(utility, probe, study, clip, releases)
    (out_dir / "privacy.md").write_text(table)
    plot_study(utility, probe, study["metric"], out_dir / "privacy.png")
    print(table)
    print(f"wrote {out_dir / 'privacy.json'}, privacy.md and privacy.png")
    return 0
