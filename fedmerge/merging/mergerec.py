"""MergeRec (Kim et al., KDD'26, arXiv 2601.01753): merge coefficients learned on pseudo-users by distillation.

1. **Initialization** - any training-free method of :mod:`fedmerge.merging.methods` gives processed task vectors
   τ̃_k; the merged model is θ(λ) = θ₀ + Σ_k λ_k ⊙ τ̃_k.
2. **Pseudo-users** - for every domain d and each catalog item i of d, the one-item sequence [i]. No real
   interaction is used. Domain d's teacher is its fine-tuned model θ_d: its scores t ∈ R^{n_d} of pseudo-user
   [i] over d's items, computed once. ``pseudo_user_length`` L > 1 (not in the paper) adds longer pseudo-users,
   still without any real interaction: d's teacher rolls out greedily from every item i, [i, t_1, …, t_{L-1}]
   with t_k its top item not yet in the sequence, and every prefix of length 1..L is a pseudo-user. One-item
   sequences carry no signal about positions or attention across items; rollout prefixes do.
3. **Collaborative merge optimization** - learnable λ, one scalar per domain (``task``), one per domain and
   parameter group (``layer``, groups from ``family.parameter_groups``, or with ``layer_groups="transformer"``
   one per Transformer layer plus one "others" group as MergeRec's official layer-wise module) or one per domain
   and parameter tensor (``tensor``). For a pseudo-user of domain d with
   merged scores s over d's items (both s and t optionally divided by σ_d, the std of d's teacher scores):

       loss = CE(s, argmax t) + c · T² · KL(softmax(t/T) ‖ softmax(s/T))

   averaged over a batch of pseudo-users drawn uniformly from the union of all domains' pseudo-users
   (``sampling="union"``, batches mix domains) or from one uniformly drawn domain per step (``"domain"``).
   ``exclude_input_item=True`` (not in the paper) removes a pseudo-user's own items from its teacher and student
   distributions: a text-similarity model ranks the input item itself first, which makes the pseudo-label trivial.
   The merged forward is ``torch.func.functional_call(module, θ(λ), (seqs, item_features))``, so gradients reach
   only λ. ``multi_start=True`` (not in the paper) also runs the optimization from one start per domain k,
   λ = 1 on its processed task vector τ̃_k and 0 on the others (min(1, ``max_coefficient``) under a cap), i.e.
   θ₀ + τ̃_k: domain k's own model only when the start is task arithmetic (τ̃_k = τ_k; an unweighted ``average``
   start gives θ₀ + τ_k/K, a TIES start θ₀ + τ_k's trimmed, sign-elected share of the disjoint mean), and keeps
   the run whose λ has the lowest objective over every pseudo-user (or over ``selection_users`` of them, drawn
   with the seed - the exact objective dominates the cost):
   from the symmetric start λ = 0.2 the optimizer can settle where the objective is higher than in regions it
   does not reach. The selection reads pseudo-users only, so it stays data-isolated. With ``item_side="full"`` the
   full module, item side included, runs on every step. The default
   ``item_side="frozen"`` (as MergeRec's released code does with its cached item embeddings) computes the
   catalog's candidate item representations once from the initial merged model, and again every
   ``item_refresh`` steps, without gradient; only the pseudo-users' own input items (B·L per step) go through the
   merged item side live, so item-side coefficients still learn from the query side. It needs a module that
   splits its forward into ``item_representations(item_features)``, ``encode(seqs, items)`` and ``logits(hidden, items)`` (the
   sequential family's TextSASRec does). With a Transformer over 12k-item catalogs this is the difference between
   seconds and hours per 500 steps on a 2-core CPU. The frozen item representations of all domains are stacked
   into one union catalog, so each step runs the sequence side once for the whole mixed-domain batch.

Named settings of every constant (:class:`MergeRecConfig` lives in the torch-free
:mod:`fedmerge.merging.mergerec_config`): :data:`~fedmerge.merging.mergerec_config.MERGEREC_PRESETS` through
:meth:`MergeRecConfig.from_keys` (``"paper"``: the official scripts; ``"fedmerge"``: this project's setting); explicit
keys override a preset.

Pseudo-user batches are (B, L), not (B, max_len): a sequence of at most L items right-aligned in ``max_len``
columns is all padding before its last L columns, and the families read padded sequences right-aligned and ignore
padding (a set for text-LAE, leading all-padding columns dropped by the causal Transformer), so L columns give the
same scores at a fraction of the cost.

Teacher memory: the paper's dense teachers take Σ_d n_d² floats (≈ 1.2 GB for Beauty + Toys). With
``teacher_top_k = k`` > 0 (not in the paper) each teacher row keeps its top-k items, its log-normalizer and the mass
of the rest (:mod:`fedmerge.merging.teachers`: O(Σ_d n_d·k) memory; the KL's exact terms over the kept items plus
the remainder mass lumped into one outcome; k ≥ n_d gives the dense objective). Teacher scores are computed
``teacher_batch`` start items at a time, so no n_d × n_d matrix is ever built in that mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from fedmerge.checks import is_finite_number
from fedmerge.errors import NumericalError
from fedmerge.merging.methods import processed_task_vectors, working_precision
from fedmerge.merging.registry import with_default_seed
from fedmerge.merging.mergerec_config import MergeRecConfig
from fedmerge.merging.teachers import TopKRows, top_k_distillation_loss, top_k_rows
from fedmerge.metrics import Scorer
from fedmerge.models.base import PAD, ModelFamily, StateDict, stack_item_features, tempered_kl
from fedmerge.reproducibility import gradient_threads

logger = logging.getLogger(__name__)

# MergeRec's initial per-domain coefficient for its two initializations; other methods start at their own λ.
MERGEREC_INITIAL_COEFFICIENT: dict[str, float] = {"task_arithmetic": 0.2, "ties": 1.0, "ties_global": 1.0}


@dataclass
class MergeRecReport:
    """Learned coefficients per domain and group, the loss curve, and timings."""

    domains: list[str]
    groups: list[str]
    coefficients: dict[str, dict[str, float]]
    initial_coefficient: float
    loss_curve: list[float]
    optimization_seconds: float
    teacher_seconds: float
    teacher_score_scale: list[float]
    config: dict[str, Any]
    # with multi_start: each start's name and its final objective (over every pseudo-user, or the seeded
    # selection_users sample); the kept start
    start_objectives: dict[str, float] = field(default_factory=dict)
    chosen_start: str = "init"
    teacher_bytes: int = 0  # memory of the one-item teacher tables (dense or top-k)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, distill_weight: float
) -> torch.Tensor:
    """Mean over rows of CE(s, argmax t) + c·T²·KL(softmax(t/T) ‖ softmax(s/T)) (rows are pseudo-users)."""
    ce = F.cross_entropy(student, teacher.argmax(dim=1))
    return ce + distill_weight * tempered_kl(student, teacher, temperature)


EXCLUDED_SCORE = -1e4


def mask_items(scores: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Scores with each row's own items (the non-padding entries of right-aligned ``seqs`` (B, L)) set to a large
    finite negative value: zero softmax mass, finite KL."""
    filled = torch.where(seqs == PAD, seqs[:, -1:], seqs)  # the last column of a right-aligned row is an item
    return scores.scatter(1, filled, EXCLUDED_SCORE)


def teacher_rollouts(
    one_item_scores: torch.Tensor, scorer: Scorer, length: int, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """(b, length) greedy rollouts of a domain's teacher from start items ``starts`` (default every item):
    row r = [i, t_1, …, t_{L-1}] for i = starts[r], with t_k the teacher's top item not yet in the row after the
    prefix [i, t_1, …, t_{k-1}].

    ``one_item_scores`` (b, n) are the teacher's scores of the one-item prefixes (row r: pseudo-user [starts[r]]);
    each further position costs one pass of ``scorer`` over the b prefixes.
    """
    n = one_item_scores.shape[1]
    if length > n:
        raise ValueError(f"pseudo_user_length {length} exceeds the catalog's {n} items")
    rows = (torch.arange(n) if starts is None else starts).view(-1, 1)
    scores = one_item_scores
    while rows.shape[1] < length:
        rows = torch.cat([rows, mask_items(scores, rows).argmax(dim=1, keepdim=True)], dim=1)
        if rows.shape[1] < length:
            scores = torch.from_numpy(scorer(list(rows.numpy()))).float()
    return rows


@dataclass
class PseudoUsers:
    """Every domain's pseudo-users and their teachers' scores of them.

    ``rollouts[d]`` is (n_d, L): row i is domain d's teacher rollout [i, t_1, …, t_{L-1}], and pseudo-user
    (d, i, k) is its prefix of length k = 1..L; L = 1 gives MergeRec's one-item pseudo-users [i]. Teacher scores of
    one-item prefixes are rows of the table computed once (``one_item[d]``); longer prefixes are scored by d's
    teacher when drawn (an n_d × L × n_d table does not fit in memory for 12k-item catalogs). Scores are divided by
    ``scales[d]`` (σ_d, or 1).

    With ``top_k`` > 0 the one-item tables are sparse :class:`~fedmerge.merging.teachers.TopKRows` (at
    ``temperature``, their own item already masked when ``exclude_input_item``), and :meth:`teacher` returns sparse
    rows: longer prefixes are scored densely, masked and cut to their top k when drawn.
    """

    rollouts: list[torch.Tensor]
    one_item: list[torch.Tensor | TopKRows]
    scorers: list[Scorer]
    scales: list[float]
    top_k: int = 0
    temperature: float = 1.0
    exclude_input_item: bool = False

    @property
    def length(self) -> int:
        return int(self.rollouts[0].shape[1])

    def draw(self, generator: torch.Generator, batch_size: int, sampling: str) -> tuple[torch.Tensor, ...]:
        """(domain, start item, prefix length) of ``batch_size`` pseudo-users drawn uniformly from the union of all
        domains' pseudo-users (``union``) or from one uniformly drawn domain (``domain``)."""
        counts = torch.tensor([len(r) * self.length for r in self.rollouts])
        if sampling == "union":
            offsets = torch.cumsum(counts, 0) - counts
            flat = torch.randint(int(counts.sum()), (batch_size,), generator=generator)
            domain_of = torch.searchsorted(offsets, flat, right=True) - 1
            index = flat - offsets[domain_of]
        else:
            d = int(torch.randint(len(counts), (1,), generator=generator))
            index = torch.randint(int(counts[d]), (batch_size,), generator=generator)
            domain_of = torch.full((batch_size,), d)
        return domain_of, index // self.length, index % self.length + 1

    def sequences(self, domain_of: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) right-aligned, PAD-padded prefixes (domain-local item indices) of the drawn pseudo-users."""
        full = torch.stack([self.rollouts[d][i] for d, i in zip(domain_of.tolist(), items.tolist())])
        source = torch.arange(self.length) - (self.length - lengths).unsqueeze(1)  # column j holds rollout[j-(L-k)]
        return torch.where(source >= 0, full.gather(1, source.clamp(min=0)), PAD)

    def teacher(self, d: int, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | TopKRows:
        """Teacher scores of domain d's pseudo-users (start items, prefix lengths): dense (b, n_d), or sparse rows
        (input items masked when ``exclude_input_item``) when ``top_k`` > 0."""
        scores = self.one_item[d][items]
        longer = (lengths > 1).nonzero().flatten()
        if len(longer):
            prefixes = [self.rollouts[d][items[r], : lengths[r]].numpy() for r in longer.tolist()]
            dense = torch.from_numpy(self.scorers[d](prefixes)).float() / self.scales[d]
            if isinstance(scores, TopKRows):
                if self.exclude_input_item:
                    dense = mask_items(dense, self.sequences(torch.full_like(longer, d), items[longer],
                                                             lengths[longer]))
                scores[longer] = top_k_rows(dense, self.top_k, self.temperature)
            else:
                scores[longer] = dense
        return scores


def teacher_tables(
    scorer: Scorer, n_items: int, config: MergeRecConfig, cosine_scale: float = 1.0
) -> tuple[torch.Tensor | TopKRows, torch.Tensor, float]:
    """(one-item teacher table, rollouts (n, L), σ) of one domain's teacher, scored ``teacher_batch`` start items at
    a time: the dense (n, n) table divided by σ (``teacher_top_k`` = 0), or sparse rows holding O(n·k) numbers. σ is
    1, the teacher scores' std (``logit_norm = "teacher_std"``) or ``cosine_scale`` = 1/τ of a family that scores
    cos/τ (``"cosine"``: the scores become raw cosines)."""
    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, n_items, config.teacher_batch):
            starts = torch.arange(first, min(first + config.teacher_batch, n_items))
            yield starts, torch.from_numpy(scorer([np.array([i]) for i in starts.tolist()])).float()

    sparse = config.teacher_top_k > 0
    sigma = cosine_scale if config.logit_norm == "cosine" else 1.0
    if sparse and config.logit_norm == "teacher_std":  # a first pass for σ: sparse rows need it before the cut
        total = square = 0.0
        for _, scores in chunks():
            total, square = total + float(scores.double().sum()), square + float(scores.double().square().sum())
        count = n_items * n_items
        sigma = max((square - total * total / count) / max(count - 1, 1), 0.0) ** 0.5
    table = None if sparse else torch.empty(n_items, n_items)
    rollouts, parts = [], []
    for starts, scores in chunks():
        rollouts.append(teacher_rollouts(scores, scorer, config.pseudo_user_length, starts))
        if table is not None:
            table[starts] = scores
            continue
        scores = scores / sigma
        if config.exclude_input_item:
            scores = mask_items(scores, starts.view(-1, 1))
        parts.append(top_k_rows(scores, config.teacher_top_k, config.temperature))
    if table is not None and config.logit_norm == "teacher_std":
        sigma = float(table.std())
    if not sigma > 0:
        raise ValueError("teacher scores are constant; cannot normalize by their std")
    if table is not None and sigma != 1.0:
        table /= sigma
    return (TopKRows.cat(parts) if sparse else table), torch.cat(rollouts), sigma


def group_index(
    family: ModelFamily, names: list[str], granularity: str, layer_groups: str = "family"
) -> tuple[list[str], dict[str, int]]:
    """(group names, parameter -> group column): one group ``all`` (``task``), ``family.parameter_groups``
    (``layer``; ``family.transformer_layer_groups`` with ``layer_groups="transformer"``), or one group per
    parameter tensor (``tensor``, AdaMerging's layer-wise)."""
    if granularity == "task":
        return ["all"], {n: 0 for n in names}
    if granularity == "tensor":
        return list(names), {n: k for k, n in enumerate(names)}
    if layer_groups not in ("family", "transformer"):
        raise ValueError(f"unknown layer_groups {layer_groups!r}; valid: ['family', 'transformer']")
    groups = family.parameter_groups(names) if layer_groups == "family" else family.transformer_layer_groups(names)
    column: dict[str, int] = {}
    for g, (_, members) in enumerate(groups.items()):
        for name in members:
            if name in column:
                raise ValueError(f"parameter {name!r} is in more than one group of {family.name!r}")
            column[name] = g
    missing = sorted(set(names) - set(column))
    if missing:
        raise ValueError(f"parameter_groups of {family.name!r} leaves out {missing[:5]}")
    return list(groups), column


def merged_parameters(
    theta0: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
    coefficients: torch.Tensor,
    column: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """θ(λ)[p] = θ₀[p] + Σ_k λ[k, group(p)] · τ̃_k[p] (differentiable in λ), in the task vectors' precision
    (:func:`~fedmerge.merging.methods.working_precision`: float64 for float64 weights, else float32): λ is cast to
    it, and ``theta0`` is expected in it."""
    return {p: theta0[p] + torch.tensordot(coefficients[:, column[p]].to(vectors[p].dtype), vectors[p], dims=1)
            for p in theta0}


def merged_weights(
    theta0: Mapping[str, torch.Tensor],
    vectors: Mapping[str, torch.Tensor],
    coefficients: torch.Tensor,
    column: Mapping[str, int],
) -> StateDict:
    """θ(λ) of :func:`merged_parameters` without gradient, computed in the working precision (float64 weights in
    float64) and returned in θ₀'s dtypes: the weights a set of coefficients ships."""
    base = {p: working_precision(t) for p, t in theta0.items()}
    with torch.no_grad():
        return {p: t.to(theta0[p].dtype) for p, t in merged_parameters(base, vectors, coefficients, column).items()}


SPLIT_METHODS = ("item_representations", "encode", "logits")


def check_item_side(module: nn.Module, family_name: str, item_side: str) -> None:
    """ValueError unless ``module`` can run MergeRec's ``item_side``: "frozen" needs :data:`SPLIT_METHODS` (checked
    when a run starts, so a family without them fails before any client trains)."""
    if item_side == "frozen":
        lacking = [m for m in SPLIT_METHODS if not callable(getattr(module, m, None))]
        if lacking:
            raise ValueError(f"item_side='frozen' needs module methods {list(SPLIT_METHODS)}; "
                             f"{type(module).__name__} of {family_name!r} lacks {lacking} (set "
                             "merge.mergerec.item_side = \"full\" for this family)")


def prefixed(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names as seen from the :class:`ItemSide` / :class:`SequenceSide` wrappers."""
    return {f"inner.{p}": t for p, t in params.items()}


class ItemSide(nn.Module):
    """``inner.item_representations(item_features)`` as a forward, for ``functional_call``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, item_features: torch.Tensor) -> torch.Tensor:
        return self.inner.item_representations(item_features)


class SequenceSide(nn.Module):
    """Scores of pseudo-users of several domains against precomputed candidate representations.

    ``union`` stacks the domains' frozen item representations (domain d's rows at ``bounds[d]``); row r is
    scored against its own domain's catalog only. The pseudo-users' own items go through the merged item side live
    (``input_features``, a handful of rows that ``seqs`` (B, L) indexes, PAD-padded), so coefficients of item-side
    parameters (the adapter) still get a gradient. ``histories`` (B, H) are each row's items in its own catalog,
    most recent first (PAD for none): a module with ``with_history_bias`` (the sequential family's learned offsets of
    the last and the earlier items) adds them as its forward does. Returns one score matrix per entry of ``parts``
    (a domain index and its batch rows).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self,
        input_features: torch.Tensor,
        seqs: torch.Tensor,
        union: torch.Tensor,
        bounds: list[tuple[int, int]],
        parts: list[tuple[int, torch.Tensor]],
        histories: torch.Tensor,
    ) -> list[torch.Tensor]:
        inputs = self.inner.item_representations(input_features)
        hidden = self.inner.encode(seqs, inputs)[:, -1]
        scores = [self.inner.logits(hidden[rows], union[bounds[d][0] : bounds[d][1]]) for d, rows in parts]
        with_bias = getattr(self.inner, "with_history_bias", None)
        if with_bias is None:
            return scores
        # the sequential family's text-conditioned offset reads each row's last item's features (a row of
        # input_features: seqs, right-aligned, indexes them)
        last_item_text = getattr(self.inner, "last_item_text", None)
        last_text = None if last_item_text is None else last_item_text(input_features, seqs.flip(1))
        return [with_bias(s, histories[rows], None if last_text is None else last_text[rows])
                for s, (_, rows) in zip(scores, parts)]


class PseudoUserObjective:
    """MergeRec's loss as a function of the coefficients λ (domains × groups), on pseudo-users of every domain.

    Holds what the optimization needs and does not change with λ: processed task vectors τ̃_k, parameter groups,
    teacher scores and rollouts (:class:`PseudoUsers`), and the frozen candidate item representations, which
    :meth:`refresh_items` recomputes from θ(λ). ``teachers[d]`` scores domain d's pseudo-users; by default d's own
    model ``models[d]``. ``pseudo_domains`` are the catalogs whose pseudo-users form the objective (default: the
    models' domains); one that has no model (a catalog seen only at test time) needs an entry in ``teachers``.
    """

    def __init__(
        self,
        family: ModelFamily,
        theta0: StateDict,
        models: Mapping[str, StateDict],
        item_features: Mapping[str, torch.Tensor],
        config: MergeRecConfig,
        teachers: Mapping[str, StateDict] | None = None,
        pseudo_domains: Sequence[str] | None = None,
    ) -> None:
        teachers = models if teachers is None else teachers
        self.domains = list(models)  # rows of λ
        self.pseudo_domains = self.domains if pseudo_domains is None else list(pseudo_domains)
        for what, table in (("item features", item_features), ("teacher", teachers)):
            missing = [d for d in self.pseudo_domains if d not in table]
            if missing:
                raise ValueError(f"no {what} for domain(s) {missing}; have {sorted(table)}")
        self.config = config
        init_params = with_default_seed(config.init_method, config.init_params, config.seed)  # DARE's masks
        self.processed = processed_task_vectors(config.init_method, theta0, models, **init_params)
        if not self.pseudo_domains:
            raise ValueError("no pseudo-user domains: MergeRec needs at least one catalog to build pseudo-users from")
        dims = {int(item_features[d].shape[-1]) for d in self.pseudo_domains}
        if len(dims) != 1:
            raise ValueError(f"item features of the domains have different widths {sorted(dims)}")
        self.module = family.build(dims.pop())
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.train(False)
        check_item_side(self.module, family.name, config.item_side)
        if config.pseudo_user_length > family.max_len:
            raise ValueError(f"pseudo_user_length {config.pseudo_user_length} exceeds {family.name!r}'s "
                             f"max_len {family.max_len}")
        # θ₀ in the task vectors' working precision (float64 weights: float64, as the training-free merges), while
        # the student runs in its module's dtype (float32): θ(λ) is cast to it for the forward pass
        self.base = {p: working_precision(t) for p, t in theta0.items()}
        self.student_dtype = {p: t.dtype for p, t in self.module.state_dict().items()}
        self.groups, self.column = group_index(family, list(self.base), config.granularity, config.layer_groups)
        self.item_features = [item_features[d] for d in self.pseudo_domains]

        start = time.perf_counter()
        one_item, scales, scorers, rollouts = [], [], [], []
        cosine_scale = 1.0
        if config.logit_norm == "cosine":
            tau = getattr(family, "temperature", None)
            if not (is_finite_number(tau) and tau > 0):
                raise ValueError(f"logit_norm='cosine' needs a family that scores cos/τ (e.g. 'sequential'); "
                                 f"{family.name!r} has no temperature τ")
            cosine_scale = 1.0 / float(tau)
        for d, features in zip(tqdm(self.pseudo_domains, desc="teacher scores", disable=not config.progress),
                               self.item_features):
            scorer = family.scorer(teachers[d], features, batch_size=config.teacher_batch)
            try:
                table, rows, sigma = teacher_tables(scorer, int(features.shape[0]), config, cosine_scale)
            except ValueError as exc:
                raise ValueError(f"domain {d!r}: {exc}") from None
            rollouts.append(rows)
            one_item.append(table)
            scales.append(sigma)
            scorers.append(scorer)
        self.pseudo = PseudoUsers(rollouts, one_item, scorers, scales, config.teacher_top_k, config.temperature,
                                  config.exclude_input_item)
        self.teacher_seconds = time.perf_counter() - start

        sizes = torch.tensor([len(r) for r in rollouts])
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.bounds = [(int(o), int(o + n)) for o, n in zip(self.offsets, sizes)]
        self.item_side, self.sequence_side = ItemSide(self.module), SequenceSide(self.module)
        frozen = config.item_side == "frozen"
        self.union_features = stack_item_features(self.item_features) if frozen else None
        self.frozen_union: torch.Tensor | None = None  # item representations of all domains, stacked

    def parameters(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(λ), differentiable in λ, in the student module's dtypes (computed in the working precision)."""
        params = merged_parameters(self.base, self.processed.vectors, coefficients, self.column)
        return {p: t.to(self.student_dtype.get(p, t.dtype)) for p, t in params.items()}

    def refresh_items(self, coefficients: torch.Tensor) -> None:
        """Frozen candidate item representations of θ(λ), without gradient (``item_side="frozen"`` only)."""
        if self.union_features is not None:
            with torch.no_grad():  # the item side is row-wise: one pass over the stacked catalogs
                params = prefixed(self.parameters(coefficients))
                self.frozen_union = functional_call(self.item_side, params, (self.union_features,))

    def loss(
        self, coefficients: torch.Tensor, domain_of: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Mean loss over the pseudo-users (domain, start item, prefix length); frozen candidates must be fresh."""
        config = self.config
        seqs = self.pseudo.sequences(domain_of, items, lengths)
        params = self.parameters(coefficients)
        parts = [(d, (domain_of == d).nonzero().flatten()) for d in domain_of.unique().tolist()]
        if self.union_features is not None:
            is_pad = seqs == PAD
            union_rows = torch.where(is_pad, 0, seqs + self.offsets[domain_of].unsqueeze(1)).flatten()
            positions = torch.where(is_pad, PAD, torch.arange(seqs.numel()).view(seqs.shape))
            students = functional_call(self.sequence_side, prefixed(params), (
                self.union_features[union_rows], positions, self.frozen_union, self.bounds, parts, seqs.flip(1)))
        else:
            students = [functional_call(self.module, params, (seqs[rows], self.item_features[d])) for d, rows in parts]
        loss = torch.zeros(())
        for (d, rows), student in zip(parts, students):
            student = student / self.pseudo.scales[d]
            teacher = self.pseudo.teacher(d, items[rows], lengths[rows])
            if config.exclude_input_item:
                student = mask_items(student, seqs[rows])
            if isinstance(teacher, TopKRows):  # already masked
                part = top_k_distillation_loss(student, teacher, config.temperature, config.distill_weight)
            else:
                teacher = mask_items(teacher, seqs[rows]) if config.exclude_input_item else teacher
                part = distillation_loss(student, teacher, config.temperature, config.distill_weight)
            loss = loss + len(rows) / len(items) * part
        return loss

    @property
    def teacher_bytes(self) -> int:
        """Memory held by the one-item teacher tables (dense: Σ_d 4·n_d²; top-k: Σ_d n_d·(8k + 8))."""
        return sum(t.nbytes if isinstance(t, TopKRows) else t.numel() * t.element_size() for t in self.pseudo.one_item)

    def users(self, count: int = 0, seed: int = 0) -> torch.Tensor:
        """(N, 3) rows (domain, start item, prefix length): every pseudo-user, or ``count`` of them drawn without
        replacement with ``seed`` (``count`` 0 or ≥ their number: all)."""
        everyone = torch.tensor([(d, i, k) for d, r in enumerate(self.pseudo.rollouts)
                                 for i in range(len(r)) for k in range(1, self.pseudo.length + 1)])
        if not 0 < count < len(everyone):
            return everyone
        return everyone[torch.randperm(len(everyone), generator=torch.Generator().manual_seed(seed))[:count]]

    @torch.no_grad()
    def mean_loss(self, coefficients: torch.Tensor, users: torch.Tensor | None = None, batch_size: int = 256) -> float:
        """Loss of θ(λ) averaged over ``users`` (rows of :meth:`users`; default every pseudo-user of every domain),
        candidates recomputed from θ(λ): the objective the optimization samples, evaluated exactly - e.g. to
        compare λ found another way."""
        self.refresh_items(coefficients)
        users = self.users() if users is None else users
        total = 0.0
        with gradient_threads():  # a batch × catalog reduction: its last bits move with the thread count
            for chunk in users.split(batch_size):
                total += len(chunk) * float(self.loss(coefficients, chunk[:, 0], chunk[:, 1], chunk[:, 2]))
        return total / len(users)


def optimize_coefficients(
    objective: PseudoUserObjective, start: torch.Tensor, config: MergeRecConfig
) -> tuple[torch.Tensor, list[float]]:
    """(learned λ, loss curve): ``config.steps`` Adam steps on batches of pseudo-users drawn with ``config.seed``,
    from λ = ``start``; frozen candidates are refreshed at step 0 and every ``item_refresh`` steps."""
    coefficients = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([coefficients], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    for step in tqdm(range(config.steps), desc="MergeRec", disable=not config.progress):
        if step == 0 or (config.item_refresh and step % config.item_refresh == 0):
            objective.refresh_items(coefficients)
        with gradient_threads():  # thread-count independent step (see fedmerge.reproducibility)
            loss = objective.loss(coefficients, *objective.pseudo.draw(generator, config.batch_size, config.sampling))
            if not torch.isfinite(loss):
                raise NumericalError(f"MergeRec's loss is {float(loss.detach())} at step {step} of {config.steps} (lr "
                                     f"{config.lr:g}): the coefficients diverged")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if config.max_coefficient is not None:
            with torch.no_grad():
                coefficients.clamp_(min=-config.max_coefficient, max=config.max_coefficient)
        losses.append(float(loss.detach()))
    return coefficients.detach(), losses


def mergerec(
    family: ModelFamily,
    theta0: StateDict,
    models: Mapping[str, StateDict],
    item_features: Mapping[str, torch.Tensor],
    config: MergeRecConfig = MergeRecConfig(),
    teachers: Mapping[str, StateDict] | None = None,
    pseudo_domains: Sequence[str] | None = None,
) -> tuple[StateDict, MergeRecReport]:
    """Learn merge coefficients of ``models`` (domain -> weights) on pseudo-users; return (merged θ, report).

    ``item_features[d]`` are domain d's catalog features (``family.item_features`` of its text embeddings).
    ``teachers[d]`` scores domain d's pseudo-users; by default d's own model ``models[d]``. ``pseudo_domains``: the
    catalogs whose pseudo-users are used (default: the models' domains; see :class:`PseudoUserObjective`).
    """
    objective = PseudoUserObjective(family, theta0, models, item_features, config, teachers, pseudo_domains)
    init = config.init_coefficient
    if init is None:
        init = MERGEREC_INITIAL_COEFFICIENT.get(config.init_method, objective.processed.scale)
    if config.max_coefficient is not None:  # |λ| ≤ max_coefficient from the first step (a start of -5 ran at -5)
        init = max(-config.max_coefficient, min(init, config.max_coefficient))
    shape = (len(objective.domains), len(objective.groups))
    starts = {"init": torch.full(shape, float(init))}
    if config.multi_start:
        own = 1.0 if config.max_coefficient is None else min(1.0, config.max_coefficient)
        for k, d in enumerate(objective.domains):
            starts[f"only {d}"] = torch.zeros(shape)
            starts[f"only {d}"][k] = own

    start = time.perf_counter()
    runs = {name: optimize_coefficients(objective, start_value, config) for name, start_value in starts.items()}
    start_objectives: dict[str, float] = {}
    if config.multi_start:
        selection = objective.users(config.selection_users, config.seed)
        start_objectives = {name: objective.mean_loss(learned, selection) for name, (learned, _) in runs.items()}
    chosen = min(start_objectives, key=start_objectives.get, default="init")
    learned, losses = runs[chosen]
    seconds = time.perf_counter() - start

    merged = merged_weights(theta0, objective.processed.vectors, learned, objective.column)
    report = MergeRecReport(
        domains=objective.domains,
        groups=objective.groups,
        coefficients={d: dict(zip(objective.groups, learned[k].tolist())) for k, d in enumerate(objective.domains)},
        initial_coefficient=float(init),
        loss_curve=losses,
        optimization_seconds=seconds,
        teacher_seconds=objective.teacher_seconds,
        teacher_score_scale=objective.pseudo.scales,
        config={**asdict(config), "init_params": dict(config.init_params)},
        start_objectives=start_objectives,
        chosen_start=chosen,
        teacher_bytes=objective.teacher_bytes,
    )
    logger.info("MergeRec %s/%s: %d steps from %d start(s) in %.1f s, kept %r, final loss %.4g", config.init_method,
                config.granularity, config.steps, len(runs), seconds, chosen, losses[-1] if losses else float("nan"))
    return merged, report
