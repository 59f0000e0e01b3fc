"""Training-free model merging over named tensors: the methods' tensor functions, selected by name through the
torch-free registry :mod:`fedmerge.merging.registry` (names, declared parameters, papers).

Every method works tensor by tensor on the task vectors τ_k = θ_k − θ₀ (stacked as a (K, *shape) tensor) and is a
composition of three steps, in the spirit of mergekit's decomposition:

* **sparsify** - keep part of each τ_k: magnitude top-ρ trimming (TIES), random drop with 1/(1−p) rescaling
  (DARE) or competition-balanced dropping (PCB);
* **consensus** - per-entry weights a_k that say how much of τ_k enters the merge: 1 (sum), w_k/Σw (weighted
  average), sign election plus disjoint mean (TIES) or the normalized balancing weights β_k/Σβ (PCB);
* **rescale** - one scalar λ.

A method returns the processed task vectors τ̃_k = a_k ⊙ sparsify(τ_k) and λ, and the merge is
θ = θ₀ + λ Σ_k τ̃_k. MergeRec (:mod:`fedmerge.merging.mergerec`) learns per-domain coefficients in place of λ on
the same τ̃_k.

**Scope.** Methods with a ``scope`` parameter run either tensor by tensor (``"tensor"``) or once on each model's
whole task vector, all tensors flattened and concatenated (``"model"``), which is what the TIES authors' code and
MergeRec's released code do (their top-ρ trim and PCB's quantile clamps and normalizations are then global: a
tensor whose entries are small next to the rest of the model can lose all of them). ``ties`` keeps per-tensor
trimming by default - every tensor keeps its top int(ρ·n) entries, which on fedmerge's models (a few large adapter and
embedding tensors next to many small Transformer ones) keeps each layer's own update; ``ties_global`` is the
references' setting by name. ``pcb`` follows the PCB paper's equations, tensor by tensor, and drops all but the top
int(ρ·n) balancing weights of each tensor (ρ its ``ratio``); ``pcb_released`` is the released PCB code that MergeRec
runs (see :func:`pcb_released_vectors`).

**Small tensors.** A per-tensor trim (``ties``, ``dare`` with ``base="ties"``, ``pcb``) keeps int(ρ·n) = 0 entries of
a tensor of fewer than 1/ρ entries, so that merge resets it to θ₀: any scalar (the sequential family's
``last_item_bias`` and ``history_bias``), ``repeat_user_bias`` (2 entries) at ρ < 0.5, ``history_pooling`` (K
entries) when K < 1/ρ - at pcb's default ratio 0.1, every tensor of fewer than 10 entries. MergeRec's released code
does the same (``torch.topk(int(ρ·n))``), and the numbers here follow it. Weights listed in
``merge.local_parameters`` keep each domain's own values instead; a run names the weights such a listed method
resets (:func:`fedmerge.merging.local_parameters.merged_behaviour_warnings`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmerge.merging.registry import get_method, merge_scale, resolve_params
from fedmerge.models.base import StateDict

logger = logging.getLogger(__name__)

Models = Mapping[str, StateDict] | Sequence[StateDict]


# ----------------------------------------------------------------------------------------------------------------
# task vectors


def named_models(models: Models) -> dict[str, StateDict]:
    """``models`` as an ordered name -> weights dict (a sequence is named ``model0``, ``model1``, ...)."""
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {f"model{k}": m for k, m in enumerate(models)}
    if not named:
        raise ValueError("no models to merge")
    return named


def check_compatible(theta0: StateDict, models: Mapping[str, StateDict]) -> None:
    """Raise ValueError unless every model has exactly θ₀'s parameter names, shapes and float dtypes."""
    if not theta0:
        raise ValueError("theta0 has no parameters")
    for pname, ref in theta0.items():
        if not torch.is_floating_point(ref):
            raise ValueError(f"theta0 parameter {pname!r} has non-float dtype {ref.dtype}")
    for mname, weights in models.items():
        missing = sorted(set(theta0) - set(weights))
        extra = sorted(set(weights) - set(theta0))
        if missing or extra:
            raise ValueError(f"model {mname!r} does not match theta0: missing {missing[:5]}, unexpected {extra[:5]}")
        for pname, ref in theta0.items():
            got = weights[pname]
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise ValueError(
                    f"model {mname!r} parameter {pname!r}: shape {tuple(got.shape)} dtype {got.dtype}, "
                    f"theta0 has shape {tuple(ref.shape)} dtype {ref.dtype}"
                )


def task_vectors(theta0: StateDict, models: Models) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(model names, {parameter: (K, *shape) stack of τ_k = θ_k − θ₀}) after a compatibility check; float32, or
    float64 for float64 weights (:func:`working_precision`)."""
    named = named_models(models)
    check_compatible(theta0, named)
    stacks = {
        pname: torch.stack([working_precision(named[m][pname]) - working_precision(ref) for m in named])
        for pname, ref in theta0.items()
    }
    return list(named), stacks


# ----------------------------------------------------------------------------------------------------------------
# sparsify / consensus building blocks (pure functions on a (K, *shape) stack)


def trim_magnitude(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each τ_k's top ``int(ρ·n)`` of its n entries by |τ_k| (ties broken towards the lower position), zero the
    rest (TIES step 1).

    ``int(density * n)`` in floating point, as MergeRec's released code (``torch.topk(int(ρ·n))``): 0.29 · 100 =
    28.999… keeps 28, and a tensor with ρ·n < 1 keeps nothing (it stays at θ₀). The TIES authors' code
    (``topk_values_mask``) keeps every entry at or above the (n − int(ρ·n))-th smallest magnitude instead, i.e.
    int(ρ·n) + 1 entries (n = 10, ρ = 0.2: 3 there, 2 here; a scalar: 1 there, 0 here). A stable sort, not
    ``topk``: topk picks among equal magnitudes by its (thread-count dependent) search, so merges differed between
    ``run.server_threads`` settings.
    """
    if density >= 1.0:
        return tau.clone()
    flat = tau.reshape(tau.shape[0], -1)
    n_keep = int(density * flat.shape[1])  # MergeRec's count: 0.29 · 100 keeps 28, as int() gives (TIES authors: +1)
    top = flat.abs().sort(dim=1, descending=True, stable=True).indices[:, :n_keep]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return (flat * mask).reshape(tau.shape)


def drop_random(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: zero each entry independently with probability p and rescale survivors by 1/(1−p), so E[out] = τ."""
    if p == 0.0:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator).to(tau.device) >= p  # a CPU generator: same masks on any device
    return tau * keep / (1.0 - p)


def elect_sign_mask(tau: torch.Tensor) -> torch.Tensor:
    """TIES sign election: γ = sign(Σ_k τ_k), with γ = +1 where Σ_k τ_k = 0 (as MergeRec's released TIES);
    mask_k = [τ_k ≠ 0 and sign(τ_k) = γ]."""
    total = tau.sum(dim=0, keepdim=True)
    elected = torch.where(total >= 0, 1.0, -1.0)
    return (torch.sign(tau) == elected) & (tau != 0)


def disjoint_mean(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Processed vectors whose sum is the disjoint mean: τ̃_k = mask_k τ_k / max(1, Σ_j mask_j)."""
    count = mask.sum(dim=0, keepdim=True).clamp(min=1)
    return tau * mask / count


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalization of all entries of ``x`` to [0, 1] (all zeros if ``x`` is constant)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def pcb_weights(tau: torch.Tensor, ratio: float) -> torch.Tensor:
    """PCB-merging balancing weights β̂_k (Du et al. 2024, Eqs. 2-5), per tensor over its entries.

    intra: β_intra,k = softmax(K · Norm(τ_k ⊙ τ_k)); inter: β_inter,k = Σ_j softmax(Norm(τ_k ⊙ τ_j));
    β_k = β_intra,k ⊙ β_inter,k; drop: keep β_k's top int(ratio·n) of its n entries (:func:`trim_magnitude`), zero
    the rest - none of a tensor of fewer than 1/ratio entries, which the merge then leaves at θ₀.
    Softmax and Norm (min-max) run over the entries of one tensor.
    """
    n_models = tau.shape[0]
    flat = tau.reshape(n_models, -1)
    betas = []
    for k in range(n_models):
        intra = torch.softmax(n_models * minmax(flat[k] * flat[k]), dim=0)
        inter = sum(torch.softmax(minmax(flat[k] * flat[j]), dim=0) for j in range(n_models))
        betas.append(intra * inter)
    beta = torch.stack(betas)
    return trim_magnitude(beta, ratio).reshape(tau.shape)


def clamp_quantiles(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each row of ``x`` (K, n) clamped to [x_(⌊n·low⌋), x_(⌊n·(1-high)⌋-1)] (its sorted entries, 0-based): the
    released PCB code's ``clamp`` (``high = 0`` leaves the top unclamped)."""
    n = x.shape[1]
    ordered = x.sort(dim=1).values
    lo = ordered[:, int(n * low)].unsqueeze(1)
    hi = ordered[:, int(n * (1 - high)) - 1].unsqueeze(1)
    return torch.minimum(torch.maximum(x, lo), hi)


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` (K, n) min-max normalized to [0, 1] (a constant row gives zeros)."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def pcb_released_vectors(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Processed vectors of the released PCB-merging code (as MergeRec runs it), rows over all entries of ``tau``:

    m_k = clamp of |τ_k| to its 1 % and 99 % quantiles, τ̄_k = sign(τ_k) m_k;
    β_k = exp(K · Norm(m_k)²) ⊙ tanh(τ_k ⊙ Σ_j τ_j)        (intra ⊙ inter balancing; Norm = min-max over the row);
    w_k = Norm(clamp of β_k from below at its (1 - ρ) quantile)  (soft mask: 0 up to the quantile, up to 1 above);
    τ̃_k = τ̄_k ⊙ w_k / Σ_j w_j / K                          (the released code's extra 1/K).

    The paper instead uses softmax balancing, a hard top-ρ mask on β and no 1/K (:func:`pcb_weights`). The
    released min-max divides by zero on a constant row; here such a row normalizes to zeros.
    """
    n_models = tau.shape[0]
    flat = tau.reshape(n_models, -1)
    magnitude = clamp_quantiles(flat.abs(), 0.01, 0.01)
    intra = torch.exp(n_models * minmax_rows(magnitude) ** 2)
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
    soft_mask = minmax_rows(clamp_quantiles(intra * inter, 1.0 - density, 0.0))
    out = torch.sign(flat) * magnitude * soft_mask / soft_mask.sum(dim=0, keepdim=True).clamp(min=1e-12) / n_models
    return out.reshape(tau.shape)


# ----------------------------------------------------------------------------------------------------------------
# methods: (K, *shape) task-vector stack -> processed stack τ̃ (the scale λ is applied by the caller)


def _average(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """τ̃_k = w_k/Σw · τ_k, so θ₀ + Σ τ̃_k = Σ w_k θ_k / Σ w (uniform w by default)."""
    weights = params["weights"]
    w = torch.ones(tau.shape[0], dtype=tau.dtype) if weights is None else torch.tensor(weights, dtype=tau.dtype)
    w = w.to(tau.device)  # in τ's precision: float32 weights put 3e-9 into a float64 average of three
    w = (w / w.sum()).reshape(-1, *([1] * (tau.dim() - 1)))
    return tau * w


def _task_arithmetic(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """τ̃_k = τ_k; merged θ₀ + λ Σ τ_k."""
    return tau.clone()


def _ties(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Trim to top-ρ magnitudes, elect signs, disjoint mean over agreeing entries (run per tensor, a tensor of fewer
    than 1/ρ entries keeps none and stays at θ₀)."""
    trimmed = trim_magnitude(tau, params["density"])
    return disjoint_mean(trimmed, elect_sign_mask(trimmed))


def _dare(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Drop-and-rescale each τ_k, then the ``base`` method (task arithmetic, or TIES with its ``density``)."""
    dropped = drop_random(tau, params["p"], generator)
    if params["base"] == "ties":
        return _ties(dropped, params, generator)
    return dropped


def _pcb(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """τ̃_k = β̂_k ⊙ τ_k / Σ_j β̂_j (entries where every β̂ is zero get nothing: every entry of a tensor of fewer than
    1/ratio entries, which stays at θ₀)."""
    beta = pcb_weights(tau, params["ratio"])
    return tau * beta / beta.sum(dim=0, keepdim=True).clamp(min=1e-12)


def _pcb_released(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """The released PCB code's τ̃_k (:func:`pcb_released_vectors`)."""
    return pcb_released_vectors(tau, params["density"])
def keep_middle(tau: torch.Tensor, trim: int) -> torch.Tensor:
    """Per entry, keep the K − 2b values ranked b..K−b−1 across models (b = min(``trim``, (K−1)//2)) with weight
    1/(K − 2b), zero the b smallest and b largest: Σ_k of the result is the coordinate-wise b-trimmed mean (ties:
    lower model index ranks first). b is capped so that at least the median is left when fewer models remain than
    ``trim`` expects (e.g. after a rejection; with 2 models: their mean)."""
    n_models = tau.shape[0]
    trim = min(trim, (n_models - 1) // 2)
    ranks = tau.argsort(dim=0, stable=True).argsort(dim=0, stable=True)
    keep = (ranks >= trim) & (ranks < n_models - trim)
    return tau * keep / (n_models - 2 * trim)


def _trimmed_mean(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ``trim`` largest and smallest τ_k per entry."""
    return keep_middle(tau, params["trim"])


def _median(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018): the (K−1)//2-trimmed mean, i.e. the middle τ_k of each entry (the
    mean of the two middle ones for even K); τ̃_k is τ_k where model k holds the median, else 0."""
    return keep_middle(tau, (tau.shape[0] - 1) // 2)


def _clipped_average(tau: torch.Tensor, params: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """Mean of norm-clipped task vectors, per tensor: τ̃_k = τ_k · min(1, m · median_j ‖τ_j‖ / ‖τ_k‖) / K with
    m = ``multiple`` (norms in float64, so a huge τ_k cannot overflow)."""
    norms = tau.reshape(tau.shape[0], -1).double().norm(dim=1)
    limit = params["multiple"] * norms.median()  # torch's median: the lower middle value for even K
    factor = torch.where(norms > limit, limit / norms.clamp(min=1e-300), torch.ones_like(norms))
    return tau * (factor / tau.shape[0]).to(tau.dtype).reshape(-1, *([1] * (tau.dim() - 1)))


# ----------------------------------------------------------------------------------------------------------------
# running a method


def flatten_model(stacks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(K, N): each model's tensors flattened and concatenated in ``stacks`` order (N = all entries)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in stacks.values()], dim=1)


def split_model(flat: torch.Tensor, stacks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_model`: ``flat`` (K, N) cut back into ``stacks``' names and shapes."""
    sizes = [t[0].numel() for t in stacks.values()]
    return {name: part.reshape(t.shape) for (name, t), part in zip(stacks.items(), flat.split(sizes, dim=1))}


@dataclass(frozen=True)
class ProcessedTaskVectors:
    """τ̃_k per parameter as (K, *shape) float32 stacks, model names in stack order, and the method's λ."""

    model_names: list[str]
    vectors: dict[str, torch.Tensor]
    scale: float
    method: str
    params: dict[str, Any]

    def merged_delta(self, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Σ_k c_k τ̃_k per parameter; ``coefficients`` (K,) defaults to λ for every model."""
        k = len(self.model_names)
        c = torch.full((k,), self.scale) if coefficients is None else coefficients
        return {p: torch.tensordot(c.to(device=v.device, dtype=v.dtype), v, dims=1) for p, v in self.vectors.items()}


def processed_task_vectors(name: str, theta0: StateDict, models: Models, **params: Any) -> ProcessedTaskVectors:
    """Run method ``name``'s sparsify and consensus steps on every parameter; see the module docstring."""
    method = get_method(name)
    model_names, taus = task_vectors(theta0, models)
    resolved = resolve_params(name, params, n_models=len(model_names))
    generator = torch.Generator().manual_seed(int(resolved.get("seed", 0)))
    if resolved.get("scope") == "model":
        vectors = split_model(method.fn(flatten_model(taus), resolved, generator), taus)
    else:
        vectors = {pname: method.fn(taus[pname], resolved, generator) for pname in sorted(taus)}
        vectors = {pname: vectors[pname] for pname in theta0}
    logger.debug("processed %d parameters of %d models with %s %s", len(vectors), len(model_names), name, resolved)
    return ProcessedTaskVectors(model_names, vectors, merge_scale(name, resolved), name, resolved)


def apply_delta(theta0: StateDict, delta: Mapping[str, torch.Tensor]) -> StateDict:
    """θ₀ + Δ per parameter, computed at :func:`working_precision`, cast back to θ₀'s dtypes."""
    return {p: (working_precision(ref) + delta[p]).to(ref.dtype) for p, ref in theta0.items()}


def working_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (detached) as float32, or as itself when it is wider (float64): a merge of float64 weights lost
    their precision in float32 (θ₀ + an average of zero task vectors moved θ₀ by 1.5e-9)."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def merge(name: str, theta0: StateDict, models: Models, **params: Any) -> StateDict:
    """Merged weights θ₀ + λ Σ_k τ̃_k of training-free method ``name`` (see
    :data:`~fedmerge.merging.registry.METHODS`)."""
    processed = processed_task_vectors(name, theta0, models, **params)
    return apply_delta(theta0, processed.merged_delta())

