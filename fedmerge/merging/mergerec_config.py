"""MergeRec's settings and scenario names, torch-free (so that validating a scenario does not import torch): every
constant of the algorithm in :mod:`fedmerge.merging.mergerec` is a :class:`MergeRecConfig` field."""

from __future__ import annotations

from collections.abc import Mapping
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from fedmerge.checks import describe_type, matches_type
from fedmerge.merging.registry import get_method, resolve_params

# scenario ``merge.methods`` names of MergeRec -> coefficient granularity
MERGEREC_METHODS = {"mergerec_taskwise": "task", "mergerec_layerwise": "layer", "mergerec_tensorwise": "tensor"}

# Named settings of every MergeRecConfig constant (``MergeRecConfig.from_keys(preset=...)``); ``init_scope`` is the
# ``scope`` given to a ``ties`` initialization unless init_params sets it (``ties_global`` and ``pcb_released`` name
# their whole-model scope and keep it).
PRESET_SCOPED_METHODS = ("ties",)
# model families whose scores are cos/τ with a ``temperature`` τ: the ones ``logit_norm = "cosine"`` applies to
# (checked when a scenario loads, without importing the families)
FAMILIES_SCORING_COSINE = frozenset({"sequential"})
MERGEREC_PRESETS: dict[str, dict[str, Any]] = {
    # the official scripts (scripts/3_mergerec/*.sh, configs/distill.py, weight_learning/module/layer_wise.py):
    # T = 0.05, c = 1000, Adam lr 1e-3, batch 16, 500 steps, λ₀ 0.2 (task vector) / 1.0 (TIES), TIES trimmed over
    # the whole flattened model, cached item embeddings, one-item pseudo-users drawn from the union of domains,
    # layer-wise groups = one per Transformer layer plus one "others" group
    "paper": {
        "temperature": 0.05, "distill_weight": 1000.0, "lr": 1e-3, "batch_size": 16, "steps": 500,
        "init_coefficient": None, "max_coefficient": None, "sampling": "union", "logit_norm": "none",
        "item_side": "frozen", "item_refresh": 0, "exclude_input_item": False, "pseudo_user_length": 1,
        "multi_start": False, "selection_users": 0, "layer_groups": "transformer", "init_scope": "model",
    },
    # fedmerge's own setting (scenario amazon-seq-routed; its single-seed table in results/merge/history.md and the
    # seeded one in README's Merging section): weaker distillation,
    # rollout pseudo-users without their own items, periodically refreshed candidates, family layer groups,
    # per-tensor TIES
    "fedmerge": {
        "temperature": 0.05, "distill_weight": 10.0, "lr": 3e-3, "batch_size": 16, "steps": 500,
        "init_coefficient": None, "max_coefficient": None, "sampling": "union", "logit_norm": "none",
        "item_side": "frozen", "item_refresh": 25, "exclude_input_item": True, "pseudo_user_length": 3,
        "multi_start": False, "selection_users": 0, "layer_groups": "family", "init_scope": "tensor",
    },
}


@dataclass(frozen=True)
class MergeRecConfig:
    """Every constant of MergeRec. Defaults follow the paper's released scripts except ``layer_groups`` (the
    family's groups) and a TIES initialization's per-tensor scope; :meth:`from_keys` with ``preset="paper"`` sets
    all of them."""

    init_method: str = "task_arithmetic"
    init_params: Mapping[str, Any] = field(default_factory=dict)
    granularity: Literal["task", "layer", "tensor"] = "task"
    # layer-wise groups: the family's ``parameter_groups`` or, as MergeRec's official layer-wise module, one group
    # per Transformer layer plus one "others" group (``family.transformer_layer_groups``)
    layer_groups: Literal["family", "transformer"] = "family"
    init_coefficient: float | None = None  # None: 0.2 (task arithmetic), 1.0 (TIES), else the method's λ
    # |λ| ≤ max_coefficient, projected after every step: bounds how much one client's (noisy) task vector is amplified
    # (a λ of −3 amplifies the noise as much as +3)
    max_coefficient: float | None = None
    temperature: float = 0.05
    distill_weight: float = 1000.0  # c
    lr: float = 1e-3
    batch_size: int = 16
    steps: int = 500
    seed: int = 0
    sampling: Literal["union", "domain"] = "union"
    # teacher and student scores as the family gives them ("none"), divided by the teacher's std ("teacher_std"), or
    # multiplied by the family's τ ("cosine": raw cosines, as MergeRec's released code distills; needs a family that
    # scores cos/τ, e.g. the sequential one)
    logit_norm: Literal["none", "teacher_std", "cosine"] = "none"
    item_side: Literal["full", "frozen"] = "frozen"
    exclude_input_item: bool = False  # drop the pseudo-user's own items from its teacher and student distributions
    pseudo_user_length: int = 1  # L: pseudo-users are the prefixes of length 1..L of teacher rollouts (1: the paper)
    # also start from λ = 1 on domain k's processed task vector τ̃_k, 0 on the others (one start per k; min(1,
    # max_coefficient) under a cap): domain k's own model only with init_method "task_arithmetic" (an unweighted
    # average start gives θ₀ + τ_k/K, a TIES start θ₀ + τ_k's trimmed share of the disjoint mean); keep the run
    # with the lowest objective
    multi_start: bool = False
    selection_users: int = 0  # multi_start ranks runs by the objective over this many seeded pseudo-users (0: all)
    item_refresh: int = 0  # with item_side="frozen": recompute item representations every this many steps (0: never)
    teacher_batch: int = 512
    # keep each teacher row's top-k items plus the rest's mass (0: the paper's dense n_d × n_d teachers)
    teacher_top_k: int = 0
    progress: bool = True
    # the preset :meth:`from_keys` resolved (a record for reports: constructing MergeRecConfig directly applies
    # no preset, it only checks the name)
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in MERGEREC_PRESETS:
            raise ValueError(f"unknown MergeRec preset {self.preset!r}; valid: {sorted(MERGEREC_PRESETS)}")
        hints = typing.get_type_hints(type(self))
        wrong = [f"{f.name} must be {describe_type(hints[f.name])}, got {getattr(self, f.name)!r}"
                 for f in fields(self) if not matches_type(getattr(self, f.name), hints[f.name])]
        if wrong:  # a TOML 2.5 where an integer belongs, "yes" where true or false does, a misspelled choice
            raise ValueError("; ".join(wrong))
        # the float constants must be finite (TOML allows inf and nan; an inf temperature or lr, or a nan λ₀, passed
        # and MergeRec failed only after every client had trained, blaming divergence)
        finite = lambda value: value is None or math.isfinite(value)
        checks = {
            "item_refresh": self.item_refresh >= 0,
            "temperature": finite(self.temperature) and self.temperature > 0,
            "distill_weight": finite(self.distill_weight) and self.distill_weight >= 0,
            "lr": finite(self.lr) and self.lr > 0,
            "batch_size": self.batch_size >= 1,
            "steps": self.steps >= 0,
            "init_coefficient": finite(self.init_coefficient),
            "max_coefficient": self.max_coefficient is None or (finite(self.max_coefficient)
                                                                and self.max_coefficient > 0),
            "teacher_batch": self.teacher_batch >= 1,
            "teacher_top_k": self.teacher_top_k >= 0,
            "pseudo_user_length": self.pseudo_user_length >= 1,
            "selection_users": self.selection_users >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid MergeRecConfig values: {[(k, getattr(self, k)) for k in bad]}")
        resolve_params(self.init_method, self.init_params)  # ValueError naming an unknown method or bad parameter

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any]) -> MergeRecConfig:
        """A config from ``keys`` (field -> value, e.g. a scenario's ``[merge.mergerec]`` table), where the optional
        key ``preset`` names a :data:`MERGEREC_PRESETS` entry whose constants fill every field the other keys do
        not set: explicit keys override the preset. The preset's ``init_scope`` becomes a ``ties`` initialization's
        ``scope`` (unless ``init_params`` sets it; ``ties_global`` and ``pcb_released`` keep their own). ValueError names an unknown
        preset or key and lists the valid ones."""
        values = dict(keys)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown MergeRec key(s) {unknown}; valid: {valid}")
        preset = values.get("preset")
        if preset is None:
            return cls(**values)
        if preset not in MERGEREC_PRESETS:
            raise ValueError(f"unknown MergeRec preset {preset!r}; valid: {sorted(MERGEREC_PRESETS)}")
        constants = dict(MERGEREC_PRESETS[preset])
        scope = constants.pop("init_scope")
        values = {**constants, **values}
        init_method = values.get("init_method", cls.init_method)
        init_params = dict(values.get("init_params", {}))
        if init_method in PRESET_SCOPED_METHODS and "scope" in get_method(init_method).params:
            init_params.setdefault("scope", scope)
        return cls(**{**values, "init_params": init_params})
