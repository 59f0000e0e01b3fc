"""Local parameters: weights that describe a domain's users rather than its items, kept per domain.

``merge.local_parameters`` names such weights (today: the sequential family's ``last_item_bias``, how much a domain's
users avoid the item they just bought: Amazon Beauty b ≈ −0.5, Pantry ≈ 0, where 2.6 % of next items repeat the last
one; its ``history_bias`` and ``history_pooling``, the same for earlier items and how far back they look; its
``repeat_user_bias``, both offsets for users whose history repeats an item; and its ``last_item_text_bias`` v, one
weight per text-embedding dimension, how the last item's text moves b). Every
merge averages or trims them like any weight, which dilutes each domain's value towards the others' (task arithmetic
gave Beauty b = −0.045 from its own −0.12). As FedBN (Li et al., ICLR 2021) keeps batch-norm statistics and FedPer
(Arivazhagan et al. 2019) a personal head, a domain serving a shared model here keeps its own values of them:

- every shared model (each merge, the test-time merges, FedAvg's rounds) carries, for a domain that has no value
  of its own (a held-out or a new domain), the element-wise median of the accepted clients' values (the mean of
  the two middle ones for an even count: with two clients, their mean; :func:`shared_values`), instead of the
  method's rule, so that one client's extreme value cannot set what every new domain gets;
- when a training domain evaluates a shared model, the server sends it with that domain's own values, taken from
  the domain's own accepted update (:func:`with_values`): the server already holds every θ_d, and each client gets
  back only its own values;
- the saved model's card lists every domain's values (``local_parameters``), and
  :meth:`fedmerge.recommender.LoadedRecommender.for_domain` / ``evaluate`` apply them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedmerge.errors import FedmergeError
from fedmerge.models.base import StateDict

# Cards list every domain's values: local parameters are meant to be a few numbers per domain, not a layer.
MAX_LOCAL_VALUES = 1024


def per_tensor_density(method: str, params: Mapping[str, Any]) -> float | None:
    """ρ < 1 of a registry ``method`` that trims every tensor on its own to its top int(ρ·n) of n entries
    (:func:`fedmerge.merging.methods.trim_magnitude`): ``ties`` and ``ties_global`` at
    ``scope = "tensor"`` and ``dare`` with ``base = "ties"`` (their ``density``), ``pcb`` (its ``ratio``). None for
    any other method or setting (a whole-model trim, ρ = 1, task arithmetic, ...)."""
    if method not in ("ties", "ties_global", "dare", "pcb"):
        return None
    from fedmerge.merging.registry import resolve_params

    resolved = resolve_params(method, params)
    if method == "pcb":
        rho = resolved["ratio"]
    elif method == "dare":
        rho = resolved["density"] if resolved["base"] == "ties" else 1.0
    else:
        rho = resolved["density"] if resolved["scope"] == "tensor" else 1.0
    return rho if rho < 1.0 else None


def merged_behaviour_warnings(
    behaviour: Sequence[str], names: Sequence[str], theta0: StateDict,
    methods: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
) -> list[str]:
    """One line when weights of the family's ``behaviour`` (its ``behaviour_parameters``: how a domain's users shop)
    that θ₀ has are missing from ``names`` (``merge.local_parameters``): every merge then averages or trims them
    across domains, which is legitimate (a comparison) but rarely meant (results/unseen/history.md, "A converged
    last-item bias, kept per domain": merged, Beauty's own b of −0.12 served as −0.045).

    ``methods`` maps each listed merge (a label) to the registry method and parameters it runs (a MergeRec: its
    start's). For every one that trims each tensor to its top int(ρ·n) entries (:func:`per_tensor_density`), one
    more line names the weights outside ``names`` with int(ρ·n) = 0, i.e. of fewer than 1/ρ entries (a scalar bias
    at any ρ < 1, the 2 values of ``repeat_user_bias`` at ρ < 0.5): that merge keeps no client's update of them and
    resets them to θ₀ (as MergeRec's released code, ``torch.topk(int(ρ·n))``; a MergeRec start's τ̃ of them is 0,
    so no coefficient moves them)."""
    lines = []
    merged = [n for n in behaviour if n in theta0 and n not in names]
    if merged:
        lines.append(f"{merged} describe how each domain's users shop, but merge.local_parameters does not keep them "
                     f"per domain: every merge averages or trims them across domains (add them to "
                     f"merge.local_parameters to keep each domain's own values)")
    for label, (method, params) in (methods or {}).items():
        rho = per_tensor_density(method, params)
        if rho is None:
            continue
        reset = [n for n, tensor in theta0.items()
                 if n not in names and 0 < tensor.numel() and int(rho * tensor.numel()) == 0]
        if reset:
            key = "ratio" if method == "pcb" else "density"
            lines.append(f"{label} trims every tensor to its top int(ρ·n) of n entries ({method} {key} ρ = {rho:g}): "
                         f"a tensor of fewer than 1/ρ = {1 / rho:g} entries keeps none of any client's update and "
                         f"is reset to θ₀, here {reset} (add them to merge.local_parameters to keep each domain's "
                         f"own values, or raise {key})")
    return lines


def check_local_parameters(names: Sequence[str], theta0: StateDict) -> None:
    """Refuse names that are not weights of θ₀, or local parameters of more than :data:`MAX_LOCAL_VALUES` values."""
    unknown = [n for n in names if n not in theta0]
    if unknown:
        small = sorted(k for k, v in theta0.items() if v.numel() <= MAX_LOCAL_VALUES)
        raise FedmergeError(f"merge.local_parameters names {unknown}, which are not weights of this model's θ₀; "
                            f"its weights of at most {MAX_LOCAL_VALUES} values: {small}")
    size = sum(theta0[n].numel() for n in names)
    if size > MAX_LOCAL_VALUES:
        raise FedmergeError(f"merge.local_parameters {list(names)} hold {size} values; at most {MAX_LOCAL_VALUES} "
                            "(every domain's values are written into each saved model's card)")


def shared_values(updates: Mapping[str, StateDict], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The value of each local parameter for a domain without its own: the element-wise median over ``updates``
    (interpolated: the mean of the two middle values for an even number of clients)."""
    if not updates:
        raise ValueError("shared_values needs at least one update")
    first = next(iter(updates.values()))
    return {n: torch.quantile(torch.stack([u[n].double() for u in updates.values()]), 0.5, dim=0).to(first[n].dtype)
            for n in names}


def with_values(weights: StateDict, values: Mapping[str, torch.Tensor]) -> StateDict:
    """A copy of ``weights`` whose local parameters are ``values`` (the other tensors shared, not copied)."""
    out = dict(weights)
    for name, value in values.items():
        if tuple(value.shape) != tuple(weights[name].shape):
            raise FedmergeError(f"local parameter {name!r}: value of shape {tuple(value.shape)}, the model's is "
                                f"{tuple(weights[name].shape)}")
        out[name] = value.to(weights[name].dtype).clone()
    return out


def own_values(updates: Mapping[str, StateDict], names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each domain's own values of the local parameters ``names`` in its update."""
    return {d: {n: w[n] for n in names} for d, w in updates.items()}


def card_values(per_domain: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, list[float] | float]]:
    """Each domain's local parameters as a model card records them (a scalar as a number, a tensor as nested lists)."""
    return {d: {n: v.tolist() for n, v in values.items()} for d, values in per_domain.items()}


def from_card(values: Mapping[str, object], weights: StateDict) -> dict[str, torch.Tensor]:
    """One domain's card entry as tensors typed like ``weights``' (refused when a name is not a weight of the model,
    or a value is no number or rectangular lists of numbers, or not finite in the weight's dtype; :func:`with_values`
    refuses a shape that differs)."""
    out = {}
    for name, value in values.items():
        if name not in weights:
            raise FedmergeError(f"the card's local parameter {name!r} is not a weight of the model")
        dtype = weights[name].dtype
        try:
            tensor = torch.tensor(value, dtype=dtype)
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # ragged lists, 10**400, a string
            raise FedmergeError(f"the card's local parameter {name!r} is not a number or rectangular nested lists "
                                f"of numbers: {exc}") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FedmergeError(f"the card's local parameter {name!r} is not finite as {dtype} (whose values lie "
                                f"within ±{torch.finfo(dtype).max:.4g})")
        out[name] = tensor
    return out
