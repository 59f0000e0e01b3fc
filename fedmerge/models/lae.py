"""Item-space linear autoencoders: EASE, RLAE, RDLAE and L3AE (closed forms) with validation-selected settings.

Notation: X is the binary user x item matrix (:func:`fedmerge.data.domain.interaction_matrix`), G = XᵀX its
item Gram matrix, B the n x n item-item weight matrix, and a user's scores are x_u B.

* EASE (Steck, WWW 2019): min ||X - XB||² + λ||B||² s.t. diag(B) = 0.
  With P = (G + λI)⁻¹: B = I - P·diagMat(1/diag(P)).
* RLAE / RDLAE (Moon et al., "It's Enough: Relaxing Diagonal Constraints in Linear Autoencoders", SIGIR 2023):
  min ||X - XB||² + Σ_j Λ_jj ||B_j,:||² s.t. diag(B) ≤ ξ, with Λ = λI (RLAE) or
  Λ = λI + p/(1-p)·diagMat(diag(G)) (RDLAE, the dropout-emphasised penalty of Steck's DLAE).
  KKT with multipliers μ ≥ 0: (G + Λ)B - G + diagMat(μ) = 0, so with P = (G + Λ)⁻¹
  B = P(G - diagMat(μ)) = I - P·diagMat(γ), γ = diag(Λ) + μ, and B_jj = 1 - P_jj γ_j.
  Complementary slackness gives γ_j = Λ_jj where the unconstrained diagonal 1 - Λ_jj P_jj ≤ ξ (inactive) and
  γ_j = (1 - ξ)/P_jj where it would exceed ξ (active, μ_j = (1-ξ)/P_jj - Λ_jj > 0); i.e.
  γ_j = max(Λ_jj, (1 - ξ)/P_jj). Since 1/P_jj (a Schur complement of G + Λ) ≥ Λ_jj, ξ = 0 always binds and gives
  EASE; ξ = 1 never binds and gives the unconstrained LAE B = (G + Λ)⁻¹G.
  Two ways to score, offered by name (``diagonal``): ``"zero"`` (the default) zeroes diag(B), as the authors'
  released code does (the relaxed diagonal then only shapes the off-diagonal weights); ``"keep"`` scores x_u B
  with the fitted diagonal, as the paper's equations do: every item already in the history gets its own B_jj (up
  to ξ) added. That matters only where history items stay in the ranking: in the unmasked metrics, and in the
  masked ones for users whose target is already in their history (a repeat purchase). On Pantry, where users re-buy,
  "keep" measured higher (README, in-domain table), elsewhere "zero".
  With ``"zero"``, where every constraint binds, each ξ gives EASE's columns times (1 − ξ), i.e. the same ranking:
  the grid's ξ values then tie (recorded as ``tied``).
* L3AE (Moon et al., "LLM-Enhanced Linear Autoencoders for Recommendation", CIKM 2025), two phases:
  1. semantic item-item matrix from item text embeddings E (n x d), items' embedding columns acting as users:
     S = argmin ||Eᵀ - EᵀS||² + λ₁||S||² s.t. diag(S) = 0, i.e. EASE on F = EEᵀ:
     S = I - P_S·diagMat(1/diag(P_S)), P_S = (EEᵀ + λ₁I)⁻¹ = (I - E K Eᵀ)/λ₁ with K = (EᵀE + λ₁I)⁻¹ (Woodbury,
     so only a d x d system is solved).
  2. collaborative weights pulled towards S: min ||X - XB||² + λ_X||B||² + λ₂||B - S||² s.t. diag(B) = 0
     (λ_X is the released code's ``reg_X``, which may be negative - the tuned Toys setting is λ_X = -100,
     λ₂ = 200 - as long as G + (λ_X + λ₂)I stays positive definite).
     Stationarity: (G + (λ_X + λ₂)I)B - G - λ₂S + diagMat(μ) = 0, so with P = (G + (λ_X + λ₂)I)⁻¹ and
     B̂ = P(G + λ₂S) (the unconstrained solution), B = B̂ - P·diagMat(μ) with μ_j = B̂_jj / P_jj (zero diagonal).
     Using P G = I - (λ_X + λ₂)P and S = I - P_S D_S (D_S = diagMat(1/diag P_S)): B̂ = I - λ_X P - λ₂ P P_S D_S
     = I - λ_X P - (λ₂/λ₁)(P - (PE) K Eᵀ) D_S, which costs O(n²d) on top of the one n x n Cholesky inverse.
     The λ_X P term only moves column j by a multiple of P's column j, which the diagonal correction absorbs:
     B = (λ₂/λ₁)(PE)(K Eᵀ D_S) - P·diagMat(γ) off the diagonal, γ_j = (1 + (λ₂/λ₁)(PEKEᵀ)_jj (D_S)_jj)/P_jj,
     so λ_X enters only through P.

Every dense matrix is float32; the n x n inverses use a Cholesky factorisation (LAPACK potrf/potri in place).
"""

from __future__ import annotations

import itertools
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import scipy.linalg

from fedmerge.checks import is_finite_number
from fedmerge.data.domain import Domain, interaction_matrix
from fedmerge.errors import FedmergeError
from fedmerge.metrics import evaluate_scorer
from fedmerge.models.base import Recommender

logger = logging.getLogger(__name__)

Config = dict[str, float]
SELECTION_METRIC = "ndcg@10"
_MIRROR_BLOCK = 2048


def gram_matrix(seqs: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Dense float32 item Gram matrix G = XᵀX of the binary interaction matrix X."""
    x = interaction_matrix(seqs, n_items)
    return np.asarray((x.T @ x).toarray(), dtype=np.float32)


def spd_inverse_inplace(m: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite C-contiguous matrix via Cholesky (potrf + potri), overwriting ``m``.

    potri forms the full inverse from the factor in n³ flops without a second n x n buffer (cho_solve against I
    would take 2n³ flops and another matrix). Raises FedmergeError if ``m`` is not positive definite.
    """
    if m.ndim != 2 or m.shape[0] != m.shape[1] or not m.flags.c_contiguous:
        raise ValueError(f"expected a square C-contiguous matrix, got shape {m.shape}")
    potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), (m,))
    fortran_view = m.T  # symmetric, so the Fortran-ordered view is the same matrix and LAPACK works in place
    factor, info = potrf(fortran_view, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        raise FedmergeError(f"matrix is not positive definite (Cholesky failed at pivot {info}); raise the penalty")
    inverse, info = potri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise FedmergeError(f"Cholesky inverse failed (LAPACK info {info})")
    inverse = inverse.T  # back to C order; the valid triangle is the lower one in C terms
    n = inverse.shape[0]
    for start in range(0, n, _MIRROR_BLOCK):
        stop = min(start + _MIRROR_BLOCK, n)
        inverse[start:stop, stop:] = inverse[stop:, start:stop].T
        block = inverse[start:stop, start:stop]
        block[np.triu_indices(stop - start, 1)] = block.T[np.triu_indices(stop - start, 1)]
    return inverse


def penalized_inverse(gram: np.ndarray, penalty: np.ndarray | float) -> np.ndarray:
    """P = (G + diagMat(penalty))⁻¹ (``penalty`` a scalar λ or a per-item vector); ``gram`` is left unchanged."""
    m = np.array(gram, dtype=np.float32, order="C", copy=True)
    m[np.diag_indices_from(m)] += np.asarray(penalty, dtype=np.float32)
    return spd_inverse_inplace(m)


BINDING_RTOL = 1e-6  # float32 inversion's relative rounding of P_jj, well above its 1.2e-7 epsilon


def relaxed_diagonal_weights(inverse: np.ndarray, penalty: np.ndarray | float, xi: float) -> np.ndarray:
    """B = I - P·diagMat(γ) with γ_j = max(Λ_jj, (1-ξ)/P_jj): the LAE with diag(B) ≤ ξ (see module docstring).

    Where the constraint binds, B_jj is set to exactly ξ.
    """
    if not 0.0 <= xi <= 1.0:
        raise ValueError(f"xi must lie in [0, 1], got {xi}")
    diag_p = np.diag(inverse).astype(np.float64)
    penalty = np.broadcast_to(np.asarray(penalty, dtype=np.float64), diag_p.shape)
    binding = (1.0 - xi) / diag_p
    # an item without training interactions has P_jj = 1/Λ_jj, where the constraint just binds: the float32 inverse
    # rounds that either way (diag(B) came out -1.2e-7, not EASE's exact 0), so it counts as binding
    active = binding >= penalty * (1.0 - BINDING_RTOL)
    gamma = np.where(active, binding, penalty).astype(np.float32)
    weights = inverse * -gamma[None, :]
    diag = np.diag_indices_from(weights)
    weights[diag] += 1.0
    weights[diag] = np.where(active, np.float32(xi), weights[diag])
    return weights


def without_diagonal(weights: np.ndarray) -> np.ndarray:
    """``weights`` with its diagonal set to zero in place (an item never scores itself), returned."""
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE: B = I - P·diagMat(1/diag(P)), P = (G + λI)⁻¹, with diag(B) exactly 0."""
    return relaxed_diagonal_weights(penalized_inverse(gram, lam), lam, 0.0)


def rdlae_penalty(gram: np.ndarray, lam: float, dropout: float) -> np.ndarray:
    """Per-item penalty Λ_jj = λ + p/(1-p)·G_jj of the dropout-emphasised objective."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    return (lam + dropout / (1.0 - dropout) * np.diag(gram).astype(np.float64)).astype(np.float32)


def semantic_inverse_factors(embeddings: np.ndarray, lam_sem: float) -> tuple[np.ndarray, np.ndarray]:
    """K = (EᵀE + λ₁I)⁻¹ (d x d) and diag(P_S) of P_S = (EEᵀ + λ₁I)⁻¹ = (I - E K Eᵀ)/λ₁ (Woodbury)."""
    e = np.asarray(embeddings, dtype=np.float64)
    small = e.T @ e
    small[np.diag_indices_from(small)] += lam_sem
    k = scipy.linalg.cho_solve(scipy.linalg.cho_factor(small), np.eye(small.shape[0]))
    diag_ps = (1.0 - np.einsum("ij,jk,ik->i", e, k, e)) / lam_sem
    return k, diag_ps


def l3ae_weights(inverse: np.ndarray, lam_col: float, embeddings: np.ndarray, lam_sem: float) -> np.ndarray:
    """L3AE phase 2 from P = (G + (λ_X + λ₂)I)⁻¹ (λ₂ = ``lam_col``): B = B̂ - P·diagMat(diag(B̂)/diag(P)) with
    B̂ = I - λ_X P - (λ₂/λ₁)(P - PEKEᵀ)D_S; λ_X needs no argument (see the module docstring)."""
    k, diag_ps = semantic_inverse_factors(embeddings, lam_sem)
    d_s = (1.0 / diag_ps).astype(np.float32)
    e = np.asarray(embeddings, dtype=np.float32)
    ratio = np.float32(lam_col / lam_sem)
    pe = inverse @ e
    right = (k.astype(np.float32) @ e.T) * d_s[None, :]  # K Eᵀ D_S, (d, n)
    diag_p = np.diag(inverse)
    diag_unconstrained = 1.0 - ratio * (diag_p - np.einsum("ij,ji->i", pe, right) / d_s) * d_s
    gamma = ratio * d_s + diag_unconstrained / diag_p  # B = I - P·diagMat(γ) + (λ₂/λ₁)(PE)(K Eᵀ D_S)
    weights = pe @ right
    weights *= ratio
    weights -= inverse * gamma[None, :]
    diag = np.diag_indices_from(weights)
    weights[diag] = 0.0
    return weights


def center_normalize_rows(embeddings: np.ndarray, statistics_rows: int | None = None) -> np.ndarray:
    """Item features: embeddings centred on the catalog mean (of the first ``statistics_rows`` rows, default all),
    rows scaled to unit L2 norm (zero rows stay zero)."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be a (n_items, dim) matrix, got shape {e.shape}")
    e = e - e[:statistics_rows].mean(axis=0, keepdims=True)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return (e / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def as_grid(name: str, value: float | Sequence[float], allowed: tuple[Callable[[float], bool], str]) -> tuple[float, ...]:
    """``value`` (a number or a grid of numbers) as a tuple of floats; ValueError naming ``name`` unless every value
    is a finite number that ``allowed``'s test accepts (its words say which)."""
    values = (value,) if np.isscalar(value) else tuple(value)
    test, words = allowed
    bad = [v for v in values if not is_finite_number(v) or not test(float(v))]
    if not values or bad:
        raise ValueError(f"{name} must be finite numbers{words}, got {bad[0] if bad else value!r}")
    return tuple(float(v) for v in values)


POSITIVE = (lambda v: v > 0, " > 0")
NON_NEGATIVE = (lambda v: v >= 0, " >= 0")
ANY = (lambda v: True, "")
UNIT_INTERVAL = (lambda v: 0 <= v <= 1, " in [0, 1]")
DROPOUT = (lambda v: 0 <= v < 1, " in [0, 1)")
# how RLAE / RDLAE score: "zero" (diag(B) zeroed, as the authors' released code) or "keep" (x_u B with the fitted
# diagonal, B_jj = ξ where the constraint binds, as the paper's equations)
DIAGONALS = ("zero", "keep")


class LinearAutoencoder(Recommender):
    """An item-item model scored as x_u B, its hyper-parameters chosen on validation.

    Each grid argument is a value or a grid of values, each checked against its range. ``fit`` scores every grid
    point fitted on ``domain.train`` by validation NDCG@10 (:func:`fedmerge.metrics.evaluate_scorer`), then refits
    the best one (the first of equals) on train + validation items (:meth:`Domain.train_with_val`) for testing; the
    grid points that tie it are kept in :attr:`tied` (their choice is arbitrary). A single point skips the search.
    """

    def __init__(self, **grid: tuple[float | Sequence[float], tuple[Callable[[float], bool], str]]) -> None:
        self.grid = {name: as_grid(name, value, allowed) for name, (value, allowed) in grid.items()}
        self.weights: np.ndarray | None = None
        self.selected: Config = {}
        self.tied: list[Config] = []
        self.validation: list[dict[str, float]] = []

    @property
    def settings(self) -> dict[str, str]:
        """Options that are not searched (none here)."""
        return {}

    def candidates(self) -> list[Config]:
        """Every grid point, in grid order (outer parameters first so costly solves are reused)."""
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*self.grid.values())]

    @abstractmethod
    def solutions(self, gram: np.ndarray, configs: list[Config], features: np.ndarray | None) -> Iterator[np.ndarray]:
        """Weights B for each config in order (reusing shared factorisations)."""

    def fit(self, domain: Domain, item_embeddings: np.ndarray | None = None) -> LinearAutoencoder:
        features = None
        if self.needs_embeddings:
            if item_embeddings is None:
                raise FedmergeError(f"model {self.name!r} needs item text embeddings")
            if item_embeddings.shape[0] != domain.n_items:
                raise FedmergeError(
                    f"{item_embeddings.shape[0]} item embeddings for {domain.n_items} items of {domain.name!r}"
                )
            features = center_normalize_rows(item_embeddings)
        configs = self.candidates()
        self.validation = []
        best = configs[0]
        values: list[float] = []
        if len(configs) > 1:
            gram = gram_matrix(domain.train, domain.n_items)
            for config, weights in zip(configs, self.solutions(gram, configs, features)):
                self.weights = weights
                metrics = evaluate_scorer(self.score, domain, split="val")
                if not np.isfinite(metrics[SELECTION_METRIC]):
                    raise FedmergeError(f"{self.name} {config}: validation {SELECTION_METRIC} is "
                                        f"{metrics[SELECTION_METRIC]} (non-finite weights)")
                values.append(metrics[SELECTION_METRIC])
                self.validation.append({**config, f"val_{SELECTION_METRIC}": metrics[SELECTION_METRIC]})
                logger.info("%s %s: val %s %.4f", self.name, config, SELECTION_METRIC, metrics[SELECTION_METRIC])
            best = configs[int(np.argmax(values))]
            self.weights = None
            del gram
        self.tied = [c for c, v in zip(configs, values) if c is not best and v == max(values)]
        if self.tied:
            logger.warning("%s: validation %s ties at %s for %s: the first is kept, the choice is arbitrary",
                           self.name, SELECTION_METRIC, best, self.tied)
        gram = gram_matrix(domain.train_with_val(), domain.n_items)
        self.weights = next(iter(self.solutions(gram, [best], features)))
        self.selected = best
        return self

    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        if self.weights is None:
            raise FedmergeError(f"model {self.name!r} is not fitted")
        x = interaction_matrix(sequences, self.weights.shape[0])
        return np.asarray(x @ self.weights, dtype=np.float32)


class RelaxedDiagonalLAE(LinearAutoencoder):
    """RLAE and RDLAE: fitted with diag(B) ≤ ξ, scored as ``diagonal`` says (:data:`DIAGONALS`)."""

    def __init__(self, diagonal: str, **grid: tuple[float | Sequence[float], tuple[Callable[[float], bool], str]]) -> None:
        if diagonal not in DIAGONALS:
            raise ValueError(f"diagonal must be 'zero' (the released code) or 'keep' (the paper's equations), "
                             f"got {diagonal!r}")
        super().__init__(**grid)
        self.diagonal = diagonal

    @property
    def settings(self) -> dict[str, str]:
        return {"diagonal": self.diagonal}

    def scored(self, weights: np.ndarray) -> np.ndarray:
        """The fitted B as it is scored: its diagonal zeroed (``"zero"``) or kept."""
        return without_diagonal(weights) if self.diagonal == "zero" else weights


class EASE(LinearAutoencoder):
    """EASE (Steck 2019); λ grid around the values that suit sparse Amazon data (Pantry: λ = 50)."""

    name = "ease"

    def __init__(self, lam: float | Sequence[float] = (20.0, 50.0, 200.0)) -> None:
        super().__init__(lam=(lam, POSITIVE))

    def solutions(self, gram: np.ndarray, configs: list[Config], features: np.ndarray | None) -> Iterator[np.ndarray]:
        for config in configs:
            yield ease_weights(gram, config["lam"])


class RLAE(RelaxedDiagonalLAE):
    """RLAE (Moon et al. 2023): EASE's objective with diag(B) ≤ ξ, scored with diag(B) zeroed (``diagonal="zero"``,
    as the released code) or kept (``"keep"``, the paper's x_u B). The paper tunes ξ in small steps from 0."""

    name = "rlae"

    def __init__(
        self, lam: float | Sequence[float] = (50.0, 200.0), xi: float | Sequence[float] = (0.1, 0.2),
        diagonal: str = "zero",
    ) -> None:
        super().__init__(diagonal, lam=(lam, POSITIVE), xi=(xi, UNIT_INTERVAL))

    def solutions(self, gram: np.ndarray, configs: list[Config], features: np.ndarray | None) -> Iterator[np.ndarray]:
        inverse, inverse_lam = None, None
        for config in configs:
            if inverse_lam != config["lam"]:
                inverse, inverse_lam = None, config["lam"]
                inverse = penalized_inverse(gram, inverse_lam)
            yield self.scored(relaxed_diagonal_weights(inverse, inverse_lam, config["xi"]))


class RDLAE(RelaxedDiagonalLAE):
    """RDLAE (Moon et al. 2023): dropout-emphasised penalty λ + p/(1-p)·G_jj with diag(B) ≤ ξ (DLAE: p ≈ 0.25-0.5),
    scored with diag(B) zeroed (``diagonal="zero"``, as the released code) or kept (``"keep"``, the paper's x_u B)."""

    name = "rdlae"

    def __init__(
        self,
        lam: float | Sequence[float] = 20.0,
        dropout: float | Sequence[float] = (0.25, 0.5),
        xi: float | Sequence[float] = (0.0, 0.1, 0.2),
        diagonal: str = "zero",
    ) -> None:
        super().__init__(diagonal, lam=(lam, POSITIVE), dropout=(dropout, DROPOUT), xi=(xi, UNIT_INTERVAL))

    def solutions(self, gram: np.ndarray, configs: list[Config], features: np.ndarray | None) -> Iterator[np.ndarray]:
        inverse, key, penalty = None, None, None
        for config in configs:
            if key != (config["lam"], config["dropout"]):
                inverse, key = None, (config["lam"], config["dropout"])
                penalty = rdlae_penalty(gram, *key)
                inverse = penalized_inverse(gram, penalty)
            yield self.scored(relaxed_diagonal_weights(inverse, penalty, config["xi"]))


class L3AE(LinearAutoencoder):
    """L3AE (Moon et al. 2025): EASE regularised towards a semantic item-item matrix from text embeddings.

    ``lam_sem`` (λ₁, the released code's ``reg_F``) regularises the semantic EASE on the centred unit-norm
    embeddings; ``lam`` (λ₂, ``reg_E``) pulls B towards S (λ₂ → 0 gives EASE-like collaborative weights, λ₂ → ∞
    gives S); ``reg_x`` (λ_X, ``reg_X``) is a plain ridge on B, negative values (the released tuned configurations
    use them) loosen it. Every grid point needs λ_X + λ₂ > 0.
    """

    name = "l3ae"
    needs_embeddings = True

    def __init__(
        self,
        lam: float | Sequence[float] = (100.0, 300.0, 1000.0),
        reg_x: float | Sequence[float] = (0.0, -50.0),
        lam_sem: float | Sequence[float] = (0.3, 3.0),
    ) -> None:
        super().__init__(lam=(lam, NON_NEGATIVE), reg_x=(reg_x, ANY), lam_sem=(lam_sem, POSITIVE))
        bad = [(lam_col, reg_x) for lam_col in self.grid["lam"] for reg_x in self.grid["reg_x"] if lam_col + reg_x <= 0]
        if bad:
            raise FedmergeError(f"l3ae: lam + reg_x must be positive (G + (lam + reg_x)I must stay positive "
                                f"definite); (lam, reg_x) pairs {bad} are not (pass reg_x=0.0 for the plain ridge)")

    def solutions(self, gram: np.ndarray, configs: list[Config], features: np.ndarray | None) -> Iterator[np.ndarray]:
        if features is None:
            raise FedmergeError("l3ae needs item embeddings")
        inverse, inverse_penalty = None, None
        for config in configs:
            penalty = config["lam"] + config["reg_x"]
            if inverse_penalty != penalty:
                inverse, inverse_penalty = None, penalty
                inverse = penalized_inverse(gram, inverse_penalty)
            yield l3ae_weights(inverse, config["lam"], features, config["lam_sem"])
