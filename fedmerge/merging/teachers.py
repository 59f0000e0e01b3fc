"""Sparse teacher distributions for MergeRec: each pseudo-user's teacher kept as its top-k items plus the rest's mass.

MergeRec's dense teachers are n_d × n_d score matrices (≈ 0.6 GB for a 12k-item catalog in float32); with
``MergeRecConfig.teacher_top_k = k`` each row keeps only

* ``values`` (k,): the teacher's k highest scores t_i, i ∈ K (descending), and ``indices`` (k,) their items;
* ``log_norm``: log Z = logsumexp_j t_j / T over *all* items j (so p_i = exp(t_i/T − log Z) is the exact teacher
  probability of a kept item);
* ``log_rest``: log r with r = Σ_{j∉K} p_j, the teacher's mass outside K,

i.e. 2k + 2 numbers per row: memory O(Σ_d n_d·k) instead of O(Σ_d n_d²).

The KL uses the exact terms over the kept items and lumps the remainder into one outcome:

    KL_k(p ‖ q) = Σ_{i∈K} p_i (log p_i − log q_i) + r (log r − log q_R),   q_R = Σ_{j∉K} q_j,

the KL between the two distributions coarsened to k + 1 outcomes (each kept item, and "any other item"). By the
data-processing inequality KL_k ≤ KL; it equals the dense KL when k = n_d (r = 0, the term is dropped) and whenever
the student's distribution over the dropped items is proportional to the teacher's. Unlike renormalizing p over K
it keeps the teacher's kept probabilities exact and still tells the student how much mass belongs elsewhere.
The cross-entropy term CE(s, argmax t) reads argmax t = the first kept index (ties between equal top scores may
resolve to another item than the dense ``argmax``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TopKRows:
    """Rows of sparse teacher distributions (see the module docstring); every field has one row per pseudo-user."""

    values: torch.Tensor  # (b, k) float32, descending
    indices: torch.Tensor  # (b, k) int32 item indices
    log_norm: torch.Tensor  # (b,) logsumexp of all scores / T
    log_rest: torch.Tensor  # (b,) log of the mass outside the kept items (LOG_REST_FLOOR: none)

    def __getitem__(self, rows: torch.Tensor) -> TopKRows:
        return TopKRows(self.values[rows], self.indices[rows], self.log_norm[rows], self.log_rest[rows])

    def __setitem__(self, rows: torch.Tensor, other: TopKRows) -> None:
        self.values[rows], self.indices[rows] = other.values, other.indices
        self.log_norm[rows], self.log_rest[rows] = other.log_norm, other.log_rest

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.log_norm, self.log_rest))

    @staticmethod
    def cat(parts: list[TopKRows]) -> TopKRows:
        return TopKRows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("values", "indices", "log_norm",
                                                                                 "log_rest")))


LOG_REST_FLOOR = -1e4  # log r when the dropped mass underflows: r·(log r − log q_R) is then 0, never 0·(−inf)
EXP_FLOOR = -80.0  # (t_j − m)/T below this counts as this: keeps exp out of slow denormal floats (error ≤ n·e⁻⁸⁰)


def top_k_rows(scores: torch.Tensor, k: int, temperature: float) -> TopKRows:
    """Sparse form of dense teacher rows ``scores`` (b, n) at temperature T: k = min(k, n) kept items per row.

    One exp pass: with m the row's top score, e_j = exp(max((t_j − m)/T, −80)), log Z = m/T + log Σ_j e_j and
    log r = log Σ_{j∉K} e_j − log Σ_j e_j (floored at ``LOG_REST_FLOOR``)."""
    k = min(k, scores.shape[1])
    values, indices = scores.topk(k, dim=1)
    top = values[:, :1] / temperature
    weights = (scores / temperature - top).clamp_(min=EXP_FLOOR).exp_()
    total = weights.sum(dim=1)
    rest = weights.scatter_(1, indices, 0.0).sum(dim=1)
    log_rest = (rest.log() - total.log()).clamp(min=LOG_REST_FLOOR)
    return TopKRows(values, indices.int(), top.squeeze(1) + total.log(), log_rest)


def top_k_distillation_loss(
    student: torch.Tensor, teacher: TopKRows, temperature: float, distill_weight: float
) -> torch.Tensor:
    """Mean over rows of CE(s, argmax t) + c·T²·KL_k(p ‖ softmax(s/T)) with the lumped-remainder KL_k of the module
    docstring; ``student`` is dense (b, n), ``teacher`` sparse. With k = n this is
    :func:`fedmerge.merging.mergerec.distillation_loss` up to float rounding."""
    indices = teacher.indices.long()
    ce = F.cross_entropy(student, indices[:, 0])
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p_kept = teacher.values / temperature - teacher.log_norm.unsqueeze(1)
    kl = (log_p_kept.exp() * (log_p_kept - log_q.gather(1, indices))).sum(dim=1)
    if indices.shape[1] < student.shape[1]:  # some mass was dropped: one more outcome, "any other item"
        log_q_rest = torch.logsumexp(log_q.scatter(1, indices, float("-inf")), dim=1)
        kl = kl + teacher.log_rest.exp() * (teacher.log_rest - log_q_rest)
    return ce + distill_weight * temperature**2 * kl.mean()
