"""Results of a run: results.json, results.csv, PNG plots and a printed summary table.

``results.json`` holds ``models.<name>.<domain>.{recall@K, ndcg@K, ..._masked, users}`` and
``models.<name>.average`` (unweighted mean over the training domains; held-out domains are listed in ``held_out``
and evaluated zero-shot), ``fedavg_curve`` (per round: cumulative bytes and average metrics), ``oneshot_bytes``,
``bytes.<domain>.{sent, received}`` (client's view), ``timings_s`` per phase, ``train_metrics`` (one-shot
training, per domain), the resolved ``config`` and package ``versions``; a ``--resume`` run adds ``resumed``.

Next to it the run folder holds ``theta0.safetensors``, ``joint.safetensors`` (if the joint oracle ran) and
``clients/<domain>.safetensors`` (each accepted one-shot update, saved as it arrived; see :mod:`fedmerge.storage`).
"""

from __future__ import annotations

import csv
import io
import logging
import platform
from datetime import datetime, timezone
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
MODEL_ORDER = ("theta0", "individual", "average", "task_arithmetic", "ties", "dare", "pcb", "mergerec_taskwise",
               "mergerec_layerwise", "mergerec_tensorwise", "fedavg", "joint")
VERSION_PACKAGES = ("fedmerge", "flwr", "torch", "numpy", "transformers", "ray")
RESULTS_FILE = "results.json"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def ordered_model_names(models: Mapping[str, Any]) -> list[str]:
    known = [m for m in MODEL_ORDER if m in models]
    return known + sorted(m for m in models if m not in known)


def finalize(out: dict[str, Any], cfg: Mapping[str, Any], engine: str) -> dict[str, Any]:
    """Add run identity, resolved config and versions; models in a stable order."""
    out = dict(out)
    out["models"] = {m: out["models"][m] for m in ordered_model_names(out["models"])}
    return {"run": {"name": cfg["run"]["name"], "seed": cfg["run"]["seed"], "engine": engine}, **out,
            "config": cfg, "versions": package_versions()}


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


def summary_table(results: Mapping[str, Any], metric: str = "recall@10") -> str:
    """Plain-text table: one row per model, one column per domain plus the average."""
    domains = [*results["domains"], "average"]
    held_out = set(results.get("held_out", []))
    headers = ["model"] + [f"{d}*" if d in held_out else d for d in domains]
    lines = []
    for model, per_domain in results["models"].items():
        cells = [model]
        for d in domains:
            value = per_domain.get(d, {}).get(metric) if isinstance(per_domain.get(d), Mapping) else None
            cells.append("-" if value is None else f"{value:.4f}")
        lines.append(cells)
    widths = [max(len(str(row[i])) for row in [headers, *lines]) for i in range(len(headers))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    note = f"{metric} ({results['run']['engine']} engine)" + (" ; * = held out, zero-shot" if held_out else "")
    return "\n".join([note, fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def archive_results(out_dir: str | Path) -> Path | None:
    """Rename ``out_dir/results.json`` (if any) to ``results.<UTC time>.json`` so a new run cannot overwrite it."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"results.{stamp}.json")
    path.replace(target)
    logger.info("kept the earlier %s as %s", path, target)
    return target


def write_results(results: Mapping[str, Any], out_dir: str | Path, metric: str | None = None) -> Path:
    """Write results.json and results.csv (each atomically) and the plots into ``out_dir``; returns the JSON path."""
    from fedmerge.storage import write_bytes_atomic, write_json_atomic

    out = Path(out_dir)
    path = write_json_atomic(out / RESULTS_FILE, results)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["model", "domain", "held_out", "metric", "value"])
    writer.writeheader()
    writer.writerows(metric_rows(results))
    write_bytes_atomic(out / "results.csv", table.getvalue().encode("utf-8"))
    metric = metric or results.get("config", {}).get("eval", {}).get("primary", "recall@10")
    plot_domains(results, out / "per_domain.png", metric)
    if results.get("fedavg_curve"):
        plot_communication(results, out / "communication.png", metric)
    logger.info("wrote %s, results.csv and plots", path)
    return path


def plot_domains(results: Mapping[str, Any], path: Path, metric: str) -> None:
    """Grouped bars: per domain (and average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = [*results["domains"], "average"]
    models = list(results["models"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) * max(1, len(models)) / 4), 4))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [results["models"][model].get(d, {}).get(metric, np.nan) for d in domains]
        ax.bar(np.arange(len(domains)) + i * width, values, width, label=model)
    held_out = set(results.get("held_out", []))
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{d}\n(held out)" if d in held_out else d for d in domains])
    ax.set_ylabel(metric)
    if models:  # a run that failed before any evaluation has none
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_communication(results: Mapping[str, Any], path: Path, metric: str) -> None:
    """FedAvg's average metric vs cumulative bytes, with the one-shot merges as points at one round's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["fedavg_curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["bytes"] for c in curve], [c.get(metric, float("nan")) for c in curve], "o-", label="fedavg (per round)")
    for model, per_domain in results["models"].items():
        if model in ("fedavg", "individual", "theta0", "joint") or metric not in per_domain.get("average", {}):
            continue
        ax.scatter([results["oneshot_bytes"]], [per_domain["average"][metric]], label=model, marker="x")
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated (all clients, both directions)")
    ax.set_ylabel(f"average {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
