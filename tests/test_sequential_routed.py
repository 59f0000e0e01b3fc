"""The routed item adapter: catalog-clustered experts, fixed at θ₀, so each domain trains only its own experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging import MergeRecConfig, merge
from fedmerge.merging.mergerec import mergerec
from fedmerge.models.sequential import (
    ResidualMLPAdapter,
    SequentialFamily,
    catalog_clusters,
    centroid_similarities,
    nearest_similarity,
    unseen_mix_weights,
)
from tests.test_sequential import cycle_domain

DIM = 8


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def blob(n_items: int, direction: int, seed: int) -> np.ndarray:
    """Unit text embeddings scattered around the basis vector ``direction``: one catalog's own region of text space."""
    rng = np.random.default_rng(seed)
    rows = 0.15 * rng.normal(size=(n_items, DIM)) + np.eye(DIM)[direction]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def routed_family(**params) -> SequentialFamily:
    defaults = dict(adapter="routed", n_experts=2, adapter_width=16, hidden=16, n_layers=1, n_heads=2, max_len=10,
                    dropout=0.0, batch_size=64, lr=5e-3, max_epochs=3, patience=3)
    return SequentialFamily(**{**defaults, **params})


def test_catalog_clusters_separate_catalogs_and_are_seeded():
    raw = np.concatenate([blob(40, 0, seed=0), blob(40, 3, seed=1)])
    centre, centroids = catalog_clusters(raw, n_clusters=2, seed=5)
    torch.testing.assert_close(centre, torch.from_numpy(raw.mean(0)))
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(2))
    expert_of = ((torch.from_numpy(raw) - centre) @ centroids.T).argmax(1)
    assert len(set(expert_of[:40].tolist())) == 1 and len(set(expert_of[40:].tolist())) == 1
    assert expert_of[0] != expert_of[40]
    again = catalog_clusters(raw, n_clusters=2, seed=5)
    torch.testing.assert_close(again[1], centroids)
    with pytest.raises(FedmergeError, match="distinct"):
        catalog_clusters(np.ones((5, DIM), dtype=np.float32), n_clusters=2, seed=0)
    with pytest.raises(FedmergeError, match="finite"):
        catalog_clusters(np.full((5, DIM), np.nan, dtype=np.float32), n_clusters=2, seed=0)


def test_routed_theta0_is_the_single_adapter_and_needs_the_catalogs():
    family = routed_family()
    feats = [family.item_features(blob(30, 0, seed=0)), family.item_features(blob(30, 4, seed=1))]
    assert family.feature_width(DIM) == 2 * DIM and feats[0].shape == (30, 2 * DIM)
    assert family.init_reads_catalogs
    with pytest.raises(FedmergeError, match="public catalogs"):
        family.initial_weights(2 * DIM, seed=0)
    with pytest.raises(FedmergeError, match="shapes"):
        family.initial_weights(2 * DIM, seed=0, catalog_features=[feats[0][:, :DIM]])
    theta0 = family.initial_weights(2 * DIM, seed=0, catalog_features=feats)
    module = family.load(theta0, 2 * DIM)
    single = ResidualMLPAdapter(DIM, 16, 16, dropout=0.0)
    single.load_state_dict(module.adapter.experts[1].state_dict())
    both = torch.cat(feats)
    with torch.no_grad():
        torch.testing.assert_close(module.item_representations(both), single(both[:, :DIM]))
    with pytest.raises(ValueError, match="encoder_layers"):
        routed_family(encoder_layers=1)


@pytest.mark.parametrize("unseen", ["none", "theta0"])
def test_text_similarity_routed_theta0_scores_as_the_single_adapters(unseen):
    """Every expert (and the frozen θ₀ expert) gets the same projection: the routed θ₀ scores as the mlp one."""
    common = dict(n_experts=2, adapter_width=16, hidden=16, n_layers=1, n_heads=2, max_len=10, dropout=0.0,
                  theta0_init="text_similarity")
    routed = SequentialFamily(adapter="routed", routed_unseen=unseen, routed_unseen_quantile=0.3, **common)
    single = SequentialFamily(adapter="mlp", **common)
    raw = np.concatenate([blob(30, 0, seed=0), blob(30, 4, seed=1)])
    feats = routed.item_features(raw)
    theta0 = routed.initial_weights(2 * DIM, seed=3, catalog_features=[feats])
    seqs = [np.array([1, 40, 2]), np.array([55])]
    expected = single.scorer(single.initial_weights(DIM, seed=3), single.item_features(raw))(seqs)
    np.testing.assert_allclose(routed.scorer(theta0, feats)(seqs), expected, atol=1e-5)


def test_each_domain_trains_only_its_own_experts_so_task_arithmetic_at_one_keeps_both():
    family = routed_family(max_epochs=4)
    domains = {"A": cycle_domain(n_items=20, n_users=80, seed=0, name="A"),
               "B": cycle_domain(n_items=20, n_users=80, seed=1, name="B")}
    feats = {"A": family.item_features(blob(20, 0, seed=2)), "B": family.item_features(blob(20, 5, seed=3))}
    theta0 = family.initial_weights(2 * DIM, seed=0, catalog_features=list(feats.values()))
    module = family.load(theta0, 2 * DIM)
    expert = {n: int(module.adapter.route(f[:, DIM:]).unique().item()) for n, f in feats.items()}
    assert expert["A"] != expert["B"]
    models = {n: family.train(theta0, domains[n], feats[n], seed=0, progress=False)[0] for n in domains}
    for n, other in (("A", "B"), ("B", "A")):
        prefix = f"adapter.experts.{expert[other]}."
        untouched = [k for k in theta0 if k.startswith(prefix)]
        assert untouched and all(torch.equal(models[n][k], theta0[k]) for k in untouched)
        moved = [k for k in theta0 if k.startswith(f"adapter.experts.{expert[n]}.")]
        assert any(not torch.equal(models[n][k], theta0[k]) for k in moved)
    merged = merge("task_arithmetic", theta0, models, scale=1.0)
    for n in domains:
        with torch.no_grad():
            ours = family.load(models[n], 2 * DIM).item_representations(feats[n])
            torch.testing.assert_close(family.load(merged, 2 * DIM).adapter(feats[n]), ours)


def test_mergerec_on_the_routed_family_frozen_item_side_matches_the_full_forward_at_the_first_step():
    family = routed_family()
    features = {d: family.item_features(blob(n, k, seed=k)) for d, n, k in (("a", 8, 0), ("b", 6, 3), ("c", 10, 6))}
    theta0 = family.initial_weights(2 * DIM, seed=0, catalog_features=list(features.values()))
    gen = torch.Generator().manual_seed(8)
    router = ("adapter.centre", "adapter.centroids")
    models = {d: {k: v if k in router else v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
              for d in features}
    config = dict(steps=15, lr=0.05, temperature=0.5, distill_weight=1.0, progress=False, granularity="layer",
                  pseudo_user_length=2, exclude_input_item=True, batch_size=64)  # 48 pseudo-users: full batches
    _, full = mergerec(family, theta0, models, features, MergeRecConfig(item_side="full", **config))
    merged, frozen = mergerec(family, theta0, models, features, MergeRecConfig(item_side="frozen", **config))
    assert frozen.loss_curve[0] == pytest.approx(full.loss_curve[0], rel=1e-4)
    assert frozen.loss_curve[-1] < frozen.loss_curve[0]
    for name in router:
        torch.testing.assert_close(merged[name], theta0[name])


@pytest.mark.parametrize("min_share, moves", [(0.05, False), (0.0, True)])
def test_an_expert_with_few_of_the_domains_items_stays_at_theta0(min_share, moves):
    family = routed_family(max_epochs=2, routed_min_share=min_share)
    raw = np.concatenate([blob(29, 0, seed=0), blob(1, 5, seed=1)])  # one item in the other catalog's region
    feats = family.item_features(raw)
    other = family.item_features(blob(30, 5, seed=2))
    theta0 = family.initial_weights(2 * DIM, seed=0, catalog_features=[feats, other])
    minor = family.load(theta0, 2 * DIM).adapter.minor_experts(feats, 0.05)
    assert len(minor) == 1
    weights, info = family.train(theta0, cycle_domain(n_items=30, n_users=60, seed=0), feats, seed=0, progress=False)
    names = [k for k in theta0 if k.startswith(f"adapter.experts.{minor[0]}.")]
    assert any(not torch.equal(weights[k], theta0[k]) for k in names) == moves
    assert info["frozen_experts"] == (0 if moves else 1)
    with pytest.raises(ValueError, match="routed_min_share"):
        routed_family(routed_min_share=1.0)


def test_unseen_items_fall_back_to_the_frozen_theta0_expert():
    family = routed_family(max_epochs=3, routed_unseen="theta0", routed_unseen_quantile=0.0)
    feats = {"A": family.item_features(blob(20, 0, seed=2)), "B": family.item_features(blob(20, 5, seed=3))}
    unseen = family.item_features(blob(20, 2, seed=4))  # a third region of text space: no trained expert's cluster
    theta0 = family.initial_weights(2 * DIM, seed=0, catalog_features=list(feats.values()))
    base = [k for k in theta0 if k.startswith("adapter.base.")]
    assert base and all(torch.equal(theta0[k], theta0[k.replace("base", "experts.0")]) for k in base)
    plain0 = routed_family(max_epochs=3).initial_weights(2 * DIM, seed=0, catalog_features=list(feats.values()))
    assert set(theta0) - set(plain0) == {*base, "adapter.unseen_threshold"}  # every other weight as without it
    assert all(torch.equal(plain0[k], theta0[k]) for k in plain0)
    adapter0 = family.load(theta0, 2 * DIM).adapter
    # quantile 0: the threshold is the least similarity of any training item, so every training item keeps its expert
    similarity = lambda f: nearest_similarity(f[:, DIM:], adapter0.centre, adapter0.centroids)  # noqa: E731
    threshold = float(theta0["adapter.unseen_threshold"])
    assert threshold == pytest.approx(float(similarity(torch.cat(list(feats.values()))).min()))
    assert float(similarity(unseen).max()) < threshold
    models = {n: family.train(theta0, cycle_domain(n_items=20, n_users=80, seed=i, name=n), feats[n], seed=0,
                              progress=False)[0] for i, n in enumerate(feats)}
    merged = merge("task_arithmetic", theta0, models, scale=1.0)
    assert all(torch.equal(models[n][k], theta0[k]) for n in models for k in base)  # never trained
    with torch.no_grad():
        torch.testing.assert_close(family.load(merged, 2 * DIM).adapter(unseen), adapter0(unseen))  # θ₀ on unseen
        # the training catalogs still use their trained experts
        assert not torch.allclose(family.load(merged, 2 * DIM).adapter(feats["A"]), adapter0(feats["A"]))
        # without the fallback the unseen items land in a trained expert
        plain = routed_family(max_epochs=3)
        trained = {k: v for k, v in merged.items() if not k.startswith("adapter.base.") and "unseen" not in k}
        assert not torch.allclose(plain.load(trained, 2 * DIM).adapter(unseen), adapter0(unseen))
    with pytest.raises(ValueError, match=r"valid: \['none', 'theta0', 'mix'\]"):
        routed_family(routed_unseen="nearest")


def test_mix_weights_sum_to_one_and_favour_the_theta0_expert():
    similarities = torch.tensor([[0.1, 0.3, -0.2], [0.0, 0.0, 0.0]])
    weights = unseen_mix_weights(similarities, torch.tensor(0.4), temperature=0.1)
    assert weights.shape == (2, 4)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert (weights.argmax(1) == 3).all()  # below the threshold: the θ₀ expert holds the largest weight
    torch.testing.assert_close(weights[0, 1] / weights[0, 3], torch.exp(torch.tensor((0.3 - 0.4) / 0.1)))
    cold = unseen_mix_weights(similarities, 0.4, temperature=1e-4)  # T -> 0: the hard θ₀ fallback
    torch.testing.assert_close(cold, torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="routed_mix_temperature"):
        routed_family(routed_unseen="mix", routed_mix_temperature=0.0)


def test_mix_routing_mixes_unseen_items_and_keeps_seen_items_hard():
    feats = {"A": blob(20, 0, seed=2), "B": blob(20, 5, seed=3)}
    unseen = blob(20, 2, seed=4)
    hard = routed_family(routed_unseen="theta0", routed_unseen_quantile=0.0)
    mix = routed_family(routed_unseen="mix", routed_unseen_quantile=0.0, routed_mix_temperature=0.2)
    catalogs = [hard.item_features(f) for f in feats.values()]
    theta0 = hard.initial_weights(2 * DIM, seed=0, catalog_features=catalogs)
    mix0 = mix.initial_weights(2 * DIM, seed=0, catalog_features=catalogs)
    assert set(theta0) == set(mix0) and all(torch.equal(theta0[k], mix0[k]) for k in theta0)
    trained = hard.train(theta0, cycle_domain(n_items=20, n_users=80, seed=0, name="A"), catalogs[0], seed=0,
                         progress=False)[0]
    by_hard, by_mix = hard.load(trained, 2 * DIM).adapter, mix.load(trained, 2 * DIM).adapter
    seen, far = torch.cat(catalogs), hard.item_features(unseen)
    with torch.no_grad():
        torch.testing.assert_close(by_mix(seen), by_hard(seen), rtol=0, atol=0)  # above the threshold: as before
        similarities = centroid_similarities(far[:, DIM:], by_mix.centre, by_mix.centroids)
        weights = unseen_mix_weights(similarities, by_mix.unseen_threshold, 0.2)
        outputs = torch.stack([e(far[:, :DIM]) for e in [*by_mix.experts, by_mix.base]], dim=1)  # (n, K + 1, d)
        torch.testing.assert_close(by_mix(far), (weights.unsqueeze(-1) * outputs).sum(1))
        assert not torch.allclose(by_mix(far), by_hard(far))  # the trained experts take part
        # at θ₀ every expert is θ₀'s: the mix is θ₀'s adapter on every item
        torch.testing.assert_close(mix.load(theta0, 2 * DIM).adapter(far), hard.load(theta0, 2 * DIM).adapter(far))


@pytest.mark.parametrize("unseen", ["none", "theta0", "mix"])
def test_dense_routing_equals_forward_in_every_unseen_mode(unseen):
    """RoutedAdapter.dense (the fixed-shape form user-level DP-SGD trains through) computes forward's values, also for
    items below the unseen threshold and with the mix."""
    feats = {"A": blob(20, 0, seed=2), "B": blob(20, 5, seed=3)}
    hard = routed_family(routed_unseen="theta0", routed_unseen_quantile=0.0)
    family = routed_family(routed_unseen=unseen, routed_unseen_quantile=0.0, routed_mix_temperature=0.2)
    catalogs = [family.item_features(f) for f in feats.values()]
    theta0 = hard.initial_weights(2 * DIM, seed=0, catalog_features=catalogs)
    trained = hard.train(theta0, cycle_domain(n_items=20, n_users=80, seed=0, name="A"), catalogs[0], seed=0,
                         progress=False)[0]
    if unseen == "none":
        trained = {k: v for k, v in trained.items() if not k.startswith("adapter.base.") and "unseen" not in k}
    adapter = family.load(trained, 2 * DIM).adapter
    items = torch.cat([*catalogs, family.item_features(blob(20, 2, seed=4))])  # seen and far items
    with torch.no_grad():
        torch.testing.assert_close(adapter.dense(items), adapter(items))
        torch.testing.assert_close(adapter.dense(items.view(3, 20, -1)), adapter(items).view(3, 20, -1))
