"""Results of a run: results.json, results.csv, PNG plots and a printed summary table.

``results.json`` holds ``models.<name>.<domain>.{recall@K, ndcg@K, ..._masked, users}`` and
``models.<name>.average`` (unweighted mean over the training domains; held-out domains are listed in ``held_out``
and evaluated zero-shot), ``fedavg_curve`` (per round: FedAvg's own cumulative training traffic in bytes and the
average metrics), ``oneshot_bytes`` (the one-shot phase's traffic, all a one-shot merge costs),
``bytes.<domain>.{sent, received}`` (client's view), ``timings_s`` per phase, ``train_metrics`` (one-shot
training, per domain: ``epochs``, ``stop_reason`` in ``max_epochs`` / ``early_stopping`` / ``max_seconds``, ...),
``fedavg_train_metrics`` (per round, per domain), ``server_train_metrics`` (the server's own trainings, when run:
``theta0_pretraining``, ``joint``), ``warnings`` (a training cut by the wall-clock cap
``max_seconds``, a training client left out of the merges or a FedAvg round; printed under the summary table), the
resolved ``config`` and package ``versions``; a ``--resume`` run adds ``resumed``.

Next to it the run folder holds ``models/<name>.safetensors`` for every evaluated shared model (θ₀, each merge,
FedAvg's final model, the joint oracle), each saved as soon as it is built, and ``clients/<domain>.safetensors``
(each one-shot update that passed the format checks, saved as it arrived — one the norm test then refuses keeps
its file, its card marked ``rejected``; see :mod:`fedmerge.storage`), each with a ``.json`` model card
(:mod:`fedmerge.recommender`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.provenance import package_versions
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)
MODEL_ORDER = ("theta0", "individual", "average", "task_arithmetic", "ties", "dare", "pcb", "mergerec_taskwise",
               "mergerec_layerwise", "mergerec_tensorwise", "fedavg", "joint")
RESULTS_FILE = "results.json"


def ordered_model_names(models: Mapping[str, Any]) -> list[str]:
    known = [m for m in MODEL_ORDER if m in models]
    return known + sorted(m for m in models if m not in known)


def finalize(out: dict[str, Any], cfg: Scenario, engine: str) -> dict[str, Any]:
    """Add run identity, resolved config and versions; models in a stable order. A NaN or infinite number anywhere
    (a diverged loss curve in a merge report, a metric) is written as null and named in ``warnings``: JSON cannot hold
    it, and refusing the file would lose every other result of the run."""
    out = dict(out)
    out["models"] = {m: out["models"][m] for m in ordered_model_names(out["models"])}
    out, where = without_non_finite(out)
    if where:
        shown = ", ".join(where[:10]) + (f" and {len(where) - 10} more" if len(where) > 10 else "")
        out["warnings"] = [*out.get("warnings", []), f"NaN or infinite values written as null: {shown}"]
    return {"run": {"name": cfg.run.name, "seed": cfg.run.seed, "engine": engine}, **out,
            "config": cfg.to_mapping(), **resolved_model_params(cfg), "versions": package_versions()}


def resolved_model_params(cfg: Scenario) -> dict[str, Any]:
    """``{"model_params_resolved": every family parameter with its value}``: ``config.model.params`` holds only the
    scenario's keys, so a later change of a default would leave an old results.json silent on what was trained.
    Empty when the family cannot be built (the run's own error says why; its results are kept)."""
    try:
        return {"model_params_resolved": cfg.model.make_family().config()}
    except FedmergeError:
        return {}


def without_non_finite(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """(``value`` with every NaN / ±inf number in its dicts, lists and tuples replaced by None, the paths replaced)."""
    if isinstance(value, Mapping):
        pairs = [(k, without_non_finite(v, f"{path}.{k}" if path else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, found) in pairs for p in found]
    if isinstance(value, (list, tuple)):
        items = [without_non_finite(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, found in items for p in found]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return None, [path]
    return value, []


def metric_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, domain or 'average', metric)."""
    held_out = set(results.get("held_out", []))
    rows = []
    for model, per_domain in results["models"].items():
        for domain, metrics in per_domain.items():
            if not isinstance(metrics, Mapping):
                continue
            for metric, value in metrics.items():
                rows.append({"model": model, "domain": domain, "held_out": domain in held_out,
                             "metric": metric, "value": value})
    return rows


NON_PRIVATE_MARK = "†"


def summary_table(results: Mapping[str, Any], metric: str = "recall@10") -> str:
    """Plain-text table: one row per model, one column per domain plus the average; a model trained on pooled
    private data (``non_private``, the joint oracle) is marked with a dagger."""
    domains = [*results["domains"], "average"]
    held_out = set(results.get("held_out", []))
    headers = ["model"] + [f"{d}*" if d in held_out else d for d in domains]
    if held_out:
        headers[-1] = "average (training domains)"
    lines = []
    for model, per_domain in results["models"].items():
        cells = [f"{model}{NON_PRIVATE_MARK}" if per_domain.get("non_private") else model]
        for d in domains:
            value = per_domain.get(d, {}).get(metric) if isinstance(per_domain.get(d), Mapping) else None
            cells.append("-" if value is None else f"{value:.4f}")
        lines.append(cells)
    masking = ("history items other than the target removed from the ranking" if metric.endswith("_masked")
               else "unmasked: history items stay in the ranking")
    notes = [f"{metric} ({results['run']['engine']} engine)", masking]
    if held_out:
        notes.append("* = held out, zero-shot")
    if any(m.get("non_private") for m in results["models"].values()):
        notes.append(f"{NON_PRIVATE_MARK} = trained on the pooled private data (non-private reference)")
    warnings = [f"WARNING: {w}" for w in results.get("warnings", [])]
    return "\n".join([" ; ".join(notes), *aligned_rows([headers, *lines]), *warnings])


def aligned_rows(rows: list[list[str]]) -> list[str]:
    """Rows as left-aligned columns, a dashed rule under the first."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(rows[0]), fmt(["-" * w for w in widths]), *map(fmt, rows[1:])]


def timings_table(results: Mapping[str, Any]) -> str:
    """The run's phase timings, one row per phase, in seconds."""
    rows = [[phase, f"{seconds:.1f}"] for phase, seconds in results.get("timings_s", {}).items()]
    return "\n".join(["timings", *aligned_rows([["phase", "seconds"], *rows])])


def run_summary(results: Mapping[str, Any], primary: str = "recall@10") -> str:
    """What ``fedmerge simulate`` prints: the primary metric's table, NDCG@10's, and the timings."""
    metrics = list(dict.fromkeys([primary, "ndcg@10"]))
    seed = results["run"].get("seed")
    header = ([] if seed is None else
              [f"seed {seed}, a single run: no interval (several seeds give means and 95 % intervals: "
               "`fedmerge simulate --seeds 0-2`)"])
    return "\n\n".join([*header, *(summary_table(results, m) for m in metrics), timings_table(results)])


def archive_results(out_dir: str | Path) -> Path | None:
    """Rename ``out_dir/results.json`` (if any) to ``results.<UTC time>.json`` so a new run cannot overwrite it."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    from fedmerge.storage import utc_stamp

    target = path.with_name(f"results.{utc_stamp()}.json")
    path.replace(target)
    logger.info("kept the earlier %s as %s", path, target)
    return target


def write_results(results: Mapping[str, Any], out_dir: str | Path, metric: str) -> Path:
    """Write results.json and results.csv (each atomically) and the plots of ``metric`` (the scenario's
    ``eval.primary``) into ``out_dir``; returns the JSON path."""
    from fedmerge.storage import write_bytes_atomic, write_json_atomic

    out = Path(out_dir)
    path = write_json_atomic(out / RESULTS_FILE, results)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["model", "domain", "held_out", "metric", "value"])
    writer.writeheader()
    writer.writerows(metric_rows(results))
    write_bytes_atomic(out / "results.csv", table.getvalue().encode("utf-8"))
    plot_domains(results, out / "per_domain.png", metric)
    if results.get("fedavg_curve"):
        plot_communication(results, out / "communication.png", metric)
    logger.info("wrote %s, results.csv and plots", path)
    return path


def plot_domains(
    results: Mapping[str, Any], path: Path, metric: str,
    errors: Mapping[str, Mapping[str, list[float]]] | None = None, title: str | None = None,
) -> None:
    """Grouped bars per domain (and the average), one bar per model: ``metric`` beside NDCG@10, titled with the run
    (or ``title``); the joint oracle (trained on pooled private data) is hatched and labelled non-private.
    ``errors[metric][model]`` (one half-width per domain and the average, e.g. a 95 % interval over seeds) are drawn
    as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmerge.storage import save_figure_atomic

    metrics = list(dict.fromkeys([metric, "ndcg@10"]))
    n_bars = (len(results["domains"]) + 1) * max(1, len(results["models"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(len(metrics) * max(5, 0.2 * n_bars), 4.4), squeeze=False)
    for ax, name in zip(axes[0], metrics):
        _domain_bars(ax, results, name, (errors or {}).get(name))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if labels:  # a run that failed before any evaluation has no models
        fig.legend(handles, labels, fontsize=7, ncol=min(6, len(labels)), loc="lower center")
    run = results.get("run", {})
    fig.suptitle(title or f"{run.get('name', 'run')}: per-domain {' and '.join(metrics)} "
                 f"({run.get('engine', '?')} engine, seed {run.get('seed', '?')})")
    fig.tight_layout(rect=(0, 0.08 + 0.03 * (len(labels) // 6), 1, 1))
    save_figure_atomic(fig, path)


def _domain_bars(
    ax: Any, results: Mapping[str, Any], metric: str, errors: Mapping[str, list[float]] | None = None
) -> None:
    import numpy as np

    domains = [*results["domains"], "average"]
    models = list(results["models"])
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        per_domain = results["models"][model]
        values = [per_domain.get(d, {}).get(metric, np.nan) for d in domains]
        private = not per_domain.get("non_private")
        yerr = (errors or {}).get(model)
        ax.bar(np.arange(len(domains)) + i * width, values, width, yerr=yerr, capsize=2 if yerr else 0,
               label=model if private else f"{model} (non-private)",
               hatch=None if private else "//", edgecolor=None if private else "black")
    held_out = set(results.get("held_out", []))
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{d}\n(held out)" if d in held_out else "average\n(training domains)"
                        if d == "average" and held_out else d for d in domains])
    ax.set_ylabel(metric)


ONE_SHOT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def plot_communication(results: Mapping[str, Any], path: Path, metric: str) -> None:
    """Average metric vs each method's own training traffic: FedAvg's cumulative rounds as a line, every one-shot
    merge at the one-shot phase's traffic (distinct markers and labels; they share that x). Evaluation broadcasts
    are in no method's traffic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmerge.storage import save_figure_atomic

    from matplotlib.transforms import offset_copy

    curve = results["fedavg_curve"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    megabytes = [c["bytes"] / 1e6 for c in curve]
    ax.plot(megabytes, [c.get(metric, float("nan")) for c in curve], "o-", color="black", label="fedavg (per round)")
    for c, x in zip(curve, megabytes):
        ax.annotate(f"round {c['round']}", (x, c.get(metric, float("nan"))), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    oneshot = results["oneshot_bytes"] / 1e6
    merges = [m for m, per_domain in results["models"].items()
              if m not in ("fedavg", "individual", "theta0", "joint") and metric in per_domain.get("average", {})]
    for i, model in enumerate(merges):  # same traffic: spread sideways by a few points so that none hides another
        shift = offset_copy(ax.transData, fig=fig, x=7 * (i - (len(merges) - 1) / 2), y=0, units="points")
        ax.scatter([oneshot], [results["models"][model]["average"][metric]], transform=shift, s=36, zorder=3,
                   marker=ONE_SHOT_MARKERS[i % len(ONE_SHOT_MARKERS)], label=f"{model} (one-shot)")
    ax.update_datalim([(oneshot, results["models"][m]["average"][metric]) for m in merges])  # shifted: not counted
    ax.autoscale_view()
    ax.set_xlim(0, 1.1 * max([oneshot, *megabytes]))
    ax.set_xlabel("MB exchanged by the method's own training (all clients, both directions)")
    ax.set_ylabel(f"average {metric}")
    ax.set_title(f"{results.get('run', {}).get('name', 'run')}: one-shot merges ({oneshot:.2f} MB, markers spread "
                 f"sideways) vs FedAvg", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)
