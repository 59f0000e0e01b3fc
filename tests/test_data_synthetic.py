"""Synthetic generator: determinism, shape, shared topic vocabulary, learnable sequential signal."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedmerge.data.domain import interaction_matrix
from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.metrics import evaluate_scorer


def _full_sequences(domain):
    return [np.concatenate([t, [v, s]]) for t, v, s in zip(domain.train, domain.val_target, domain.test_target)]


def test_deterministic_under_seed_and_seed_matters():
    a = make_synthetic_domains(n_domains=2, n_users=50, n_items=40, seed=7)
    b = make_synthetic_domains(n_domains=2, n_users=50, n_items=40, seed=7)
    c = make_synthetic_domains(n_domains=2, n_users=50, n_items=40, seed=8)
    for x, y in zip(a, b):
        assert x.catalog == y.catalog and x.user_ids == y.user_ids
        assert all(np.array_equal(s, t) for s, t in zip(_full_sequences(x), _full_sequences(y)))
    assert a[0].catalog.texts() != c[0].catalog.texts()


def test_shapes_names_ids_and_lengths(synthetic_domains):
    assert [d.name for d in synthetic_domains] == ["synth-0", "synth-1", "synth-2"]
    id_sets = [set(d.catalog.ids) for d in synthetic_domains]
    assert all(len(ids) == 60 for ids in id_sets)
    assert not id_sets[0] & id_sets[1] and not id_sets[1] & id_sets[2]
    for d in synthetic_domains:
        assert d.n_users == 120 and len(set(d.user_ids)) == 120
        lengths = np.array([len(s) for s in _full_sequences(d)])
        assert lengths.min() >= 4 and lengths.max() <= 20
        assert (d.val_target >= 0).all() and (d.test_target >= 0).all()


def test_topic_vocabulary_is_shared_across_domains(synthetic_domains):
    """Title words (minus the shared filler pool) overlap across domains: same topics, same vocabulary."""
    vocab = [{w.lower() for f in d.catalog.fields for w in f["title"].split()} for d in synthetic_domains]
    overlap = len(vocab[0] & vocab[1]) / len(vocab[0] | vocab[1])
    assert overlap > 0.8
    brands = [{f["brand"] for f in d.catalog.fields} for d in synthetic_domains]
    assert not brands[0] & brands[1]  # brands are per domain


def test_next_item_is_learnable_beyond_popularity(synthetic_domains):
    """A last-item co-occurrence scorer beats popularity on the test split (sequential signal exists)."""
    for d in synthetic_domains:
        x = interaction_matrix(d.train_with_val(), d.n_items)
        popularity = np.asarray(x.sum(axis=0)).ravel()
        cooc = np.asarray((x.T @ x).todense())
        pop_r = evaluate_scorer(lambda seqs: np.tile(popularity, (len(seqs), 1)), d, "test")["recall@10"]
        cooc_r = evaluate_scorer(lambda seqs: np.stack([cooc[s[-1]] + 1e-3 * popularity for s in seqs]), d, "test")[
            "recall@10"
        ]
        assert cooc_r > pop_r


def test_default_size_is_fast():
    make_synthetic_domains()
    start = time.perf_counter()
    make_synthetic_domains()
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("kwargs", [{"min_len": 2}, {"min_len": 5, "max_len": 4}, {"n_items": 3, "n_topics": 8}])
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        make_synthetic_domains(**kwargs)


def test_more_topics_than_the_pseudo_word_space_holds_are_refused():
    """n_topics = 52,000 passed the checks and the word draw never ended (its words exceed the 518,400 the
    generator can form)."""
    from fedmerge.data.synthetic import MAX_TOPICS

    with pytest.raises(ValueError, match=f"need n_topics <= {MAX_TOPICS}"):
        make_synthetic_domains(n_domains=1, n_users=1, n_items=52_000, n_topics=52_000, min_len=3, max_len=3)
