"""MergeRec on a tiny linear-score family defined here (the real families are tested by their owners)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from torch import nn

from fedmerge.merging import merge
from fedmerge.merging.mergerec import (
    MERGEREC_INITIAL_COEFFICIENT,
    MergeRecConfig,
    PseudoUserObjective,
    PseudoUsers,
    distillation_loss,
    group_index,
    mask_items,
    mergerec,
    teacher_rollouts,
)
from fedmerge.models.base import PAD, ModelFamily


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


class LastItemBilinear(nn.Module):
    """score_i = (x_last A + b) · x_i with x the item features (two parameter tensors, two groups)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.eye(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        last = seqs[:, -1].clamp(min=0)
        query = item_features[last] @ self.A + self.b
        query = query * (seqs[:, -1:] != PAD)
        return query @ item_features.T


class TinyFamily(ModelFamily):
    name = "tiny"
    max_len = 3

    def item_features(self, embeddings: np.ndarray, statistics_rows: int | None = None) -> torch.Tensor:
        return torch.as_tensor(embeddings, dtype=torch.float32)

    def build(self, dim: int) -> nn.Module:
        return LastItemBilinear(dim)

    def train(self, theta0, domain, item_features, *, seed=0, progress=True):
        raise NotImplementedError("not needed here")

    def parameter_groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        return {f"group_{n}": [n] for n in names}


DIM = 6


def setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    family = TinyFamily()
    theta0 = {"A": torch.eye(DIM), "b": torch.zeros(DIM)}
    models = {
        d: {"A": torch.eye(DIM) + 0.8 * torch.randn(DIM, DIM, generator=gen), "b": 0.3 * torch.randn(DIM, generator=gen)}
        for d in ("x", "y", "z")
    }
    features = {d: torch.randn(n, DIM, generator=gen) for d, n in (("x", 9), ("y", 7), ("z", 11))}
    return family, theta0, models, features


# the toy module has no item/sequence split, so it uses the exact (full) item side
FAST = dict(steps=60, lr=0.05, progress=False, temperature=0.5, distill_weight=1.0, item_side="full")


def test_distillation_loss_formula():
    s = torch.tensor([[1.0, 0.0, -1.0]])
    t = torch.tensor([[0.0, 2.0, 1.0]])
    T, c = 0.5, 3.0
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum()
    ce = -torch.log_softmax(s, 1)[0, 1]
    torch.testing.assert_close(distillation_loss(s, t, T, c), ce + c * T * T * kl)


def test_coefficients_favour_the_domain_every_teacher_copies():
    family, theta0, models, features = setup()
    # every teacher is model "y": its coefficient must grow relative to the others
    teachers = {d: models["y"] for d in models}
    _, report = mergerec(family, theta0, models, features, MergeRecConfig(**FAST), teachers=teachers)
    c = report.coefficients
    assert c["y"]["all"] > c["x"]["all"] + 0.1 and c["y"]["all"] > c["z"]["all"] + 0.1
    assert c["y"]["all"] > report.initial_coefficient


def full_loss(family, weights, models, features, config) -> float:
    """Loss over every pseudo-user of every domain, computed independently of the optimizer's batches."""
    total, count = 0.0, 0
    for d, feats in features.items():
        seqs = [np.array([i]) for i in range(len(feats))]
        teacher = torch.from_numpy(family.scorer(models[d], feats)(seqs))
        student = torch.from_numpy(family.scorer(weights, feats)(seqs))
        total += len(seqs) * float(distillation_loss(student, teacher, config.temperature, config.distill_weight))
        count += len(seqs)
    return total / count


def test_deterministic_and_loss_decreases():
    family, theta0, models, features = setup()
    config = MergeRecConfig(**FAST, seed=5)
    merged_a, report_a = mergerec(family, theta0, models, features, config)
    merged_b, report_b = mergerec(family, theta0, models, features, config)
    assert report_a.loss_curve == report_b.loss_curve
    assert all(torch.equal(merged_a[p], merged_b[p]) for p in merged_a)
    assert len(report_a.loss_curve) == config.steps and report_a.optimization_seconds > 0
    initial = merge("task_arithmetic", theta0, models, scale=report_a.initial_coefficient)
    assert full_loss(family, merged_a, models, features, config) < 0.97 * full_loss(family, initial, models, features, config)
    _, report_c = mergerec(family, theta0, models, features, MergeRecConfig(**FAST, seed=6))
    assert report_c.loss_curve != report_a.loss_curve


def test_merged_weights_follow_the_learned_coefficients():
    family, theta0, models, features = setup()
    merged, report = mergerec(family, theta0, models, features, MergeRecConfig(**FAST, init_method="task_arithmetic"))
    expected = {p: theta0[p].clone() for p in theta0}
    for d, w in models.items():
        for p in theta0:
            expected[p] += report.coefficients[d]["all"] * (w[p] - theta0[p])
    for p in theta0:
        torch.testing.assert_close(merged[p], expected[p])


def test_zero_steps_returns_the_initialization():
    family, theta0, models, features = setup()
    config = MergeRecConfig(init_method="ties", init_params={"density": 0.5}, steps=0, progress=False, item_side="full")
    merged, report = mergerec(family, theta0, models, features, config)
    assert report.initial_coefficient == 1.0  # MergeRec's TIES initialization
    reference = merge("ties", theta0, models, density=0.5)
    for p in theta0:
        torch.testing.assert_close(merged[p], reference[p])


def test_float64_weights_merge_in_float64():
    """MergeRec held θ₀ in float32 and the task vectors in float64 (as the training-free merges keep float64
    weights): the merge failed with "both inputs should have same dtype". θ(λ) is now computed in float64 and
    shipped as float64; the student's forward runs in its module's float32, so λ matches the float32 run's."""
    family, theta0, models, features = setup()
    wide = lambda weights: {p: t.double() for p, t in weights.items()}  # noqa: E731
    theta0_64, models_64 = wide(theta0), {d: wide(w) for d, w in models.items()}
    config = MergeRecConfig(**{**FAST, "steps": 20})
    merged, report = mergerec(family, theta0_64, models_64, features, config)
    _, report_32 = mergerec(family, theta0, models, features, config)
    assert all(t.dtype == torch.float64 for t in merged.values())
    for d in models:
        assert report.coefficients[d]["all"] == pytest.approx(report_32.coefficients[d]["all"], abs=1e-4)
    expected = {p: theta0_64[p] + sum(report.coefficients[d]["all"] * (models_64[d][p] - theta0_64[p])
                                      for d in models) for p in theta0}
    for p in theta0:  # float64 arithmetic: a float32 θ(λ) is off by ~1e-7
        torch.testing.assert_close(merged[p], expected[p], rtol=0, atol=1e-13)
    start = MergeRecConfig(init_method="ties", init_params={"density": 0.5}, steps=0, progress=False, item_side="full")
    merged, _ = mergerec(family, theta0_64, models_64, features, start)
    reference = merge("ties", theta0_64, models_64, density=0.5)  # the training-free merge, float64 throughout
    assert all(merged[p].dtype == torch.float64 and torch.allclose(merged[p], reference[p], rtol=0, atol=1e-15)
               for p in theta0)


def test_the_coefficient_cap_also_bounds_the_start():
    """With no step taken the initialization is what ships: λ₀ = 1 (TIES) must start at the cap, not above it."""
    family, theta0, models, features = setup()
    config = MergeRecConfig(init_method="ties", init_params={"density": 0.5}, steps=0, progress=False,
                            item_side="full", init_coefficient=1.0, max_coefficient=0.4)
    _, report = mergerec(family, theta0, models, features, config)
    assert report.initial_coefficient == 0.4
    assert all(v == pytest.approx(0.4) for per in report.coefficients.values() for v in per.values())
    below = MergeRecConfig(**{**config.__dict__, "init_coefficient": -5.0})  # capped from above only: -5 shipped
    _, report = mergerec(family, theta0, models, features, below)
    assert report.initial_coefficient == -0.4


def test_no_pseudo_user_domain_is_named_as_such():
    family, theta0, models, features = setup()
    with pytest.raises(ValueError, match="no pseudo-user domains"):  # it said "different widths []"
        mergerec(family, theta0, models, features, MergeRecConfig(**FAST), pseudo_domains=[])


def test_layer_wise_has_one_coefficient_per_domain_per_group():
    family, theta0, models, features = setup()
    config = MergeRecConfig(**FAST, granularity="layer", logit_norm="teacher_std", sampling="domain")
    _, report = mergerec(family, theta0, models, features, config)
    assert report.groups == ["group_A", "group_b"]
    assert set(report.coefficients) == {"x", "y", "z"}
    assert all(set(v) == {"group_A", "group_b"} for v in report.coefficients.values())
    assert len({round(v, 6) for g in report.coefficients.values() for v in g.values()}) > 1  # they move apart
    assert all(s > 0 and s != 1.0 for s in report.teacher_score_scale)


def test_tensor_wise_is_one_coefficient_per_parameter_tensor():
    from fedmerge.merging.mergerec import group_index
    from fedmerge.models.sequential import SequentialFamily

    sequential = SequentialFamily(hidden=8, n_layers=2, n_heads=2, max_len=4)
    names = list(sequential.initial_weights(6))
    groups, column = group_index(sequential, names, "tensor")
    assert groups == names and sorted(column.values()) == list(range(len(names)))
    assert len(group_index(sequential, names, "layer")[0]) < len(groups)
    # the tiny family's layer groups are its tensors, so both granularities learn the same coefficients
    family, theta0, models, features = setup()
    _, tensor = mergerec(family, theta0, models, features, MergeRecConfig(**FAST, granularity="tensor"))
    _, layer = mergerec(family, theta0, models, features, MergeRecConfig(**FAST, granularity="layer"))
    assert tensor.groups == ["A", "b"]
    for d in models:
        assert [tensor.coefficients[d][g] for g in ("A", "b")] == [layer.coefficients[d][f"group_{g}"] for g in "Ab"]


def test_bad_inputs():
    family, theta0, models, features = setup()
    with pytest.raises(ValueError, match="no item features for domain"):
        mergerec(family, theta0, models, {"x": features["x"]}, MergeRecConfig(**FAST))
    with pytest.raises(ValueError, match="no teacher for domain"):
        mergerec(family, theta0, models, features, MergeRecConfig(**FAST), teachers={"x": models["x"]})
    with pytest.raises(ValueError, match="granularity"):
        MergeRecConfig(granularity="neuron")
    with pytest.raises(ValueError, match="unknown merge method"):
        mergerec(family, theta0, models, features, MergeRecConfig(init_method="fisher", progress=False))


class SplitModel(nn.Module):
    """Item side e = x P; sequence side h = e_last A + b; score = h · e (a split forward like TextSASRec's)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.P = nn.Parameter(torch.eye(dim))
        self.A = nn.Parameter(torch.eye(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def item_representations(self, item_features: torch.Tensor) -> torch.Tensor:
        return item_features @ self.P

    def encode(self, seqs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return items[seqs.clamp(min=0)] @ self.A + self.b

    def logits(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return hidden @ items.T

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        items = self.item_representations(item_features)
        return self.logits(self.encode(seqs, items)[:, -1], items)


class SplitFamily(TinyFamily):
    def build(self, dim: int) -> nn.Module:
        return SplitModel(dim)


def split_setup():
    family, _, models, features = setup()
    gen = torch.Generator().manual_seed(1)
    theta0 = {"P": torch.eye(DIM), "A": torch.eye(DIM), "b": torch.zeros(DIM)}
    for w in models.values():
        w["P"] = torch.eye(DIM) + 0.3 * torch.randn(DIM, DIM, generator=gen)
    return SplitFamily(), theta0, models, features


def test_frozen_item_side_learns_item_coefficients_through_the_input_items():
    family, theta0, models, features = split_setup()
    layer = dict(FAST, granularity="layer", steps=20)
    _, frozen = mergerec(family, theta0, models, features, MergeRecConfig(**{**layer, "item_side": "frozen"}))
    _, full = mergerec(family, theta0, models, features, MergeRecConfig(**layer))
    init = frozen.initial_coefficient
    # P gets a gradient from the pseudo-users' live input items only (the candidates are frozen), A as before
    assert any(abs(c["group_P"] - init) > 1e-3 for c in frozen.coefficients.values())
    assert any(abs(c["group_A"] - init) > 1e-3 for c in frozen.coefficients.values())
    assert any(abs(frozen.coefficients[d]["group_P"] - full.coefficients[d]["group_P"]) > 1e-4 for d in models)
    assert any(abs(c["group_P"] - init) > 1e-3 for c in full.coefficients.values())
    # the first step's loss is the same: frozen representations equal the initial merged model's
    assert frozen.loss_curve[0] == pytest.approx(full.loss_curve[0], rel=1e-5)


def test_frozen_item_side_needs_a_split_module():
    family, theta0, models, features = setup()
    with pytest.raises(ValueError, match="item_representations.*lacks"):
        mergerec(family, theta0, models, features, MergeRecConfig(**{**FAST, "item_side": "frozen"}))


def test_exclude_input_item_masks_the_pseudo_users_own_item():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 1.0]])
    masked = mask_items(scores, torch.tensor([[0], [1]]))
    assert masked[0, 0] < -1e3 and masked[1, 1] < -1e3
    assert torch.equal(masked[0, 1:], scores[0, 1:]) and masked[1, 0] == scores[1, 0]
    # the masked loss is finite and its pseudo-label is the best other item
    loss = distillation_loss(masked, masked, 0.05, 1000.0)
    expected_ce = -torch.log_softmax(masked, 1)[[0, 1], [2, 2]].mean()
    torch.testing.assert_close(loss, expected_ce)
    family, theta0, models, features = setup()
    _, report = mergerec(family, theta0, models, features, MergeRecConfig(**FAST, exclude_input_item=True))
    assert all(np.isfinite(report.loss_curve))


def test_mask_items_masks_every_item_of_a_padded_row_and_nothing_else():
    scores = torch.arange(10.0).view(2, 5)
    masked = mask_items(scores, torch.tensor([[PAD, 3, 1], [4, 0, 2]]))
    expected = scores.clone()
    expected[0, [3, 1]] = expected[1, [4, 0, 2]] = -1e4
    torch.testing.assert_close(masked, expected)


def test_teacher_rollouts_are_greedy_decodes_without_repeats():
    family, _, models, features = setup()
    scorer = family.scorer(models["x"], features["x"])
    n = len(features["x"])
    first = torch.from_numpy(scorer([np.array([i]) for i in range(n)]))
    rollouts = teacher_rollouts(first, scorer, 3)
    assert rollouts.shape == (n, 3) and torch.equal(rollouts[:, 0], torch.arange(n))
    for row in rollouts.tolist():
        assert len(set(row)) == 3
        for k in (1, 2):  # each next item is the teacher's best item outside the prefix
            scores = scorer([np.array(row[:k])])[0]
            scores[row[:k]] = -np.inf
            assert row[k] == int(scores.argmax())
    assert torch.equal(teacher_rollouts(first, scorer, 1), torch.arange(n).view(-1, 1))
    with pytest.raises(ValueError, match="exceeds the catalog"):
        teacher_rollouts(first, scorer, n + 1)


def test_pseudo_users_are_right_aligned_prefixes_scored_by_their_teacher():
    family, _, models, features = setup()
    scorer = family.scorer(models["x"], features["x"])
    n = len(features["x"])
    first = torch.from_numpy(scorer([np.array([i]) for i in range(n)]))
    pseudo = PseudoUsers([teacher_rollouts(first, scorer, 3)], [first], [scorer], [2.0])
    domain_of, items, lengths = torch.zeros(3, dtype=torch.long), torch.tensor([4, 4, 0]), torch.tensor([1, 3, 2])
    seqs = pseudo.sequences(domain_of, items, lengths)
    r4, r0 = pseudo.rollouts[0][4].tolist(), pseudo.rollouts[0][0].tolist()
    assert seqs.tolist() == [[PAD, PAD, 4], r4, [PAD, *r0[:2]]]
    teacher = pseudo.teacher(0, items, lengths)
    torch.testing.assert_close(teacher[0], first[4])  # one-item rows come from the table as stored
    torch.testing.assert_close(teacher[1], torch.from_numpy(scorer([np.array(r4)])[0]) / 2.0)
    torch.testing.assert_close(teacher[2], torch.from_numpy(scorer([np.array(r0[:2])])[0]) / 2.0)
    gen = torch.Generator().manual_seed(0)
    d, i, k = pseudo.draw(gen, 2000, "union")
    assert set(k.tolist()) == {1, 2, 3} and int(i.max()) == n - 1 and not d.any()


def test_rollout_pseudo_users_favour_the_teacher_domain_and_are_deterministic():
    family, theta0, models, features = setup()
    teachers = {d: models["y"] for d in models}
    config = MergeRecConfig(**FAST, pseudo_user_length=3, exclude_input_item=True)
    _, report = mergerec(family, theta0, models, features, config, teachers=teachers)
    _, again = mergerec(family, theta0, models, features, config, teachers=teachers)
    assert report.loss_curve == again.loss_curve
    c = report.coefficients
    assert c["y"]["all"] > c["x"]["all"] + 0.1 and c["y"]["all"] > c["z"]["all"] + 0.1
    # the one-item path is the same as before rollouts existed: L = 1 draws and scores exactly the paper's users
    _, one = mergerec(family, theta0, models, features, MergeRecConfig(**FAST, pseudo_user_length=1))
    _, default = mergerec(family, theta0, models, features, MergeRecConfig(**FAST))
    assert one.loss_curve == default.loss_curve
    with pytest.raises(ValueError, match="exceeds 'tiny'"):
        mergerec(family, theta0, models, features, MergeRecConfig(**FAST, pseudo_user_length=4))


def test_mean_loss_is_the_objective_over_every_pseudo_user():
    family, theta0, models, features = setup()
    config = MergeRecConfig(**FAST)
    objective = PseudoUserObjective(family, theta0, models, features, config)
    lam = torch.tensor([[0.5], [0.1], [0.3]])
    weights = {p: t.detach() for p, t in objective.parameters(lam).items()}
    assert objective.mean_loss(lam, batch_size=4) == pytest.approx(full_loss(family, weights, models, features, config),
                                                                   rel=1e-5)
    # frozen candidates are refreshed from θ(λ), so the frozen path evaluates the same objective as the full one
    family, theta0, models, features = split_setup()
    lam = torch.tensor([[0.7, 0.2, 0.4], [0.1, 0.9, 0.3], [0.5, 0.5, 0.0]])
    values = [PseudoUserObjective(family, theta0, models, features, MergeRecConfig(
        **{**FAST, "item_side": side, "granularity": "layer", "pseudo_user_length": 2})).mean_loss(lam)
        for side in ("frozen", "full")]
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_the_start_objectives_do_not_depend_on_the_thread_count():
    """mean_loss (multi_start's choice) reduced a batch × catalog matrix at the process's thread count: in-process
    (clients' threads) and under Flower (the server's) the recorded start_objectives differed in the last bits."""
    from fedmerge.data.synthetic import make_synthetic_domains
    from fedmerge.models import get_family
    from fedmerge.text.encoder import HashingEncoder
    from tests.conftest import at_one_and_two_threads

    domains = make_synthetic_domains(n_domains=2, n_users=40, n_items=300, n_topics=4, seed=0)
    family = get_family("sequential", hidden=16, n_layers=1, max_len=10)
    encoder = HashingEncoder(dim=32)
    features = {d.name: family.item_features(encoder.encode(d.catalog.texts())) for d in domains}
    theta0 = family.initial_weights(32, seed=0)
    generator = torch.Generator().manual_seed(1)
    models = {d.name: {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in theta0.items()}
              for d in domains}
    config = MergeRecConfig(steps=5, progress=False, multi_start=True, logit_norm="teacher_std")
    one, two = at_one_and_two_threads(lambda: mergerec(family, theta0, models, features, config)[1].start_objectives)
    assert one == two


def test_multi_start_keeps_the_start_with_the_lowest_pseudo_user_objective():
    family, theta0, models, features = setup()
    teachers = {d: models["y"] for d in models}  # θ₀ + τ_y is every teacher
    # a short run stays near its start, so the "only y" start ends with a lower objective than the 0.2 start
    config = MergeRecConfig(**{**FAST, "steps": 5, "lr": 0.01}, multi_start=True)
    _, report = mergerec(family, theta0, models, features, config, teachers=teachers)
    assert set(report.start_objectives) == {"init", "only x", "only y", "only z"}
    assert report.chosen_start == "only y" == min(report.start_objectives, key=report.start_objectives.get)
    assert report.coefficients["y"]["all"] > 0.9 and report.start_objectives["init"] > report.start_objectives["only y"]
    objective = PseudoUserObjective(family, theta0, models, features, config, teachers=teachers)
    lam = torch.tensor([[report.coefficients[d]["all"]] for d in models])
    assert objective.mean_loss(lam) == pytest.approx(report.start_objectives["only y"], rel=1e-6)
    # the "init" run is the single-start run
    _, single = mergerec(family, theta0, models, features, MergeRecConfig(**{**FAST, "steps": 5, "lr": 0.01}),
                         teachers=teachers)
    init_lam = torch.tensor([[single.coefficients[d]["all"]] for d in models])
    assert objective.mean_loss(init_lam) == pytest.approx(report.start_objectives["init"], rel=1e-6)
    assert single.chosen_start == "init" and not single.start_objectives


def test_multi_start_can_rank_runs_on_a_seeded_sample_of_pseudo_users():
    family, theta0, models, features = setup()
    teachers = {d: models["y"] for d in models}
    config = MergeRecConfig(**{**FAST, "steps": 5, "lr": 0.01}, multi_start=True, selection_users=10, seed=3)
    objective = PseudoUserObjective(family, theta0, models, features, config, teachers=teachers)
    sample = objective.users(10, seed=3)
    assert sample.shape == (10, 3) and torch.equal(sample, objective.users(10, seed=3))
    assert len(objective.users()) == 9 + 7 + 11 and torch.equal(objective.users(1000), objective.users())
    _, report = mergerec(family, theta0, models, features, config, teachers=teachers)
    assert report.chosen_start == "only y"
    lam = torch.tensor([[report.coefficients[d]["all"]] for d in models])
    assert objective.mean_loss(lam, sample) == pytest.approx(report.start_objectives["only y"], rel=1e-6)
    assert objective.mean_loss(lam) != pytest.approx(report.start_objectives["only y"], rel=1e-6)


# --- presets ----------------------------------------------------------------------------------------------------


def test_paper_preset_resolves_the_official_scripts_constants():
    ta = MergeRecConfig.from_keys({"preset": "paper"})
    assert (ta.temperature, ta.distill_weight, ta.lr, ta.batch_size, ta.steps) == (0.05, 1000.0, 1e-3, 16, 500)
    assert ta.layer_groups == "transformer" and ta.item_side == "frozen" and ta.pseudo_user_length == 1
    assert not ta.exclude_input_item and ta.item_refresh == 0 and ta.preset == "paper"
    assert ta.init_method == "task_arithmetic" and dict(ta.init_params) == {}  # task arithmetic has no scope
    ties = MergeRecConfig.from_keys({"preset": "paper", "init_method": "ties", "init_params": {"density": 0.3}})
    assert dict(ties.init_params) == {"density": 0.3, "scope": "model"}  # global TIES
    # λ₀: 0.2 for task arithmetic, 1.0 for TIES (resolved when MergeRec starts)
    assert ta.init_coefficient is None and MERGEREC_INITIAL_COEFFICIENT["task_arithmetic"] == 0.2
    assert MERGEREC_INITIAL_COEFFICIENT["ties"] == 1.0
    own = MergeRecConfig.from_keys({"preset": "fedmerge", "init_method": "ties"})
    assert (own.distill_weight, own.lr, own.pseudo_user_length, own.item_refresh) == (10.0, 3e-3, 3, 25)
    assert own.exclude_input_item and own.layer_groups == "family" and own.init_params["scope"] == "tensor"
    # a method whose name fixes its scope keeps it: ties_global and pcb_released trimmed per tensor under "fedmerge"
    for method in ("ties_global", "pcb_released"):
        kept = MergeRecConfig.from_keys({"preset": "fedmerge", "init_method": method})
        assert dict(kept.init_params).get("scope", "model") == "model"


def test_explicit_keys_override_the_preset_and_bad_names_list_valid_ones():
    config = MergeRecConfig.from_keys({"preset": "paper", "steps": 7, "layer_groups": "family",
                                       "init_method": "ties", "init_params": {"scope": "tensor"}})
    assert config.steps == 7 and config.layer_groups == "family" and config.init_params["scope"] == "tensor"
    assert config.distill_weight == 1000.0
    assert MergeRecConfig.from_keys({"steps": 3}) == MergeRecConfig(steps=3)  # no preset: the dataclass defaults
    with pytest.raises(ValueError, match="unknown MergeRec preset 'official'; valid: \\['fedmerge', 'paper'\\]"):
        MergeRecConfig.from_keys({"preset": "official"})
    with pytest.raises(ValueError, match="unknown MergeRec key.*'stepz'.*valid"):
        MergeRecConfig.from_keys({"preset": "paper", "stepz": 3})


def test_transformer_layer_groups_are_blocks_and_text_tower_layers_plus_others():
    from fedmerge.models import get_family

    names = ["adapter.w", "position.weight", "blocks.0.attn.w", "blocks.0.ffn.b", "blocks.1.attn.w",
             "final_norm.weight", "text_tower.layers.0.w", "text_tower.layers.1.w"]
    groups = get_family("sequential").transformer_layer_groups(names)
    assert groups == {"others": ["adapter.w", "position.weight", "final_norm.weight"],
                      "block.0": ["blocks.0.attn.w", "blocks.0.ffn.b"], "block.1": ["blocks.1.attn.w"],
                      "text_tower.0": ["text_tower.layers.0.w"], "text_tower.1": ["text_tower.layers.1.w"]}
    names_groups, column = group_index(TinyFamily(), ["A", "b"], "layer", "transformer")
    assert names_groups == ["others"] and column == {"A": 0, "b": 0}  # no Transformer layers: one group
    family, theta0, models, features = setup()
    config = MergeRecConfig.from_keys({"preset": "paper", **FAST, "steps": 2, "granularity": "layer"})
    _, report = mergerec(family, theta0, models, features, config)
    assert report.groups == ["others"] and report.config["preset"] == "paper"


@pytest.mark.parametrize("robust", ["median", "trimmed_mean", "clipped_average"])
def test_mergerec_starts_from_a_robust_merge(robust):
    """MergeRec's init_method may be a robust registry method: with no steps it returns exactly that merge."""
    family, theta0, models, features = setup()
    config = MergeRecConfig(init_method=robust, steps=0, progress=False, item_side="full")
    merged, report = mergerec(family, theta0, models, features, config)
    assert report.initial_coefficient == 1.0
    reference = merge(robust, theta0, models)
    for p in theta0:
        torch.testing.assert_close(merged[p], reference[p])


def test_a_diverging_loss_stops_with_a_named_error():
    """A NaN or infinite loss stops the optimization at that step (it used to run on and return NaN coefficients
    and a NaN loss curve)."""
    from types import SimpleNamespace

    from fedmerge.errors import NumericalError
    from fedmerge.merging.mergerec import optimize_coefficients

    for bad in (float("nan"), float("inf")):
        calls = []

        def loss(coefficients, *batch, bad=bad, calls=calls):
            calls.append(1)
            return (coefficients.sum() * 0 + (1.0 if len(calls) < 3 else bad))

        objective = SimpleNamespace(refresh_items=lambda c: None, loss=loss,
                                    pseudo=SimpleNamespace(draw=lambda *a: ()))
        with pytest.raises(NumericalError, match=rf"MergeRec's loss is {bad} at step 2 of 10"):
            optimize_coefficients(objective, torch.zeros(2), MergeRecConfig(steps=10, progress=False))
        assert len(calls) == 3


def test_a_seeded_start_follows_mergerecs_seed():
    """MergeRec started from DARE draws DARE's masks from its own seed (they were always seed 0, so every run seed
    shared them); an explicit init_params seed still wins."""
    family, theta0, models, features = setup()
    base = dict(init_method="dare", init_params={"p": 0.5}, steps=0, progress=False, item_side="full")
    starts = {seed: mergerec(family, theta0, models, features, MergeRecConfig(**base, seed=seed)) for seed in (3, 4)}
    for seed, (merged, report) in starts.items():
        reference = merge("dare", theta0, models, p=0.5, seed=seed, scale=report.initial_coefficient)
        for p in theta0:
            torch.testing.assert_close(merged[p], reference[p])
    assert not torch.equal(starts[3][0]["A"], starts[4][0]["A"])
    pinned = MergeRecConfig(**{**base, "init_params": {"p": 0.5, "seed": 9}}, seed=3)
    merged, report = mergerec(family, theta0, models, features, pinned)
    torch.testing.assert_close(merged["A"], merge("dare", theta0, models, p=0.5, seed=9, scale=report.initial_coefficient)["A"])


def test_cosine_logit_norm_distills_raw_cosines_as_the_released_code():
    """logit_norm = "cosine": teacher and student scores multiplied by the family's τ (cos/τ · τ = cos), the scale
    MergeRec's released code distills at T = 0.05; refused for a family without τ."""
    family, theta0, models, features = setup()
    lam = torch.tensor([[0.5], [0.1], [0.3]])
    plain = PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**FAST))
    with pytest.raises(ValueError, match="logit_norm='cosine' needs a family that scores cos/τ"):
        PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**FAST, logit_norm="cosine"))
    family.temperature = 0.25  # scores are cos/τ with τ = 0.25: the objective sees them × 0.25
    cosine = PseudoUserObjective(family, theta0, models, features, MergeRecConfig(**FAST, logit_norm="cosine"))
    assert cosine.pseudo.scales == [4.0, 4.0, 4.0]
    torch.testing.assert_close(cosine.pseudo.one_item[0], plain.pseudo.one_item[0] * 0.25)
    assert cosine.mean_loss(lam) != pytest.approx(plain.mean_loss(lam))
