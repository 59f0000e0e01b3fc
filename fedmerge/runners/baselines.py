"""Baselines outside the federation: the centralized joint-training oracle (non-private by construction)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fedmerge.data import concat_domains
from fedmerge.models import StateDict
from fedmerge.models.base import reported_training
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)


def joint_oracle(cfg: Scenario, theta0: StateDict) -> tuple[StateDict, float, dict[str, Any]]:
    """Train one model from θ₀ on all training domains pooled (an upper reference that needs everyone's data);
    returns it, the seconds spent on the pooled catalog's item features (text encoding: with a cold cache the
    oracle, which runs first, encodes what the clients then read from the cache) and its training metrics (numbers
    and ``stop_reason``)."""
    domains = [cfg.load_domain(d) for d in cfg.data.training_domains()]
    joint = concat_domains(domains)
    family = cfg.model.make_family()
    start = time.perf_counter()
    features = cfg.encoder.item_features(joint.catalog, family)
    encoding = time.perf_counter() - start
    logger.info("joint oracle: training on %d pooled users of %s (non-private)", joint.n_users, [d.name for d in domains])
    weights, info = family.train(theta0, joint, features, seed=cfg.run.seed, progress=cfg.run.progress)
    return weights, encoding, reported_training(info)
