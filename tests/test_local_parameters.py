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


def test_per_tensor_trimming_that_resets_small_weights_to_theta0_is_named_in_the_run_warnings():
    """ties / pcb keep int(ρ·n) entries of each tensor (as MergeRec's released code): a tensor of fewer than 1/ρ
    entries keeps none and the merge resets it to θ₀; the setup warnings say so for every listed method that does."""
    from fedmerge.merging.methods import merge

    theta0 = {"history_bias": torch.zeros(()), "repeat_user_bias": torch.zeros(2), "norm.bias": torch.zeros(8),
              "item.weight": torch.zeros(100), "last_item_bias": torch.zeros(())}
    models = [{k: v + 0.5 * (i + 1) for k, v in theta0.items()} for i in range(2)]
    local = ["last_item_bias"]
    methods = {"ties": ("ties", {}), "pcb": ("pcb", {}), "ties_global": ("ties_global", {}),
               "dare": ("dare", {"base": "ties", "density": 0.5, "p": 0.0}), "average": ("average", {}),
               "mergerec_taskwise (its ties start)": ("ties", {"density": 0.4})}
    lines = merged_behaviour_warnings(("history_bias", "last_item_bias"), local, theta0, methods)
    assert lines[0].startswith("['history_bias'] describe how each domain's users shop")
    reset_lines = {line.split(" trims every tensor")[0]: line for line in lines[1:]}
    assert sorted(reset_lines) == ["dare", "mergerec_taskwise (its ties start)", "pcb", "ties"]  # global: not per tensor
    assert "(ties density ρ = 0.2): a tensor of fewer than 1/ρ = 5 entries keeps none" in reset_lines["ties"]
    assert "(pcb ratio ρ = 0.1): a tensor of fewer than 1/ρ = 10 entries" in reset_lines["pcb"]
    for label, (method, params) in methods.items():
        if label not in reset_lines or label.startswith("mergerec"):
            continue
        merged = merge(method, theta0, models, **params)
        named = [n for n in theta0 if f"'{n}'" in reset_lines[label]]
        # every weight the line names is merged back to θ₀, every other one (outside local_parameters) moves
        assert named == [n for n in theta0 if n not in local and bool((merged[n] == theta0[n]).all())], label
        assert "is reset to θ₀" in reset_lines[label] and "merge.local_parameters" in reset_lines[label]
    assert "['history_bias', 'repeat_user_bias', 'norm.bias']" in reset_lines["pcb"]
    assert "['history_bias', 'repeat_user_bias']" in reset_lines["mergerec_taskwise (its ties start)"]
    assert merged_behaviour_warnings((), [], theta0, {"average": ("average", {})}) == []

    cfg = load_scenario("quickstart", [*TINY, "model.params.last_item_bias=true", "model.params.history_bias=true",
                                       'merge.local_parameters=["last_item_bias"]', 'merge.methods=["ties", "average"]'])
    warnings = Federation(cfg, initial_weights(cfg)).setup_warnings
    [line] = [w for w in warnings if "is reset to θ₀" in w]  # ties only: average trims nothing
    assert line == merged_behaviour_warnings((), ["last_item_bias"], initial_weights(cfg), {"ties": ("ties", {})})[0]
    assert line.startswith("ties trims every tensor") and "is reset to θ₀, here ['history_bias']" in line
