"""Aggregation of one scenario run once per seed: means, spreads, 95 % intervals and paired merge comparisons.

Pure functions over the per-seed ``results.json`` dicts (``{seed: results}``); nothing here runs or writes anything.

For n seeds with values x_1..x_n of one model × domain × metric:

    mean  x̄ = Σ x_s / n,   std  s = sqrt(Σ (x_s − x̄)² / (n − 1)),
    95 % interval  x̄ ± t_{0.975, n−1} · s / √n        (Student's t: the seeds are a small sample)

Paired comparisons use the per-seed average over the training domains of the primary metric. For a merge m with
averages m_s, a reference r with r_s (the same seed, so the same θ₀ and client models):

    ratio_s = m_s / r_s,   the arithmetic mean of the per-seed ratios and its t-interval as above,
    paired t-test on d_s = m_s − r_s  (scipy.stats.ttest_rel: t = d̄ / (s_d / √n), n − 1 degrees of freedom).

These are two tests of "no difference": the interval is on the ratios, the p-value on the differences, so near the
boundary they can disagree (an interval covering 1.0 with p < 0.05, or the reverse); fedmerge's README reads the
ratio interval (covering 1.0 = a tie). A seed whose reference is 0 (or not a finite number) has no ratio: it is left
out of the ratio's interval and named in ``excluded_seeds``; the paired test keeps every seed. A metric that some
seed could not report (NaN, stored as null in results.json) is left out of the aggregate.

References: ``best_training_free`` - per seed, the best registry method on that seed's average (every one the run
made: average, task arithmetic, TIES, DARE, PCB and their variants, the robust median / trimmed mean / clipped
average); choosing it per seed, after seeing the test metric, is the optimistic baseline, so a merge's ratio to it
is conservative - and ``individual`` - each domain's own model. With one seed, std, intervals and tests are null
and ``note`` says why.

A held-out domain h (``data.held_out``: catalog seen only at test time) is compared on its own zero-shot metrics, for
the primary metric and every metric at the same cut-off (recall@10 → also ndcg@10), against two references of the
same seed: θ₀ on h, and the best single training domain's model on h (``individual_<d>``, chosen per seed after
seeing the test metric: again the optimistic baseline).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedmerge.checks import is_finite_number, is_number
from fedmerge.errors import FedmergeError
from fedmerge.metrics import USERS

CONFIDENCE = 0.95
AVERAGE = "average"
# Models that are references, not merges of the clients' models.
NOT_MERGES = frozenset({"theta0", "individual", "joint"})
# results.json name prefix of a training domain's own model evaluated on a held-out domain: individual_<domain>
HELD_OUT_INDIVIDUAL_PREFIX = "individual_"
ONE_SEED_NOTE = "one seed: no spread, interval or test (run several with run.seeds / --seeds)"


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{n, mean, std, half_width, low, high, values}`` of ``values``: sample std and a Student-t interval for the
    mean (std and interval fields None for fewer than two values; half_width 0 when every value is equal), and the
    values themselves (so intervals can be recomputed when more seeds arrive)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty list of values, got {values!r}")
    mean = float(x.mean())
    if len(x) < 2:
        return {"n": 1, "mean": mean, "std": None, "half_width": None, "low": None, "high": None, "values": x.tolist()}
    std = 0.0 if np.ptp(x) == 0 else float(x.std(ddof=1))  # x.std of equal values can be 4e-17
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * std / math.sqrt(len(x)))
    return {"n": len(x), "mean": mean, "std": std, "half_width": half, "low": mean - half, "high": mean + half,
            "values": x.tolist()}


def format_bound(value: float, digits: int = 4) -> str:
    """An interval bound at ``digits`` decimals, more (up to 6) while it would round to 1 (a ratio's bound of 1.00004
    printed as 1.0000 reads as covering 1.0: a tie it is not)."""
    text = f"{value:.{digits}f}"
    while float(text) == 1.0 and value != 1.0 and digits < 6:
        digits += 1
        text = f"{value:.{digits}f}"
    return text


def paired_test(merged: Sequence[float], reference: Sequence[float]) -> dict[str, float | None]:
    """Paired t-test of ``merged`` against ``reference`` (same seeds, same order): ``{t, p}``, two-sided; None for
    fewer than two pairs or when the differences are equal up to rounding (1e-12 relative; the statistic is then
    undefined, or a rounding artefact)."""
    from scipy import stats

    a, b = np.asarray(merged, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    diff = a - b
    if len(a) < 2 or np.ptp(diff) <= 1e-12 * max(1.0, float(np.abs(diff).max())):
        return {"t": None, "p": None}
    result = stats.ttest_rel(a, b)
    return {"t": float(result.statistic), "p": float(result.pvalue)}


def _metric_keys(per_seed: Iterable[Mapping[str, Any]]) -> list[str]:
    """Metrics reported by every seed (finite numeric entries only)."""
    keys = [{k for k, v in m.items() if is_finite_number(v)} for m in per_seed]
    return sorted(set.intersection(*keys)) if keys else []


def aggregate_models(runs: Mapping[int, Mapping[str, Any]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``{model: {domain or 'average': {metric: interval(...)}}}`` over the seeds that report that model × domain
    (``users`` and other non-metric entries skipped; the domain order of the first run kept). A model's ``average``
    is left out when some seed's covers fewer training domains (:func:`partial_averages`): its mean and interval
    would mix averages over different domains."""
    if not runs:
        raise ValueError("no runs to aggregate")
    first = next(iter(runs.values()))
    partial = partial_averages(runs)
    out: dict[str, Any] = {}
    for model in first["models"]:
        per_domain: dict[str, Any] = {}
        for domain in first["models"][model]:
            if domain == AVERAGE and model in partial:
                continue
            found = [r["models"].get(model, {}).get(domain) for r in runs.values()]
            found = [m for m in found if isinstance(m, Mapping)]
            if len(found) != len(runs):
                continue
            per_domain[domain] = {k: interval([m[k] for m in found], confidence)
                                  for k in _metric_keys(found) if k != "users"}
        if per_domain:
            out[model] = per_domain
    return out


def partial_averages(
    runs: Mapping[int, Mapping[str, Any]], metric: str | None = None
) -> dict[str, dict[int, list[str]]]:
    """``{model: {seed: training domains it lacks}}`` for the models whose ``average`` covers only some training
    domains in some seed (a client rejected or its metrics left out there): that average is the mean of other
    domains than the rest's, so it is neither paired with them nor aggregated over seeds. ``metric``: a domain
    without a finite value of it counts as lacking (None: only a domain with no entry at all). Models with no
    training domain at all (a held-out domain's ``individual_<d>``) are not listed."""
    out: dict[str, dict[int, list[str]]] = {}
    for seed, run in runs.items():
        training = [d for d in run["domains"] if d not in run.get("held_out", [])]
        for model, per_domain in run["models"].items():
            missing = [d for d in training if not (isinstance(per_domain.get(d), Mapping)
                                                   and (metric is None or is_finite_number(per_domain[d].get(metric))))]
            if 0 < len(missing) < len(training):
                out.setdefault(model, {})[seed] = missing
    return out


def seed_averages(runs: Mapping[int, Mapping[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """``{model: {seed: average over the training domains of metric}}`` for models every seed reports over every
    training domain (:func:`partial_averages` are left out)."""
    first = next(iter(runs.values()))
    partial = partial_averages(runs, metric)
    return {
        m: {s: float(r["models"][m][AVERAGE][metric]) for s, r in runs.items()}
        for m in first["models"]
        if m not in partial
        and all(is_finite_number(r["models"].get(m, {}).get(AVERAGE, {}).get(metric)) for r in runs.values())
    }


def _compare(values: Mapping[int, float], reference: Mapping[int, float], confidence: float) -> dict[str, Any]:
    """Per-seed ratios ``values[s] / reference[s]``, their interval and the paired t-test of the raw values; a seed
    whose reference is 0 has no ratio and is named in ``excluded_seeds`` (never a NaN: aggregate.json is strict)."""
    seeds = list(values)
    ratios = {s: values[s] / reference[s] for s in seeds if reference[s] != 0}
    excluded = {str(s): "reference is 0" for s in seeds if s not in ratios}
    return {
        "ratios": ratios,
        "ratio": interval(list(ratios.values()), confidence) if ratios else None,
        "test": paired_test([values[s] for s in seeds], [reference[s] for s in seeds]),
        **({"excluded_seeds": excluded} if excluded else {}),
    }


def paired_comparisons(
    runs: Mapping[int, Mapping[str, Any]], metric: str, training_free: Iterable[str], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """For each merge: per-seed ratio of its average ``metric`` to the per-seed best training-free merge and to the
    individual models, the ratios' interval, and a paired t-test of the averages (see the module docstring).

    Returns ``{"best_training_free": {seed: method}, "merges": {merge: {"vs_best_training_free": {...},
    "vs_individual": {...}}}}``, each comparison ``{"ratios": {seed: r}, "ratio": interval, "test": {t, p}}``.
    """
    averages = seed_averages(runs, metric)
    seeds = list(runs)
    free = [m for m in training_free if m in averages]
    best = {s: max(free, key=lambda m: averages[m][s]) for s in seeds} if free else {}
    references: dict[str, dict[int, float]] = {}
    if best:
        references["vs_best_training_free"] = {s: averages[best[s]][s] for s in seeds}
    if "individual" in averages:
        references["vs_individual"] = averages["individual"]
    merges: dict[str, Any] = {}
    for model, values in averages.items():
        if model in NOT_MERGES:
            continue
        merges[model] = {name: _compare(values, reference, confidence) for name, reference in references.items()}
    return {"best_training_free": best, "merges": merges}


def held_out_comparisons(
    runs: Mapping[int, Mapping[str, Any]], metrics: Iterable[str], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """For each held-out domain and metric: every model's per-seed ratio to θ₀ and to the best single-domain model
    on that domain (see the module docstring).

    Returns ``{domain: {metric: {"best_individual": {seed: model}, "models": {model: {"vs_theta0": {...},
    "vs_best_individual": {...}}}}}}``; models not reported on the domain by every seed are left out.
    """
    first = next(iter(runs.values()))
    out: dict[str, Any] = {}
    for domain in first.get("held_out", []):
        out[domain] = {}
        for metric in metrics:
            values: dict[str, dict[int, float]] = {}
            for model in first["models"]:
                found = [r["models"].get(model, {}).get(domain, {}).get(metric) for r in runs.values()]
                if all(is_finite_number(v) for v in found):
                    values[model] = {s: float(v) for s, v in zip(runs, found)}
            singles = [m for m in values if m.startswith(HELD_OUT_INDIVIDUAL_PREFIX)]
            best = {s: max(singles, key=lambda m: values[m][s]) for s in runs} if singles else {}
            references: dict[str, dict[int, float]] = {}
            if "theta0" in values:
                references["vs_theta0"] = values["theta0"]
            if best:
                references["vs_best_individual"] = {s: values[best[s]][s] for s in runs}
            models = {
                model: {name: _compare(v, ref, confidence) for name, ref in references.items()}
                for model, v in values.items() if model != "theta0" and not model.startswith(HELD_OUT_INDIVIDUAL_PREFIX)
            }
            out[domain][metric] = {"best_individual": best, "models": models}
    return out


def same_cutoff_metrics(metric: str, runs: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """``metric`` and the other metrics reported at its cut-off (``recall@10`` → ``[recall@10, ndcg@10]``)."""
    cutoff = metric.partition("@")[2]
    first = next(iter(runs.values()))
    names = {k for per_domain in first["models"].values() for m in per_domain.values() if isinstance(m, Mapping)
             for k in m if k.partition("@")[2] == cutoff}
    return [metric, *sorted(names - {metric})]


def aggregate_runs(
    runs: Mapping[int, Mapping[str, Any]], metric: str, training_free: Iterable[str] | None = None,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The whole aggregate: seeds, domains, per model × domain × metric intervals, the paired comparisons on
    ``metric`` (FedmergeError when no run reports it: a misspelt name gave empty comparisons), and every seed's
    warnings (prefixed with the seed). ``training_free``: the merges the "best training-free" reference is chosen
    from (default: every registry method)."""
    if not runs:
        raise FedmergeError("no runs to aggregate")
    first = next(iter(runs.values()))
    reported = {m for r in runs.values() for per_domain in r.get("models", {}).values()
                for metrics in per_domain.values() if isinstance(metrics, Mapping) for m in metrics}
    if metric not in reported:
        raise FedmergeError(f"metric {metric!r} is not in the runs' results; valid: {sorted(reported - {USERS})}")
    if training_free is None:
        from fedmerge.merging import METHODS

        training_free = list(METHODS)
    return {
        "seeds": list(runs),
        "metric": metric,
        "confidence": confidence,
        "interval": "Student-t interval of the mean over seeds",
        "best_training_free_choice": "per seed (the best registry merge on that seed's average; optimistic baseline)",
        "domains": list(first["domains"]),
        "held_out": list(first.get("held_out", [])),
        "models": aggregate_models(runs, confidence),
        # models trained on pooled private data (the joint oracle): a reference, marked in every table
        "non_private": [m for m, per_domain in first["models"].items() if per_domain.get("non_private")],
        "paired": paired_comparisons(runs, metric, training_free, confidence),
        "held_out_paired": held_out_comparisons(runs, same_cutoff_metrics(metric, runs), confidence),
        "warnings": [*(f"seed {s}: {w}" for s, r in runs.items() for w in r.get("warnings", [])),
                     *missing_model_warnings(runs), *missing_cell_warnings(runs, metric)],
        **({"note": ONE_SEED_NOTE} if len(runs) < 2 else {}),
    }


def missing_cell_warnings(runs: Mapping[int, Mapping[str, Any]], metric: str) -> list[str]:
    """One line per model × domain that some seeds report and others do not (left out of :func:`aggregate_models`),
    per metric some seeds of a kept cell do not report (:func:`missing_metric_warnings`), and per model whose average
    covers only some training domains in some seed (:func:`partial_averages`: left out of the paired comparisons)."""
    lines = []
    first = next(iter(runs.values()))
    for model in first["models"]:
        if not all(model in r.get("models", {}) for r in runs.values()):
            continue  # missing_model_warnings says it
        cells = dict.fromkeys(d for r in runs.values() for d, m in r["models"][model].items()
                              if isinstance(m, Mapping) and d != AVERAGE)  # any seed's, not flags like non_private
        for domain in cells:
            missing = [s for s, r in runs.items() if not isinstance(r["models"][model].get(domain), Mapping)]
            if missing:
                lines.append(f"{model} on {domain} is missing from seed(s) {missing}: that cell is left out of the "
                             "aggregate")
    partial = partial_averages(runs)
    lines += missing_metric_warnings(runs, partial)
    for model, seeds in (partial | partial_averages(runs, metric)).items():
        where = "; ".join(f"seed {s} lacks {', '.join(d)}" for s, d in seeds.items())
        cell = " and its average cell" if model in partial else ""
        lines.append(f"the average of {model} covers only some training domains ({where}): {model} is left out of "
                     f"the paired comparisons{cell} (its average is over other domains than the others')")
    return lines


def missing_metric_warnings(runs: Mapping[int, Mapping[str, Any]], partial: Mapping[str, Any]) -> list[str]:
    """One line per model × domain cell that :func:`aggregate_models` keeps and per group of seeds, naming the
    metrics some seed reports and those seeds do not (null, NaN or absent in their results.json: a model a client
    could not evaluate): :func:`_metric_keys` leaves each out of that cell. ``partial``: :func:`partial_averages`
    (their ``average`` cells are left out whole and warned about apart)."""
    lines = []
    first = next(iter(runs.values()))
    for model in first["models"]:
        for domain in first["models"][model]:
            cells = [r.get("models", {}).get(model, {}).get(domain) for r in runs.values()]
            if (domain == AVERAGE and model in partial) or not all(isinstance(c, Mapping) for c in cells):
                continue  # the whole cell is left out: missing_cell_warnings / partial_averages say it
            names = dict.fromkeys(k for c in cells for k, v in c.items()
                                  if k != USERS and (v is None or is_number(v)))
            by_seeds: dict[tuple[int, ...], list[str]] = {}
            for name in names:
                lacking = tuple(s for s, c in zip(runs, cells) if not is_finite_number(c.get(name)))
                if lacking:
                    by_seeds.setdefault(lacking, []).append(name)
            lines += [f"{model} on {domain}: {', '.join(found)} {'is' if len(found) == 1 else 'are'} missing from "
                      f"seed(s) {list(seeds)} (null or not a finite number there): left out of that cell of the "
                      "aggregate" for seeds, found in by_seeds.items()]
    return lines


def missing_model_warnings(runs: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """One line per model that some seeds report and others do not (a merge that failed on one seed, FedAvg that a
    resumed run skipped): the aggregate needs every seed, so that model is left out of it."""
    names = list(dict.fromkeys(m for r in runs.values() for m in r.get("models", {})))
    lines = []
    for name in names:
        missing = [s for s, r in runs.items() if name not in r.get("models", {})]
        if missing:
            lines.append(f"{name} is missing from seed(s) {missing}: left out of the aggregate")
    return lines
