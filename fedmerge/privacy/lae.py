"""User-level DP for the text-space LAE: the Gaussian mechanism on its one data-dependent statistic.

The text-LAE's closed form (:mod:`fedmerge.models.text_lae`) reads the data only through A = Σ_u z_u z_uᵀ, the Gram
matrix of the users' text profiles z_u = x_u E (x_u the user's binary history over train + validation items, E the
public item features); C = EᵀE is public. Bounding each user's profile,

    z̃_u = z_u · min(1, B / ‖z_u‖₂),   Ã = Σ_u z̃_u z̃_uᵀ,

adding or removing a user changes Ã by z̃ z̃ᵀ, whose upper triangle (diagonal included) has L2 norm at most
‖z̃‖² ≤ B². The client releases Â = Ã + N with N symmetric, its upper-triangle entries i.i.d. N(0, (zB²)²)
("Analyze Gauss", Dwork, Talwar, Thakurta & Zhang, STOC 2014): a Gaussian mechanism with noise multiplier z,
accounted like any other (analytic Gaussian, :func:`fedmerge.privacy.dp.epsilon_for`): one release when the
client draws Â once and every release reuses it (``privacy.gram_noise = "once"``, the default), else composed over
releases.
Everything after it — making Â positive semi-definite (``privacy.gram_repair``, :func:`psd_repair`) and solving
the Sylvester equation with it and θ₀ — is post-processing. λ is not chosen on the users' validation items (that
choice would spend privacy): the family must hold one λ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmerge.data.domain import Domain, interaction_matrix
from fedmerge.errors import FedmergeError
from fedmerge.privacy.dp import noise_generator_seed
from fedmerge.models.base import ModelFamily, StateDict
from fedmerge.privacy.client import GRAM_REPAIRS
from fedmerge.reproducibility import blas_threads


def clipped_profiles(seqs: Sequence[np.ndarray], features: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """(rows z̃_u = z_u · min(1, B/‖z_u‖) with z_u = x_u E, fraction of users whose row was clipped)."""
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    e = np.asarray(features, dtype=np.float64)
    z = np.asarray(interaction_matrix(seqs, e.shape[0]) @ e)
    norms = np.linalg.norm(z, axis=1)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    return z * scale[:, None], float((norms > bound).mean()) if len(norms) else 0.0


def symmetric_noise(dim: int, std: float, generator: np.random.Generator) -> np.ndarray:
    """A symmetric (dim, dim) matrix whose upper-triangle entries (diagonal included) are i.i.d. N(0, std²)."""
    upper = np.triu(generator.normal(0.0, std, (dim, dim)))
    return upper + np.triu(upper, 1).T


def psd_repair(gram: np.ndarray, method: str) -> np.ndarray:
    """A positive semi-definite matrix from the symmetric noisy Gram Â = U diag(a) Uᵀ (post-processing).

    ``"clip"``: U diag(max(a, 0)) Uᵀ, the nearest PSD matrix in Frobenius norm; directions where the noise pushed an
    eigenvalue below 0 get none, so the fit keeps θ₀ there. ``"abs"``: U diag(|a|) Uᵀ = (Â²)^½, the matrix absolute
    value; those directions keep the noise's magnitude and are fitted like the others. Measured on Amazon
    (results/privacy/amazon-text-lae/gram-repair-abs/): "abs" keeps the individual models at their no-DP level and
    removes a below-chance membership signal that "clip" creates, ties the other merges, and ruins TIES."""
    if method not in GRAM_REPAIRS:
        raise FedmergeError(f"unknown Gram repair {method!r}; valid: {list(GRAM_REPAIRS)}")
    eigenvalues, vectors = np.linalg.eigh(gram)
    repaired = np.clip(eigenvalues, 0.0, None) if method == "clip" else np.abs(eigenvalues)
    return (vectors * repaired) @ vectors.T


def private_gram(
    seqs: Sequence[np.ndarray], features: np.ndarray, bound: float, noise_multiplier: float, seed: int | None
) -> tuple[np.ndarray, float]:
    """(Â = Σ_u z̃_u z̃_uᵀ + N, N symmetric with entry std zB²; clipped fraction); ``seed=None``: OS entropy."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    rows, clipped = clipped_profiles(seqs, features, bound)
    gram = rows.T @ rows
    rng = np.random.default_rng(noise_generator_seed(seed))
    return gram + symmetric_noise(gram.shape[0], noise_multiplier * bound**2, rng), clipped


@blas_threads()
def train_text_lae_user_level(
    family: ModelFamily, theta0: StateDict, domain: Domain, item_features: torch.Tensor, *, noise_multiplier: float,
    bound: float, noise_seed: int | None, repair: str = "clip",
) -> tuple[StateDict, dict[str, Any]]:
    """The text-LAE's closed form on the private Gram matrix Â (see the module docstring), with the family's one λ."""
    from fedmerge.models.text_lae import SylvesterBasis, TextLAEFamily, checked_prior

    if not isinstance(family, TextLAEFamily):
        raise FedmergeError(f"the private Gram mechanism is the text-lae family's, got {family.name!r}")
    grid = family.lam_grid()
    if len(grid) != 1:
        raise FedmergeError(f"user-level DP for text-lae needs one λ (model.params.lam = value), got the grid {grid}: "
                            "choosing λ on the users' validation items would spend privacy that is not accounted")
    features = item_features.detach().cpu().numpy().astype(np.float64)
    if features.shape[0] != domain.n_items:
        raise FedmergeError(f"{features.shape[0]} item features for {domain.n_items} items of {domain.name!r}")
    prior = checked_prior(theta0, features.shape[1])  # before the Gram: a malformed θ was broadcast and shipped
    start = time.perf_counter()
    gram, clipped = private_gram(domain.train_with_val(), features, bound, noise_multiplier, noise_seed)
    gram = psd_repair(gram, repair)
    basis = SylvesterBasis.from_moments(gram, features.T @ features)
    weights = {"W": torch.from_numpy(basis.solve(grid[0], prior).astype(np.float32))}
    return weights, {"lam": grid[0], "dp_user_bound": bound, "dp_clipped_fraction": clipped,
                     "train_seconds": time.perf_counter() - start}
