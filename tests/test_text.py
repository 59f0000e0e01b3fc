"""Text encoders and the embedding cache (HashingEncoder for speed; one real MiniLM test)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from fedmerge.data.domain import ItemCatalog
from fedmerge.errors import FedmergeError
from fedmerge.text import (
    EmbeddingCache,
    HashingEncoder,
    SentenceEncoder,
    default_cache_root,
    encode_catalog,
    encode_texts,
    get_encoder,
    mean_pool,
    text_key,
)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


class CountingEncoder:
    """Wraps an encoder and records every batch it is asked to encode."""

    def __init__(self, inner: HashingEncoder, identity: str | None = None) -> None:
        self.inner = inner
        self.identity = identity or inner.identity
        self.dim = inner.dim
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)


TEXTS = ["red lipstick", "plastic wrap 100 sq ft", "lego city police car", "matte red lipstick"]


# --- HashingEncoder -------------------------------------------------------------------------------------------


def test_hashing_is_deterministic_and_unit_norm() -> None:
    a = HashingEncoder(dim=32, ngram_sizes=(2, 3), seed=5).encode(TEXTS)
    b = HashingEncoder(dim=32, ngram_sizes=(2, 3), seed=5).encode(list(reversed(TEXTS)))[::-1]
    assert a.dtype == np.float32 and a.shape == (4, 32)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    assert not np.array_equal(a, HashingEncoder(dim=32, ngram_sizes=(2, 3), seed=6).encode(TEXTS))


def test_hashing_is_stable_across_processes_with_different_hash_seeds() -> None:
    code = "from fedmerge.text import HashingEncoder; print(HashingEncoder(dim=16).encode(['Goya lentils']).tobytes().hex())"
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(result.stdout.strip())
    assert outputs == {HashingEncoder(dim=16).encode(["Goya lentils"]).tobytes().hex()}


def test_hashing_counts_repeated_ngrams() -> None:
    # " aaaa " has trigrams " aa", "aaa", "aaa", "aa ": three distinct buckets (no collision in 4096 dims) with
    # counts 1, 2, 1 up to sign, so the normalized magnitudes are (1, 1, 2) / sqrt(6).
    row = HashingEncoder(dim=4096).encode(["AAAA"])[0]
    magnitudes = np.sort(np.abs(row[row != 0]))
    np.testing.assert_allclose(magnitudes, np.array([1, 1, 2]) / np.sqrt(6), rtol=1e-6)


def test_hashing_text_without_ngrams_is_zero_row() -> None:
    out = HashingEncoder(dim=8, ngram_sizes=(5,)).encode(["ab", "abcdef"])
    assert not out[0].any() and np.isclose(np.linalg.norm(out[1]), 1.0)


def test_hashing_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="dim"):
        HashingEncoder(dim=0)
    with pytest.raises(ValueError, match="n-gram"):
        HashingEncoder(ngram_sizes=())


# --- get_encoder -----------------------------------------------------------------------------------------------


def test_get_encoder_names_and_params() -> None:
    enc = get_encoder("hashing", dim=12, seed=3)
    assert isinstance(enc, HashingEncoder) and enc.dim == 12 and "seed3" in enc.identity
    minilm = get_encoder("minilm", max_length=32)
    assert isinstance(minilm, SentenceEncoder) and minilm.dim == 384 and "len32" in minilm.identity
    assert minilm._model is None  # weights load lazily, on the first encode


def test_get_encoder_unknown_param_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['dims'\].*'dim'"):
        get_encoder("hashing", dims=12)
    with pytest.raises(ValueError, match="max_length"):
        get_encoder("minilm", maxlen=12)


def test_missing_model_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FedmergeError, match="no-such-model.*does not exist"):
        get_encoder(str(missing))
    with pytest.raises(FedmergeError, match="has no config.json"):
        SentenceEncoder(tmp_path)


def test_identity_separates_settings() -> None:
    base = SentenceEncoder()
    assert base.identity == SentenceEncoder(batch_size=7, progress=False).identity  # no effect on output
    assert base.identity != SentenceEncoder(max_length=32).identity
    assert base.identity != SentenceEncoder(normalize=False).identity
    assert SentenceEncoder(precision="bfloat16").identity == base.identity + ":bf16"
    with pytest.raises(ValueError, match=r"unknown precision 'int8'; valid: \['float32', 'bfloat16'\]"):
        get_encoder("minilm", precision="int8")
    assert text_key(base.identity, "x") != text_key(SentenceEncoder(max_length=32).identity, "x")
    assert text_key("a", "x") != text_key("a", "y")


def test_identity_covers_the_model_files_bytes_and_the_position_limit(tmp_path) -> None:
    """Two model folders with the same config and weight files of the same size (a fine-tuned copy, a model replaced
    in place) had one identity, so the embedding cache served one model's rows for the other; a max_length past
    the model's positions failed only on the first long text (a raw tensor-size error)."""
    from fedmerge.errors import FedmergeError

    config = json.dumps({"hidden_size": 8, "max_position_embeddings": 128})
    folders = []
    for name, weights, vocab in (("a", b"1" * 100, "x"), ("b", b"2" * 100, "x"), ("c", b"1" * 100, "y")):
        folder = tmp_path / name / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(config)
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "vocab.txt").write_text(vocab)
        folders.append(folder)
    a, b, c = (SentenceEncoder(f, progress=False) for f in folders)
    assert len({a.identity, b.identity, c.identity}) == 3  # other weight bytes, other tokenizer: other encoders
    assert a.earlier_identities == b.earlier_identities  # the coarse identity older model cards hold
    assert SentenceEncoder(folders[0], progress=False).identity == a.identity
    assert SentenceEncoder(folders[0], max_length=128).dim == 8
    with pytest.raises(FedmergeError, match=r"max_length = 129 exceeds the 128 positions"):
        SentenceEncoder(folders[0], max_length=129)
    # RoBERTa-style configs count two positions (padding_idx + 1) that no token uses: 514 means 512
    (folders[0] / "config.json").write_text(json.dumps({"hidden_size": 8, "max_position_embeddings": 514,
                                                        "model_type": "roberta"}))
    assert SentenceEncoder(folders[0], max_length=512).max_length == 512
    with pytest.raises(FedmergeError, match=r"max_length = 513 exceeds the 512 positions"):
        SentenceEncoder(folders[0], max_length=513)


def test_mean_pool_ignores_masked_tokens() -> None:
    import torch

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask).numpy(), [[2.0, 3.0]])


def test_minilm_from_package_embeds_similar_texts_closer() -> None:
    enc = SentenceEncoder(progress=False, batch_size=2)
    texts = ["red lipstick for women", "a red lip stick", "steel hammer with wooden handle"]
    out = enc.encode(texts)
    assert out.shape == (3, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    sims = out @ out.T
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]
    # batching sorts texts by length; rows must still come back in input order and not depend on padding
    single = np.vstack([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(out, single, atol=1e-5)


def test_bfloat16_minilm_stays_within_cosine_0999_of_float32() -> None:
    texts = ["red lipstick for women", "a red lip stick", "steel hammer with wooden handle", "organic green tea, 20 bags"]
    full = SentenceEncoder(progress=False).encode(texts)
    half = SentenceEncoder(progress=False, precision="bfloat16").encode(texts)
    assert half.dtype == np.float32 and not np.array_equal(full, half)  # the bf16 path did run
    cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosine.min() >= 0.999


def test_a_half_precision_checkpoint_runs_in_float32(tmp_path: Path) -> None:
    """transformers' default dtype="auto" loaded an fp16 checkpoint in fp16: embeddings computed in half precision
    under a float32 identity, and encoder fine-tuning failed on mixed dtypes."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from fedmerge.text import default_model_path

    folder = tmp_path / "minilm-fp16"
    shutil.copytree(default_model_path(), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    encoder = SentenceEncoder(folder, progress=False)
    encoder.encode(["red running shoes"])
    assert encoder._model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in encoder.top_layers(1).parameters())


# --- cache -----------------------------------------------------------------------------------------------------


def test_cache_hit_returns_identical_rows_without_encoding(tmp_path: Path) -> None:
    enc = CountingEncoder(HashingEncoder(dim=16))
    first = encode_texts(enc, TEXTS, cache=EmbeddingCache(tmp_path))
    np.testing.assert_array_equal(first, HashingEncoder(dim=16).encode(TEXTS))
    again = encode_texts(enc, TEXTS, cache=EmbeddingCache(tmp_path))  # fresh instance: reads from disk
    np.testing.assert_array_equal(first, again)
    assert enc.calls == [TEXTS]


def test_partial_cache_encodes_only_new_texts(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    enc = CountingEncoder(HashingEncoder(dim=16))
    encode_texts(enc, TEXTS[:2], cache=cache)
    wanted = [TEXTS[2], TEXTS[0], "new text", TEXTS[2], TEXTS[1]]
    out = encode_texts(enc, wanted, cache=cache)
    assert enc.calls == [TEXTS[:2], [TEXTS[2], "new text"]]  # duplicates encoded once
    np.testing.assert_array_equal(out, HashingEncoder(dim=16).encode(wanted))
    assert len(list(cache.folder(enc.identity).glob("shard-*.npz"))) == 2


def test_identity_change_misses_cache(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    encode_texts(HashingEncoder(dim=16), TEXTS, cache=cache)
    other = CountingEncoder(HashingEncoder(dim=16), identity="hashing:other")
    encode_texts(other, TEXTS, cache=cache)
    assert other.calls == [TEXTS]
    assert cache.folder("hashing:other") != cache.folder(HashingEncoder(dim=16).identity)


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_shard_warns_and_reencodes(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    enc = CountingEncoder(HashingEncoder(dim=16))
    expected = encode_texts(enc, TEXTS, cache=EmbeddingCache(tmp_path))
    (shard,) = EmbeddingCache(tmp_path).folder(enc.identity).glob("shard-*.npz")
    if damage == "garbage":
        shard.write_bytes(b"not a zip file")
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="fedmerge.text.cache"):
        out = encode_texts(enc, TEXTS, cache=EmbeddingCache(tmp_path))
    np.testing.assert_array_equal(out, expected)
    assert enc.calls == [TEXTS, TEXTS]
    assert "unreadable" in caplog.text and shard.with_suffix(".corrupt").exists()
    encode_texts(enc, TEXTS, cache=EmbeddingCache(tmp_path))  # the new shard serves the next run
    assert len(enc.calls) == 2


def test_shard_with_wrong_dim_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path)
    identity = HashingEncoder(dim=16).identity
    cache.put(identity, [text_key(identity, t) for t in TEXTS], np.ones((4, 8), dtype=np.float32))
    enc = CountingEncoder(HashingEncoder(dim=16))
    with caplog.at_level(logging.WARNING, logger="fedmerge.text.cache"):
        out = encode_texts(enc, TEXTS, cache=EmbeddingCache(tmp_path))
    assert enc.calls == [TEXTS] and out.shape == (4, 16) and "shape" in caplog.text


def test_shards_from_another_process_are_picked_up(tmp_path: Path) -> None:
    reader, writer = EmbeddingCache(tmp_path), EmbeddingCache(tmp_path)
    enc = CountingEncoder(HashingEncoder(dim=16))
    encode_texts(enc, TEXTS[:1], cache=reader)  # reader has indexed the folder once
    encode_texts(enc, TEXTS, cache=writer)
    encode_texts(enc, TEXTS, cache=reader)
    assert enc.calls == [TEXTS[:1], TEXTS[1:]]


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    encode_texts(HashingEncoder(dim=16), TEXTS, cache=EmbeddingCache(tmp_path))
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].startswith("shard-") and files[0].endswith(".npz")


def test_cache_false_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path))
    out = encode_texts(HashingEncoder(dim=16), TEXTS, cache=False)
    assert out.shape == (4, 16) and not any(tmp_path.iterdir())


def test_default_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path))
    assert default_cache_root() == tmp_path / "embeddings"
    encode_texts(HashingEncoder(dim=16), TEXTS)
    assert list((tmp_path / "embeddings").rglob("shard-*.npz"))


def test_bad_encoder_output_and_bad_texts_raise(tmp_path: Path) -> None:
    class WrongShape(HashingEncoder):
        def encode(self, texts: Sequence[str]) -> np.ndarray:
            return np.zeros((len(texts), self.dim + 1), dtype=np.float32)

    with pytest.raises(FedmergeError, match=r"returned shape \(4, 17\)"):
        encode_texts(WrongShape(dim=16), TEXTS, cache=EmbeddingCache(tmp_path))
    with pytest.raises(ValueError, match="item 1 is int"):
        encode_texts(HashingEncoder(), ["a", 3], cache=EmbeddingCache(tmp_path))  # type: ignore[list-item]


def test_encode_catalog_uses_catalog_texts(tmp_path: Path) -> None:
    catalog = ItemCatalog(
        ids=("a", "b"),
        fields=({"title": "Goya Dry Lentils", "brand": "Goya", "category": ""}, {"title": "Saran Wrap"}),
    )
    out = encode_catalog(HashingEncoder(dim=16), catalog, cache=EmbeddingCache(tmp_path))
    np.testing.assert_array_equal(out, HashingEncoder(dim=16).encode(catalog.texts()))


# --- parallel warm-up -----------------------------------------------------------------------------------------


def test_warm_cache_encodes_catalogs_in_parallel_processes_into_the_same_rows(tmp_path: Path) -> None:
    from fedmerge.text.cache import warm_cache

    catalogs = [[f"{word} {i}" for i in range(40)] for word in ("lipstick", "wrap", "lego")]
    cache = EmbeddingCache(tmp_path / "warm")
    assert warm_cache("hashing", {"dim": 32}, cache, catalogs, workers=1) == 0  # one worker: left to the caller
    assert warm_cache("hashing", {"dim": 32}, cache, catalogs[:1], workers=2) == 0  # one catalog: nothing to gain
    assert warm_cache("hashing", {"dim": 32}, cache, catalogs, workers=2) == 3
    encoder = HashingEncoder(dim=32)
    assert all(cache.count_missing(encoder.identity, texts) == 0 for texts in catalogs)
    counting = CountingEncoder(encoder)
    for texts in catalogs:  # served from the cache, equal to encoding in this process
        np.testing.assert_array_equal(encode_texts(counting, texts, cache=EmbeddingCache(tmp_path / "warm")),
                                      encoder.encode(texts))
    assert counting.calls == []
    assert warm_cache("hashing", {"dim": 32}, cache, catalogs, workers=2) == 0  # all cached now


def test_routed_theta0_from_parallel_encoding_equals_the_serial_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """θ₀ of a family that reads the catalogs: the server encodes them in parallel processes, same weights."""
    import torch

    from fedmerge.config import apply_overrides, load_scenario
    from fedmerge.reproducibility import process_cpus
    from fedmerge.runners.server import initial_weights

    cfg = load_scenario("quickstart", ['encoder.name="hashing"', "encoder.params.dim=32",
                                       f'encoder.cache_dir="{tmp_path / "parallel"}"', 'model.params.adapter="routed"',
                                       "model.params.n_experts=4"])
    with caplog.at_level(logging.INFO, logger="fedmerge.text.cache"):
        parallel = initial_weights(cfg)
    if process_cpus() > 1:
        assert "encoding 3 catalogs in 2 parallel processes" in caplog.text
    serial_cfg = apply_overrides(cfg, [f'encoder.cache_dir="{tmp_path / "serial"}"'])
    family = serial_cfg.model.make_family()
    features = [serial_cfg.encoder.item_features(serial_cfg.load_catalog(d), family)
                for d in serial_cfg.data.training_domains()]
    serial = family.initial_weights(serial_cfg.encoder.feature_width(family), seed=0, catalog_features=features)
    assert parallel.keys() == serial.keys() and all(torch.equal(parallel[k], serial[k]) for k in serial)


def test_a_failed_warm_up_worker_raises_with_its_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmerge.text.cache import warm_cache

    monkeypatch.setattr(sys, "executable", "/bin/false")  # every worker process exits 1
    with pytest.raises(FedmergeError, match=r"parallel encoding worker for 3 texts failed \(exit 1\)"):
        warm_cache("hashing", {}, EmbeddingCache(tmp_path), [["a", "b", "c"], ["d", "e", "f"]], workers=2)


def test_a_list_valued_encoder_parameter_builds_its_encoder_once() -> None:
    """The per-process encoder cache keyed on the raw parameter items: a list (the hashing encoder's ngram_sizes,
    which the scenario checks accept) crashed every run with "unhashable type: 'list'"."""
    from fedmerge.config import load_scenario

    cfg = load_scenario("quickstart", ['encoder.name="hashing"', "encoder.params={dim=16, ngram_sizes=[3, 4]}"])
    encoder = cfg.encoder.text_encoder()
    assert encoder.identity == "hashing:dim16:n3,4:seed0" and cfg.encoder.text_encoder() is encoder
