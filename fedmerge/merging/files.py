"""Merging saved weight files (``fedmerge merge``): θ₀ and client weights from safetensors files, merged by a
training-free method of the registry, written back as safetensors with the method, its parameters and the model
names in the file's metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError


def merge_weight_files(
    method: str, theta0: str | Path, models: Mapping[str, str | Path], params: Mapping[str, Any], out: str | Path,
    overwrite: bool = False,
) -> Path:
    """θ₀ + the merged task vectors of ``models`` (name → weight file) under ``method`` with ``params``, saved to
    ``out`` (FedmergeError for each of these, before anything is written):

    - an unknown method, or an ``out`` that is one of the input files or (without ``overwrite``) already exists:
      refused before any file is read;
    - a parameter the method refuses: named;
    - a model that is not well formed for θ₀ (names, shapes, dtypes, NaN/inf: :func:`~fedmerge.validation.
      check_update`), or a merge whose result is not finite: named.
    """
    import torch

    from fedmerge.merging import get_method, merge, resolve_params
    from fedmerge.recommender import save_model
    from fedmerge.storage import load_weights, save_weights
    from fedmerge.validation import UpdateRejected, check_update

    try:
        get_method(method)
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    target = Path(out).resolve()
    inputs = {Path(theta0).resolve(), *(Path(file).resolve() for file in models.values())}
    if target in inputs:
        raise FedmergeError(f"--out {out} is one of the input files; write the merge to a new file")
    if target.exists() and not overwrite:
        raise FedmergeError(f"--out {out} already exists; choose a new file or pass --overwrite")
    base = load_weights(Path(theta0))
    weights = {name: load_weights(Path(file)) for name, file in models.items()}
    for name, file in models.items():
        try:
            check_update(base, weights[name])
        except UpdateRejected as exc:
            raise FedmergeError(f"model {name} ({file}): {exc.reason}") from None
    try:
        merged = merge(method, base, weights, **params)
    except ValueError as exc:
        raise FedmergeError(str(exc)) from exc
    bad = sorted(n for n, t in merged.items() if not torch.isfinite(t).all())
    if bad:
        raise FedmergeError(f"{method} with {dict(params)} gave non-finite weights in {len(bad)} tensor(s), e.g. "
                            f"{bad[:3]}; nothing written")
    metadata = {"method": method, "params": json.dumps(dict(params), allow_nan=False),
                "models": json.dumps(list(weights))}
    card = merged_card(Path(theta0), models, method, resolve_params(method, params, n_models=len(weights)), Path(out))
    if card is None:
        return save_weights(Path(out), merged, metadata=metadata)
    return save_model(Path(out), merged, card, metadata=metadata)


def merged_card(theta0: Path, models: Mapping[str, str | Path], method: str, params: Mapping[str, Any],
                out: Path) -> dict[str, Any] | None:
    """The model card of a merge of saved files, from θ₀'s card (family, encoder, θ₀, run, eval protocol) so that
    ``load_recommender``, ``fedmerge evaluate`` and ``fedmerge recommend`` take the merged file; None when θ₀ has no
    card (files from elsewhere: weights only). FedmergeError when a model's card says it was trained from another
    θ₀ (its task vector would be measured from the wrong weights)."""
    from fedmerge.recommender import card_path, merged_model_card, read_card

    if not card_path(theta0).is_file():
        return None
    base = read_card(theta0)
    for name, file in models.items():
        if card_path(file).is_file():
            theirs = read_card(file).get("theta0_digest")
            if theirs != base["weights_digest"]:
                raise FedmergeError(f"model {name} ({file}) was trained from θ₀ {theirs}, not from {theta0} "
                                    f"({base['weights_digest']}); merge models of one θ₀")
    return merged_model_card(base, out.stem, method, params, list(models))
