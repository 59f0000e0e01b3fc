"""User-level DP for the text-LAE: bounded user profiles, the symmetric Gaussian mechanism on the Gram matrix."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("private", [True, False])
def test_a_malformed_theta_is_refused_on_both_paths(domain, features, private):
    """The private path took θ's W as it came: a scalar, a vector or a (1, 1) W was broadcast into a d × d model and
    shipped, extra weights were dropped, a NaN W gave NaN weights (the non-private path refused most of them)."""
    family = TextLAEFamily(lam=10.0)
    d = features.shape[1]
    good = family.initial_weights(d)
    for bad in ({"W": torch.tensor(1.0)}, {"W": torch.ones(1, 1)}, {"W": torch.ones(d)},
                {**good, "b": torch.zeros(d)}, {"W": torch.full((d, d), float("nan"))}):
        with pytest.raises(FedmergeError, match="theta0"):
            if private:
                train_text_lae_user_level(family, bad, domain, features, noise_multiplier=1.0, bound=1.0, noise_seed=0)
            else:
                family.train(bad, domain, features, progress=False)


def test_client_reports_the_analytic_gaussian_epsilon_over_releases(domain, features):
    mapping = {"model": {"family": "text-lae", "params": {"lam": 10.0}}, "baselines": {"fedavg_rounds": 1},
               "privacy": {"enabled": True, "unit": "user", "target_epsilon": 3.0, "user_norm_bound": 2.0,
                           "noise_seed": 0, "gram_noise": "per_release"}}
    family = TextLAEFamily(lam=10.0)
    theta0 = family.initial_weights(features.shape[1])
    _, metrics = private_train(family, theta0, domain, features, Scenario.from_mapping(mapping), seed=0,
                               round_index=0, noise_seed=0)
    assert metrics["dp_unit"] == 1 and metrics["dp_user_bound"] == 2.0
    assert metrics["dp_epsilon_run"] == pytest.approx(3.0, rel=1e-6)
    # calibrated for the run's two releases (the one-shot weights and one FedAvg round), not derived from itself
    assert metrics["dp_noise_multiplier"] == pytest.approx(noise_multiplier_for(3.0, 1e-5, rounds=2), rel=1e-6)
    assert metrics["dp_epsilon"] == pytest.approx(epsilon_for(metrics["dp_noise_multiplier"], 1e-5, rounds=1))
    # the default draws the noisy Gram once: both releases are one Gaussian release, so less noise for the same ε
    once = Scenario.from_mapping({**mapping, "privacy": {**mapping["privacy"], "gram_noise": "once"}})
    assert Scenario.from_mapping({**mapping, "privacy": {k: v for k, v in mapping["privacy"].items()
                                                         if k != "gram_noise"}}).privacy.gram_noise == "once"
    for round_index in (0, 1):
        _, metrics = private_train(family, theta0, domain, features, once, seed=0, round_index=round_index,
                                   noise_seed=0)
        assert metrics["dp_noise_multiplier"] == pytest.approx(noise_multiplier_for(3.0, 1e-5, rounds=1), rel=1e-6)
        assert metrics["dp_epsilon"] == pytest.approx(3.0, rel=1e-6)
        assert metrics["dp_epsilon_run"] == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(FedmergeError, match=r"privacy.gram_noise must be one of \['once', 'per_release'\]"):
        Scenario.from_mapping({**mapping, "privacy": {**mapping["privacy"], "gram_noise": "twice"}})
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


def _user_level_text_lae(**privacy) -> Scenario:
    return Scenario.from_mapping({"model": {"family": "text-lae", "params": {"lam": 10.0}},
                                  "baselines": {"fedavg_rounds": 2},
                                  "privacy": {"enabled": True, "unit": "user", "noise_multiplier": 1.0, **privacy}})


def test_a_gram_drawn_once_uses_one_noise_seed_for_every_release(domain, features):
    """Seeded: round 0's seed for every release. OS entropy: drawn at the first release, kept in the client's memory,
    reused; a later release whose memory lost it is refused, and so is one whose Gram inputs changed (the same noise
    on another Gram would reveal the difference). "per_release" and the domain unit: a seed per release."""
    from fedmerge.runners.client import GRAM_INPUTS, GRAM_NOISE_SEED, noise_seed, release_noise_seed

    seeded = _user_level_text_lae(noise_seed=5)
    assert {release_noise_seed(seeded, domain, features, r, {}) for r in range(3)} == {noise_seed(seeded, domain.name, 0)}
    fresh = _user_level_text_lae(noise_seed=5, gram_noise="per_release")
    assert len({release_noise_seed(fresh, domain, features, r, {}) for r in range(3)}) == 3
    domain_unit = Scenario.from_mapping({"baselines": {"fedavg_rounds": 2},
                                         "privacy": {"enabled": True, "noise_multiplier": 1.0, "noise_seed": 5}})
    assert len({release_noise_seed(domain_unit, domain, features, r, {}) for r in range(3)}) == 3
    entropy, memory = _user_level_text_lae(), {}
    first = release_noise_seed(entropy, domain, features, 0, memory)
    assert memory[GRAM_NOISE_SEED] == first and 0 <= first < 2**62
    assert [release_noise_seed(entropy, domain, features, r, memory) for r in (0, 1, 2)] == [first] * 3
    assert release_noise_seed(entropy, domain, features, 0, {}) != first  # another run's client: other noise
    with pytest.raises(FedmergeError, match="release 1 finds no noisy-Gram seed"):
        release_noise_seed(entropy, domain, features, 1, {})
    # features re-encoded in another process may differ in the last bit: what makes them is compared, not the bytes
    assert release_noise_seed(entropy, domain, features * (1 + 1e-7), 1, memory) == first
    other_catalog = dataclasses.replace(domain, catalog=make_synthetic_domains(n_domains=1, n_users=50, n_items=30,
                                                                              seed=3)[0].catalog)
    for changed in (dict(domain=other_catalog), dict(cfg=_user_level_text_lae(noise_multiplier=2.0)),
                    dict(cfg=_user_level_text_lae(user_norm_bound=2.0)),
                    dict(cfg=entropy.with_changes(encoder={"name": "hashing", "params": {"dim": 16}})),
                    dict(domain=make_synthetic_domains(n_domains=1, n_users=50, n_items=30, seed=3)[0])):
        inputs = {"cfg": entropy, "domain": domain, "features": features, **changed}
        with pytest.raises(FedmergeError, match="noise of the client's first release to a Gram of other users"):
            release_noise_seed(inputs["cfg"], inputs["domain"], inputs["features"], 1, dict(memory))
        with pytest.raises(FedmergeError, match="noise of the client's first release"):  # seeded noise too
            release_noise_seed(inputs["cfg"].with_changes(privacy={"noise_seed": 5}), inputs["domain"],
                               inputs["features"], 1, {GRAM_INPUTS: memory[GRAM_INPUTS]})


def test_a_client_app_reuses_its_noisy_gram_across_rounds_through_context_state(
    tmp_path, monkeypatch, flower_task_identity,
):
    """A Flower client under user-level DP with OS-entropy noise: the one-shot release and a FedAvg round from the same
    weights are identical (one noisy Gram, kept through the node's context.state even when another process serves
    the second message), a node whose state was lost refuses the round, and "per_release" draws new noise."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import clients.app as client_app
    from fedmerge.config import load_scenario
    from fedmerge.runners import protocol
    from fedmerge.runners.server import initial_weights

    monkeypatch.setattr(client_app, "_STATES", {})
    base = load_scenario("quickstart", [
        "run.progress=false", "data.synthetic.n_users=40", "data.synthetic.n_items=30", "data.synthetic.max_len=8",
        'model.family="text-lae"', "model.params={lam = 10.0}", "encoder.name=hashing", "encoder.params.dim=16",
        f"encoder.cache_dir={tmp_path}", "baselines.fedavg_rounds=2",
        "privacy.enabled=true", 'privacy.unit="user"', "privacy.noise_multiplier=1.0"])

    def releases(cfg: Scenario, lose_state: bool = False) -> list:
        theta0 = initial_weights(cfg)
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                          state=RecordDict(), run_config={})
        out = []
        for round_index, phase in enumerate([protocol.PHASE_ONESHOT, protocol.PHASE_FEDAVG]):
            client_app._STATES.clear()  # the next message may reach a process that never served this node
            if lose_state and round_index:
                context.state = RecordDict()
            config = ConfigRecord({protocol.ROUND: round_index, protocol.PHASE: phase})
            message = Message(RecordDict({protocol.GLOBAL: protocol.to_record(theta0), protocol.CONFIG: config}), 7,
                              protocol.TRAIN)
            out.append(client_app.build_client_app(cfg)(message, context))
        return out

    once = releases(base)
    assert not any(reply.has_error() for reply in once)
    first, second = (protocol.from_record(r.content.array_records[protocol.WEIGHTS])["W"] for r in once)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    lost = releases(base, lose_state=True)
    assert not lost[0].has_error() and lost[1].has_error() and "finds no noisy-Gram seed" in lost[1].error.reason
    per_release = releases(Scenario.from_mapping({**base.to_mapping(),
                                                  "privacy": {**base.to_mapping()["privacy"],
                                                              "gram_noise": "per_release"}}))
    first, second = (protocol.from_record(r.content.array_records[protocol.WEIGHTS])["W"] for r in per_release)
    assert not torch.allclose(first, second)
    # the rounds a DP client released survive context.state as the seed does: a training that failed releases
    # nothing (its round may come again), a released round is refused when it comes again to another process
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    oneshot = ConfigRecord({protocol.ROUND: 0, protocol.PHASE: protocol.PHASE_ONESHOT})

    def train(weights):
        client_app._STATES.clear()
        message = Message(RecordDict({protocol.GLOBAL: protocol.to_record(weights), protocol.CONFIG: oneshot}), 7,
                          protocol.TRAIN)
        return client_app.build_client_app(base)(message, context)

    assert train({"W": torch.ones(1)}).has_error()  # a malformed θ: refused before anything is released
    assert not train(initial_weights(base)).has_error()
    again = train(initial_weights(base))
    assert again.has_error() and "round 0 refused: this client released it already" in again.error.reason


def test_a_run_recorded_before_gram_noise_existed_counts_as_per_release():
    """Text-LAE runs recorded before privacy.gram_noise drew a fresh Gram per release: --resume and study pooling read
    such a record as "per_release" (a new default "once" run is another configuration); other families' records
    predate a setting they never read, so its default is accepted for them."""
    import json

    from fedmerge.config import settings_differences

    def recorded(cfg: Scenario) -> dict:
        mapping = json.loads(json.dumps(cfg.to_mapping(), default=str))
        del mapping["privacy"]["gram_noise"]
        return mapping

    once, fresh = _user_level_text_lae(), _user_level_text_lae(gram_noise="per_release")
    assert settings_differences(recorded(once), fresh.to_mapping())[1] == []
    assert settings_differences(recorded(once), once.to_mapping())[1] == ["privacy.gram_noise"]
    # where the Gram mechanism does not run (another family, no DP, the domain unit) the setting is no difference
    sequential = Scenario.from_mapping({"privacy": {"enabled": True, "unit": "user", "noise_multiplier": 1.0}})
    no_dp = Scenario.from_mapping({"model": {"family": "text-lae", "params": {"lam": 10.0}}})
    domain_unit = Scenario.from_mapping({"model": {"family": "text-lae", "params": {"lam": 10.0}},
                                         "privacy": {"enabled": True, "noise_multiplier": 1.0}})
    for cfg in (sequential, no_dp, domain_unit):
        assert settings_differences(recorded(cfg), cfg.to_mapping())[1] == []
