"""Atomic writes and client weight round trips of fedmerge.storage."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedmerge.errors import DataError, FedmergeError
from fedmerge.storage import (
    client_metadata,
    client_weights_path,
    load_client_weights,
    load_weights,
    save_client_weights,
    safe_file_stem,
    weights_digest,
    write_bytes_atomic,
    write_json_atomic,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}


def test_client_weights_round_trip(tmp_path):
    saved = {"Beauty": weights(0), "Toys & Games": weights(1)}
    for domain, w in saved.items():
        save_client_weights(tmp_path, domain, w, metadata={"family": "sequential"})
    loaded = load_client_weights(tmp_path)
    assert list(loaded) == ["Beauty", "Toys & Games"]
    for domain, w in saved.items():
        assert loaded[domain].keys() == w.keys()
        assert all(torch.equal(loaded[domain][k], w[k]) and loaded[domain][k].dtype == w[k].dtype for k in w)
    assert client_metadata(tmp_path)["Toys & Games"] == {"family": "sequential", "domain": "Toys & Games"}
    assert client_weights_path(tmp_path, "Toys & Games").name == "Toys___Games.safetensors"


def test_overwrite_replaces_and_leaves_no_temporaries(tmp_path):
    save_client_weights(tmp_path, "A", weights(0))
    save_client_weights(tmp_path, "A", weights(5))
    assert torch.equal(load_client_weights(tmp_path)["A"]["b"], weights(5)["b"])
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["A.safetensors"]


def test_no_saved_weights_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no saved client weights"):
        load_client_weights(tmp_path)


def test_corrupt_weight_file_is_a_clear_error(tmp_path):
    path = save_client_weights(tmp_path, "A", weights(0))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="not a readable safetensors file"):
        load_client_weights(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = write_json_atomic(tmp_path / "results.json", {"ok": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(FedmergeError, match=f"cannot write {target}: disk full"):
        write_bytes_atomic(target, b"partial")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_json_refuses_nan_and_converts_numpy(tmp_path):
    import numpy as np

    path = write_json_atomic(tmp_path / "r.json", {"x": np.float32(0.5), "v": np.arange(3), "t": torch.tensor(2.0)})
    assert json.loads(path.read_text()) == {"x": 0.5, "v": [0, 1, 2], "t": 2.0}
    with pytest.raises(FedmergeError, match="r.json"):
        write_json_atomic(path, {"x": float("nan")})
    assert json.loads(path.read_text())["x"] == 0.5


def test_safe_file_stem():
    assert safe_file_stem("a/b\\c..d") == "a_b_c..d"
    assert safe_file_stem("..hidden") == "hidden"
    with pytest.raises(ValueError):
        safe_file_stem("...")


def test_weights_digest_sees_values_shapes_dtypes_and_names_not_order():
    weights = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)}
    digest = weights_digest(weights)
    assert digest == weights_digest({"b": torch.zeros(2), "a": weights["a"].clone()})  # order and copies: same
    changed = [
        {**weights, "a": weights["a"] + 1e-6},  # one value
        {**weights, "a": weights["a"].reshape(3, 2)},  # same bytes, other shape
        {**weights, "b": torch.zeros(2, dtype=torch.float64)},  # other dtype
        {"a": weights["a"], "c": weights["b"]},  # other name
    ]
    assert len({digest, *(weights_digest(w) for w in changed)}) == 1 + len(changed)


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmerge.storage import save_figure_atomic

    path = tmp_path / "plot.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure_atomic(fig, path)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    fig, ax = plt.subplots()
    ax.set_title("$\\unknowncommand$")  # mathtext fails while drawing: the earlier image must survive intact
    with pytest.raises(ValueError):
        save_figure_atomic(fig, path)
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_result_files_get_the_mode_the_umask_gives_a_new_file(tmp_path, umask):
    """A results.json or a weight file is created as ``open()`` would create it (0666 less the umask), not 0600:
    a shared results folder stays readable by the group the user's umask allows."""
    old = os.umask(umask)
    try:
        json_path = write_json_atomic(tmp_path / "results.json", {"a": 1})
        raw_path = write_bytes_atomic(tmp_path / "results.csv", b"a\n")
        weights_path = save_client_weights(tmp_path, "Beauty", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    for path in (json_path, raw_path, weights_path):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_an_explicit_mode_wins_over_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        path = write_bytes_atomic(tmp_path / "key.pem", b"secret", mode=0o600)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600


def test_saved_weights_are_byte_identical_for_the_same_weights_and_metadata(tmp_path):
    """safetensors writes its metadata map in a random order: two identical runs left files whose sha256 differed."""
    import hashlib

    import torch

    from fedmerge.storage import load_weights, save_weights

    weights = {"b": torch.arange(3.0), "a": torch.ones(2, 2, dtype=torch.float64)}
    metadata = {f"key{i}": f"value {i} é" for i in range(8)}
    digests = {hashlib.sha256(save_weights(tmp_path / f"w{i}.safetensors", weights, metadata).read_bytes()).hexdigest()
               for i in range(6)}
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(tmp_path / "w0.safetensors", "pt") as handle:
        assert handle.metadata() == metadata
    loaded = load_weights(tmp_path / "w0.safetensors")
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)
