"""User-level DP for the text-LAE: bounded user profiles, the symmetric Gaussian mechanism on the Gram matrix."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from fedmerge.data.domain import interaction_matrix
from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.errors import FedmergeError
from fedmerge.models.text_lae import TextLAEFamily
from fedmerge.privacy.client import private_train
from fedmerge.privacy.dp import epsilon_for, noise_multiplier_for
from fedmerge.scenario import Scenario
from fedmerge.privacy.lae import (
    clipped_profiles,
    private_gram,
    psd_repair,
    symmetric_noise,
    train_text_lae_user_level,
)


@pytest.fixture(scope="module")
def domain():
    return make_synthetic_domains(n_domains=1, n_users=50, n_items=30, seed=2)[0]


@pytest.fixture(scope="module")
def features(domain):
    family = TextLAEFamily(lam=10.0)
    raw = np.random.default_rng(0).normal(size=(domain.n_items, 8))
    return family.item_features(raw)


def test_profiles_are_bounded_and_small_ones_unchanged(domain, features):
    e = features.numpy().astype(np.float64)
    z = interaction_matrix(domain.train, domain.n_items) @ e
    norms = np.linalg.norm(z, axis=1)
    bound = float(np.median(norms))
    rows, clipped = clipped_profiles(domain.train, e, bound)
    assert np.all(np.linalg.norm(rows, axis=1) <= bound * (1 + 1e-9))
    small = norms <= bound
    np.testing.assert_allclose(rows[small], z[small])
    assert clipped == pytest.approx((~small).mean())
    # removing any one user moves the Gram matrix's upper triangle by at most B² in L2 (the mechanism's sensitivity)
    gram = rows.T @ rows
    for u in range(len(rows)):
        rest = np.delete(rows, u, axis=0)
        assert np.linalg.norm(np.triu(gram - rest.T @ rest)) <= bound**2 * (1 + 1e-9)


def test_symmetric_noise_has_the_asked_scale():
    noise = symmetric_noise(300, 2.5, np.random.default_rng(0))
    np.testing.assert_array_equal(noise, noise.T)
    assert noise[np.triu_indices(300, 1)].std() == pytest.approx(2.5, rel=0.02)
    # the diagonal on its own (pooled with 44,850 off-diagonal entries, a doubled diagonal variance went unseen)
    assert np.diag(noise).std() == pytest.approx(2.5, rel=0.15)


def test_the_gram_noise_has_std_z_times_the_squared_bound(domain, features):
    """Sensitivity B²: with B = 2 the noise is z·4 (B = 1, the only bound tried before, cannot tell B from B²)."""
    rows, _ = clipped_profiles(domain.train, features.numpy(), 2.0)
    noisy, _ = private_gram(domain.train, features.numpy(), 2.0, 1.5, seed=3)
    noise = noisy - rows.T @ rows
    np.testing.assert_allclose(noise, symmetric_noise(noise.shape[0], 1.5 * 4.0, np.random.default_rng(3)), atol=1e-9)


def test_without_noise_and_clipping_it_is_the_family_closed_form(domain, features):
    family = TextLAEFamily(lam=10.0)
    theta0 = family.initial_weights(features.shape[1])
    expected, _ = family.train(theta0, domain, features, progress=False)
    private, metrics = train_text_lae_user_level(family, theta0, domain, features, noise_multiplier=0.0, bound=1e6,
                                                 noise_seed=0)
    torch.testing.assert_close(private["W"], expected["W"], rtol=1e-4, atol=1e-5)
    assert metrics["dp_clipped_fraction"] == 0.0
    noisy, _ = train_text_lae_user_level(family, theta0, domain, features, noise_multiplier=1.0, bound=1.0, noise_seed=0)
    assert not torch.allclose(noisy["W"], expected["W"])
    gram_a, _ = private_gram(domain.train, features.numpy(), 1.0, 1.0, seed=3)
    gram_b, _ = private_gram(domain.train, features.numpy(), 1.0, 1.0, seed=3)
    np.testing.assert_array_equal(gram_a, gram_b)
    with pytest.raises(FedmergeError, match="one λ"):
        train_text_lae_user_level(TextLAEFamily(), theta0, domain, features, noise_multiplier=1.0, bound=1.0,
                                  noise_seed=0)


def test_client_reports_the_analytic_gaussian_epsilon_over_releases(domain, features):
    cfg = Scenario.from_mapping({"model": {"family": "text-lae", "params": {"lam": 10.0}},
                                 "baselines": {"fedavg_rounds": 1},
                                 "privacy": {"enabled": True, "unit": "user", "target_epsilon": 3.0,
                                             "user_norm_bound": 2.0, "noise_seed": 0}})
    family = TextLAEFamily(lam=10.0)
    _, metrics = private_train(family, family.initial_weights(features.shape[1]), domain, features, cfg, seed=0,
                               round_index=0, noise_seed=0)
    assert metrics["dp_unit"] == 1 and metrics["dp_user_bound"] == 2.0
    assert metrics["dp_epsilon_run"] == pytest.approx(3.0, rel=1e-6)
    # calibrated for the run's two releases (the one-shot weights and one FedAvg round), not derived from itself
    assert metrics["dp_noise_multiplier"] == pytest.approx(noise_multiplier_for(3.0, 1e-5, rounds=2), rel=1e-6)
    assert metrics["dp_epsilon"] == pytest.approx(epsilon_for(metrics["dp_noise_multiplier"], 1e-5, rounds=1))
    with pytest.raises(FedmergeError, match="one λ"):
        Scenario.from_mapping({"model": {"family": "text-lae"}, "privacy": {"enabled": True, "unit": "user"}})


def test_the_noisy_gram_is_made_psd_by_clipping_or_by_absolute_eigenvalues(domain, features):
    """"clip" sets the noise's negative eigenvalues to 0 (the nearest PSD matrix), "abs" keeps their magnitude; both
    keep the eigenvectors and leave a PSD matrix as it is; the scenario chooses one (default "clip")."""
    noisy, _ = private_gram(domain.train, features.numpy(), 1.0, 3.0, seed=1)
    eigenvalues, vectors = np.linalg.eigh(noisy)
    assert (eigenvalues < 0).any()  # the noise made it indefinite
    clipped, absolute = psd_repair(noisy, "clip"), psd_repair(noisy, "abs")
    np.testing.assert_allclose(np.linalg.eigvalsh(clipped), np.sort(np.clip(eigenvalues, 0, None)), atol=1e-9)
    np.testing.assert_allclose(np.linalg.eigvalsh(absolute), np.sort(np.abs(eigenvalues)), atol=1e-9)
    np.testing.assert_allclose(absolute @ absolute, noisy @ noisy, atol=1e-8)  # |Â| = (Â²)^½
    psd = noisy @ noisy.T
    np.testing.assert_allclose(psd_repair(psd, "clip"), psd, atol=1e-8)
    np.testing.assert_allclose(psd_repair(psd, "abs"), psd, atol=1e-8)
    with pytest.raises(FedmergeError, match=r"valid: \['clip', 'abs'\]"):
        psd_repair(noisy, "nearest")
    family = TextLAEFamily(lam=10.0)
    theta0 = family.initial_weights(features.shape[1])
    fits = {r: train_text_lae_user_level(family, theta0, domain, features, noise_multiplier=3.0, bound=1.0,
                                         noise_seed=1, repair=r)[0]["W"] for r in ("clip", "abs")}
    assert not torch.allclose(fits["clip"], fits["abs"])
    mapping = {"model": {"family": "text-lae", "params": {"lam": 10.0}},
               "privacy": {"enabled": True, "unit": "user", "noise_multiplier": 3.0, "noise_seed": 1}}
    assert Scenario.from_mapping(mapping).privacy.gram_repair == "clip"
    cfg = Scenario.from_mapping({**mapping, "privacy": {**mapping["privacy"], "gram_repair": "abs"}})
    shipped, _ = private_train(family, theta0, domain, features, cfg, seed=0, round_index=0, noise_seed=1)
    torch.testing.assert_close(shipped["W"], fits["abs"])
    with pytest.raises(FedmergeError, match="privacy.gram_repair must be one of"):
        Scenario.from_mapping({**mapping, "privacy": {**mapping["privacy"], "gram_repair": "nearest"}})
