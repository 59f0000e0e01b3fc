"""merge.local_parameters' pure functions (fedmerge/merging/local_parameters.py); the run path is tested in
tests/test_recommender.py."""

from __future__ import annotations

import pytest
import torch

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.merging.local_parameters import (
    check_local_parameters,
    from_card,
    merged_behaviour_warnings,
    shared_values,
    with_values,
)
from fedmerge.runners.server import Federation, initial_weights
from tests.test_federation import TINY


def updates(*values: float) -> dict[str, dict[str, torch.Tensor]]:
    return {f"d{i}": {"b": torch.tensor(v), "w": torch.ones(3)} for i, v in enumerate(values)}


def test_shared_value_is_the_median_so_one_client_cannot_set_it():
    assert float(shared_values(updates(-0.3, -0.1), ["b"])["b"]) == pytest.approx(-0.2)  # two clients: their mean
    assert float(shared_values(updates(-0.3, -0.1, -1000.0), ["b"])["b"]) == pytest.approx(-0.3)
    assert float(shared_values(updates(-0.4, -0.1, 5.0, -0.2), ["b"])["b"]) == pytest.approx(-0.15)
    vectors = {d: {"v": torch.tensor(v)} for d, v in {"a": [1.0, 9.0], "b": [2.0, -9.0], "c": [3.0, 0.0]}.items()}
    assert shared_values(vectors, ["v"])["v"].tolist() == [2.0, 0.0]  # element-wise
    with pytest.raises(ValueError, match="at least one update"):
        shared_values({}, ["b"])


def test_with_values_replaces_only_the_named_weights_and_checks_shapes():
    weights = {"b": torch.tensor(0.0), "w": torch.ones(3)}
    out = with_values(weights, {"b": torch.tensor(-0.5, dtype=torch.float64)})
    assert out["b"].dtype == torch.float32 and float(out["b"]) == -0.5 and out["w"] is weights["w"]
    assert float(weights["b"]) == 0.0
    with pytest.raises(FedmergeError, match="local parameter 'b': value of shape \\(2,\\), the model's is \\(\\)"):
        with_values(weights, {"b": torch.zeros(2)})
    assert float(from_card({"b": -0.25}, weights)["b"]) == -0.25
    with pytest.raises(FedmergeError, match="the card's local parameter 'x' is not a weight"):
        from_card({"x": 1.0}, weights)


def test_unknown_or_large_local_parameters_are_refused_with_the_valid_names():
    theta0 = {"last_item_bias": torch.zeros(()), "item.weight": torch.zeros(2000, 4), "norm.bias": torch.zeros(8)}
    check_local_parameters(["last_item_bias", "norm.bias"], theta0)
    with pytest.raises(FedmergeError, match=r"names \['bias'\].*at most 1024 values: \['last_item_bias', 'norm.bias'\]"):
        check_local_parameters(["bias"], theta0)
    with pytest.raises(FedmergeError, match="hold 8000 values; at most 1024"):
        check_local_parameters(["item.weight"], theta0)


def test_behaviour_weights_left_out_of_local_parameters_are_named_in_the_run_warnings():
    theta0 = {"last_item_bias": torch.zeros(()), "history_bias": torch.zeros(()), "norm.bias": torch.zeros(8)}
    behaviour = ("last_item_bias", "history_bias", "history_pooling")  # the model has no history_pooling
    assert merged_behaviour_warnings(behaviour, ["last_item_bias", "history_bias"], theta0) == []
    [line] = merged_behaviour_warnings(behaviour, ["last_item_bias", "norm.bias"], theta0)
    assert line.startswith("['history_bias'] describe how each domain's users shop") and "merge.local_parameters" in line
    assert merged_behaviour_warnings((), [], theta0) == []  # a family without behaviour weights (LAE)

    cfg = load_scenario("quickstart", [*TINY, "model.params.last_item_bias=true", "model.params.history_bias=true",
                                       'merge.local_parameters=["last_item_bias"]'])
    warnings = Federation(cfg, initial_weights(cfg)).results()["warnings"]
    assert [w for w in warnings if "describe how each domain's users shop" in w] == [
        merged_behaviour_warnings(("history_bias",), [], {"history_bias": None})[0]]
    kept = apply_overrides(cfg, ['merge.local_parameters=["last_item_bias", "history_bias"]'])
    assert not any("users shop" in w for w in Federation(kept, initial_weights(kept)).results()["warnings"])
