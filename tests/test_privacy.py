"""Client-side DP (clipping, noise scale, accounting, composition) and the membership-inference probe."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences
from fedmerge.models.base import PAD, ModelFamily, StateDict, pad_sequences
from fedmerge.privacy import (
    classic_noise_multiplier,
    clip_update,
    epsilon_for,
    gaussian_delta,
    membership_auc,
    noise_multiplier_for,
    privatize_update,
    rank_auc,
    sequence_losses,
    split_members,
)
from fedmerge.validation import task_vector_norm


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def random_weights(seed: int, scale: float = 1.0) -> StateDict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": scale * torch.randn(5, 3, generator=gen),
        "a.bias": scale * torch.randn(5, generator=gen),
        "b": scale * torch.randn(2, 2, 2, generator=gen),
    }


# ---------------------------------------------------------------- clipping


def test_task_vector_norm_is_global_l2():
    theta0, weights = random_weights(0), random_weights(1)
    flat = torch.cat([(weights[k].double() - theta0[k].double()).flatten() for k in theta0])
    assert task_vector_norm(theta0, weights) == pytest.approx(float(flat.norm()), rel=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_clipped_norm_never_exceeds_c(seed):
    rng = np.random.default_rng(seed)
    scale, clip = float(10 ** rng.uniform(-3, 2)), float(10 ** rng.uniform(-2, 1))
    theta0, weights = random_weights(1000 + seed), random_weights(seed, scale)
    clipped, original = clip_update(theta0, weights, clip)
    new_norm = task_vector_norm(theta0, clipped)
    assert original == pytest.approx(task_vector_norm(theta0, weights))
    assert new_norm <= clip * (1 + 1e-6)
    assert new_norm == pytest.approx(min(original, clip), rel=1e-5)
    # direction is kept: clipped τ is a non-negative multiple of τ
    tau = torch.cat([(weights[k] - theta0[k]).flatten() for k in theta0]).double()
    tau_c = torch.cat([(clipped[k] - theta0[k]).flatten() for k in theta0]).double()
    assert float(torch.nn.functional.cosine_similarity(tau, tau_c, dim=0)) == pytest.approx(1.0, abs=1e-5)


def test_clip_leaves_small_update_unchanged_and_keeps_dtype():
    theta0 = random_weights(0)
    weights = {k: v + 1e-3 for k, v in theta0.items()}
    clipped, _ = clip_update(theta0, weights, clip_norm=10.0)
    for k in theta0:
        assert clipped[k].dtype == weights[k].dtype
        torch.testing.assert_close(clipped[k], weights[k])


def test_bad_inputs_are_named():
    theta0, weights = random_weights(0), random_weights(1)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(theta0, weights, 0.0)
    with pytest.raises(ValueError, match="missing"):
        clip_update(theta0, {k: v for k, v in weights.items() if k != "b"}, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privatize_update(theta0, weights, 1.0, -1.0, seed=0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_for(1.0, delta=0.0)
    with pytest.raises(ValueError, match="rounds"):
        epsilon_for(1.0, 1e-5, rounds=0)
    with pytest.raises(ValueError, match="epsilon"):
        noise_multiplier_for(-1.0, 1e-5)
    for bad in (float("nan"), float("inf")):
        poisoned = {k: v.clone() for k, v in weights.items()}
        next(iter(poisoned.values())).view(-1)[0] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            clip_update(theta0, poisoned, 1.0)


# ---------------------------------------------------------------- noise


def test_noise_std_matches_sigma_c_and_is_seeded():
    theta0 = {"w": torch.zeros(200, 200)}
    weights = {"w": torch.full((200, 200), 0.01)}  # ‖τ‖ = 2 > C: clipped to C
    clip, z = 0.5, 1.7
    clipped, _ = clip_update(theta0, weights, clip)
    noisy = privatize_update(theta0, weights, clip, z, seed=3)
    noise = (noisy["w"] - clipped["w"]).double()
    n = noise.numel()
    # sample std of n Gaussians has relative standard error ≈ 1/√(2n) ≈ 0.0035; allow 5 of those
    assert float(noise.std()) == pytest.approx(z * clip, rel=5 / math.sqrt(2 * n))
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(n)
    torch.testing.assert_close(privatize_update(theta0, weights, clip, z, seed=3)["w"], noisy["w"])
    assert not torch.equal(privatize_update(theta0, weights, clip, z, seed=4)["w"], noisy["w"])
    fresh = [privatize_update(theta0, weights, clip, z, seed=None)["w"] for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1])
    assert float((fresh[0] - clipped["w"]).std()) == pytest.approx(z * clip, rel=5 / math.sqrt(2 * n))


def test_zero_noise_is_just_clipping():
    theta0, weights = random_weights(0), random_weights(1)
    clipped, _ = clip_update(theta0, weights, 0.3)
    noisy = privatize_update(theta0, weights, 0.3, 0.0, seed=0)
    for k in theta0:
        torch.testing.assert_close(noisy[k], clipped[k])


# ---------------------------------------------------------------- accounting


def brute_delta(epsilon: float, z: float) -> float:
    """δ(ε) = sup_S P[M(D)∈S] − e^ε P[M(D')∈S], by numerical integration of (p − e^ε q)_+ for N(1,z²) vs N(0,z²)."""
    x = np.linspace(-12 * z - 1, 12 * z + 2, 200_001)  # beyond 12 std both densities are < 1e-30
    p, q = norm.pdf(x, loc=1.0, scale=z), norm.pdf(x, loc=0.0, scale=z)
    return float(np.trapezoid(np.clip(p - math.exp(epsilon) * q, 0, None), x))


@pytest.mark.parametrize("epsilon,z", [(0.5, 2.0), (1.0, 1.0), (3.0, 0.7), (0.2, 5.0)])
def test_analytic_delta_matches_privacy_loss_integral(epsilon, z):
    assert gaussian_delta(epsilon, z) == pytest.approx(brute_delta(epsilon, z), rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("epsilon", [8.0, 4.0, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_noise_for_epsilon_meets_delta_exactly(epsilon, delta):
    z = noise_multiplier_for(epsilon, delta)
    assert gaussian_delta(epsilon, z) == pytest.approx(delta, rel=1e-6)
    assert gaussian_delta(epsilon, z * 0.99) > delta  # it is the smallest such noise
    assert epsilon_for(z, delta) == pytest.approx(epsilon, rel=1e-6)


@pytest.mark.parametrize("epsilon", [0.9, 0.5, 0.1])
def test_classic_bound_is_an_upper_bound_for_small_epsilon(epsilon):
    delta = 1e-5
    classic = classic_noise_multiplier(epsilon, delta)
    assert classic == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / epsilon)
    analytic = noise_multiplier_for(epsilon, delta)
    assert analytic < classic
    assert gaussian_delta(epsilon, classic) <= delta  # the classic calibration is valid, just loose


def test_composition_over_rounds():
    delta, z = 1e-5, 2.0
    # R rounds at z equal one release at z/√R
    for rounds in (1, 4, 25):
        assert epsilon_for(z, delta, rounds=rounds) == pytest.approx(epsilon_for(z / math.sqrt(rounds), delta))
    # more rounds cost more; calibrating for R rounds needs √R times the one-round noise
    eps = [epsilon_for(z, delta, rounds=r) for r in (1, 2, 8)]
    assert eps[0] < eps[1] < eps[2]
    assert noise_multiplier_for(2.0, delta, rounds=9) == pytest.approx(3 * noise_multiplier_for(2.0, delta), rel=1e-8)
    # μ-GDP: composition of R mechanisms with μ = 1/z is √R/z-GDP; check with GDP's own δ(ε) formula
    mu = math.sqrt(10) / z
    eps10 = epsilon_for(z, delta, rounds=10)
    gdp_delta = norm.cdf(-eps10 / mu + mu / 2) - math.exp(eps10) * norm.cdf(-eps10 / mu - mu / 2)
    assert gdp_delta == pytest.approx(delta, rel=1e-6)


def test_replace_neighbouring_doubles_sensitivity():
    assert epsilon_for(2.0, 1e-5, neighbouring="replace") == pytest.approx(epsilon_for(1.0, 1e-5))
    assert noise_multiplier_for(4.0, 1e-5, neighbouring="replace") == pytest.approx(2 * noise_multiplier_for(4.0, 1e-5))


def test_extremes():
    assert epsilon_for(0.0, 1e-5) == math.inf
    assert noise_multiplier_for(math.inf, 1e-5) == 0.0
    assert epsilon_for(1e4, 0.5) == 0.0  # huge noise: δ(0) is already below 0.5


# ---------------------------------------------------------------- membership probe


def test_rank_auc_equals_pairwise_definition():
    rng = np.random.default_rng(0)
    members = rng.integers(0, 10, 40).astype(float)  # many ties
    nonmembers = rng.integers(0, 10, 30).astype(float) - 1
    diff = members[:, None] - nonmembers[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert rank_auc(members, nonmembers) == pytest.approx(expected)
    assert rank_auc([2.0, 3.0], [0.0, 1.0]) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        rank_auc([], [1.0])


class TransitionModule(nn.Module):
    """score(s, i) = mean_{j∈s} f_j · W · f_i over item features f (one-hot features make W an item-item table)."""

    def __init__(self, dim: int):
        super().__init__()
        self.W = nn.Parameter(0.01 * torch.randn(dim, dim))

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        mask = (seqs != PAD).float()
        feats = item_features[seqs.clamp(min=0)] * mask[..., None]
        user = feats.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return user @ self.W @ item_features.T


class TinyFamily(ModelFamily):
    """A test-only mergeable family that memorizes transitions when trained long without regularization."""

    name = "tiny"
    max_len = 5

    def __init__(self, epochs: int = 300, lr: float = 0.1):
        self.epochs, self.lr = epochs, lr

    def item_features(self, embeddings: np.ndarray, statistics_rows: int | None = None) -> torch.Tensor:
        return torch.as_tensor(embeddings, dtype=torch.float32)

    def build(self, dim: int) -> nn.Module:
        return TransitionModule(dim)

    def train(self, theta0, domain, item_features, *, seed=0, progress=False) -> tuple[StateDict, dict[str, Any]]:
        torch.manual_seed(seed)
        module = self.build(item_features.shape[1])
        module.load_state_dict(theta0)
        prefixes = [s[:t] for s in domain.train for t in range(1, len(s))]
        targets = torch.tensor([int(s[t]) for s in domain.train for t in range(1, len(s))])
        batch = pad_sequences(prefixes, self.max_len)
        opt = torch.optim.Adam(module.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(module(batch, item_features), targets)
            loss.backward()
            opt.step()
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, {"loss": float(loss.detach())}


@pytest.fixture(scope="module")
def tiny_domain() -> Domain:
    """400 users of random 4-item sequences over 30 items: nothing to learn but memorization."""
    rng = np.random.default_rng(7)
    n_users, n_items = 400, 30
    catalog = ItemCatalog(ids=tuple(f"i{i}" for i in range(n_items)), fields=tuple({"title": f"item {i}"} for i in range(n_items)))
    seqs = as_sequences(rng.integers(0, n_items, (n_users, 4)).tolist())
    targets = rng.integers(0, n_items, (2, n_users))
    return Domain("tiny", catalog, seqs, targets[0], targets[1])


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.eye(30)


def test_split_members_partitions_users(tiny_domain):
    members, nonmembers = split_members(tiny_domain, 0.25, seed=1)
    assert (members.n_users, nonmembers.n_users) == (100, 300)
    assert members.name == "tiny" and nonmembers.name == "tiny-heldout"
    all_seqs = sorted(tuple(s) for s in members.train + nonmembers.train)
    assert all_seqs == sorted(tuple(s) for s in tiny_domain.train)
    assert split_members(tiny_domain, 0.25, seed=1)[0].train == members.train  # seeded
    with pytest.raises(ValueError, match="member_fraction"):
        split_members(tiny_domain, 1.0)
    # the split every stored study used: the first round(f·n) users of the seed's permutation, in domain order
    first = np.sort(np.random.default_rng(1).permutation(tiny_domain.n_users)[:100])
    assert members.train == tuple(tiny_domain.train[u] for u in first)


def test_sequence_losses_match_direct_cross_entropy(tiny_domain, features):
    family = TinyFamily()
    weights = {"W": torch.randn(30, 30, generator=torch.Generator().manual_seed(1))}
    seqs = list(tiny_domain.train[:5])
    module = family.load(weights, 30)
    with torch.no_grad():
        last = nn.functional.cross_entropy(
            module(pad_sequences([s[:-1] for s in seqs], 5), features),
            torch.tensor([int(s[-1]) for s in seqs]),
            reduction="none",
        )
        per_position = [
            np.mean([float(nn.functional.cross_entropy(module(pad_sequences([s[:t]], 5), features)[0], torch.tensor(int(s[t]))))
                     for t in range(1, len(s))])
            for s in seqs
        ]
    np.testing.assert_allclose(sequence_losses(family, weights, features, seqs), last.numpy(), rtol=1e-5)
    np.testing.assert_allclose(sequence_losses(family, weights, features, seqs, positions="all"), per_position, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        sequence_losses(family, weights, features, [np.array([3])])


def test_probe_is_chance_against_models_that_never_saw_the_users(tiny_domain, features):
    family = TinyFamily()
    members, nonmembers = split_members(tiny_domain, 0.5, seed=0)
    theta0 = family.initial_weights(30, seed=0)
    auc_theta0 = membership_auc(family, theta0, features, members.train, nonmembers.train, positions="all")
    # a model overfitted on a third, disjoint set of users: neither group is its member
    outsiders, _ = split_members(members, 0.5, seed=1)
    probe_members, _ = split_members(nonmembers, 0.5, seed=1)
    rest = [s for s in members.train if not any(np.array_equal(s, o) for o in outsiders.train)]
    disjoint, _ = family.train(theta0, outsiders, features)
    auc_disjoint = membership_auc(family, disjoint, features, rest, probe_members.train, positions="all")
    # AUC std under the null ≈ √((n_m+n_n+1)/(12 n_m n_n)) ≈ 0.03 for 200 vs 200 and ≈ 0.04 for 100 vs 100
    assert abs(auc_theta0 - 0.5) < 0.1
    assert abs(auc_disjoint - 0.5) < 0.12


def test_probe_detects_overfitting_and_dp_noise_hides_it(tiny_domain, features):
    family = TinyFamily()
    members, nonmembers = split_members(tiny_domain, 0.25, seed=0)
    theta0 = family.initial_weights(30, seed=0)
    overfit, _ = family.train(theta0, members, features)
    auc = membership_auc(family, overfit, features, members.train, nonmembers.train)
    assert auc > 0.75
    # heavy noise relative to the update destroys the signal the probe uses
    norm_tau = task_vector_norm(theta0, overfit)
    noisy = privatize_update(theta0, overfit, clip_norm=norm_tau, noise_multiplier=noise_multiplier_for(0.1, 1e-5), seed=0)
    assert abs(membership_auc(family, noisy, features, members.train, nonmembers.train) - 0.5) < 0.12


def test_mergerec_coefficient_cap_bounds_the_learned_coefficients(tiny_domain, features):
    """Two clients with the same task vector: MergeRec grows λ towards Σλ ≈ 1 (above the cap); with the cap, λ ≤ cap."""
    from fedmerge.merging.mergerec import MergeRecConfig, mergerec

    family = TinyFamily(epochs=60)
    theta0 = family.initial_weights(30, seed=0)
    members, _ = split_members(tiny_domain, 0.5, seed=0)
    trained = family.train(theta0, members, features)[0]
    models = {"d0": trained, "d1": {k: v.clone() for k, v in trained.items()}}
    feats = {d: features for d in models}
    base = dict(init_method="task_arithmetic", init_coefficient=0.3, lr=0.05, steps=40, progress=False,
                item_side="full")  # the toy module has no item/sequence split
    _, free = mergerec(family, theta0, models, feats, MergeRecConfig(**base))
    cap = 0.35
    merged, capped = mergerec(family, theta0, models, feats, MergeRecConfig(**base, max_coefficient=cap))
    free_values = [v for per in free.coefficients.values() for v in per.values()]
    capped_values = [v for per in capped.coefficients.values() for v in per.values()]
    assert max(free_values) > cap
    assert max(capped_values) <= cap + 1e-7
    # the merged weights are θ₀ + Σ_k λ_k τ_k with the capped λ
    expected = theta0["W"] + sum(capped.coefficients[d]["all"] * (models[d]["W"] - theta0["W"]) for d in models)
    torch.testing.assert_close(merged["W"], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_coefficient"):
        MergeRecConfig(max_coefficient=0.0)


def test_mergerec_coefficient_cap_bounds_negative_coefficients_too():
    """A loss that pushes λ down: with the cap, λ stops at −cap (a λ of −3 amplifies a noisy task vector as much as
    +3; the cap used to bound λ from above only)."""
    from types import SimpleNamespace

    from fedmerge.merging.mergerec import MergeRecConfig, optimize_coefficients

    objective = SimpleNamespace(refresh_items=lambda c: None, loss=lambda coefficients, *batch: coefficients.sum(),
                                pseudo=SimpleNamespace(draw=lambda *a: ()))
    free, _ = optimize_coefficients(objective, torch.zeros(2), MergeRecConfig(steps=20, lr=0.5, progress=False))
    capped, _ = optimize_coefficients(objective, torch.zeros(2), MergeRecConfig(steps=20, lr=0.5, progress=False,
                                                                                max_coefficient=0.4))
    assert float(free.min()) < -0.4
    assert torch.equal(capped, torch.full((2,), -0.4))


# ---------------------------------------------------------------- the `fedmerge privacy run` command

TINY_STUDY = """
[run]
name = "privacy-test"
progress = false
[data]
source = "synthetic"
[data.synthetic]
n_domains = 2
n_users = 60
n_items = 40
[encoder]
name = "hashing"
[model]
family = "text-lae"
[model.params]
lam = 100.0
[merge]
methods = ["average", "ties", "mergerec_taskwise"]
[merge.mergerec]
steps = 5
max_coefficient = 1.0
[baselines]
joint = false
fedavg_rounds = 0
[privacy]
clip_norm = 0.05
noise_seed = 0  # reproducible noise: the test's figures must not depend on OS entropy
[privacy_study]
epsilons = [inf, 2.0]
probe_max_users = 20
"""


@pytest.fixture
def tiny_scenario(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-privacy.toml"
    path.write_text(TINY_STUDY)
    return path


def test_load_study_routes_study_keys_and_names_bad_ones(tiny_scenario):
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import dp_config, load_study

    cfg, study = load_study(str(tiny_scenario), ["privacy_study.delta=1e-6", "baselines.fedavg_rounds=3"])
    assert study.delta == 1e-6 and study.epsilons == (math.inf, 2.0)
    with pytest.raises(AttributeError):  # typed and frozen
        study.delta = 0.5  # type: ignore[misc]
    dp_cfg, z = dp_config(cfg, "domain", 2.0, 1e-6, seed=4)
    assert dp_cfg.privacy.enabled and z == pytest.approx(noise_multiplier_for(2.0, 1e-6, rounds=4))
    assert dp_cfg.run.seed == 4 and dp_cfg.privacy.target_epsilon == 2.0
    off_cfg, z_off = dp_config(cfg, "domain", math.inf, 1e-6, seed=0)
    assert not off_cfg.privacy.enabled and z_off == 0.0
    with pytest.raises(FedmergeError, match="privacy_study.epsilonz"):
        load_study(str(tiny_scenario), ["privacy_study.epsilonz=[1]"])
    with pytest.raises(FedmergeError, match="methods"):
        load_study(str(tiny_scenario), ["privacy_study.methods=['dare']"])
    _, both = load_study(str(tiny_scenario), ["privacy_study.units=['domain', 'user']"])  # text-lae, one λ
    assert both.units == ("domain", "user")
    with pytest.raises(FedmergeError, match="one λ"):
        load_study(str(tiny_scenario), ["privacy_study.units=['user']", "model.params.lam=[1.0, 10.0]"])
    with pytest.raises(FedmergeError, match="seeds"):
        load_study(str(tiny_scenario), ["privacy_study.seeds=[1, 1]"])
    # a negative study seed moved the noise seed below 0, i.e. to OS entropy; True was seed 1; a misspelled metric
    # gave a table of nulls after every cell had trained
    for seeds in ("[-1]", "[true]", "[0, 1.5]", "[0, 9223372036854775808]"):  # the last: too large for torch
        with pytest.raises(FedmergeError, match=r"privacy_study.seeds must be a non-empty list of distinct integers >= 0"):
            load_study(str(tiny_scenario), [f"privacy_study.seeds={seeds}"])
    with pytest.raises(FedmergeError, match=r"privacy_study.metric 'recal@10' is not a metric of eval.ks .*; valid: \["):
        load_study(str(tiny_scenario), ['privacy_study.metric="recal@10"'])
    assert load_study(str(tiny_scenario), ['privacy_study.metric="ndcg@10_masked"'])[1].metric == "ndcg@10_masked"
    with pytest.raises(FedmergeError, match=r"run.seeds does not apply to a privacy study: set privacy_study.seeds"):
        load_study(str(tiny_scenario), ["run.seeds=[0, 1]"])
    # a repeated ε or unit, or two ε of one label, passed and stopped the study at the second cell (after hours);
    # an ε no noise reaches passed and failed mid-study with the accountant's bare "privacy budget is too low"
    with pytest.raises(FedmergeError, match=r"privacy_study.epsilons \[2.0, 2.0\] name one cell \(ε = 2, "):
        load_study(str(tiny_scenario), ["privacy_study.epsilons=[inf, 2.0, 2.0]"])
    with pytest.raises(FedmergeError, match=r"privacy_study.epsilons \[1.0, 1.0000001\] name one cell"):
        load_study(str(tiny_scenario), ["privacy_study.epsilons=[1.0, 1.0000001]"])
    with pytest.raises(FedmergeError, match=r"privacy_study.units lists \['domain'\] more than once"):
        load_study(str(tiny_scenario), ["privacy_study.units=['domain', 'domain']"])


@pytest.mark.parametrize("name", ["privacy", "privacy-seq", "privacy-seq-adapter"])
def test_shipped_privacy_scenarios_run_both_units_and_keep_the_larger_honest_domain(name):
    """The Amazon study of Pantry + Toys: both units load (text-lae with its one λ), and the norm screen keeps Toys'
    honest FedAvg update (norm 6.1, 5x Pantry's), which it used to reject with two clients, stopping the run."""
    from fedmerge.privacy.study import load_study
    from fedmerge.validation import screen_norms

    cfg, study = load_study(name)
    assert study.units == ("domain", "user") and study.seeds == (0, 1, 2)
    federation = cfg.federation
    measured = {"Pantry": 1.2, "Toys": 6.101}  # text-lae, FedAvg round 2, no DP (Amazon, seed 0)
    assert not screen_norms(measured, federation.norm_multiple, federation.norm_cap, federation.norm_action).rejected


def test_privacy_seq_adapter_is_the_recipe_the_stored_sequential_studies_ran():
    """`privacy-seq-adapter` reproduces the sequential study of `results/privacy/studies.md`: its scenario is the one recorded in the
    stored user-level (3-release schedule) and domain-level studies, only its name differs (and, for the domain
    study, recorded before it existed, `privacy.fedavg_epochs`, which only DP-SGD reads)."""
    from fedmerge.config import settings_differences
    from fedmerge.privacy.study import load_study

    cfg, study = load_study("privacy-seq-adapter")
    ours = cfg.to_mapping()
    stored_root = Path(__file__).resolve().parents[1] / "results" / "privacy"

    def differences(folder: str) -> list[str]:
        """Keys whose values differ; a setting fedmerge gained after the study ran counts as its default."""
        record = json.loads((stored_root / folder / "privacy.json").read_text())
        assert record["study"]["seeds"] == list(study.seeds) and record["study"]["delta"] == study.delta
        return settings_differences(record["scenario"], ours)[1]

    assert differences("amazon-seq-adapter-dp10/fedavg-eps8") == ["run.name"]
    assert differences("amazon-seq-adapter-domain/fedavg") == ["privacy.fedavg_epochs", "run.name"]


def test_each_study_seed_draws_other_dp_noise(tiny_scenario):
    """A seeded study used one noise draw for every seed (Amazon text-lae: identical utility over seeds 0-2)."""
    from fedmerge.privacy.study import dp_config, load_study

    cfg, _ = load_study(str(tiny_scenario), ["privacy.noise_seed=5"])
    seeds = [dp_config(cfg, "domain", 2.0, 1e-5, seed=s)[0].privacy.noise_seed for s in (0, 1, 2)]
    assert seeds[0] == 5 and len(set(seeds)) == 3
    entropy, _ = load_study(str(tiny_scenario), ["privacy.noise_seed=-1"])
    assert dp_config(entropy, "user", 2.0, 1e-5, seed=3)[0].privacy.noise_seed == -1


def test_over_seeds_is_a_t_interval_of_the_seeds_that_report_a_value():
    from scipy.stats import t

    from fedmerge.privacy.study import over_seeds

    values = [0.1, 0.2, 0.4]
    out = over_seeds([*values, None])
    half = t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert out["n"] == 3 and out["values"] == values
    assert out["mean"] == pytest.approx(0.7 / 3) and out["high"] - out["mean"] == pytest.approx(half)
    one = over_seeds([0.3])
    assert (one["n"], one["mean"], one["low"], one["values"]) == (1, 0.3, None, [0.3])
    assert over_seeds([None, None])["mean"] is None
    # the table says when a cell's interval covers fewer seeds than the study ran (it read as seeds 0-3)
    from fedmerge.privacy.study import _format_interval

    assert out["missing_seeds"] == 1 and _format_interval(out).endswith("(3 of 4 seeds)")
    assert "seeds" not in _format_interval(over_seeds(values))
    # a ratio's bound that rounds to 1.00 gets a third decimal: [1.004, ...] is not a tie, [0.996, ...] is
    assert _format_interval({"n": 3, "mean": 1.03, "low": 1.004, "high": 1.05}, 2) == "1.03 [1.004, 1.05]"
    assert _format_interval({"n": 3, "mean": 1.0, "low": 0.996, "high": 1.0}, 2) == "1.00 [0.996, 1.00]"
    assert _format_interval({"n": 3, "mean": 1.0, "low": 1.0004, "high": 1.01}, 2) == "1.00 [1.0004, 1.01]"


def test_ratio_tables_pair_each_seed_with_its_own_reference():
    """A cell's models against θ₀ of the same seed and against the no-DP cell's same model and seed: the interval is
    over the per-seed ratios (not a ratio of means); a seed missing on either side gives no ratio."""
    from fedmerge.privacy.study import over_seeds, paired_ratio, ratio_tables

    def row(epsilon, seeds, **models):
        return {"unit": "none" if epsilon == "inf" else "user", "epsilon": epsilon, "seeds": seeds,
                "metric": {m: over_seeds(v) for m, v in models.items()}}

    plain = row("inf", [0, 1, 2], average=[0.2, 0.3, 0.5], theta0=[0.1, 0.2, 0.25])
    noisy = row("8", [0, 1, 2], average=[0.1, 0.3, 0.25], theta0=[0.1, 0.2, 0.25])
    expected = over_seeds([0.2 / 0.1, 0.3 / 0.2, 0.5 / 0.25])
    assert paired_ratio(plain["metric"]["average"], plain["metric"]["theta0"], [0, 1, 2]) == expected
    assert expected["mean"] != pytest.approx(1.0 / 0.55)  # not the ratio of the means
    assert paired_ratio(over_seeds([0.2, None, 0.5]), plain["metric"]["theta0"], [0, 1, 2]) is None
    assert paired_ratio(plain["metric"]["average"], over_seeds([0.1, 0.0, 0.2]), [0, 1, 2]) is None
    table = ratio_tables([plain, noisy], "recall@10")
    def cell(ratios):
        r = over_seeds(ratios)
        return f"{r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"

    assert f"| none | ∞ (no DP) | {cell([2.0, 1.5, 2.0])} |" in table
    assert f"| user | 8 | {cell([1.0, 1.5, 1.0])} |" in table  # × θ₀
    assert f"| user | 8 | {cell([0.5, 1.0, 0.5])} |" in table  # × no DP
    other_seeds = row("8", [3, 4, 5], average=[0.1, 0.3, 0.25], theta0=[0.1, 0.2, 0.25])
    assert ratio_tables([plain, other_seeds], "recall@10").rstrip().endswith("| user | 8 | - |")


def test_privacy_run_end_to_end(tiny_scenario, tmp_path, capsys):
    import json

    from fedmerge.cli import main

    out = tmp_path / "out"
    assert main(["privacy", "run", "--scenario", str(tiny_scenario), "--out", str(out), "--set",
                 "privacy_study.seeds=[0, 1]"]) == 0
    report = json.loads((out / "privacy.json").read_text())
    assert [(row["unit"], row["epsilon"]) for row in report["utility"]] == [("none", "inf"), ("domain", "2")]
    z = noise_multiplier_for(2.0, 1e-5)
    assert report["utility"][1]["noise_multiplier"] == pytest.approx(z)
    assert report["utility"][1]["client_epsilon_max"] == pytest.approx(2.0, rel=1e-6)
    for row in report["utility"]:
        assert set(row["metric"]) >= {"average", "ties", "mergerec_taskwise"}
        # a t-interval over 2 seeds (t = 12.7) may reach past [0, 1]; the mean may not
        assert all(v["n"] == 2 and v["low"] <= v["mean"] <= v["high"] and 0.0 <= v["mean"] <= 1.0
                   for v in row["metric"].values())
    # the noise reached the clients' single DP call site in the ε = 2 runs, and not in the ε = ∞ runs
    for seed in (0, 1):
        noisy_run = json.loads((out / "domain" / "eps-2" / f"seed-{seed}" / "results.json").read_text())
        assert all(m["dp_noise_multiplier"] == pytest.approx(z) for m in noisy_run["train_metrics"].values())
        plain_run = json.loads((out / "none" / "eps-inf" / f"seed-{seed}" / "results.json").read_text())
        assert all("dp_noise_multiplier" not in m for m in plain_run["train_metrics"].values())
    probe = report["probe"]
    assert [(row["unit"], row["epsilon"]) for row in probe["rows"]] == [("none", "inf"), ("domain", "2")]
    for row in probe["rows"]:
        assert set(row["attacks"]) == {"loss", "lira", "gradient_alignment"}
        assert all(0.0 <= v["auc"]["mean"] <= 1.0 and v["auc"]["n"] == 2 for v in row["attacks"].values())
    assert probe["members"] + probe["nonmembers"] + probe["reference"] == 60
    # non-members only as many as probed (20) but at most half of the other 30; the reference models train on the
    # target's size or on the whole pool when it is smaller
    assert probe["nonmembers"] == 15 and probe["reference_model_users"] == min(probe["members"], probe["reference"])
    assert [row["attacked_release_epsilon"] for row in probe["rows"]][0] is None  # no DP, no ε
    assert probe["rows"][1]["attacked_release_epsilon"] == pytest.approx(2.0, rel=1e-6)  # one release: the cell's ε
    assert probe["theta0"]["gradient_alignment"]["auc"]["mean"] == 0.5  # τ = 0: no signal
    table = (out / "privacy.md").read_text()
    assert "| none | ∞ (no DP) |" in table and "| domain | 2 |" in table and "lira AUC" in table
    assert f"reference models of {probe['reference_model_users']} users each" in table
    assert "lira TPR@0.1%" in table and "lira TPR@1%" in table
    # 15 held-out users: no threshold has a false-positive rate in (0, 1/15), so both TPR columns are TPR at 0 false
    # positives; the table said "TPR@0.1%" with no flag (values above what ε allows at 0.1 % FPR looked real)
    assert "15 held-out users" in table and "TPR at 0 false positives" in table
    # per user, domain-level DP is weaker than its ε (one user moves the clipped update by up to 2C); the README and
    # privacy.md said the user gets "the guarantee of its whole domain"
    from fedmerge.privacy.dp import epsilon_for

    per_user = epsilon_for(z, 1e-5, rounds=1, neighbouring="replace")
    assert per_user > 2.0 and f"ε 2: {per_user:.3g} per user" in table
    # settings a reader must know to trust the figures, recorded with them (they ran silently)
    warnings = report["warnings"]
    assert any("seeded" in w and "privacy.noise_seed = 0" in w for w in warnings)
    assert any("15 held-out users" in w and "noisy" in w for w in warnings)
    assert all(w in table for w in warnings)
    assert "per-seed ratio × θ₀" in table and "per-seed ratio × the same model without DP" in table
    assert (out / "privacy.png").stat().st_size > 0
    assert "loss TPR@1%" in capsys.readouterr().out
    assert main(["privacy", "run", "--scenario", str(tiny_scenario), "--out", str(out)]) == 1  # earlier runs kept
    assert f"{out} already holds attack scores of an earlier study" in capsys.readouterr().err


def test_privacy_run_refuses_an_earlier_studys_files_unless_resume_or_overwrite(tiny_scenario, tmp_path, monkeypatch,
                                                                                  capsys):
    """`privacy run` replaced an earlier study's privacy.json without --overwrite (its help says "refused
    otherwise"), while `privacy pool` refused the same folder."""
    import json

    import fedmerge.privacy.study as study_module
    from fedmerge.cli import main

    out = tmp_path / "out"
    out.mkdir()
    earlier = '{"study": "an earlier study of other epsilons"}'
    (out / "privacy.json").write_text(earlier)
    swept = []
    monkeypatch.setattr(study_module, "utility_sweep",
                        lambda cfg, study, out_dir, overwrite=False, resume=False: swept.append((overwrite, resume)) or [])
    command = ["privacy", "run", "--scenario", str(tiny_scenario), "--out", str(out), "--only", "utility"]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert f"{out} already holds privacy.json" in err and "--resume" in err and "--overwrite" in err
    assert swept == [] and (out / "privacy.json").read_text() == earlier
    (out / "privacy.json").unlink()
    (out / "privacy.png").write_bytes(b"an earlier study's figure")
    assert main(command) == 1  # any of the study's three files
    assert f"{out} already holds privacy.png" in capsys.readouterr().err
    assert main([*command, "--resume"]) == 0 and swept == [(False, True)]
    assert main([*command, "--overwrite"]) == 0 and swept[-1] == (True, False)
    assert json.loads((out / "privacy.json").read_text())["utility"] == []
    # pool gives the same refusal, with its own advice
    assert main(["privacy", "pool", str(out / "privacy.json"), "--out", str(out)]) == 1
    assert f"{out} already holds privacy.json, privacy.png" in capsys.readouterr().err


def test_privacy_run_resume_keeps_what_an_interrupted_study_finished(tiny_scenario, tmp_path, monkeypatch, capsys):
    """An interrupted study (a cell's run unfinished, no privacy.json) resumed: only that run trains again, the attack
    scores are read back, and privacy.json is the uninterrupted study's; other attack settings re-run the attacks
    only; --resume with --overwrite is refused."""
    import json

    import fedmerge.runners as runners
    import fedmerge.runners.client as client_module
    from fedmerge.cli import main
    from fedmerge.privacy.study import PrivacyStudySettings, shadow_size

    out = tmp_path / "out"
    command = ["privacy", "run", "--scenario", str(tiny_scenario), "--out", str(out)]
    assert main(command) == 0
    whole = json.loads((out / "privacy.json").read_text())
    assert sorted(p.relative_to(out).as_posix() for p in (out / "attacks").rglob("*.json")) == \
        ["attacks/domain/eps-2/seed-0.json", "attacks/none/eps-inf/seed-0.json"]
    (out / "privacy.json").unlink()
    (out / "domain" / "eps-2" / "seed-0" / "results.json").unlink()  # stopped before this run wrote its results
    runs, trainings = [], []
    real_run, real_train = runners.run_scenario, client_module.client_train
    monkeypatch.setattr(runners, "run_scenario", lambda cfg, **kw: runs.append(kw["out_dir"]) or real_run(cfg, **kw))
    monkeypatch.setattr(client_module, "client_train", lambda *a, **kw: trainings.append(1) or real_train(*a, **kw))
    assert main([*command, "--resume"]) == 0
    assert runs == [out / "domain" / "eps-2" / "seed-0"]
    assert len(trainings) == 2  # that run's two clients; the attacks train nothing
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    resumed = json.loads((out / "privacy.json").read_text())
    assert strip(resumed["utility"]) == strip(whole["utility"]) and resumed["probe"] == whole["probe"]
    runs.clear(), trainings.clear()
    assert main([*command, "--resume", "--set", "privacy_study.member_fraction=0.4"]) == 0
    references = PrivacyStudySettings().reference_models
    assert runs == [] and len(trainings) == 2 * (1 + references)  # per cell: the probe client, the reference models
    other = json.loads((out / "privacy.json").read_text())
    assert other["probe"]["members"] != whole["probe"]["members"]
    assert main([*command, "--resume", "--overwrite"]) == 1
    assert "pass only one" in capsys.readouterr().err
    # another run configuration (δ changes the ε = 2 cell's noise): the finished runs are refused, not replaced
    kept = (out / "domain" / "eps-2" / "seed-0" / "results.json").read_text()
    runs.clear(), trainings.clear()
    assert main([*command, "--resume", "--set", "privacy_study.delta=1e-4"]) == 1
    assert f"{out / 'domain' / 'eps-2' / 'seed-0'} holds a complete run of another configuration" in \
        capsys.readouterr().err
    assert runs == [] and (out / "domain" / "eps-2" / "seed-0" / "results.json").read_text() == kept
    # an attack file cut short is computed again, not read
    record = out / "attacks" / "none" / "eps-inf" / "seed-0.json"
    cut = json.loads(record.read_text())
    del cut["scores"]["lira"]
    record.write_text(json.dumps(cut))
    assert main([*command, "--resume", "--set", "privacy_study.member_fraction=0.4"]) == 0
    assert runs == [] and len(trainings) == 1 + references
    assert set(json.loads(record.read_text())["scores"]) == {"loss", "gradient_alignment", "lira"}
    # an attack file of an earlier protocol is computed again, not read
    older = json.loads(record.read_text())
    older["settings"]["protocol"] = "fitted-sequences"
    record.write_text(json.dumps(older))
    trainings.clear()
    assert main([*command, "--resume", "--set", "privacy_study.member_fraction=0.4"]) == 0
    assert runs == [] and len(trainings) == 1 + references
    assert json.loads(record.read_text())["settings"]["protocol"] == "target-size-references"
    # online LiRA asked for: the attacks run again with its shadow models, the runs are kept
    trainings.clear()
    assert main([*command, "--resume", "--set", "privacy_study.member_fraction=0.4",
                 "--set", "privacy_study.online_lira_models=4"]) == 0
    assert runs == [] and len(trainings) == 2 * (1 + references + 4)
    online = json.loads(record.read_text())
    assert online["settings"]["online_lira_models"] == 4 and "lira_online" in online["scores"]
    assert "online LiRA with 4 shadow models" in (out / "privacy.md").read_text()
    probe = json.loads((out / "privacy.json").read_text())["probe"]
    assert probe["online_lira_models"] == 4 and len(probe["shadow_model_users"]) == 2  # its real sizes, recorded
    assert f"shadow models of {shadow_size(probe)}" in (out / "privacy.md").read_text()
    assert "online_lira_models" not in whole["probe"]  # recorded only when on: older studies pool with newer ones
    for few in (2, 3):
        assert main([*command, "--resume", "--set", f"privacy_study.online_lira_models={few}"]) == 1
        assert "online_lira_models must be 0 (no online LiRA) or an even number >= 4" in capsys.readouterr().err


SEQUENTIAL_STUDY = TINY_STUDY.replace('family = "text-lae"', 'family = "sequential"').replace(
    "lam = 100.0", "hidden = 8\nn_heads = 1\nn_layers = 1\nmax_len = 8\nadapter_width = 8\nmax_epochs = 2"
).replace("fedavg_rounds = 0", "fedavg_rounds = 1").replace(
    "clip_norm = 0.05", "sample_rate = 0.25"
).replace("probe_max_users = 20", "probe_max_users = 20\nunits = [\"domain\", \"user\"]\nreference_models = 1")


def test_an_epsilon_no_noise_reaches_is_refused_before_any_cell_trains(tmp_path, monkeypatch):
    """User-level DP-SGD at ε = 0.1, δ = 1e-5 is out of the RDP accountant's reach: the study failed after the
    earlier cells had trained, with opacus' bare 'The privacy budget is too low.'"""
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy import study as study_module

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "seq.toml"
    path.write_text(SEQUENTIAL_STUDY)
    trained = []
    monkeypatch.setattr(study_module, "utility_sweep", lambda *a, **k: trained.append(a) or [])
    cfg, study = study_module.load_study(str(path), ["privacy_study.units=['user']",
                                                     "privacy_study.epsilons=[inf, 8.0, 0.1]"])
    with pytest.raises(FedmergeError, match=r"privacy.unit = 'user', ε = 0.1, δ = 1e-05\): no noise multiplier "
                                            r"reaches this ε"):
        study_module.run_study(cfg, study, tmp_path / "out", part="utility")
    assert trained == []


@pytest.mark.slow
def test_privacy_run_sequential_both_units(tmp_path, monkeypatch):
    """~35 s: the study with user-level DP-SGD; every client reports ε ≤ target over its 2 releases."""
    import json

    from fedmerge.cli import main

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "seq.toml"
    path.write_text(SEQUENTIAL_STUDY)
    assert main(["privacy", "run", "--scenario", str(path), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "privacy.json").read_text())
    assert [(r["unit"], r["epsilon"]) for r in report["utility"]] == [("none", "inf"), ("domain", "2"), ("user", "2")]
    assert all("fedavg" in r["metric"] for r in report["utility"])  # FedAvg rounds are part of the study
    user_run = json.loads((tmp_path / "out" / "user" / "eps-2" / "seed-0" / "results.json").read_text())
    for metrics in user_run["train_metrics"].values():
        assert metrics["dp_unit"] == 1 and metrics["dp_steps"] == 4
        assert metrics["dp_epsilon"] < metrics["dp_epsilon_run"] <= 2.0 + 1e-6
    # the attacks see one release of two: its own ε is below the cell's, and privacy.md says so
    attacked = [r["attacked_release_epsilon"] for r in report["probe"]["rows"][1:]]
    assert all(0 < e < 2.0 for e in attacked)
    assert "The attacks see the one-shot release only" in (tmp_path / "out" / "privacy.md").read_text()


def test_domain_level_cells_of_a_seed_share_one_nonprivate_training(tmp_path, monkeypatch):
    """Domain-level DP is post-processing of the non-private update: the study trains each (client, seed) once, for
    the utility runs and for the attacks' target and reference models, and every ε of the seed noises that update.
    The figures equal those of studies that train each cell anew (one study per ε, pooled)."""
    import json

    from fedmerge.cli import main

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "seq.toml"
    path.write_text(SEQUENTIAL_STUDY.replace("fedavg_rounds = 1", "fedavg_rounds = 0")
                    .replace('units = ["domain", "user"]', 'units = ["domain"]'))
    runs = {"joint": "[inf, 2.0, 1.0]", "inf": "[inf]", "two": "[2.0]", "one": "[1.0]"}
    for name, epsilons in runs.items():
        assert main(["privacy", "run", "--scenario", str(path), "--out", str(tmp_path / name),
                     "--set", f"privacy_study.epsilons={epsilons}"]) == 0
    report = {name: json.loads((tmp_path / name / "privacy.json").read_text()) for name in runs}
    trainings = 2 + 1 + 1  # two clients, the attacks' target and its one reference model
    assert report["joint"]["nonprivate_updates"] == {"trained": trainings, "reused": 2 * trainings}
    assert all(report[name]["nonprivate_updates"] == {"trained": trainings, "reused": 0} for name in ("inf", "two", "one"))
    assert main(["privacy", "pool", *(str(tmp_path / name / "privacy.json") for name in ("inf", "two", "one")),
                 "--out", str(tmp_path / "pooled")]) == 0
    assert (tmp_path / "pooled" / "privacy.md").read_text() == (tmp_path / "joint" / "privacy.md").read_text()
    for unit_eps in ("none/eps-inf", "domain/eps-2", "domain/eps-1"):
        cell = lambda name: json.loads((tmp_path / name / unit_eps / "seed-0" / "results.json").read_text())  # noqa: E731
        alone = next(name for name in ("inf", "two", "one") if (tmp_path / name / unit_eps).exists())
        assert cell("joint")["models"] == cell(alone)["models"]


def test_a_study_run_in_two_halves_side_by_side_equals_the_whole_study(tmp_path, monkeypatch):
    """``--only attacks`` and ``--only utility`` write only their half into the same folder (two processes may run
    them side by side); a last ``--resume`` run trains nothing, reads both back and writes what one run writes."""
    import json

    from fedmerge.cli import main
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import load_study, run_study

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "seq.toml"
    path.write_text(SEQUENTIAL_STUDY.replace("fedavg_rounds = 1", "fedavg_rounds = 0")
                    .replace('units = ["domain", "user"]', 'units = ["domain"]'))
    grid = ["--scenario", str(path), "--set", "privacy_study.epsilons=[inf, 1.0]"]
    assert main(["privacy", "run", *grid, "--out", str(tmp_path / "whole")]) == 0
    halves = tmp_path / "halves"
    assert main(["privacy", "run", *grid, "--out", str(halves), "--only", "attacks"]) == 0
    assert sorted(p.relative_to(halves).as_posix() for p in halves.rglob("*.json")) == [
        "attacks/domain/eps-1/seed-0.json", "attacks/none/eps-inf/seed-0.json"]
    # the attacks again without --resume or --overwrite: refused before anything runs (they were recomputed and
    # written over the earlier files)
    attacks = (halves / "attacks" / "none" / "eps-inf" / "seed-0.json").read_bytes()
    assert main(["privacy", "run", *grid, "--out", str(halves), "--only", "attacks"]) == 1
    assert (halves / "attacks" / "none" / "eps-inf" / "seed-0.json").read_bytes() == attacks
    assert main(["privacy", "run", *grid, "--out", str(halves), "--only", "utility", "--resume"]) == 0
    assert "probe" not in json.loads((halves / "privacy.json").read_text())
    assert not (halves / "privacy.md").exists()
    assert main(["privacy", "run", *grid, "--out", str(halves), "--resume"]) == 0
    assert json.loads((halves / "privacy.json").read_text())["nonprivate_updates"] == {"trained": 0, "reused": 0}
    assert (halves / "privacy.md").read_text() == (tmp_path / "whole" / "privacy.md").read_text()
    cfg, study = load_study(str(path))
    with pytest.raises(FedmergeError, match="unknown study part 'probe'; valid: all, utility, attacks"):
        run_study(cfg, study, tmp_path / "other", part="probe")
    assert not (tmp_path / "other").exists()


def test_attacks_probe_what_the_family_trains_on(tmp_path, monkeypatch):
    """The attacks score each candidate's fitted sequences: for the sequential family the training sequences, whose
    last item a member's client trained on (not the validation item, which only selects the model); the reference
    models train on seeds of their own, not the client's; online LiRA's IN mask has one column per probed sequence."""
    import fedmerge.privacy.attacks as attacks
    import fedmerge.runners.client as client_module
    from fedmerge.privacy.attacks import scorable
    from fedmerge.privacy.membership import split_members, split_users
    from fedmerge.privacy.study import attack_record, load_study

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "seq.toml"
    path.write_text(SEQUENTIAL_STUDY)
    cfg, study = load_study(str(path), ["privacy_study.probe_max_users=1000", "privacy_study.online_lira_models=4"])
    probed, seeds = {}, []
    monkeypatch.setattr(attacks, "run_attacks", lambda family, theta0, shipped, features, members, nonmembers, **kw:
                        probed.update(members=members, nonmembers=nonmembers, inside=kw["inside"]) or {})
    real_train = client_module.client_train
    monkeypatch.setattr(client_module, "client_train",
                        lambda users, theta0, run_cfg, **kw: seeds.append(run_cfg.run.seed) or real_train(users, theta0, run_cfg, **kw))
    name = cfg.data.training_domains()[0]
    record = attack_record(cfg, study, name, seed=0, control=False)
    members, rest = split_members(cfg.load_domain(name), float(study.member_fraction), seed=0)
    nonmembers, _ = split_users(rest, min(1000, rest.n_users // 2), seed=1)
    as_lists = lambda seqs: sorted(np.asarray(s).tolist() for s in seqs)  # noqa: E731
    assert as_lists(probed["members"]) == as_lists(scorable(members.train))
    assert as_lists(probed["nonmembers"]) == as_lists(scorable(nonmembers.train))
    assert record["sizes"]["probed_per_group"] == [sum(len(s) >= 2 for s in members.train),
                                                   sum(len(s) >= 2 for s in nonmembers.train)]
    assert probed["inside"].shape == (4, len(probed["members"]) + len(probed["nonmembers"]))
    assert len(seeds) == 1 + study.reference_models + 4 and len(set(seeds)) == len(seeds)


def test_the_probe_keeps_only_the_probed_non_members_so_references_train_on_the_rest(tiny_scenario, monkeypatch):
    """With 5 users probed, 5 of the 30 non-members are held out and the other 25 form the attacker's pool: every
    reference model trains on those 25 (fewer than the target's 30), the target on its 30 members."""
    import fedmerge.privacy.attacks as attacks
    import fedmerge.runners.client as client_module
    from fedmerge.privacy.study import attack_record, load_study

    cfg, study = load_study(str(tiny_scenario), ["privacy_study.probe_max_users=5"])
    trained: list[int] = []
    real_train = client_module.client_train
    monkeypatch.setattr(client_module, "client_train",
                        lambda users, *a, **kw: trained.append(users.n_users) or real_train(users, *a, **kw))
    monkeypatch.setattr(attacks, "run_attacks", lambda *a, **kw: {})
    record = attack_record(cfg, study, cfg.data.training_domains()[0], seed=0, control=False)
    sizes = record["sizes"]
    assert (sizes["members"], sizes["nonmembers"], sizes["reference"], sizes["reference_model_users"]) == (30, 5, 25, 25)
    assert trained == [30] + [25] * study.reference_models


def studies_run_apart_and_pooled(scenario: Path, tmp_path: Path, key: str, whole: str,
                                 parts: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(privacy.json of one study with ``privacy_study.<key> = whole``, privacy.json of the studies with each of
    ``parts`` (name -> value) pooled in that order); the tables are in ``tmp_path/both`` and ``tmp_path/pooled``."""
    import json

    from fedmerge.cli import main

    for name, value in (("both", whole), *parts.items()):
        assert main(["privacy", "run", "--scenario", str(scenario), "--out", str(tmp_path / name), "--set",
                     f"privacy_study.{key}={value}"]) == 0
    assert main(["privacy", "pool", *(str(tmp_path / name / "privacy.json") for name in parts),
                 "--out", str(tmp_path / "pooled")]) == 0
    return (json.loads((tmp_path / "both" / "privacy.json").read_text()),
            json.loads((tmp_path / "pooled" / "privacy.json").read_text()))


def test_pooled_seeds_equal_one_study_over_all_seeds(tiny_scenario, tmp_path):
    """Seeds 0 and 1 run as two studies and pooled give the very values and intervals of one study over [0, 1]."""
    joint, pooled = studies_run_apart_and_pooled(tiny_scenario, tmp_path, "seeds", "[0, 1]",
                                                 {"s0": "[0]", "s1": "[1]"})
    assert pooled["study"]["seeds"] == [0, 1] and len(pooled["pooled_from"]) == 2
    for a, b in zip(joint["utility"], pooled["utility"]):
        assert a["seeds"] == b["seeds"] and a["metric"].keys() == b["metric"].keys()
        for m in a["metric"]:
            assert b["metric"][m]["values"] == a["metric"][m]["values"]
            assert b["metric"][m]["low"] == pytest.approx(a["metric"][m]["low"])
    for a, b in zip(joint["probe"]["rows"], pooled["probe"]["rows"]):
        assert all(b["attacks"][k][s]["values"] == a["attacks"][k][s]["values"] for k in a["attacks"] for s in a["attacks"][k])
    assert (tmp_path / "pooled" / "privacy.md").read_text() == (tmp_path / "both" / "privacy.md").read_text()
    # pooling into a study's own folder replaced that study's results silently
    from fedmerge.cli import main

    own = (tmp_path / "s0" / "privacy.json").read_bytes()
    parts = [str(tmp_path / name / "privacy.json") for name in ("s0", "s1")]
    assert main(["privacy", "pool", *parts, "--out", str(tmp_path / "s0")]) == 1
    assert (tmp_path / "s0" / "privacy.json").read_bytes() == own
    assert main(["privacy", "pool", *parts, "--out", str(tmp_path / "pooled"), "--overwrite"]) == 0


def test_studies_of_other_epsilons_pooled_equal_one_study_over_the_union(tiny_scenario, tmp_path):
    """ε = ∞ and ε = 2 run as two studies over the same seeds and pooled give the cells, values and table of one
    study over [∞, 2] (the order of the files does not matter)."""
    joint, pooled = studies_run_apart_and_pooled(tiny_scenario, tmp_path, "epsilons", "[inf, 2.0]",
                                                 {"two": "[2.0]", "inf": "[inf]"})
    assert pooled["study"]["epsilons"] == ["inf", "2"] and pooled["study"]["seeds"] == joint["study"]["seeds"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(pooled["utility"]) == strip(joint["utility"])
    assert pooled["probe"] == joint["probe"]
    assert (tmp_path / "pooled" / "privacy.md").read_text() == (tmp_path / "both" / "privacy.md").read_text()


def test_a_study_written_before_the_derived_probe_fields_pools_with_a_newer_one(tiny_scenario, tmp_path):
    """reference_model_users and attacked_release_epsilon follow from what a study recorded before them: their
    absence in an older privacy.json does not make it another study."""
    import json

    from fedmerge.cli import main

    studies_run_apart_and_pooled(tiny_scenario, tmp_path, "epsilons", "[inf]", {"two": "[2.0]", "inf": "[inf]"})
    older, newer = tmp_path / "two" / "privacy.json", tmp_path / "inf" / "privacy.json"
    for path in (older, newer):  # the probe of protocol "fitted-sequences": references on half the reference users
        report = json.loads(path.read_text())
        report["probe"].update(protocol="fitted-sequences", reference_model_users=report["probe"]["reference"] // 2)
        path.write_text(json.dumps(report))
    report = json.loads(older.read_text())
    del report["probe"]["reference_model_users"]
    for row in report["probe"]["rows"]:
        del row["attacked_release_epsilon"]
    del report["scenario"]["privacy"]["release_diagnostics"]  # a setting fedmerge gained since, at its default
    del report["study"]["online_lira_models"]  # a study setting gained since: the older study ran at its default
    older.write_text(json.dumps(report))
    assert main(["privacy", "pool", str(older), str(newer), "--out", str(tmp_path / "mixed")]) == 0
    mixed = json.loads((tmp_path / "mixed" / "privacy.json").read_text())
    assert mixed["study"]["epsilons"] == ["inf", "2"]
    assert mixed["probe"]["reference_model_users"] == mixed["probe"]["reference"] // 2  # derived for the older one


def test_studies_of_other_units_pooled_equal_one_study_over_both(tiny_scenario, tmp_path):
    """Unit "user" and unit "domain" run as two studies over the same seeds and ε and pooled (user first) give the
    cells, values and table of one study over both units (units in the canonical order, ε = ∞ shared)."""
    joint, pooled = studies_run_apart_and_pooled(tiny_scenario, tmp_path, "units", '["domain", "user"]',
                                                 {"user": '["user"]', "domain": '["domain"]'})
    assert pooled["study"]["units"] == ["domain", "user"] == joint["study"]["units"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert [(r["unit"], r["epsilon"]) for r in pooled["utility"]] == [("none", "inf"), ("domain", "2"), ("user", "2")]
    assert strip(pooled["utility"]) == strip(joint["utility"])
    assert pooled["probe"] == joint["probe"]
    assert (tmp_path / "pooled" / "privacy.md").read_text() == (tmp_path / "both" / "privacy.md").read_text()


def test_pooling_refuses_what_is_not_one_study():
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import pool_studies

    def study(seeds, epsilons=("inf",), z=0.0):
        cell = {"mean": 0.5, "values": [0.5] * len(seeds), "n": len(seeds)}
        return {"study": {"seeds": list(seeds), "epsilons": list(epsilons), "metric": "recall@10"},
                "scenario": {"run": {"name": "x"}}, "releases_per_client": 1,
                "utility": [{"unit": "none", "epsilon": "inf", "seeds": list(seeds), "noise_multiplier": z,
                             "metric": {"average": cell}}],
                "probe": {"rows": [{"unit": "none", "epsilon": "inf", "attacks": {"loss": {"auc": cell}}}], "theta0": {}}}

    pooled = pool_studies([study([0]), study([1, 2])], ["a", "b"])
    assert pooled["utility"][0]["metric"]["average"]["n"] == 3 and pooled["study"]["seeds"] == [0, 1, 2]
    # two machines' studies: another embedding-cache folder or progress setting is the same study (it was refused)
    here, there = study([0]), study([1])
    here["scenario"] = {"run": {"name": "x", "progress": True}, "encoder": {"name": "minilm", "cache_dir": "/a"}}
    there["scenario"] = {"run": {"name": "x", "progress": False}, "encoder": {"name": "minilm", "cache_dir": "/b"}}
    assert pool_studies([here, there], ["a", "b"])["study"]["seeds"] == [0, 1]
    there["scenario"]["encoder"]["name"] = "hashing"
    with pytest.raises(FedmergeError, match="scenario"):
        pool_studies([here, there], ["a", "b"])
    with pytest.raises(FedmergeError, match="seed 1 is in both"):
        pool_studies([study([0, 1]), study([1])], ["a", "b"])
    with pytest.raises(FedmergeError, match=r"differ in study settings \['epsilons'\]"):
        pool_studies([study([0]), study([1], epsilons=("inf", "8"))], ["a", "b"])
    with pytest.raises(FedmergeError, match="noise multiplier"):
        pool_studies([study([0]), study([1], z=1.0)], ["a", "b"])
    with pytest.raises(FedmergeError, match="two or more"):
        pool_studies([study([0])], ["a"])
    older = study([1])
    older["probe"]["protocol"] = "fitted-sequences"
    with pytest.raises(FedmergeError, match="different attack protocols"):
        pool_studies([study([0]), older], ["a", "b"])
    # same seeds: the union of the cells, where a cell that both ran must be the same
    with pytest.raises(FedmergeError, match=r"utility cell \(unit none, ε inf\) differs between a and b"):
        pool_studies([study([0]), study([0], z=1.0)], ["a", "b"])
    one, other = study([0]), study([0])
    one["probe"]["theta0"], other["probe"]["theta0"] = {"loss": {"auc": {"mean": 0.6}}}, {"loss": {"auc": {"mean": 0.7}}}
    with pytest.raises(FedmergeError, match="differ in the θ₀ control"):
        pool_studies([one, other], ["a", "b"])
    # other units over the same seeds: refused when the combined grid (units × ε) has a cell nobody ran
    user8, domain4 = study([0], epsilons=("inf", "8")), study([0], epsilons=("4",))
    user8["study"]["units"], domain4["study"]["units"] = ["user"], ["domain"]
    user8["utility"].append({**user8["utility"][0], "unit": "user", "epsilon": "8"})
    user8["probe"]["rows"].append({**user8["probe"]["rows"][0], "unit": "user", "epsilon": "8"})
    for section in (domain4["utility"], domain4["probe"]["rows"]):
        section[0] = {**section[0], "unit": "domain", "epsilon": "4"}
    with pytest.raises(FedmergeError, match=r"cells \[\('domain', '8'\), \('user', '4'\)\] of the combined grid"):
        pool_studies([user8, domain4], ["a", "b"])


def test_pooling_keeps_the_count_of_seeds_that_reported_no_value():
    """A pooled table is the one a single study over all the seeds writes: "(n of m seeds)" was lost when pooling
    (only the present values were pooled), and a cell no seed of one study reported lost that study's seeds."""
    from fedmerge.privacy.study import _format_interval, over_seeds, pool_studies

    def study(seeds, values):
        cell = over_seeds(values)
        return {"study": {"seeds": seeds, "epsilons": ["inf"], "metric": "recall@10"},
                "scenario": {"run": {"name": "x"}}, "releases_per_client": 1,
                "utility": [{"unit": "none", "epsilon": "inf", "seeds": seeds, "noise_multiplier": 0.0,
                             "metric": {"average": cell}}],
                "probe": {"rows": [{"unit": "none", "epsilon": "inf", "attacks": {"loss": {"auc": cell}}}],
                          "theta0": {}}}

    single = over_seeds([0.07, None, 0.08, 0.09, None])
    pooled = pool_studies([study([0, 1], [0.07, None]), study([2, 3], [0.08, 0.09]), study([4], [None])],
                          ["a", "b", "c"])
    cell = pooled["utility"][0]["metric"]["average"]
    assert cell["missing_seeds"] == single["missing_seeds"] == 2 and cell["values"] == single["values"]
    assert _format_interval(cell) == _format_interval(single) and "(3 of 5 seeds)" in _format_interval(cell)
    # a study written before a cell that no seed reported counted its seeds still pools with a newer one
    older, newer = study([0], [None]), study([0], [None])
    del older["utility"][0]["metric"]["average"]["missing_seeds"]
    assert pool_studies([older, newer], ["old", "new"])["utility"][0]["metric"]["average"]["n"] == 0


def test_pooling_compares_gram_noise_only_where_both_studies_ran_user_cells():
    """Text-LAE studies that recorded other ``privacy.gram_noise`` values are other studies when both ran unit "user"
    cells (the only cells the setting changes); a domain-only study pooled with a user one is not refused for it."""
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import pool_studies

    def study(unit, gram_noise):
        cell = {"mean": 0.5, "values": [0.5], "n": 1}
        scenario = {"run": {"name": "x"}, "model": {"family": "text-lae"}, "privacy": {"gram_noise": gram_noise}}
        rows = [{"unit": "none", "epsilon": "inf"}, {"unit": unit, "epsilon": "8"}]
        return {"study": {"seeds": [0], "epsilons": ["inf", "8"], "units": [unit], "metric": "recall@10"},
                "scenario": scenario, "releases_per_client": 2,
                "utility": [{**r, "seeds": [0], "noise_multiplier": 0.0 if r["unit"] == "none" else 1.0,
                             "metric": {"average": cell}} for r in rows],
                "probe": {"rows": [{**r, "attacks": {"loss": {"auc": cell}}} for r in rows], "theta0": {}}}

    with pytest.raises(FedmergeError, match="ran different scenarios"):
        pool_studies([study("user", "once"), study("user", "per_release")], ["a", "b"])
    pooled = pool_studies([study("user", "once"), study("domain", "per_release")], ["a", "b"])
    assert [(r["unit"], r["epsilon"]) for r in pooled["utility"]] == [("none", "inf"), ("domain", "8"), ("user", "8")]


def test_a_study_whose_dp_cells_the_scenario_checks_refuse_fails_when_it_loads():
    """`dp_config` built each cell with dataclasses.replace, skipping the scenario's checks: `privacy-seq` with
    θ₀ distillation (refused with privacy.enabled) loaded and ran its DP cells unchecked."""
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import dp_config, load_study

    with pytest.raises(FedmergeError, match="theta0_distill.*privacy.enabled"):
        load_study("privacy-seq", ["model.params.theta0_distill=0.1", "privacy_study.epsilons=[4.0]"])
    no_dp, _ = load_study("privacy-seq", ["privacy_study.units=['domain']"])
    bad = no_dp.to_mapping()
    bad["model"]["params"]["theta0_distill"] = 0.1
    from fedmerge.scenario import Scenario

    with pytest.raises(FedmergeError, match="theta0_distill"):
        dp_config(Scenario.from_mapping(bad), "domain", 4.0, 1e-5, seed=0)


@pytest.mark.parametrize("override, key", [
    ('privacy_study.delta="x"', "privacy_study.delta"),
    ('privacy_study.probe_max_users="many"', "privacy_study.probe_max_users"),
    ('privacy_study.reference_models="two"', "privacy_study.reference_models"),
    ('privacy_study.member_fraction=[0.5]', "privacy_study.member_fraction"),
    ('privacy_study.methods="ties"', "privacy_study.methods"),
    ('privacy_study.probe_positions=3', "privacy_study.probe_positions"),
])
def test_study_settings_of_the_wrong_type_name_their_key(tiny_scenario, override, key):
    """A string where the study wants a number raised a bare ValueError from float()/int(), and a string where it
    wants a list was read character by character ("methods ['t', 'i', 'e', 's'] are not in merge.methods")."""
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import load_study

    with pytest.raises(FedmergeError, match=key.replace(".", r"\.") + " must be"):
        load_study(str(tiny_scenario), [override])


def test_study_settings_that_make_figures_vacuous_are_warned_or_refused(tiny_scenario):
    """δ ≥ 1/n permits releasing a user's data outright; privacy.delta was silently replaced by the study's δ;
    ε = true was read as 1."""
    from fedmerge.errors import FedmergeError
    from fedmerge.privacy.study import load_study, study_warnings

    with pytest.raises(FedmergeError, match="privacy_study.epsilons"):
        load_study(str(tiny_scenario), ["privacy_study.epsilons=[true]"])
    cfg, study = load_study(str(tiny_scenario), ["privacy_study.delta=0.5", "privacy_study.units=['domain', 'user']",
                                                 "privacy.delta=1e-3"])
    warnings = study_warnings(cfg, study, probe=None, domain_users={"synth-0": 60, "synth-1": 70})
    assert any("δ = 0.5" in w and "1/60" in w for w in warnings)  # 60 users in the smallest domain
    assert any("privacy.delta = 0.001" in w and "privacy_study.delta = 0.5" in w for w in warnings)
    # pooling on a machine without the data: no user counts recorded, no δ check, no data read
    assert not any("δ = 0.5" in w for w in study_warnings(cfg, study, probe=None, domain_users=None))
    quiet_cfg, quiet = load_study(str(tiny_scenario), ["privacy.noise_seed=-1", "privacy_study.delta=1e-6"])
    assert study_warnings(quiet_cfg, quiet, probe=None, domain_users={"synth-0": 60}) == []  # default privacy.delta


def test_privacy_settings_that_do_not_do_what_they_seem_are_warned_about():
    """DP on with no noise trained clip-only (ε = ∞) in silence; both noise keys, noise keys with DP off and the
    pooled-data joint baseline beside a DP run also loaded without a word."""
    from fedmerge.config import load_scenario
    from fedmerge.privacy.client import privacy_setting_warnings

    def warned(*overrides):
        return privacy_setting_warnings(load_scenario("quickstart", list(overrides)))

    assert warned() == []
    assert warned("privacy.enabled=true", "baselines.joint=false", "privacy.noise_multiplier=1.0") == []
    assert warned("privacy.enabled=true", "baselines.joint=false") == [
        "privacy.enabled with neither target_epsilon nor noise_multiplier: updates are clipped, not noised (ε = ∞, "
        "no DP guarantee)"]
    assert "noise_multiplier = 1 is not used" in warned("privacy.enabled=true", "baselines.joint=false",
                                                        "privacy.target_epsilon=8.0", "privacy.noise_multiplier=1.0")[0]
    assert "privacy.enabled is false" in warned("privacy.target_epsilon=8.0")[0]
    assert warned("privacy.secure_mode=true") == [
        "privacy.enabled is false: privacy.secure_mode is not used (no DP noise to draw)"]
    assert any("the joint model has no DP" in w for w in warned("privacy.enabled=true", "baselines.joint=true",
                                                               "privacy.noise_multiplier=1.0"))
    # seeded DP noise: the server that hands out the scenario can subtract it (the ε shipped said nothing of it)
    assert warned("privacy.enabled=true", "baselines.joint=false", "privacy.noise_multiplier=1.0",
                  "privacy.noise_seed=7") == [
        "privacy.noise_seed = 7: every client's DP noise and sampling follow from the scenario, so whoever knows it "
        "(the server, which hands it out) can recompute and subtract the noise: the ε reported holds only against "
        "parties that do not know the seed (reproducible studies; deployed nodes refuse it, set -1)"]


def test_a_deployed_node_refuses_to_train_with_seeded_dp_noise(tmp_path):
    """A deployed client noised its update with a seed the scenario fixed: the server could rebuild the generator and
    recover the exact clipped update while the client reported ε. A data owner's node now refuses it."""
    from flwr.app import ConfigRecord, RecordDict

    from fedmerge.config import load_scenario
    from fedmerge.data.generic import save_generic_domain
    from fedmerge.errors import FedmergeError
    from fedmerge.runners import protocol
    from fedmerge.runners.client import ClientState
    from fedmerge.runners.server import initial_weights

    tiny = ["encoder.name=hashing", "data.synthetic.n_users=20", "data.synthetic.n_items=15", "model.params.hidden=8",
            "model.params.n_layers=1", "model.params.max_epochs=1", "privacy.enabled=true", "baselines.joint=false",
            "privacy.noise_multiplier=1.0", f"encoder.cache_dir={tmp_path / 'cache'}"]
    cfg = load_scenario("quickstart", [*tiny, "privacy.noise_seed=7"])
    folder = save_generic_domain(cfg.load_domain("synth-0"), tmp_path / "synth-0")
    request = RecordDict({protocol.GLOBAL: protocol.to_record(initial_weights(cfg)), protocol.CONFIG: ConfigRecord(
        {protocol.PHASE: protocol.PHASE_ONESHOT, protocol.ROUND: 0})})
    with pytest.raises(FedmergeError, match=r"privacy.noise_seed = 7: a deployed node refuses DP noise drawn from a seed"):
        ClientState(cfg, data_path=str(folder)).handle(protocol.TRAIN, request)
    assert protocol.WEIGHTS in ClientState(cfg, partition_id=0).handle(protocol.TRAIN, request).array_records
    unseeded = load_scenario("quickstart", [*tiny, "privacy.noise_seed=-1"])
    assert protocol.WEIGHTS in ClientState(unseeded, data_path=str(folder)).handle(protocol.TRAIN, request).array_records


def test_every_dp_mechanism_draws_its_unseeded_noise_seed_one_way():
    """privatize_update, DP-SGD and the private Gram took 63, 62 and 63 bits from OS entropy in three places; DP-SGD
    adds 1 for its second generator, which 63 bits could push past torch's seed range."""
    from fedmerge.privacy.dp import noise_generator_seed

    assert noise_generator_seed(7) == 7
    drawn = {noise_generator_seed(None) for _ in range(20)}
    assert len(drawn) == 20 and all(0 <= s < 2**62 for s in drawn)
    torch.Generator().manual_seed(max(drawn) + 1)  # a second generator's seed is still valid


def test_the_report_says_the_online_lira_shadow_models_size_as_recorded():
    """privacy.md said "shadow models of the target's size" whatever their size (member_fraction > 0.5 leaves too
    small a pool to fill them)."""
    from fedmerge.privacy.study import shadow_size

    assert shadow_size({"members": 42, "shadow_model_users": [42, 42]}) == "the target's size (42 users)"
    assert shadow_size({"members": 42, "shadow_model_users": [21, 27]}).startswith("21-27 users (the target has 42")
    assert shadow_size({"members": 42}) == "the target's size (intended; not recorded)"
