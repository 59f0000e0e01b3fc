"""Client-side differential privacy on shipped weights: clip the task vector, add Gaussian noise, account ε.

What is protected
-----------------
A client ships ``θ₀ + clip_C(τ) + N(0, (σC)² I)`` with task vector ``τ = θ − θ₀`` and
``clip_C(τ) = τ · min(1, C / ‖τ‖₂)`` (one global L2 norm over all tensors). The unit of privacy is the **client's
whole training set** (domain-level DP): neighbouring inputs are "the client contributes its data" versus "it does
not" (τ = 0, add/remove model, L2 sensitivity Δ = C), or, with ``neighbouring="replace"``, "the client's data set is
swapped for any other" (Δ = 2C). Everything the server does afterwards (merging, learned MergeRec coefficients
computed on public catalogs, broadcasting) is post-processing and keeps the guarantee.

Clipping the whole update is *not* per-user clipping: a single user of a domain is protected only because any
change of the domain's data, one user included, moves the clipped update by at most 2C — i.e. a user gets the
``replace`` guarantee of the whole domain, no better (no per-user clipping, no sampling amplification as in
DP-SGD).

Accounting
----------
The release is a Gaussian mechanism with noise multiplier ``z = σ/Δ`` (σ the noise std). Its exact privacy profile
is the analytic Gaussian mechanism of Balle & Wang (ICML 2018, Thm. 8):

    δ(ε) = Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ)

which is also the profile of μ-Gaussian DP with μ = Δ/σ (Dong, Roth & Su, "Gaussian Differential Privacy",
JRSS-B 2022, Cor. 2.13). By their composition theorem (Cor. 3.3) R adaptive rounds of μ-GDP are exactly
√R·μ-GDP, so R FedAvg rounds with fresh noise equal one Gaussian mechanism with noise multiplier ``z/√R``.
Both directions (ε from z, z from ε) are solved with :func:`scipy.optimize.brentq`.

Limits: the noise comes from torch's Gaussian sampler in floating point, not from a sampler hardened against
floating-point attacks (Mironov, CCS 2012); and the guarantee assumes the noise seed is secret (``seed=None``).

Why no accountant library: dp-accounting 0.6.0 pins ``attrs~=23`` (would downgrade the installed attrs 26) and
opacus's accountants (RDP/PRV) target subsampled DP-SGD and are looser than the exact analytic profile for this
full-participation Gaussian release.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from typing import Literal

import torch
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from fedmerge.merging.methods import check_compatible
from fedmerge.models.base import StateDict
from fedmerge.validation import scale_task_vector, task_vector_norm

logger = logging.getLogger(__name__)

Neighbouring = Literal["add_remove", "replace"]
_SENSITIVITY_FACTOR: dict[str, float] = {"add_remove": 1.0, "replace": 2.0}
_Z_BRACKET = (1e-4, 1e6)


def noise_generator_seed(seed: int | None) -> int:
    """The seed of a DP mechanism's noise generator: ``seed`` for a reproducible study, or 62 bits from the OS
    entropy pool (:mod:`secrets`) for ``None``, which is what a deployment must use (a seed the server can guess
    lets it regenerate and subtract the noise). 62 bits leave room for ``+ 1`` (a second generator) within the
    63-bit seeds torch and NumPy take."""
    return secrets.randbits(62) if seed is None else int(seed)


def clip_update(
    theta0: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[StateDict, float]:
    """(θ₀ + τ·min(1, C/‖τ‖₂), ‖τ‖₂) with τ = θ − θ₀: the update clipped to global L2 norm C, and its original norm."""
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    check_compatible(dict(theta0), {"weights": dict(weights)})  # θ₀'s names, shapes and float dtypes
    norm = task_vector_norm(theta0, weights)
    if not math.isfinite(norm):
        raise ValueError(f"the update's task-vector norm is {norm} (NaN or infinite weights): nothing to clip")
    return scale_task_vector(theta0, weights, min(1.0, clip_norm / norm) if norm > 0 else 1.0), norm


def privatize_update(
    theta0: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    seed: int | None,
) -> StateDict:
    """θ₀ + clip_C(θ − θ₀) + N(0, (σC)²) per entry, σ = ``noise_multiplier``, drawn from a seeded torch.Generator.

    Use a different ``seed`` per client and per round: reused noise is not fresh noise and breaks the accounting.
    A seed the server can guess (e.g. derived from the public run seed) lets it regenerate and subtract the noise:
    seeded noise is for reproducible studies; ``seed=None`` draws the generator's seed from the OS entropy pool
    (:mod:`secrets`), which is what a deployment must use.
    """
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number ≥ 0, got {noise_multiplier}")
    clipped, norm = clip_update(theta0, weights, clip_norm)
    std = noise_multiplier * clip_norm
    logger.debug("privatize: ‖τ‖=%.4g, C=%.4g, noise std=%.4g", norm, clip_norm, std)
    if std == 0:
        return clipped
    gen = torch.Generator().manual_seed(noise_generator_seed(seed))
    return {
        k: (v.double() + std * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(v.dtype)
        for k, v in clipped.items()
    }


def gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """Analytic Gaussian δ(ε) for noise std σ = z·Δ (Balle & Wang 2018): Φ(1/(2z) − εz) − e^ε Φ(−1/(2z) − εz).

    The second term is evaluated in log space so that large ε does not overflow.
    """
    if noise_multiplier <= 0:
        return 1.0
    if math.isinf(epsilon):
        return 0.0
    a, b = 1.0 / (2.0 * noise_multiplier), epsilon * noise_multiplier
    return max(0.0, float(ndtr(a - b) - math.exp(epsilon + float(log_ndtr(-a - b)))))


def _composition_scale(rounds: int, neighbouring: Neighbouring) -> float:
    """k·√R with k = Δ/C of the neighbouring model: R rounds of z-noise equal one release with z/(k·√R).

    R-fold composition of μ-GDP is √R·μ-GDP (Dong, Roth & Su 2022, Cor. 3.3) and μ = Δ/σ = 1/(k·z).
    """
    if rounds < 1 or int(rounds) != rounds:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    if neighbouring not in _SENSITIVITY_FACTOR:
        raise ValueError(f"unknown neighbouring {neighbouring!r}; valid: {sorted(_SENSITIVITY_FACTOR)}")
    return _SENSITIVITY_FACTOR[neighbouring] * math.sqrt(rounds)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")


def epsilon_for(
    noise_multiplier: float, delta: float, rounds: int = 1, neighbouring: Neighbouring = "add_remove"
) -> float:
    """Smallest ε with δ(ε) ≤ δ for R releases with noise multiplier z (σ = zC); ∞ for z = 0."""
    _check_delta(delta)
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a finite number ≥ 0, got {noise_multiplier}")
    z = noise_multiplier / _composition_scale(rounds, neighbouring)
    if z == 0:
        return math.inf
    if gaussian_delta(0.0, z) <= delta:
        return 0.0
    upper = 1.0
    while gaussian_delta(upper, z) > delta:
        upper *= 2.0
    return float(brentq(lambda e: gaussian_delta(e, z) - delta, 0.0, upper, xtol=1e-12, rtol=1e-12))


def noise_multiplier_for(
    epsilon: float, delta: float, rounds: int = 1, neighbouring: Neighbouring = "add_remove"
) -> float:
    """Smallest noise multiplier z (σ = zC) whose R-round release is (ε, δ)-DP; 0 for ε = ∞."""
    _check_delta(delta)
    scale = _composition_scale(rounds, neighbouring)
    if math.isinf(epsilon) and epsilon > 0:
        return 0.0
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (or inf), got {epsilon}")
    lo, hi = _Z_BRACKET
    if gaussian_delta(epsilon, hi) > delta:
        raise ValueError(f"no noise multiplier up to {hi:g} reaches (ε={epsilon}, δ={delta})")
    # δ(ε; z) falls monotonically in z; solve in log z for a well-conditioned bracket.
    log_z = brentq(lambda t: gaussian_delta(epsilon, math.exp(t)) - delta, math.log(lo), math.log(hi), xtol=1e-12)
    return math.exp(log_z) * scale


def classic_noise_multiplier(epsilon: float, delta: float) -> float:
    """The classic Gaussian-mechanism calibration z = √(2 ln(1.25/δ))/ε (Dwork & Roth 2014, Thm. A.1), valid for ε < 1."""
    _check_delta(delta)
    if not 0 < epsilon < 1:
        raise ValueError(f"the classic bound holds only for 0 < ε < 1, got {epsilon}")
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon

