"""Distillation towards θ₀ on other public catalogs during local training (``model.params.theta0_distill``)."""

from __future__ import annotations

import pytest
import torch

from fedmerge.config import load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.models.base import tempered_kl
from fedmerge.models.theta0_distill import without_own_item
from fedmerge.runners.client import public_catalog_features
from tests.conftest import at_one_and_two_threads
from tests.test_sequential import DIM, cycle_domain, random_features, tiny_family


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def setting(**params):
    """A family, its θ₀, a small training domain with its features, and another catalog's features."""
    family = tiny_family(max_epochs=4, dropout=0.1, theta0_distill_candidates=32, theta0_distill_users=16, **params)
    theta0 = family.initial_weights(DIM, seed=0)
    domain = cycle_domain(n_items=30, n_users=80, seed=1)
    return family, theta0, domain, family.item_features(random_features(30, 2)), family.item_features(
        random_features(40, 3))


def pseudo_user_kl(family, weights, theta0, other: torch.Tensor) -> float:
    """θ₀-to-model KL of every one-item pseudo-user of ``other`` over its whole catalog, own item left out."""
    users = [torch.tensor([i]) for i in range(len(other))]
    student, teacher = (torch.from_numpy(family.scorer(w, other)(users)) for w in (weights, theta0))
    return float(tempered_kl(without_own_item(student), without_own_item(teacher), family.theta0_distill_temperature))


def test_without_own_item_drops_the_diagonal():
    logits = torch.arange(12.0).view(3, 4)
    torch.testing.assert_close(without_own_item(logits), torch.tensor([[1.0, 2, 3], [4, 6, 7], [8, 9, 11]]))


def test_beta_zero_trains_exactly_as_before_and_ignores_the_catalogs():
    family, theta0, domain, feats, other = setting()
    plain, _ = tiny_family(max_epochs=4, dropout=0.1).train(theta0, domain, feats, seed=0, progress=False)
    off, info = family.train(theta0, domain, feats, seed=0, progress=False, public_features=[other])
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert "theta0_kl" not in info["curve"][0] and not family.trains_on_public_catalogs


def test_distillation_pulls_pseudo_users_towards_theta0_and_is_thread_count_deterministic():
    family, theta0, domain, feats, other = setting(theta0_distill=50.0)
    assert family.trains_on_public_catalogs
    free, _ = setting()[0].train(theta0, domain, feats, seed=0, progress=False)
    (pulled, info), (again, _) = at_one_and_two_threads(
        lambda: family.train(theta0, domain, feats, seed=0, progress=False, public_features=[other]))
    assert all(torch.equal(pulled[k], again[k]) for k in pulled)
    assert info["curve"][-1]["theta0_kl"] >= 0
    assert pseudo_user_kl(family, pulled, theta0, other) < 0.5 * pseudo_user_kl(family, free, theta0, other)


def test_a_vanishing_beta_leaves_every_other_draw_of_training_as_it_was():
    """Building θ₀'s teacher and the model's dropout in the term drew from the global generator: β = 1e-30 moved
    the weights by 0.015 against β = 0 (other dropout masks), not by the term's vanishing gradient."""
    family, theta0, domain, feats, other = setting(theta0_distill=1e-30)
    off, _ = setting()[0].train(theta0, domain, feats, seed=0, progress=False, public_features=[other])
    tiny, _ = family.train(theta0, domain, feats, seed=0, progress=False, public_features=[other])
    assert all(torch.equal(off[k], tiny[k]) for k in off)


def test_theta0_tables_of_a_small_catalog_do_not_depend_on_the_thread_count():
    """θ₀'s tables were built at the process's thread count: a 5-item catalog's (5 rows) differ in the last bits
    between 1 and 2 threads, and so did the trained weights (1.5e-8)."""
    family, theta0, domain, feats, _ = setting(theta0_distill=1.0)
    small = family.item_features(random_features(5, 4))
    first, second = at_one_and_two_threads(
        lambda: family.train(theta0, domain, feats, seed=0, progress=False, public_features=[small])[0])
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_inputs_that_failed_only_after_an_epoch_are_named_at_once():
    """NaN item features ("scores contain NaN" after an epoch), a domain without validation users ("no users to
    evaluate" after an epoch) and a one-item public catalog (a reshape error) are named before training."""
    import dataclasses

    import numpy as np

    family, theta0, domain, feats, other = setting(theta0_distill=1.0)
    broken = feats.clone()
    broken[3, 0] = float("nan")
    with pytest.raises(FedmergeError, match="item features of domain .* hold NaN or infinite values"):
        family.train(theta0, domain, broken, seed=0, progress=False, public_features=[other])
    unvalidated = dataclasses.replace(domain, val_target=np.full_like(domain.val_target, -1))
    with pytest.raises(FedmergeError, match="has no validation user"):
        family.train(theta0, unvalidated, feats, seed=0, progress=False, public_features=[other])
    with pytest.raises(FedmergeError, match=r"public catalogs of 2 or more items; got catalog sizes \[1\]"):
        family.train(theta0, domain, feats, seed=0, progress=False, public_features=[other[:1]])


def test_bad_settings_name_the_key():
    for bad in ({"theta0_distill": -1.0}, {"theta0_distill": float("nan")}, {"theta0_distill_temperature": 0.0},
                {"theta0_distill_users": 0}, {"theta0_distill_candidates": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_family(**bad)
    family, theta0, domain, feats, other = setting(theta0_distill=1.0)
    with pytest.raises(FedmergeError, match="theta0_distill = 1.0"):
        family.train(theta0, domain, feats, seed=0, progress=False)
    with pytest.raises(FedmergeError, match="do not match"):
        family.train(theta0, domain, feats, seed=0, progress=False, public_features=[other[:, :4]])
    with pytest.raises(FedmergeError, match=r"theta0_distill = 2.*baselines.joint"):
        load_scenario("quickstart", ["model.params.theta0_distill=2.0"])


def test_a_client_gets_the_other_training_catalogs_only():
    cfg = load_scenario("quickstart", ["model.params.theta0_distill=2.0", "baselines.joint=false",
                                       'data.held_out=["synth-2"]'])
    names = cfg.data.training_domains()
    assert names == ["synth-0", "synth-1"]
    (features,) = public_catalog_features(cfg, "synth-0")
    expected = cfg.encoder.item_features(cfg.load_catalog("synth-1"), cfg.model.make_family())
    torch.testing.assert_close(features, expected)


def test_fedavg_rounds_distill_towards_theta0_not_the_rounds_model(monkeypatch, tmp_path):
    """A FedAvg round starts from the round's global model, and the teacher was built from the start: from round 2
    on the term distilled towards the previous round's aggregate, not θ₀ (amazon-unseen runs 2 rounds)."""
    from fedmerge.config import apply_overrides
    from fedmerge.models import theta0_distill
    from fedmerge.runners.inprocess import run_inprocess
    from fedmerge.runners.server import initial_weights
    from fedmerge.storage import weights_digest
    from tests.test_federation import TINY

    cfg = apply_overrides(load_scenario("quickstart", [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"]), [
        "model.params.theta0_distill=1.0", "baselines.joint=false", "baselines.fedavg_rounds=2",
        'merge.methods=["average"]', "model.params.theta0_distill_users=4", "model.params.theta0_distill_candidates=8"])
    teachers: list[str] = []
    real_init = theta0_distill.Theta0Distillation.__init__

    def spy(self, teacher, *args, **kwargs):
        teachers.append(weights_digest(teacher.state_dict()))
        real_init(self, teacher, *args, **kwargs)

    monkeypatch.setattr(theta0_distill.Theta0Distillation, "__init__", spy)
    results = run_inprocess(cfg, tmp_path / "run")
    assert results["status"] == "ok" and len(teachers) == 3 * 3  # 3 clients × (one-shot + 2 FedAvg rounds)
    assert len(set(teachers)) == 1  # every teacher is the one-shot round's: θ₀
    from fedmerge.runners.client import client_train

    domain = cfg.load_domain("synth-0")
    with pytest.raises(FedmergeError, match=r"FedAvg round 1: local training distills towards θ₀, which the train "
                                            r"request did not carry \('theta0'\)"):
        client_train(domain, initial_weights(cfg), cfg, round_index=1)


def test_a_deployed_client_gets_the_other_catalogs_from_the_server_not_from_the_scenarios_data_root(tmp_path):
    """A client read the other training domains' public catalogs from the scenario's data.root: the launcher's
    folder, absent on a data owner's machine, so every deployed client with theta0_distill failed to train. The
    server (which reads the public catalogs anyway) now sends their features with the train request."""
    import shutil

    from flwr.app import RecordDict

    from fedmerge.data.generic import save_generic_domain
    from fedmerge.runners import protocol
    from fedmerge.runners.client import ClientState
    from fedmerge.runners.server import Federation, initial_weights

    tiny = ["run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20", "encoder.name=hashing",
            "model.params.hidden=16", "model.params.n_layers=1", "model.params.max_epochs=1",
            "model.params.theta0_distill=1.0", "baselines.joint=false", f"encoder.cache_dir={tmp_path / 'cache'}"]
    synthetic = load_scenario("quickstart", tiny)
    root = tmp_path / "launcher"
    for name in synthetic.data.domain_names():
        save_generic_domain(synthetic.load_domain(name), root / name)
    owner = tmp_path / "owner" / "synth-0"
    shutil.copytree(root / "synth-0", owner)
    cfg = load_scenario("quickstart", [*tiny, 'data.source="generic"', f'data.root="{root}"',
                                       'data.domains=["synth-0", "synth-1", "synth-2"]'])
    theta0 = initial_weights(cfg)
    request = Federation(cfg, theta0).train_requests(theta0, protocol.PHASE_ONESHOT, 0)["synth-0"]
    sent = request.array_records[protocol.PUBLIC_FEATURES]
    family = cfg.model.make_family()
    for name in ("synth-1", "synth-2"):
        expected = cfg.encoder.item_features(cfg.load_catalog(name), family)
        assert torch.equal(torch.from_numpy(sent[name].numpy()), expected)
    assert list(sent) == ["synth-1", "synth-2"]  # not its own, no held-out catalog
    shutil.rmtree(root)  # as on a data owner's machine: the launcher's data root is not there
    client = ClientState(cfg, data_path=str(owner))
    reply = client.handle(protocol.TRAIN, request)
    assert protocol.WEIGHTS in reply.array_records
    without = RecordDict({k: v for k, v in request.items() if k != protocol.PUBLIC_FEATURES})
    with pytest.raises(FedmergeError, match=r"train request without the other training domains' public catalog "
                                            r"features \('public_features'\)"):
        client.handle(protocol.TRAIN, without)
