"""Closed forms of the item-space LAEs, popularity and the text-space LAE against direct numerical solutions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from fedmerge.data.domain import Domain, ItemCatalog, interaction_matrix
from fedmerge.errors import FedmergeError
from fedmerge.metrics import evaluate_scorer
from fedmerge.models import get_family, get_recommender, pad_sequences
from fedmerge.models import lae
from fedmerge.models.lae import (
    ease_weights,
    gram_matrix,
    l3ae_weights,
    penalized_inverse,
    rdlae_penalty,
    relaxed_diagonal_weights,
    spd_inverse_inplace,
)
from fedmerge.models.text_lae import SylvesterBasis, text_lae_moments


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def random_domain(n_users: int = 60, n_items: int = 12, seed: int = 0) -> Domain:
    """Users walk mostly to the next item index, so the data has learnable item-item structure."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        length = int(rng.integers(4, 9))
        start = int(rng.integers(n_items))
        steps = np.where(rng.random(length) < 0.7, 1, rng.integers(0, n_items, length))
        seqs.append((start + np.cumsum(steps)) % n_items)
    catalog = ItemCatalog(ids=tuple(f"i{i}" for i in range(n_items)),
                          fields=tuple({"title": f"item {i}"} for i in range(n_items)))
    return Domain(
        name="tiny",
        catalog=catalog,
        train=tuple(s[:-2].astype(np.int64) for s in seqs),
        val_target=np.array([s[-2] for s in seqs], dtype=np.int64),
        test_target=np.array([s[-1] for s in seqs], dtype=np.int64),
    )


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """A dense binary X (users x items) and its Gram matrix G."""
    rng = np.random.default_rng(1)
    x = (rng.random((80, 10)) < 0.3).astype(np.float64)
    return x, x.T @ x


def column_solution(g: np.ndarray, target: np.ndarray, penalty: np.ndarray, j: int, fixed: float) -> np.ndarray:
    """Column j of min ||X - XB||² + Σ_k penalty_k (B_kj - target_kj)² with B_jj fixed: a direct small solve."""
    n = g.shape[0]
    rest = np.delete(np.arange(n), j)
    m = g[np.ix_(rest, rest)] + np.diag(penalty[rest])
    rhs = g[rest, j] - g[rest, j] * fixed + penalty[rest] * target[rest, j]
    col = np.zeros(n)
    col[rest] = np.linalg.solve(m, rhs)
    col[j] = fixed
    return col


def test_spd_inverse_matches_numpy_across_mirror_blocks(monkeypatch) -> None:
    monkeypatch.setattr(lae, "_MIRROR_BLOCK", 3)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 7))
    m = (a.T @ a + np.eye(7)).astype(np.float32)
    np.testing.assert_allclose(spd_inverse_inplace(m.copy()), np.linalg.inv(m.astype(np.float64)), rtol=1e-4, atol=1e-6)


def test_spd_inverse_rejects_indefinite_matrix() -> None:
    with pytest.raises(FedmergeError, match="positive definite"):
        spd_inverse_inplace(np.diag([1.0, -1.0, 2.0]).astype(np.float32))


def test_gram_matrix_is_binary_xtx() -> None:
    seqs = [np.array([0, 2, 2]), np.array([1, 2])]
    x = np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(gram_matrix(seqs, 3), x.T @ x)


def test_ease_matches_columnwise_constrained_ridge(data) -> None:
    _, g = data
    lam = 3.0
    b = ease_weights(g.astype(np.float32), lam)
    assert np.all(np.diag(b) == 0.0)
    penalty = np.full(len(g), lam)
    for j in range(len(g)):
        np.testing.assert_allclose(b[:, j], column_solution(g, np.zeros_like(g), penalty, j, 0.0), atol=2e-5)


@pytest.mark.parametrize("lam", [7.0, 50.0, 200.0])
def test_ease_diagonal_is_exactly_zero_for_an_item_nobody_trained_on(data, lam) -> None:
    """A zero Gram column has P_jj = 1/λ, where the float32 inverse rounded the constraint to "not binding":
    diag(B) = -1.2e-7 for that item."""
    _, g = data
    g = np.pad(g.astype(np.float32), ((0, 1), (0, 1)))  # one more item, never interacted with
    assert np.all(np.diag(ease_weights(g, lam)) == 0.0)


@pytest.mark.parametrize("quantile", [0.3, 0.7])
def test_rlae_matches_bounded_optimizer_and_kkt(data, quantile) -> None:
    x, g = data
    lam = 2.0
    xi = float(np.quantile(np.diag(np.linalg.solve(g + lam * np.eye(len(g)), g)), quantile))  # some bind, some not
    b = relaxed_diagonal_weights(penalized_inverse(g.astype(np.float32), lam), lam, xi).astype(np.float64)
    assert np.all(np.diag(b) <= xi + 1e-6)
    for j in range(len(g)):  # the objective separates by column; bound only on B_jj
        def objective(col: np.ndarray) -> tuple[float, np.ndarray]:
            r = x[:, j] - x @ col
            return float(r @ r + lam * col @ col), -2 * x.T @ r + 2 * lam * col

        bounds = [(None, None)] * len(g)
        bounds[j] = (None, xi)
        res = scipy.optimize.minimize(objective, np.zeros(len(g)), jac=True, method="L-BFGS-B", bounds=bounds,
                                      options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000})
        np.testing.assert_allclose(b[:, j], res.x, atol=1e-4)
    residual = (g + lam * np.eye(len(g))) @ b - g  # = -diagMat(μ): off-diagonal zero, μ ≥ 0, slackness
    np.testing.assert_allclose(residual - np.diag(np.diag(residual)), 0.0, atol=1e-4)
    mu = -np.diag(residual)
    assert np.all(mu >= -1e-4)
    np.testing.assert_allclose(mu * (np.diag(b) - xi), 0.0, atol=1e-4)
    assert (mu > 1e-3).any() and (mu < 1e-3).any(), "both active and inactive constraints should be exercised"


def test_rlae_limits(data) -> None:
    _, g = data
    g32 = g.astype(np.float32)
    lam = 2.0
    inverse = penalized_inverse(g32, lam)
    np.testing.assert_allclose(relaxed_diagonal_weights(inverse, lam, 0.0), ease_weights(g32, lam), atol=1e-6)
    unconstrained = np.linalg.solve(g + lam * np.eye(len(g)), g)
    np.testing.assert_allclose(relaxed_diagonal_weights(inverse, lam, 1.0), unconstrained, atol=2e-5)


def test_rdlae_matches_columnwise_solution_and_limit(data) -> None:
    _, g = data
    lam, dropout, xi = 1.0, 0.4, 0.1
    penalty = rdlae_penalty(g.astype(np.float32), lam, dropout).astype(np.float64)
    np.testing.assert_allclose(penalty, lam + dropout / (1 - dropout) * np.diag(g), rtol=1e-6)
    inverse = penalized_inverse(g.astype(np.float32), penalty)
    b = relaxed_diagonal_weights(inverse, penalty, xi)
    unconstrained = np.linalg.solve(g + np.diag(penalty), g)
    for j in range(len(g)):  # active: B_jj = ξ fixed; inactive: the unconstrained column
        expected = column_solution(g, np.zeros_like(g), penalty, j, xi) if unconstrained[j, j] > xi else unconstrained[:, j]
        np.testing.assert_allclose(b[:, j], expected, atol=2e-5)
    np.testing.assert_allclose(relaxed_diagonal_weights(inverse, penalty, 1.0), unconstrained, atol=2e-5)


def test_l3ae_matches_direct_two_phase_solution(data) -> None:
    _, g = data
    rng = np.random.default_rng(3)
    e = lae.center_normalize_rows(rng.standard_normal((len(g), 4)))
    lam_sem, lam_col = 0.5, 4.0
    s = ease_weights((e @ e.T).astype(np.float32), lam_sem).astype(np.float64)  # phase 1, dense and direct
    b = l3ae_weights(penalized_inverse(g.astype(np.float32), lam_col), lam_col, e, lam_sem)
    assert np.all(np.diag(b) == 0.0)
    penalty = np.full(len(g), lam_col)
    for j in range(len(g)):
        np.testing.assert_allclose(b[:, j], column_solution(g, s, penalty, j, 0.0), atol=5e-5)
    residual = (g + lam_col * np.eye(len(g))) @ b - g - lam_col * s  # stationarity up to the diagonal multipliers
    np.testing.assert_allclose(residual - np.diag(np.diag(residual)), 0.0, atol=2e-4)


def test_l3ae_reg_x_matches_direct_solution_with_negative_ridge(data) -> None:
    _, g = data
    rng = np.random.default_rng(5)
    e = lae.center_normalize_rows(rng.standard_normal((len(g), 4)))
    lam_sem, lam_col, reg_x = 0.5, 4.0, -1.5  # negative λ_X as in the released tuned configurations
    s = ease_weights((e @ e.T).astype(np.float32), lam_sem).astype(np.float64)
    b = l3ae_weights(penalized_inverse(g.astype(np.float32), lam_col + reg_x), lam_col, e, lam_sem)
    # λ_X||b||² + λ₂||b - s||² = (λ_X + λ₂)||b - λ₂/(λ_X + λ₂) s||² + const
    total = lam_col + reg_x
    for j in range(len(g)):
        np.testing.assert_allclose(b[:, j], column_solution(g, lam_col / total * s, np.full(len(g), total), j, 0.0),
                                   atol=5e-5)
    without = l3ae_weights(penalized_inverse(g.astype(np.float32), lam_col), lam_col, e, lam_sem)
    assert np.abs(b - without).max() > 1e-3


def test_l3ae_rejects_non_positive_total_ridge() -> None:
    with pytest.raises(FedmergeError, match="lam \\+ reg_x"):
        get_recommender("l3ae", lam=(10.0, 100.0), reg_x=-50.0)


@pytest.mark.parametrize("name, params", [("rlae", {"lam": 1.0, "xi": 0.3}),
                                          ("rdlae", {"lam": 1.0, "dropout": 0.25, "xi": 0.3})])
def test_rlae_rdlae_score_with_zero_diagonal(name, params) -> None:
    """The released code zeroes diag(B) before scoring; a kept B_jj = ξ would give every history item +ξ."""
    domain = random_domain()
    model = get_recommender(name, **params).fit(domain)
    assert np.all(np.diag(model.weights) == 0.0)
    gram = gram_matrix(domain.train_with_val(), domain.n_items)
    penalty = params["lam"] if name == "rlae" else rdlae_penalty(gram, params["lam"], params["dropout"])
    solved = relaxed_diagonal_weights(penalized_inverse(gram, penalty), penalty, params["xi"])
    assert np.diag(solved).max() == pytest.approx(0.3)  # the constraint binds somewhere
    off = ~np.eye(domain.n_items, dtype=bool)
    np.testing.assert_allclose(model.weights[off], solved[off], rtol=1e-6)
    scores = model.score([np.array([i]) for i in range(domain.n_items)])
    assert np.all(np.diag(scores) == 0.0)  # a one-item history gives its own item nothing


def test_center_normalize_rows() -> None:
    e = np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
    out = lae.center_normalize_rows(e)
    np.testing.assert_allclose(out, [[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])


def test_ease_fit_selects_on_validation_then_refits_on_train_with_val() -> None:
    domain = random_domain()
    model = get_recommender("ease", lam=(0.5, 5.0, 500.0)).fit(domain)
    values = [row["val_ndcg@10"] for row in model.validation]
    assert len(values) == 3
    best = model.validation[int(np.argmax(values))]["lam"]
    assert model.selected == {"lam": best}
    direct = dict(zip((0.5, 5.0, 500.0), values))
    model_val = get_recommender("ease", lam=best)
    model_val.weights = ease_weights(gram_matrix(domain.train, domain.n_items), best)
    assert evaluate_scorer(model_val.score, domain, split="val")["ndcg@10"] == pytest.approx(direct[best])
    expected = ease_weights(gram_matrix(domain.train_with_val(), domain.n_items), best)
    np.testing.assert_allclose(model.weights, expected)
    seqs = [np.array([0, 3, 3]), np.array([5])]
    np.testing.assert_allclose(model.score(seqs), interaction_matrix(seqs, domain.n_items).toarray() @ expected,
                               rtol=1e-6)


def test_rlae_rdlae_l3ae_fit_and_score_shapes() -> None:
    domain = random_domain()
    emb = np.random.default_rng(0).standard_normal((domain.n_items, 6))
    for name, params in [("rlae", {"lam": (1.0, 10.0), "xi": (0.0, 0.2)}),
                         ("rdlae", {"lam": 1.0, "dropout": (0.25, 0.5), "xi": 0.1}),
                         ("l3ae", {"lam": (1.0, 10.0), "reg_x": 0.0, "lam_sem": 1.0})]:
        model = get_recommender(name, **params).fit(domain, emb)
        assert len(model.validation) == 4 if name == "rlae" else 2
        assert set(model.selected) == set(params)
        assert model.score([np.array([1, 2])]).shape == (1, domain.n_items)


def test_l3ae_without_embeddings_is_a_clear_error() -> None:
    with pytest.raises(FedmergeError, match="embeddings"):
        get_recommender("l3ae", lam=1.0, reg_x=0.0, lam_sem=1.0).fit(random_domain())


def test_unknown_parameter_and_bad_xi() -> None:
    with pytest.raises(FedmergeError, match="unknown parameter"):
        get_recommender("ease", lambda_=3)
    with pytest.raises(ValueError, match="xi"):
        relaxed_diagonal_weights(np.eye(2, dtype=np.float32), 1.0, 1.5)


def test_popularity_counts_users_per_item_in_train_and_val() -> None:
    domain = random_domain()
    model = get_recommender("popularity").fit(domain)
    histories = [set(s.tolist()) | {int(v)} for s, v in zip(domain.train, domain.val_target)]
    expected = np.array([sum(i in h for h in histories) for i in range(domain.n_items)], dtype=np.float32)
    scores = model.score([np.array([0]), np.array([1, 2])])
    np.testing.assert_array_equal(scores, np.stack([expected, expected]))


# ----------------------------------------------------------------------------------------------- text-space LAE


def text_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((40, 15)) < 0.25).astype(np.float64)
    e = rng.standard_normal((15, 5))
    w0 = np.eye(5) + 0.1 * rng.standard_normal((5, 5))
    return x, e, w0


def test_text_lae_solution_zeroes_the_objective_gradient() -> None:
    x, e, w0 = text_problem()
    seqs = [np.flatnonzero(row) for row in x]
    lam = 0.7
    w = SylvesterBasis.from_moments(*text_lae_moments(seqs, e)).solve(lam, w0)
    grad = -2 * e.T @ x.T @ (x - x @ e @ w @ e.T) @ e + 2 * lam * (w - w0)
    scale = np.abs(2 * e.T @ x.T @ x @ e).max()
    assert np.abs(grad).max() < 1e-9 * scale


def test_text_lae_large_lambda_gives_prior() -> None:
    x, e, w0 = text_problem()
    basis = SylvesterBasis.from_moments(*text_lae_moments([np.flatnonzero(r) for r in x], e))
    np.testing.assert_allclose(basis.solve(1e12, np.eye(5)), np.eye(5), atol=1e-8)
    np.testing.assert_allclose(basis.solve(1e12, w0), w0, atol=1e-8)


def test_text_lae_forward_is_binary_history_times_e_w_et() -> None:
    family = get_family("text-lae", lam=1.0)
    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.standard_normal((9, 4)).astype(np.float32))
    weights = {"W": torch.from_numpy(rng.standard_normal((4, 4)).astype(np.float32))}
    seqs = [np.array([0, 3, 3, 8]), np.array([5]), np.array([], dtype=np.int64)]
    module = family.load(weights, 4)
    out = module(pad_sequences(seqs, 6), feats).detach().numpy()
    x = interaction_matrix(seqs, 9).toarray()
    expected = x @ feats.numpy() @ weights["W"].numpy() @ feats.numpy().T
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(family.scorer(weights, feats)(seqs), expected, rtol=1e-5, atol=1e-5)


def test_text_lae_family_train_refits_selected_lambda_from_theta0() -> None:
    domain = random_domain()
    family = get_family("text-lae", lam=(0.1, 10.0, 1e4))
    emb = np.random.default_rng(4).standard_normal((domain.n_items, 6))
    feats = family.item_features(emb)
    np.testing.assert_allclose(np.linalg.norm(feats.numpy(), axis=1), 1.0, rtol=1e-5)
    theta0 = family.initial_weights(6, seed=3)
    assert set(theta0) == {"W"} and torch.equal(theta0["W"], torch.eye(6))
    weights, info = family.train(theta0, domain, feats, progress=False)
    assert [row["lam"] for row in info["validation"]] == [0.1, 10.0, 1e4]
    assert info["lam"] == max(info["validation"], key=lambda r: r["val_ndcg@10"])["lam"]
    basis = SylvesterBasis.from_moments(*text_lae_moments(domain.train_with_val(), feats.numpy()))
    np.testing.assert_allclose(weights["W"].numpy(), basis.solve(info["lam"], np.eye(6)), rtol=1e-4, atol=1e-5)
    assert set(weights) == set(family.build(6).state_dict())


@pytest.mark.parametrize("name, params, message", [
    # each ran silently (λ ≤ 0 whenever G happened to be positive definite), gave NaN weights, or failed deep in
    # LAPACK or with a division by zero, none naming the parameter
    ("ease", {"lam": -0.5}, r"model 'ease': lam must be finite numbers > 0, got -0.5"),
    ("ease", {"lam": 0.0}, r"lam must be finite numbers > 0, got 0.0"),
    ("ease", {"lam": float("nan")}, r"lam must be finite numbers > 0, got nan"),
    ("ease", {"lam": (10.0, float("inf"))}, r"lam must be finite numbers > 0, got inf"),
    ("rlae", {"lam": -1.0}, r"model 'rlae': lam must be finite numbers > 0"),
    ("rlae", {"xi": float("nan")}, r"model 'rlae': xi must be finite numbers in \[0, 1\], got nan"),
    ("rlae", {"xi": 1.5}, r"xi must be finite numbers in \[0, 1\], got 1.5"),
    ("rdlae", {"lam": -10.0}, r"model 'rdlae': lam must be finite numbers > 0"),
    ("rdlae", {"dropout": 1.0}, r"model 'rdlae': dropout must be finite numbers in \[0, 1\), got 1.0"),
    ("l3ae", {"lam": -5.0, "reg_x": 10.0}, r"model 'l3ae': lam must be finite numbers >= 0, got -5.0"),
    ("l3ae", {"lam_sem": 0.0}, r"model 'l3ae': lam_sem must be finite numbers > 0, got 0.0"),
    ("l3ae", {"lam_sem": -1.0}, r"lam_sem must be finite numbers > 0"),
    ("l3ae", {"reg_x": float("nan")}, r"model 'l3ae': reg_x must be finite numbers, got nan"),
    ("rlae", {"diagonal": "none"}, r"model 'rlae': diagonal must be 'zero' \(the released code\) or 'keep'"),
])
def test_lae_settings_out_of_range_are_refused_naming_the_parameter(name, params, message) -> None:
    with pytest.raises(FedmergeError, match=message):
        get_recommender(name, **params)


@pytest.mark.parametrize("name, params", [("rlae", {"lam": 1.0, "xi": 0.3}),
                                          ("rdlae", {"lam": 1.0, "dropout": 0.25, "xi": 0.3})])
def test_rlae_rdlae_keep_diagonal_scores_with_the_fitted_b(name, params) -> None:
    """The paper's equations score x_u B with the fitted diagonal (B_jj = ξ where the constraint binds); the
    released code zeroes it. Both are offered by name; the off-diagonal weights are the same."""
    domain = random_domain()
    zeroed = get_recommender(name, **params).fit(domain)
    kept = get_recommender(name, **params, diagonal="keep").fit(domain)
    gram = gram_matrix(domain.train_with_val(), domain.n_items)
    penalty = params["lam"] if name == "rlae" else rdlae_penalty(gram, params["lam"], params["dropout"])
    solved = relaxed_diagonal_weights(penalized_inverse(gram, penalty), penalty, params["xi"])
    np.testing.assert_allclose(kept.weights, solved, rtol=1e-6)
    assert np.diag(kept.weights).max() == pytest.approx(0.3)
    off = ~np.eye(domain.n_items, dtype=bool)
    np.testing.assert_array_equal(kept.weights[off], zeroed.weights[off])
    one_item = kept.score([np.array([i]) for i in range(domain.n_items)])
    np.testing.assert_allclose(np.diag(one_item), np.diag(solved), rtol=1e-6)
    assert kept.settings == {"diagonal": "keep"} and zeroed.settings == {"diagonal": "zero"}


def test_grid_points_that_tie_the_selected_one_are_recorded() -> None:
    """With every diagonal constraint binding, each ξ scales EASE's columns by 1 − ξ: the same ranking, so the
    'selected' ξ is only the first grid point; the fit says which points tied instead of reporting it as a choice."""
    domain = random_domain()
    model = get_recommender("rlae", lam=1.0, xi=(0.0, 0.05)).fit(domain)
    values = [row["val_ndcg@10"] for row in model.validation]
    assert values[0] == values[1]  # the premise: every column binds at both ξ
    assert model.selected == {"lam": 1.0, "xi": 0.0} and model.tied == [{"lam": 1.0, "xi": 0.05}]
    distinct = get_recommender("ease", lam=(0.5, 500.0)).fit(domain)
    assert distinct.validation[0]["val_ndcg@10"] != distinct.validation[1]["val_ndcg@10"] and distinct.tied == []


@pytest.mark.parametrize("params, message", [
    ({"lam": float("nan")}, r"lam must be finite numbers > 0, got nan"),
    ({"lam": (1.0, float("inf"))}, r"lam must be finite numbers > 0, got inf"),
    ({"lam": -1.0}, r"lam must be finite numbers > 0, got -1.0"),
    ({"lam": ()}, r"lam must be finite numbers > 0, got \(\)"),
    ({"max_len": 0}, r"max_len must be >= 1, got 0"),
])
def test_text_lae_settings_are_checked_when_the_family_is_built(params, message) -> None:
    """They were checked only inside train(): a NaN λ wrote an all-NaN weights file, a negative one failed with a
    traceback after θ₀ had been written."""
    with pytest.raises(FedmergeError, match=r"model family 'text-lae': " + message):
        get_family("text-lae", **params)
