"""Baselines outside the federation: the centralized joint-training oracle (non-private by construction)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fedmerge.config import training_domains
from fedmerge.data import concat_domains
from fedmerge.models import StateDict
from fedmerge.scenario import family_of, item_features, load_named_domain

logger = logging.getLogger(__name__)


def joint_oracle(cfg: Mapping[str, Any], theta0: StateDict) -> StateDict:
    """Train one model from θ₀ on all training domains pooled (an upper reference that needs everyone's data)."""
    domains = [load_named_domain(cfg, d) for d in training_domains(cfg)]
    joint = concat_domains(domains)
    family = family_of(cfg)
    features = item_features(cfg, joint.catalog, family)
    logger.info("joint oracle: training on %d pooled users of %s (non-private)", joint.n_users, [d.name for d in domains])
    weights, _ = family.train(theta0, joint, features, seed=int(cfg["run"]["seed"]), progress=bool(cfg["run"]["progress"]))
    return weights
