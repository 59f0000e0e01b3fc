"""One recommender on one domain (``fedmerge train``): fit, evaluate on the test users, write ``metrics.json``.

In-domain recommenders (popularity, EASE, RLAE, RDLAE, L3AE) select their hyper-parameters on validation and refit
on train + validation; mergeable families (text-lae, sequential) train from θ₀ = ``family.initial_weights(dim,
seed)`` and also write their weights with a model card. ``DIR/metrics.json`` holds the test metrics of
:func:`fedmerge.metrics.evaluate_scorer` at its top level, the chosen hyper-parameters and the fit/eval seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.errors import FedmergeError
from fedmerge.models import FAMILIES, RECOMMENDERS, get_family, get_recommender

if TYPE_CHECKING:  # numpy, torch and the data stack are imported by the functions that use them (fast --help)
    import numpy as np

    from fedmerge.data.domain import Domain



def model_names() -> list[str]:
    """What ``fedmerge train --model`` takes: the in-domain recommenders, then every family (plugins included)."""
    return [*RECOMMENDERS, *FAMILIES]


METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "weights.safetensors"


def item_embeddings(domain: Domain, encoder_name: str) -> np.ndarray:
    """The catalog's text embeddings from the shared on-disk cache (encoded and cached on a miss)."""
    from fedmerge.text import encode_catalog, get_encoder

    return encode_catalog(get_encoder(encoder_name), domain.catalog)


def train_recommender(name: str, params: dict[str, Any], domain: Domain, encoder: str) -> tuple[Any, dict[str, Any]]:
    """Fit an in-domain recommender; returns (scorer, report fields)."""
    model = get_recommender(name, **params)
    embeddings = item_embeddings(domain, encoder) if model.needs_embeddings else None
    start = time.perf_counter()
    model.fit(domain, embeddings)
    report = {
        "fit_seconds": time.perf_counter() - start,
        "hyperparameters": {**getattr(model, "selected", {}), **getattr(model, "settings", {})},
        "validation": getattr(model, "validation", []),
    }
    if getattr(model, "tied", []):  # the selected grid point is only the first of equals
        report["tied_with_selected"] = model.tied
    return model.score, report


def train_family(
    name: str, params: dict[str, Any], domain: Domain, encoder: str, seed: int, out: Path
) -> tuple[Any, dict[str, Any]]:
    """Train a mergeable family from θ₀, save its weights with a model card (``weights.json``, its metrics filled
    in by :func:`train_and_evaluate`; what ``fedmerge recommend`` and ``evaluate`` read); returns (scorer, report
    fields)."""
    import torch

    from fedmerge.metrics import DEFAULT_KS
    from fedmerge.recommender import SAVED_INDIVIDUAL_PREFIX, common_card, model_card, save_model
    from fedmerge.scenario import EncoderSettings
    from fedmerge.storage import weights_digest

    family = get_family(name, **params)
    features = family.catalog_features(domain.catalog, lambda: item_embeddings(domain, encoder))
    theta0 = family.initial_weights(features.shape[-1], seed, catalog_features=[features])
    torch.manual_seed(seed)
    start = time.perf_counter()
    weights, info = family.train(theta0, domain, features, seed=seed, progress=True)
    fit_seconds = time.perf_counter() - start
    common = common_card(family, EncoderSettings(encoder, {}, ""), weights_digest(theta0),
                         {"name": "train", "seed": seed}, "test", DEFAULT_KS)
    card = model_card(common, SAVED_INDIVIDUAL_PREFIX + domain.name, "individual", params, [domain.name])
    save_model(out / WEIGHTS_FILE, weights, card, metadata={"domain": domain.name, "family": name, "seed": str(seed)})
    report = {"fit_seconds": fit_seconds, "hyperparameters": family.config(), "training": info,
              "weights": str(out / WEIGHTS_FILE)}
    return family.scorer(weights, features), report


def train_and_evaluate(
    model: str, params: dict[str, Any], data: Path, encoder: str, seed: int, out: Path | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Fit ``model`` on the domain at ``data``, evaluate it on the test users and write ``out/metrics.json`` (default
    ``out``: ``runs/train/<domain>-<model>``); returns (the report: test metrics at the top level, then domain,
    model, seed, encoder, hyper-parameters, fit and eval seconds; the metrics file). ``out`` is held like a run's
    folder (:func:`fedmerge.storage.run_folder`): an earlier training's files there are refused unless
    ``overwrite``, after the model and its parameters are checked."""
    from fedmerge.data import load_domain
    from fedmerge.metrics import evaluate_scorer
    from fedmerge.storage import check_outside, run_folder, write_json_atomic

    if model not in model_names():  # before reading any data
        raise FedmergeError(f"unknown model {model!r}; valid: {', '.join(model_names())}{FAMILIES.failures()}")
    if model in FAMILIES:  # bad parameters, and a missing encoder model folder, fail before the output folder is touched
        max_len = get_family(model, **params).max_len  # evaluated as it reads histories (the run's clients do too)
        needs_encoder = True  # its model card names the encoder
    else:
        max_len = 50  # the in-domain recommenders read whole histories; 50 as evaluate_scorer's default
        needs_encoder = get_recommender(model, **params).needs_embeddings
    if needs_encoder:
        from fedmerge.text import get_encoder

        get_encoder(encoder)
    domain = load_domain(data)
    out = out or Path("runs") / "train" / f"{domain.name}-{model}"
    check_outside(data, out, "--data", "the training")
    with run_folder(out, overwrite=overwrite, resumable=False):
        if model in FAMILIES:
            scorer, report = train_family(model, params, domain, encoder, seed, out)
        else:
            scorer, report = train_recommender(model, params, domain, encoder)
        start = time.perf_counter()
        metrics = evaluate_scorer(scorer, domain, split="test", max_len=max_len)
        if "weights" in report:
            from fedmerge.recommender import update_card

            update_card(report["weights"], metrics={domain.name: metrics})
        report = {**metrics, "domain": domain.name, "model": model, "seed": seed, "encoder": encoder,
                  **report, "eval_seconds": time.perf_counter() - start}
        return report, write_json_atomic(out / METRICS_FILE, report)
