"""Membership-inference attacks (loss, offline LiRA, gradient alignment) and their AUC / TPR-at-low-FPR scores."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from torch import nn

from fedmerge.models.base import pad_sequences
from fedmerge.privacy.attacks import (
    attack_metrics,
    gradient_alignment_scores,
    lira_online_scores,
    lira_scores,
    online_shadow_models,
    reference_model_users,
    reference_models,
    run_attacks,
    tpr_at_fpr,
)
from fedmerge.privacy.membership import split_members, union_users
from tests.test_privacy import TinyFamily, TransitionModule, features, tiny_domain  # noqa: F401  (fixtures)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def brute_force_tpr(members, nonmembers, fpr):
    thresholds = np.concatenate([members, nonmembers, [-np.inf, np.inf]])
    best = 0.0
    for t in thresholds:
        if (nonmembers > t).mean() <= fpr + 1e-12:
            best = max(best, (members > t).mean())
    return best


@pytest.mark.parametrize("seed", range(10))
def test_tpr_at_fpr_is_the_best_threshold_meeting_the_fpr(seed):
    rng = np.random.default_rng(seed)
    members = rng.integers(0, 30, 50).astype(float) + rng.integers(0, 5)  # ties and shifts
    nonmembers = rng.integers(0, 30, int(rng.integers(20, 300))).astype(float)
    for fpr in (0.0, 0.001, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(members, nonmembers, fpr) == pytest.approx(brute_force_tpr(members, nonmembers, fpr))


def test_attack_metrics_refuse_non_finite_scores():
    from fedmerge.errors import NumericalError

    with pytest.raises(NumericalError, match="2 of 6 attack scores are NaN or infinite"):
        attack_metrics(np.array([1.0, np.nan, 2.0]), np.array([0.0, np.inf, 0.5]))


def test_attack_metrics_on_separable_and_identical_scores():
    perfect = attack_metrics(np.arange(100, 200), np.arange(100))
    assert perfect["auc"] == 1.0 and perfect["tpr@0.001"] == 1.0 and perfect["tpr@0.01"] == 1.0
    same = attack_metrics(np.zeros(50), np.zeros(60))
    assert same["auc"] == 0.5 and same["tpr@0.01"] == 0.0 and (same["n_members"], same["n_nonmembers"]) == (50, 60)
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(np.ones(3), np.ones(3), 1.0)


def test_lira_calibrates_per_user():
    """Easy users score high under every model: calibration removes that, a raw threshold does not."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 3, 400)  # per-user offset shared by all models
    member = np.arange(400) < 200
    reference = difficulty + rng.normal(0, 0.3, (8, 400))
    target = difficulty + rng.normal(0, 0.3, 400) + 1.0 * member
    calibrated = lira_scores(target, reference)
    assert attack_metrics(calibrated[member], calibrated[~member])["auc"] > 0.95
    assert attack_metrics(target[member], target[~member])["auc"] < 0.7
    per_user = lira_scores(target, reference, global_variance=False)
    assert attack_metrics(per_user[member], per_user[~member])["auc"] > 0.9
    with pytest.raises(ValueError, match="reference"):
        lira_scores(target, reference[:, :10])
    # identical reference models (a deterministic fit on the same users): no spread to estimate, the score is φ − μ
    same = np.tile(difficulty, (3, 1))
    assert np.allclose(lira_scores(target, same), target - difficulty)


def test_online_lira_is_the_gaussian_likelihood_ratio_and_finds_members_either_way():
    """The score is log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²); where training makes members' φ *lower*, offline
    LiRA (and a loss threshold) rank members last while the online ratio still finds them."""
    rng = np.random.default_rng(0)
    n, k = 400, 8
    difficulty = rng.normal(0, 3, n)
    member = np.arange(n) < n // 2
    inside = np.zeros((k, n), dtype=bool)
    for j in range(n):
        inside[rng.permutation(k)[: k // 2], j] = True
    shift = -1.0  # being trained on lowers a user's confidence
    statistics = difficulty + shift * inside + rng.normal(0, 0.3, (k, n))
    target = difficulty + shift * member + rng.normal(0, 0.3, n)
    online = lira_online_scores(target, statistics, inside)
    assert attack_metrics(online[member], online[~member])["auc"] > 0.95
    offline = lira_scores(target, difficulty + rng.normal(0, 0.3, (k, n)))  # OUT models of other users
    assert attack_metrics(offline[member], offline[~member])["auc"] < 0.05
    # the formula, on one candidate by hand
    mu_in, mu_out = statistics[inside[:, 0], 0].mean(), statistics[~inside[:, 0], 0].mean()
    sd_in = np.sqrt(np.mean([(statistics[i, j] - statistics[inside[:, j], j].mean()) ** 2
                             for j in range(n) for i in range(k) if inside[i, j]]))
    sd_out = np.sqrt(np.mean([(statistics[i, j] - statistics[~inside[:, j], j].mean()) ** 2
                              for j in range(n) for i in range(k) if not inside[i, j]]))
    expected = (-0.5 * ((target[0] - mu_in) / sd_in) ** 2 - np.log(sd_in)) \
        - (-0.5 * ((target[0] - mu_out) / sd_out) ** 2 - np.log(sd_out))
    assert online[0] == pytest.approx(expected)
    lonely = inside.copy()
    lonely[:, 3] = False
    lonely[0, 3] = True  # one IN model: no spread to estimate
    with pytest.raises(ValueError, match="two IN and two OUT"):
        lira_online_scores(target, statistics, lonely)
    with pytest.raises(ValueError, match="IN mask"):
        lira_online_scores(target, statistics, inside[:, :10])


@pytest.fixture(scope="module")
def population(tiny_domain):
    """Members (100) the target trains on, non-members (100) and the attacker's reference users (200)."""
    members, rest = split_members(tiny_domain, 0.25, seed=0)
    nonmembers, reference = split_members(rest, 1 / 3, seed=1)
    return members, nonmembers, reference


def online_shadows(family, theta0, features, members, nonmembers, reference, seed=0):
    """8 online-LiRA shadow models of the target's size (100 users) over the candidates (members, non-members)."""
    candidates = union_users([members, nonmembers], "candidates")
    return online_shadow_models(lambda d, s: family.train(theta0, d, features, seed=s)[0], candidates, reference, 8,
                                members.n_users, seed=seed)


def test_attacks_find_members_of_an_overfitted_model(population, features):
    family = TinyFamily()
    members, nonmembers, reference = population
    assert min(map(len, members.train + nonmembers.train)) >= 2  # every candidate scorable: the IN mask lines up
    theta0 = family.initial_weights(30, seed=0)
    shipped, _ = family.train(theta0, members, features)
    refs = reference_models(lambda d, s: family.train(theta0, d, features, seed=s)[0], reference, 4, 100)
    shadows, inside = online_shadows(family, theta0, features, members, nonmembers, reference)
    results = run_attacks(family, theta0, shipped, features, members.train, nonmembers.train, refs, positions="all",
                          shadows=shadows, inside=inside)
    assert set(results) == {"loss", "lira", "gradient_alignment", "lira_online"}
    for name, metrics in results.items():
        assert metrics["auc"] > 0.8, (name, metrics)
    assert results["lira"]["tpr@0.01"] > 0.05


def test_attacks_are_at_chance_on_a_model_that_never_saw_the_candidates(population, features):
    family = TinyFamily()
    members, nonmembers, reference = population
    theta0 = family.initial_weights(30, seed=0)
    outsiders, _ = split_members(reference, 0.5, seed=7)  # trained on users that are no candidate
    shipped, _ = family.train(theta0, outsiders, features)
    refs = reference_models(lambda d, s: family.train(theta0, d, features, seed=s)[0], reference, 4, 100, seed=10)
    shadows, inside = online_shadows(family, theta0, features, members, nonmembers, reference, seed=10)
    results = run_attacks(family, theta0, shipped, features, members.train, nonmembers.train, refs, positions="all",
                          shadows=shadows, inside=inside)
    assert "lira_online" in results
    for name, metrics in results.items():  # null AUC std ≈ √(201/(12·100²)) ≈ 0.04
        assert abs(metrics["auc"] - 0.5) < 0.13, (name, metrics)
    untrained = gradient_alignment_scores(family, theta0, theta0, features, members.train[:5])
    assert np.array_equal(untrained, np.zeros(5))


def test_reference_models_train_on_the_target_size_or_the_whole_pool(population):
    """Each reference model trains on as many users as the target, or on every reference user when they are fewer;
    the subsets are seeded and drawn from the reference users only."""
    members, _, reference = population
    assert reference_model_users(members.n_users, reference.n_users) == 100  # 100 members, 200 reference users
    assert reference_model_users(300, reference.n_users) == 200
    seen = []
    reference_models(lambda d, s: seen.append((s, sorted(map(tuple, d.train)))) or {}, reference, 3, 100, seed=5)
    pool = sorted(map(tuple, reference.train))
    assert [s for s, _ in seen] == [5, 6, 7] and all(len(users) == 100 for _, users in seen)
    assert all(set(users) <= set(pool) for _, users in seen) and seen[0][1] != seen[1][1]
    whole = []
    reference_models(lambda d, s: whole.append(sorted(map(tuple, d.train))) or {}, reference, 2, 200)
    assert whole == [pool, pool]
    with pytest.raises(ValueError, match="users_per_model"):
        reference_models(lambda d, s: {}, reference, 1, 201)


def test_online_shadow_models_put_each_candidate_in_half_of_them_at_the_target_size(population, caplog):
    """Each candidate is IN exactly K/2 shadow models; each model trains on its IN candidates plus reference users
    up to the target's size (all of the pool when short), on seeds seed + k; an odd K is refused."""
    members, nonmembers, reference = population
    candidates = union_users([members, nonmembers], "candidates")
    seen = []
    _, inside = online_shadow_models(lambda d, s: seen.append((s, list(map(tuple, d.train)))) or {}, candidates,
                                     reference, 6, 150, seed=3)
    assert inside.shape == (6, 200) and (inside.sum(axis=0) == 3).all()
    pool = Counter(map(tuple, reference.train))
    for k, (s, users) in enumerate(seen):
        assert s == 3 + k and len(users) == 150
        ins = [tuple(candidates.train[j]) for j in np.flatnonzero(inside[k])]
        assert users[: len(ins)] == ins and not Counter(users[len(ins):]) - pool  # fill: distinct pool users
    short = []
    with caplog.at_level("WARNING"):  # a pool too small to fill them was silent, and the report said "target's size"
        _, quarters = online_shadow_models(lambda d, s: short.append(d.n_users) or {}, candidates, reference, 4, 1000)
    assert short == [n + 200 for n in quarters.sum(axis=1)]  # its IN candidates, then the whole pool of 200
    assert (f"fills the shadow models to {min(short)}-{max(short)} users only, fewer than the target's 1000"
            in caplog.text)
    for odd_or_few in (2, 3):
        with pytest.raises(ValueError, match="even number of shadow models >= 4"):
            online_shadow_models(lambda d, s: {}, candidates, reference, odd_or_few, 100)
    with pytest.raises(ValueError, match="pass only sequences"):
        run_attacks(TinyFamily(), {}, {}, None, [np.array([1])], [np.array([1, 2])], shadows=[{}], inside=inside)


class FrozenTailModule(TransitionModule):
    """The transition table W, then a second table V that a recipe may freeze."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.V = nn.Parameter(torch.randn(dim, dim))

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        return super().forward(seqs, item_features) + super().forward(seqs, item_features @ self.V)


class FrozenTailFamily(TinyFamily):
    def build(self, dim: int) -> nn.Module:
        return FrozenTailModule(dim)


def test_gradient_alignment_runs_over_the_weights_training_moved(tiny_domain, features):
    """With V frozen (τ_V = 0), the score is cos(−∇_W L_u, τ_W): V's gradient would only add to the norm."""
    family = FrozenTailFamily()
    torch.manual_seed(0)
    theta0 = {k: v.detach().clone() for k, v in FrozenTailModule(30).state_dict().items()}
    shipped = {**theta0, "W": theta0["W"] + 0.1 * torch.randn(30, 30)}
    seqs = tiny_domain.train[:6]
    scores = gradient_alignment_scores(family, theta0, shipped, features, seqs)
    module = family.load(theta0, 30)
    tau = (shipped["W"] - theta0["W"]).double().flatten()
    for row, seq in enumerate(seqs):
        prefixes = [seq[:t] for t in range(1, len(seq))]
        targets = torch.as_tensor([int(seq[t]) for t in range(1, len(seq))])
        loss = nn.functional.cross_entropy(module(pad_sequences(prefixes, family.max_len), features), targets)
        (grad_w,) = torch.autograd.grad(loss, [module.W])
        expected = float(torch.nn.functional.cosine_similarity(-grad_w.double().flatten(), tau, dim=0))
        assert scores[row] == pytest.approx(expected, rel=1e-6, abs=1e-9)
