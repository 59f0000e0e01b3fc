"""Privacy of shipped weights: client-side DP (clipping, Gaussian noise, ε accounting) and a membership probe."""

from fedmerge.privacy.dp import (
    classic_noise_multiplier,
    clip_update,
    epsilon_for,
    gaussian_delta,
    noise_multiplier_for,
    privatize_update,
    task_vector_norm,
)
from fedmerge.privacy.membership import membership_auc, rank_auc, sequence_losses, split_members, subset_users

__all__ = [
    "classic_noise_multiplier",
    "clip_update",
    "epsilon_for",
    "gaussian_delta",
    "membership_auc",
    "noise_multiplier_for",
    "privatize_update",
    "rank_auc",
    "sequence_losses",
    "split_members",
    "subset_users",
    "task_vector_norm",
]
