"""SentenceEncoder(backend="onnxruntime"): validation, cache identity, missing packages, graph key, and (when
fedmerge[onnx] is installed) its embeddings against torch float32 on the real MiniLM."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmerge.errors import FedmergeError
from fedmerge.text import SentenceEncoder, get_encoder, text_key
from fedmerge.text import onnx_graph

HAS_ONNX = all(importlib.util.find_spec(name) is not None for name in onnx_graph.PACKAGES)
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="fedmerge[onnx] (onnxruntime, onnx) is not installed")


@pytest.fixture
def onnx_packages_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend onnxruntime and onnx are installed: constructing the encoder loads nothing, so the checks below need
    neither package."""
    monkeypatch.setattr(onnx_graph, "require_packages", lambda: None)


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'; valid: \['torch', 'onnxruntime'\]"):
        get_encoder("minilm", backend="tensorrt")


def test_onnxruntime_refuses_bf16_and_gpu(onnx_packages_present: None) -> None:
    with pytest.raises(ValueError, match="precision='bfloat16' is torch autocast.*backend='onnxruntime'"):
        SentenceEncoder(backend="onnxruntime", precision="bfloat16")
    with pytest.raises(ValueError, match="CPU only, got device='cuda'"):
        SentenceEncoder(backend="onnxruntime", device="cuda")


def test_onnxruntime_has_its_own_cache_identity(onnx_packages_present: None) -> None:
    torch_encoder = SentenceEncoder(progress=False)
    ort = get_encoder("minilm", backend="onnxruntime")
    assert ort.identity == torch_encoder.identity + ":ort"
    assert text_key(ort.identity, "x") != text_key(torch_encoder.identity, "x")
    assert SentenceEncoder(backend="torch").identity == torch_encoder.identity  # the default is unchanged


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    """The error lists exactly the missing packages: ``missing`` and whichever of the others this machine lacks
    (the optional group is not part of the default install)."""
    expected = [p for p in onnx_graph.PACKAGES if p == missing or importlib.util.find_spec(p) is None]
    monkeypatch.setitem(sys.modules, missing, None)  # find_spec and import now fail for it
    listed = re.escape(repr(expected))
    with pytest.raises(FedmergeError, match=rf"needs the package\(s\) {listed}.*pip install 'fedmerge\[onnx\]'"):
        SentenceEncoder(backend="onnxruntime")


def test_fine_tuning_paths_refuse_onnxruntime(onnx_packages_present: None) -> None:
    encoder = SentenceEncoder(backend="onnxruntime", progress=False)
    with pytest.raises(FedmergeError, match=r"token_states .* needs backend='torch'"):
        encoder.token_states(["a text"], top_layers=1)
    with pytest.raises(FedmergeError, match=r"top_layers .* needs backend='torch'"):
        encoder.top_layers(1)
    assert encoder._model is None  # refused before loading anything


@needs_onnx
def test_graph_key_follows_weight_contents(tmp_path: Path) -> None:
    folders = []
    for name, weights in (("a", b"\x00" * 64), ("b", b"\x01" * 64), ("c", b"\x00" * 64)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text('{"hidden_size": 8}')
        (folder / "model.safetensors").write_bytes(weights)
        folders.append(folder)
    a, b, c = (onnx_graph.graph_key(f) for f in folders)
    assert a != b  # same config, same weight size, other bytes: another graph
    assert a == c  # same contents in another folder: the same graph
    (folders[2] / "config.json").write_text('{"hidden_size": 9}')
    assert onnx_graph.graph_key(folders[2]) != a


@needs_onnx
def test_a_damaged_cached_graph_is_set_aside_and_exported_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A cut-short graph in the cache went straight to onnxruntime: every run failed with InvalidProtobuf until
    someone deleted the file."""
    import onnx
    from onnx import TensorProto, helper

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    path = tmp_path / "onnx" / f"{onnx_graph.graph_key(model)}.onnx"
    path.parent.mkdir()
    path.write_bytes(b"\x08\x07\x12\x03cut")  # the start of a graph, cut short

    def export(source: str, tokenizer: object, target: Path) -> None:  # a one-node graph stands in for the export
        node = helper.make_node("Identity", ["input_ids"], ["out"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1])],
                                  [helper.make_tensor_value_info("out", TensorProto.INT64, [1])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(target))

    monkeypatch.setattr(onnx_graph, "build_graph", export)
    transformer = onnx_graph.OnnxTransformer(str(model), None, 1)
    assert transformer.names == ["input_ids"]
    assert (path.parent / (path.name + ".corrupt")).read_bytes() == b"\x08\x07\x12\x03cut"
    assert "cannot be loaded" in caplog.text and "exported again" in caplog.text


@needs_onnx
@pytest.mark.slow  # exports and fuses MiniLM twice: ≈ 40 s on the shared 2-core machine
def test_onnxruntime_minilm_matches_torch_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path))
    with monkeypatch.context() as strict:  # a graph that fails the check against torch is refused and not kept
        strict.setattr(onnx_graph, "GRAPH_MIN_COSINE", 2.0)
        with pytest.raises(FedmergeError, match="differs from the torch model"):
            SentenceEncoder(progress=False, backend="onnxruntime").encode(["a text"])
    assert list((tmp_path / "onnx").iterdir()) == []
    texts = ["red lipstick for women", "a red lip stick", "steel hammer with wooden handle", "organic green tea", "x",
             "a long product description: " + "soft cotton towel, " * 20]
    full = SentenceEncoder(progress=False, batch_size=4).encode(texts)
    ort = SentenceEncoder(progress=False, batch_size=4, backend="onnxruntime")
    rows = ort.encode(texts)
    cosine = (full * rows).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(rows, axis=1)
    assert rows.dtype == np.float32 and cosine.min() >= 0.9999
    graphs = list((tmp_path / "onnx").iterdir())
    assert [g.suffix for g in graphs] == [".onnx"]  # one graph, no temporary folder left behind
    stamp = graphs[0].stat().st_mtime_ns

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cached graph should have been reused")

    monkeypatch.setattr(onnx_graph, "build_graph", no_rebuild)
    again = SentenceEncoder(progress=False, backend="onnxruntime").encode(texts[:2])
    np.testing.assert_allclose(again, rows[:2], atol=1e-5)
    assert graphs[0].stat().st_mtime_ns == stamp
