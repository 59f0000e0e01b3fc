"""Tests of the text-based sequential family on tiny hand-built domains (seconds on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences
from fedmerge.errors import FedmergeError
from fedmerge.metrics import evaluate_scorer
from fedmerge.models import get_family
from fedmerge.models.base import pad_sequences
from fedmerge.models.sequential import (
    SequentialFamily,
    TextSASRec,
    first_earlier,
    recent_first,
    repeats_an_item,
    sampled_softmax_loss,
    standardize_features,
    token_features,
    training_windows,
)
from fedmerge.validation import task_vector_norm
from tests.conftest import at_one_and_two_threads

DIM = 16


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def cycle_domain(n_items: int, n_users: int, seed: int, name: str = "cycle") -> Domain:
    """Each item i is always followed by item (i + 1) mod n: a perfectly learnable next-item rule."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for _ in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(3, 9))
        seq = (start + np.arange(length + 2)) % n_items
        train.append(seq[:-2])
        val.append(seq[-2])
        test.append(seq[-1])
    catalog = ItemCatalog(ids=tuple(f"i{i}" for i in range(n_items)), fields=tuple({"title": f"item {i}"} for i in range(n_items)))
    return Domain(name, catalog, as_sequences(train), np.array(val), np.array(test))


def random_features(n_items: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_items, DIM)).astype(np.float32)


def tiny_family(**params) -> SequentialFamily:
    defaults = dict(hidden=32, n_layers=1, n_heads=2, max_len=10, dropout=0.0, n_experts=2, batch_size=64,
                    lr=5e-3, max_epochs=30, patience=30)
    return SequentialFamily(**{**defaults, **params})


def test_standardize_features_is_columnwise_zscore():
    raw = np.random.default_rng(0).normal(3.0, 2.0, size=(50, 4))
    z = standardize_features(raw)
    expected = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        standardize_features(np.array([[np.nan, 1.0]]))


@pytest.mark.parametrize("family", ["plain", "routed", "text-lae"])
def test_rows_after_statistics_rows_are_featurized_as_items_of_that_catalog(family):
    """Texts a user gives join a catalog as extra rows: with ``statistics_rows`` the catalog's statistics (z-score,
    centring) come from its own items, so its rows' features are those of the catalog alone and an extra row's do
    not depend on the other extra rows."""
    from fedmerge.models.text_lae import TextLAEFamily

    rng = np.random.default_rng(0)
    catalog, extra = rng.normal(1.0, 2.0, size=(20, 6)), rng.normal(-4.0, 9.0, size=(7, 6))
    made = {"plain": lambda: SequentialFamily(), "routed": lambda: SequentialFamily(adapter="routed"),
            "text-lae": lambda: TextLAEFamily()}[family]()
    alone = made.item_features(catalog)
    both = made.item_features(np.vstack([catalog, extra]), statistics_rows=20)
    torch.testing.assert_close(both[:20], alone)
    torch.testing.assert_close(made.item_features(np.vstack([catalog, extra[:1]]), statistics_rows=20)[20], both[20])
    assert not torch.allclose(made.item_features(np.vstack([catalog, extra]))[:20], alone)  # all rows: shifted
    states = rng.normal(size=(27, 3, 6))
    tokens = token_features(np.vstack([catalog, extra]), states, statistics_rows=20)
    torch.testing.assert_close(tokens[:20], token_features(catalog, states[:20]))


def test_a_family_whose_item_features_takes_the_embeddings_alone_still_featurizes_catalogs():
    """statistics_rows was passed to every family's item_features: a plugin written as the README shows
    (item_features(self, embeddings)) failed on every run with a TypeError."""
    from fedmerge.data.domain import ItemCatalog
    from fedmerge.models.text_lae import TextLAEFamily

    class OneArgument(TextLAEFamily):
        def item_features(self, embeddings):  # noqa: ANN001, ANN202 - a plugin's signature, as written before
            return torch.as_tensor(embeddings, dtype=torch.float32)

    embeddings = np.arange(12, dtype=np.float32).reshape(4, 3)
    catalog = ItemCatalog(ids=("a", "b", "c", "d"), fields=tuple({"title": t} for t in "abcd"))
    torch.testing.assert_close(OneArgument().catalog_features(catalog, lambda: embeddings), torch.from_numpy(embeddings))
    with pytest.raises(FedmergeError, match="its item_features takes no statistics_rows"):
        OneArgument().catalog_features(catalog, lambda: embeddings, statistics_rows=3)


def test_training_windows_cover_every_transition_once():
    seq = np.arange(23)
    windows = training_windows([seq, np.array([5])], max_len=10)
    transitions = sorted((int(a), int(b)) for w in windows for a, b in zip(w[:-1], w[1:]))
    assert transitions == [(i, i + 1) for i in range(22)]
    assert max(len(w) for w in windows) == 11


@pytest.mark.parametrize("adapter", ["mlp", "linear"])
def test_learns_deterministic_successor_and_loss_falls(adapter):
    domain = cycle_domain(n_items=30, n_users=200, seed=0)
    family = tiny_family(adapter=adapter)
    feats = family.item_features(random_features(30, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    weights, info = family.train(theta0, domain, feats, seed=0, progress=False)
    losses = [row["loss"] for row in info["curve"]]
    assert losses[-1] < 0.5 * losses[0]
    val = evaluate_scorer(family.scorer(weights, feats), domain, "val")
    assert val["recall@10"] >= 0.95
    assert info["best_val_ndcg@10"] == pytest.approx(val["ndcg@10"])


def test_mlp_adapter_starts_as_linear_whitening():
    family = tiny_family(adapter="mlp", adapter_width=16)
    module = family.load(family.initial_weights(DIM, seed=3), DIM).eval()
    feats = family.item_features(random_features(12, 0))
    with torch.no_grad():
        torch.testing.assert_close(module.item_representations(feats), module.adapter.whitening(feats))
        assert module.adapter.mlp(feats).abs().max() == 0


@pytest.mark.parametrize("adapter", ["linear", "mlp", "moe"])
@pytest.mark.parametrize("hidden", [8, 32])
def test_text_similarity_theta0_scores_by_the_last_items_text_cosine(adapter, hidden):
    """s_i = cos(centred(W z_last), W z_i) / τ with W semi-orthogonal, whatever came before the last item."""
    family = tiny_family(adapter=adapter, hidden=hidden, n_layers=2, temperature=0.1, theta0_init="text_similarity")
    weights = family.initial_weights(DIM, seed=2)
    w = next(v for k, v in weights.items() if k.endswith("projection.weight")).double()
    eye = torch.eye(min(hidden, DIM), dtype=torch.float64)
    torch.testing.assert_close(w @ w.T if hidden <= DIM else w.T @ w, eye)
    feats = family.item_features(random_features(12, 0))
    items = feats.double() @ w.T
    seqs = [np.array([1, 2, 3]), np.array([7, 3]), np.array([3])]
    scores = family.scorer(weights, feats)(seqs)
    last = items[3] - items[3].mean()
    expected = (F.normalize(last, dim=0) @ F.normalize(items, dim=1).T / 0.1).numpy()
    np.testing.assert_allclose(scores, np.broadcast_to(expected, scores.shape), atol=1e-4)


def test_text_similarity_theta0_trains_every_parameter_and_differs_by_seed():
    domain = cycle_domain(n_items=30, n_users=200, seed=0)
    family = tiny_family(n_layers=2, max_epochs=2, theta0_init="text_similarity")
    feats = family.item_features(random_features(30, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    zeroed = [k for k, v in theta0.items() if v.abs().max() == 0 and not k.endswith(("bias", "centre", "mlp.2.weight"))]
    assert "position.weight" in zeroed and "blocks.1.ffn.3.weight" in zeroed
    weights, _ = family.train(theta0, domain, feats, seed=0, progress=False)
    assert all(weights[k].abs().max() > 0 for k in zeroed)
    other = family.initial_weights(DIM, seed=1)
    assert not torch.equal(theta0["adapter.whitening.projection.weight"], other["adapter.whitening.projection.weight"])
    with pytest.raises(ValueError, match="unknown theta0_init 'pca'; valid: \\['random', 'text_similarity'\\]"):
        tiny_family(theta0_init="pca")


@pytest.mark.parametrize("n_negatives", [None, 8])
def test_last_item_bias_offsets_only_the_last_items_score_and_is_learned(n_negatives):
    domain = cycle_domain(n_items=30, n_users=200, seed=0)  # the next item is never the last one
    family = tiny_family(last_item_bias=True, n_negatives=n_negatives, max_epochs=3, theta0_init="text_similarity",
                         temperature=0.5)
    feats = family.item_features(random_features(30, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    assert float(theta0["last_item_bias"]) == 0.0
    assert family.parameter_groups(theta0)["last_item_bias"] == ["last_item_bias"]
    seqs = [np.array([4, 9, 2]), np.array([7])]
    plain = tiny_family(theta0_init="text_similarity", temperature=0.5).scorer(
        {k: v for k, v in theta0.items() if k != "last_item_bias"}, feats)(seqs)
    shifted = {**theta0, "last_item_bias": torch.tensor(-2.0)}
    expected = plain.copy()
    expected[0, 2] -= 2.0 / 0.5  # b in cosine units, divided by τ like the cosine
    expected[1, 7] -= 2.0 / 0.5
    np.testing.assert_allclose(family.scorer(shifted, feats)(seqs), expected, atol=1e-5)
    module = family.load(shifted, DIM)  # the module's own forward (ModelFamily.scorer's path) agrees
    with torch.no_grad():
        np.testing.assert_allclose(module(pad_sequences(seqs, family.max_len), feats).numpy(), expected, atol=1e-5)
    weights, _ = family.train(theta0, domain, feats, seed=0, progress=False)
    assert float(weights["last_item_bias"]) < -0.01


def test_recent_first_and_first_earlier_follow_their_definitions():
    inputs = torch.tensor([[-1, 3, 5, 3], [7, 7, 2, 9]])
    history = recent_first(inputs)
    assert history[0].tolist() == [[-1, -1, -1, -1], [3, -1, -1, -1], [5, 3, -1, -1], [3, 5, 3, -1]]
    assert history[1, 3].tolist() == [9, 2, 7, 7]
    rows = torch.tensor([[3, 5, 3, -1], [9, 2, 7, 7], [4, 4, 1, 4]])
    # k >= 1 kept when not PAD and equal to none of history[:, :k]
    assert first_earlier(rows).tolist() == [[True, False, False], [True, True, False], [False, True, False]]


def assert_offsets_everywhere(family, weights, feats, seqs, expected, targets, negatives) -> None:
    """The family's scorer and the module's forward give ``expected``; the sampled softmax's offsets of ``targets``
    and the shared ``negatives`` are the full ones at those columns."""
    np.testing.assert_allclose(family.scorer(weights, feats)(seqs), expected, atol=1e-5)
    module = family.load(weights, feats.shape[1])
    with torch.no_grad():
        np.testing.assert_allclose(module(pad_sequences(seqs, family.max_len), feats).numpy(), expected, atol=1e-5)
        history = pad_sequences(seqs, family.max_len).flip(1)
        last_text = module.last_item_text(feats, history)
        full = module.with_history_bias(torch.zeros(len(seqs), len(feats)), history, last_text)
        rows = len(seqs)
        positive, negative = module.with_sampled_history_bias(torch.zeros(rows), torch.zeros(rows, len(negatives)),
                                                              targets, negatives, history, last_text)
        torch.testing.assert_close(positive, full.gather(1, targets.unsqueeze(1)).squeeze(1))
        torch.testing.assert_close(negative, full[:, negatives])
        # the offsets take the scores' dtype (a bf16 score matrix stays bf16)
        half = module.with_history_bias(torch.zeros(rows, len(feats), dtype=torch.bfloat16), history, last_text)
        torch.testing.assert_close(half, full.to(torch.bfloat16))
        sampled = module.with_sampled_history_bias(torch.zeros(rows, dtype=torch.bfloat16),
                                                   torch.zeros(rows, len(negatives), dtype=torch.bfloat16),
                                                   targets, negatives, history, last_text)
        assert [t.dtype for t in sampled] == [torch.bfloat16] * 2


@pytest.mark.parametrize("n_negatives", [None, 8])
def test_last_item_text_bias_adds_v_dot_the_last_items_unit_raw_text_embedding_everywhere(n_negatives):
    """b(i) = b + v·x̂_i on the last item's score, x̂_i the unit raw embedding (second half of the routed features),
    in the scorer, the forward and the sampled softmax; refused without last_item_bias or the routed adapter, and
    without the last items' features."""
    params = dict(adapter="routed", theta0_init="text_similarity", temperature=0.5, n_negatives=n_negatives)
    family = tiny_family(last_item_bias=True, last_item_text_bias=True, **params)
    raw = random_features(30, 1)
    feats = family.item_features(raw)
    theta0 = family.initial_weights(feats.shape[1], seed=0, catalog_features=[feats])
    assert theta0["last_item_text_bias"].tolist() == [0.0] * DIM
    assert family.parameter_groups(theta0)["last_item_text_bias"] == ["last_item_text_bias"]
    seqs = [np.array([4, 9, 2]), np.array([7]), np.array([3, 3])]
    plain = tiny_family(**params).scorer({k: v for k, v in theta0.items() if k not in
                                          ("last_item_bias", "last_item_text_bias")}, feats)(seqs)
    np.testing.assert_allclose(family.scorer(theta0, feats)(seqs), plain, atol=1e-5)  # θ₀: no offset at all
    v = torch.linspace(-1.0, 2.0, DIM)
    shifted = {**theta0, "last_item_bias": torch.tensor(-0.5), "last_item_text_bias": v}
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    expected = plain.copy()
    for row, last in enumerate((2, 7, 3)):
        expected[row, last] += (-0.5 + float(unit[last] @ v.numpy())) / 0.5
    assert_offsets_everywhere(family, shifted, feats, seqs, expected, torch.tensor([2, 7, 5]),
                              torch.tensor([2, 4, 9, 11, 7, 3]))
    module = family.load(shifted, feats.shape[1])
    if n_negatives is None:  # the training loss: the forward's cross-entropy at every prefix of each window
        windows = [np.array([4, 9, 2, 2, 5]), np.array([7, 3])]
        prefixes = [(w[: t + 1], w[t + 1]) for w in windows for t in range(len(w) - 1)]
        with torch.no_grad():
            scores = torch.cat([module(pad_sequences([p], family.max_len), feats) for p, _ in prefixes])
            expected_loss = F.cross_entropy(scores, torch.tensor([int(t) for _, t in prefixes]))
            torch.testing.assert_close(family._batch_loss(module, windows, feats, torch.Generator()), expected_loss)
    with pytest.raises(ValueError, match="last_item_text_bias needs the features of each row's last item"):
        module.with_history_bias(torch.zeros(1, 30), torch.tensor([[2]]))
    # with repeat_user_bias, a user whose history repeats an item keeps b_r alone: a merge of domains whose users
    # never repeat (b_r = 0 there, v learned from the others) scores such users' last item as θ₀ does
    repeat = tiny_family(last_item_bias=True, history_bias=True, repeat_user_bias=True, last_item_text_bias=True,
                         **params)
    weights = {**repeat.initial_weights(feats.shape[1], seed=0, catalog_features=[feats]),
               "last_item_bias": torch.tensor(-0.5), "last_item_text_bias": v}
    expected[2, 3] = plain[2, 3]  # row 2 ([3, 3]) repeats item 3: b_r = 0, no text offset
    np.testing.assert_allclose(repeat.scorer(weights, feats)(seqs), expected, atol=1e-5)
    for bad in (dict(last_item_bias=False, adapter="routed"), dict(last_item_bias=True, adapter="mlp")):
        with pytest.raises(ValueError, match="last_item_text_bias adds v·x̂ .* needs last_item_bias on and "
                                             "adapter='routed'"):
            tiny_family(last_item_text_bias=True, **bad)


def rebuy_domain(n_items: int, n_users: int, seed: int) -> tuple[Domain, np.ndarray]:
    """Items 0..n/2-1 ("groceries", raw text shifted along one direction) are bought twice in a row, then the user
    moves on; the other items ("toys", shifted the other way) follow a cycle and are never bought again. Returns the
    domain and its raw text embeddings."""
    rng = np.random.default_rng(seed)
    half = n_items // 2
    train, val, test = [], [], []
    for user in range(n_users):
        length = int(rng.integers(3, 9)) + 2
        if user % 2:
            seq = (int(rng.integers(half)) + np.arange(length) // 2) % half
        else:
            seq = half + (int(rng.integers(half)) + np.arange(length)) % half
        train.append(seq[:-2])
        val.append(seq[-2])
        test.append(seq[-1])
    catalog = ItemCatalog(ids=tuple(f"i{i}" for i in range(n_items)),
                          fields=tuple({"title": f"item {i}"} for i in range(n_items)))
    raw = random_features(n_items, seed + 1)
    direction = np.random.default_rng(seed + 2).normal(size=DIM).astype(np.float32)
    raw[:half] += 2 * direction
    raw[half:] -= 2 * direction
    return Domain("rebuy", catalog, as_sequences(train), np.array(val), np.array(test)), raw


@pytest.mark.parametrize("n_negatives", [None, 8])
def test_last_item_text_bias_learns_which_items_are_bought_again_from_their_text(n_negatives):
    domain, raw = rebuy_domain(n_items=30, n_users=300, seed=0)
    family = tiny_family(adapter="routed", last_item_bias=True, last_item_text_bias=True, n_negatives=n_negatives,
                         max_epochs=4, theta0_init="text_similarity", temperature=0.5, last_item_bias_lr=0.05)
    feats = family.item_features(raw)
    theta0 = family.initial_weights(feats.shape[1], seed=0, catalog_features=[feats])
    weights, _ = family.train(theta0, domain, feats, seed=0, progress=False)
    unit = torch.from_numpy(raw / np.linalg.norm(raw, axis=1, keepdims=True))
    offset = float(weights["last_item_bias"]) + unit @ weights["last_item_text_bias"]
    assert float(offset[:15].mean()) > float(offset[15:].mean()) + 0.2  # groceries' last items pushed down less


@pytest.mark.parametrize("n_negatives", [None, 8])
def test_history_bias_offsets_each_earlier_item_once_and_is_learned(n_negatives):
    domain = cycle_domain(n_items=30, n_users=200, seed=0)  # the next item is never in the history
    family = tiny_family(last_item_bias=True, history_bias=True, n_negatives=n_negatives, max_epochs=3,
                         theta0_init="text_similarity", temperature=0.5, last_item_bias_lr=0.05)
    feats = family.item_features(random_features(30, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    assert float(theta0["history_bias"]) == 0.0
    assert family.parameter_groups(theta0)["history_bias"] == ["history_bias"]
    seqs = [np.array([4, 9, 4, 2]), np.array([7]), np.array([2, 2])]
    plain = tiny_family(theta0_init="text_similarity", temperature=0.5).scorer(
        {k: v for k, v in theta0.items() if k not in ("last_item_bias", "history_bias")}, feats)(seqs)
    shifted = {**theta0, "last_item_bias": torch.tensor(-2.0), "history_bias": torch.tensor(-1.0)}
    expected = plain.copy()
    expected[0, 2] -= 2.0 / 0.5  # the last item: b / τ
    expected[0, [4, 9]] -= 1.0 / 0.5  # earlier items, item 4 twice: b_h / τ once
    expected[1, 7] -= 2.0 / 0.5
    expected[2, 2] -= 2.0 / 0.5  # an earlier repeat of the last item: b only
    assert_offsets_everywhere(family, shifted, feats, seqs, expected, torch.tensor([4, 7, 5]),
                              torch.tensor([2, 4, 9, 11, 7]))
    weights, _ = family.train(theta0, domain, feats, seed=0, progress=False)
    assert float(weights["history_bias"]) < -0.01


def alternating_domain(n_items: int, n_users: int, seed: int) -> Domain:
    """Half the users follow the cycle of :func:`cycle_domain` (never a repeat); the other half alternate between
    two items a, b, a, b, … (their history repeats an item from the third purchase on, and the next item is the
    one bought before the last)."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for user in range(n_users):
        start, length = int(rng.integers(n_items)), int(rng.integers(3, 9))
        if user % 2:
            seq = (start + np.arange(length + 2)) % n_items
        else:
            seq = np.where(np.arange(length + 2) % 2, (start + 7) % n_items, start)
        train.append(seq[:-2])
        val.append(seq[-2])
        test.append(seq[-1])
    catalog = ItemCatalog(ids=tuple(f"i{i}" for i in range(n_items)),
                          fields=tuple({"title": f"item {i}"} for i in range(n_items)))
    return Domain("alternating", catalog, as_sequences(train), np.array(val), np.array(test))


def test_repeats_an_item_follows_its_definition():
    rows = torch.tensor([[3, 5, 3, -1], [9, 2, 7, -1], [4, 4, -1, -1], [-1, -1, -1, -1], [6, 1, 2, 1], [5, -1, -1, -1]])
    assert repeats_an_item(rows).tolist() == [True, False, True, False, True, False]  # PADs repeat nothing
    assert repeats_an_item(rows[:, :1]).tolist() == [False] * 6


@pytest.mark.parametrize("n_negatives", [None, 8])
def test_repeat_user_bias_replaces_both_offsets_for_users_who_repeat_and_stays_at_theta0_without_them(n_negatives):
    family = tiny_family(last_item_bias=True, history_bias=True, repeat_user_bias=True, n_negatives=n_negatives,
                         max_epochs=3, theta0_init="text_similarity", temperature=0.5, last_item_bias_lr=0.05)
    feats = family.item_features(random_features(30, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    assert theta0["repeat_user_bias"].tolist() == [0.0, 0.0]
    assert family.parameter_groups(theta0)["repeat_user_bias"] == ["repeat_user_bias"]
    seqs = [np.array([4, 9, 4, 2]), np.array([5, 9, 2]), np.array([2, 2])]
    plain = tiny_family(theta0_init="text_similarity", temperature=0.5).scorer(
        {k: v for k, v in theta0.items() if k not in SequentialFamily.behaviour_parameters}, feats)(seqs)
    shifted = {**theta0, "last_item_bias": torch.tensor(-2.0), "history_bias": torch.tensor(-1.0),
               "repeat_user_bias": torch.tensor([0.5, 1.5])}
    expected = plain.copy()
    expected[0, 2] += 0.5 / 0.5  # row 0 repeats item 4: b_r on the last item, b_hr once on each earlier one
    expected[0, [4, 9]] += 1.5 / 0.5
    expected[1, 2] -= 2.0 / 0.5  # row 1 repeats nothing: b and b_h
    expected[1, [5, 9]] -= 1.0 / 0.5
    expected[2, 2] += 0.5 / 0.5  # row 2 repeats its last item: b_r only
    assert_offsets_everywhere(family, shifted, feats, seqs, expected, torch.tensor([4, 9, 2]),
                              torch.tensor([2, 4, 9, 11, 5]))
    never, _ = family.train(theta0, cycle_domain(n_items=30, n_users=200, seed=0), feats, seed=0, progress=False)
    assert float(never["history_bias"]) < -0.01 and never["repeat_user_bias"].tolist() == [0.0, 0.0]
    mixed, _ = family.train(theta0, alternating_domain(n_items=30, n_users=200, seed=0), feats, seed=0,
                            progress=False)
    assert float(mixed["repeat_user_bias"][1]) > float(mixed["history_bias"]) + 0.1


def test_repeat_user_bias_needs_both_offsets():
    for params in ({"last_item_bias": True}, {"history_bias": True}, {}):
        with pytest.raises(ValueError, match="repeat_user_bias replaces last_item_bias and history_bias .* needs both"):
            tiny_family(repeat_user_bias=True, **params)
        with pytest.raises(ValueError, match="repeat_user_bias replaces last_item_bias and history_bias .* needs both"):
            TextSASRec(DIM, 32, 1, 2, 2, 10, 0.0, "linear", 2, 0.5, repeat_user_bias=True, **params)


def test_history_pooling_adds_the_earlier_items_to_the_query_and_is_zero_at_theta0():
    family = tiny_family(history_pooling=2, theta0_init="text_similarity", temperature=0.5)
    feats = family.item_features(random_features(30, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    assert theta0["history_pooling"].tolist() == [0.0, 0.0]
    seqs = [np.array([4, 9, 3, 2]), np.array([7]), np.array([5, 6])]
    plain = tiny_family(theta0_init="text_similarity", temperature=0.5).scorer(
        {k: v for k, v in theta0.items() if k != "history_pooling"}, feats)
    np.testing.assert_allclose(family.scorer(theta0, feats)(seqs), plain(seqs), atol=1e-5)
    weights = {**theta0, "history_pooling": torch.tensor([0.5, 0.25])}
    module = family.load(weights, DIM)
    with torch.no_grad():
        items = module.item_representations(feats)
        hidden = module.encode(pad_sequences(seqs, family.max_len), items, last_only=True)[:, -1]
        unit = F.normalize(items, dim=-1)
        last = torch.stack([module.encode(pad_sequences([s[-1:]], family.max_len), items)[0, -1] for s in seqs])
    # θ₀'s blocks are the identity on the last item: the query is ê_last + 0.5·ê_{t-1} + 0.25·ê_{t-2}
    expected = torch.stack([F.normalize(last[0], dim=-1) + 0.5 * unit[3] + 0.25 * unit[9],
                            F.normalize(last[1], dim=-1), F.normalize(last[2], dim=-1) + 0.5 * unit[5]])
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    scores = family.scorer(weights, feats)(seqs)
    np.testing.assert_allclose(scores, (F.normalize(expected, dim=-1) @ unit.T / 0.5).numpy(), atol=1e-4)
    for bad in (10, True, 2.0):
        with pytest.raises(ValueError, match=f"history_pooling must be 0 .* below max_len=10, got {bad}"):
            tiny_family(history_pooling=bad)


def test_last_item_bias_lr_trains_b_in_its_own_group_further_than_at_lr():
    domain = cycle_domain(n_items=30, n_users=200, seed=0)  # the next item is never the last one: b should fall
    feats = tiny_family().item_features(random_features(30, 1))

    def trained(**params):
        family = tiny_family(last_item_bias=True, max_epochs=2, patience=5, theta0_init="text_similarity",
                             temperature=0.5, **params)
        theta0 = family.initial_weights(DIM, seed=0)
        return family, float(family.train(theta0, domain, feats, seed=0, progress=False)[0]["last_item_bias"])

    family, at_lr = trained()
    fast_family, fast = trained(last_item_bias_lr=0.05)
    assert fast < at_lr < 0
    groups = fast_family.optimizer(fast_family.load(fast_family.initial_weights(DIM, seed=0), DIM)).param_groups
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in groups][2] == (1, 0.05, 0.0)
    assert len(family.optimizer(family.load(family.initial_weights(DIM, seed=0), DIM)).param_groups[2]["params"]) == 0
    with pytest.raises(ValueError, match="last_item_bias_lr must be None or > 0 with last_item_bias, history_bias or history_pooling on"):
        tiny_family(last_item_bias_lr=0.05)


def test_trainable_patterns_train_only_the_matching_weights_and_name_what_matches_nothing():
    domain = cycle_domain(n_items=30, n_users=60, seed=0)
    feats = tiny_family().item_features(random_features(30, 1))
    family = tiny_family(max_epochs=2, trainable=["adapter.*", "*norm.bias"])
    theta0 = family.initial_weights(DIM, seed=0)
    weights, _ = family.train(theta0, domain, feats, seed=0, progress=False)
    moved = {k for k in theta0 if not torch.equal(weights[k], theta0[k])}
    assert moved and all(k.startswith("adapter.") or k.endswith("norm.bias") for k in moved)
    assert "adapter.mlp.0.weight" in moved and "final_norm.bias" in moved
    everything = tiny_family(max_epochs=2).train(theta0, domain, feats, seed=0, progress=False)[0]
    assert not torch.equal(everything["blocks.0.ffn.0.weight"], theta0["blocks.0.ffn.0.weight"])
    typo = tiny_family(trainable=["adapter.*", "blocks.9.*"])
    for build_or_train in (lambda: typo.initial_weights(DIM, seed=0),
                           lambda: typo.train(theta0, domain, feats, seed=0, progress=False)):
        with pytest.raises(FedmergeError, match=r"\['blocks\.9\.\*'\] match no parameter.*adapter\.mlp\.0\.weight"):
            build_or_train()
    for bad in ("adapter.*", [], ["adapter.*", ""]):
        with pytest.raises(ValueError, match="trainable must be None"):
            tiny_family(trainable=bad)


def test_sampled_softmax_with_moe_adapter_also_learns():
    domain = cycle_domain(n_items=30, n_users=200, seed=0)
    family = tiny_family(n_negatives=8, adapter="moe")
    feats = family.item_features(random_features(30, 1))
    weights, info = family.train(family.initial_weights(DIM), domain, feats, seed=0, progress=False)
    assert evaluate_scorer(family.scorer(weights, feats), domain, "val")["recall@10"] >= 0.9


def test_sampled_softmax_over_every_item_once_without_correction_is_the_full_softmax():
    scores = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 3, 8, 8, 2, 5])
    every = torch.arange(9)
    loss = sampled_softmax_loss(scores[torch.arange(6), targets], scores, torch.zeros(9),
                                targets.unsqueeze(1) == every.unsqueeze(0))
    torch.testing.assert_close(loss, F.cross_entropy(scores, targets))


def test_logq_correction_makes_popularity_sampled_loss_estimate_the_full_loss():
    """Many draws from a skewed proposal: the corrected loss is near the full loss, the uncorrected one far from it."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=generator)
    targets = torch.tensor([1, 7, 30, 49])
    proposal = torch.arange(1, 51, dtype=torch.float64)
    proposal /= proposal.sum()
    draws = torch.multinomial(proposal, 20_000, replacement=True, generator=generator)
    hits = targets.unsqueeze(1) == draws.unsqueeze(0)
    args = (scores[torch.arange(4), targets], scores[:, draws])
    full = F.cross_entropy(scores, targets)
    corrected = sampled_softmax_loss(*args, torch.log(20_000 * proposal[draws]).float(), hits)
    uncorrected = sampled_softmax_loss(*args, torch.zeros(len(draws)), hits)
    assert abs(corrected - full) < 0.02
    assert abs(uncorrected - full) > 1.0


@pytest.mark.parametrize("adapter", ["mlp", "routed"])
def test_uniform_sampled_loss_with_the_whole_catalog_as_negatives_is_the_full_loss(adapter):
    """k = n uniform negatives: every item once (E[c_j] = 1), the adapter run on the used rows only."""
    domain = cycle_domain(n_items=40, n_users=50, seed=1)
    full = tiny_family(adapter=adapter)
    sampled = tiny_family(adapter=adapter, n_negatives=100)
    feats = full.item_features(random_features(40, 2))
    dim = feats.shape[1]
    theta0 = full.initial_weights(dim, seed=0, catalog_features=[feats])
    module = full.load(theta0, dim)
    module.adapter.requires_grad_(True)
    windows = training_windows(domain.train, full.max_len)[:20]
    generator = torch.Generator().manual_seed(0)
    expected = full._batch_loss(module, windows, feats, generator)
    torch.testing.assert_close(sampled._batch_loss(module, windows, feats, generator), expected)
    rows = []
    module.adapter.register_forward_hook(lambda _module, args, _out: rows.append(len(args[0])))
    windows = windows[:2]  # few items: the sampled loss runs the adapter on those and the 5 negatives only
    few = tiny_family(adapter=adapter, n_negatives=5)._batch_loss(module, windows, feats, generator)
    assert not torch.isclose(few, full._batch_loss(module, windows, feats, generator))
    assert rows[0] <= len(np.unique(np.concatenate(windows))) + 5 and rows[1] == 40


def test_popularity_proposal_follows_training_counts_plus_one():
    domain = cycle_domain(n_items=10, n_users=30, seed=4)
    proposal = tiny_family(n_negatives=3, negative_sampling="popularity").negative_proposal(domain)
    counts = np.bincount(np.concatenate(domain.train), minlength=10) + 1.0
    np.testing.assert_allclose(proposal.numpy(), counts / counts.sum())
    assert tiny_family(n_negatives=3).negative_proposal(domain) is None
    with pytest.raises(ValueError, match="popularity"):
        tiny_family(negative_sampling="frequency")


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_sampled_training_gives_identical_weights_with_one_and_two_threads(sampling):
    domain = cycle_domain(n_items=300, n_users=150, seed=3)
    family = tiny_family(n_negatives=64, negative_sampling=sampling, max_epochs=2, dropout=0.1)
    feats = family.item_features(random_features(300, 1))
    theta0 = family.initial_weights(DIM, seed=0)
    (first, info1), (second, info2) = at_one_and_two_threads(
        lambda: family.train(theta0, domain, feats, seed=0, progress=False))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert info1["final_loss"] == info2["final_loss"]
    other, _ = family.train(theta0, domain, feats, seed=1, progress=False)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_training_is_deterministic_under_a_seed():
    domain = cycle_domain(n_items=20, n_users=60, seed=2)
    family = tiny_family(max_epochs=2, dropout=0.2)
    feats = family.item_features(random_features(20, 3))
    theta0 = family.initial_weights(DIM, seed=5)
    first, _ = family.train(theta0, domain, feats, seed=1, progress=False)
    second, _ = family.train(theta0, domain, feats, seed=1, progress=False)
    other, _ = family.train(theta0, domain, feats, seed=2, progress=False)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_weights_are_shared_across_catalog_sizes():
    family = tiny_family(max_epochs=1)
    theta0 = family.initial_weights(DIM, seed=0)
    assert all(v.is_floating_point() for v in theta0.values())
    assert not any(1000 in v.shape or 7 in v.shape for v in theta0.values())
    shapes = []
    for n_items in (7, 1000):
        domain = cycle_domain(n_items=n_items, n_users=20, seed=n_items)
        weights, _ = family.train(theta0, domain, family.item_features(random_features(n_items, 0)), progress=False)
        shapes.append({k: tuple(v.shape) for k, v in weights.items()})
        scores = family.scorer(weights, family.item_features(random_features(n_items, 0)))([np.array([0, 1])])
        assert scores.shape == (1, n_items)
    assert shapes[0] == shapes[1] == {k: tuple(v.shape) for k, v in theta0.items()}


def test_initial_weights_identical_for_same_seed():
    family = tiny_family()
    a, b, c = family.initial_weights(DIM, 3), family.initial_weights(DIM, 3), family.initial_weights(DIM, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_scores_are_scaled_cosines_and_ignore_padding():
    family = tiny_family(temperature=0.1)
    feats = family.item_features(random_features(12, 0))
    module = family.load(family.initial_weights(DIM), DIM)
    seqs = [np.array([1, 2, 3]), np.array([4])]
    with torch.no_grad():
        short = module(pad_sequences(seqs, 3), feats)
        long = module(pad_sequences(seqs, family.max_len), feats)
    torch.testing.assert_close(short, long)
    assert short.abs().max() <= 1.0 / 0.1 + 1e-4


@pytest.mark.parametrize("history_pooling", [0, 2])
def test_last_only_encoding_equals_the_full_encoders_last_position(history_pooling):
    family = tiny_family(n_layers=2, history_pooling=history_pooling)
    feats = family.item_features(random_features(12, 0))
    weights = family.initial_weights(DIM, seed=1)
    if history_pooling:
        weights["history_pooling"] = torch.tensor([0.7, -0.4])
    module = family.load(weights, DIM).eval()
    seqs = pad_sequences([np.array([1, 2, 3, 4]), np.array([5]), np.array([6, 7])], family.max_len)
    with torch.no_grad():
        items = module.item_representations(feats)
        full = module.encode(seqs, items)
        last = module.encode(seqs, items, last_only=True)
        if history_pooling:  # every position t: ĥ_t + 0.7 ê_{t-1} − 0.4 ê_{t-2}, ĥ the encoder's state without pooling
            module.history_pooling.zero_()
            plain = F.normalize(module.encode(seqs, items), dim=-1)
            unit = F.normalize(items, dim=-1)
            trimmed = seqs[:, -plain.shape[1] :]
            for row, t in ((0, -1), (0, -2), (0, -3), (0, -4), (2, -1), (2, -2), (1, -1)):
                expected = plain[row, t].clone()
                for k, w in ((1, 0.7), (2, -0.4)):
                    if t - k >= -trimmed.shape[1] and trimmed[row, t - k] >= 0:
                        expected += w * unit[trimmed[row, t - k]]
                torch.testing.assert_close(full[row, t], expected, rtol=1e-5, atol=1e-5)
    assert last.shape == (3, 1, family.hidden)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_parameter_groups_are_layerwise():
    family = tiny_family(n_layers=2)
    names = list(family.initial_weights(DIM))
    groups = family.parameter_groups(names)
    assert set(groups) == {"adapter", "position", "block.0", "block.1", "final_norm"}
    assert all(name.startswith("blocks.1.") for name in groups["block.1"])
    assert sorted(n for g in groups.values() for n in g) == sorted(names)


def test_registry_and_bad_input():
    assert isinstance(get_family("sequential", hidden=32, n_heads=2), SequentialFamily)
    with pytest.raises(ValueError, match="adapter"):
        SequentialFamily(adapter="transformer")
    with pytest.raises(ValueError, match="divisible"):
        SequentialFamily(hidden=30, n_heads=4)
    family = tiny_family()
    domain = cycle_domain(10, 5, 0)
    with pytest.raises(ValueError, match="item_features"):
        family.train(family.initial_weights(DIM), domain, family.item_features(random_features(9, 0)), progress=False)
    with pytest.raises(FedmergeError, match="initial weights"):
        family.train(family.initial_weights(DIM + 1), domain, family.item_features(random_features(10, 0)),
                     progress=False)


def test_scorer_matches_module_in_input_order():
    family = tiny_family(max_len=6)
    feats = family.item_features(random_features(15, 4))
    weights = family.initial_weights(DIM, seed=1)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 15, size=n) for n in (9, 1, 4, 2, 6, 3, 1)]
    scores = family.scorer(weights, feats, batch_size=3)(seqs)
    module = family.load(weights, DIM)
    with torch.no_grad():
        expected = torch.cat([module(pad_sequences([s], family.max_len), feats) for s in seqs]).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_early_stopping_and_time_budget():
    domain = cycle_domain(n_items=20, n_users=40, seed=1)
    feats = tiny_family().item_features(random_features(20, 0))
    frozen = tiny_family(lr=1e-12, patience=2, max_epochs=10)
    theta0 = frozen.initial_weights(DIM)
    weights, info = frozen.train(theta0, domain, feats, progress=False)
    assert (info["epochs"], info["best_epoch"]) == (3, 1)  # no improvement after epoch 1, patience 2
    assert info["stop_reason"] == "early_stopping"
    assert all(torch.allclose(weights[k], theta0[k], atol=1e-6) for k in theta0)
    _, info = tiny_family(max_seconds=0.0, max_epochs=10).train(theta0, domain, feats, progress=False)
    assert info["epochs"] == 1 and info["stop_reason"] == "max_seconds"
    _, info = tiny_family(max_epochs=2, patience=5).train(theta0, domain, feats, progress=False)
    assert (info["epochs"], info["stop_reason"], info["max_epochs"]) == (2, "max_epochs", 2)
    # a cap that fires on the very last step cut nothing: it was reported as "max_seconds" (the run "depends on this
    # machine's speed") with the same weights as the uncapped run
    whole, info = tiny_family(max_epochs=1, batch_size=1024).train(theta0, domain, feats, seed=0, progress=False)
    capped, capped_info = tiny_family(max_epochs=1, batch_size=1024, max_seconds=1e-9).train(
        theta0, domain, feats, seed=0, progress=False)
    assert all(torch.equal(whole[k], capped[k]) for k in whole)
    assert capped_info["stop_reason"] == info["stop_reason"] == "max_epochs" and "last_epoch_steps" not in capped_info


def test_proximal_term_keeps_the_task_vector_small_and_is_validated():
    domain = cycle_domain(n_items=20, n_users=80, seed=3)
    feats = tiny_family().item_features(random_features(20, 2))
    theta0 = tiny_family().initial_weights(DIM, seed=0)

    def trained_task_vector_norm(mu: float) -> float:
        # weight_decay=0 so that only the proximal term pulls towards θ₀ (AdamW's decay pulls towards 0)
        weights, _ = tiny_family(max_epochs=4, patience=10, weight_decay=0.0, proximal_mu=mu).train(
            theta0, domain, feats, seed=0, progress=False)
        return task_vector_norm(theta0, weights)

    free, held = trained_task_vector_norm(0.0), trained_task_vector_norm(10.0)
    assert held < 0.5 * free
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="proximal_mu"):
            tiny_family(proximal_mu=bad)


@pytest.mark.parametrize("key, bad", [("max_seconds", float("nan")), ("max_seconds", -5.0),
                                      ("weight_decay", -1.0), ("weight_decay", float("nan"))])
def test_a_nan_or_negative_cap_or_decay_is_refused(key, bad):  # a NaN max_seconds silently turned the cap off
    with pytest.raises(ValueError, match=key):
        tiny_family(**{key: bad})


def test_micro_batches_split_a_batch_by_target_positions():
    windows = [np.arange(n) for n in (2, 5, 3, 4, 6)]  # 1 + 4 + 2 + 3 + 5 = 15 target positions
    assert tiny_family().micro_batches(windows) == [(windows, 1.0)]
    assert tiny_family(micro_batch_size=5).micro_batches(windows) == [(windows, 1.0)]
    parts = tiny_family(micro_batch_size=2).micro_batches(windows)
    assert [len(c) for c, _ in parts] == [2, 2, 1]
    assert [s for _, s in parts] == pytest.approx([5 / 15, 5 / 15, 5 / 15])
    with pytest.raises(ValueError, match="micro_batch_size"):
        tiny_family(micro_batch_size=0)


@pytest.mark.parametrize("n_negatives", [None, 7])
def test_micro_batches_accumulate_the_whole_batch_gradient(n_negatives):
    """Σ_c share_c ∇loss_c over chunks (negatives drawn once) equals ∇ of the whole batch's loss (no dropout)."""
    domain = cycle_domain(n_items=30, n_users=40, seed=2)
    whole, micro = tiny_family(n_negatives=n_negatives), tiny_family(n_negatives=n_negatives, micro_batch_size=3)
    feats = whole.item_features(random_features(30, 3))
    module = whole.load(whole.initial_weights(feats.shape[1], seed=0), feats.shape[1])
    windows = training_windows(domain.train, whole.max_len)[:10]
    drawn = whole._negatives(30, torch.Generator().manual_seed(0), None) if n_negatives else None

    def gradient(family: SequentialFamily) -> list[torch.Tensor]:
        module.zero_grad()
        for chunk, share in family.micro_batches(windows):
            (share * family._batch_loss(module, chunk, feats, torch.Generator(), drawn=drawn)).backward()
        return [p.grad.clone() for p in module.parameters() if p.grad is not None]

    expected, accumulated = gradient(whole), gradient(micro)
    assert len(micro.micro_batches(windows)) == 4 and len(expected) == len(accumulated) > 0
    for a, b in zip(accumulated, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batch_size_at_least_the_batch_trains_the_same_weights():
    domain = cycle_domain(n_items=20, n_users=40, seed=5)
    family, same = tiny_family(max_epochs=2, n_negatives=6), tiny_family(max_epochs=2, n_negatives=6, micro_batch_size=64)
    feats = family.item_features(random_features(20, 1))
    theta0 = family.initial_weights(feats.shape[1], seed=0)
    a, _ = family.train(theta0, domain, feats, seed=3, progress=False)
    b, _ = same.train(theta0, domain, feats, seed=3, progress=False)
    c, _ = tiny_family(max_epochs=2, n_negatives=6, micro_batch_size=8).train(theta0, domain, feats, seed=3, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # accumulated steps differ in rounding, so the test can fail


def test_scorer_batch_size_changes_only_rounding():
    """Users scored 3 at a time (length-sorted batches) get the scores of one pass over all of them."""
    domain = cycle_domain(n_items=25, n_users=30, seed=6)
    family = tiny_family()
    feats = family.item_features(random_features(25, 4))
    theta0 = family.initial_weights(feats.shape[1], seed=1)
    seqs = [np.asarray(s) for s in domain.train]
    whole = family.scorer(theta0, feats, batch_size=len(seqs))(seqs)
    np.testing.assert_allclose(family.scorer(theta0, feats, batch_size=3)(seqs), whole, rtol=1e-5, atol=1e-5)


def test_family_parameters_are_checked_against_their_declared_types():
    """A TOML float or a JSON string where an integer belongs failed deep inside torch; NumPy integers are integers."""
    import numpy as np

    from fedmerge.errors import FedmergeError
    from fedmerge.models import get_family

    assert get_family("sequential", hidden=np.int64(64), lr=1).hidden == 64
    for params, message in [({"hidden": 32.0}, "hidden must be an integer, got 32.0"),
                            ({"hidden": True}, "hidden must be an integer, got True"),
                            ({"trainable": ["adapter.*", 1]}, "trainable must be a list of strings or None"),
                            ({"n_negatives": "8"}, "n_negatives must be an integer or None"),
                            ({"hidden": -4}, r"parameters must be positive: \{'hidden': -4\}")]:
        with pytest.raises(FedmergeError, match=f"model family 'sequential': {message}"):
            get_family("sequential", **params)
    with pytest.raises(FedmergeError, match="model 'ease': lam must be a number or a list of numbers"):
        from fedmerge.models import get_recommender

        get_recommender("ease", lam="big")


@pytest.mark.parametrize("history", [[3, -2], [3, -1, 4], [3, 20], [3.0, float("nan")]])
def test_the_scorer_names_item_ids_outside_the_catalog(history):
    """-2 read item 0's text, a -1 inside a history was taken for padding, 20 of 20 items an IndexError."""
    family = tiny_family()
    scorer = family.scorer(family.initial_weights(DIM, seed=0), family.item_features(random_features(20, 0)))
    with pytest.raises(ValueError, match=rf"history 1 holds item ids outside 0..19: \[{', '.join(map(str, history))}\]"):
        scorer([np.array([1]), np.array(history)])


def test_pad_sequences_keeps_the_last_items_right_aligned_and_refuses_length_zero():
    seqs = [np.array([1, 2, 3, 4]), np.array([7]), np.array([], dtype=np.int64)]
    assert pad_sequences(seqs, 3).tolist() == [[2, 3, 4], [-1, -1, 7], [-1, -1, -1]]
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):  # [-0:] kept every item: a shape error
        pad_sequences(seqs, 0)
