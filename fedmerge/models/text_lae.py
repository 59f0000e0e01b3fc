"""Mergeable text-space linear autoencoder: one d x d weight W in the text-embedding space, shared across domains.

A user with binary history x_u (over a catalog with item features E, n x d) gets the scores

    s_u = x_u E W Eᵀ,

so W lives in the same space for every catalog and can be merged. θ₀ = I (the user profile x_u E is compared with
the items by plain inner products). Training solves, exactly, the objective regularised towards θ₀ = W₀:

    min_W ||X - X E W Eᵀ||² + λ||W - W₀||².

With Z = XE, A = ZᵀZ = EᵀGE and C = EᵀE (both d x d, symmetric PSD) the stationarity condition is the
Sylvester-type equation A W C + λW = A + λW₀. With A = U diag(a) Uᵀ and C = V diag(c) Vᵀ, W̃ = UᵀWV turns it into
a_i W̃_ij c_j + λW̃_ij = [Uᵀ(A + λW₀)V]_ij, so W = U (Uᵀ(A + λW₀)V ⊘ (a cᵀ + λ)) Vᵀ. Every λ of the validation
grid reuses the two eigendecompositions. λ → ∞ gives W → W₀.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedmerge.checks import is_integer
from fedmerge.data.domain import Domain, interaction_matrix
from fedmerge.errors import FedmergeError
from fedmerge.metrics import evaluate_scorer
from fedmerge.models.base import PAD, ModelFamily, StateDict
from fedmerge.models.lae import POSITIVE, SELECTION_METRIC, as_grid, center_normalize_rows
from fedmerge.reproducibility import blas_threads

logger = logging.getLogger(__name__)


def text_lae_moments(seqs: Sequence[np.ndarray], features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A = (XE)ᵀ(XE) and C = EᵀE in float64 for binary histories X over items with features E."""
    e = np.asarray(features, dtype=np.float64)
    z = interaction_matrix(seqs, e.shape[0]) @ e
    return z.T @ z, e.T @ e


@dataclass(frozen=True)
class SylvesterBasis:
    """Eigendecompositions A = U diag(a) Uᵀ and C = V diag(c) Vᵀ shared by every λ."""

    a: np.ndarray
    u: np.ndarray
    c: np.ndarray
    v: np.ndarray
    moment_a: np.ndarray

    @classmethod
    def from_moments(cls, moment_a: np.ndarray, moment_c: np.ndarray) -> SylvesterBasis:
        a, u = np.linalg.eigh(moment_a)
        c, v = np.linalg.eigh(moment_c)
        return cls(np.clip(a, 0.0, None), u, np.clip(c, 0.0, None), v, moment_a)

    def solve(self, lam: float, prior: np.ndarray) -> np.ndarray:
        """W solving A W C + λW = A + λW₀ (``prior`` = W₀), for λ > 0."""
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}")
        rhs = self.u.T @ (self.moment_a + lam * prior) @ self.v
        return self.u @ (rhs / (np.outer(self.a, self.c) + lam)) @ self.v.T


class TextLAE(nn.Module):
    """s = x E W Eᵀ for a padded (B, L) batch (PAD = -1 ignored; the history is a set of items).

    Split as ``item_representations`` (E itself: the item side has no parameters), ``encode`` (x E W as a
    one-position hidden state) and ``logits`` (h Eᵀ), the interface MergeRec's frozen item side uses.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.eye(dim))

    def item_representations(self, item_features: torch.Tensor) -> torch.Tensor:
        """E: the features themselves."""
        return item_features

    def encode(self, seqs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, 1, d) hidden state x E W, with x E summed over the distinct non-padding items of each row.

        Gathering the rows of E costs O(B L d) instead of the O(B n d) of a dense binary history times E.
        """
        ordered = seqs.sort(dim=1).values
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        keep = (first & (ordered != PAD)).unsqueeze(-1)
        profile = (items[ordered.clamp(min=0)] * keep).sum(dim=1)
        return (profile @ self.W).unsqueeze(1)

    def logits(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """h Eᵀ."""
        return hidden @ items.T

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        items = self.item_representations(item_features)
        return self.logits(self.encode(seqs, items)[:, -1], items)


def checked_prior(theta0: StateDict, dim: int) -> np.ndarray:
    """θ₀'s ``W`` as the float64 prior of the closed form; FedmergeError unless θ₀ holds exactly a finite (dim, dim)
    ``W`` (a scalar or a vector broadcast into a d × d result, NaN weights were shipped, by the private path)."""
    if set(theta0) != {"W"} or tuple(theta0["W"].shape) != (dim, dim):
        raise FedmergeError(f"theta0 must hold exactly 'W' of shape {(dim, dim)}, got "
                            f"{ {k: tuple(v.shape) for k, v in theta0.items()} }")
    if not bool(torch.isfinite(theta0["W"]).all()):
        raise FedmergeError("theta0's W holds NaN or infinite values")
    return theta0["W"].detach().cpu().numpy().astype(np.float64)


@dataclass
class TextLAEFamily(ModelFamily):
    """The text-space LAE family ("text-lae"); ``lam`` is a value or a validation grid.

    Features are the centred, unit-norm raw text embeddings (the variant measured in the shared findings).
    """

    name: ClassVar[str] = "text-lae"
    lam: float | tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    max_len: int = 50

    def item_features(self, embeddings: np.ndarray, statistics_rows: int | None = None) -> torch.Tensor:
        return torch.from_numpy(center_normalize_rows(embeddings, statistics_rows))

    def build(self, dim: int) -> nn.Module:
        return TextLAE(dim)

    def initial_weights(self, dim: int, seed: int = 0, catalog_features: Sequence[torch.Tensor] = ()) -> StateDict:
        """θ₀ = {"W": I}: data-free and seed-independent."""
        return {"W": torch.eye(dim)}

    def fitted_sequences(self, domain: Domain) -> list[np.ndarray]:
        """Train + validation items: the final W is refitted on both after λ is selected (also under user-level DP)."""
        return domain.train_with_val()

    def __post_init__(self) -> None:
        self.lam_grid()  # ValueError naming lam (a NaN λ wrote all-NaN weights, a negative one failed after θ₀)
        if not is_integer(self.max_len) or self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len!r}")

    def lam_grid(self) -> tuple[float, ...]:
        """λ as a grid of finite values > 0 (ValueError otherwise)."""
        return as_grid("lam", self.lam, POSITIVE)

    @blas_threads()
    def train(
        self, theta0: StateDict, domain: Domain, item_features: torch.Tensor, *, seed: int = 0, progress: bool = True
    ) -> tuple[StateDict, dict[str, Any]]:
        """Pick λ by validation NDCG@10 (fit on train), then refit on train + validation items with it; at one BLAS
        thread (:func:`~fedmerge.reproducibility.blas_threads`)."""
        features = item_features.detach().cpu().numpy().astype(np.float64)
        if features.shape[0] != domain.n_items:
            raise FedmergeError(f"{features.shape[0]} item features for {domain.n_items} items of {domain.name!r}")
        prior = checked_prior(theta0, features.shape[1])
        start = time.perf_counter()
        grid = self.lam_grid()
        validation: list[dict[str, float]] = []
        best = grid[0]
        if len(grid) > 1:
            basis = SylvesterBasis.from_moments(*text_lae_moments(domain.train, features))
            best_value = -np.inf
            for lam in tqdm(grid, desc=f"text-lae {domain.name} λ", disable=not progress):
                weights = {"W": torch.from_numpy(basis.solve(lam, prior).astype(np.float32))}
                value = evaluate_scorer(self.scorer(weights, item_features), domain, split="val",
                                        max_len=self.max_len)[SELECTION_METRIC]
                validation.append({"lam": lam, f"val_{SELECTION_METRIC}": value})
                logger.info("text-lae %s λ=%g: val %s %.4f", domain.name, lam, SELECTION_METRIC, value)
                if value > best_value:
                    best, best_value = lam, value
        basis = SylvesterBasis.from_moments(*text_lae_moments(domain.train_with_val(), features))
        weights = {"W": torch.from_numpy(basis.solve(best, prior).astype(np.float32))}
        info = {"lam": best, "validation": validation, "train_seconds": time.perf_counter() - start}
        return weights, info
