"""θ₀ pretrained on pseudo-users of the public catalogs (fedmerge.runners.pretrain)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.data.domain import ItemCatalog
from fedmerge.models.sequential import SequentialFamily
from fedmerge.errors import FedmergeError
from fedmerge.metrics import evaluate_scorer
from fedmerge.runners.pretrain import pseudo_domain, pseudo_sequences
from fedmerge.runners.server import FINGERPRINT_KEY, fingerprint_metadata, initial_weights
from tests.test_federation import TINY


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def catalog(brands: list[str]) -> ItemCatalog:
    return ItemCatalog(ids=tuple(f"i{i}" for i in range(len(brands))),
                       fields=tuple({"title": f"item {i}", "brand": b} for i, b in enumerate(brands)))


def test_pseudo_sequences_stay_within_a_brand_and_are_seeded():
    brands = ["A", "b", "A", "", "B", "a", "C", "C", "B", "A"]  # groups: a (4 items), b (3), c (2: too small)
    seqs = pseudo_sequences(catalog(brands), "brand", length=3, per_item=2, rng=np.random.default_rng(0))
    assert len(seqs) == 2 * (4 + 3)
    for s in seqs:
        assert len(s) == 3 and len(set(s.tolist())) == 3 and len({brands[i].lower() for i in s}) == 1
    again = pseudo_sequences(catalog(brands), "brand", length=3, per_item=2, rng=np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(seqs, again))
    assert {int(s[0]) for s in seqs} == {0, 1, 2, 4, 5, 8, 9}


def test_pseudo_domain_offsets_each_catalog_into_the_stack():
    first, second = catalog(["x"] * 4), catalog(["y"] * 3 + ["z"])
    domain = pseudo_domain({"d0": first, "d1": second}, "brand", length=5, per_item=1, seed=0)
    assert domain.n_items == 8 and domain.n_users == 4 + 3
    full = [np.append(s, t) for s, t in zip(domain.train, domain.val_target)]
    assert sorted(len(s) for s in full) == [3, 3, 3, 4, 4, 4, 4]
    assert all(set(s.tolist()) <= set(range(4)) or set(s.tolist()) <= {4, 5, 6} for s in full)
    with pytest.raises(FedmergeError, match="group_by"):
        pseudo_domain({"d0": catalog(["x", "y", "z"])}, "brand", length=5, per_item=1, seed=0)


def test_pretrained_theta0_learns_the_pseudo_users_and_changes_the_fingerprint(tmp_path):
    cfg = load_scenario("quickstart", [*TINY, f"encoder.cache_dir={tmp_path}", "model.params.max_epochs=3",
                                       'data.held_out=["synth-2"]'])
    pretrained_cfg = apply_overrides(cfg, ["theta0.pretrain=true"])
    plain, pretrained = initial_weights(cfg), initial_weights(pretrained_cfg)
    assert set(plain) == set(pretrained) and any(not torch.equal(plain[k], pretrained[k]) for k in plain)
    behaviour = apply_overrides(pretrained_cfg, ["model.params.last_item_bias=true", "model.params.history_bias=true",
                                                 "model.params.history_pooling=2",
                                                 "model.params.repeat_user_bias=true",
                                                 'model.params.adapter="routed"',
                                                 "model.params.last_item_text_bias=true"])
    kept = initial_weights(behaviour)  # pseudo-users' re-buying and recency are made up: θ₀'s zeros stay
    assert [kept[n].abs().sum().item() for n in SequentialFamily.behaviour_parameters] == [0, 0, 0, 0, 0]
    assert any(not torch.equal(initial_weights(apply_overrides(behaviour, ["theta0.pretrain=false"]))[k], kept[k])
               for k in kept)
    assert fingerprint_metadata(cfg)[FINGERPRINT_KEY] != fingerprint_metadata(pretrained_cfg)[FINGERPRINT_KEY]
    family = cfg.model.make_family()
    catalogs = {d: cfg.load_catalog(d) for d in cfg.data.training_domains()}  # the held-out catalog is not read
    domain = pseudo_domain(catalogs, "brand", 5, 1, seed=0)
    features = torch.cat([cfg.encoder.item_features(c, family) for c in catalogs.values()])
    ndcg = [evaluate_scorer(family.scorer(w, features), domain, "val", ks=(10,))["ndcg@10"] for w in (plain, pretrained)]
    assert ndcg[1] > ndcg[0]
    with pytest.raises(FedmergeError, match="theta0.length"):
        apply_overrides(cfg, ["theta0.length=2"])
