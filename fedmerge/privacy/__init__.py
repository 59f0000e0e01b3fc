"""Privacy of shipped weights: client-side DP (clipping, Gaussian noise, ε accounting) and a membership probe.

The names below are imported from their modules (which import torch) on first use, so that validating a
scenario's ``[privacy]`` table (:func:`fedmerge.privacy.client.validate_privacy`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmerge.privacy.dp import (
        classic_noise_multiplier,
        clip_update,
        epsilon_for,
        gaussian_delta,
        noise_multiplier_for,
        privatize_update,
    )
    from fedmerge.privacy.membership import (
        membership_auc,
        rank_auc,
        sequence_losses,
        split_members,
        split_users,
        subset_users,
    )

# name -> the submodule that defines it
HOMES: dict[str, str] = {
    **dict.fromkeys(("classic_noise_multiplier", "clip_update", "epsilon_for", "gaussian_delta", "noise_multiplier_for",
                     "privatize_update"), "dp"),
    **dict.fromkeys(("membership_auc", "rank_auc", "sequence_losses", "split_members", "split_users",
                     "subset_users"), "membership"),
}


def __getattr__(name: str) -> Any:
    if name in HOMES:
        return getattr(importlib.import_module(f"fedmerge.privacy.{HOMES[name]}"), name)
    raise AttributeError(f"module 'fedmerge.privacy' has no attribute {name!r}")


__all__ = sorted(HOMES)
