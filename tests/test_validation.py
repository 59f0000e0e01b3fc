"""Each rejection rule of fedmerge.validation (check_update, fixed weights, magnitudes, norm screening, metrics),
and acceptance of a well-formed update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmerge.errors import FedmergeError
from fedmerge.validation import (
    NormScreen,
    UpdateRejected,
    check_eval_metrics,
    check_fixed,
    check_magnitude,
    check_train_metrics,
    check_payload,
    check_update,
    NPY_HEADER_BYTES,
    norm_limits,
    scale_task_vector,
    screen_norms,
    task_vector_norm,
    tensor_bytes,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def theta0() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"enc.weight": torch.randn(4, 3, generator=gen), "enc.bias": torch.zeros(4), "head": torch.ones(2)}


def trained(theta0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.1 for k, v in theta0.items()}


def rejected(theta0, update, **kwargs) -> str:
    with pytest.raises(UpdateRejected) as info:
        check_update(theta0, update, **kwargs)
    assert isinstance(info.value, FedmergeError)
    return info.value.reason


def test_well_formed_update_accepted(theta0):
    update = trained(theta0)
    check_update(theta0, update)


def test_missing_and_extra_names(theta0):
    update = trained(theta0)
    del update["head"]
    update["rogue"] = torch.zeros(1)
    reason = rejected(theta0, update)
    assert "missing parameters 'head'" in reason and "unexpected parameters 'rogue'" in reason


def test_many_missing_names_are_abbreviated():
    theta0 = {f"p{i:02d}": torch.zeros(1) for i in range(12)}
    reason = rejected(theta0, {})
    assert "(+7 more)" in reason and "'p00'" in reason and "'p11'" not in reason


def test_wrong_shape(theta0):
    update = trained(theta0)
    update["enc.weight"] = torch.zeros(3, 4)
    reason = rejected(theta0, update)
    assert "'enc.weight'" in reason and "(3, 4)" in reason and "(4, 3)" in reason


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_wrong_dtype(theta0, dtype):
    update = trained(theta0)
    update["enc.bias"] = update["enc.bias"].to(dtype)
    reason = rejected(theta0, update)
    assert "'enc.bias'" in reason and str(dtype) in reason


def test_dtype_follows_theta0():
    theta0 = {"w": torch.zeros(2, dtype=torch.float64)}
    check_update(theta0, {"w": torch.ones(2, dtype=torch.float64)})
    assert "torch.float64" in rejected(theta0, {"w": torch.ones(2)})


def test_integer_theta0_is_still_refused():
    theta0 = {"steps": torch.zeros(2, dtype=torch.int64)}
    assert "non-float" in rejected(theta0, {"steps": torch.ones(2, dtype=torch.int64)})


@pytest.mark.parametrize(
    ("bad", "expected"), [(float("nan"), "(1 NaN, 0 ±Inf)"), (float("inf"), "(0 NaN, 1 ±Inf)"), (-float("inf"), "(0 NaN, 1 ±Inf)")]
)
def test_non_finite(theta0, bad, expected):
    update = trained(theta0)
    update["head"][1] = bad
    reason = rejected(theta0, update)
    assert "'head'" in reason and expected in reason


def test_not_a_tensor(theta0):
    update = trained(theta0)
    update["head"] = [1.0, 1.0]
    assert "is a list, not a tensor" in rejected(theta0, update)


def test_not_a_mapping(theta0):
    assert "not a mapping" in rejected(theta0, [1, 2, 3])


def test_sparse_tensor_refused(theta0):
    update = trained(theta0)
    update["enc.weight"] = update["enc.weight"].to_sparse()
    assert "dense" in rejected(theta0, update)


def test_payload_sizes_are_bounded_before_decoding(theta0):
    exact = {name: tensor_bytes(value) + 128 for name, value in theta0.items()}  # values + a usual .npy header
    check_payload(theta0, exact)
    header_room = NPY_HEADER_BYTES - 128
    with pytest.raises(UpdateRejected, match=r"'enc.weight' is \d+ bytes serialized, over the limit of 4144 bytes"):
        check_payload(theta0, {**exact, "enc.weight": exact["enc.weight"] + header_room + 1})
    check_payload(theta0, {**exact, "enc.weight": 2 * tensor_bytes(theta0["enc.weight"]) + NPY_HEADER_BYTES}, slack=2.0)
    with pytest.raises(UpdateRejected, match="unexpected parameters 'rogue'"):  # names first: nothing decoded
        check_payload(theta0, {**exact, "rogue": 8})
    with pytest.raises(ValueError, match="slack"):
        check_payload(theta0, exact, slack=0.5)


# ---- beyond the format (issue 19): fixed weights, magnitudes, norms against the other clients, metrics --------

def test_fixed_weights_must_equal_theta0_bit_for_bit(theta0):
    update = trained(theta0)
    update["enc.bias"] = theta0["enc.bias"].clone()
    check_fixed(theta0, update, ["enc.bias"])
    update["enc.bias"][0] = 1e-7
    with pytest.raises(UpdateRejected, match=r"fixed parameters 'enc.bias' differ from θ₀"):
        check_fixed(theta0, update, ["enc.bias"])


def test_routed_family_declares_its_router_buffers_fixed():
    from fedmerge.models.sequential import SequentialFamily

    routed = SequentialFamily(adapter="routed", hidden=8, n_heads=1, n_layers=1, adapter_width=8, n_experts=2)
    theta0 = routed.initial_weights(8, catalog_features=[torch.randn(6, 8)])
    assert routed.fixed_parameters(theta0) == {"adapter.centre", "adapter.centroids"}
    assert SequentialFamily(hidden=8, n_heads=1).fixed_parameters(theta0) == frozenset()
    with_fallback = SequentialFamily(adapter="routed", hidden=8, n_heads=1, n_layers=1, adapter_width=8, n_experts=2,
                                     routed_unseen="theta0")
    theta0 = with_fallback.initial_weights(8, catalog_features=[torch.randn(6, 8)])
    fixed = with_fallback.fixed_parameters(theta0)
    base = {n for n in theta0 if n.startswith("adapter.base.")}
    assert base and fixed == {"adapter.centre", "adapter.centroids", "adapter.unseen_threshold", *base}


def test_huge_but_finite_weights_rejected_and_norm_has_no_overflow(theta0):
    update = trained(theta0)
    update["head"] = torch.full((2,), 3e38)
    with pytest.raises(UpdateRejected, match=r"'head' has a weight of magnitude 3e\+38, over federation.max_abs_value"):
        check_magnitude(update, 1e4)
    check_magnitude(trained(theta0), 1e4)
    assert task_vector_norm(theta0, update) == pytest.approx(3e38 * 2**0.5, rel=1e-6)  # float32 would give inf


def test_norm_limit_is_a_multiple_of_the_other_clients_upper_median():
    norms = {"a": 1.0, "b": 2.0, "c": 1e6}
    # an even number of others: the larger middle value (so one client cannot pull another's bar down)
    assert norm_limits(norms, 3.0, 0.0) == {"a": 3 * 1e6, "b": 3 * 1e6, "c": 3 * 2.0}
    screen = screen_norms(norms, 3.0, 0.0, "reject")
    assert set(screen.rejected) == {"c"} and screen.scale == {"a": 1.0, "b": 1.0} and not screen.clipped
    assert "task-vector norm 1e+06 exceeds 6" in screen.rejected["c"]
    # an odd number of others: one above their median
    assert norm_limits({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, 3.0, 0.0)["d"] == 3 * 3.0
    # one or two clients: no majority to compare with (honest Amazon text-LAE FedAvg updates differ 5x: Pantry 1.2,
    # Toys 6.1, and rejecting one of two stopped the run), so only the absolute cap applies; 0 switches either off
    assert not screen_norms({"Pantry": 1.2, "Toys": 6.1}, 3.0, 0.0, "reject").rejected
    assert set(screen_norms({"a": 1.0, "x": 100.0}, 3.0, 10.0, "reject").rejected) == {"x"}
    assert not screen_norms({"a": 1e9}, 3.0, 0.0, "reject").rejected
    assert set(screen_norms({"a": 1e9}, 3.0, 10.0, "reject").rejected) == {"a"}
    assert not screen_norms(norms, 0.0, 0.0, "reject").rejected


def test_a_client_that_sends_theta0_back_cannot_get_an_honest_client_rejected():
    """Measured (quickstart, hashing encoder, seed 2): honest norms 1.915 and 1.273 and a θ₀ copy (0). With the
    median of the others, the θ₀ copy halved the first client's bar (3 × median(1.273, 0) = 1.91) and rejected it."""
    screen = screen_norms({"synth-0": 1.915, "synth-1": 1.273, "synth-2": 0.0}, 3.0, 0.0, "reject")
    assert not screen.rejected and not screen.clipped
    # four clients (a reviewer's case: with the upper median of 3 others the θ₀ copy still rejected "a")
    honest = {"a": 1.915, "b": 1.273, "c": 0.63}
    assert not screen_norms({**honest, "attacker": 0.0}, 3.0, 0.0, "reject").rejected
    # in general an honest client's reference stays at least the upper median of the other honest norms
    rng = np.random.default_rng(0)
    for n in range(2, 9):
        norms = dict(enumerate(rng.uniform(0.5, 2.0, n)))
        for low in (0.0, 1e-3):
            limits = norm_limits({**norms, "attacker": low}, 3.0, 0.0)
            for k, own in norms.items():
                others = sorted(v for j, v in norms.items() if j != k)
                if len(others) >= 1:
                    assert limits[k] >= 3.0 * others[len(others) // 2] - 1e-12


def test_norm_clip_scales_to_the_limit():
    screen = screen_norms({"a": 1.0, "b": 2.0, "c": 9.0}, 3.0, 4.0, "clip")
    assert not screen.rejected and set(screen.clipped) == {"c"}
    assert screen.scale == {"a": 1.0, "b": 1.0, "c": pytest.approx(4.0 / 9.0)}  # min(3 × 2, cap 4) / 9
    with pytest.raises(ValueError, match=r"valid|one of \['reject', 'clip'\]"):
        screen_norms({"a": 1.0}, 3.0, 0.0, "drop")


@pytest.mark.parametrize("users", [float("nan"), float("inf"), 0, -5, 1e9, None, "many", 0.1, 200.5])
def test_user_count_must_be_whole_positive_and_bounded(users):  # 0.1 and 200.5 users were accepted
    metrics = {"loss": 0.5} if users is None else {"loss": 0.5, "num-users": users}
    with pytest.raises(UpdateRejected, match=r"'num-users' = .* not a whole number in \(0, federation.max_num_users"):
        check_train_metrics(metrics, "num-users", 1e8)


def test_non_finite_training_metrics_are_dropped():
    kept, dropped = check_train_metrics({"num-users": 200, "loss": float("nan"), "epochs": 3}, "num-users", 1e8)
    assert kept == {"num-users": 200.0, "epochs": 3.0} and dropped == ["loss"]


def test_evaluation_metrics_must_be_the_expected_names_in_range():
    expected = {"recall@10", "ndcg@10", "users"}
    assert check_eval_metrics({"recall@10": 0.5, "ndcg@10": 0.2, "users": 40}, expected, "users") == []
    problems = check_eval_metrics({"recall@10": float("nan"), "ndcg@10": 1.5, "users": -1, "accuracy": 1.0},
                                  expected, "users")
    assert problems == ["unexpected metrics 'accuracy'", "ndcg@10 = 1.5 is not in [0, 1]",
                        "recall@10 = nan is not in [0, 1]", "users = -1 is not a whole number >= 0"]
    assert check_eval_metrics({"recall@10": 0.5}, expected, "users") == ["missing metrics 'ndcg@10', 'users'"]


def test_evaluation_metrics_must_be_consistent_with_each_other():
    """One target per user: NDCG@K ≤ Recall@K, both grow with K, and masking only removes items ranked against the
    target. A client inventing its own figures in [0, 1] passed when it broke these."""
    from fedmerge.metrics import evaluate_batches, evaluation_batches

    names = [f"{m}@{k}{s}" for m in ("recall", "ndcg") for k in (5, 10) for s in ("", "_masked")] + ["users"]
    honest = {"recall@5": 0.2, "recall@10": 0.3, "ndcg@5": 0.1, "ndcg@10": 0.15, "recall@5_masked": 0.25,
              "recall@10_masked": 0.35, "ndcg@5_masked": 0.12, "ndcg@10_masked": 0.17, "users": 10}
    assert check_eval_metrics(honest, names, "users") == []
    assert check_eval_metrics({**honest, "recall@5": 0.4}, names, "users") == [
        "recall@5 = 0.4 exceeds recall@10 = 0.3 (a hit in the top 5 is one in the top 10)",
        "recall@5 = 0.4 exceeds recall@5_masked = 0.25 (masking only removes items ranked against the target)"]
    assert check_eval_metrics({**honest, "ndcg@10": 0.9, "ndcg@10_masked": 0.95}, names, "users") == [
        "ndcg@10 = 0.9 exceeds recall@10 = 0.3 (one target per user: NDCG@K ≤ Recall@K)",
        "ndcg@10_masked = 0.95 exceeds recall@10_masked = 0.35 (one target per user: NDCG@K ≤ Recall@K)"]
    # every real evaluation passes, ties included (random scores with many ties on a tiny catalog)
    from tests.test_lae import random_domain

    domain = random_domain()
    rng = np.random.default_rng(0)
    batches = evaluation_batches(domain, "test", batch_size=7)
    for _ in range(5):
        table = rng.integers(0, 3, size=(len(domain.test_target), domain.n_items)).astype(np.float64)
        rows = iter(range(len(table)))
        metrics = evaluate_batches(lambda seqs: np.stack([table[next(rows)] for _ in seqs]), batches,
                                   domain.n_items, ks=(1, 5, 10))
        expected = [f"{m}@{k}{s}" for m in ("recall", "ndcg") for k in (1, 5, 10) for s in ("", "_masked")]
        assert check_eval_metrics(metrics, [*expected, "users"], "users") == []


@pytest.mark.parametrize("action", ["reject", "clip"])
def test_a_non_finite_norm_is_rejected_and_does_not_move_the_others_limits(action):
    screen = screen_norms({"a": 1.0, "b": 1.1, "c": 0.9, "d": float("nan"), "e": float("inf")}, 3.0, 0.0, action)
    assert sorted(screen.rejected) == ["d", "e"] and "not finite" in screen.rejected["d"]
    assert screen.scale == {"a": 1.0, "b": 1.0, "c": 1.0} and not screen.clipped


# ---- boundaries the rules above did not pin (mutants of each survived the suite) --------------------------------


def test_fixed_weights_one_ulp_off_are_rejected(theta0):
    """Bit for bit: a change below allclose's tolerance is still a change."""
    update = dict(theta0)
    update["head"] = torch.nextafter(theta0["head"], theta0["head"] + 1)
    assert not torch.equal(update["head"], theta0["head"]) and torch.allclose(update["head"], theta0["head"])
    with pytest.raises(UpdateRejected, match="fixed parameters"):
        check_fixed(theta0, update, ["head"])


def test_magnitude_limit_is_inclusive_and_symmetric():
    check_magnitude({"w": torch.tensor([1e4, -1e4])}, 1e4)
    for value in (1.001e4, -1.001e4):
        with pytest.raises(UpdateRejected, match="magnitude"):
            check_magnitude({"w": torch.tensor([0.0, value])}, 1e4)


def test_a_fractional_user_count_is_refused():
    expected = {"recall@10", "ndcg@10", "users"}
    assert check_eval_metrics({"recall@10": 0.5, "ndcg@10": 0.2, "users": 10.5}, expected, "users") == [
        "users = 10.5 is not a whole number >= 0"]
    assert check_eval_metrics({"recall@10": 0.5, "ndcg@10": 0.2, "users": 10.0}, expected, "users") == []


def test_a_norm_at_the_limit_is_kept_and_just_above_it_is_not():
    """Limit 3 × the other clients' upper median (1): exactly 3 stays, 3.0001 goes (rejected or scaled to 3)."""
    assert screen_norms({"a": 1.0, "b": 1.0, "c": 3.0}, 3.0, 0.0, "reject") == NormScreen(
        {"a": 1.0, "b": 1.0, "c": 1.0}, {}, {})
    assert set(screen_norms({"a": 1.0, "b": 1.0, "c": 3.0001}, 3.0, 0.0, "reject").rejected) == {"c"}
    assert screen_norms({"a": 1.0, "b": 1.0, "c": 6.0}, 3.0, 0.0, "clip").scale["c"] == 0.5


def test_scale_task_vector_moves_the_update_towards_the_reference_in_float64():
    reference = {"w": torch.tensor([1.0, 2.0, 3.0]), "h": torch.tensor([0.0], dtype=torch.float64)}
    update = {"w": torch.tensor([3.0, 2.0, -1.0]), "h": torch.tensor([1e-300], dtype=torch.float64)}
    scaled = scale_task_vector(reference, update, 0.25)
    torch.testing.assert_close(scaled["w"], torch.tensor([1.5, 2.0, 2.0]), rtol=0, atol=0)
    assert scaled["h"].dtype == torch.float64 and float(scaled["h"]) == 0.25e-300
    assert task_vector_norm(reference, scaled) == pytest.approx(0.25 * task_vector_norm(reference, update))
    # float32 weights: one rounding (float64, then cast), not one per float32 operation
    gen = torch.Generator().manual_seed(0)
    ref, upd = torch.randn(10_000, generator=gen), torch.randn(10_000, generator=gen)
    exact = (ref.double() + (upd.double() - ref.double()) / 3).float()
    in_float32 = ref + (upd - ref) / 3
    assert not torch.equal(in_float32, exact)  # the premise: the two differ somewhere
    scaled = scale_task_vector({"w": ref}, {"w": upd}, 1 / 3)["w"]
    assert scaled.dtype == torch.float32 and torch.equal(scaled, exact)
