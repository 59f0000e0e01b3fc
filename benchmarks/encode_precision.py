"""Benchmark: items/s and per-item cosine to float32 of MiniLM's faster paths, all in one process.

Paths: ``float32`` (today's), ``bfloat16`` (:class:`~fedmerge.text.SentenceEncoder`'s ``precision="bfloat16"``,
bf16 autocast), ``int8`` (torch's dynamic int8 quantization of every Linear layer,
``torch.ao.quantization.quantize_dynamic``; measured only, not offered) and, when ``fedmerge[onnx]`` is installed,
``onnxruntime`` (``SentenceEncoder(backend="onnxruntime")``: the float32 graph exported and fused once into the
fedmerge cache, :mod:`fedmerge.text.onnx_graph`); ``--paths`` picks some (float32, the reference, always runs). The
first ``--limit`` catalog texts are encoded ``--repeats`` times per path, the paths interleaved (so a shared
machine's load hits them alike); items/s is the best repeat, ``ratio_to_float32`` the per-repeat ratio of items/s
to float32's in the same repeat with a 95 % t-interval over the repeats, cosines compare each row with its float32
row.

    nice -n 5 python benchmarks/encode_precision.py /work/shared/datasets/amazon/Beauty.tar.gz \\
        --limit 2000 --repeats 3 --json results/speed/encode_beauty_ort.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmerge.data import load_catalog
from fedmerge.errors import FedmergeError
from fedmerge.runners.aggregate import interval
from fedmerge.text import SentenceEncoder


PATHS = ("float32", "bfloat16", "int8", "onnxruntime")


def int8_encoder() -> SentenceEncoder:
    """A float32 MiniLM encoder whose loaded model has its Linear layers dynamically quantized to int8."""
    encoder = SentenceEncoder(progress=False)
    encoder._load()
    with warnings.catch_warnings():  # torch's deprecation notice for torch.ao eager-mode quantization
        warnings.simplefilter("ignore")
        encoder._model = torch.ao.quantization.quantize_dynamic(encoder._model, {torch.nn.Linear}, dtype=torch.qint8)
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="domain folder or .tar.gz")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="float32 always runs (reference)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = load_catalog(args.data).texts()[: args.limit]
    encoders: dict[str, Any] = {"float32": SentenceEncoder(progress=False)}
    if "bfloat16" in args.paths:
        encoders["bfloat16"] = SentenceEncoder(progress=False, precision="bfloat16")
    if "int8" in args.paths:
        encoders["int8"] = int8_encoder()
    if "onnxruntime" in args.paths:
        try:
            encoders["onnxruntime"] = SentenceEncoder(progress=False, backend="onnxruntime")
        except FedmergeError as exc:
            print(f"{exc}: its path is skipped")
    for encoder in encoders.values():
        encoder.encode(texts[:8])  # load the weights, warm up
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    rows: dict[str, np.ndarray] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, encoder in encoders.items():
            start = time.perf_counter()
            rows[name] = encoder.encode(texts)
            rates[name].append(len(texts) / (time.perf_counter() - start))
            loads.append(os.getloadavg()[0])
    reference = rows["float32"] / np.linalg.norm(rows["float32"], axis=1, keepdims=True)
    result: dict[str, Any] = {"items": len(texts), "threads": args.threads, "cpus": os.cpu_count(),
                              "load_1min": loads, "torch": torch.__version__, "paths": {}}
    print(f"{len(texts)} items of {args.data}, {args.threads} threads, load {min(loads):.1f}-{max(loads):.1f}")
    for name, out in rows.items():
        cosine = (out / np.linalg.norm(out, axis=1, keepdims=True) * reference).sum(axis=1)
        ratio = interval([r / f for r, f in zip(rates[name], rates["float32"])])
        stats = {"items_per_s": max(rates[name]), "items_per_s_repeats": rates[name], "ratio_to_float32": ratio,
                 "cosine_min": float(cosine.min()),
                 "cosine_mean": float(cosine.mean()), "cosine_p01": float(np.quantile(cosine, 0.01)),
                 "rows_below_0.999": int((cosine < 0.999).sum())}
        result["paths"][name] = stats
        spread = f" [{ratio['low']:.2f}, {ratio['high']:.2f}]" if ratio["low"] is not None else ""
        print(f"{name:11} {stats['items_per_s']:7.1f} items/s  x{ratio['mean']:.2f}{spread} of float32  "
              f"cosine to float32: min {stats['cosine_min']:.5f} mean {stats['cosine_mean']:.5f} "
              f"1% {stats['cosine_p01']:.5f}  rows < 0.999: {stats['rows_below_0.999']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
