"""Merging saved weight files (``fedmerge merge``): θ₀ and client weights from safetensors files, merged by a
training-free method of the registry, written back as safetensors with the method, its parameters and the model
names in the file's metadata."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmerge.errors import DataError, FedmergeError

logger = logging.getLogger(__name__)

MERGED_BY = "fedmerge merge"  # a card's "merged_by": the only cards fedmerge merge may replace


def merge_weight_files(
    method: str, theta0: str | Path, models: Mapping[str, str | Path], params: Mapping[str, Any], out: str | Path,
    overwrite: bool = False, include_rejected: bool = False,
) -> Path:
    """θ₀ + the merged task vectors of ``models`` (name → weight file) under ``method`` with ``params``, saved to
    ``out`` with, when θ₀ has a model card (a run's ``models/theta0.json``), a card of its own (FedmergeError for
    each of these, before anything is written):

    - an unknown method, an ``out`` that is not a ``.safetensors`` file, is one of the input files or (without
      ``overwrite``) already exists, or whose card path holds a file that is not an earlier merge's card (a run's
      results.json, an input's card): refused before any file is read;
    - a parameter the method refuses: named;
    - a model that is not well formed for θ₀ (names, shapes, dtypes, NaN/inf: :func:`~fedmerge.validation.
      check_update`), whose card describes other weights or says it was trained from another θ₀ or that the run
      rejected it (unless ``include_rejected``), or a merge whose result is not finite: named. A model the run merged
      norm-clipped is merged as saved (unclipped), with a warning.

    θ₀'s card also names the run's ``merge.local_parameters``: the merge then carries the clients' median of them
    and its card each domain's own values, as the run's merges do, so ``load_recommender(out).evaluate(domain)``
    scores it as the run scored its merges.
    """
    import torch

    from fedmerge.merging import get_method, merge
    from fedmerge.merging.local_parameters import (
        card_values,
        check_local_parameters,
        own_values,
        shared_values,
        with_values,
    )
    from fedmerge.merging.registry import recorded_params, weights_in_order, with_default_seed
    from fedmerge.recommender import card_path, merged_model_card, read_card, save_model
    from fedmerge.storage import WEIGHTS_SUFFIX, load_weights, save_weights, weights_digest
    from fedmerge.validation import UpdateRejected, check_update

    try:
        get_method(method)
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    out = Path(out)
    if out.suffix != WEIGHTS_SUFFIX:
        raise FedmergeError(f"--out {out} must be a {WEIGHTS_SUFFIX} file (its model card is written beside it)")
    target, card_target = out.resolve(), card_path(out).resolve()
    files = [Path(theta0), *(Path(file) for file in models.values())]
    inputs = {p.resolve() for f in files for p in (f, card_path(f))}
    if target in inputs or card_target in inputs:
        raise FedmergeError(f"--out {out} is one of the input files (or its card is an input's); write the merge to a "
                            "new file")
    if target.exists() and not overwrite:
        raise FedmergeError(f"--out {out} already exists; choose a new file or pass --overwrite")
    if card_target.exists() and not is_merge_card(card_path(out)):
        raise FedmergeError(f"{card_path(out)} exists and was not written by fedmerge merge (a run's results or "
                            "another model's card); choose another --out")
    base = load_weights(Path(theta0))
    digest = weights_digest(base)
    base_card = _model_card(Path(theta0), digest)
    weights = {name: load_weights(Path(models[name])) for name in sorted(models)}  # the run's order: by domain
    local_names = base_card.get("local_parameter_names", []) if base_card is not None else []
    for name, file in ((n, models[n]) for n in sorted(models)):
        try:
            check_update(base, weights[name])
        except UpdateRejected as exc:
            raise FedmergeError(f"model {name} ({file}): {exc.reason}") from None
        card = _model_card(Path(file), weights_digest(weights[name])) or {}
        theirs = card.get("theta0_digest")
        if theirs is not None and theirs != digest:
            raise FedmergeError(f"model {name} ({file}) was trained from θ₀ {theirs}, not from {theta0} ({digest}); "
                                "merge models of one θ₀")
        if card.get("rejected") and not include_rejected:
            raise FedmergeError(f"model {name} ({file}): the run rejected it ({card['rejected']}); pass "
                                "--include-rejected to merge it anyway")
        domains = card.get("domains") or []
        if local_names and len(domains) == 1 and domains != [name]:  # own values are found by domain name
            raise FedmergeError(f"model {name} ({file}) is domain {card['domains'][0]!r}'s (its card): name it by its "
                                f"domain ({card['domains'][0]}=...), under which its own merge.local_parameters "
                                "values are recorded and looked up when the merge is evaluated")
        if card.get("clipped"):
            logger.warning("model %s (%s): the run merged it norm-clipped (%s); this merges the saved weights as they "
                           "are", name, file, card["clipped"])
    params = weights_in_order(params, list(models), list(weights))  # weights=[...] as --models names the models
    if base_card is not None:  # a seeded method (DARE) follows the run's seed, as the run's merge did
        params = with_default_seed(method, params, _card_seed(base_card, card_path(theta0)))
    try:
        merged = merge(method, base, weights, **params)
        recorded = recorded_params(method, params, n_models=len(weights))
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    card = None
    if base_card is not None:
        local = base_card.get("local_parameter_names", [])
        if not isinstance(local, list) or not all(isinstance(n, str) for n in local):
            raise FedmergeError(f"{card_path(theta0)}: local_parameter_names must be a list of weight names, got "
                                f"{local!r}")
        extra: dict[str, Any] = {"merged_by": MERGED_BY}
        if local:  # as the run's merges: the clients' median shared, each domain's own values in the card
            check_local_parameters(local, base)
            merged = with_values(merged, shared_values(weights, local))
            extra["local_parameters"] = card_values(own_values(weights, local))
        card = merged_model_card(base_card, out.stem, method, recorded, list(weights), **extra)
    bad = sorted(n for n, t in merged.items() if not torch.isfinite(t).all())
    if bad:
        raise FedmergeError(f"{method} with {dict(params)} gave non-finite weights in {len(bad)} tensor(s), e.g. "
                            f"{bad[:3]}; nothing written")
    metadata = {"method": method, "params": json.dumps(dict(params), allow_nan=False),
                "models": json.dumps(list(weights))}
    if card is None:
        card_path(out).unlink(missing_ok=True)  # an earlier merge's card would describe other weights
        return save_weights(out, merged, metadata=metadata)
    return save_model(out, merged, card, metadata=metadata)


def is_merge_card(path: Path) -> bool:
    """Whether the JSON file at ``path`` is a model card ``fedmerge merge`` wrote (the only kind it may replace)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("merged_by") == MERGED_BY
    except (OSError, ValueError, AttributeError):
        return False


def _model_card(weights_file: Path, digest: str) -> dict[str, Any] | None:
    """The model card beside ``weights_file``, or None without a (readable) card: a sibling .json that is not a model
    card (files from elsewhere) is no card. FedmergeError when the card describes other weights than the file's
    (``digest``): what it says (θ₀, rejection) would be about another model."""
    from fedmerge.recommender import card_path, read_card

    if not card_path(weights_file).is_file():
        return None
    try:
        card = read_card(weights_file)
    except DataError:
        return None
    if card.get("weights_digest") != digest:
        raise FedmergeError(f"{weights_file} does not hold the weights its card {card_path(weights_file)} describes "
                            f"({card.get('weights_digest')}, the file's are {digest})")
    return card


def _card_seed(card: Mapping[str, Any], path: Path) -> int:
    """The run's seed on θ₀'s card (0 when the card records none)."""
    run = card.get("run", {})
    seed = run.get("seed", 0) if isinstance(run, Mapping) else None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise FedmergeError(f"{path}: run.seed must be an integer in [0, 2**63), got run = {run!r}")
    return seed
