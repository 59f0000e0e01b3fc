"""Merge methods keep the models' device: nothing they create (weights, DARE's masks, coefficients) is left on the
CPU. Checked on torch's ``meta`` device, which every machine has and which refuses to mix with CPU tensors as CUDA
does."""

from __future__ import annotations

import pytest
import torch

from fedmerge.merging import merge
from fedmerge.merging.registry import describe_methods

NEEDS_VALUES = {"pcb"}  # reads a quantile's value with .item(): fine on CUDA, impossible on meta


@pytest.mark.parametrize("method", [m["name"] for m in describe_methods() if m["name"] not in NEEDS_VALUES])
def test_merge_keeps_the_models_device(method):
    theta0 = {"w": torch.zeros(4, 3, device="meta"), "b": torch.zeros(3, device="meta")}
    gen = torch.Generator().manual_seed(0)
    models = {d: {k: torch.randn(v.shape, generator=gen).to("meta") for k, v in theta0.items()} for d in "xyz"}
    merged = merge(method, theta0, models)
    assert {k: v.device.type for k, v in merged.items()} == {"w": "meta", "b": "meta"}
