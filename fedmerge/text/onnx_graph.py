"""ONNX Runtime execution of a sentence encoder's transformer (``SentenceEncoder(backend="onnxruntime")``).

The float32 model is exported once with ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch and
token axes) after loading it with ``attn_implementation="eager"``: the default SDPA attention traces its mask
handling for the example's shape, and the exported graph then drifts on other shapes (cosine .91 on Beauty).
ONNX Runtime's BERT fusions (``onnxruntime.transformers.optimizer``) are applied, and the fused graph is checked
against the torch model on a batch of another shape before it is kept (per-row cosine of the masked mean of the
last hidden states >= :data:`GRAPH_MIN_COSINE`).

The fused graph lives in ``<fedmerge cache>/onnx/<key>.onnx`` (see :func:`fedmerge.text.cache.cache_base`), where
``key`` is a sha256 over the model's ``config.json`` and weight file *contents* and the torch and onnxruntime
versions, so another model folder (even one with same-sized weights) never reuses a graph. It is written to a
temporary file and renamed into place, so concurrent processes never read half a graph. Tokenization and pooling
stay with :class:`~fedmerge.text.SentenceEncoder`; only the transformer runs in ONNX Runtime (CPU provider).

The packages come with ``pip install 'fedmerge[onnx]'`` (``onnxruntime``, ``onnx``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmerge.errors import FedmergeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PACKAGES = ("onnxruntime", "onnx")  # both installed by the optional dependency group fedmerge[onnx]
OPSET = 17
GRAPH_MIN_COSINE = 0.9999  # an exported graph further than this from the torch model is refused, not cached
_EXAMPLE = ["a short text", "a somewhat longer text to pad the first one"]
_CHECK = ["one", "a third, longer sentence: its tokens reach past both example texts' padded length", "two words"]


def require_packages() -> None:
    """FedmergeError naming the missing package(s) unless onnxruntime and onnx are importable (cheap: no import)."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise FedmergeError(
            f"the onnxruntime text-encoder backend needs the package(s) {missing}, which are not installed: "
            "pip install 'fedmerge[onnx]' (or use the default backend='torch')"
        )


def model_folder(model_source: str) -> Path:
    """The local folder of a model given as a folder or as a hub name already in the Hugging Face cache."""
    folder = Path(model_source)
    if (folder / "config.json").is_file():
        return folder
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_source, "config.json")
    if not isinstance(cached, str):
        raise FedmergeError(
            f"text encoder model {model_source!r} is neither a local folder nor in the Hugging Face cache"
        )
    return Path(cached).parent


def graph_key(folder: Path) -> str:
    """sha256 (24 hex digits) over config.json and every weight file's bytes, plus the torch and onnxruntime
    versions (the exporter and the fusions that produced the graph)."""
    import onnxruntime
    import torch

    from fedmerge.text.encoder import weight_files

    digest = hashlib.sha256(f"torch {torch.__version__} onnxruntime {onnxruntime.__version__}\n".encode())
    digest.update((folder / "config.json").read_bytes())
    for weights in weight_files(folder):
        digest.update(f"\n{weights.name}\n".encode())
        with open(weights, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def build_graph(model_source: str, tokenizer: Any, target: Path) -> None:
    """Export ``model_source`` to ONNX, fuse it for ONNX Runtime, check it against torch and write it to ``target``
    atomically (FedmergeError, nothing written, when the check fails)."""
    import onnxruntime
    import torch
    from onnxruntime.transformers import optimizer
    from transformers import AutoModel

    from fedmerge.text.encoder import sentence_embeddings

    names = list(tokenizer.model_input_names)
    try:
        model = AutoModel.from_pretrained(model_source, local_files_only=True, attn_implementation="eager",
                                          dtype=torch.float32).eval()  # the float32 graph, whatever the checkpoint
    except Exception as exc:
        raise FedmergeError(f"cannot load text encoder model {model_source!r} for ONNX export: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        exported, fused = work / "exported.onnx", work / "fused.onnx"

        class LastHiddenState(torch.nn.Module):
            """The encoder as a function of its tokenizer's inputs (positional, ``names`` order) -> last states."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
                return self.model(**dict(zip(names, inputs))).last_hidden_state

        try:
            example = tokenizer(_EXAMPLE, padding=True, return_tensors="pt")
            # .eval(): the exporter restores the wrapper's mode afterwards; a new Module is in training mode (dropout)
            with warnings.catch_warnings(), torch.inference_mode():  # the exporter's tracer and deprecation notices
                warnings.simplefilter("ignore")
                torch.onnx.export(LastHiddenState().eval(), tuple(example[n] for n in names), str(exported),
                                  input_names=names, output_names=["hidden"], opset_version=OPSET, dynamo=False,
                                  dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]})
            config = model.config
            optimizer.optimize_model(str(exported), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size).save_model_to_file(str(fused))
        except Exception as exc:  # the exporter and the fusions fail in many ways on unsupported architectures
            raise FedmergeError(
                f"exporting {model_source!r} to ONNX failed ({type(exc).__name__}: {exc}); use backend='torch'"
            ) from exc
        check = tokenizer(_CHECK, padding=True, return_tensors="pt")
        with torch.inference_mode():
            expected = sentence_embeddings(model(**{n: check[n] for n in names}).last_hidden_state, check["attention_mask"])
        session = onnxruntime.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {n: check[n].numpy().astype(np.int64) for n in names})
        got_rows = sentence_embeddings(torch.from_numpy(got), check["attention_mask"])
        cosine = float((got_rows * expected).sum(dim=1).min())
        if not cosine >= GRAPH_MIN_COSINE:
            raise FedmergeError(
                f"the ONNX graph exported from {model_source!r} differs from the torch model (min cosine {cosine:.5f} "
                f"< {GRAPH_MIN_COSINE} on a check batch); this model cannot use backend='onnxruntime'"
            )
        os.replace(fused, target)
        logger.info("exported %s to %s (check cosine %.6f)", model_source, target, cosine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class OnnxTransformer:
    """The fused graph behind the call signature :class:`~fedmerge.text.SentenceEncoder` uses for its torch model:
    ``self(**tokens)`` returns an object whose ``last_hidden_state`` is a float32 tensor (batch, tokens, dim)."""

    def __init__(self, model_source: str, tokenizer: Any, threads: int) -> None:
        import onnxruntime

        from fedmerge.text.cache import cache_base

        self.path = cache_base() / "onnx" / f"{graph_key(model_folder(model_source))}.onnx"
        if not self.path.is_file():
            logger.info("no ONNX graph of %s in %s yet: exporting it (once)", model_source, self.path)
            build_graph(model_source, tokenizer, self.path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        # idle worker threads sleep instead of spinning: on a shared CPU the spinning took cores from the busy ones
        # (600 Beauty items, load ≈ 6, 4 interleaved repeats: 1.32x against 1.16x of torch float32, one-off)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def open_session() -> Any:
            return onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

        try:
            self.session = open_session()
        except Exception as exc:  # a damaged cached graph (cut short, overwritten) failed every later run
            aside = self.path.with_name(self.path.name + ".corrupt")
            logger.warning("the cached ONNX graph %s cannot be loaded (%s: %s): set aside as %s and exported again",
                           self.path, type(exc).__name__, exc, aside)
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:  # another process (a parallel client) set it aside first
                pass
            if not self.path.is_file():
                build_graph(model_source, tokenizer, self.path)
            try:
                self.session = open_session()
            except Exception as again:
                raise FedmergeError(f"cannot load the ONNX graph {self.path} exported from {model_source!r}: "
                                    f"{type(again).__name__}: {again}") from again
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, output_hidden_states: bool = False, **tokens: torch.Tensor) -> Any:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        if output_hidden_states:
            raise FedmergeError("the onnxruntime backend returns only the last hidden states; use backend='torch'")
        (hidden,) = self.session.run(None, {n: tokens[n].cpu().numpy().astype(np.int64) for n in self.names})
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))
