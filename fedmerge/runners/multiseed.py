"""One scenario run once per seed (``run.seeds``): ``OUT/seed-<s>/`` single-run folders, then ``OUT/aggregate.json``,
``aggregate.csv`` and ``per_domain.png`` with 95 % intervals (math in :mod:`fedmerge.runners.aggregate`).

The seed drives θ₀, every client's training, DARE's masks and MergeRec's pseudo-user sampling (and, for synthetic
data, the generated domains), and seeded DP noise (``privacy.noise_seed`` ≥ 0) moves with it (:func:`seed_config`).
With ``resume`` each seed's folder is read as :func:`resume_seed` says: a complete results.json (status ok) written
under the same configuration is kept; a complete run of another configuration is merged and evaluated again from its
saved client weights when they fit this scenario's training settings and there are no FedAvg rounds, else refused
(nothing deleted); a seed with no complete run (empty, interrupted or failed) runs from scratch, its files moved
aside.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.runners.aggregate import aggregate_runs, format_bound
from fedmerge.runners.results import RESULTS_FILE, aligned_rows
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)
AGGREGATE_FILE = "aggregate.json"


def seed_config(cfg: Scenario, seed: int) -> Scenario:
    """``cfg`` as the single run of ``seed``: ``run.seed = seed``, ``run.seeds`` emptied, and seeded DP noise
    (``privacy.noise_seed`` = b ≥ 0) moved as a privacy study moves it
    (:func:`fedmerge.privacy.study.study_noise_base`: b + 1000003·seed), so each seed draws other noise and sampling
    and the interval over seeds covers them; b < 0 (OS entropy) stays as it is."""
    from fedmerge.privacy.study import study_noise_base

    return cfg.with_changes(run={"seed": int(seed), "seeds": []},
                            privacy={"noise_seed": study_noise_base(cfg.privacy.noise_seed, seed)})


def seed_dir(out_dir: str | Path, seed: int) -> Path:
    return Path(out_dir) / f"seed-{seed}"


def finished_run(folder: Path) -> dict[str, Any] | None:
    """The folder's results.json if it is complete (status ok), whatever its configuration; else None."""
    path = folder / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("status") == "ok" else None


def completed_run(folder: Path, cfg: Scenario) -> dict[str, Any] | None:
    """The folder's results.json if it is complete (status ok) and was written under ``cfg`` (:func:`same_config`:
    the :data:`RESULT_NEUTRAL` settings may differ); else None."""
    results = finished_run(folder)
    return results if results is not None and same_config(cfg, results.get("config")) else None


# settings that change no figure of a completed run: how it is shown and named, where the embedding cache lives (not
# the reply timeouts: a client that missed one is left out and the run still completes)
RESULT_NEUTRAL = {"run": ("progress", "name"), "encoder": ("cache_dir",)}


def same_config(cfg: Scenario, recorded: Any) -> bool:
    """Whether ``recorded`` (a scenario mapping as results files hold it) is ``cfg``, the :data:`RESULT_NEUTRAL`
    settings aside and settings fedmerge gained since left at their default
    (:func:`fedmerge.config.settings_differences`)."""
    from fedmerge.config import settings_differences

    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("run"), Mapping):
        return False
    current = json.loads(json.dumps(cfg.to_mapping(), default=str))
    _, differing = settings_differences(without_result_neutral(recorded), without_result_neutral(current))
    return not differing


def without_result_neutral(table: Mapping[str, Any]) -> dict[str, Any]:
    """A scenario mapping without its :data:`RESULT_NEUTRAL` settings: what two runs must share to be one."""
    return {section: ({k: v for k, v in values.items() if k not in RESULT_NEUTRAL[section]}
                      if section in RESULT_NEUTRAL and isinstance(values, Mapping) else values)
            for section, values in table.items()}


def resume_seed(single: Scenario, engine: str, folder: Path) -> dict[str, Any]:
    """One seed of a resumed multi-seed run:

    - ``folder`` holds a complete run of this configuration: its results, kept;
    - it holds a complete run of another configuration: merged and evaluated again from its clients' saved weights
      when every training domain's were saved under this scenario's training settings and the run has no FedAvg
      rounds (as ``fedmerge simulate --resume``, which skips FedAvg); else refused (FedmergeError, nothing deleted);
    - no complete run (an empty or interrupted folder): run from scratch (its FedAvg rounds never finished, and the
      complete seeds need every client); an interrupted or failed run's files are moved beside the folder
      (``set_aside`` of :func:`fedmerge.storage.run_folder`, under the lock the new run then holds), never deleted.
    """
    from fedmerge.runners.server import load_saved_run
    from fedmerge.runners.simulation import check_or_record_data, run_scenario

    done = completed_run(folder, single)
    if done is not None:
        check_or_record_data(single, folder, resume=True)
        logger.info("seed %s: complete results in %s, kept", single.run.seed, folder)
        return done
    if finished_run(folder) is None:
        logger.info("seed %s: no complete run in %s, running from scratch", single.run.seed, folder)
        return run_scenario(single, engine=engine, out_dir=folder, set_aside=True)
    try:
        _, saved, _ = load_saved_run(single, folder)
        missing = sorted(set(single.data.training_domains()) - set(saved))
        if missing or single.baselines.fedavg_rounds:
            raise FedmergeError(f"no saved weights of {missing}" if missing else
                                f"baselines.fedavg_rounds = {single.baselines.fedavg_rounds}, which --resume skips")
    except FedmergeError as exc:
        raise FedmergeError(f"{folder} holds a complete run of another configuration, which --resume does not "
                            f"replace ({exc}); use --overwrite to replace it or another --out") from None
    logger.info("seed %s: merging again from the saved client weights in %s", single.run.seed, folder)
    return run_scenario(single, engine=engine, out_dir=folder, resume=True)


def run_seeds(
    cfg: Scenario, engine: str, out_dir: str | Path, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Run the scenario once per ``run.seeds`` entry into ``out_dir/seed-<s>/`` and write the aggregate; returns it.

    ``out_dir`` is held like a single run's (:func:`fedmerge.storage.run_folder`: locked, a non-empty folder refused
    unless ``resume`` or ``overwrite``). With ``resume`` each seed's folder is read as :func:`resume_seed` says: a
    complete run is never deleted."""
    from fedmerge.merging import METHODS
    from fedmerge.provenance import package_versions
    from fedmerge.runners.simulation import check_before_run, run_scenario
    from fedmerge.storage import check_data_outside, run_folder

    seeds = [int(s) for s in cfg.run.seeds]
    if not seeds:
        raise FedmergeError("run.seeds is empty: nothing to run per seed (use run.seed for a single run)")
    check_data_outside(cfg, out_dir)  # --overwrite would delete the scenario's own data
    if overwrite:  # before --overwrite empties out_dir (each seed's run checks its own scenario again)
        check_before_run(seed_config(cfg, seeds[0]), engine)
    runs: dict[int, dict[str, Any]] = {}
    with run_folder(out_dir, resume=resume, overwrite=overwrite):
        for seed in seeds:
            single, folder = seed_config(cfg, seed), seed_dir(out_dir, seed)
            if resume:
                runs[seed] = resume_seed(single, engine, folder)
            else:
                logger.info("seed %d: running into %s", seed, folder)
                runs[seed] = run_scenario(single, engine=engine, out_dir=folder)
        aggregate = aggregate_runs(runs, cfg.eval.primary, training_free=list(METHODS))
        # self-describing: the scenario as run, the versions (this process's, and each seed's as its results.json
        # recorded them: a resumed run keeps seeds run earlier), and each seed's folder relative to this one
        aggregate["seed_folders"] = {s: seed_dir(out_dir, s).name for s in seeds}
        aggregate["config"], aggregate["versions"] = cfg.to_mapping(), package_versions()
        aggregate["seed_versions"] = {s: runs[s].get("versions") for s in seeds}
        aggregate["warnings"] = [*aggregate.get("warnings", []), *version_warnings(aggregate["seed_versions"])]
        write_aggregate(aggregate, out_dir)
    return aggregate


# recorded for a human to check out; fedmerge_source tells two versions of the code apart
VERSION_KEYS_NOT_COMPARED = ("fedmerge_commit",)
NOT_RECORDED = "not recorded"


def version_warnings(seed_versions: Mapping[int, Mapping[str, Any] | None]) -> list[str]:
    """One warning naming every version (code digest, Python, a package) in which the seeds' runs differ, with the
    seeds of each value; none when they agree (``fedmerge_commit`` aside: the same code can sit at another commit).
    A resumed multi-seed run keeps complete seeds of the same configuration whatever code ran them."""
    keys = sorted({k for v in seed_versions.values() for k in (v or {})} - set(VERSION_KEYS_NOT_COMPARED))
    parts = []
    for key in keys:
        by_value: dict[str, list[int]] = {}
        for seed, versions in seed_versions.items():
            by_value.setdefault(str((versions or {}).get(key, NOT_RECORDED)), []).append(seed)
        if len(by_value) > 1:
            parts.append(f"{key} " + ", ".join(f"{value} (seed(s) {seeds})" for value, seeds in by_value.items()))
    if not parts:
        return []
    return ["the seeds' runs were produced by different versions (a resumed run keeps the seeds it finished "
            f"earlier): {'; '.join(parts)}; the spread over seeds mixes them (aggregate.json seed_versions)"]


def aggregate_rows(aggregate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (model, domain, metric): n, mean, std and the interval."""
    return [
        {"model": model, "domain": domain, "metric": metric,
         **{k: stats[k] for k in ("n", "mean", "std", "half_width", "low", "high")}}
        for model, per_domain in aggregate["models"].items()
        for domain, metrics in per_domain.items()
        for metric, stats in metrics.items()
    ]


def write_aggregate(aggregate: Mapping[str, Any], out_dir: str | Path) -> Path:
    """aggregate.json, aggregate.csv (each atomically) and per_domain.png with intervals, in ``out_dir``."""
    from fedmerge.storage import write_bytes_atomic, write_json_atomic

    out = Path(out_dir)
    path = write_json_atomic(out / AGGREGATE_FILE, aggregate)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["model", "domain", "metric", "n", "mean", "std", "half_width", "low",
                                               "high"])
    writer.writeheader()
    writer.writerows(aggregate_rows(aggregate))
    write_bytes_atomic(out / "aggregate.csv", table.getvalue().encode("utf-8"))
    plot_domain_intervals(aggregate, out / "per_domain.png", aggregate["metric"])
    return path


def _cell(stats: Mapping[str, Any] | None) -> str:
    if stats is None:
        return "-"
    half = stats.get("half_width")
    return f"{stats['mean']:.4f}" + ("" if half is None else f" ± {half:.4f}")


def _ratio_cell(stats: Mapping[str, Any] | None) -> str:
    """``1.0312 [1.0212, 1.0412]``: a ratio's mean and interval, each bound with the digits that tell it from 1.0
    (:func:`~fedmerge.runners.aggregate.format_bound`: ``± 0.0000`` hid an interval that excludes 1.0)."""
    if stats is None:
        return "-"
    if stats.get("half_width") is None:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} [{format_bound(stats['low'])}, {format_bound(stats['high'])}]"


def _comparison_cells(comparisons: Mapping[str, Any]) -> str:
    """``theta0 1.0312 [1.0212, 1.0412] (p=0.04); best_individual ...``: each reference's ratio interval and paired
    p."""
    parts = []
    for name, c in comparisons.items():
        p = c["test"]["p"]
        excluded = c.get("excluded_seeds", {})
        parts.append(f"{name.removeprefix('vs_')} {_ratio_cell(c['ratio'])}" + ("" if p is None else f" (p={p:.3g})")
                     + (f" [excluded seed(s) {[int(s) for s in excluded]}: {', '.join(sorted(set(excluded.values())))}]"
                        if excluded else ""))
    return "; ".join(parts)


def aggregate_summary(aggregate: Mapping[str, Any]) -> str:
    """Plain-text table (mean ± 95 % half-width over seeds, per domain and average) and the paired ratios."""
    from fedmerge.runners.results import NON_PRIVATE_MARK

    metric = aggregate["metric"]
    domains = [*aggregate["domains"], "average"]
    held_out = set(aggregate.get("held_out", []))
    non_private = set(aggregate.get("non_private", []))
    headers = ["model"] + [f"{d}*" if d in held_out else d for d in domains]
    if held_out:
        headers[-1] = "average (training domains)"
    rows = [[model + (NON_PRIVATE_MARK if model in non_private else "")]
            + [_cell(per_domain.get(d, {}).get(metric)) for d in domains]
            for model, per_domain in aggregate["models"].items()]
    notes = [f"{metric}: mean ± 95 % t-interval half-width over seeds {aggregate['seeds']}",
             *(["* = held out, zero-shot"] if held_out else []),
             *([f"{NON_PRIVATE_MARK} = trained on the pooled private data (non-private reference)"]
               if non_private & set(aggregate["models"]) else [])]
    lines = [" ; ".join(notes), *aligned_rows([headers, *rows])]
    paired = aggregate["paired"]
    if paired["merges"]:
        lines.append(f"paired per-seed ratios of the average {metric} (best training-free chosen per seed: "
                     f"{paired['best_training_free']}):")
        lines += [f"  {model}: " + _comparison_cells(comparisons) for model, comparisons in paired["merges"].items()]
    for domain, per_metric in aggregate.get("held_out_paired", {}).items():
        for held_metric, comparison in per_metric.items():
            lines.append(f"held-out {domain}*, per-seed ratios of {held_metric} (best single-domain model per seed: "
                         f"{comparison['best_individual']}):")
            lines += [f"  {model}: " + _comparison_cells(comparisons)
                      for model, comparisons in comparison["models"].items()]
    if "note" in aggregate:
        lines.append(f"note: {aggregate['note']}")
    lines += [f"WARNING: {w}" for w in aggregate.get("warnings", [])]
    return "\n".join(lines)


def plot_domain_intervals(aggregate: Mapping[str, Any], path: Path, metric: str) -> None:
    """:func:`fedmerge.runners.results.plot_domains` of the means over seeds, 95 % intervals as error bars."""
    from fedmerge.runners.results import plot_domains

    domains = [*aggregate["domains"], "average"]
    metrics = list(dict.fromkeys([metric, "ndcg@10"]))  # the panels plot_domains draws
    means = {m: {d: {k: s[k]["mean"] for k in metrics if k in s} for d, s in per_domain.items()}
             for m, per_domain in aggregate["models"].items()}
    errors = {k: {m: [(per_domain.get(d, {}).get(k) or {}).get("half_width") or 0.0 for d in domains]
                  for m, per_domain in aggregate["models"].items()} for k in metrics}
    plot_domains({"domains": aggregate["domains"], "held_out": aggregate.get("held_out", []), "models": means},
                 path, metric, errors=errors, title=f"mean over seeds {aggregate['seeds']}, 95 % t-intervals")
