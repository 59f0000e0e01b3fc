"""Benchmark: items/s and per-item cosine to float32 of MiniLM's faster paths, all in one process.

Paths: ``float32`` (today's), ``bfloat16`` (:class:`~fedmerge.text.SentenceEncoder`'s ``precision="bfloat16"``,
bf16 autocast), ``int8`` (torch's dynamic int8 quantization of every Linear layer,
``torch.ao.quantization.quantize_dynamic``) and, when the ``onnxruntime`` package is installed, ``onnxruntime``
(the float32 model exported with ``torch.onnx.export``, eager attention, then ONNX Runtime's BERT graph fusions
``onnxruntime.transformers.optimizer``, run on the CPU provider with the same tokenizer, batches and pooling); the
last two are measured only, not offered: see the printed cosines and results/speed/README.md. The first
``--limit`` catalog texts are encoded ``--repeats`` times per path, the paths interleaved (so a shared machine's
load hits them alike); items/s is the best repeat, cosines compare each row with its float32 row.

    FEDMERGE_AMAZON_DIR=... python benchmarks/encode_precision.py /work/shared/datasets/amazon/Beauty.tar.gz \\
        --limit 2000 --json results/speed/encode_beauty.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmerge.data import load_catalog
from fedmerge.text import SentenceEncoder
from fedmerge.text.encoder import mean_pool


def int8_encoder() -> SentenceEncoder:
    """A float32 MiniLM encoder whose loaded model has its Linear layers dynamically quantized to int8."""
    encoder = SentenceEncoder(progress=False)
    encoder._load()
    with warnings.catch_warnings():  # torch's deprecation notice for torch.ao eager-mode quantization
        warnings.simplefilter("ignore")
        encoder._model = torch.ao.quantization.quantize_dynamic(encoder._model, {torch.nn.Linear}, dtype=torch.qint8)
    return encoder


class OnnxRuntimeEncoder:
    """MiniLM's float32 graph in ONNX Runtime (CPU provider, ``threads`` intra-op threads) behind the
    ``encode(texts)`` of :class:`SentenceEncoder`: its tokenizer, length-sorted batches, masked mean pooling and L2
    normalization, so only the transformer's execution differs."""

    def __init__(self, threads: int, folder: Path) -> None:
        import onnxruntime
        from onnxruntime.transformers import optimizer
        from transformers import AutoConfig, AutoModel

        self.reference = SentenceEncoder(progress=False)
        self.reference._load()
        config = AutoConfig.from_pretrained(self.reference.model_source, local_files_only=True)
        # eager attention: the SDPA path traces its mask handling for the example's shape (cosine .91 on Beauty)
        model = AutoModel.from_pretrained(self.reference.model_source, local_files_only=True,
                                          attn_implementation="eager").eval()
        names = ["input_ids", "attention_mask", "token_type_ids"]
        example = self.reference._tokenizer(["a short text", "a somewhat longer text"], padding=True,
                                            return_tensors="pt")
        folder.mkdir(parents=True, exist_ok=True)
        exported, fused = folder / "minilm.onnx", folder / "minilm-fused.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_LastHiddenState(model), tuple(example[n] for n in names), str(exported),
                              input_names=names, output_names=["hidden"], opset_version=17, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]})
        optimizer.optimize_model(str(exported), model_type="bert", num_heads=config.num_attention_heads,
                                 hidden_size=config.hidden_size).save_model_to_file(str(fused))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(fused), options, providers=["CPUExecutionProvider"])
        self.names = names

    def encode(self, texts: list[str]) -> np.ndarray:
        encoder, out = self.reference, np.zeros((len(texts), self.reference.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), encoder.batch_size):
            rows = order[start : start + encoder.batch_size]
            tokens = encoder._tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                        max_length=encoder.max_length, return_tensors="np")
            (hidden,) = self.session.run(None, {n: tokens[n].astype(np.int64) for n in self.names})
            pooled = mean_pool(torch.from_numpy(hidden), torch.from_numpy(tokens["attention_mask"]))
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return out


class _LastHiddenState(torch.nn.Module):
    """The encoder as a function of (input_ids, attention_mask, token_type_ids) returning its last hidden states."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="domain folder or .tar.gz")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--onnx-dir", type=Path, default=Path("runs/encode_onnx"),
                        help="where the onnxruntime path writes its exported graphs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = load_catalog(args.data).texts()[: args.limit]
    encoders = {"float32": SentenceEncoder(progress=False), "bfloat16": SentenceEncoder(progress=False, precision="bfloat16"),
                "int8": int8_encoder()}
    if importlib.util.find_spec("onnxruntime") is not None:
        encoders["onnxruntime"] = OnnxRuntimeEncoder(args.threads, args.onnx_dir)
    else:
        print("onnxruntime is not installed: its path is skipped (pip install onnxruntime onnx)")
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
        stats = {"items_per_s": max(rates[name]), "items_per_s_repeats": rates[name], "cosine_min": float(cosine.min()),
                 "cosine_mean": float(cosine.mean()), "cosine_p01": float(np.quantile(cosine, 0.01)),
                 "rows_below_0.999": int((cosine < 0.999).sum())}
        result["paths"][name] = stats
        print(f"{name:11} {stats['items_per_s']:7.1f} items/s  cosine to float32: min {stats['cosine_min']:.5f} "
              f"mean {stats['cosine_mean']:.5f} 1% {stats['cosine_p01']:.5f}  rows < 0.999: {stats['rows_below_0.999']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
