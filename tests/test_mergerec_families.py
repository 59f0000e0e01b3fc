"""MergeRec's fast paths on the real families: L-column pseudo-users, the cross-domain frozen sequence side, and
text-LAE's split forward, each checked against the plain computation it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.data.domain import interaction_matrix
from fedmerge.merging.mergerec import MergeRecConfig, PseudoUserObjective, SequenceSide, mergerec
from fedmerge.models.base import PAD, pad_sequences
from fedmerge.models.sequential import SequentialFamily
from fedmerge.models.text_lae import TextLAEFamily


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def perturbed_models(theta0: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {d: {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in theta0.items()} for d in "abc"}


def test_text_lae_forward_is_x_e_w_et_with_repeats_and_padding():
    gen = torch.Generator().manual_seed(0)
    n, d = 9, 5
    features = torch.randn(n, d, generator=gen, dtype=torch.float64)
    module = TextLAEFamily().build(d).double()
    with torch.no_grad():
        module.W.copy_(torch.randn(d, d, generator=gen, dtype=torch.float64))
    seqs = [np.array([3, 3, 1]), np.array([8]), np.array([0, 2, 0, 2, 7]), np.array([], dtype=np.int64)]
    x = interaction_matrix(seqs, n).toarray()  # binary: a repeated item counts once
    expected = x @ features.numpy() @ module.W.detach().numpy() @ features.numpy().T
    scores = module(pad_sequences(seqs, 6), features).detach().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", [TextLAEFamily(), SequentialFamily(hidden=16, n_layers=2, n_heads=2, max_len=7)])
def test_short_pseudo_user_batches_score_like_max_len_padded_sequences(family):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(11, 8, generator=gen)
    theta0 = family.initial_weights(8, seed=0)
    weights = perturbed_models(theta0, 0.1, seed=2)["a"]
    module = family.load(weights, 8)
    seqs = [np.array([0]), np.array([4, 10]), np.array([10, 4, 4]), np.array([4])]
    with torch.no_grad():
        padded = module(pad_sequences(seqs, family.max_len), features)
        three_columns = module(pad_sequences(seqs, 3), features)
    torch.testing.assert_close(three_columns, padded, rtol=1e-5, atol=1e-5)


def test_sequence_side_over_the_union_scores_each_row_against_its_own_catalog():
    family = SequentialFamily(hidden=16, n_layers=1, n_heads=2, max_len=5)
    gen = torch.Generator().manual_seed(3)
    module = family.load(perturbed_models(family.initial_weights(6), 0.1, seed=4)["b"], 6)
    catalogs = [torch.randn(n, 6, generator=gen) for n in (4, 7, 3)]
    with torch.no_grad():
        reps = [module.item_representations(c) for c in catalogs]
        union = torch.cat(reps)
        bounds = [(0, 4), (4, 11), (11, 14)]
        domain_of = torch.tensor([1, 0, 2, 1, 1])
        local = torch.tensor([6, 3, 0, 2, 6])
        parts = [(d, (domain_of == d).nonzero().flatten()) for d in (0, 1, 2)]
        offsets = torch.tensor([b[0] for b in bounds])
        input_features = torch.cat(catalogs)[local + offsets[domain_of]]
        one_column = torch.arange(len(local)).view(-1, 1)
        scores = SequenceSide(module)(input_features, one_column, union, bounds, parts, local.unsqueeze(1))
        for (d, rows), got in zip(parts, scores):
            seqs = pad_sequences([np.array([int(i)]) for i in local[rows]], family.max_len)
            expected = module.logits(module.encode(seqs, reps[d])[:, -1], reps[d])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_text_lae_frozen_item_side_learns_the_same_coefficients_as_the_full_forward():
    family = TextLAEFamily()
    gen = torch.Generator().manual_seed(5)
    theta0 = family.initial_weights(6)
    models = perturbed_models(theta0, 0.3, seed=6)
    features = {d: torch.randn(n, 6, generator=gen) for d, n in zip("abc", (8, 5, 10))}
    config = dict(steps=30, lr=0.05, temperature=0.5, distill_weight=1.0, progress=False, granularity="layer")
    _, full = mergerec(family, theta0, models, features, MergeRecConfig(item_side="full", **config))
    _, frozen = mergerec(family, theta0, models, features, MergeRecConfig(item_side="frozen", **config))
    assert full.loss_curve[-1] < full.loss_curve[0]  # the coefficients did move
    for d in "abc":
        np.testing.assert_allclose(frozen.coefficients[d]["W"], full.coefficients[d]["W"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [TextLAEFamily(), SequentialFamily(hidden=16, n_layers=1, n_heads=2, max_len=5)])
def test_rollout_pseudo_users_frozen_item_side_matches_the_full_forward_at_the_first_step(family):
    """With L = 3 the frozen path gathers the prefixes' items from the union catalog; its first loss (item side not
    yet moved) must equal the full forward's, and both must learn."""
    gen = torch.Generator().manual_seed(7)
    theta0 = family.initial_weights(6)
    models = perturbed_models(theta0, 0.2, seed=8)
    features = {d: torch.randn(n, 6, generator=gen) for d, n in zip("abc", (8, 5, 10))}
    config = dict(steps=15, lr=0.05, temperature=0.5, distill_weight=1.0, progress=False, granularity="layer",
                  pseudo_user_length=3, exclude_input_item=True)
    _, full = mergerec(family, theta0, models, features, MergeRecConfig(item_side="full", **config))
    _, frozen = mergerec(family, theta0, models, features, MergeRecConfig(item_side="frozen", **config))
    assert frozen.loss_curve[0] == pytest.approx(full.loss_curve[0], rel=1e-4)
    for report in (full, frozen):
        assert np.mean(report.loss_curve[-5:]) < np.mean(report.loss_curve[:5])


def test_sequence_side_scores_histories_that_repeat_an_item_like_the_forward():
    """MergeRec's pseudo-users never repeat an item, so the objective test above never reaches the repeating users'
    offsets: the frozen sequence side itself, on hand-built histories (one repeats item 1), must add them as the
    model's forward does."""
    family = SequentialFamily(hidden=16, n_layers=1, n_heads=2, max_len=5, last_item_bias=True, history_bias=True,
                              history_pooling=2, repeat_user_bias=True)
    weights = family.initial_weights(6)
    weights.update(last_item_bias=torch.tensor(-0.8), history_bias=torch.tensor(-0.4),
                   history_pooling=torch.tensor([0.5, 0.2]), repeat_user_bias=torch.tensor([0.6, 0.9]))
    module = family.load(weights, 6)
    features = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    seqs = pad_sequences([np.array([1, 2, 1]), np.array([3, 4]), np.array([5, 1, 2, 5])], family.max_len)
    with torch.no_grad():
        [scores] = SequenceSide(module)(features, seqs, module.item_representations(features), [(0, 7)],
                                        [(0, torch.arange(3))], seqs.flip(1))
        torch.testing.assert_close(scores, module(seqs, features), rtol=1e-5, atol=1e-5)
        plain = {**weights, "repeat_user_bias": torch.zeros(2)}
        assert not torch.allclose(module(seqs, features), family.load(plain, 6)(seqs, features))


def test_sequence_side_adds_the_text_conditioned_last_item_offset_like_the_forward():
    """With ``last_item_text_bias`` each row's last-item offset reads that item's own features: the frozen sequence
    side must take them from its rows of ``input_features`` as the forward takes them from the catalog."""
    family = SequentialFamily(hidden=16, n_layers=1, n_heads=2, max_len=5, adapter="routed", n_experts=2,
                              last_item_bias=True, last_item_text_bias=True)
    features = torch.randn(7, 12, generator=torch.Generator().manual_seed(3))
    weights = family.initial_weights(12, catalog_features=[features])
    weights.update(last_item_bias=torch.tensor(-0.3), last_item_text_bias=torch.linspace(-2.0, 2.0, 6))
    module = family.load(weights, 12)
    seqs = pad_sequences([np.array([1, 2, 3]), np.array([3, 4]), np.array([5, 1, 6])], family.max_len)
    positions = torch.where(seqs == PAD, PAD, torch.arange(seqs.numel()).view(seqs.shape))
    with torch.no_grad():
        [scores] = SequenceSide(module)(features[seqs.clamp(min=0).flatten()], positions,
                                        module.item_representations(features), [(0, 7)], [(0, torch.arange(3))],
                                        seqs.flip(1))
        torch.testing.assert_close(scores, module(seqs, features), rtol=1e-5, atol=1e-5)
        plain = {**weights, "last_item_text_bias": torch.zeros(6)}
        assert not torch.allclose(scores, family.load(plain, 12)(seqs, features))


@pytest.mark.parametrize("history", [False, True])
def test_frozen_item_side_scores_the_last_item_bias_like_the_full_forward(history):
    """With a learned last-item bias and the pseudo-users' own items left in (the paper preset), the frozen sequence
    side must add b / τ to each row's last item as the model's forward does; otherwise the student differs from its
    teachers on exactly the item a domain's b is about. The same for the history bias and history pooling (the
    repeating users' offsets are on too, but pseudo-users never repeat an item: the test below covers them)."""
    family = SequentialFamily(hidden=16, n_layers=1, n_heads=2, max_len=5, last_item_bias=True, history_bias=history,
                              history_pooling=2 if history else 0, repeat_user_bias=history)
    gen = torch.Generator().manual_seed(9)
    theta0 = family.initial_weights(6)
    models = perturbed_models(theta0, 0.2, seed=10)
    for d, b in zip("abc", (-0.8, 0.5, -0.3)):
        models[d]["last_item_bias"] = torch.tensor(b)
        if history:
            models[d]["history_bias"] = torch.tensor(b / 2)
            models[d]["history_pooling"] = torch.tensor([b, 0.3])
            models[d]["repeat_user_bias"] = torch.tensor([-b, 0.2])
    features = {d: torch.randn(n, 6, generator=gen) for d, n in zip("abc", (8, 5, 10))}
    lam = torch.tensor([[0.7], [0.2], [0.4]])
    config = dict(steps=0, temperature=0.5, distill_weight=1.0, progress=False, pseudo_user_length=2,
                  exclude_input_item=False)
    values = [PseudoUserObjective(family, theta0, models, features, MergeRecConfig(item_side=side, **config))
              .mean_loss(lam) for side in ("frozen", "full")]
    assert values[0] == pytest.approx(values[1], rel=1e-5)
