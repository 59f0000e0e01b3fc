"""Membership-inference attacks on the weights a client ships, and their scores (AUC, TPR at low FPR).

The attacker sees what the server sees: the shipped weights θ_d, θ₀ (public), the public catalog, and a
candidate user's sequence; it asks whether the user was in the client's training set. Four attacks, each
giving a per-user score (higher = "member"):

(a) loss threshold (Yeom et al., CSF 2018): score = −loss_θd(u) (:mod:`fedmerge.privacy.membership`).

(b) per-user calibrated likelihood ratio, offline LiRA (Carlini et al., S&P 2022): the attacker trains
    ``K`` reference models with the client's recipe on its *own* reference users (disjoint from every candidate,
    so each reference model is an OUT model for each candidate), each on as many of them as the target client has
    users, or on all of them when they are fewer (:func:`reference_model_users`). With the per-user
    statistic φ(u) = mean over scored positions of the logit-scaled confidence log p − log(1 − p), p the
    softmax probability of the true next item,

        score(u) = (φ_θd(u) − μ_out(u)) / σ_out(u),

    μ_out(u), σ_out(u) the mean and standard deviation of φ over the reference models (``global_variance``:
    one σ pooled over all candidates, Carlini et al.'s choice for few reference models). The threshold is
    calibrated per user: a user whose sequence is easy for every model no longer looks like a member.

(b') online LiRA (Carlini et al. 2022, their strongest form): the attacker holds the candidates' records too
    and trains ``K`` shadow models (K even), each candidate IN the training set of exactly K/2 of them (a seeded
    balanced design) and OUT of the others, each model filled up with the attacker's reference users to the target's
    size (:func:`online_shadow_models`). With μ_in(u), μ_out(u) the means of φ(u) over the IN and OUT models and
    σ_in, σ_out one spread each, pooled over all candidates (Carlini et al.'s choice for few models),

        score(u) = log N(φ_θd(u); μ_in(u), σ_in²) − log N(φ_θd(u); μ_out(u), σ_out²),

    a likelihood ratio that needs no assumed direction: where training makes members' φ *lower* (μ_in < μ_out), a
    low φ scores high, which (b) and (a) would count against membership.

(c) white-box gradient alignment on the task vector τ_d = θ_d − θ₀: training moved θ along the negative
    gradients of its users' losses, so a member's −∇L_u points along τ_d:

        score(u) = cos(−∇_θ L_u(θ_at), τ_d),   L_u the user's mean next-item cross-entropy,

    θ_at = θ₀ (the first steps' direction, default) or θ_d. Both vectors run over the parameters training moved
    (tensors with τ ≠ 0; no buffers): a weight the recipe froze (e.g. all but the adapter) has τ = 0 and would only
    add each user's gradient there to the norm, as noise. τ_d = 0 everywhere gives 0.

Scores: ROC AUC (:func:`fedmerge.privacy.membership.rank_auc`) and TPR at a fixed low FPR (Carlini et al.'s
recommended summary: an attack matters if it identifies some users with near certainty). With n non-members, an
FPR below 1/n can only be met at zero false positives; the result records n so that the resolution is visible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedmerge.data.domain import Domain
from fedmerge.errors import NumericalError
from fedmerge.models.base import ModelFamily, StateDict, pad_sequences
from fedmerge.privacy.membership import (
    Positions,
    prediction_pairs,
    per_sequence_mean,
    position_losses,
    rank_auc,
    sequence_losses,
    subset_users,
    union_users,
)

logger = logging.getLogger(__name__)

FPRS = (0.001, 0.01)


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """max over thresholds t of P(member score > t) subject to P(non-member score > t) ≤ ``fpr``.

    The best t is the (k+1)-th largest non-member score, k = ⌊fpr · n_n⌋ false positives allowed (ties count
    against the threshold: a strict ``>``).
    """
    members, nonmembers = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError(f"TPR needs both groups non-empty, got {len(members)} members and {len(nonmembers)} non-members")
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
    allowed = int(np.floor(fpr * len(nonmembers) + 1e-9))
    threshold = np.sort(nonmembers)[::-1][allowed]
    return float((members > threshold).mean())


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, float]:
    """AUC, TPR at 0.1 % and 1 % FPR, and the group sizes (which bound the resolution of a low FPR); a NaN or
    infinite score is a :class:`~fedmerge.errors.NumericalError` (a NaN would sort as the top non-member and turn
    every figure into nonsense rather than fail)."""
    bad = int((~np.isfinite(np.asarray(member_scores, float))).sum() + (~np.isfinite(np.asarray(nonmember_scores, float))).sum())
    if bad:
        raise NumericalError(f"{bad} of {len(member_scores) + len(nonmember_scores)} attack scores are NaN or infinite")
    out = {"auc": rank_auc(member_scores, nonmember_scores)}
    for fpr in FPRS:
        out[f"tpr@{fpr:g}"] = tpr_at_fpr(member_scores, nonmember_scores, fpr)
    out["n_members"], out["n_nonmembers"] = len(member_scores), len(nonmember_scores)
    return out


def scorable(seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The sequences with at least 2 items (a prefix and a target); the attacks score only these."""
    return [s for s in seqs if len(s) >= 2]


def logit_confidences(
    family: ModelFamily, weights: StateDict, item_features: torch.Tensor, seqs: Sequence[np.ndarray],
    positions: Positions = "last",
) -> np.ndarray:
    """φ(u) per sequence: mean over scored positions of log p − log(1 − p), p = softmax(scores)[target]."""
    losses, owners = position_losses(family, weights, item_features, seqs, positions)
    losses = np.maximum(losses, 1e-12)  # p = 1 exactly would give φ = ∞
    phi = -losses - np.log(-np.expm1(-losses))
    return per_sequence_mean(phi, owners, len(seqs))


def lira_scores(target: np.ndarray, reference: np.ndarray, global_variance: bool = True) -> np.ndarray:
    """(φ_target − μ_out) / σ_out per candidate; ``reference`` is (K models, n candidates) of OUT statistics.

    ``global_variance``: σ_out = the root mean square deviation over all models and candidates (1 for K = 1, and
    when the models agree exactly, as a deterministic fit on the same users does); else each candidate's sample
    standard deviation over the K ≥ 2 models."""
    target, reference = np.asarray(target, float), np.asarray(reference, float)
    if reference.ndim != 2 or reference.shape[1] != len(target) or reference.shape[0] < 1:
        raise ValueError(f"reference statistics must be (K >= 1, {len(target)}), got shape {reference.shape}")
    if reference.shape[0] < 2 and not global_variance:
        raise ValueError("a per-candidate variance needs at least 2 reference models; use global_variance=True")
    mean = reference.mean(axis=0)
    if global_variance:  # models that agree (one model, or a deterministic fit): no spread, the score is φ − μ
        spread = float(np.sqrt(((reference - mean) ** 2).mean()))
        agree = spread <= 1e-9 * (1.0 + float(np.abs(mean).max()))  # equal up to rounding in the mean
        std = np.full_like(mean, 1.0 if agree else spread)
    else:
        std = reference.std(axis=0, ddof=1)
    return (target - mean) / np.maximum(std, 1e-12)


def reference_model_users(n_target_users: int, n_reference_users: int) -> int:
    """Users each reference model trains on: as many as the target client's, or all the attacker's reference users
    when they are fewer (Carlini et al. train their reference models on data sets of the target's size; a smaller
    reference model fits its users less tightly, which biases μ_out)."""
    if n_target_users < 1 or n_reference_users < 1:
        raise ValueError(f"reference models need users on both sides, got {n_target_users} target and "
                         f"{n_reference_users} reference users")
    return min(n_target_users, n_reference_users)


def reference_models(
    train: Callable[[Domain, int], StateDict], reference_users: Domain, n_models: int, users_per_model: int,
    seed: int = 0,
) -> list[StateDict]:
    """``n_models`` models, model k trained by ``train(users, seed + k)`` on ``users_per_model`` seeded random users
    of the attacker's own population (disjoint from the candidates). When ``users_per_model`` is the whole
    population the models differ only in their training randomness (seeds, DP noise), not in which users they saw:
    μ_out is then the mean over that randomness of a model of the target's size (or the largest the attacker can
    train), and the spread leaves out the data's share of the OUT variance. With LiRA's global variance the spread
    scales every score alike, so the ranks (AUC, TPR) depend on μ_out only; a deterministic recipe (the text-LAE
    without DP) gives K identical models, of which one would do."""
    if n_models < 1:
        raise ValueError(f"n_models must be >= 1, got {n_models}")
    if not 1 <= users_per_model <= reference_users.n_users:
        raise ValueError(f"users_per_model must lie in 1..{reference_users.n_users} (the reference users), "
                         f"got {users_per_model}")
    models = []
    for k in range(n_models):
        users = np.sort(np.random.default_rng(seed + k).choice(reference_users.n_users, size=users_per_model,
                                                               replace=False))
        models.append(train(subset_users(reference_users, users, reference_users.name), seed + k))
    return models


def lira_attack(
    family: ModelFamily, shipped: StateDict, references: Sequence[StateDict], item_features: torch.Tensor,
    candidates: Sequence[np.ndarray], positions: Positions = "last", global_variance: bool = True,
) -> np.ndarray:
    """Offline LiRA scores of the candidates against the shipped weights (see the module docstring)."""
    target = logit_confidences(family, shipped, item_features, candidates, positions)
    reference = np.stack([logit_confidences(family, w, item_features, candidates, positions) for w in references])
    return lira_scores(target, reference, global_variance)


def lira_online_scores(target: np.ndarray, statistics: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """log N(φ_target; μ_in, σ_in²) − log N(φ_target; μ_out, σ_out²) per candidate (online LiRA, module docstring).

    ``statistics``: (K models, n candidates) φ of the shadow models; ``inside``: (K, n) whether candidate j was in
    model k's training set, each candidate IN for at least two models and OUT for at least two. σ_in (σ_out) is the
    root mean square deviation of the IN (OUT) statistics from their candidate's IN (OUT) mean."""
    target, statistics = np.asarray(target, float), np.asarray(statistics, float)
    inside = np.asarray(inside, bool)
    if statistics.ndim != 2 or statistics.shape[1] != len(target) or inside.shape != statistics.shape:
        raise ValueError(f"shadow statistics and IN mask must both be (K, {len(target)}), got {statistics.shape} "
                         f"and {inside.shape}")
    n_in = inside.sum(axis=0)
    if (n_in < 2).any() or (len(statistics) - n_in < 2).any():
        raise ValueError("every candidate needs at least two IN and two OUT shadow models (one each leaves no spread)")
    outside = ~inside
    mu_in = np.where(inside, statistics, 0.0).sum(axis=0) / n_in
    mu_out = np.where(outside, statistics, 0.0).sum(axis=0) / outside.sum(axis=0)
    sd_in = max(float(np.sqrt((((statistics - mu_in) ** 2)[inside]).mean())), 1e-12)
    sd_out = max(float(np.sqrt((((statistics - mu_out) ** 2)[outside]).mean())), 1e-12)
    log_in = -0.5 * ((target - mu_in) / sd_in) ** 2 - np.log(sd_in)
    log_out = -0.5 * ((target - mu_out) / sd_out) ** 2 - np.log(sd_out)
    return log_in - log_out


def shadow_model_sizes(inside: np.ndarray, users_per_model: int, pool_users: int) -> np.ndarray:
    """Users each online LiRA shadow model trains on: its IN candidates, filled from the attacker's pool of
    ``pool_users`` up to ``users_per_model`` (the target's size) as far as the pool allows."""
    in_counts = inside.sum(axis=1)
    return in_counts + np.clip(users_per_model - in_counts, 0, pool_users)


def online_shadow_models(
    train: Callable[[Domain, int], StateDict], candidates: Domain, pool: Domain, n_models: int, users_per_model: int,
    seed: int = 0,
) -> tuple[list[StateDict], np.ndarray]:
    """(models, IN mask (n_models, candidates)) for online LiRA: each candidate IN for exactly ``n_models``/2 models
    (seeded), and model k trained by ``train(users, seed + k)`` on its IN candidates plus seeded random users of the
    attacker's ``pool`` up to ``users_per_model`` (the target's size; all of the pool when it has fewer)."""
    if n_models < 4 or n_models % 2:
        raise ValueError(f"online LiRA needs an even number of shadow models >= 4 (two IN and two OUT per candidate), "
                         f"got {n_models}")
    if users_per_model < 1:
        raise ValueError(f"users_per_model must be >= 1, got {users_per_model}")
    rng = np.random.default_rng(seed)
    inside = np.zeros((n_models, candidates.n_users), dtype=bool)
    for j in range(candidates.n_users):
        inside[rng.permutation(n_models)[: n_models // 2], j] = True
    if (inside.sum(axis=1) > users_per_model).any():
        logger.warning("online LiRA: %d IN candidates per shadow model exceed the target's %d users: the shadow models "
                       "train on more users than the target (probe fewer users, or raise member_fraction)",
                       int(inside.sum(axis=1).max()), users_per_model)
    sizes = shadow_model_sizes(inside, users_per_model, pool.n_users)
    if (sizes < users_per_model).any():  # the pool cannot fill them: smaller shadow models bias μ (see above)
        logger.warning("online LiRA: the attacker's pool of %d users fills the shadow models to %d-%d users only, "
                       "fewer than the target's %d (a smaller member_fraction leaves a larger pool)", pool.n_users,
                       int(sizes.min()), int(sizes.max()), users_per_model)
    models = []
    for k in range(n_models):
        members = np.flatnonzero(inside[k])
        fill = int(sizes[k]) - len(members)
        extra = np.sort(rng.choice(pool.n_users, size=fill, replace=False))
        parts = [subset_users(candidates, members, candidates.name)] if len(members) else []
        if fill:
            parts.append(subset_users(pool, extra, pool.name))
        models.append(train(union_users(parts, f"{candidates.name}-shadow-{k}"), seed + k))
    return models, inside


GradientPoint = Literal["theta0", "shipped"]


def gradient_alignment_scores(
    family: ModelFamily, theta0: StateDict, shipped: StateDict, item_features: torch.Tensor,
    candidates: Sequence[np.ndarray], positions: Positions = "all", at: GradientPoint = "theta0",
) -> np.ndarray:
    """cos(−∇L_u(θ_at), θ_d − θ₀) per candidate (see the module docstring); 0 when either vector is zero."""
    if at not in ("theta0", "shipped"):
        raise ValueError(f"unknown gradient point {at!r}; valid: 'theta0', 'shipped'")
    module = family.load(theta0 if at == "theta0" else shipped, item_features.shape[-1]).eval()
    moved = [(n, p) for n, p in module.named_parameters()
             if p.requires_grad and not torch.equal(shipped[n], theta0[n])]
    scores = np.zeros(len(candidates))
    if not moved:
        return scores
    params = [p for _, p in moved]
    tau = torch.cat([(shipped[n].double() - theta0[n].double()).flatten() for n, _ in moved])
    features = item_features.to(torch.float32)
    for row, seq in enumerate(candidates):
        prefixes, targets, _ = prediction_pairs([seq], positions)
        logits = module(pad_sequences(prefixes, family.max_len), features)
        loss = F.cross_entropy(logits, torch.as_tensor(targets))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).double().flatten() for p, g in zip(params, grads)])
        scores[row] = float(F.cosine_similarity(-flat, tau, dim=0)) if float(flat.norm()) > 0 else 0.0
    return scores


def online_lira_attack(
    family: ModelFamily, shipped: StateDict, shadows: Sequence[StateDict], inside: np.ndarray,
    item_features: torch.Tensor, candidates: Sequence[np.ndarray], positions: Positions = "last",
) -> np.ndarray:
    """Online LiRA scores of the candidates against the shipped weights (``shadows``, ``inside``: see
    :func:`online_shadow_models`; candidate j of ``inside`` is ``candidates[j]``)."""
    target = logit_confidences(family, shipped, item_features, candidates, positions)
    statistics = np.stack([logit_confidences(family, w, item_features, candidates, positions) for w in shadows])
    return lira_online_scores(target, statistics, inside)


def run_attacks(
    family: ModelFamily, theta0: StateDict, shipped: StateDict, item_features: torch.Tensor,
    members: Sequence[np.ndarray], nonmembers: Sequence[np.ndarray], references: Sequence[StateDict] = (),
    positions: Positions = "last", shadows: Sequence[StateDict] = (), inside: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`attack_metrics` of the attacks :func:`attack_names` lists: the loss attack, gradient alignment,
    LiRA (when ``references`` are given) and online LiRA (when ``shadows`` are given, with their IN mask ``inside``
    over the candidates: members then non-members, each with at least 2 items)."""
    if shadows and (len(scorable(members)) < len(members) or len(scorable(nonmembers)) < len(nonmembers)):
        raise ValueError("online LiRA's IN mask is over the candidates as given: pass only sequences of >= 2 items")
    members, nonmembers = scorable(members), scorable(nonmembers)
    candidates = [*members, *nonmembers]
    n = len(members)
    scorers = {
        "loss": lambda: -sequence_losses(family, shipped, item_features, candidates, positions),
        "gradient_alignment": lambda: gradient_alignment_scores(family, theta0, shipped, item_features, candidates),
        "lira": lambda: lira_attack(family, shipped, references, item_features, candidates, positions),
        "lira_online": lambda: online_lira_attack(family, shipped, shadows, inside, item_features, candidates,
                                                  positions),
    }
    results = {}
    for name in attack_names(bool(references), bool(shadows)):
        scores = scorers[name]()
        try:
            results[name] = attack_metrics(scores[:n], scores[n:])
        except NumericalError as exc:
            raise NumericalError(f"attack {name!r}: {exc}") from None
    return results


def attack_names(with_references: bool, with_shadows: bool = False) -> tuple[str, ...]:
    """The attacks :func:`run_attacks` scores, in its order (LiRA needs reference models, online LiRA shadow
    models)."""
    return ("loss", "gradient_alignment", *(("lira",) if with_references else ()),
            *(("lira_online",) if with_shadows else ()))


def summary(results: Mapping[str, Mapping[str, float]]) -> str:
    """One line per attack: AUC and TPR at the low FPRs."""
    return "; ".join(
        f"{name}: AUC {m['auc']:.3f}, TPR {m['tpr@0.001']:.3f}@0.1% / {m['tpr@0.01']:.3f}@1%" for name, m in results.items()
    )
