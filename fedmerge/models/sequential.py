"""Text-based sequential recommender family (SASRec over text-derived item representations, UniSRec-style).

Items enter only through public text: a catalog's raw sentence embeddings are z-scored per dimension over the
catalog (:meth:`SequentialFamily.item_features`), mapped by a trainable adapter to the hidden size, and a causal
pre-LN Transformer reads the user's last ``max_len`` items (plus learned position embeddings, indexed by recency
slot: the most recent item always sits in slot ``max_len - 1``). The representation at the last position scores
every item of the catalog by

    s_i = cos(h, e_i) / τ,   e_i = adapter(x_i)

with the same adapter for input and output items (tied, as in SASRec/UniSRec). There is no item-id table: every
parameter is shared across domains and independent of the catalog size, so weights of different domains live in
one space and can be merged.

Adapter: ``"linear"`` is UniSRec's parametric whitening ``(x - b) W``; ``"moe"`` is UniSRec's mixture of
``n_experts`` such whitening experts mixed by a softmax gate ``softmax(x W_g)``; ``"mlp"`` (the default) is the
whitening plus a residual GELU MLP whose output layer starts at zero (:class:`ResidualMLPAdapter`). Measured on
Pantry (MiniLM, 2-core CPU, seed 0, 240 s of training, dropout 0.1): validation NDCG@10 .072 and test Recall@10
.101 for ``"mlp"`` (width 512, lr 2e-3) against .060 / .082 for ``"linear"`` (lr 1e-3) and .056 / .082 for the
untrained θ₀; a linear-only item side cannot move items with similar text apart when their buyers differ.
``"routed"`` (:class:`RoutedAdapter`) holds ``n_experts`` such MLP adapters and sends every item to one of them by
its raw text embedding's nearest catalog cluster (k-means over the merged domains' public catalogs, fixed in θ₀),
so each domain's training moves mostly its own experts and merges interfere less on the item side. With
``routed_unseen="theta0"`` an item far from every cluster (nearest-centroid similarity below the
``routed_unseen_quantile`` of the training catalogs' items, fixed in θ₀) goes to a frozen copy of θ₀'s expert
instead: a catalog no client trained on keeps θ₀'s item side in every merge. ``routed_unseen="mix"`` gives such an
item a similarity-weighted mix of every expert and the θ₀ expert instead (:func:`unseen_mix_weights`).

Training: SASRec all-position loss: each training sequence is cut into windows of at most ``max_len + 1`` items
(so every transition is a target exactly once), and every position predicts the next item with a full softmax
over the domain's catalog (``n_negatives=None``) or, for large catalogs, a sampled softmax
(:func:`sampled_softmax_loss`) over ``n_negatives`` negatives shared by the batch, drawn uniformly or by training
popularity (``negative_sampling``) from the seeded generator, with the logQ correction; the sampled loss runs the
item adapter only on the batch's items and the negatives. On Beauty (12,101 items, 1,024 uniform negatives, 3
epochs, seeds 0-2, loaded 2-core CPU) a sampled epoch took 0.27 ± 0.12 of the full softmax's time at validation
NDCG@10 .0342 ± .0026 against .0347 ± .0017 with the MLP adapter, but .0362 ± .0060 against .0398 ± .0046
(lower on every seed) with the routed one (``results/speed/``). AdamW; validation NDCG@10 each epoch through
:func:`fedmerge.metrics.evaluate_scorer`; early stopping with ``patience``; the best checkpoint is returned.
Training stops after ``max_epochs`` or by early stopping - the same on every machine; ``max_seconds`` (off by
default) is a wall-clock safety cap, and the metrics' ``stop_reason`` says which of the three ended it. Every
optimizer step runs on one thread (:func:`fedmerge.reproducibility.gradient_threads`), validation at
``run.torch_threads`` (the same figures for the same value; see that module for what another count can move).
``proximal_mu = μ > 0`` adds FedProx's proximal term ``μ/2 · ‖θ − θ₀‖²`` to every batch loss: the domain's own
data leaves most directions of θ unconstrained (e.g. how the adapter maps other domains' text), and the term keeps
the task vector τ = θ − θ₀ small there, which is what later merges of several domains' τ pay for.

Tuning the text encoder (``encoder_layers = k > 0``, meant for CUDA): the sentence encoder's last k layers
(:class:`TextTower`, copied from the pretrained ``text_model``) sit between the catalog's token states and the
adapter, so they are trained by every client and merged like any other parameter (MergeRec/Recformer-style).
Item features then carry the token states entering those layers (:func:`token_features`); the z-score uses the
pretrained embeddings' catalog statistics, fixed, so θ₀ scores exactly as with cached embeddings. In training the
batch's own items pass through the tower with gradient, the other candidates come from text embeddings refreshed
once per epoch. Without CUDA, training refuses unless ``device="cpu"`` is asked for.

θ₀ is the module's seeded PyTorch initialization (:meth:`ModelFamily.initial_weights`): identical for every client
given (feature width, seed), uses no interaction data (the routed adapter's router reads the public catalogs), and
keeps every client in the same basin-free starting point that task arithmetic measures its task vectors from (plus,
with ``encoder_layers``, the pretrained text-encoder layers).
A scenario can pretrain θ₀ on pseudo-users of the public catalogs (``theta0.pretrain``,
:mod:`fedmerge.runners.pretrain`), still without any interaction data. ``theta0_init="text_similarity"`` starts
from the same draws reshaped so that θ₀ *is* the last-item text-similarity recommender (:func:`text_similarity_init`).

``last_item_bias=True`` adds a learned offset b of the user's most recent item to its score,
``(cos(h, e_i) + b·[i = last item]) / τ`` (:meth:`TextSASRec.with_history_bias`; 0 at θ₀), in scoring and in every
loss; ``history_bias=True`` a second one, b_h, of every earlier item of the user's history. ``history_pooling = K``
adds the K items before the last one to the query with learned weights (:meth:`TextSASRec.with_recent_items`; 0 at
θ₀). ``repeat_user_bias=True`` gives a user whose history already repeats an item its own pair of offsets in place
of b and b_h (0 at θ₀, so a domain whose users never repeat leaves θ₀'s scoring for such users). All are a few
numbers that describe how a domain's users shop, not its items (issue 23). ``last_item_text_bias=True`` (routed
adapter) makes b depend on the last item's text, b + v·x̂_i (v 0 at θ₀): a new catalog's items then get the offset
their own text says.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fedmerge.data.domain import Domain, ItemCatalog
from fedmerge.errors import FedmergeError
from fedmerge.memory import release_freed_memory
from fedmerge.metrics import Scorer, evaluate_scorer
from fedmerge.models.base import PAD, STOP_EARLY, STOP_MAX_EPOCHS, STOP_MAX_SECONDS, ModelFamily, StateDict, pad_sequences
from fedmerge.reproducibility import gradient_threads
from fedmerge.text.encoder import SentenceEncoder, sentence_embeddings

logger = logging.getLogger(__name__)

ADAPTERS = ("linear", "mlp", "moe", "routed")
ROUTED_UNSEEN = ("none", "theta0", "mix")
THETA0_INITS = ("random", "text_similarity")
NEGATIVE_SAMPLING = ("uniform", "popularity")
IGNORED = -100  # cross-entropy label of a padding row (left out of the mean)


@lru_cache(maxsize=2)
def _sentence_encoder(model: str | None, max_length: int) -> SentenceEncoder:
    """One loaded encoder per (model, max_length): building a module copies its top layers, not the checkpoint."""
    return SentenceEncoder(model, max_length=max_length, progress=False)


def catalog_statistics(embeddings: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension ``(mean, max(std, eps))`` of a catalog's embeddings, float64; checks shape and finiteness."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"item embeddings must be a non-empty (n_items, dim) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("item embeddings contain NaN or inf")
    return x.mean(axis=0), np.maximum(x.std(axis=0), eps)


def standardize_features(embeddings: np.ndarray, eps: float = 1e-6, statistics_rows: int | None = None) -> np.ndarray:
    """Per-dimension z-score over the catalog: ``(x - mean) / max(std, eps)`` (raw MiniLM features train poorly),
    mean and std of the first ``statistics_rows`` rows (default: all)."""
    mean, std = catalog_statistics(np.asarray(embeddings)[:statistics_rows], eps)
    return ((np.asarray(embeddings, dtype=np.float64) - mean) / std).astype(np.float32)


# Users per scoring forward pass. Measured on Amazon Beauty's 22k validation users (θ₀ of amazon-seq, 2 threads,
# quiet 2-core container): 128 scores them in 7.1 s with a peak of +0.15 GiB PSS, 512 in 12.3 s with +0.46 GiB;
# the metrics are the same to 6 digits (scores differ by float rounding, ≤ 4e-6 on logits up to 1/τ).
SCORE_BATCH = 128


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of indices with similar lengths (little padding) in a random, seeded order.

    A random permutation is stably sorted by length (random order among equal lengths), cut into consecutive
    batches, and the batches are shuffled.
    """
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sampled_softmax_loss(
    positive: torch.Tensor, negative: torch.Tensor, log_expected: torch.Tensor, hits: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean sampled-softmax cross-entropy with the logQ correction (Bengio & Senécal 2008; Jean et al. 2015;
    Yi et al. 2019), negatives shared by all rows.

    For a row with positive score ``s_y`` (``positive``, (P,)) and scores ``s_j`` of the shared sampled negatives
    ``j ∈ S`` (``negative``, (P, k)), drawn so that item j appears ``E[c_j]`` times in S on average
    (``log_expected`` = log E[c_j], (k,)):

        ℓ = −s_y + log( exp(s_y) + Σ_{j ∈ S, j ≠ y} exp(s_j − log E[c_j]) )

    Σ_{j∈S, j≠y} exp(s_j) / E[c_j] is an unbiased estimate of the full softmax's Σ_{j≠y} exp(s_j), so ℓ estimates
    the full cross-entropy −s_y + log Σ_j exp(s_j) (consistently; the log makes it slightly low for small k).
    Negatives equal to the row's positive (accidental hits, ``hits`` (P, k) True there) are left out. With S the
    whole catalog once (E[c_j] = 1) ℓ is exactly the full softmax cross-entropy. ``valid`` ((P,) bool, optional):
    the mean runs over these rows only (padding rows of a fixed-shape batch).
    """
    corrected = (negative - log_expected).masked_fill(hits, -math.inf)
    logits = torch.cat([positive.unsqueeze(1), corrected], dim=1)
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    if valid is not None:
        labels = labels.masked_fill(~valid, IGNORED)
    return F.cross_entropy(logits, labels, ignore_index=IGNORED)


def trainable_names(patterns: Sequence[str], names: Sequence[str]) -> frozenset[str]:
    """The parameter ``names`` that match one of the fnmatch ``patterns``; FedmergeError naming a pattern that matches
    none (with the parameter names it could match)."""
    unmatched = [p for p in patterns if not fnmatch.filter(names, p)]
    if unmatched:
        raise FedmergeError(f"model.params.trainable: {unmatched} match no parameter of the model; its parameters: "
                            f"{list(names)}")
    return frozenset(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def training_windows(seqs: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut each sequence from its end into windows of at most ``max_len + 1`` items that overlap by one item.

    Window inputs are ``w[:-1]`` and targets ``w[1:]``, so every transition of every sequence is a target exactly
    once; sequences shorter than two items give no window.
    """
    windows = []
    for seq in seqs:
        seq = np.asarray(seq, dtype=np.int64)
        for end in range(len(seq), 1, -max_len):
            windows.append(seq[max(0, end - max_len - 1) : end])
    return windows


class WhiteningLayer(nn.Module):
    """UniSRec's parametric whitening: ``(x - b) W`` with a learned centre ``b`` and projection ``W``."""

    def __init__(self, dim_in: int, dim_out: int, dropout: float) -> None:
        super().__init__()
        self.centre = nn.Parameter(torch.zeros(dim_in))
        self.dropout = nn.Dropout(dropout)
        self.projection = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.dropout(x - self.centre))


class ResidualMLPAdapter(nn.Module):
    """Whitening plus a residual GELU MLP on one dropped-out input: with ``h = Drop(x)``,
    ``e = (h - b) W + W_2 GELU(h W_1 + b_1) + b_2``.

    ``W_2`` and ``b_2`` start at zero, so at θ₀ the adapter is the linear whitening (θ₀ stays a last-item
    text-similarity recommender) and training adds a non-linear item-side correction; that capacity is what lets
    item representations pick up collaborative structure the raw text does not carry (on Pantry, validation
    NDCG@10 after 240 s .072 vs .060 for the linear adapter). One dropout mask serves both paths: drawing the
    masks over the whole catalog is a fifth of a training step's CPU time.
    """

    def __init__(self, dim_in: int, dim_out: int, width: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.whitening = WhiteningLayer(dim_in, dim_out, dropout=0.0)
        self.mlp = nn.Sequential(nn.Linear(dim_in, width), nn.GELU(), nn.Linear(width, dim_out))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x)
        return self.whitening(h) + self.mlp(h)


class MoEAdapter(nn.Module):
    """Mixture of whitening experts: ``sum_k softmax(x W_g)_k (x - b_k) W_k`` (UniSRec's MoE adaptor)."""

    def __init__(self, dim_in: int, dim_out: int, n_experts: int, dropout: float) -> None:
        super().__init__()
        self.experts = nn.ModuleList(WhiteningLayer(dim_in, dim_out, dropout) for _ in range(n_experts))
        self.gate = nn.Parameter(torch.zeros(dim_in, n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(x @ self.gate, dim=-1)  # (n, K)
        outputs = torch.stack([expert(x) for expert in self.experts], dim=-1)  # (n, d, K)
        return (outputs * weights.unsqueeze(-2)).sum(-1)


def catalog_clusters(embeddings: np.ndarray, n_clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, centroids) of seeded spherical k-means (k-means++ start) on the centred, unit-norm rows of the public
    catalogs' raw text embeddings: ``centre`` their mean (d,), ``centroids`` (n_clusters, d) unit rows. An item goes
    to ``argmax_k <unit(x - centre), c_k>``."""
    from scipy.cluster.vq import kmeans2

    if embeddings.ndim != 2 or not np.isfinite(embeddings).all():
        raise FedmergeError(f"catalog embeddings must be a finite (n, d) matrix, got shape {embeddings.shape}")
    distinct = len(np.unique(embeddings, axis=0))
    if distinct < n_clusters:
        raise FedmergeError(f"{n_clusters} routing clusters need at least as many distinct catalog items, "
                            f"got {distinct}")
    centre = embeddings.mean(axis=0)
    rows = embeddings - centre
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    centroids, _ = kmeans2(rows.astype(np.float64), n_clusters, minit="++", seed=seed)
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(centre.astype(np.float32)), torch.from_numpy(centroids.astype(np.float32))


ROUTER_BUFFERS = ("centre", "centroids")  # RoutedAdapter's router, fixed at θ₀


def centroid_similarities(raw: torch.Tensor, centre: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``s_k = <unit(x - centre), c_k>`` of each raw embedding row x against every cluster of
    :func:`catalog_clusters`, (n, n_clusters)."""
    return F.normalize(raw - centre, dim=-1) @ centroids.T


def nearest_similarity(raw: torch.Tensor, centre: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``max_k s_k`` (:func:`centroid_similarities`) of each raw embedding row, (n,): how close an item is to the
    nearest catalog cluster."""
    return centroid_similarities(raw, centre, centroids).max(dim=-1).values


def unseen_mix_weights(similarities: torch.Tensor, threshold: torch.Tensor | float, temperature: float) -> torch.Tensor:
    """Mixing weights of an unseen item over the K experts and the frozen θ₀ expert, (..., K + 1):

        w = softmax([s_1, …, s_K, t] / T)

    with ``s_k`` its :func:`centroid_similarities` (..., K), ``t`` the unseen threshold as the θ₀ expert's fixed
    logit and ``T`` the ``temperature``. An unseen item has ``max_k s_k < t``, so the θ₀ expert always holds the
    largest weight; ``T → 0`` gives the hard θ₀ fallback, a large T the uniform mix of all K + 1 experts, and an
    expert's share grows as the item nears its cluster (``w_k / w_base = exp((s_k - t)/T)``)."""
    base = torch.as_tensor(threshold, dtype=similarities.dtype, device=similarities.device)
    base = base.expand(*similarities.shape[:-1], 1)
    return torch.softmax(torch.cat([similarities, base], dim=-1) / temperature, dim=-1)


class RoutedAdapter(nn.Module):
    """``n_experts`` :class:`ResidualMLPAdapter` experts; each item goes to one, fixed by its text: the nearest
    catalog-cluster centroid (:func:`catalog_clusters`) of its raw embedding. Input rows are ``[z | x]``, the
    catalog-z-scored features the expert reads and the raw embedding the router reads.

    Why: a domain's training then changes (almost) only the experts its own items use, so different domains' task
    vectors touch disjoint adapter weights and a merge can keep each domain's item side whole. Measured on the
    three Amazon domains with the single ``"mlp"`` adapter: each domain evaluated with its own adapter and every
    other weight at θ₀ scores .0891 mean Recall@10, above the individual models' .0882, while task arithmetic of the
    whole models scores .0707 - the interference between domains sits in the shared item adapter. The experts start
    identical (so θ₀ is the single adapter); the router (``centre``, ``centroids`` buffers) is set from the public
    catalogs when θ₀ is made and never trained. Local training freezes the experts that get fewer than
    ``routed_min_share`` of the domain's items (:meth:`minor_experts`): under Adam two Beauty items routed to a Toys
    expert moved it by ‖τ‖ = 11 against 28 for Toys' own 2,516 items, and the sum of such updates in a merge broke
    the experts' owners.

    Unseen items (``unseen="theta0"`` or ``"mix"``): an item of a catalog no client trained on lands in whichever
    expert is least far, which was trained on other items' buyers. An item whose similarity to its nearest
    centroid, ``max_k <unit(x - centre), c_k>``, is below the ``unseen_threshold`` buffer t (set in θ₀ from the
    training catalogs, see :meth:`SequentialFamily.initial_weights`) is "unseen". ``base`` is a frozen copy of the
    initial expert: θ₀'s adapter, kept in the weights, never trained (every task vector is zero there), so every
    merge keeps it as θ₀ has it. With ``"theta0"`` an unseen item goes to ``base`` alone; with ``"mix"`` it gets
    ``e = Σ_k w_k expert_k(z) + w_base base(z)``, the weights of :func:`unseen_mix_weights` at ``mix_temperature``.
    Items at or above the threshold are routed hard to their nearest expert in every mode.
    """

    def __init__(
        self, dim_in: int, dim_out: int, width: int, n_experts: int, dropout: float, unseen: str = "none",
        mix_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        if unseen not in ROUTED_UNSEEN:
            raise ValueError(f"unknown routed_unseen {unseen!r}; valid: {list(ROUTED_UNSEEN)}")
        self.dim_in = dim_in
        self.unseen = unseen
        self.mix_temperature = mix_temperature
        self.register_buffer(ROUTER_BUFFERS[0], torch.zeros(dim_in))
        self.register_buffer(ROUTER_BUFFERS[1], torch.zeros(n_experts, dim_in))
        self.experts = nn.ModuleList(ResidualMLPAdapter(dim_in, dim_out, width, dropout) for _ in range(n_experts))
        for expert in self.experts[1:]:
            expert.load_state_dict(self.experts[0].state_dict())
        self.base: ResidualMLPAdapter | None = None
        if unseen != "none":
            self.register_buffer("unseen_threshold", torch.tensor(-1.0))
            self.base = copy.deepcopy(self.experts[0])  # draws no random numbers: the other weights' init is unchanged
            self.base.requires_grad_(False)
        self.dim_out = dim_out

    def route(self, raw: torch.Tensor) -> torch.Tensor:
        """Expert index of each raw embedding row, (n,)."""
        return ((raw - self.centre) @ self.centroids.T).argmax(dim=-1)

    def minor_experts(self, x: torch.Tensor, min_share: float) -> list[int]:
        """Experts that receive fewer than ``min_share`` of the catalog ``x``'s ``[z | raw]`` rows."""
        counts = torch.bincount(self.route(x[:, self.dim_in :]), minlength=len(self.experts))
        return [k for k, c in enumerate(counts.tolist()) if c < min_share * len(x)]

    def _routing(self, raw: torch.Tensor) -> tuple[torch.Tensor, list[nn.Module], torch.Tensor, torch.Tensor | None]:
        """(expert index of each raw row into the returned experts, the experts (+ the θ₀ expert ``base`` at index
        n_experts when there is one), the rows below the unseen threshold (all False without ``base``), and with
        ``"mix"`` their :func:`unseen_mix_weights` over those experts (else None))."""
        expert_of, experts = self.route(raw), list(self.experts)
        if self.base is None:
            return expert_of, experts, torch.zeros_like(expert_of, dtype=torch.bool), None
        similarities = centroid_similarities(raw, self.centre, self.centroids)
        unseen = similarities.max(dim=-1).values < self.unseen_threshold
        weights = (unseen_mix_weights(similarities, self.unseen_threshold, self.mix_temperature)
                   if self.unseen == "mix" else None)
        return torch.where(unseen, len(experts), expert_of), [*experts, self.base], unseen, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 2 * self.dim_in:
            raise ValueError(f"routed adapter expects [z | raw] rows of width {2 * self.dim_in}, got {x.shape[-1]}")
        z, raw = x[..., : self.dim_in], x[..., self.dim_in :]
        flat_z = z.reshape(-1, self.dim_in)
        expert_of, experts, unseen, weights = self._routing(raw.reshape(-1, self.dim_in))
        mixed = unseen.nonzero().squeeze(1) if weights is not None else flat_z.new_zeros(0, dtype=torch.long)
        if weights is not None:  # no hard expert (-1): mixed below
            expert_of = torch.where(unseen, -1, expert_of)
        out = flat_z.new_zeros(len(flat_z), self.dim_out)
        for k, expert in enumerate(experts):
            rows = (expert_of == k).nonzero().squeeze(1)
            if len(rows):
                out = out.index_copy(0, rows, expert(flat_z[rows]))
        if len(mixed):
            z_mixed, w_mixed = flat_z[mixed], weights[mixed]
            mix = sum(w_mixed[:, k : k + 1] * expert(z_mixed) for k, expert in enumerate(experts))
            out = out.index_copy(0, mixed, mix)
        return out.reshape(*z.shape[:-1], self.dim_out)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward`'s values with shapes independent of the routing (what ``torch.func.vmap`` needs): every
        expert on every row, each row keeps its own expert's output, ``out_r = E_{k(r)}(z_r)`` (with ``"mix"``, an
        unseen row the weighted sum over the experts). n_experts× the cost; the other experts get exactly zero
        gradient from row r, as in :meth:`forward`."""
        z, raw = x[..., : self.dim_in], x[..., self.dim_in :]
        expert_of, experts, unseen, weights = self._routing(raw)
        outputs = torch.stack([expert(z) for expert in experts], dim=-2)  # (..., n_experts, dim_out)
        index = expert_of[..., None, None].expand(*expert_of.shape, 1, self.dim_out)
        out = outputs.gather(-2, index).squeeze(-2)
        if weights is None:
            return out
        return torch.where(unseen.unsqueeze(-1), (weights.unsqueeze(-1) * outputs).sum(-2), out)


class TextTower(nn.Module):
    """The text encoder's last layers (copied from the pretrained model, trained and merged like every other
    parameter) + attention-masked mean pooling (+ L2 norm): token states (n, T, d), zero at padding -> (n, d)."""

    def __init__(self, layers: nn.ModuleList, normalize: bool) -> None:
        super().__init__()
        self.layers = layers
        self.normalize = normalize

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mask = states.abs().amax(dim=-1) > 0
        used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
        states, mask = states[:, :used], mask[:, :used]
        additive = (~mask)[:, None, None, :].to(states.dtype) * torch.finfo(states.dtype).min
        for layer in self.layers:
            out = layer(states, attention_mask=additive)
            states = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        return sentence_embeddings(states, mask, self.normalize)


def token_features(embeddings: np.ndarray, states: np.ndarray, statistics_rows: int | None = None) -> torch.Tensor:
    """Item features when the text encoder's top layers are tuned, one (2 + T, d) slab per item: row 0 the catalog
    mean and row 1 the catalog std of the pretrained embeddings (the z-score of :func:`standardize_features`,
    kept fixed; of the first ``statistics_rows`` items, default all), rows 2.. the token states entering the tuned
    layers (zero at padding). Stacking catalogs row-wise keeps each item's own catalog statistics."""
    mean, std = catalog_statistics(np.asarray(embeddings)[:statistics_rows])
    n, dim = len(embeddings), len(mean)
    if states.ndim != 3 or states.shape[0] != n or states.shape[2] != dim:
        raise ValueError(f"token states of shape {states.shape} do not match embeddings of shape {(n, dim)}")
    stats = np.broadcast_to(np.stack([mean, std]).astype(np.float32), (n, 2, dim))
    return torch.from_numpy(np.concatenate([stats, states.astype(np.float32)], axis=1))


class PreLNBlock(nn.Module):
    """Pre-LN Transformer block: ``x + Drop(MHA(LN(x)))`` then ``x + Drop(FFN(LN(x)))`` with a GELU FFN."""

    def __init__(self, hidden: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, n_heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn_mult * hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * hidden, hidden),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, hidden), or (B, 1, hidden) for the last position only (its keys are all of x)."""
        h = self.attention_norm(x)
        if last_only:
            x, query, blocked = x[:, -1:], h[:, -1:], blocked[:, -1:]
        else:
            query = h
        attended, _ = self.attention(query, h, h, attn_mask=blocked, need_weights=False)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


RESIDUAL_OUTPUTS = ("attention.out_proj.weight", "attention.out_proj.bias", "ffn.3.weight", "ffn.3.bias")


def text_similarity_init(weights: StateDict, seed: int) -> StateDict:
    """θ₀ that *is* the last-item text-similarity recommender: a copy of ``weights`` (a :class:`TextSASRec` state)
    with the position embeddings and every block's residual-branch outputs (attention output projection, second FFN
    layer) zeroed, so each block is the identity and the last position's state is ``LN(e_last)``, and with every
    whitening projection (the single adapter's, each expert's and the routed θ₀ expert's) set to one semi-orthogonal
    ``W`` (orthonormal rows, ``W Wᵀ = I``, when the hidden size is below the feature width, else orthonormal columns,
    ``Wᵀ W = I``; from the QR decomposition of a Gaussian matrix drawn with ``seed``); the whitening centres start at
    zero. Then ``e_i = W z_i`` and

        s_i = cos(LN(W z_last), W z_i) / τ

    ranks items by the cosine of their z-scored text embeddings with the last item's, seen through a random
    subspace (the whole space when ``Wᵀ W = I``; up to the final LayerNorm's centring of the last item's vector; the
    MLP corrections start at zero as before). Training starts from there: the zeroed outputs get gradients at the
    first step (their inputs are not zero), so nothing stays frozen.

    Why: with the default draws θ₀'s random projection, position embeddings and blocks add noise to that score. On
    held-out Toys (MiniLM, seed 0) the default θ₀ scores test Recall@10 .0722, this one .0780 and the plain cosine
    of the z-scored embeddings .0809.
    """
    out = {name: tensor.clone() for name, tensor in weights.items()}
    projections = [n for n in out if n.endswith("projection.weight")]
    if not projections:
        raise FedmergeError("text_similarity θ₀ needs a whitening projection; the state has none")
    d_out, d_in = out[projections[0]].shape
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(d_in, d_out), min(d_in, d_out), generator=generator, dtype=torch.float64))
    projection = q.T if d_out <= d_in else q  # (d_out, d_in), orthonormal rows or columns
    for name in out:
        if name.endswith("projection.weight"):
            out[name] = projection.to(out[name].dtype).contiguous()
        elif name == "position.weight" or any(name.endswith(suffix) for suffix in RESIDUAL_OUTPUTS):
            out[name] = torch.zeros_like(out[name])
    return out


def recent_first(inputs: torch.Tensor) -> torch.Tensor:
    """(B, L) right-aligned, PAD-padded input items -> (B, L, L): row [b, t] is position t's history most recent
    first, ``inputs[b, t], inputs[b, t − 1], …``, PAD-filled (what :meth:`TextSASRec.with_history_bias` reads for
    every position of a training window)."""
    length = inputs.shape[1]
    steps = torch.arange(length, device=inputs.device)
    source = steps.unsqueeze(1) - steps.unsqueeze(0)  # [t, k] = t − k
    return torch.where(source >= 0, inputs[:, source.clamp(min=0)], PAD)


def check_last_item_text_bias(last_item_text_bias: bool, last_item_bias: bool, adapter: str) -> None:
    """Refuse ``last_item_text_bias`` without ``last_item_bias`` (the b that v·x̂ adds to) or without the routed
    adapter (the only features that carry each item's raw text embedding; the others are z-scored per catalog, which
    removes what tells a grocery catalog from a toy catalog)."""
    if last_item_text_bias and not (last_item_bias and adapter == "routed"):
        raise ValueError(f"last_item_text_bias adds v·x̂ (the last item's raw text embedding) to last_item_bias: it "
                         f"needs last_item_bias on and adapter='routed' (whose features carry the raw embedding), "
                         f"got last_item_bias = {last_item_bias}, adapter = {adapter!r}")


def check_repeat_user_bias(repeat_user_bias: bool, last_item_bias: bool, history_bias: bool) -> None:
    """``repeat_user_bias`` replaces b and b_h (and needs the whole history, which ``history_bias`` reads)."""
    if repeat_user_bias and not (last_item_bias and history_bias):
        raise ValueError(f"repeat_user_bias replaces last_item_bias and history_bias for users who repeat an item: "
                         f"it needs both on, got last_item_bias = {last_item_bias}, history_bias = {history_bias}")


def repeats_an_item(history: torch.Tensor) -> torch.Tensor:
    """(P, H) histories most recent first, PAD-filled -> (P,) bool: the row holds some item more than once."""
    if history.shape[1] < 2:
        return torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
    return ((history[:, 1:] >= 0) & ~first_earlier(history)).any(1)


def first_earlier(history: torch.Tensor) -> torch.Tensor:
    """(P, H) histories most recent first -> (P, H − 1) bool: ``history[:, k]`` (k ≥ 1) is an item that appears in
    none of ``history[:, :k]`` (so neither the last item nor a repeat of a more recent one) and is not PAD."""
    earlier = history[:, 1:]
    repeats = earlier.unsqueeze(2) == history.unsqueeze(1)  # [p, k − 1, j]: history[k] == history[j]
    before = torch.ones(earlier.shape[1], history.shape[1], dtype=torch.bool, device=history.device).tril()
    return (earlier >= 0) & ~(repeats & before).any(2)


class TextSASRec(nn.Module):
    """Adapter + causal pre-LN Transformer over padded (B, L) item-index batches; see the module docstring."""

    def __init__(
        self,
        dim_in: int,
        hidden: int,
        n_layers: int,
        n_heads: int,
        ffn_mult: int,
        max_len: int,
        dropout: float,
        adapter: str,
        n_experts: int,
        temperature: float,
        adapter_width: int = 512,
        text_tower: TextTower | None = None,
        routed_unseen: str = "none",
        routed_mix_temperature: float = 0.05,
        last_item_bias: bool = False,
        history_bias: bool = False,
        history_pooling: int = 0,
        repeat_user_bias: bool = False,
        last_item_text_bias: bool = False,
    ) -> None:
        super().__init__()
        # b of with_history_bias (a learned score offset of the user's most recent item), 0 at θ₀; absent when off
        self.last_item_bias = nn.Parameter(torch.zeros(())) if last_item_bias else None
        # b_h of with_history_bias (the same for every earlier item of the user's history), 0 at θ₀; absent when off
        self.history_bias = nn.Parameter(torch.zeros(())) if history_bias else None
        # w_1..w_K of with_recent_items (the K items before the last one join the query), 0 at θ₀; absent when K = 0
        self.history_pooling = nn.Parameter(torch.zeros(history_pooling)) if history_pooling else None
        # (b_r, b_hr) of history_offsets: b and b_h for a user whose history repeats an item, 0 at θ₀; needs both
        check_repeat_user_bias(repeat_user_bias, last_item_bias, history_bias)
        self.repeat_user_bias = nn.Parameter(torch.zeros(2)) if repeat_user_bias else None
        # v of history_offsets, 0 at θ₀: b of the last item i becomes b + v·x̂_i, x̂_i its unit raw text embedding
        check_last_item_text_bias(last_item_text_bias, last_item_bias, adapter)
        if last_item_text_bias and text_tower is not None:
            raise ValueError("last_item_text_bias reads the routed adapter's raw text embeddings, which a model that "
                             "tunes text-encoder layers does not have")
        self.last_item_text_bias = nn.Parameter(torch.zeros(dim_in // 2)) if last_item_text_bias else None
        if adapter == "moe":
            self.adapter: nn.Module = MoEAdapter(dim_in, hidden, n_experts, dropout)
        elif adapter == "routed":
            if dim_in % 2:
                raise ValueError(f"the routed adapter reads [z | raw] features of even width, got {dim_in}")
            self.adapter = RoutedAdapter(dim_in // 2, hidden, adapter_width, n_experts, dropout,
                                         unseen=routed_unseen, mix_temperature=routed_mix_temperature)
        elif adapter == "mlp":
            self.adapter = ResidualMLPAdapter(dim_in, hidden, adapter_width, dropout)
        else:
            self.adapter = WhiteningLayer(dim_in, hidden, dropout)
        self.position = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.position.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PreLNBlock(hidden, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(hidden)
        self.text_tower = text_tower
        self.max_len = max_len
        self.temperature = temperature

    def text_embeddings(self, item_features: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Standardized item text embeddings (n_items, dim_in) the adapter reads.

        Without a text tower these are the features themselves; with one, ``(tower(states) - mean) / std`` from the
        :func:`token_features` layout (chunks of ``chunk`` items when no gradient is needed).
        """
        if self.text_tower is None:
            return item_features
        if item_features.ndim != 3:
            raise ValueError(f"a model that tunes text-encoder layers needs token features (n, 2 + T, d), "
                             f"got shape {tuple(item_features.shape)}")
        mean, std = item_features[:, 0], item_features[:, 1]
        if torch.is_grad_enabled():
            pooled = self.text_tower(item_features[:, 2:])
        else:
            pooled = torch.cat([self.text_tower(item_features[i : i + chunk, 2:])
                                for i in range(0, len(item_features), chunk)])
        return (pooled - mean) / std

    def item_representations(self, item_features: torch.Tensor) -> torch.Tensor:
        """Adapter output ``e_i`` for every catalog item, (n_items, hidden)."""
        return self.adapter(self.text_embeddings(item_features))

    def encode(self, seqs: torch.Tensor, items: torch.Tensor, last_only: bool = False, trim: bool = True) -> torch.Tensor:
        """Hidden states (B, L', hidden) for right-aligned padded ``seqs`` (with ``history_pooling``, the pooled query
        of :meth:`with_recent_items`, unit-normalized before the pooled items are added: every score normalizes it
        again); all-padding leading columns are dropped
        (``trim``; False keeps every column, same values at the non-padding positions, shapes independent of the
        data as ``torch.func.vmap`` needs).

        ``last_only``: the last block computes the last position only, (B, 1, hidden) - what scoring needs, at
        about half the cost of a two-block encoder.
        """
        if seqs.shape[1] > self.max_len:
            raise ValueError(f"sequence batch has {seqs.shape[1]} columns, the model holds {self.max_len} positions")
        if trim:
            filled = (seqs != PAD).any(dim=0).nonzero()
            seqs = seqs[:, int(filled[0]) if len(filled) else seqs.shape[1] - 1 :]
        length = seqs.shape[1]
        is_pad = seqs == PAD
        x = items[seqs.clamp(min=0)] * (~is_pad).unsqueeze(-1)
        slots = torch.arange(self.max_len - length, self.max_len, device=seqs.device)
        x = self.input_dropout(x + self.position(slots))
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).triu(1)
        # blocked[b, q, k]: future keys and padding keys; a query may always see itself (keeps pad rows finite).
        blocked = causal.unsqueeze(0) | is_pad.unsqueeze(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=seqs.device)
        blocked = blocked.repeat_interleave(self.blocks[0].attention.num_heads, dim=0) if self.blocks else blocked
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x, blocked, last_only=last_only and depth == len(self.blocks))
        return self.with_recent_items(self.final_norm(x[:, -1:] if last_only else x), seqs, items)

    def with_recent_items(self, hidden: torch.Tensor, seqs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``h_t/‖h_t‖ + Σ_{k=1..K} w_k · e_{t−k}/‖e_{t−k}‖`` (a PAD or missing item adds nothing) for hidden states
        (B, L', hidden) at the last L' positions of ``seqs`` (B, L), ``w`` the learned ``history_pooling``
        (0 at θ₀, where the scores are unchanged: every score normalizes h). ``hidden`` itself without one.

        Why: a text-similarity model queries with the last item only; how much the few items before it say about
        the next purchase (recency) is a property of how people shop rather than of one catalog's items, so it is a
        handful of numbers a domain can teach a model that serves another (Amazon Toys, no training: the last 5
        items at weights 0.5^k, every history item left out, rank 1.12× better by Recall@10 than the plain last-item
        cosine, 1.03× better than the last item alone with the history left out; README, "History-aware scoring").
        """
        if self.history_pooling is None:
            return hidden
        out = F.normalize(hidden, dim=-1)
        length, kept = seqs.shape[1], hidden.shape[1]
        for k, weight in enumerate(self.history_pooling, start=1):
            earlier = F.pad(seqs, (k, 0), value=PAD)[:, length - kept : length]
            out = out + weight * F.normalize(items[earlier.clamp(min=0)], dim=-1) * (earlier != PAD).unsqueeze(-1)
        return out

    def logits(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``cos(h, e_i) / τ`` for hidden states (..., hidden) against item representations (n, hidden)."""
        return (F.normalize(hidden, dim=-1) / self.temperature) @ F.normalize(items, dim=-1).T

    def paired_logits(self, hidden: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``cos(h_r, e_r) / τ`` row by row: the diagonal of :meth:`logits` for hidden states and items both (P, hidden)."""
        return ((F.normalize(hidden, dim=-1) / self.temperature) * F.normalize(items, dim=-1)).sum(-1)

    def histories(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) input items -> (B, L, H), what :meth:`with_history_bias` reads at each position:
        :func:`recent_first` (H = L) with a ``history_bias``, else the position's own item only (H = 1)."""
        return recent_first(inputs) if self.history_bias is not None else inputs.unsqueeze(-1)

    def with_history_bias(
        self, logits: torch.Tensor, history: torch.Tensor, last_text: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``s_i + (b / τ) · [i = h_0] + (b_h / τ) · [i ∈ {h_1, h_2, …} ∖ {h_0}]``: ``logits`` (P, n) over the catalog
        (``s_i = cos(h, e_i) / τ``), ``history`` (P, H) each row's input items most recent first (columns of
        ``logits``, PAD where a row has fewer; :func:`recent_first`): what the model reads, the last ``max_len``
        items when scoring, the current training window's items in training. ``b`` is the learned
        ``last_item_bias``, ``b_h`` the learned ``history_bias`` (each 0 at θ₀, each absent when off; an item
        repeated in the history gets its offset once; for a row that repeats an item, ``repeat_user_bias``'s pair
        replaces both; with ``last_item_text_bias`` b depends on the last item's text ``last_text``:
        :meth:`history_offsets`), in cosine units like the scores before the temperature: Adam moves a
        weight by about lr per step, and b in logit units would need ~1/τ as many steps to matter (on Amazon Beauty
        it reached −0.18 logits in 3 epochs, against a gap of ≈ 1.4–3 logits between the last item and its nearest
        neighbours).
        Unchanged logits without either.

        Why: the last item's text is closest to itself, so a text-similarity model ranks it first for every user,
        while whether users buy the item they just bought again is a property of the domain that its interactions
        teach (Amazon Beauty and Toys: never, in the test targets; Pantry: 2.6 % of them). ``b_h`` says the same of
        the items bought before it (Amazon Beauty and Toys: never; Pantry: 0.4 %), which the query of
        :meth:`with_recent_items` also brings close.
        """
        last_offset, earlier_offset = self.history_offsets(history, last_text)
        if last_offset is not None:
            last = history[:, 0]
            offset = (last_offset / self.temperature).to(logits.dtype) * (last >= 0).to(logits.dtype)  # none for PAD
            logits = logits.scatter_add(-1, last.clamp(min=0).unsqueeze(-1), offset.unsqueeze(-1))
        if earlier_offset is not None and history.shape[1] > 1:
            offset = (earlier_offset / self.temperature).to(logits.dtype).unsqueeze(1)
            logits = logits.scatter_add(-1, history[:, 1:].clamp(min=0),
                                        offset * first_earlier(history).to(logits.dtype))
        return logits

    def history_offsets(
        self, history: torch.Tensor, last_text: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each row's offsets (P,) of its last item and of its earlier items, in cosine units (None when off): b and
        b_h, or with ``repeat_user_bias`` (b_r, b_hr) for a row whose ``history`` (P, H) repeats an item
        (:func:`repeats_an_item`); with ``last_item_text_bias`` v the last item's b (not b_r) gains ``v·x̂``, x̂ the
        unit raw text embedding of the row's last item (the second half of its routed features ``last_text``
        (P, dim_in): :meth:`last_item_text`).

        Why: users who re-buy show it in their own history (Amazon Pantry, test users: 31 % of histories repeat an
        item; the test target is in the history for 5.5 % of them, 1.8 % of the others; Beauty and Toys: no history
        repeats an item). A domain whose users never repeat leaves (b_r, b_hr) at θ₀'s 0 (no gradient reaches them;
        under DP-SGD the noise moves them like every trained weight), so a model merged from such domains still
        scores a new catalog's re-buying users as θ₀ does instead of pushing their history down
        (Pantry, no training: leaving every history item out costs 27 % of Recall@10, 12 % when users who repeat an
        item keep theirs).
        """
        rows = history.shape[0]
        last = None if self.last_item_bias is None else self.last_item_bias.expand(rows)
        earlier = None if self.history_bias is None else self.history_bias.expand(rows)
        if self.last_item_text_bias is not None:
            if last_text is None:
                raise ValueError("last_item_text_bias needs the features of each row's last item (last_text, "
                                 "TextSASRec.last_item_text); got None")
            width = self.last_item_text_bias.shape[0]
            last = last + F.normalize(last_text[:, width:].to(self.last_item_text_bias.dtype), dim=-1) \
                @ self.last_item_text_bias
        if self.repeat_user_bias is not None:  # replaces b + v·x̂ too: b_r stays θ₀'s 0 where no user repeats
            repeat = repeats_an_item(history)
            last = torch.where(repeat, self.repeat_user_bias[0], last)
            earlier = torch.where(repeat, self.repeat_user_bias[1], earlier)
        return last, earlier

    def last_item_text(self, features: torch.Tensor, history: torch.Tensor) -> torch.Tensor | None:
        """The rows of ``features`` (n, dim_in) of each row's last item ``history[:, 0]`` (P, dim_in; a PAD row reads
        row 0, whose offset is never used), what :meth:`history_offsets` reads with ``last_item_text_bias``; None
        without it."""
        if self.last_item_text_bias is None:
            return None
        return features[history[:, 0].clamp(min=0)]

    def with_sampled_history_bias(
        self, positive: torch.Tensor, negative: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
        history: torch.Tensor,
        last_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`with_history_bias` on a sampled softmax's scores: ``positive`` (P,) of ``targets`` and
        ``negative`` (P, k) of the shared ``negatives`` get ``b / τ`` where that item is the row's last item
        ``history[:, 0]`` and ``b_h / τ`` where it is one of the row's earlier items ``history[:, 1:]`` only."""
        last = history[:, 0]
        last_offset, earlier_offset = self.history_offsets(history, last_text)
        if last_offset is not None:
            offset = (last_offset / self.temperature).to(positive.dtype)
            positive = positive + offset * (targets == last).to(positive.dtype)
            is_last = negatives.unsqueeze(0) == last.unsqueeze(1)
            negative = negative + offset.unsqueeze(1) * is_last.to(negative.dtype)
        if earlier_offset is not None and history.shape[1] > 1:
            offset, earlier = (earlier_offset / self.temperature).to(positive.dtype), history[:, 1:]
            in_earlier = ((targets.unsqueeze(1) == earlier).any(1) & (targets != last)).to(positive.dtype)
            positive = positive + offset * in_earlier
            hits = torch.zeros_like(negative, dtype=torch.bool)
            for column in earlier.T:  # H columns of (P, k) comparisons, not one (P, H, k) tensor
                hits |= negatives.unsqueeze(0) == column.unsqueeze(1)
            hits &= negatives.unsqueeze(0) != last.unsqueeze(1)
            negative = negative + offset.unsqueeze(1) * hits.to(negative.dtype)
        return positive, negative

    def forward(self, seqs: torch.Tensor, item_features: torch.Tensor) -> torch.Tensor:
        items = self.item_representations(item_features)
        history = seqs.flip(1)
        return self.with_history_bias(self.logits(self.encode(seqs, items, last_only=True)[:, -1], items),
                                      history, self.last_item_text(item_features, history))


def check_item_ids(seqs: Sequence[np.ndarray], n_items: int) -> None:
    """ValueError naming the first history with an item id outside ``0..n_items-1`` (-2 read item 0's text, an inner
    -1 was taken for padding, ``n_items`` an IndexError); one vectorized pass over every id."""
    filled = [np.asarray(s) for s in seqs if len(s)]
    if not filled:
        return
    ids = np.concatenate(filled)
    if ids.min() >= 0 and ids.max() < n_items:  # False for a NaN id too
        return
    row = next(r for r, s in enumerate(seqs) if len(s) and not (np.min(s) >= 0 and np.max(s) < n_items))
    raise ValueError(f"history {row} holds item ids outside 0..{n_items - 1}: {np.asarray(seqs[row][:10]).tolist()}")


@dataclass
class SequentialFamily(ModelFamily):
    """Text-based SASRec family; every constant is a constructor parameter (see the module docstring)."""

    name: ClassVar[str] = "sequential"
    # how a domain's users shop (TextSASRec.with_history_bias / with_recent_items), each present when switched on
    behaviour_parameters: ClassVar[tuple[str, ...]] = ("last_item_bias", "history_bias", "history_pooling",
                                                        "repeat_user_bias", "last_item_text_bias")

    hidden: int = 128
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 2
    max_len: int = 50
    dropout: float = 0.1
    adapter: str = "mlp"
    adapter_width: int = 512
    n_experts: int = 4
    temperature: float = 0.07
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    # None: each batch in one forward/backward; k: in chunks of at most k windows with gradients accumulated (the
    # same step, peak training memory of a k-window batch; see micro_batches)
    micro_batch_size: int | None = None
    max_epochs: int = 100
    patience: int = 3
    n_negatives: int | None = None  # None: full softmax; k: sampled softmax over k shared negatives per batch
    negative_sampling: str = "uniform"  # sampled softmax's proposal: "uniform" or "popularity" (training counts)
    max_seconds: float | None = None
    device: str | None = None
    encoder_layers: int = 0
    text_model: str | None = None
    text_max_length: int = 64
    encoder_lr: float = 5e-5
    proximal_mu: float = 0.0
    routed_min_share: float = 0.05
    # routed adapter, items far from every catalog cluster: "none" (nearest expert), "theta0" (a frozen θ₀ expert
    # for items whose nearest-centroid similarity is below the routed_unseen_quantile of the training catalogs') or
    # "mix" (those items get a similarity-weighted mix of the experts and the θ₀ expert at routed_mix_temperature)
    routed_unseen: str = "none"
    routed_unseen_quantile: float = 0.01
    routed_mix_temperature: float = 0.05
    # β of the distillation towards θ₀ on the other training domains' public catalogs (0: off), its temperature,
    # pseudo-users and candidate items per step (fedmerge.models.theta0_distill)
    theta0_distill: float = 0.0
    theta0_distill_temperature: float = 0.05
    theta0_distill_users: int = 64
    theta0_distill_candidates: int = 1024
    # θ₀'s weights: "random" (PyTorch's seeded initialization) or "text_similarity" (the same draws, then every
    # residual branch and the position embeddings zeroed and one seeded semi-orthogonal whitening projection shared
    # by every adapter expert: θ₀ scores by the last item's text similarity; see text_similarity_init)
    theta0_init: str = "random"
    # a learned score offset b of the user's most recent item, (cos + b·[i = last item]) / τ (0 at θ₀; see
    # TextSASRec.with_history_bias): whether users re-buy what they just bought is learned from the interactions
    last_item_bias: bool = False
    # a second learned offset b_h, of every earlier item of the user's history (0 at θ₀; same method)
    history_bias: bool = False
    # K >= 1: the K items before the last one join the query with learned weights w_1..w_K (0 at θ₀; see
    # TextSASRec.with_recent_items); 0: the query is the Transformer's last hidden state alone
    history_pooling: int = 0
    # offsets (b_r, b_hr) that replace b and b_h for a user whose history repeats an item (0 at θ₀; needs both on;
    # see TextSASRec.history_offsets)
    repeat_user_bias: bool = False
    # the last item's offset b becomes b + v·x̂_i, x̂_i the unit raw text embedding of the last item i and v learned
    # (0 at θ₀; needs last_item_bias and the routed adapter, whose features carry the raw embedding; see
    # TextSASRec.history_offsets): whether an item is bought again right away is partly a property of the item
    # (groceries, not toys), which a new catalog's own text then says
    last_item_text_bias: bool = False
    # the own AdamW learning rate of b, b_h, w, (b_r, b_hr) and v, without weight decay (None: they train with the
    # other weights at lr, decayed). b is one scalar that every training window moves the same way, so at lr it is
    # still drifting after a few epochs.
    last_item_bias_lr: float | None = None
    # the weights local training moves (non-private and DP-SGD): fnmatch patterns over parameter names, e.g.
    # ["adapter.*"] or ["*.bias", "*norm.*"]; every other weight stays at θ₀ (its task-vector entry is 0). None: all.
    # Under DP-SGD the per-user clip and the noise then cover only these weights (noise norm ∝ √(their count)).
    trainable: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.trainable is not None:
            if isinstance(self.trainable, str) or not all(isinstance(p, str) and p for p in self.trainable) \
                    or not self.trainable:
                raise ValueError(f"trainable must be None (every weight) or a non-empty list of parameter-name "
                                 f"patterns, got {self.trainable!r}")
            self.trainable = tuple(self.trainable)
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}; valid: {list(ADAPTERS)}")
        positive = {
            "hidden": self.hidden,
            "n_heads": self.n_heads,
            "ffn_mult": self.ffn_mult,
            "max_len": self.max_len,
            "n_experts": self.n_experts,
            "adapter_width": self.adapter_width,
            "temperature": self.temperature,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
        }
        bad = {k: v for k, v in positive.items() if not v > 0}
        if bad:
            raise ValueError(f"parameters must be positive: {bad}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden size {self.hidden} is not divisible by n_heads={self.n_heads}")
        if self.n_layers < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"need n_layers >= 0 and 0 <= dropout < 1, got {self.n_layers}, {self.dropout}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None (whole batches) or >= 1, got {self.micro_batch_size}")
        if self.n_negatives is not None and self.n_negatives < 1:
            raise ValueError(f"n_negatives must be None (full softmax) or >= 1, got {self.n_negatives}")
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(f"unknown negative_sampling {self.negative_sampling!r}; valid: {list(NEGATIVE_SAMPLING)}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {self.proximal_mu}")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds >= 0):
            raise ValueError(f"max_seconds must be None (no cap) or a finite number >= 0, got {self.max_seconds} "
                             "(NaN turned the cap off)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.routed_min_share < 1.0:
            raise ValueError(f"routed_min_share must be in [0, 1), got {self.routed_min_share}")
        if self.routed_unseen not in ROUTED_UNSEEN:
            raise ValueError(f"unknown routed_unseen {self.routed_unseen!r}; valid: {list(ROUTED_UNSEEN)}")
        if not 0.0 <= self.routed_unseen_quantile < 1.0:
            raise ValueError(f"routed_unseen_quantile must be in [0, 1), got {self.routed_unseen_quantile}")
        if not (math.isfinite(self.routed_mix_temperature) and self.routed_mix_temperature > 0):
            raise ValueError(f"routed_mix_temperature must be a finite number > 0, got {self.routed_mix_temperature}")
        if not (math.isfinite(self.theta0_distill) and self.theta0_distill >= 0):
            raise ValueError(f"theta0_distill must be a finite number >= 0 (0: off), got {self.theta0_distill}")
        if not (math.isfinite(self.theta0_distill_temperature) and self.theta0_distill_temperature > 0):
            raise ValueError(f"theta0_distill_temperature must be a finite number > 0, got "
                             f"{self.theta0_distill_temperature}")
        if self.theta0_distill_users < 1 or self.theta0_distill_candidates < 2:
            raise ValueError(f"need theta0_distill_users >= 1 and theta0_distill_candidates >= 2, got "
                             f"{self.theta0_distill_users}, {self.theta0_distill_candidates}")
        if self.theta0_init not in THETA0_INITS:
            raise ValueError(f"unknown theta0_init {self.theta0_init!r}; valid: {list(THETA0_INITS)}")
        if self.adapter == "routed" and self.encoder_layers:
            raise ValueError("adapter='routed' with encoder_layers > 0 is not supported: the router reads cached "
                             "raw embeddings")
        if isinstance(self.history_pooling, bool) or not isinstance(self.history_pooling, int) \
                or not 0 <= self.history_pooling < self.max_len:
            raise ValueError(f"history_pooling must be 0 (off) or a number of earlier items below max_len="
                             f"{self.max_len}, got {self.history_pooling}")
        check_repeat_user_bias(self.repeat_user_bias, self.last_item_bias, self.history_bias)
        check_last_item_text_bias(self.last_item_text_bias, self.last_item_bias, self.adapter)
        behaviour = self.last_item_bias or self.history_bias or self.history_pooling > 0
        if self.last_item_bias_lr is not None and not (behaviour and self.last_item_bias_lr > 0):
            raise ValueError(f"last_item_bias_lr must be None or > 0 with last_item_bias, history_bias or "
                             f"history_pooling on, got {self.last_item_bias_lr} (last_item_bias = "
                             f"{self.last_item_bias}, history_bias = {self.history_bias}, history_pooling = "
                             f"{self.history_pooling})")
        if self.encoder_layers < 0 or self.text_max_length < 1 or not self.encoder_lr > 0:
            raise ValueError(f"need encoder_layers >= 0, text_max_length >= 1 and encoder_lr > 0, got "
                             f"{self.encoder_layers}, {self.text_max_length}, {self.encoder_lr}")

    def text_encoder(self) -> SentenceEncoder:
        """The sentence encoder whose top ``encoder_layers`` layers are tuned (``text_model``; None: MiniLM)."""
        return _sentence_encoder(self.text_model, self.text_max_length)

    def feature_width(self, embedding_width: int) -> int:
        """The tuned text encoder's width with ``encoder_layers > 0``; else ``embedding_width``, doubled for the
        routed adapter (its rows carry the raw embedding too)."""
        if self.encoder_layers:
            return self.text_encoder().dim
        return 2 * embedding_width if self.adapter == "routed" else embedding_width

    @property
    def init_reads_catalogs(self) -> bool:
        """θ₀ of the routed adapter clusters the public catalogs (see :meth:`initial_weights`)."""
        return self.adapter == "routed"

    @property
    def trains_on_public_catalogs(self) -> bool:
        """With ``theta0_distill > 0`` :meth:`train` needs the other training domains' public catalog features."""
        return self.theta0_distill > 0

    def optimizer(self, module: nn.Module) -> torch.optim.AdamW:
        """AdamW over ``module``'s trainable parameters (local training and DP-SGD): the tuned text-encoder layers at
        ``encoder_lr``, the :attr:`behaviour_parameters` (offsets, history-pooling weights, the text-conditioned
        offset's v) at ``last_item_bias_lr`` without weight decay when that is set, the rest at ``lr`` with
        ``weight_decay``."""
        groups: dict[str, list[nn.Parameter]] = {"rest": [], "tower": [], "bias": []}
        for name, p in module.named_parameters():
            if p.requires_grad:
                own = name in self.behaviour_parameters and self.last_item_bias_lr is not None
                groups["tower" if name.startswith("text_tower.") else "bias" if own else "rest"].append(p)
        return torch.optim.AdamW([{"params": groups["rest"]}, {"params": groups["tower"], "lr": self.encoder_lr},
                                  {"params": groups["bias"], "lr": self.last_item_bias_lr or self.lr,
                                   "weight_decay": 0.0}], lr=self.lr, weight_decay=self.weight_decay)

    def initial_weights(self, dim: int, seed: int = 0, catalog_features: Sequence[torch.Tensor] = ()) -> StateDict:
        """The seeded initialization; with ``adapter="routed"`` its router is :func:`catalog_clusters` of the raw
        embeddings in ``catalog_features`` (:meth:`item_features` of every merged domain's public catalog)."""
        weights = super().initial_weights(dim, seed)
        if self.trainable is not None:  # a pattern that matches no weight fails with θ₀, before any client trains
            trainable_names(self.trainable, list(weights))
        if self.theta0_init == "text_similarity":
            weights = text_similarity_init(weights, seed)
        if not self.init_reads_catalogs:
            return weights
        if not catalog_features:
            raise FedmergeError("adapter='routed' needs the public catalogs' item features to build θ₀'s router")
        bad = [tuple(f.shape) for f in catalog_features if f.ndim != 2 or f.shape[1] != dim]
        if bad:
            raise FedmergeError(f"routed θ₀ needs (n, {dim}) catalog features, got shapes {bad}")
        raw = torch.cat([f[:, dim // 2 :] for f in catalog_features]).numpy()
        weights["adapter.centre"], weights["adapter.centroids"] = catalog_clusters(raw, self.n_experts, seed)
        if self.routed_unseen != "none":  # "unseen": below this quantile of the training catalogs' similarities
            centre, centroids = weights["adapter.centre"], weights["adapter.centroids"]
            similarity = nearest_similarity(torch.from_numpy(raw), centre, centroids)
            weights["adapter.unseen_threshold"] = torch.quantile(similarity, self.routed_unseen_quantile)
        return weights

    def fixed_parameters(self, theta0: StateDict) -> frozenset[str]:
        """The weights outside ``trainable`` (when it is set: local training never moves them, so they ship as θ₀
        and carry no noise) and the routed adapter's router buffers (``adapter.centre``, ``adapter.centroids``) and,
        with ``routed_unseen`` ``"theta0"`` or ``"mix"``, its ``adapter.unseen_threshold`` and frozen θ₀ expert
        ``adapter.base.*``: set from the public catalogs in θ₀ and never trained; changing them would re-route (or
        re-embed) every item of every domain."""
        fixed: set[str] = set()
        if self.trainable is not None:
            fixed |= set(theta0) - trainable_names(self.trainable, list(theta0))
        if self.adapter == "routed":
            router = {f"adapter.{b}" for b in (*ROUTER_BUFFERS, "unseen_threshold")}
            fixed |= {n for n in theta0 if n in router or n.startswith("adapter.base.")}
        return frozenset(fixed)

    @property
    def reads_text_embeddings(self) -> bool:
        return not self.encoder_layers

    def catalog_features(
        self, catalog: ItemCatalog, embeddings: Callable[[], np.ndarray], statistics_rows: int | None = None
    ) -> torch.Tensor:
        """:meth:`item_features` of the embeddings, or with ``encoder_layers > 0`` :func:`token_features` of the
        catalog's texts through :meth:`text_encoder` (the scenario's own encoder is then not used)."""
        if not self.encoder_layers:
            return self.item_features(embeddings(), statistics_rows=statistics_rows)
        return token_features(*self.text_encoder().token_states(catalog.texts(), self.encoder_layers),
                              statistics_rows=statistics_rows)

    def item_features(self, embeddings: np.ndarray, statistics_rows: int | None = None) -> torch.Tensor:
        """Catalog-wise z-scored raw text embeddings (see :func:`standardize_features`); for the routed adapter
        ``[z | raw]`` (the router reads the raw embedding: z-scoring removes what tells catalogs apart)."""
        z = standardize_features(embeddings, statistics_rows=statistics_rows)
        if self.adapter == "routed":
            z = np.concatenate([z, embeddings.astype(np.float32)], axis=1)
        return torch.from_numpy(z)

    def build(self, dim: int) -> nn.Module:
        tower = None
        if self.encoder_layers:
            encoder = self.text_encoder()
            if dim != encoder.dim:
                raise FedmergeError(f"item features have width {dim}, the text encoder {encoder.model_source!r} {encoder.dim}")
            tower = TextTower(encoder.top_layers(self.encoder_layers), normalize=encoder.normalize)
        return TextSASRec(
            dim_in=dim,
            hidden=self.hidden,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            ffn_mult=self.ffn_mult,
            max_len=self.max_len,
            dropout=self.dropout,
            adapter=self.adapter,
            n_experts=self.n_experts,
            temperature=self.temperature,
            adapter_width=self.adapter_width,
            text_tower=tower,
            routed_unseen=self.routed_unseen,
            routed_mix_temperature=self.routed_mix_temperature,
            last_item_bias=self.last_item_bias,
            history_bias=self.history_bias,
            history_pooling=self.history_pooling,
            repeat_user_bias=self.repeat_user_bias,
            last_item_text_bias=self.last_item_text_bias,
        )

    def parameter_groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Groups ``adapter``, ``position``, ``block.<i>`` (one per Transformer block), ``final_norm``,
        ``text_tower.<i>`` (one per tuned text-encoder layer) and each of ``last_item_bias``, ``history_bias``,
        ``history_pooling``, ``repeat_user_bias`` and ``last_item_text_bias`` the model has."""
        groups: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            if parts[0] == "blocks":
                group = f"block.{parts[1]}"
            elif parts[0] == "text_tower":
                group = f"text_tower.{parts[2]}"
            else:
                group = parts[0]
            groups.setdefault(group, []).append(name)
        return groups

    def transformer_layer_groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        """One group per Transformer layer - ``block.<i>`` of the sequence encoder and ``text_tower.<i>`` of a tuned
        text encoder - and ``others`` for the adapter, positions and final norms (MergeRec's official grouping)."""
        groups: dict[str, list[str]] = {}
        for group, members in self.parameter_groups(names).items():
            layer = group.startswith(("block.", "text_tower."))
            groups.setdefault(group if layer else "others", []).extend(members)
        return groups

    def scorer(self, weights: StateDict, item_features: torch.Tensor, batch_size: int = SCORE_BATCH) -> Scorer:
        """Like :meth:`ModelFamily.scorer`, but item representations are computed once and sequences are batched
        by length (little padding), ``batch_size`` users per forward pass; rows come back in input order."""
        return self._module_scorer(*self._loaded(weights, item_features), batch_size)

    def _loaded(self, weights: StateDict, item_features: torch.Tensor) -> tuple[TextSASRec, torch.Tensor]:
        """An eval-mode module holding ``weights`` on :meth:`resolved_device`, and its catalog text embeddings."""
        device = self.resolved_device()
        module = self.load(weights, item_features.shape[-1]).to(device)
        with torch.no_grad():
            return module, module.text_embeddings(item_features.to(device=device, dtype=torch.float32))

    def _module_scorer(self, module: TextSASRec, text: torch.Tensor, batch_size: int = SCORE_BATCH) -> Scorer:
        """Scorer of an eval-mode ``module`` whose catalog text embeddings are ``text``."""
        device = text.device
        with torch.no_grad():
            items = module.adapter(text)

        @torch.no_grad()
        def score(seqs: list[np.ndarray]) -> np.ndarray:
            check_item_ids(seqs, len(items))
            out = np.empty((len(seqs), len(items)), dtype=np.float32)
            order = np.argsort([min(len(s), self.max_len) for s in seqs], kind="stable")
            for start in range(0, len(seqs), batch_size):
                rows = order[start : start + batch_size]
                padded = pad_sequences([seqs[r] for r in rows], self.max_len).to(device)
                logits = module.logits(module.encode(padded, items, last_only=True)[:, -1], items)
                history = padded.flip(1)
                logits = module.with_history_bias(logits, history, module.last_item_text(text, history))
                out[rows] = logits.float().cpu().numpy()
            return out

        return score

    def resolved_device(self) -> torch.device:
        """``device``, else CUDA when present, else the CPU."""
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _training_device(self) -> torch.device:
        """:meth:`resolved_device`; tuning text-encoder layers refuses to fall back to the CPU unless ``device`` says so."""
        device = self.resolved_device()
        if self.encoder_layers and device.type == "cpu" and self.device is None:
            raise FedmergeError(
                f"encoder_layers={self.encoder_layers} fine-tunes the text encoder, which needs a CUDA device and "
                "none is available; set encoder_layers=0 (cached text embeddings), or device='cpu' to force a slow run"
            )
        return device

    def negative_proposal(self, domain: Domain) -> torch.Tensor | None:
        """The sampled softmax's proposal Q over the catalog, (n_items,) float64: with
        ``negative_sampling="popularity"`` ``Q_j ∝ 1 + (occurrences of item j in the training sequences)``; None for
        the uniform proposal or the full softmax."""
        if self.n_negatives is None or self.negative_sampling == "uniform":
            return None
        occurrences = np.concatenate([np.zeros(0, np.int64), *domain.train])
        counts = torch.from_numpy(np.bincount(occurrences, minlength=domain.n_items).astype(np.float64) + 1.0)
        return counts / counts.sum()

    def _negatives(
        self, n_items: int, generator: torch.Generator, proposal: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(negatives, log E[c_j]) for one batch. Uniform: ``k = min(n_negatives, n_items)`` distinct items, each item
        in S with probability k/n; popularity: ``n_negatives`` draws from ``proposal`` with replacement,
        E[c_j] = n_negatives · Q_j."""
        k = int(self.n_negatives or 0)
        if proposal is None:
            k = min(k, n_items)
            negatives = torch.randperm(n_items, generator=generator)[:k]
            return negatives, torch.full((k,), math.log(k / n_items))
        negatives = torch.multinomial(proposal, k, replacement=True, generator=generator)
        return negatives, torch.log(k * proposal[negatives]).float()

    def _batch_loss(
        self,
        module: TextSASRec,
        windows: list[np.ndarray],
        features: torch.Tensor,
        generator: torch.Generator,
        text_cache: torch.Tensor | None = None,
        proposal: torch.Tensor | None = None,
        drawn: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean next-item cross-entropy over all non-padding positions of a batch of windows: the full softmax over
        the catalog, or with ``n_negatives`` :func:`sampled_softmax_loss` over negatives drawn by :meth:`_negatives`
        (``proposal``: :meth:`negative_proposal`; ``drawn``: (negatives, log E[c_j]) already drawn, e.g. shared by
        the micro-batches of one batch). The sampled loss runs the adapter only on the batch's own items and the
        negatives, not on the whole catalog.

        ``text_cache`` (with a text tower): the epoch's text embeddings of the whole catalog; the batch's own items
        are recomputed through the tower with gradient and replace their rows (the rest act as fixed candidates).
        """
        device = features.device
        inputs = pad_sequences([w[:-1] for w in windows], self.max_len).to(device)
        targets = pad_sequences([w[1:] for w in windows], self.max_len).to(device)
        if text_cache is None:
            text_of: Callable[[torch.Tensor | slice], torch.Tensor] = lambda rows: module.text_embeddings(features[rows])
        else:
            used = torch.unique(torch.cat([inputs[inputs != PAD], targets[targets != PAD]]))
            text = text_cache.index_copy(0, used, module.text_embeddings(features[used]))
            text_of = lambda rows: text[rows]
        if self.n_negatives is None:
            items = module.adapter(text_of(slice(None)))
            hidden = module.encode(inputs, items)
            inputs, targets = inputs[:, -hidden.shape[1] :], targets[:, -hidden.shape[1] :]
            valid = targets != PAD
            history = module.histories(inputs)[valid]
            logits = module.with_history_bias(module.logits(hidden[valid], items), history,
                                              module.last_item_text(features, history))
            return F.cross_entropy(logits, targets[valid])
        negatives, log_expected = drawn if drawn is not None else self._negatives(len(features), generator, proposal)
        negatives, log_expected = negatives.to(device), log_expected.to(device)
        rows = torch.unique(torch.cat([inputs[inputs != PAD], targets[targets != PAD], negatives]))
        items = module.adapter(text_of(rows))  # only these rows, in the order of `rows` (sorted)
        local_inputs = torch.where(inputs == PAD, PAD, torch.searchsorted(rows, inputs))
        hidden = module.encode(local_inputs, items)
        inputs, targets = inputs[:, -hidden.shape[1] :], targets[:, -hidden.shape[1] :]
        valid = targets != PAD
        hidden, targets, history = hidden[valid], targets[valid], module.histories(inputs)[valid]
        positive = module.paired_logits(hidden, items[torch.searchsorted(rows, targets)])
        negative = module.logits(hidden, items[torch.searchsorted(rows, negatives)])
        positive, negative = module.with_sampled_history_bias(positive, negative, targets, negatives, history,
                                                              module.last_item_text(features, history))
        return sampled_softmax_loss(positive, negative, log_expected, targets.unsqueeze(1) == negatives.unsqueeze(0))

    def micro_batches(self, windows: list[np.ndarray]) -> list[tuple[list[np.ndarray], float]]:
        """(chunk, share) pairs that one optimizer step accumulates: the whole batch with share 1 when
        ``micro_batch_size`` is None, else chunks of at most ``micro_batch_size`` windows, each with its share
        P_c / P of the batch's P target positions (window w has |w| − 1). :meth:`_batch_loss` is a mean over target
        positions, so Σ_c share_c · loss_c is the whole batch's loss and the accumulated gradient its gradient (up to
        float rounding and the dropout masks); peak activation memory scales with the chunk, not the batch."""
        size = self.micro_batch_size
        if size is None or len(windows) <= size:
            return [(windows, 1.0)]
        total = sum(len(w) - 1 for w in windows)
        chunks = [windows[i : i + size] for i in range(0, len(windows), size)]
        return [(chunk, sum(len(w) - 1 for w in chunk) / total) for chunk in chunks]

    def window_loss(
        self,
        module: TextSASRec,
        windows: torch.Tensor,
        features: torch.Tensor,
        negatives: torch.Tensor | None = None,
        log_expected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`_batch_loss` of one user's windows with shapes that do not depend on the data, so that
        ``torch.func.vmap`` can batch it over users (:mod:`fedmerge.privacy.dpsgd`).

        ``windows`` (W, C): the user's training windows right-aligned and PAD-filled (all-PAD rows allowed), inputs
        ``windows[:, :-1]``, targets ``windows[:, 1:]`` where the input is not PAD. Full softmax: the adapter on the
        whole catalog, cross-entropy averaged over the non-PAD targets. Sampled softmax (``negatives`` (k,) and
        their ``log_expected``, drawn by :meth:`_negatives`): the adapter on the user's W·C window slots (PAD slots
        read item 0 and are never used) and the k negatives, nothing else, then :func:`sampled_softmax_loss` over the
        non-PAD targets. Same values as :meth:`_batch_loss` on the same windows and negatives (no dropout: the
        masks are drawn in another layout); the routed adapter runs :meth:`RoutedAdapter.dense`.
        """
        adapter = module.adapter.dense if isinstance(module.adapter, RoutedAdapter) else module.adapter
        inputs = windows[:, :-1]
        targets = windows[:, 1:].masked_fill(inputs == PAD, PAD)
        if negatives is None:
            items = adapter(module.text_embeddings(features))
            logits = module.logits(module.encode(inputs, items, trim=False), items).flatten(0, 1)
            history = module.histories(inputs).flatten(0, 1)
            logits = module.with_history_bias(logits, history, module.last_item_text(features, history))
            return F.cross_entropy(logits, targets.flatten(), ignore_index=PAD)
        if log_expected is None:
            raise ValueError("sampled negatives need their log_expected")
        slots = torch.arange(windows.numel(), device=windows.device).view(windows.shape)
        items = adapter(module.text_embeddings(features[torch.cat([windows.flatten().clamp(min=0), negatives])]))
        hidden = module.encode(torch.where(inputs == PAD, PAD, slots[:, :-1]), items, trim=False).flatten(0, 1)
        targets = targets.flatten()
        positive = module.paired_logits(hidden, items[slots[:, 1:].flatten()])
        negative = module.logits(hidden, items[windows.numel() :])
        history = module.histories(inputs).flatten(0, 1)
        positive, negative = module.with_sampled_history_bias(positive, negative, targets, negatives, history,
                                                              module.last_item_text(features, history))
        hits = targets.unsqueeze(1) == negatives.unsqueeze(0)
        return sampled_softmax_loss(positive, negative, log_expected, hits, valid=targets != PAD)

    def training_module(
        self, theta0: StateDict, domain: Domain, item_features: torch.Tensor, seed: int
    ) -> tuple[TextSASRec, torch.Tensor, list[int]]:
        """(module holding ``theta0`` on the training device, the float32 features there, frozen routed experts):
        the set-up shared by :meth:`train` and the user-level DP-SGD of :mod:`fedmerge.privacy.dpsgd`.

        Seeds torch's global generator with ``seed`` (dropout). With the routed adapter, the experts that get fewer
        than ``routed_min_share`` of the domain's items are frozen (``requires_grad=False``): Adam moves any weight
        with a non-zero gradient by about lr per step, however few items reach it. The :meth:`fixed_parameters`
        (the weights outside ``trainable``) are frozen too.
        """
        if item_features.ndim != (3 if self.encoder_layers else 2) or item_features.shape[0] != domain.n_items:
            raise ValueError(
                f"item_features has shape {tuple(item_features.shape)}, expected ({domain.n_items}, "
                f"{'2 + T, ' if self.encoder_layers else ''}dim) "
                f"for domain {domain.name!r}"
            )
        if not bool(torch.isfinite(item_features).all()):  # it failed after a whole epoch as "scores contain NaN"
            raise FedmergeError(f"the item features of domain {domain.name!r} hold NaN or infinite values "
                                f"({int((~torch.isfinite(item_features)).sum())} of {item_features.numel()})")
        device = self._training_device()
        torch.manual_seed(seed)
        module = self.build(item_features.shape[-1])
        try:
            module.load_state_dict(theta0)
        except RuntimeError as err:
            raise FedmergeError(f"initial weights do not fit the sequential family's architecture: {err}") from err
        module.to(device)
        features = item_features.to(device=device, dtype=torch.float32)
        frozen_experts = []
        if self.adapter == "routed":
            frozen_experts = module.adapter.minor_experts(features, self.routed_min_share)
            for k in frozen_experts:
                module.adapter.experts[k].requires_grad_(False)
        fixed = self.fixed_parameters(theta0)  # outside `trainable`, and the routed adapter's θ₀ expert: never trained
        for name, parameter in module.named_parameters():
            if name in fixed:
                parameter.requires_grad_(False)
        return module, features, frozen_experts

    def train(
        self,
        theta0: StateDict,
        domain: Domain,
        item_features: torch.Tensor,
        *,
        seed: int = 0,
        progress: bool = True,
        public_features: Sequence[torch.Tensor] = (),
        distill_teacher: StateDict | None = None,
    ) -> tuple[StateDict, dict[str, Any]]:
        """AdamW on all-position next-item loss from ``theta0``; early stopping on val NDCG@10; best weights.

        ``public_features``: item features of the other training domains' public catalogs, read only with
        ``theta0_distill > 0`` (:mod:`fedmerge.models.theta0_distill`), which refuses to run without them.
        ``distill_teacher``: the run's θ₀, which that term distills towards, when training starts elsewhere (a FedAvg
        round starts from the round's global model; it distilled towards that model); default ``theta0``."""
        windows = training_windows(domain.train, self.max_len)
        if not windows:
            raise FedmergeError(f"domain {domain.name!r} has no training sequence with two or more items")
        if self.theta0_distill and not public_features:
            raise FedmergeError(f"model.params.theta0_distill = {self.theta0_distill} distills towards θ₀ on the other "
                                "training domains' public catalogs, but none were given (it needs a federation of "
                                "two or more training domains; set theta0_distill = 0 to train without it)")
        # each public catalog is distilled on its own (Theta0Distillation), so only the layout and the width must
        # match: with encoder_layers the token axis is each catalog's own longest text
        bad = [tuple(f.shape) for f in public_features
               if f.ndim != item_features.ndim or f.shape[-1] != item_features.shape[-1]]
        if bad:
            layout = "(n_items, 2 + tokens, width)" if item_features.ndim == 3 else "(n_items, width)"
            raise FedmergeError(f"public catalog features of shapes {bad} do not match the domain's item features "
                                f"{tuple(item_features.shape)}: each must be {layout} with width "
                                f"{item_features.shape[-1]}")
        if not bool((np.asarray(domain.val_target) >= 0).any()):  # it failed after a whole epoch at validation
            raise FedmergeError(f"domain {domain.name!r} has no validation user (every val_target is -1): early "
                                "stopping has nothing to select on")
        module, features, frozen_experts = self.training_module(theta0, domain, item_features, seed)
        distill = None
        if self.theta0_distill:
            from fedmerge.models.theta0_distill import Theta0Distillation

            with torch.random.fork_rng(devices=[]):  # building a module draws its (then replaced) initial weights
                teacher = self.load(theta0 if distill_teacher is None else distill_teacher,
                                    features.shape[-1]).to(features.device)
            distill = Theta0Distillation(teacher, [f.to(features.device, torch.float32) for f in public_features],
                                         self.theta0_distill_temperature, self.theta0_distill_users,
                                         self.theta0_distill_candidates, seed)
        rng = np.random.default_rng(seed)
        sampler = torch.Generator().manual_seed(seed)
        proposal = self.negative_proposal(domain)
        anchor = {n: p.detach().clone() for n, p in module.named_parameters()} if self.proximal_mu else {}  # θ₀
        optimizer = self.optimizer(module)

        start, cpu_start = time.perf_counter(), time.process_time()
        best_ndcg, best_epoch, best_weights = -math.inf, 0, copy.deepcopy(theta0)
        curve: list[dict[str, float]] = []
        bad_epochs, out_of_time, loss_value = 0, False, float("nan")
        lengths = np.array([len(w) for w in windows])
        bar = tqdm(total=self.max_epochs, desc=f"sequential {domain.name}", disable=not progress, unit="epoch")
        text_cache = None  # with a text tower: the candidates' text embeddings, refreshed once per epoch
        if module.text_tower is not None:
            with torch.no_grad():
                text_cache = module.eval().text_embeddings(features)
        stop_reason = STOP_MAX_EPOCHS
        for epoch in range(1, self.max_epochs + 1):
            module.train()
            loss_sum, distill_sum, steps_start = 0.0, 0.0, time.perf_counter()
            with gradient_threads():  # thread-count independent steps; validation below at the client's threads
                batches = length_buckets(lengths, self.batch_size, rng)
                for b, batch_indices in enumerate(batches):
                    batch = [windows[i] for i in batch_indices]
                    drawn = self._negatives(len(features), sampler, proposal) if self.n_negatives else None
                    optimizer.zero_grad()
                    for part, (chunk, share) in enumerate(self.micro_batches(batch)):
                        loss = self._batch_loss(module, chunk, features, sampler, text_cache, proposal, drawn)
                        loss = loss if share == 1.0 else share * loss
                        if part == 0 and distill is not None:
                            term = distill.loss(module)
                            distill_sum += term.item()
                            loss = loss + self.theta0_distill * term
                        if part == 0 and self.proximal_mu:
                            loss = loss + self.proximal_mu / 2 * sum(
                                (p - anchor[n]).pow(2).sum() for n, p in module.named_parameters())
                        loss.backward()
                        loss_sum += loss.item()
                    optimizer.step()
                    if self.max_seconds is not None and time.perf_counter() - start > self.max_seconds:
                        out_of_time = True
                        break
            loss_value, step_seconds = loss_sum / (b + 1), time.perf_counter() - steps_start
            release_freed_memory()  # the steps' heap, before validation allocates in other sizes (and after it)
            weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            val_module, text = self._loaded(weights, features)
            val = evaluate_scorer(self._module_scorer(val_module, text), domain, "val", max_len=self.max_len)
            del val_module
            release_freed_memory()
            if text_cache is not None:
                text_cache = text  # the next epoch starts from these very weights
            ndcg = val["ndcg@10"]
            curve.append({"epoch": epoch, "loss": loss_value, "val_ndcg@10": ndcg, "val_recall@10": val["recall@10"],
                          "seconds": time.perf_counter() - start, "step_seconds": step_seconds,
                          "cpu_seconds": time.process_time() - cpu_start,
                          **({"theta0_kl": distill_sum / (b + 1)} if distill is not None else {})})
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", val_ndcg10=f"{ndcg:.4f}")
            logger.info("epoch %d loss %.4f val ndcg@10 %.4f recall@10 %.4f", epoch, loss_value, ndcg, val["recall@10"])
            if ndcg > best_ndcg:
                best_ndcg, best_epoch, best_weights, bad_epochs = ndcg, epoch, weights, 0
            else:
                bad_epochs += 1
            stopped_early = bad_epochs >= self.patience
            # the cap cut the training only if it would have gone on: not when it fired on the last step anyway
            cut = out_of_time and (b + 1 < len(batches) or (epoch < self.max_epochs and not stopped_early))
            if cut or stopped_early:
                stop_reason = STOP_MAX_SECONDS if cut else STOP_EARLY
                break
        bar.close()
        metrics = {
            "epochs": len(curve),
            "best_epoch": best_epoch,
            "best_val_ndcg@10": best_ndcg,
            "train_seconds": time.perf_counter() - start,
            "train_cpu_seconds": time.process_time() - cpu_start,
            "final_loss": loss_value,
            "stop_reason": stop_reason,
            # the cap may cut an epoch part-way: the last epoch's steps done, and a full epoch's
            **({"last_epoch_steps": b + 1, "epoch_steps": len(batches)} if stop_reason == STOP_MAX_SECONDS else {}),
            "max_epochs": self.max_epochs,
            "frozen_experts": len(frozen_experts),
            "curve": curve,
        }
        return best_weights, metrics
