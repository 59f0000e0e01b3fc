"""Test-time MergeRec for a catalog that no client trained on (a held-out domain, known only at test time).

The server holds θ₀, the training domains' shipped weights θ_k and every public catalog. For a new catalog h it
learns MergeRec coefficients λ (θ(λ) = θ₀ + Σ_k λ_k ⊙ τ̃_k, as in :mod:`fedmerge.merging.mergerec`) on
pseudo-users of h's own catalog, scored by a teacher that exists without any of h's interactions: θ₀ (the
text-similarity model, the best zero-shot recommender measured so far) or one training domain's model. With
``include_seen`` the seen domains' pseudo-users (teacher: each domain's own model) stay in the objective, so λ
cannot buy h's fit by breaking what the merge keeps of the seen domains:

    L(λ) = mean over pseudo-users u of (h's catalog [∪ the seen catalogs]) of
           CE(s_u(λ), argmax t_u) + c · T² · KL(softmax(t_u/T) ‖ softmax(s_u(λ)/T))

Everything read is public (catalog text) or already shipped (weights): no interaction of h, nor of any other
domain, is used, so the merge stays data-isolated. One merged model per new catalog.

Note what the teacher implies: with teacher θ₀ and ``include_seen=False`` λ = 0 reproduces the teacher exactly, so
the objective can at best find a θ(λ) that agrees with θ₀ on h's pseudo-users while moving elsewhere; what the
seen models add on h is whatever their task vectors do to h's items that θ₀'s own ranking rewards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at import: scenario validation reads TESTTIME_METHOD and teacher_choices
    import torch

    from fedmerge.merging.mergerec import MergeRecReport
    from fedmerge.merging.mergerec_config import MergeRecConfig
    from fedmerge.models.base import ModelFamily, StateDict

TESTTIME_METHOD = "mergerec_testtime"
THETA0_TEACHER = "theta0"


def teacher_choices(seen: list[str]) -> list[str]:
    """Valid ``teacher`` values: θ₀ or one seen domain's model."""
    return [THETA0_TEACHER, *seen]


def mergerec_for_new_catalog(
    family: ModelFamily,
    theta0: StateDict,
    models: Mapping[str, StateDict],
    seen_features: Mapping[str, torch.Tensor],
    new_domain: str,
    new_features: torch.Tensor,
    config: MergeRecConfig,
    teacher: str = THETA0_TEACHER,
    include_seen: bool = True,
) -> tuple[StateDict, MergeRecReport]:
    """Merge of ``models`` (seen domain -> weights) for the catalog ``new_domain`` (its item features
    ``new_features``), coefficients learned on pseudo-users of that catalog (see the module docstring).

    ``seen_features[d]``: the seen domains' catalog features (needed with ``include_seen``). ValueError names an
    unknown teacher or a new domain that is also a seen one.
    """
    from fedmerge.merging.mergerec import mergerec

    seen = list(models)
    if new_domain in models:
        raise ValueError(f"test-time merging is for a catalog no client trained on; {new_domain!r} is one of {seen}")
    if teacher not in teacher_choices(seen):
        raise ValueError(f"unknown test-time teacher {teacher!r}; valid: {teacher_choices(seen)}")
    teachers: dict[str, StateDict] = dict(models) if include_seen else {}
    teachers[new_domain] = theta0 if teacher == THETA0_TEACHER else models[teacher]
    features = {**(dict(seen_features) if include_seen else {}), new_domain: new_features}
    pseudo = [*(seen if include_seen else []), new_domain]
    return mergerec(family, theta0, models, features, config, teachers=teachers, pseudo_domains=pseudo)
