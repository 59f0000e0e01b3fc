"""Text-encoding throughput and embedding-cache hit time for one domain's catalog.

    python benchmarks/encode_speed.py /tmp/amz/Pantry                      # MiniLM, fresh temporary cache
    python benchmarks/encode_speed.py data/Toys.tar.gz --encoder hashing --limit 2000
    python benchmarks/encode_speed.py /tmp/amz/Pantry --cache-dir ~/.cache/fedmerge/embeddings

The cold encode uses an empty temporary cache unless ``--cache-dir`` is given (then already cached texts are not
re-encoded and items/s counts only what was encoded). The cache-hit time is a second ``encode_texts`` call through
a fresh :class:`EmbeddingCache` instance, i.e. reading the shards from disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from fedmerge.data import load_catalog
from fedmerge.text import EmbeddingCache, encode_texts, get_encoder, text_key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="domain folder or .tar.gz (Amazon or generic format)")
    parser.add_argument("--encoder", default="minilm", help="minilm, hashing, or a model folder / hub name")
    parser.add_argument("--batch-size", type=int, default=None, help="encoder batch size (SentenceEncoder only)")
    parser.add_argument("--limit", type=int, default=None, help="encode only the first N items")
    parser.add_argument("--cache-dir", default=None, help="embedding cache root (default: a fresh temporary folder)")
    args = parser.parse_args(argv)

    texts = load_catalog(args.data).texts()[: args.limit]
    params = {"batch_size": args.batch_size} if args.batch_size else {}
    if args.encoder != "hashing":
        params["progress"] = False
    encoder = get_encoder(args.encoder, **params)
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-") as tmp:
        root = args.cache_dir or tmp
        keys = [text_key(encoder.identity, t) for t in texts]
        _, already = EmbeddingCache(root).get(encoder.identity, keys, encoder.dim)
        n_new = len({k for k, hit in zip(keys, already) if not hit})

        start = time.perf_counter()
        first = encode_texts(encoder, texts, cache=EmbeddingCache(root))
        encode_s = time.perf_counter() - start

        start = time.perf_counter()
        again = encode_texts(encoder, texts, cache=EmbeddingCache(root))
        hit_s = time.perf_counter() - start

    if not np.array_equal(first, again):
        raise SystemExit("cache hit returned different embeddings")
    rate = f"{n_new / encode_s:.1f} items/s" if n_new else "n/a (all cached)"
    print(f"encoder:        {encoder.identity}")
    print(f"items:          {len(texts)} ({len(set(keys))} distinct texts, {n_new} of them not cached before)")
    print(f"encode:         {encode_s:.2f} s  ({rate}, model load included)")
    print(f"cache hit:      {hit_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
