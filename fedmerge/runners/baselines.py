"""Baselines outside the federation: the centralized joint-training oracle (non-private by construction)."""

from __future__ import annotations

import logging

from fedmerge.data import concat_domains
from fedmerge.models import StateDict
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)


def joint_oracle(cfg: Scenario, theta0: StateDict) -> StateDict:
    """Train one model from θ₀ on all training domains pooled (an upper reference that needs everyone's data)."""
    domains = [cfg.load_domain(d) for d in cfg.data.training_domains()]
    joint = concat_domains(domains)
    family = cfg.model.make_family()
    features = cfg.encoder.item_features(joint.catalog, family)
    logger.info("joint oracle: training on %d pooled users of %s (non-private)", joint.n_users, [d.name for d in domains])
    weights, _ = family.train(theta0, joint, features, seed=cfg.run.seed, progress=cfg.run.progress)
    return weights
