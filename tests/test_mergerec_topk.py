"""MergeRec with sparse (top-k) teachers: k = n reproduces the dense objective, memory is O(n·k)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.merging.mergerec import MergeRecConfig, PseudoUserObjective, distillation_loss, mask_items, mergerec
from fedmerge.merging.teachers import top_k_distillation_loss, top_k_rows
from tests.test_mergerec import DIM, FAST, TinyFamily, one_thread, setup, split_setup  # noqa: F401 (autouse)


def random_rows(seed: int, b: int = 6, n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, n, generator=gen), 3 * torch.randn(b, n, generator=gen)


@pytest.mark.parametrize("masked", [False, True])
def test_top_k_loss_with_every_item_kept_is_the_dense_loss(masked: bool):
    student, teacher = random_rows(0)
    if masked:  # excluded input items: large finite negative scores, as mask_items writes them
        seqs = torch.tensor([[0], [3], [8], [1], [1], [5]])
        student, teacher = mask_items(student, seqs), mask_items(teacher, seqs)
    for temperature, weight in ((1.0, 1.0), (0.05, 1000.0)):
        dense = distillation_loss(student, teacher, temperature, weight)
        sparse = top_k_distillation_loss(student, top_k_rows(teacher, 9, temperature), temperature, weight)
        torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
        assert torch.equal(top_k_rows(teacher, 50, temperature).values, top_k_rows(teacher, 9, temperature).values)


def test_top_k_kl_is_the_coarsened_kl_and_never_above_the_dense_one():
    student, teacher = random_rows(1)
    temperature = 0.7
    dense_kl = (distillation_loss(student, teacher, temperature, 1.0)
                - distillation_loss(student, teacher, temperature, 0.0)) / temperature**2
    p, q = torch.softmax(teacher / temperature, 1), torch.softmax(student / temperature, 1)
    for k in (1, 3, 8):
        rows = top_k_rows(teacher, k, temperature)
        kl = (top_k_distillation_loss(student, rows, temperature, 1.0)
              - top_k_distillation_loss(student, rows, temperature, 0.0)) / temperature**2
        kept = torch.zeros_like(p, dtype=torch.bool).scatter(1, rows.indices.long(), True)
        # by hand: the KL between p and q coarsened to (each kept item, "the rest")
        p_rest, q_rest = (p * ~kept).sum(1), (q * ~kept).sum(1)
        by_hand = ((p * (p.log() - q.log())) * kept).sum(1) + p_rest * (p_rest.log() - q_rest.log())
        torch.testing.assert_close(kl, by_hand.mean(), rtol=1e-5, atol=1e-6)
        assert 0 <= float(kl) <= float(dense_kl) + 1e-6
        torch.testing.assert_close(rows.log_rest.exp(), p_rest, rtol=1e-5, atol=1e-7)


CASES = [
    dict(FAST),
    dict(FAST, pseudo_user_length=2, exclude_input_item=True),
    dict(FAST, logit_norm="teacher_std", temperature=0.1, distill_weight=100.0),
]


@pytest.mark.parametrize("case", CASES)
def test_objective_with_k_equal_to_the_largest_catalog_is_the_dense_objective(case):
    family, theta0, models, features = setup()
    largest = max(len(f) for f in features.values())
    lam = torch.tensor([[0.5], [0.1], [0.3]])
    dense = PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**case))
    sparse = PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**case, teacher_top_k=largest))
    assert sparse.mean_loss(lam, batch_size=5) == pytest.approx(dense.mean_loss(lam, batch_size=5), rel=1e-5)
    short = {**case, "steps": 15}
    _, a = mergerec(family, theta0, models, features, MergeRecConfig(**short))
    _, b = mergerec(family, theta0, models, features, MergeRecConfig(**short, teacher_top_k=largest))
    assert b.loss_curve == pytest.approx(a.loss_curve, rel=1e-4)
    # a small k changes the objective (the test can fail)
    small = PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**case, teacher_top_k=2))
    assert small.mean_loss(lam) != pytest.approx(dense.mean_loss(lam), rel=1e-3)


def test_top_k_teachers_hold_o_n_k_memory_and_score_in_bounded_chunks(monkeypatch):
    family, theta0, models, _ = setup()
    gen = torch.Generator().manual_seed(2)
    features = {d: torch.randn(n, DIM, generator=gen) for d, n in (("x", 300), ("y", 250), ("z", 40))}
    widest: list[int] = []
    original = TinyFamily.scorer

    def recording(self, weights, item_features, batch_size=512):
        inner = original(self, weights, item_features, batch_size)

        def score(seqs: list[np.ndarray]) -> np.ndarray:
            widest.append(len(seqs))
            return inner(seqs)

        return score

    monkeypatch.setattr(TinyFamily, "scorer", recording)
    k, batch = 5, 32
    config = MergeRecConfig(**{**FAST, "steps": 3}, teacher_top_k=k, teacher_batch=batch)
    objective = PseudoUserObjective(family, theta0, models, features, config)
    n_total = 300 + 250 + 40
    assert objective.teacher_bytes == n_total * (k * 4 + k * 4 + 4 + 4)  # values, int32 indices, two scalars
    assert max(widest) <= batch  # never an n × n score matrix
    dense = PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**{**FAST, "steps": 3}))
    assert dense.teacher_bytes == 4 * (300**2 + 250**2 + 40**2)
    _, report = mergerec(family, theta0, models, features, config)
    assert report.teacher_bytes == objective.teacher_bytes and len(report.loss_curve) == 3


def test_top_k_works_with_the_frozen_item_side():
    family, theta0, models, features = split_setup()
    lam = torch.tensor([[0.7, 0.2, 0.4], [0.1, 0.9, 0.3], [0.5, 0.5, 0.0]])
    base = dict(FAST, item_side="frozen", granularity="layer", pseudo_user_length=2)
    values = [PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**base, teacher_top_k=k)).mean_loss(lam)
              for k in (0, 11)]
    assert values[1] == pytest.approx(values[0], rel=1e-5)


def test_negative_top_k_is_refused():
    with pytest.raises(ValueError, match="teacher_top_k"):
        MergeRecConfig(teacher_top_k=-1)


def test_sequential_family_with_every_item_kept_learns_the_dense_run():
    from fedmerge.models.sequential import SequentialFamily

    family = SequentialFamily(hidden=16, n_layers=1, n_heads=2, max_len=5)
    gen = torch.Generator().manual_seed(3)
    features = {d: torch.randn(n, 8, generator=gen) for d, n in (("a", 9), ("b", 12))}
    theta0 = family.initial_weights(8, seed=0)
    models = {d: {p: t + 0.1 * torch.randn(t.shape, generator=gen) for p, t in theta0.items()} for d in features}
    base = dict(granularity="layer", steps=10, lr=0.05, progress=False, pseudo_user_length=2, exclude_input_item=True,
                temperature=0.5, distill_weight=1.0)
    _, dense = mergerec(family, theta0, models, features, MergeRecConfig(**base))
    _, sparse = mergerec(family, theta0, models, features, MergeRecConfig(**base, teacher_top_k=12))
    assert sparse.loss_curve == pytest.approx(dense.loss_curve, rel=1e-4)
    for d in features:
        assert sparse.coefficients[d] == pytest.approx(dense.coefficients[d], rel=1e-4, abs=1e-6)
