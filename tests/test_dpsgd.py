"""User-level DP-SGD (per-user clipping, Poisson sampling of users, opacus accounting) and its client wiring."""

from __future__ import annotations

import math

import pytest
import torch

from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.errors import FedmergeError
from fedmerge.models.sequential import SequentialFamily, training_windows
from fedmerge.privacy.client import private_train, run_epsilon, run_noise_multiplier
from fedmerge.scenario import Scenario
from fedmerge.privacy.dpsgd import UserLevelDP, per_user_gradients, train_user_level, user_epsilon, user_noise_multiplier


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def domain():
    return make_synthetic_domains(n_domains=1, n_users=30, n_items=25, min_len=4, max_len=9, seed=3)[0]


@pytest.fixture(scope="module")
def features(domain):
    return torch.randn(domain.n_items, 12, generator=torch.Generator().manual_seed(0))


def tiny_family(**params) -> SequentialFamily:
    base = dict(hidden=16, n_layers=1, n_heads=1, max_len=8, dropout=0.0, adapter_width=16, lr=1e-2, device="cpu")
    return SequentialFamily(**{**base, **params})


def loop_gradients(family, module, users, feats, generator):
    """The reference: one autograd pass of the family's batch loss per user (the pre-torch.func path)."""
    params = [p for p in module.parameters() if p.requires_grad]
    out, losses = [], []
    for windows in users:
        loss = family._batch_loss(module, windows, feats, generator)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        losses.append(float(loss.detach()))
    return [torch.stack([g[j] for g in out]) for j in range(len(params))], torch.tensor(losses)


@pytest.mark.parametrize(("adapter", "behaviour"),
                         [("linear", ""), ("mlp", ""), ("moe", ""), ("routed", ""), ("mlp", "last"),
                          ("routed", "last"), ("mlp", "history"), ("routed", "text")])
@pytest.mark.parametrize("n_negatives", [None, 6])
def test_vectorized_per_user_gradients_equal_one_autograd_pass_per_user(domain, adapter, behaviour, n_negatives):
    """torch.func per-user gradients (chunks of 4, users of 1-3 windows) = a per-user loop on ``_batch_loss``;
    ``behaviour``: none, the last-item bias, or it with the history bias, two history-pooling weights and the
    repeating users' own offsets, or with the last item's text-conditioned offset."""
    dim = 24 if adapter == "routed" else 12
    feats = torch.randn(domain.n_items, dim, generator=torch.Generator().manual_seed(0))
    history = behaviour == "history"
    family = tiny_family(adapter=adapter, n_experts=3, n_heads=2, max_len=4, n_negatives=n_negatives,
                         routed_min_share=0.0, last_item_bias=bool(behaviour), history_bias=history,
                         history_pooling=2 if history else 0, repeat_user_bias=history,
                         last_item_text_bias=behaviour == "text")
    theta0 = family.initial_weights(dim, seed=0, catalog_features=[feats] if adapter == "routed" else ())
    if behaviour == "text":
        theta0["last_item_text_bias"] = torch.linspace(-1.0, 1.0, dim // 2)
    if behaviour:  # trained values: the offsets and weights then move every loss
        theta0["last_item_bias"] = torch.tensor(-1.5)
    if history:
        theta0["history_bias"] = torch.tensor(-0.7)
        theta0["history_pooling"] = torch.tensor([0.6, -0.3])
        theta0["repeat_user_bias"] = torch.tensor([0.4, 0.9])
    module, feats, _ = family.training_module(theta0, domain, feats, seed=0)
    module.train()
    users = [training_windows([s], family.max_len) for s in domain.train][:9]
    assert {len(w) for w in users} >= {1, 2}
    expected, expected_loss = loop_gradients(family, module, users, feats, torch.Generator().manual_seed(1))
    grads, losses = per_user_gradients(family, module, users, feats, torch.Generator().manual_seed(1), chunk_users=4)
    assert len(grads) == len(expected)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses, expected_loss, rtol=1e-5, atol=1e-6)


def test_dropout_draws_a_mask_per_user_from_the_seeded_global_generator(domain, features):
    """Training mode: one user twice in a chunk gets two masks (two gradients), the same seed the same masks;
    without dropout the two copies agree."""
    users = [training_windows([domain.train[0]], 8)] * 2 + [training_windows([domain.train[1]], 8)]

    def grads(dropout: float, seed: int) -> list[torch.Tensor]:
        family = tiny_family(dropout=dropout)
        module, feats, _ = family.training_module(family.initial_weights(12, seed=0), domain, features, seed=seed)
        module.train()
        return per_user_gradients(family, module, users, feats, torch.Generator().manual_seed(0))[0]

    a, b, c = grads(0.3, seed=0), grads(0.3, seed=0), grads(0.3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c))
    assert any(not torch.allclose(g[0], g[1]) for g in a)
    assert all(torch.allclose(g[0], g[1]) for g in grads(0.0, seed=0))


def test_one_full_batch_step_is_adamw_on_the_mean_of_clipped_user_gradients(domain, features):
    """q = 1, one step, z = 0: the update is AdamW on Σ_u clip_C(g_u) / N; clipping at C = 1e-3 changes it."""
    family = tiny_family()
    theta0 = family.initial_weights(12, seed=0)
    clip = 1e-3
    shipped, metrics = train_user_level(family, theta0, domain, features, UserLevelDP(0.0, clip, 1.0, 1.0),
                                        seed=0, noise_seed=0)
    assert metrics["dp_steps"] == 1 and metrics["dp_mean_batch_users"] == domain.n_users
    assert metrics["dp_clipped_fraction"] == 1.0  # every user's gradient is far above 1e-3

    module, feats, _ = family.training_module(theta0, domain, features, seed=0)
    params = [p for p in module.parameters() if p.requires_grad]
    users = [training_windows([s], family.max_len) for s in domain.train]
    grads, _ = loop_gradients(family, module, users, feats, torch.Generator().manual_seed(0))
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, grads):
        p.grad = torch.einsum("u,u...->...", factor, g) / len(users)
    torch.optim.AdamW(params, lr=family.lr, weight_decay=family.weight_decay).step()
    for name, value in module.state_dict().items():
        torch.testing.assert_close(shipped[name], value, rtol=1e-4, atol=1e-6)


def test_dp_sgd_clips_and_noises_only_the_trainable_weights(domain, features):
    """model.params.trainable under DP-SGD: the other weights ship exactly as θ₀; the per-user gradients (and so the
    clip and the noise) cover only the trainable ones."""
    family = tiny_family(trainable=["final_norm.*"])
    theta0 = family.initial_weights(12, seed=0)
    shipped, _ = train_user_level(family, theta0, domain, features, UserLevelDP(1.0, 0.5, 0.3, 1.0), seed=0,
                                  noise_seed=0)
    moved = {k for k in theta0 if not torch.equal(shipped[k], theta0[k])}
    assert moved == {"final_norm.weight", "final_norm.bias"}
    module, feats, _ = family.training_module(theta0, domain, features, seed=0)
    users = [training_windows([s], family.max_len) for s in domain.train[:3]]
    grads, _ = per_user_gradients(family, module, users, feats, torch.Generator().manual_seed(0))
    assert [tuple(g.shape) for g in grads] == [(3, 16), (3, 16)]


def test_domain_level_noise_stays_off_the_weights_outside_trainable(domain, features):
    """Domain-level DP with model.params.trainable: the weights training never moves ship exactly as θ₀ (no noise:
    they are data-independent) and the server's fixed-weight check covers them; the trained ones carry the noise."""
    from fedmerge.runners.client import client_train

    params = dict(hidden=16, n_layers=1, n_heads=1, max_len=8, dropout=0.0, adapter_width=16, lr=1e-2, device="cpu",
                  max_epochs=1, trainable=["final_norm.*"])
    cfg = Scenario.from_mapping({"model": {"family": "sequential", "params": params},
                                 "privacy": {"enabled": True, "unit": "domain", "target_epsilon": 2.0,
                                             "clip_norm": 0.1, "noise_seed": 1}})
    family = cfg.model.make_family()
    theta0 = family.initial_weights(12, seed=0)
    assert family.fixed_parameters(theta0) == {k for k in theta0 if not k.startswith("final_norm.")}
    shipped, _ = client_train(domain, theta0, cfg, features=features)
    moved = {k for k in theta0 if not torch.equal(shipped[k], theta0[k])}
    assert moved == {"final_norm.weight", "final_norm.bias"}


def test_noise_is_seeded_by_the_secret_seed_only(domain, features):
    family = tiny_family()
    theta0 = family.initial_weights(12, seed=0)
    settings = UserLevelDP(1.0, 0.5, 0.3, 1.0)
    a = train_user_level(family, theta0, domain, features, settings, seed=0, noise_seed=5)[0]
    b = train_user_level(family, theta0, domain, features, settings, seed=0, noise_seed=5)[0]
    c = train_user_level(family, theta0, domain, features, settings, seed=0, noise_seed=6)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(a[k], theta0[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_user_level_dp_sgd_trains_on_cuda(domain, features):
    """opacus draws the noise on the gradients' device with the given generator: a CPU generator failed every
    user-level step on a GPU ("Expected a 'cuda' device type for generator")."""
    family = tiny_family(device="cuda")
    theta0 = family.initial_weights(12, seed=0)
    weights = train_user_level(family, theta0, domain, features, UserLevelDP(1.0, 0.5, 0.3, 1.0), seed=0,
                               noise_seed=5)[0]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_accounting_matches_opacus_step_by_step_and_calibration_meets_the_target():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    assert user_epsilon(1.1, 0.05, 40, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert user_epsilon(1.1, 0.05, 80, 1e-5) > user_epsilon(1.1, 0.05, 40, 1e-5)  # composition grows ε
    assert user_epsilon(0.0, 0.05, 40, 1e-5) == math.inf
    for accountant in ("rdp", "prv"):
        z = user_noise_multiplier(4.0, 1e-5, 0.05, 60, accountant)
        eps = user_epsilon(z, 0.05, 60, 1e-5, accountant)
        assert 3.9 <= eps <= 4.0 + 1e-6
    assert UserLevelDP(1.0, 1.0, 0.05, 1.0).steps == 20 and UserLevelDP(1.0, 1.0, 0.3, 2.0).steps == 7
    with pytest.raises(ValueError, match="sample_rate"):
        UserLevelDP(1.0, 1.0, 0.0, 1.0)


def test_calibration_does_not_warn_about_the_alpha_range_of_its_search_probes():
    """opacus' binary search visits small z whose optimal RDP order is its largest alpha and warns on each probe
    ("consider expanding the range of alphas"); the calibrated z is not at that edge, so a study's log must not carry
    the warning. The accounting of the calibrated z itself still warns when its own order is at the edge."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = user_noise_multiplier(8.0, 1e-5, 0.02, 100)  # privacy-seq: 2 releases of 50 steps
        assert 8.0 - 0.01 <= user_epsilon(z, 0.02, 100, 1e-5) <= 8.0 + 1e-6
    with pytest.warns(UserWarning, match="largest alpha"):
        user_epsilon(10.0, 0.01, 10, 1e-5)  # ε ≈ 0.1: its optimal order is the largest alpha, the warning is kept


def scenario(**privacy):
    return Scenario.from_mapping({"model": {"family": "sequential"}, "baselines": {"fedavg_rounds": 2},
                                  "privacy": {"enabled": True, **privacy}})


def test_target_epsilon_is_met_over_all_releases_of_both_units(domain, features):
    user = scenario(unit="user", target_epsilon=4.0, sample_rate=0.2, epochs=1.0, max_grad_norm=0.5, noise_seed=1)
    z = run_noise_multiplier(user)
    assert run_epsilon(user, z, 3) == pytest.approx(4.0, abs=0.02)  # 3 releases = 1 one-shot + 2 FedAvg rounds
    assert run_epsilon(user, z, 1) < run_epsilon(user, z, 3)
    family = tiny_family(max_epochs=2)
    theta0 = family.initial_weights(12, seed=0)
    _, metrics = private_train(family, theta0, domain, features, user, seed=0, round_index=1, noise_seed=1)
    assert metrics["dp_unit"] == 1 and metrics["dp_noise_multiplier"] == z
    assert metrics["dp_epsilon"] == pytest.approx(run_epsilon(user, z, 2)) and metrics["dp_epsilon_run"] <= 4.0 + 1e-6
    assert metrics["dp_steps"] == 5
    dom = scenario(unit="domain", target_epsilon=2.0, clip_norm=0.1, noise_seed=1)
    _, metrics = private_train(family, theta0, domain, features, dom, seed=0, round_index=0, noise_seed=1)
    assert metrics["dp_unit"] == 0 and metrics["dp_epsilon_run"] == pytest.approx(2.0, rel=1e-6)
    assert metrics["dp_epsilon"] < 2.0


def test_fedavg_rounds_run_their_own_dpsgd_epochs_and_the_accounting_composes_every_step(domain, features):
    """``privacy.fedavg_epochs``: the one-shot release runs ``epochs``, each FedAvg round ``fedavg_epochs``; ε and the
    calibration compose the steps each release actually ran (opacus' accountant, step by step)."""
    from opacus.accountants import RDPAccountant

    from fedmerge.config import apply_overrides

    user = scenario(unit="user", target_epsilon=4.0, sample_rate=0.2, epochs=2.0, fedavg_epochs=0.4, max_grad_norm=0.5,
                    noise_seed=1)
    z = run_noise_multiplier(user)
    acc = RDPAccountant()
    for steps in (10, 2, 2):  # ⌈2.0 / 0.2⌉ for the one-shot update, ⌈0.4 / 0.2⌉ per FedAvg round
        for _ in range(steps):
            acc.step(noise_multiplier=z, sample_rate=0.2)
    assert run_epsilon(user, z, 3) == pytest.approx(acc.get_epsilon(1e-5)) and run_epsilon(user, z, 3) <= 4.0 + 1e-6
    assert run_epsilon(user, z, 3) == pytest.approx(4.0, abs=0.02)
    assert run_epsilon(user, z, 1) == pytest.approx(user_epsilon(z, 0.2, 10, 1e-5))
    same = scenario(unit="user", target_epsilon=4.0, sample_rate=0.2, epochs=2.0, max_grad_norm=0.5, noise_seed=1)
    assert run_noise_multiplier(same) > z  # 30 steps instead of 14: more noise for the same ε
    family = tiny_family(max_epochs=2)
    theta0 = family.initial_weights(12, seed=0)
    one_shot = private_train(family, theta0, domain, features, user, seed=0, round_index=0, noise_seed=1)[1]
    fedavg = private_train(family, theta0, domain, features, user, seed=0, round_index=2, noise_seed=1)[1]
    assert (one_shot["dp_steps"], fedavg["dp_steps"]) == (10, 2)
    assert fedavg["dp_epsilon"] == pytest.approx(run_epsilon(user, z, 3))
    with pytest.raises(FedmergeError, match="privacy.fedavg_epochs must be a finite number >= 0"):
        apply_overrides(user, ["privacy.fedavg_epochs=-1"])


def test_bad_settings_and_unsupported_families_are_named(domain, features):
    from fedmerge.config import apply_overrides
    from fedmerge.models import get_family

    cfg = Scenario.from_mapping({})
    with pytest.raises(FedmergeError, match="privacy.unit"):
        apply_overrides(cfg, ["privacy.unit=row"])
    with pytest.raises(FedmergeError, match="privacy.accountant"):
        apply_overrides(cfg, ["privacy.accountant=gdp"])
    with pytest.raises(FedmergeError, match="sample_rate"):
        apply_overrides(cfg, ["privacy.sample_rate=0"])
    lae = get_family("text-lae")
    with pytest.raises(FedmergeError, match="sequential"):
        train_user_level(lae, {}, domain, features, UserLevelDP(1.0, 1.0, 0.5, 1.0))
    popular = tiny_family(n_negatives=4, negative_sampling="popularity")
    with pytest.raises(FedmergeError, match="popularity"):
        train_user_level(popular, popular.initial_weights(12), domain, features, UserLevelDP(1.0, 1.0, 0.5, 1.0))
    assert run_noise_multiplier(scenario(unit="user", noise_multiplier=0.7)) == 0.7  # a given multiplier is used as is


@pytest.mark.parametrize("params, problem", [(["model.params.encoder_layers=1"], "encoder_layers > 0"),
                                             (["model.params.n_negatives=64", "model.params.negative_sampling='popularity'"],
                                              "popularity")])
def test_user_level_settings_dp_sgd_refuses_fail_when_the_scenario_loads(params, problem):
    """They were refused only when a client started DP-SGD: in a study, after the ε = ∞ and domain cells trained."""
    from fedmerge.config import load_scenario
    from fedmerge.privacy.study import load_study

    with pytest.raises(FedmergeError, match=problem):
        load_scenario("quickstart", ["privacy.enabled=true", "privacy.unit='user'", *params])
    with pytest.raises(FedmergeError, match=rf"privacy_study.units: .*{problem}"):
        load_study("privacy-seq", [*params, "privacy_study.units=['domain', 'user']"])


@pytest.mark.parametrize("fedavg_params, problem", [
    ("{encoder_layers=1}", "baselines.fedavg_local_params.encoder_layers > 0"),
    ("{n_negatives=10, negative_sampling='popularity'}", "baselines.fedavg_local_params.negative_sampling"),
    ("{theta0_distill=1.0}", r"baselines.fedavg_local_params.theta0_distill = 1.0 .* \['privacy.enabled'\]"),
])
def test_fedavg_local_params_meet_the_privacy_checks_at_load(fedavg_params, problem):
    """The FedAvg rounds train with their own parameters, which the DP checks never read: the run failed in its first
    FedAvg round, after the one-shot round trained."""
    from fedmerge.config import load_scenario

    with pytest.raises(FedmergeError, match=problem):
        load_scenario("quickstart", ["privacy.enabled=true", "privacy.unit='user'" if "distill" not in problem
                                     else "privacy.unit='domain'", "baselines.fedavg_rounds=1",
                                     f"baselines.fedavg_local_params={fedavg_params}"])


def test_theta0_distillation_in_the_fedavg_rounds_only_is_not_refused_for_the_joint_oracle_or_pretraining():
    """Both train with model.params, not the FedAvg rounds' parameters: such a scenario loaded before the check
    above and must still load."""
    from fedmerge.config import load_scenario

    cfg = load_scenario("quickstart", ["baselines.fedavg_rounds=1", "baselines.fedavg_local_params={theta0_distill=1.0}",
                                       "baselines.joint=true", "theta0.pretrain=true"])
    assert cfg.baselines.fedavg_local_params == {"theta0_distill": 1.0}


def test_text_lae_fedavg_local_params_need_one_lambda_with_user_level_dp():
    from fedmerge.config import load_scenario

    base = ["privacy.enabled=true", "privacy.unit='user'", 'model.family="text-lae"', "model.params.lam=1.0",
            "encoder.name=hashing", "baselines.fedavg_rounds=1"]
    load_scenario("quickstart", base)
    with pytest.raises(FedmergeError, match=r"needs one λ \(baselines.fedavg_local_params.lam = value\)"):
        load_scenario("quickstart", [*base, "baselines.fedavg_local_params={lam=[1.0, 10.0]}"])


def test_secure_mode_uses_opacus_floating_point_safe_noise_and_refuses_a_seed(domain, features, monkeypatch):
    import opacus.optimizers.optimizer as dp_optimizer

    calls = []
    original = dp_optimizer._generate_noise

    def recording(*args, **kwargs):
        calls.append(kwargs.get("secure_mode"))
        return original(*args, **kwargs)

    monkeypatch.setattr(dp_optimizer, "_generate_noise", recording)
    family = tiny_family()
    theta0 = family.initial_weights(12, seed=0)
    settings = UserLevelDP(1.0, 0.5, 0.5, 1.0)
    train_user_level(family, theta0, domain, features, settings, secure_mode=True)
    assert calls and all(calls)
    calls.clear()
    train_user_level(family, theta0, domain, features, settings, noise_seed=1)
    assert calls and not any(calls)
    with pytest.raises(FedmergeError, match="noise_seed"):
        train_user_level(family, theta0, domain, features, settings, noise_seed=1, secure_mode=True)


def test_secure_mode_setting_is_typed_off_by_default_and_names_what_it_needs():
    from fedmerge.config import apply_overrides

    assert scenario(unit="user").privacy.secure_mode is False
    assert scenario(unit="user", secure_mode=True).privacy.secure_mode is True
    with pytest.raises(FedmergeError, match="secure_mode"):
        apply_overrides(Scenario.from_mapping({}), ["privacy.secure_mode=1.5"])
    with pytest.raises(FedmergeError, match="noise_seed must be -1"):
        scenario(unit="user", secure_mode=True, noise_seed=0)
    with pytest.raises(FedmergeError, match="DP-SGD noise only"):
        scenario(unit="domain", secure_mode=True)


def test_dropout_and_negatives_draw_from_the_secret_not_from_the_public_seed(domain, features):
    """DP-SGD drew the sampled negatives and the dropout masks from the client's training seed (run seed, round and
    position: known to the server), consumed user after user: adding one user shifted every later user's draws, so
    with the seed known a step's clipped sum moved by more than C (0.35 for C = 0.1) and steps without that user
    moved too. Both now come from the secret seed of the sampling and the noise: the public seed changes nothing."""
    family = tiny_family(dropout=0.3, n_negatives=6)
    theta0 = family.initial_weights(12, seed=0)
    settings = UserLevelDP(1.0, 0.5, 0.3, 1.0)
    a = train_user_level(family, theta0, domain, features, settings, seed=0, noise_seed=5)[0]
    b = train_user_level(family, theta0, domain, features, settings, seed=1, noise_seed=5)[0]
    c = train_user_level(family, theta0, domain, features, settings, seed=0, noise_seed=6)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
