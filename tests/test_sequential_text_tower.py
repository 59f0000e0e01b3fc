"""The sequential family's encoder-tuning path (``encoder_layers > 0``) with the real MiniLM, on the CPU.

The path is meant for CUDA; these tests force ``device="cpu"`` on a 12-item catalog (seconds). The CUDA test runs
only where a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences
from fedmerge.errors import FedmergeError
from fedmerge.merging import MergeRecConfig
from fedmerge.merging.mergerec import mergerec
from fedmerge.models.base import stack_item_features
from fedmerge.models.sequential import SequentialFamily, standardize_features
from fedmerge.text import SentenceEncoder

TITLES = ["red lipstick", "blue nail polish with glitter", "face cream", "wooden toy train set for kids", "puzzle",
          "green tea", "dark roast coffee beans, whole", "pasta", "olive oil extra virgin cold pressed", "doll",
          "shampoo for dry hair", "lego bricks"]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def text_domain(titles: list[str], seed: int, name: str) -> Domain:
    """Item i is followed by item (i + 1) mod n; titles are real short product texts."""
    rng = np.random.default_rng(seed)
    n = len(titles)
    train, val, test = [], [], []
    for _ in range(40):
        seq = (int(rng.integers(n)) + np.arange(int(rng.integers(3, 7)) + 2)) % n
        train.append(seq[:-2])
        val.append(seq[-2])
        test.append(seq[-1])
    catalog = ItemCatalog(ids=tuple(f"{name}{i}" for i in range(n)), fields=tuple({"title": t} for t in titles))
    return Domain(name, catalog, as_sequences(train), np.array(val), np.array(test))


def family(**params) -> SequentialFamily:
    defaults = dict(hidden=32, n_layers=1, n_heads=2, max_len=8, dropout=0.0, batch_size=32, lr=5e-3,
                    max_epochs=2, patience=5, encoder_layers=1, device="cpu", encoder_lr=1e-3)
    return SequentialFamily(**{**defaults, **params})


def no_embeddings() -> np.ndarray:
    raise AssertionError("the encoder-tuning path must read texts, not cached embeddings")


def test_tower_at_theta0_reproduces_the_standardized_sentence_embeddings():
    domain = text_domain(TITLES, 0, "a")
    fam = family()
    features = fam.catalog_features(domain.catalog, no_embeddings)
    assert features.ndim == 3 and features.shape[0] == len(TITLES) and features.shape[2] == 384
    module = fam.build(384).eval()
    with torch.no_grad():
        text = module.text_embeddings(features)
    expected = standardize_features(SentenceEncoder(progress=False).encode(domain.catalog.texts()))
    np.testing.assert_allclose(text.numpy(), expected, atol=2e-4)


def test_theta0_scores_equal_the_cached_embedding_path():
    domain = text_domain(TITLES, 0, "a")
    tuned, cached = family(), family(encoder_layers=0)
    theta_tuned, theta_cached = tuned.initial_weights(384, seed=3), cached.initial_weights(384, seed=3)
    assert any(name.startswith("text_tower.") for name in theta_tuned)
    for name, tensor in theta_cached.items():
        torch.testing.assert_close(theta_tuned[name], tensor)
    seqs = [np.array([0, 1, 2]), np.array([5])]
    tuned_scores = tuned.scorer(theta_tuned, tuned.catalog_features(domain.catalog, no_embeddings))(seqs)
    embeddings = SentenceEncoder(progress=False).encode(domain.catalog.texts())
    cached_scores = cached.scorer(theta_cached, cached.item_features(embeddings))(seqs)
    np.testing.assert_allclose(tuned_scores, cached_scores, atol=1e-3)


def test_training_moves_the_tuned_layers_and_is_deterministic():
    domain = text_domain(TITLES, 0, "a")
    fam = family()
    features = fam.catalog_features(domain.catalog, no_embeddings)
    theta0 = fam.initial_weights(384)
    first, info = fam.train(theta0, domain, features, seed=1, progress=False)
    second, _ = fam.train(theta0, domain, features, seed=1, progress=False)
    assert info["epochs"] == 2 and info["curve"][-1]["loss"] <= info["curve"][0]["loss"]
    tower = [name for name in theta0 if name.startswith("text_tower.")]
    assert max(float((first[n] - theta0[n]).abs().max()) for n in tower) > 0
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    groups = fam.parameter_groups(list(theta0))
    assert "text_tower.0" in groups and all(n.startswith("text_tower.layers.0.") for n in groups["text_tower.0"])


def test_sampled_loss_over_the_whole_catalog_is_the_full_loss_with_a_text_tower():
    from fedmerge.models.sequential import training_windows

    domain = text_domain(TITLES, 0, "a")
    full, sampled = family(), family(n_negatives=len(TITLES))
    features = full.catalog_features(domain.catalog, no_embeddings)
    module = full.load(full.initial_weights(384), 384)
    with torch.no_grad():
        cache = module.text_embeddings(features)
    windows = training_windows(domain.train, full.max_len)
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sampled._batch_loss(module, windows, features, generator, cache),
                               full._batch_loss(module, windows, features, generator, cache))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_tuning_without_cuda_refuses_unless_the_cpu_is_asked_for():
    domain = text_domain(TITLES, 0, "a")
    fam = family(device=None)
    features = fam.catalog_features(domain.catalog, no_embeddings)
    with pytest.raises(FedmergeError, match="CUDA"):
        fam.train(fam.initial_weights(384), domain, features, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_runs_on_cuda():
    domain = text_domain(TITLES, 0, "a")
    fam = family(device=None)
    features = fam.catalog_features(domain.catalog, no_embeddings)
    theta0 = fam.initial_weights(384)
    weights, _ = fam.train(theta0, domain, features, seed=1, progress=False)
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in weights.values())
    assert any(not torch.equal(weights[n], theta0[n]) for n in theta0 if n.startswith("text_tower."))


def test_stack_item_features_zero_pads_the_token_axis():
    short, long = torch.ones(2, 3, 4), torch.full((1, 5, 4), 2.0)
    stacked = stack_item_features([short, long])
    assert stacked.shape == (3, 5, 4)
    assert torch.equal(stacked[:2, :3], short) and stacked[:2, 3:].abs().sum() == 0
    assert stack_item_features([torch.ones(2, 4), torch.zeros(1, 4)]).shape == (3, 4)


def test_mergerec_merges_tuned_text_layers_of_catalogs_with_different_text_lengths():
    fam = family(max_epochs=1)
    halves = {"a": text_domain(TITLES[:6], 0, "a"), "b": text_domain([t + " deluxe edition" for t in TITLES[6:]], 1, "b")}
    features = {d: fam.catalog_features(dom.catalog, no_embeddings) for d, dom in halves.items()}
    assert features["a"].shape[1] != features["b"].shape[1]
    theta0 = fam.initial_weights(384)
    models = {d: fam.train(theta0, dom, features[d], seed=0, progress=False)[0] for d, dom in halves.items()}
    config = MergeRecConfig(granularity="layer", item_side="frozen", steps=5, batch_size=4, progress=False)
    merged, report = mergerec(fam, theta0, models, features, config)
    assert "text_tower.0" in report.groups
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert report.coefficients["a"]["text_tower.0"] != report.initial_coefficient


def test_theta0_distillation_takes_public_catalogs_whose_texts_are_longer_or_shorter():
    """θ₀ distillation checked every public catalog's feature shape against the domain's whole shape: with tuned
    text layers the token axis T is each catalog's own longest text, so training always refused. Each catalog is
    distilled on its own (its own items and θ₀ tables), so only the layout (token features) and the width count."""
    from fedmerge.models.sequential import token_features

    domain = text_domain(TITLES, 0, "a")
    fam = family(max_epochs=1, theta0_distill=1.0, theta0_distill_candidates=4, theta0_distill_users=2)
    features = fam.catalog_features(domain.catalog, no_embeddings)
    rng = np.random.default_rng(0)
    tokens = features.shape[1] - 2
    others = [token_features(rng.standard_normal((n, 384)), rng.standard_normal((n, t, 384)).astype(np.float32))
              for n, t in ((5, tokens + 3), (4, 1))]  # a longer and a shorter longest text than the domain's
    theta0 = fam.initial_weights(384)
    weights, info = fam.train(theta0, domain, features, seed=0, progress=False, public_features=others)
    assert info["curve"][-1]["theta0_kl"] >= 0 and all(torch.isfinite(t).all() for t in weights.values())
    for bad in (others[0][:, 2], others[0][..., :383]):  # cached embeddings, another width: still refused
        with pytest.raises(FedmergeError, match="do not match the domain's item features"):
            fam.train(theta0, domain, features, seed=0, progress=False, public_features=[bad])
