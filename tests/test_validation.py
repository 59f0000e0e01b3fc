"""Each rejection rule of fedmerge.validation.check_update, and acceptance of a well-formed update."""

from __future__ import annotations

import pytest
import torch

from fedmerge.errors import FedmergeError
from fedmerge.validation import UpdateRejected, check_update, max_bytes_for, tensor_bytes


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def theta0() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"enc.weight": torch.randn(4, 3, generator=gen), "enc.bias": torch.zeros(4), "head": torch.ones(2)}


def trained(theta0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.1 for k, v in theta0.items()}


def rejected(theta0, update, family="text_lae", **kwargs) -> str:
    with pytest.raises(UpdateRejected) as info:
        check_update(theta0, update, family, expected_family=kwargs.pop("expected_family", "text_lae"), **kwargs)
    assert isinstance(info.value, FedmergeError)
    return info.value.reason


def test_well_formed_update_accepted(theta0):
    update = trained(theta0)
    check_update(theta0, update, "text_lae", expected_family="text_lae", max_bytes=max_bytes_for(theta0))


def test_wrong_family(theta0):
    reason = rejected(theta0, trained(theta0), family="sequential")
    assert "'sequential'" in reason and "'text_lae'" in reason


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
    check_update(theta0, {"w": torch.ones(2, dtype=torch.float64)}, "f", expected_family="f")
    assert "torch.float64" in rejected(theta0, {"w": torch.ones(2)}, family="f", expected_family="f")


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


def test_oversize_single_array(theta0):
    update = trained(theta0)
    limit = tensor_bytes(theta0["enc.weight"]) - 1
    reason = rejected(theta0, update, max_bytes=limit)
    assert "'enc.weight'" in reason and f"{4 * 3 * 4} bytes" in reason


def test_oversize_total(theta0):
    update = trained(theta0)
    total = sum(v.numel() * 4 for v in theta0.values())
    reason = rejected(theta0, update, max_bytes=total - 1)
    assert f"{total} bytes in total" in reason
    check_update(theta0, update, "text_lae", expected_family="text_lae", max_bytes=total)


def test_max_bytes_for(theta0):
    assert max_bytes_for(theta0) == (12 + 4 + 2) * 4
    assert max_bytes_for(theta0, slack=2.0) == 2 * (12 + 4 + 2) * 4
    with pytest.raises(ValueError):
        max_bytes_for(theta0, slack=0.5)


def test_bad_max_bytes_argument(theta0):
    with pytest.raises(ValueError, match="max_bytes"):
        check_update(theta0, trained(theta0), "text_lae", expected_family="text_lae", max_bytes=0)
